"""What the processes of a multi-GPU run decide together (accelerate's collectives; one process: no-ops).

Every process runs the same loop over its share of each epoch, so a decision that one process would take
alone (stop on Ctrl-C, save on the clock) must be taken by all at the same step, or they would wait on
each other for ever.
"""

from __future__ import annotations

import torch


def any_process(accelerator, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true when it is true on any process (one small all-reduce for all of them)."""
    if accelerator.num_processes == 1:
        return tuple(bool(flag) for flag in flags)
    summed = accelerator.reduce(torch.tensor([float(bool(flag)) for flag in flags], device=accelerator.device), "sum")
    return tuple(bool(value > 0) for value in summed.tolist())


def sum_over_processes(accelerator, value: float) -> float:
    """The value summed over the processes (an int stays an int)."""
    if accelerator.num_processes == 1:
        return value
    total = accelerator.reduce(torch.tensor([float(value)], device=accelerator.device), "sum").item()
    return round(total) if isinstance(value, int) else total


def zero_backward(modules: dict) -> None:
    """A backward pass that adds nothing to any gradient, for a process with nothing to train at the end of
    an accumulation group: DistributedDataParallel averages the gradients during the backward pass, and
    every process must take part."""
    params = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    (sum(p.sum() for p in params) * 0.0).backward()
