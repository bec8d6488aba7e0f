"""train.py where process 1 alone gets SIGTERM at step $STOP_AT_STEP and the main process takes $SAVE_DELAY_S
more seconds to write each checkpoint: whether the other processes wait for the main one's interrupted- save
(tests/test_multiprocess.py launches it with accelerate). Process 1 writes to $EXIT_REPORT, as it leaves,
the checkpoints it finds finished then."""

import glob
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from utils import run_checkpoints  # noqa: E402

original_train_step, original_save_pipeline = train.train_step, run_checkpoints.save_pipeline


def train_step(trainee, batch, config, global_step, accelerator):
    if accelerator.process_index == 1 and global_step == int(os.environ["STOP_AT_STEP"]):  # steps done so far
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler that signals one process, not the launcher
    return original_train_step(trainee, batch, config, global_step, accelerator)


def slow_save_pipeline(*args, **kwargs):
    time.sleep(float(os.environ["SAVE_DELAY_S"]))  # a large model on a slow disk
    return original_save_pipeline(*args, **kwargs)


train.train_step, run_checkpoints.save_pipeline = train_step, slow_save_pipeline

if __name__ == "__main__":
    code = train.main(sys.argv[1:])
    if os.environ.get("RANK") == "1":
        logdir = sys.argv[sys.argv.index("--logdir") + 1]
        finished = sorted(os.path.basename(path) for path in glob.glob(os.path.join(logdir, "*", "ckpts", "*")))
        with open(os.environ["EXIT_REPORT"], "w", encoding="utf-8") as report:
            report.write("\n".join(finished))
    sys.exit(code)
