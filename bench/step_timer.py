"""A trainer plugin that timestamps every training step, for bench/train_throughput.py --full.

    BENCH_STEP_TIMES=/tmp/steps.txt python train.py ... --plugins bench.step_timer.StepTimer

Appends one line per step to the file named by BENCH_STEP_TIMES: `time.perf_counter()` (s) and the global
step. On CUDA it first waits for the GPU, so that a timestamp marks the end of the step's work rather than
the end of its queueing (the trainer already waits once per step, for the loss). At the end it adds the
process's peak memory: on CUDA a `# peak_cuda_memory_bytes N` line (max_memory_allocated) and a
`# peak_cuda_reserved_bytes N` line (max_memory_reserved: what the card must hold, the caching allocator's
blocks included), otherwise a `# peak_rss_bytes N` line.
Without BENCH_STEP_TIMES it does nothing.
"""

from __future__ import annotations

import os
import resource
import sys
import time

ENV_VAR = "BENCH_STEP_TIMES"
PEAK_KINDS = {"peak_cuda_memory_bytes": "torch.cuda.max_memory_allocated",
              "peak_rss_bytes": "peak RSS of the train.py process"}
RESERVED_KEY = "peak_cuda_reserved_bytes"  # torch.cuda.max_memory_reserved, beside max_memory_allocated


class StepTimer:
    """on_step_end appends `perf_counter global_step` to $BENCH_STEP_TIMES."""

    def __init__(self):
        self.path = os.environ.get(ENV_VAR)

    def on_training_start(self, **kwargs) -> None:
        pass

    def on_step_end(self, **kwargs) -> None:
        if not self.path:
            return
        _synchronize_cuda()
        now = time.perf_counter()
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(f"{now:.6f} {kwargs.get('global_step', '')}\n")

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


def read_step_times(path: str) -> tuple[list[float], int | None, str | None, int | None]:
    """The timestamps (s) of a StepTimer file, in order; the peak memory (bytes) recorded at the end, how it was
    measured, and on CUDA the peak reserved memory (bytes) (None for what the run did not record)."""
    times, peak, kind, reserved = [], None, None, None
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#"):
                key, value = line[1:].split()
                if key == RESERVED_KEY:
                    reserved = int(value)
                else:
                    peak, kind = int(value), PEAK_KINDS[key]
            elif line.strip():
                times.append(float(line.split()[0]))
    return times, peak, kind, reserved
