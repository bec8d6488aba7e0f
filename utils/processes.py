"""What the processes of a multi-GPU run decide together (accelerate's collectives; one process: no-ops):
the plan they start from, and each decision of the loop.

Every process runs the same loop over its share of each epoch, so a decision that one process would take
alone (stop on Ctrl-C, save on the clock) must be taken by all at the same step, or they would wait on
each other for ever.
"""

from __future__ import annotations

import contextlib


def share_random_seed(plan, accelerator, argv: list[str]):
    """With `seed: -1` each process drew its own seed; every process must train the main process's (the
    epoch plan each takes its share of, the crops and the noise all come from it): the others plan again
    (utils.run_plan.RunPlan). Every process takes part, whatever its own config says (machines may each
    read their own copy); one whose seed setting differs from the main process's, or whose planning again
    fails (the data changed meanwhile), is left for check_same_plan to name."""
    import sys

    from utils.config import ConfigError
    from utils.run_plan import plan_run

    if accelerator.num_processes == 1:
        return plan
    main_setting, main_seed = main_process_value(accelerator, (plan.loaded.config.seed, plan.config.seed))
    if plan.loaded.config.seed != -1 or main_setting != -1 or main_seed == plan.config.seed:
        return plan
    try:
        return plan_run(argv, random_seed=main_seed)
    except ConfigError as error:  # the data or the config changed since this process first planned: its first
        # plan, with its own seed, then differs from the main process's, and check_same_plan stops every process
        print(f"process {accelerator.process_index}: planning again with the main process's seed failed: {error}",
              file=sys.stderr)
        return plan


class ProcessesPlannedDifferently(Exception):
    """The processes of a launch found other data, settings or checkpoints to resume as they started."""


def check_same_plan(plan, accelerator) -> None:
    """Every process plans the run itself (reads the config, resolves --resume_run and findlast, scans the
    data) and trains its share of each epoch from its own plan: the shares only fit together, and the
    processes only meet at the same points, if every process planned the same run. Raises
    ProcessesPlannedDifferently, on every process, when they did not."""
    import hashlib

    from utils.config import to_json_dict

    if accelerator.num_processes == 1:
        return
    config = to_json_dict(plan.config)
    config.pop("num_workers")  # from each machine's cores: it may differ
    parts = {
        f"training data in {plan.config.data_root}: images were added, removed or replaced while the processes "
        "started. Wait until the data folder stays the same": (
            plan.scan.items, plan.validation.sets if plan.validation else None),
        "settings: each machine read its own config or optimizer file. Make them the same on every machine": (
            config, plan.optimizer_settings),
        "checkpoint to resume from: each machine found its own in its copy of logdir. Let every machine see "
        "the main machine's logdir (a shared folder, or a copy)": (
            (plan.resume.checkpoint, plan.resume.record["global_step"]) if plan.resume else None),
    }
    mine = tuple(hashlib.sha1(repr(value).encode()).hexdigest() for value in parts.values())
    every = gathered(accelerator, [mine])
    problems = []
    for part, what in enumerate(parts):
        differing = [str(index) for index, digests in enumerate(every) if digests[part] != every[0][part]]
        if differing:
            problems.append(f"process(es) {', '.join(differing)} found other {what}.")
    if problems:
        raise ProcessesPlannedDifferently(
            "the processes of this launch planned different runs, which cannot train together: "
            + " ".join(problems) + " Then start the run again.")


def check_same_on_every_process(accelerator, value, what: str, remedy: str) -> None:
    """Raises ProcessesPlannedDifferently, on every process, naming the processes whose `value` (picklable)
    differs from the main process's: "process(es) 1 found other {what}. {remedy}, then start the run again."
    Every process must call it, at the same point."""
    if accelerator.num_processes == 1:
        return
    every = gathered(accelerator, [value])
    differing = [str(index) for index, found in enumerate(every) if found != every[0]]
    if differing:
        raise ProcessesPlannedDifferently(f"process(es) {', '.join(differing)} found other {what} than the main "
                                          f"process. {remedy}, then start the run again.")


def leave_launch() -> None:
    """Leave the launch's process group, if this process joined one, before the interpreter exits: torn down
    at exit instead, gloo's threads can abort the process ("terminate called without an active exception",
    SIGABRT) when another process has just left. For where every process ends together: NCCL's teardown may
    wait for the other processes."""
    import sys

    distributed = sys.modules.get("torch.distributed")  # not loaded: no group (a config error, --help)
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


READY = "ready"  # agree_to_start: this process planned the run (or loaded the model) and can go on


def process_group_settings():
    """How the launch's process group is set up (accelerate's InitProcessGroupKwargs): the other processes wait
    while the main one samples, validates or saves, so allow them an hour."""
    import datetime

    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=datetime.timedelta(hours=1))


def join_launch():
    """The launch's process group, set up as the Accelerator's is, for a process that has no accelerator (its
    planning stopped it, or a dry run): accelerate's PartialState, which agree_to_start takes as it takes an
    Accelerator."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), **process_group_settings().to_kwargs())


def agree_to_start(accelerator, outcome) -> None:
    """Compare what every process's planning found, before anything else: READY, or the exception that stops
    it (a ConfigError; NothingToResume: `--resume_run auto` found the session finished). A process that ended
    alone would leave the others waiting for it in their first collective for the process group's timeout (an
    hour), so every process joins the group whatever it found, and they go on only together: all READY, or all
    finding the session finished (the caller then ends). Raises ProcessesPlannedDifferently, on every process,
    naming which processes could not start and why, or which found the session finished in their copy of
    logdir when the others did not."""
    from utils.resume import NothingToResume

    if accelerator.num_processes == 1:
        return
    mine = READY if outcome is READY else ("finished" if isinstance(outcome, NothingToResume) else str(outcome))
    outcomes = gathered(accelerator, [mine])
    failed: dict[str, list[str]] = {}  # each message, and which processes stopped with it
    for index, found in enumerate(outcomes):
        if found not in (READY, "finished"):
            failed.setdefault(found, []).append(str(index))
    if failed:
        raise ProcessesPlannedDifferently("\n".join(f"process(es) {', '.join(indices)} could not start the run:\n"
                                                    f"{message}" for message, indices in failed.items()))
    finished = [str(index) for index, found in enumerate(outcomes) if found == "finished"]
    if 0 < len(finished) < len(outcomes):
        raise ProcessesPlannedDifferently(
            f"--resume_run auto: process(es) {', '.join(finished)} found this session already finished in their "
            "copy of logdir, and the others did not. Let every machine see the main machine's logdir (a shared "
            "folder, or a copy), then start the run again.")


@contextlib.contextmanager
def main_process_first(accelerator):
    """The main process runs the block first; then the first process of each other machine; then the rest.

    For work whose result later processes reuse from disk (a single file converted into ckpt_cache_dir, a
    download): in a folder every machine shares, only the main process does it; in a folder on each
    machine, one process per machine does, not all of that machine's processes at once, each holding a
    whole model in memory. Every process passes the same two barriers even when its block raises, so all
    then meet in agree_to_start rather than one waiting in a barrier and another in a gather."""
    first_on_its_machine = accelerator.is_local_main_process
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()  # 1: the main process is done
    if not first_on_its_machine:
        accelerator.wait_for_everyone()  # 2: the first process of every machine is done
    try:
        yield
    finally:
        if accelerator.is_main_process:
            accelerator.wait_for_everyone()  # 1
        if first_on_its_machine:
            accelerator.wait_for_everyone()  # 2


def any_process(accelerator, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true when it is true on any process (one small all-reduce for all of them)."""
    return tuple(count > 0 for count in sum_over_processes(accelerator, *(int(bool(flag)) for flag in flags)))


def sum_over_processes(accelerator, *values: float) -> tuple[float, ...]:
    """Each value summed over the processes, in one all-reduce (ints stay ints)."""
    if accelerator.num_processes == 1:
        return values
    import torch

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
