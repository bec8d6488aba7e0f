"""One of two processes in a gloo group whose timeout is 2 s: process 1 works 5 s inside
utils.processes.wait_for_all_however_long while process 0 waits there (tests/test_multiprocess.py starts both:
python tests/long_wait_process.py RANK FOLDER)."""

import datetime
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from utils.processes import wait_for_all_however_long  # noqa: E402

GROUP_TIMEOUT_S, WORK_S = 2, 5

rank, folder = int(sys.argv[1]), Path(sys.argv[2])
(folder / f"ready-{rank}").touch()  # both imported torch: joining the group now takes well under the timeout
while not (folder / f"ready-{1 - rank}").exists():
    time.sleep(0.05)
dist.init_process_group("gloo", init_method=(folder / "group").as_uri(), rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
with wait_for_all_however_long(types.SimpleNamespace(num_processes=2)):
    if rank == 1:
        time.sleep(WORK_S)
total = torch.ones(1)
dist.all_reduce(total)  # the run's own group goes on after the wait
print(f"process {rank} through, {int(total.item())} processes")
dist.destroy_process_group()
