"""One of two processes, each its own "machine" with its own copy of the latent cache, in a gloo group whose
timeout is 2 s: process 0's copy is full, process 1's empty, and process 1's VAE takes 0.6 s a batch, so its
fill (7 batches) outlasts the timeout while process 0 has nothing to encode. tests/test_multiprocess.py fills
process 0's copy and starts both: python tests/long_wait_process.py RANK FOLDER."""

import datetime
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.items import scan_dataset  # noqa: E402
from data.plan import PlanOptions, image_variants  # noqa: E402
from utils.latent_cache import LatentCache, fill_latent_cache  # noqa: E402

GROUP_TIMEOUT_S, SECONDS_A_BATCH, BATCH_SIZE = 2, 0.6, 2


def demo_cache(folder: Path, vae) -> tuple:
    """The cache in `folder` of the demo images (FOLDER/images), their variants and the images."""
    items = scan_dataset(str(folder.parent / "images"), 256).items
    return LatentCache.open(str(folder), vae, items), image_variants(items, PlanOptions(seed=1, batch_size=2)), items


def slowed(encode):
    def slow_encode(*args, **kwargs):
        time.sleep(SECONDS_A_BATCH)
        return encode(*args, **kwargs)
    return slow_encode


if __name__ == "__main__":
    import torch
    import torch.distributed as dist

    from utils.processes import any_process, sum_over_processes
    from utils.tiny_model import build_tiny_components

    rank, folder = int(sys.argv[1]), Path(sys.argv[2])
    vae = build_tiny_components()["vae"]
    if rank == 1:
        vae.encode = slowed(vae.encode)
    cache, variants, items = demo_cache(folder / f"cache-{rank}", vae)
    (folder / f"ready-{rank}").touch()  # both imported torch: joining the group now takes well under the timeout
    while not (folder / f"ready-{1 - rank}").exists():
        time.sleep(0.05)
    dist.init_process_group("gloo", init_method=(folder / "group").as_uri(), rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))

    def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:  # what accelerator.reduce(tensor, "sum") does
        dist.all_reduce(tensor)
        return tensor

    accelerator = types.SimpleNamespace(num_processes=2, device="cpu", reduce=all_reduce)
    started = time.monotonic()
    result = fill_latent_cache(cache, items, variants, vae, "cpu", BATCH_SIZE, progress=False,
                               keep_pace=lambda encoding: any_process(accelerator, encoding)[0])
    waited = time.monotonic() - started
    encoded, reused = sum_over_processes(accelerator, result.encoded, result.reused)
    print(f"process {rank}: {result.encoded} encoded, {result.reused} reused in {waited:.1f} s; "
          f"{encoded} encoded and {reused} reused in all")
    dist.destroy_process_group()
