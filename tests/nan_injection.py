"""train.py with one NaN loss injected on the first process at step $NAN_AT_STEP: what a multi-process run
does when one process's batch cannot train (tests/test_multiprocess.py launches it with accelerate)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402

original_train_step = train.train_step


def train_step(trainee, batch, config, global_step, accelerator):
    loss = original_train_step(trainee, batch, config, global_step, accelerator)
    stand_in = not batch["loss_scale"].any()  # train_batch's zero-weight stand-in for the batch that failed
    if accelerator.process_index == 0 and global_step == int(os.environ["NAN_AT_STEP"]) and not stand_in:
        return loss * float("nan")
    return loss


train.train_step = train_step

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
