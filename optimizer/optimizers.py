"""Building the optimizer and its learning-rate schedule from resolved settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.optimization import get_scheduler

from optimizer.optimizer_config import GroupSettings, OptimizerSettings

LR_DECAY_FACTOR = 1.5  # default decay: 1.5 x the run's optimizer steps, so the lr never reaches zero
LR_WARMUP_FRACTION = 0.02  # default warmup: 2% of the decay steps


def build_optimizer(settings: OptimizerSettings, unet_params: list, text_encoder_params: list) -> torch.optim.Optimizer:
    """One optimizer with a parameter group per trained model (an empty list means that model is frozen)."""
    groups = [_group(params, group) for params, group in ((unet_params, settings.unet),
                                                          (text_encoder_params, settings.text_encoder)) if params]
    if settings.unet.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise RuntimeError("optimizer adamw8bit needs the bitsandbytes package: pip install bitsandbytes") from None
        return bitsandbytes.optim.AdamW8bit(groups)
    return torch.optim.AdamW(groups)


def _group(params: list, settings: GroupSettings) -> dict:
    return dict(params=params, lr=settings.lr, betas=settings.betas, eps=settings.epsilon,
                weight_decay=settings.weight_decay)


@dataclass(frozen=True)
class ScheduleSteps:
    """Warmup and decay lengths in optimizer steps, with how each was chosen."""

    warmup: int
    decay: int
    origin: str  # e.g. "lr_decay_steps = 150 (1.5 x 100 optimizer steps)"


def schedule_steps(total_optimizer_steps: int, lr_scheduler: str, lr_warmup_steps: int | None,
                   lr_decay_steps: int | None) -> ScheduleSteps:
    """The schedule's lengths: explicit values, else EveryDream2's defaults (decay 1.5x the run, warmup 2%)."""
    if lr_decay_steps:
        decay, decay_origin = lr_decay_steps, "set"
    else:
        decay = max(1, int(total_optimizer_steps * LR_DECAY_FACTOR))
        decay_origin = f"{LR_DECAY_FACTOR} x {total_optimizer_steps:,} optimizer steps"
    if lr_warmup_steps is not None:
        warmup, warmup_origin = lr_warmup_steps, "set"
    elif lr_scheduler == "constant":
        warmup, warmup_origin = 0, "constant schedule"
    else:
        warmup = int(decay * LR_WARMUP_FRACTION)
        warmup_origin = f"{LR_WARMUP_FRACTION:.0%} of lr_decay_steps"
    origin = f"lr_decay_steps = {decay:,} ({decay_origin}), lr_warmup_steps = {warmup:,} ({warmup_origin})"
    return ScheduleSteps(warmup, decay, origin)


def build_lr_schedule(optimizer: torch.optim.Optimizer, lr_scheduler: str, steps: ScheduleSteps):
    """diffusers' schedule by name; stepped once per optimizer step by the training loop."""
    name = "constant_with_warmup" if lr_scheduler == "constant" and steps.warmup else lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=steps.warmup, num_training_steps=steps.decay)
