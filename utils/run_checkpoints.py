"""The checkpoints of a training run: what each kind holds, and the checks before anything is written.

Kinds of save, and what they hold beyond the diffusers pipeline (utils/checkpoint.py writes it atomically):

- `periodic`: the EMA, the optimizer state and the resume state, so `--resume_run` continues exactly; plus
  the single-file .safetensors;
- `interrupted` (Ctrl-C, SIGTERM): the same without the single file, saved quickly before the process ends;
- `final` (`last-`): the EMA, the optimizer state with save_optimizer, and the single file;
- `errored` (an exception): the weights as they are, for inspection; never resumed from;
- `best` (save_best_val): the weights and EMA at the lowest validation loss so far, replacing the
  previous `best-` one; no training state, no single file.

An optimizer state is twice the size of the weights it trains, so a run keeps it only in its two newest
resumable checkpoints (the newest, and one to fall back on should the newest be damaged), and in none but
the final one once it has finished, unless save_optimizer asks to keep them all.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil

import torch

from optimizer.optimizers import save_optimizer_state
from utils.checkpoint import (ERRORED_PREFIX, INTERRUPTED_PREFIX, OPTIMIZER_STATE_FILE, TEMPORARY_PREFIX,
                              checkpoint_name, ensure_free_space, forget_file, ordered_record, save_pipeline)
from utils.config import to_json_dict
from utils.ema import EMA_FOLDER, save_ema_into
from utils.single_file import save_single_file
from utils.training_state import save_resume_state

log = logging.getLogger("train")

PREFIXES = {"periodic": "", "interrupted": INTERRUPTED_PREFIX, "errored": ERRORED_PREFIX, "final": "last-",
            "best": "best-"}
RESUMABLE_KINDS = ("periodic", "interrupted")


class NonFiniteWeights(Exception):
    """A trained weight is NaN or infinite: such a model is never saved."""


def save_checkpoint(run, kind: str) -> str | None:
    """Save the run's model as `kind` (see the module doc); the checkpoint folder, or None on processes other
    than the main one. Raises NonFiniteWeights (on every process: the weights are the same on all) and
    utils.checkpoint.NotEnoughDiskSpace (on the main process) before writing.

    Every process calls it, and the others wait until the main one has written: a launcher ends every
    process as soon as one exits, so one that left first would cut the main process's save short. Except for
    an errored- save: an error may have struck one process alone, so that save waits for no other.
    """
    state, trainee = run.state, run.trainee
    bad = first_nonfinite_weight(trainee.trained_modules())
    if bad:
        raise NonFiniteWeights(f"{bad} is NaN or infinite at step {state.global_step}, so the model is not saved; "
                               "the earlier checkpoints are untouched. Lower lr and continue from the last one.")
    together = kind != "errored"
    if together:
        run.accelerator.wait_for_everyone()
    try:
        return write_checkpoint(run, kind) if run.accelerator.is_main_process else None
    finally:  # also when the main process could not write (NotEnoughDiskSpace): the others must not wait for ever
        if together:
            run.accelerator.wait_for_everyone()


def write_checkpoint(run, kind: str) -> str:
    """The main process's part of save_checkpoint: write the checkpoint folder (and single file); its path."""
    config, state, trainee = run.plan.config, run.state, run.trainee
    resumable = kind in RESUMABLE_KINDS
    with_optimizer = resumable or (kind == "final" and config.save_optimizer)
    single_file = kind in ("periodic", "final") and not config.no_save_ckpt
    single_dir = config.save_ckpt_dir or os.getcwd()
    ckpts_dir = os.path.join(run.run_dir, "ckpts")
    ensure_free_space(save_sizes(run, ckpts_dir, single_dir if single_file else None, with_optimizer))

    model = trainee.model
    prefix = "" if kind == "final" and config.no_prepend_last else PREFIXES[kind]
    name = checkpoint_name(config.project_name, state.epoch, state.global_step, prefix)
    pipeline = model.family.pipeline_class()(**model.components(), safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    record = {**state.to_dict(), "family": model.family.name, "base_model": model.source, "kind": kind,
              "final": kind == "final"}
    extras = functools.partial(write_training_state, run, with_optimizer, resumable)
    folder = save_pipeline(os.path.join(ckpts_dir, name), pipeline, record, to_json_dict(config), extras)
    log.info("saved %s%s%s", folder, f" (EMA weights in {EMA_FOLDER}/)" if trainee.ema else "",
             " with the training state" if resumable else " with the optimizer state" if with_optimizer else "")
    if kind in ("periodic", "interrupted", "final") and not config.save_optimizer:
        drop_older_optimizer_states(ckpts_dir, keep=0 if kind == "final" else 2, just_written=folder)
    if kind == "best":
        for name in os.listdir(ckpts_dir):  # the earlier best one
            if name.startswith(PREFIXES["best"]) and os.path.join(ckpts_dir, name) != folder:
                shutil.rmtree(os.path.join(ckpts_dir, name), ignore_errors=True)
    if single_file:
        save_single_files(run, name, single_dir)
    return folder


def resumable_save_at(run) -> bool:
    """Whether this step's periodic save is in place (so an interrupted- one would repeat it); the main
    process looks, and every process gets its answer."""
    from utils.processes import any_process

    config, state = run.plan.config, run.state
    name = checkpoint_name(config.project_name, state.epoch, state.global_step, PREFIXES["periodic"])
    (in_place,) = any_process(run.accelerator, bool(run.run_dir) and os.path.isdir(os.path.join(run.run_dir, "ckpts",
                                                                                                  name)))
    return in_place


def write_training_state(run, with_optimizer: bool, resumable: bool, checkpoint_folder: str) -> None:
    """What a checkpoint holds beyond the pipeline (save_pipeline calls this before its atomic rename)."""
    if run.trainee.ema is not None:
        save_ema_into(run.trainee.ema, run.trainee.trained_modules(), checkpoint_folder)
    if with_optimizer:
        save_optimizer_state(run.optimizer, checkpoint_folder)
    if resumable:
        save_resume_state(checkpoint_folder, run.state, run.schedule, run.accelerator.scaler)


def save_single_files(run, name: str, folder: str) -> None:
    """`<name>.safetensors` and, with EMA, `<name>_ema.safetensors` (EveryDream2's names) in folder."""
    config, model, ema = run.plan.config, run.trainee.model, run.trainee.ema
    os.makedirs(folder, exist_ok=True)
    files = {name: {"unet": model.unet, "vae": model.vae, "text encoder": model.text_encoder}}
    if ema:  # the same model with the averaged weights
        files[name + "_ema"] = {**files[name], **{part: ema.state_dict_for(part, module)
                                                  for part, module in run.trainee.trained_modules().items()}}
    for file_name, parts in files.items():
        path = save_single_file(os.path.join(folder, file_name + ".safetensors"), model.family.name,
                                parts["unet"], parts["vae"], parts["text encoder"], half=not config.save_full_precision)
        log.info("saved %s (%s)", path, "fp32" if config.save_full_precision else "fp16")


def first_nonfinite_weight(modules: dict[str, torch.nn.Module]) -> str | None:
    """`<part> <weight name>` of the first trained weight holding a NaN or an infinity, or None."""
    for part, module in modules.items():
        for name, parameter in module.named_parameters():
            if parameter.requires_grad and not bool(torch.isfinite(parameter).all()):
                return f"{part} weight {name}"
    return None


def save_sizes(run, ckpts_dir: str, single_dir: str | None, with_optimizer: bool) -> dict[str, int]:
    """Bytes a save puts in each folder, over-estimated slightly (it leaves out nothing it writes)."""
    model, ema = run.trainee.model, run.trainee.ema
    tensors = [t for m in (model.unet, model.vae, model.text_encoder) for t in m.state_dict().values()]
    folder = sum(t.numel() * t.element_size() for t in tensors)
    if ema is not None:
        folder += sum(t.numel() * 4 for averages in ema.averages.values() for t in averages.values())
    if with_optimizer:
        folder += sum(t.numel() * t.element_size() for values in run.optimizer.state_dict()["state"].values()
                      for t in values.values() if torch.is_tensor(t))
    needs = {ckpts_dir: folder}
    if single_dir:
        per_file = sum(t.numel() for t in tensors)
        per_file *= 4 if run.plan.config.save_full_precision else 2
        needs[single_dir] = needs.get(single_dir, 0) + per_file * (2 if ema is not None else 1)
    return needs


def drop_older_optimizer_states(ckpts_dir: str, keep: int, just_written: str | None = None) -> None:
    """Delete the optimizer state of all but the `keep` newest of the run's checkpoints that hold one (see
    the module doc), counting `just_written` the newest whatever its recorded time (a clock set back must
    not cost the save just made its state). errored- checkpoints are left alone: they were never counted as
    resumable."""
    holding = []
    for name in os.listdir(ckpts_dir):
        folder = os.path.join(ckpts_dir, name)
        if name.startswith((TEMPORARY_PREFIX, ERRORED_PREFIX)) or not os.path.isfile(
                os.path.join(folder, OPTIMIZER_STATE_FILE)):
            continue
        found = ordered_record(folder)
        if found is None:
            continue  # not a checkpoint this code wrote: leave it alone
        newest = just_written is not None and os.path.abspath(folder) == os.path.abspath(just_written)
        holding.append(((newest, *found[0]), folder))
    for _, folder in sorted(holding, reverse=True)[keep:]:
        forget_file(folder, OPTIMIZER_STATE_FILE)
