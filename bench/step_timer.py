"""A trainer plugin that timestamps every training step, for bench/train_throughput.py --full.

    BENCH_STEP_TIMES=/tmp/steps.txt python train.py ... --plugins bench.step_timer.StepTimer

Appends one line per step to the file named by BENCH_STEP_TIMES: `time.perf_counter()` (s) and the global
step. On CUDA it first waits for the GPU, so that a timestamp marks the end of the step's work rather than
the end of its queueing (the trainer already waits once per step, for the loss). At the end it adds a
`# peak_cuda_memory_bytes N` line on CUDA. Without BENCH_STEP_TIMES it does nothing.
"""

from __future__ import annotations

import os
import time

ENV_VAR = "BENCH_STEP_TIMES"


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
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(f"# peak_cuda_memory_bytes {torch.cuda.max_memory_allocated()}\n")


def _synchronize_cuda() -> None:
    import torch  # already loaded by the trainer

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def read_step_times(path: str) -> tuple[list[float], int | None]:
    """The timestamps (s) of a StepTimer file, in order, and the peak CUDA memory (bytes) when recorded."""
    times, peak = [], None
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("# peak_cuda_memory_bytes"):
                peak = int(line.split()[-1])
            elif line.strip() and not line.startswith("#"):
                times.append(float(line.split()[0]))
    return times, peak
