"""train.py with an exception raised on process 1 at step $ERROR_AT_STEP, or with process $DISK_FULL_ON_PROCESS
unable to write latent-cache entries (the disk full): what a multi-process run does when one process fails
(tests/test_multiprocess.py launches it with accelerate). tests/nan_injection.py's troubles too, each when its
variable is set."""

import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tests.nan_injection  # noqa: E402, F401  (patches train.train_step first: the error is raised before its NaN)
import train  # noqa: E402
from utils.latent_cache import LatentCache  # noqa: E402

original_train_step = train.train_step


def train_step(trainee, batch, config, global_step, accelerator):
    if accelerator.process_index == 1 and global_step == int(os.environ.get("ERROR_AT_STEP", "-1")):
        raise RuntimeError(f"injected failure at step {global_step}")
    return original_train_step(trainee, batch, config, global_step, accelerator)


def save_on_a_full_disk(self, path, variant, params):
    raise OSError(errno.ENOSPC, "No space left on device")


train.train_step = train_step
if "DISK_FULL_ON_PROCESS" in os.environ and os.environ.get("RANK") == os.environ["DISK_FULL_ON_PROCESS"]:
    LatentCache.save = save_on_a_full_disk

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
