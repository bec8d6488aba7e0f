"""Building the optimizer, its learning-rate schedule and the text encoder's frozen parts from resolved settings;
saving and restoring the optimizer's state."""

from __future__ import annotations

import functools
import importlib
import os

import torch
from diffusers.optimization import get_scheduler

from optimizer.optimizer_config import OPTIMIZERS, GroupSettings, OptimizerSettings, ScheduleSteps, TextEncoderFreezing
from utils.checkpoint import OPTIMIZER_STATE_FILE


def build_optimizer(settings: OptimizerSettings, parameters: dict[str, list]) -> torch.optim.Optimizer:
    """One optimizer with a named parameter group per trained part ("unet", "text encoder"), each group with
    its own lr, betas, epsilon and weight decay."""
    by_part = {"unet": settings.unet, "text encoder": settings.text_encoder}
    groups = [_group(name, params, by_part[name]) for name, params in parameters.items()]
    module, name = OPTIMIZERS[settings.unet.optimizer].class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(groups)


def _group(name: str, params: list, settings: GroupSettings) -> dict:
    return dict(params=params, name=name, **settings.optimizer_kwargs())


def build_lr_schedule(optimizer: torch.optim.Optimizer, lr_scheduler: str, steps: ScheduleSteps):
    """diffusers' schedule by name, for every group; stepped once per optimizer step by the training loop."""
    name = "constant_with_warmup" if lr_scheduler == "constant" and steps.warmup else lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=steps.warmup, num_training_steps=steps.decay)


def build_group_schedules(optimizer: torch.optim.Optimizer,
                          schedules: dict[str, tuple[str, ScheduleSteps]]) -> torch.optim.lr_scheduler.LambdaLR:
    """One schedule per named parameter group (EveryDream2's optimizer.json gives the text encoder its own).

    Each group's multiplier is diffusers' schedule of that name, taken from a schedule built on a stand-in
    optimizer with the group's own lr (diffusers' polynomial decay depends on it): diffusers' schedules are
    LambdaLRs, and LambdaLR takes one multiplier per group. Past lr_decay_steps the multiplier stays where
    the decay ended (diffusers' cosine would rise again).
    """
    lambdas = []
    for group in optimizer.param_groups:
        lr_scheduler, steps = schedules[group["name"]]
        stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=group["lr"])
        multiplier = build_lr_schedule(stand_in, lr_scheduler, steps).lr_lambdas[0]
        lambdas.append(functools.partial(_held_after, multiplier, steps.decay))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _held_after(multiplier, last_step: int, step: int) -> float:
    return multiplier(min(step, last_step))


def freeze_text_encoder_parts(text_encoder: torch.nn.Module, freezing: TextEncoderFreezing) -> str | None:
    """Turn gradients off for the frozen parts of a trained CLIP text encoder; a summary, or None if none is.

    Frozen parameters get no gradient, so they cost no gradient memory and no optimizer state
    (EveryDream2 only left them out of the optimizer and kept computing their gradients).
    """
    from utils.model_family import clip_text_transformer

    model = clip_text_transformer(text_encoder)
    layers = model.encoder.layers
    frozen = []
    count = freezing.frozen_layers(len(layers))
    for layer in list(layers)[:count]:
        layer.requires_grad_(False)
    if count:
        frozen.append(f"layers 1-{count} of {len(layers)}")
    if freezing.embeddings_frozen(len(layers)):
        model.embeddings.requires_grad_(False)
        frozen.append("embeddings")
    if freezing.freeze_final_layer_norm:
        model.final_layer_norm.requires_grad_(False)
        frozen.append("final layer norm")
    return ", ".join(frozen) if frozen else None


# =================================================================================================
# Optimizer state in checkpoints (save_optimizer)
# =================================================================================================

def save_optimizer_state(optimizer: torch.optim.Optimizer, folder: str) -> None:
    """The optimizer's state (moments, step counts) with what it belongs to, so a later run can check that
    it fits before using it."""
    torch.save({"optimizer": _class_name(optimizer), "groups": _group_shapes(optimizer),
                "state": optimizer.state_dict()}, os.path.join(folder, OPTIMIZER_STATE_FILE))


def restore_optimizer_state(optimizer: torch.optim.Optimizer, folder: str) -> str | None:
    """Load the state saved in a checkpoint folder, keeping this run's settings (lr, betas, weight decay...).

    Returns what happened, for the log; None when the folder holds no optimizer state. A state saved for
    another optimizer, other parts or other shapes is not used: the run starts with fresh moments.
    """
    path = os.path.join(folder, OPTIMIZER_STATE_FILE)
    if not os.path.isfile(path):
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and numbers only: never code
    if saved.get("optimizer") != _class_name(optimizer):
        return f"not restored: it belongs to {saved.get('optimizer')}, this run uses {_class_name(optimizer)}"
    if saved.get("groups") != _group_shapes(optimizer):
        return "not restored: it was saved for other trained parts or shapes (the run starts with fresh moments)"
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved["state"])
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)  # this run's lr, betas and schedule start, not the saved ones
    return f"restored from {path}"


def load_optimizer_state_exactly(optimizer: torch.optim.Optimizer, folder: str) -> None:
    """For `--resume_run`: the state saved in `folder` as it was, learning rates included. Raises ValueError
    when it was saved for another optimizer or other parameters."""
    path = os.path.join(folder, OPTIMIZER_STATE_FILE)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("optimizer") != _class_name(optimizer) or saved.get("groups") != _group_shapes(optimizer):
        raise ValueError(f"{path} was saved for {saved.get('optimizer')} over other parameters than this run's "
                         f"{_class_name(optimizer)}: the optimizer or the trained parts changed since the run started")
    optimizer.load_state_dict(saved["state"])


def apply_group_settings(optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR,
                         settings: OptimizerSettings) -> None:
    """After a resumed state was loaded with --force_resume: this run's lr, betas, weight decay..., and its
    schedule from the step the run is at (the loaded state brought the run's old ones)."""
    by_part = {"unet": settings.unet, "text encoder": settings.text_encoder}
    for group in optimizer.param_groups:
        own = by_part[group["name"]].optimizer_kwargs()
        group.update(own)
        group["initial_lr"] = own["lr"]
    schedule.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base_lr, multiplier in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["lr"] = base_lr * multiplier(schedule.last_epoch)


def _class_name(optimizer: torch.optim.Optimizer) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return f"{type(inner).__module__}.{type(inner).__name__}"


def _group_shapes(optimizer: torch.optim.Optimizer) -> list:
    return [[group.get("name"), [list(p.shape) for p in group["params"]]] for group in optimizer.param_groups]
