"""Watching a run's curves: early stopping on the validation loss, and a warning for a training-loss spike.

Pure and torch-free: the loop feeds values in and acts on the answers. The early-stopping record lives in
LoopState, so a resumed run stops exactly where the uninterrupted one would have.
"""

from __future__ import annotations

import math
from collections import deque


def validation_verdict(value: float, best: float | None, without_improvement: int, patience: int | None
                       ) -> tuple[bool, int, bool]:
    """(improved, validations without improvement now, stop) after a validation loss of `value`.

    A loss improves on the best when it is lower; `patience` validations in a row without improvement stop
    the run (None: never).
    """
    improved = best is None or value < best
    count = 0 if improved else without_improvement + 1
    return improved, count, patience is not None and count >= patience


class SpikeWatch:
    """Reports the first log-step loss that is more than `factor` times the mean of the last `window` ones."""

    def __init__(self, factor: float = 3.0, window: int = 20, warm_up: int = 5):
        self.factor, self.warm_up = factor, warm_up
        self.recent: deque[float] = deque(maxlen=window)
        self.reported = False

    def add(self, loss: float) -> float | None:
        """The recent mean when `loss` is the first spike, else None."""
        spike = None
        if math.isfinite(loss):
            if len(self.recent) >= self.warm_up and not self.reported:
                mean = sum(self.recent) / len(self.recent)
                if loss > self.factor * mean:
                    spike, self.reported = mean, True
            self.recent.append(loss)
        return spike
