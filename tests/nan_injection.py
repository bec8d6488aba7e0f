"""train.py with trouble on one process, for what a multi-process run does with it (tests/test_multiprocess.py
launches it with accelerate): a NaN loss on process $NAN_PROCESS (default 0) at step $NAN_AT_STEP, and, when
$SKIPPED_IMAGE_ON_PROCESS is set, an image that process reports unreadable at its training batch number
$SKIPPED_IMAGE_AT_BATCH (default 1: its first); when
$REPLACED_IMAGE_ON_PROCESS is set, that process reads another content for the first image than the others do
(the file replaced while the processes started): the latent cache must key it as the main process read it."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data.fingerprint  # noqa: E402
import train  # noqa: E402
from utils.run_folder import SkipReport  # noqa: E402

original_train_step = train.train_step
original_add_skipped = SkipReport.add
original_file_digest = data.fingerprint.file_digest
INJECTED_IMAGE = "injected/unreadable.jpg"


def train_step(trainee, batch, config, global_step, accelerator):
    loss = original_train_step(trainee, batch, config, global_step, accelerator)
    stand_in = not batch["loss_scale"].any()  # train_batch's zero-weight stand-in for the batch that failed
    if (accelerator.process_index == int(os.environ.get("NAN_PROCESS", "0"))
            and global_step == int(os.environ.get("NAN_AT_STEP", "-1")) and not stand_in):
        return loss * float("nan")
    return loss


def add_skipped(self, entries):
    """The training loop's report of the images a batch could not load (once a batch); on the process named, one
    more in the batch named."""
    if os.environ.get("SKIPPED_IMAGE_ON_PROCESS") == os.environ.get("RANK"):
        add_skipped.batches = getattr(add_skipped, "batches", 0) + 1
        if add_skipped.batches == int(os.environ.get("SKIPPED_IMAGE_AT_BATCH", "1")):
            entries = [*entries, (INJECTED_IMAGE, f"cannot be read: injected on process {os.environ['RANK']}")]
    original_add_skipped(self, entries)


def file_digest(path):
    """data/fingerprint.py's reading of an image file; on the process named, the first image reads as replaced."""
    size, digest = original_file_digest(path)
    first = min(os.listdir(os.path.dirname(path)))
    if os.environ.get("REPLACED_IMAGE_ON_PROCESS") == os.environ.get("RANK") and os.path.basename(path) == first:
        return [size, "replaced" + digest[8:]]
    return [size, digest]


train.train_step = train_step
SkipReport.add = add_skipped
data.fingerprint.file_digest = file_digest

if __name__ == "__main__":
    code = train.main(sys.argv[1:])
    import torch.distributed

    assert code != 0 or not torch.distributed.is_initialized(), "train.main left the process group standing"
    sys.exit(code)
