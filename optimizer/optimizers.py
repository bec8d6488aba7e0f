"""Building the optimizer and its learning-rate schedule from resolved settings."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from optimizer.optimizer_config import GroupSettings, OptimizerSettings, ScheduleSteps


def build_optimizer(settings: OptimizerSettings, parameters: dict[str, list]) -> torch.optim.Optimizer:
    """One optimizer with a named parameter group per trained part ("unet", "text encoder")."""
    by_part = {"unet": settings.unet, "text encoder": settings.text_encoder}
    groups = [_group(name, params, by_part[name]) for name, params in parameters.items()]
    if settings.unet.optimizer == "adamw8bit":
        import bitsandbytes  # present: plan_run checked before anything loaded

        return bitsandbytes.optim.AdamW8bit(groups)
    return torch.optim.AdamW(groups)


def _group(name: str, params: list, settings: GroupSettings) -> dict:
    return dict(params=params, name=name, lr=settings.lr, betas=settings.betas, eps=settings.epsilon,
                weight_decay=settings.weight_decay)


def build_lr_schedule(optimizer: torch.optim.Optimizer, lr_scheduler: str, steps: ScheduleSteps):
    """diffusers' schedule by name; stepped once per optimizer step by the training loop."""
    name = "constant_with_warmup" if lr_scheduler == "constant" and steps.warmup else lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=steps.warmup, num_training_steps=steps.decay)
