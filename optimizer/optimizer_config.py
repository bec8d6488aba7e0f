"""optimizer.json (EveryDream2's format) read, checked and resolved against the training config.

Pure and torch-free, so a bad file is reported with the rest of the config, before any model loads.
Precedence, one rule for every setting (doc/OPTIMIZER.md): a value set for the text encoder in
`text_encoder_overrides` > a training-config key (`lr`, `optimizer`) > optimizer.json's `base` > the
built-in default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from typing import Any

from utils.config import OPTIMIZER_NAMES, ConfigError, ConfigProblem, TrainConfig

LR_DECAY_FACTOR = 1.5  # default decay: 1.5 x the run's optimizer steps, so the lr never reaches zero
LR_WARMUP_FRACTION = 0.02  # default warmup: 2% of the decay steps
LR_SCALE_EXPONENT = 0.55  # scale_lr: lr x (batch_size x grad_accum)^0.55, as EveryDream2 documents


@dataclass(frozen=True)
class OptimizerKind:
    """What an optimizer needs: the package that provides it and the optimizer.json keys it takes."""

    package: str | None  # the package to install (None: torch itself)
    class_path: str  # module.Class that builds it
    keys: tuple[str, ...]  # besides lr and weight_decay
    default_betas: tuple[float, float] = (0.9, 0.999)
    adaptive: bool = False  # finds its own step size, one estimate for all parameter groups (lr about 1.0)


ADAM_KEYS = ("betas", "epsilon")
LION_BETAS = (0.9, 0.99)  # Lion's paper
OPTIMIZERS = {
    "adamw": OptimizerKind(None, "torch.optim.AdamW", ADAM_KEYS),
    "adamw8bit": OptimizerKind("bitsandbytes", "bitsandbytes.optim.AdamW8bit", ADAM_KEYS),
    "lion": OptimizerKind("bitsandbytes", "bitsandbytes.optim.Lion", ("betas",), LION_BETAS),
    "lion8bit": OptimizerKind("bitsandbytes", "bitsandbytes.optim.Lion8bit", ("betas",), LION_BETAS),
    "prodigy": OptimizerKind("prodigyopt", "prodigyopt.Prodigy",
                             ("betas", "epsilon", "d0", "decouple", "safeguard_warmup", "growth_rate"), adaptive=True),
    "dadapt_adam": OptimizerKind("dadaptation", "dadaptation.DAdaptAdam",
                                 ("betas", "epsilon", "d0", "decouple", "growth_rate"), adaptive=True),
    "dadapt_lion": OptimizerKind("dadaptation", "dadaptation.DAdaptLion", ("betas", "d0"), LION_BETAS, adaptive=True),
    "dadapt_sgd": OptimizerKind("dadaptation", "dadaptation.DAdaptSGD", ("momentum", "d0", "growth_rate"),
                                adaptive=True),
    "dadapt_adan": OptimizerKind("dadaptation", "dadaptation.DAdaptAdan", ("epsilon", "d0", "growth_rate", "no_prox"),
                                 adaptive=True),  # Adan's three betas keep their defaults
}
# An adaptive optimizer keeps one step-size estimate for all groups: these must match between the parts.
SHARED_BY_ADAPTIVE = ("lr", "betas", "d0", "growth_rate", "lr_scheduler", "lr_warmup_steps", "lr_decay_steps")
assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES  # the config's choices

TOP_LEVEL_KEYS = ("doc", "base", "text_encoder_overrides", "text_encoder_freezing", "text_encoder_lr_scale",
                  "apply_grad_scaler_step_tweaks", "log_grad_norm")
SCHEDULE_KEYS = ("lr_scheduler", "lr_warmup_steps", "lr_decay_steps")  # each group has its own schedule
LR_SCHEDULERS = ("constant", "linear", "cosine", "polynomial")
EXTRA_KEYS = ("d0", "decouple", "momentum", "growth_rate", "safeguard_warmup", "no_prox")
SECTION_KEYS = ("optimizer", "lr", "betas", "epsilon", "weight_decay") + EXTRA_KEYS + SCHEDULE_KEYS
FREEZING_KEYS = ("unfreeze_last_n_layers", "freeze_embeddings", "freeze_final_layer_norm", "freeze_front_n_layers")


@dataclass(frozen=True)
class GroupSettings:
    """The optimizer settings of one parameter group (the UNet's or the text encoder's).

    The extra keys are None unless set: the optimizer's own default then applies.
    """

    optimizer: str
    lr: float
    betas: tuple[float, float]
    epsilon: float
    weight_decay: float
    d0: float | None = None  # D-Adaptation / Prodigy: the initial step-size estimate
    decouple: bool | None = None  # AdamW-style decoupled weight decay
    momentum: float | None = None  # SGD
    growth_rate: float | None = None  # D-Adaptation / Prodigy: how fast the estimate may grow per step
    safeguard_warmup: bool | None = None  # Prodigy
    no_prox: bool | None = None  # Adan
    lr_scheduler: str = "constant"  # this group's schedule (optimizer_config.schedule_steps sizes it)
    lr_warmup_steps: int | None = None  # None: the default length
    lr_decay_steps: int | None = None

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The settings this group's optimizer takes, under its keyword names."""
        kind = OPTIMIZERS[self.optimizer]
        values = {"lr": self.lr, "weight_decay": self.weight_decay, "betas": self.betas, "eps": self.epsilon}
        values.update({key: getattr(self, key) for key in EXTRA_KEYS})
        wanted = ("lr", "weight_decay") + tuple("eps" if key == "epsilon" else key for key in kind.keys)
        return {key: values[key] for key in wanted if values[key] is not None}


DEFAULTS = GroupSettings(optimizer="adamw", lr=1e-6, betas=(0.9, 0.999), epsilon=1e-8, weight_decay=0.01)


@dataclass(frozen=True)
class TextEncoderFreezing:
    """Which parts of a trained text encoder stay frozen (optimizer.json's text_encoder_freezing)."""

    unfreeze_last_n_layers: int | None = None  # None: every layer trains
    freeze_embeddings: bool | None = None  # None: frozen when some layers are (EveryDream2's rule)
    freeze_final_layer_norm: bool = False
    freeze_first_n_layers: int | None = None  # from EveryDream2's deprecated freeze_front_n_layers

    def frozen_layers(self, layer_count: int) -> int:
        """How many of the first encoder layers are frozen."""
        if self.unfreeze_last_n_layers is not None:
            return max(0, layer_count - self.unfreeze_last_n_layers)
        return min(layer_count, self.freeze_first_n_layers or 0)

    def embeddings_frozen(self, layer_count: int) -> bool:
        if self.freeze_embeddings is not None:
            return self.freeze_embeddings
        return self.frozen_layers(layer_count) > 0


@dataclass(frozen=True)
class OptimizerSettings:
    unet: GroupSettings
    text_encoder: GroupSettings
    origins: tuple[str, ...]  # one line per group: "unet: optimizer adamw, lr 2e-06 (lr in train.json), ..."
    notes: tuple[str, ...]  # keys read but without effect in this version
    freezing: TextEncoderFreezing = TextEncoderFreezing()
    log_grad_norm: bool = False  # log optimizer/unet_grad_norm and optimizer/te_grad_norm
    grad_scaler_step_tweaks: bool = True  # EveryDream2's fp16 grad-scaler schedule (CUDA only)


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


def _checked_object(name: str, section: Any, known: tuple[str, ...], value_problem, source: str,
                    problems: list[ConfigProblem]) -> dict[str, Any]:
    """The set (non-null) values of one optimizer.json object; unknown keys and bad values go to `problems`.

    `value_problem(key, value)` says what is wrong with a value, or None.
    """
    if section is None:
        return {}
    if not isinstance(section, dict):
        problems.append(ConfigProblem(name, source, "must be a JSON object."))
        return {}
    checked = {}
    for key, value in section.items():
        if key not in known:
            problems.append(ConfigProblem(f"{name}.{key}", source, _unknown(key, known)))
        elif value is not None:  # null means "not set here"
            message = value_problem(key, value)
            if message:
                problems.append(ConfigProblem(f"{name}.{key}", source, message))
            else:
                checked[key] = value
    return checked


def _section_value_problem(key: str, value: Any) -> str | None:
    """What is wrong with a value in `base` or `text_encoder_overrides`."""
    shown = json.dumps(value)
    if key == "optimizer" and value not in OPTIMIZERS:
        near = difflib.get_close_matches(str(value), list(OPTIMIZERS), n=1)
        return f"{value!r} is not one of: {', '.join(OPTIMIZERS)}." + (f" Did you mean {near[0]!r}?" if near else "")
    if key in ("lr", "epsilon", "d0", "growth_rate") and (not _is_number(value) or value <= 0):
        return f"expected a number above 0, got {shown}."
    if key == "weight_decay" and (not _is_number(value) or value < 0):
        return f"expected a number >= 0, got {shown}."
    if key in ("decouple", "safeguard_warmup", "no_prox") and not isinstance(value, bool):
        return f"expected true or false, got {shown}."
    if key == "lr_scheduler" and value not in LR_SCHEDULERS:
        return f"{value!r} is not one of: {', '.join(LR_SCHEDULERS)}."
    if key in ("lr_warmup_steps", "lr_decay_steps") and not (_is_whole(value) and value >= 0):
        return f"expected a whole number >= 0, got {shown}."
    if key == "momentum" and not (_is_number(value) and 0 <= value < 1):
        return f"expected a number in [0, 1), got {shown}."
    if key == "betas" and not (isinstance(value, list) and len(value) == 2
                               and all(_is_number(b) and 0 <= b < 1 for b in value)):
        return f"expected two numbers in [0, 1), got {shown}."
    return None


def _freezing_value_problem(key: str, value: Any) -> str | None:
    """What is wrong with a value in `text_encoder_freezing`."""
    shown = json.dumps(value)
    if key in ("freeze_embeddings", "freeze_final_layer_norm") and not isinstance(value, bool):
        return f"expected true or false, got {shown}."
    if key == "unfreeze_last_n_layers" and not (_is_whole(value) and value > 0):
        return (f"expected a whole number above 0, got {shown} (to freeze the whole text encoder, set "
                "disable_textenc_training).")
    if key == "freeze_front_n_layers" and not _is_whole(value):
        return f"expected a whole number, got {shown}."
    return None


def _check_section(name: str, section: Any, source: str, problems: list[ConfigProblem]) -> dict[str, Any]:
    checked = _checked_object(name, section, SECTION_KEYS, _section_value_problem, source, problems)
    return {key: tuple(value) if key == "betas" else value for key, value in checked.items()}


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    freezing = _freezing(data.get("text_encoder_freezing"), source, problems)
    flags = {key: data.get(key) for key in ("log_grad_norm", "apply_grad_scaler_step_tweaks")}
    for key, value in flags.items():
        if value is not None and not isinstance(value, bool):
            problems.append(ConfigProblem(key, source, f"expected true or false, got {json.dumps(value)}."))

    # Training-config keys that override base. The schedule keys count only when given (their defaults
    # would otherwise hide base's values); when nothing sets them, the config's defaults apply.
    cli = {"optimizer": config.optimizer, "lr": config.lr}
    cli.update({key: getattr(config, key) for key in SCHEDULE_KEYS if config_origins.get(key, "default") != "default"})

    def pick(group: str, key: str, optimizer: str | None = None) -> tuple[Any, str]:
        """The value for one key of one group, and where it came from."""
        candidates = ([(overrides.get(key), f"text_encoder_overrides.{key} in {source}")] if group == "text encoder"
                      else [])
        if key in SCHEDULE_KEYS:
            default = getattr(config, key)
        elif key == "betas" and optimizer:
            default = OPTIMIZERS[optimizer].default_betas
        else:
            default = getattr(DEFAULTS, key)
        candidates += [(cli.get(key), f"{key} in {config_origins.get(key, 'the config')}"),
                       (base.get(key), f"base.{key} in {source}"),
                       (default, "default")]
        return next(((v, o) for v, o in candidates if v is not None), (None, "default"))

    groups, origins = {}, []
    for group in ("unet", "text encoder"):
        optimizer = pick(group, "optimizer")
        picked = {"optimizer": optimizer}
        picked.update({key: pick(group, key, optimizer[0]) for key in SECTION_KEYS[1:]})
        groups[group] = GroupSettings(**{key: value for key, (value, _) in picked.items()})
        used = ("optimizer", "lr", "weight_decay") + OPTIMIZERS[optimizer[0]].keys + SCHEDULE_KEYS
        origins.append(f"{group}: " + ", ".join(f"{key} {value}" + ("" if origin == "default" else f" ({origin})")
                                                 for key, (value, origin) in picked.items()
                                                 if key in used and value is not None))
    if groups["unet"].optimizer != groups["text encoder"].optimizer:
        problems.append(ConfigProblem("text_encoder_overrides.optimizer", source,
                                      "a different optimizer for the text encoder is not supported: set it to null "
                                      "or to the UNet's optimizer (the two parts are groups of one optimizer, each "
                                      "with its own lr, betas, epsilon and weight decay)."))
    unet, text = groups["unet"], groups["text encoder"]
    if OPTIMIZERS[unet.optimizer].adaptive and unet.optimizer == text.optimizer:
        for key in SHARED_BY_ADAPTIVE:
            if getattr(unet, key) != getattr(text, key):
                problems.append(ConfigProblem(f"text_encoder_overrides.{key}", source, (
                    f"{unet.optimizer} keeps one step-size estimate for the UNet and the text encoder, so they need "
                    f"the same {key} ({getattr(unet, key)} vs {getattr(text, key)}): set it only in base, or use "
                    "another optimizer.")))
    if problems:  # every problem of the file at once; invalid values were left out of the groups above
        raise ConfigError(problems)
    if config.scale_lr:
        factor = (config.batch_size * config.grad_accum) ** LR_SCALE_EXPONENT
        for group in groups:
            groups[group] = dataclasses.replace(groups[group], lr=groups[group].lr * factor)
        origins.append(f"scale_lr: both lrs x {factor:.3f} = (batch_size {config.batch_size} x grad_accum "
                       f"{config.grad_accum})^{LR_SCALE_EXPONENT}")
    notes = tuple(f"{source}: {name}.{key} has no effect with {groups[group].optimizer}." for name, section, group in
                   (("base", base, "unet"), ("text_encoder_overrides", overrides, "text encoder")) for key in section
                   if key in EXTRA_KEYS + ADAM_KEYS and key not in OPTIMIZERS[groups[group].optimizer].keys)
    if OPTIMIZERS[unet.optimizer].adaptive and unet.lr < 0.1:
        notes += (f"{source}: {unet.optimizer} finds its own step size and lr scales it: lr {unet.lr:g} will "
                  "barely train; about 1.0 is usual.",)
    if data.get("text_encoder_lr_scale") is not None:
        notes += (f"{source}: text_encoder_lr_scale has no effect (it never had in EveryDream2): set "
                  "text_encoder_overrides.lr.",)
    return OptimizerSettings(groups["unet"], groups["text encoder"], tuple(origins), notes, freezing,
                             bool(flags["log_grad_norm"]), flags["apply_grad_scaler_step_tweaks"] is not False)


def _freezing(section: Any, source: str, problems: list[ConfigProblem]) -> TextEncoderFreezing:
    """text_encoder_freezing checked; the deprecated freeze_front_n_layers mapped as EveryDream2 reads it."""
    values = _checked_object("text_encoder_freezing", section, FREEZING_KEYS, _freezing_value_problem, source,
                             problems)
    front = values.pop("freeze_front_n_layers", None)
    if front is not None and "unfreeze_last_n_layers" in values:
        problems.append(ConfigProblem("text_encoder_freezing.freeze_front_n_layers", source,
                                      "and unfreeze_last_n_layers are both set: keep unfreeze_last_n_layers."))
    elif front is not None and front < 0:  # EveryDream2: a negative count keeps the last -N layers trainable
        values["unfreeze_last_n_layers"] = -front
    elif front:
        values["freeze_first_n_layers"] = front
    return TextEncoderFreezing(**values)


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


# EveryDream2's fp16 grad-scaler schedule (apply_grad_scaler_step_tweaks): start at 2^17.5 growing x2 every 25
# steps, then grow more gently and less often as training settles. Keys are optimizer steps.
GRAD_SCALER_START = dict(init_scale=2**17.5, growth_factor=2.0, backoff_factor=0.5, growth_interval=25)
GRAD_SCALER_TWEAKS = {500: (1.8, 100), 1000: (1.6, 200), 2000: (1.3, 500), 4000: (1.15, 2000)}


def grad_scaler_tweak(optimizer_step: int) -> tuple[float, int] | None:
    """(growth factor, growth interval) to switch the grad scaler to at this optimizer step, if any."""
    return GRAD_SCALER_TWEAKS.get(optimizer_step)
