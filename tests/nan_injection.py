"""train.py with trouble on one process, for what a multi-process run does with it (tests/test_multiprocess.py
launches it with accelerate): a NaN loss on process $NAN_PROCESS (default 0) at step $NAN_AT_STEP, and, when
$SKIPPED_IMAGE_ON_PROCESS is set, an image that process reports unreadable at its first training batch."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from utils.run_folder import SkipReport  # noqa: E402

original_train_step = train.train_step
original_add_skipped = SkipReport.add
INJECTED_IMAGE = "injected/unreadable.jpg"


def train_step(trainee, batch, config, global_step, accelerator):
    loss = original_train_step(trainee, batch, config, global_step, accelerator)
    stand_in = not batch["loss_scale"].any()  # train_batch's zero-weight stand-in for the batch that failed
    if (accelerator.process_index == int(os.environ.get("NAN_PROCESS", "0"))
            and global_step == int(os.environ["NAN_AT_STEP"]) and not stand_in):
        return loss * float("nan")
    return loss


def add_skipped(self, entries):
    """The training loop's report of the images a batch could not load; the first one on the process named."""
    if os.environ.get("SKIPPED_IMAGE_ON_PROCESS") == os.environ.get("RANK") and not getattr(add_skipped, "done", 0):
        add_skipped.done = True
        entries = [*entries, (INJECTED_IMAGE, f"cannot be read: injected on process {os.environ['RANK']}")]
    original_add_skipped(self, entries)


train.train_step = train_step
SkipReport.add = add_skipped

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
