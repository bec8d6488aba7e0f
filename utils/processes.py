"""What the processes of a multi-GPU run decide together (accelerate's collectives; one process: no-ops).

Every process runs the same loop over its share of each epoch, so a decision that one process would take
alone (stop on Ctrl-C, save on the clock) must be taken by all at the same step, or they would wait on
each other for ever.
"""

from __future__ import annotations

import torch


def any_process(accelerator, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true when it is true on any process (one small all-reduce for all of them)."""
    return tuple(count > 0 for count in sum_over_processes(accelerator, *(int(bool(flag)) for flag in flags)))


def sum_over_processes(accelerator, *values: float) -> tuple[float, ...]:
    """Each value summed over the processes, in one all-reduce (ints stay ints)."""
    if accelerator.num_processes == 1:
        return values
    # float64: validation sums of thousands of losses, and counts, stay exact enough.
    values_tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=accelerator.device)
    totals = accelerator.reduce(values_tensor, "sum").tolist()
    return tuple(round(total) if isinstance(value, int) else total for value, total in zip(values, totals))


def main_process_value(accelerator, value):
    """The main process's value of a picklable object, on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def mean_over_processes(accelerator, mean: float, count: int) -> float:
    """The mean of all processes' values from each one's mean of `count` values (NaN when count is 0)."""
    if accelerator.num_processes == 1:
        return mean
    total, count = sum_over_processes(accelerator, mean * count if count else 0.0, count)
    return total / count if count else float("nan")


def gathered(accelerator, values: list) -> list:
    """Every process's list of picklable values, joined in rank order, on every process."""
    if accelerator.num_processes == 1:
        return list(values)
    from accelerate.utils import gather_object

    return gather_object(values)


def share_on_this_machine(accelerator) -> tuple[int, int]:
    """(this process's index on its machine, the number of processes there). From the launcher's
    LOCAL_RANK and LOCAL_WORLD_SIZE (accelerate launch and torchrun set them); without them, from the host
    names of every process, in rank order."""
    import os

    if "LOCAL_WORLD_SIZE" in os.environ or accelerator.num_processes == 1:
        return accelerator.local_process_index, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    import socket

    here = socket.gethostname()
    hosts = gathered(accelerator, [here])
    return hosts[:accelerator.process_index].count(here), hosts.count(here)
