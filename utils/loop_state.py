"""Everything the training loop changes as it runs, in one object that is saved with each checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class LoopState:
    epoch: int = 0  # epochs completed
    global_step: int = 0  # batches trained so far (the `gs` in checkpoint names)
    optimizer_step: int = 0  # optimizer updates so far (what the lr schedule counts)
    batch_in_epoch: int = 0  # batches done in the current epoch (0 between epochs)
    batches_in_group: int = 0  # batches whose gradients are accumulated since the last optimizer step
    elapsed_seconds: float = 0.0  # training time so far, excluding start-up
    last_save_seconds: float = 0.0  # elapsed_seconds at the last save
    last_save_step: int = -1  # global_step of the last save (-1: none yet)
    nonfinite_batches: int = 0  # batches skipped because their loss was NaN or infinite, on every process
    nonfinite_in_a_row: int = 0  # of this process's, how many just now, in a row
    nonfinite_in_group: int = 0  # this process's in the current grad_accum group (added to the total at its end)
    best_validation_loss: float | None = None  # the lowest held-out validation loss so far
    validations_without_improvement: int = 0  # since then (early_stopping_patience)
    # Each validation curve's first value: use_relative_loss logs the curve minus it, a resumed run too.
    first_validation_losses: dict[str, float] = dataclasses.field(default_factory=dict)

    def mark_saved(self) -> None:
        """Restart the save clocks (periodic_save_due) at this step."""
        self.last_save_seconds, self.last_save_step = self.elapsed_seconds, self.global_step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def steps_at(state: LoopState, batches_per_epoch: list[int], grad_accum: int) -> tuple[int, int]:
    """(global_step, optimizer_step) at the state's epoch and batch_in_epoch under a plan of batches_per_epoch
    (each process's; a checkpoint's position is always at the end of a grad_accum group)."""
    done = batches_per_epoch[:state.epoch]
    in_epoch = min(state.batch_in_epoch, batches_per_epoch[state.epoch]) if state.epoch < len(batches_per_epoch) else 0
    return (sum(done) + in_epoch,
            sum(math.ceil(count / grad_accum) for count in done) + math.ceil(in_epoch / grad_accum))
