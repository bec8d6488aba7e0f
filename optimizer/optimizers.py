"""Building the optimizer and its learning-rate schedule from resolved settings."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from optimizer.optimizer_config import GroupSettings, OptimizerSettings, ScheduleSteps


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


def build_lr_schedule(optimizer: torch.optim.Optimizer, lr_scheduler: str, steps: ScheduleSteps):
    """diffusers' schedule by name; stepped once per optimizer step by the training loop."""
    name = "constant_with_warmup" if lr_scheduler == "constant" and steps.warmup else lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=steps.warmup, num_training_steps=steps.decay)
