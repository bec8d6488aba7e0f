"""A trainer plugin that timestamps every training step, for bench/train_throughput.py --full.

    BENCH_STEP_TIMES=/tmp/steps.txt python train.py ... --plugins bench.step_timer.StepTimer

Appends one line per step to the file named by BENCH_STEP_TIMES: `time.perf_counter()` (s) at the step's end,
the global step, and the time the step started (on_step_start: the batch loaded, train_batch not yet begun).
On CUDA it first waits for the GPU, so that a timestamp marks the end of the work before it rather than the
end of its queueing (the trainer already waits once per step, for the loss). The gap from one step's end to
the next one's end is the step as a user sees it. In train.py the part from its start to its end is
train_batch and the step's bookkeeping (the loss meter, the progress bar, and on log steps the logging); the
rest lies between batches (the sample, validation and save checks, and loading the next batch).

At the end it adds the process's peak memory: on CUDA a `# peak_cuda_memory_bytes N` line
(max_memory_allocated) and a `# peak_cuda_reserved_bytes N` line (max_memory_reserved: what the card must hold,
the caching allocator's blocks included), otherwise a `# peak_rss_bytes N` line. Without BENCH_STEP_TIMES it
does nothing.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass

ENV_VAR = "BENCH_STEP_TIMES"
PEAK_KINDS = {"peak_cuda_memory_bytes": "torch.cuda.max_memory_allocated",
              "peak_rss_bytes": "peak RSS of the train.py process"}
RESERVED_KEY = "peak_cuda_reserved_bytes"  # torch.cuda.max_memory_reserved, beside max_memory_allocated


class StepTimer:
    """on_step_end appends `end global_step start` (perf_counter seconds) to $BENCH_STEP_TIMES."""

    def __init__(self):
        self.path = os.environ.get(ENV_VAR)
        self.started = None  # perf_counter at the current step's on_step_start

    def on_training_start(self, **kwargs) -> None:
        pass

    def on_step_start(self, **kwargs) -> None:
        if self.path:
            _synchronize_cuda()
            self.started = time.perf_counter()

    def on_step_end(self, **kwargs) -> None:
        if not self.path:
            return
        _synchronize_cuda()
        now = time.perf_counter()
        started = "" if self.started is None else f" {self.started:.6f}"
        with open(self.path, "a", encoding="utf-8") as handle:  # the step always written: the start is 3rd
            handle.write(f"{now:.6f} {kwargs.get('global_step', -1)}{started}\n")
        self.started = None

    def on_training_end(self, **kwargs) -> None:
        if not self.path:
            return
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            lines = [f"# peak_cuda_memory_bytes {torch.cuda.max_memory_allocated()}",
                     f"# {RESERVED_KEY} {torch.cuda.max_memory_reserved()}"]
        else:
            lines = [f"# peak_rss_bytes {peak_rss_bytes()}"]
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for line in lines)


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program.

    On Linux from /proc (VmHWM): getrusage's ru_maxrss would also count the memory of the process that
    started it, which a child inherits at fork and keeps across exec (the benchmark's own model).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kilobytes elsewhere


def _synchronize_cuda() -> None:
    import torch  # already loaded by the trainer

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclass
class StepTimes:
    """What a StepTimer file holds: each step's end and start (perf_counter seconds; a start is None where the
    trainer did not call on_step_start), and the peak memory recorded at the end, how it was measured, and on
    CUDA the peak reserved (None for what the run did not record)."""

    ends: list[float]
    starts: list[float | None]
    peak_bytes: int | None = None
    peak_kind: str | None = None
    reserved_bytes: int | None = None


def read_step_times(path: str) -> StepTimes:
    """A StepTimer file's steps, in order, and its peak memory."""
    found = StepTimes([], [])
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#"):
                key, value = line[1:].split()
                if key == RESERVED_KEY:
                    found.reserved_bytes = int(value)
                else:
                    found.peak_bytes, found.peak_kind = int(value), PEAK_KINDS[key]
            elif line.strip():
                fields = line.split()
                found.ends.append(float(fields[0]))
                found.starts.append(float(fields[2]) if len(fields) > 2 else None)
    return found
