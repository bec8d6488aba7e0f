"""optimizer.json (EveryDream2's format) read, checked and resolved against the training config.

Pure and torch-free, so a bad file is reported with the rest of the config, before any model loads.
Precedence, one rule for every setting (doc/OPTIMIZER.md): a value set for the text encoder in
`text_encoder_overrides` > a training-config key (`lr`, `optimizer`) > optimizer.json's `base` > the
built-in default.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from typing import Any

from utils.config import ConfigError, ConfigProblem, TrainConfig

OPTIMIZERS = ("adamw", "adamw8bit")
LR_DECAY_FACTOR = 1.5  # default decay: 1.5 x the run's optimizer steps, so the lr never reaches zero
LR_WARMUP_FRACTION = 0.02  # default warmup: 2% of the decay steps
LR_SCALE_EXPONENT = 0.55  # scale_lr: lr x (batch_size x grad_accum)^0.55, as EveryDream2 documents

TOP_LEVEL_KEYS = ("doc", "base", "text_encoder_overrides", "text_encoder_freezing", "text_encoder_lr_scale",
                  "apply_grad_scaler_step_tweaks", "log_grad_norm")
SECTION_KEYS = ("optimizer", "lr", "lr_scheduler", "lr_warmup_steps", "lr_decay_steps", "betas", "epsilon",
                "weight_decay", "d0", "decouple", "momentum", "growth_rate", "safeguard_warmup", "no_prox")
FREEZING_KEYS = ("unfreeze_last_n_layers", "freeze_embeddings", "freeze_final_layer_norm", "freeze_front_n_layers")
APPLIED_SECTION_KEYS = ("optimizer", "lr", "betas", "epsilon", "weight_decay")  # the others: not yet


@dataclass(frozen=True)
class GroupSettings:
    """The optimizer settings of one parameter group (the UNet's or the text encoder's)."""

    optimizer: str
    lr: float
    betas: tuple[float, float]
    epsilon: float
    weight_decay: float


DEFAULTS = GroupSettings(optimizer="adamw", lr=1e-6, betas=(0.9, 0.999), epsilon=1e-8, weight_decay=0.01)


@dataclass(frozen=True)
class OptimizerSettings:
    unet: GroupSettings
    text_encoder: GroupSettings
    origins: tuple[str, ...]  # one line per group: "unet: optimizer adamw, lr 2e-06 (lr in train.json), ..."
    notes: tuple[str, ...]  # keys read but without effect in this version


def read_optimizer_file(path: str) -> dict[str, Any]:
    """The parsed optimizer.json; a missing file means the defaults ({}).

    A missing file that the user named explicitly was already reported by the config validation.
    """
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ConfigError([ConfigProblem("optimizer_config", path, f"not valid JSON: {error.msg} at line "
                                         f"{error.lineno}, column {error.colno}.")]) from None
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem("optimizer_config", path, "must hold a JSON object.")])
    return data


def _unknown(key: str, known: tuple[str, ...]) -> str:
    near = difflib.get_close_matches(key, known, n=1)
    return "unknown key." + (f" Did you mean {near[0]!r}?" if near else f" Known keys: {', '.join(known)}.")


def _check_section(name: str, section: Any, source: str, problems: list[ConfigProblem]) -> dict[str, Any]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        problems.append(ConfigProblem(name, source, "must be a JSON object."))
        return {}
    checked = {}
    for key, value in section.items():
        where = f"{name}.{key}"
        if key not in SECTION_KEYS:
            problems.append(ConfigProblem(where, source, _unknown(key, SECTION_KEYS)))
        elif value is None:
            continue  # null means "not set here"
        elif key == "optimizer" and value not in OPTIMIZERS:
            problems.append(ConfigProblem(where, source, f"{value!r} is not one of: {', '.join(OPTIMIZERS)}."))
        elif key in ("lr", "epsilon") and (not _is_number(value) or value <= 0):
            problems.append(ConfigProblem(where, source, f"expected a number above 0, got {json.dumps(value)}."))
        elif key == "weight_decay" and (not _is_number(value) or value < 0):
            problems.append(ConfigProblem(where, source, f"expected a number >= 0, got {json.dumps(value)}."))
        elif key == "betas" and not (isinstance(value, list) and len(value) == 2
                                     and all(_is_number(b) and 0 <= b < 1 for b in value)):
            problems.append(ConfigProblem(where, source, f"expected two numbers in [0, 1), got {json.dumps(value)}."))
        else:
            checked[key] = tuple(value) if key == "betas" else value
    return checked


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_optimizer_settings(config: TrainConfig, data: dict[str, Any], source: str,
                               config_origins: dict[str, str] | None = None) -> OptimizerSettings:
    """UNet and text-encoder settings from the config and optimizer.json. Raises ConfigError."""
    config_origins = config_origins or {}
    problems: list[ConfigProblem] = []
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            problems.append(ConfigProblem(key, source, _unknown(key, TOP_LEVEL_KEYS)))
    base = _check_section("base", data.get("base"), source, problems)
    overrides = _check_section("text_encoder_overrides", data.get("text_encoder_overrides"), source, problems)
    freezing = data.get("text_encoder_freezing") or {}
    if not isinstance(freezing, dict):
        problems.append(ConfigProblem("text_encoder_freezing", source, "must be a JSON object."))
        freezing = {}
    for key in freezing:
        if key not in FREEZING_KEYS:
            problems.append(ConfigProblem(f"text_encoder_freezing.{key}", source, _unknown(key, FREEZING_KEYS)))

    cli = {"optimizer": config.optimizer, "lr": config.lr}  # training-config keys that override base

    def pick(group: str, key: str) -> tuple[Any, str]:
        """The value for one key of one group, and where it came from."""
        candidates = ([(overrides.get(key), f"text_encoder_overrides.{key} in {source}")] if group == "text encoder"
                      else [])
        candidates += [(cli.get(key), f"{key} in {config_origins.get(key, 'the config')}"),
                       (base.get(key), f"base.{key} in {source}"),
                       (getattr(DEFAULTS, key), "default")]
        return next((v, o) for v, o in candidates if v is not None)

    groups, origins = {}, []
    for group in ("unet", "text encoder"):
        picked = {key: pick(group, key) for key in APPLIED_SECTION_KEYS}
        groups[group] = GroupSettings(**{key: value for key, (value, _) in picked.items()})
        origins.append(f"{group}: " + ", ".join(f"{key} {value}" + ("" if origin == "default" else f" ({origin})")
                                                 for key, (value, origin) in picked.items()))
    if groups["unet"].optimizer != groups["text encoder"].optimizer:
        problems.append(ConfigProblem("text_encoder_overrides.optimizer", source,
                                      "a different optimizer for the text encoder is not supported yet: "
                                      "set it to null or to the UNet's optimizer."))
    if problems:  # every problem of the file at once; invalid values were left out of the groups above
        raise ConfigError(problems)
    if config.scale_lr:
        factor = (config.batch_size * config.grad_accum) ** LR_SCALE_EXPONENT
        for group in groups:
            groups[group] = _scaled(groups[group], factor)
        origins.append(f"scale_lr: both lrs x {factor:.3f} = (batch_size {config.batch_size} x grad_accum "
                       f"{config.grad_accum})^{LR_SCALE_EXPONENT}")
    notes = tuple(f"{source}: {name}.{key} has no effect yet in this version." for name, section in
                  (("base", base), ("text_encoder_overrides", overrides)) for key in section
                  if key not in APPLIED_SECTION_KEYS)
    notes += tuple(f"{source}: text_encoder_freezing.{key} has no effect yet in this version."
                   for key, value in freezing.items() if value not in (None, False))
    notes += tuple(f"{source}: {key} has no effect yet in this version." for key in
                   ("text_encoder_lr_scale", "log_grad_norm") if data.get(key) is not None)
    return OptimizerSettings(groups["unet"], groups["text encoder"], tuple(origins), notes)


def _scaled(settings: GroupSettings, factor: float) -> GroupSettings:
    return GroupSettings(settings.optimizer, settings.lr * factor, settings.betas, settings.epsilon,
                         settings.weight_decay)


def load_optimizer_settings(config: TrainConfig, config_origins: dict[str, str] | None = None) -> OptimizerSettings:
    """Read optimizer_config (if present) and resolve it. Raises ConfigError."""
    data = read_optimizer_file(config.optimizer_config)
    return resolve_optimizer_settings(config, data, config.optimizer_config, config_origins)


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
