"""Validation as pure values: the settings file, the image sets, when they are measured, and their batches.

Reads EveryDream2's `validation_config` JSON (the keys of its validation_default.json) and decides, from the
scanned training images and an explicit seed:
- the sets whose loss is measured: `val` (held out of training, by an automatic split or from a folder),
  extra named folders, and `stabilize-train` (training images, kept in training, for a steady training loss);
- the global steps after which validation runs (`every_n_epochs` may be a fraction of an epoch);
- each image's fixed noise seed, so every pass draws the same timestep and noise for it and successive
  losses differ only because the model changed;
- the batches: one bucket per batch, centred crop, no flip, no caption dropout or tag shuffling, as
  data/dataset.py's loader takes them.

Torch-free and light on I/O: only the validation folders are scanned (data.items.scan_dataset, or the
caller's scan). The loss itself is computed in train.py.

Random choices are hashes of (seed, purpose, image key), never a shared random stream: which images a
split takes does not depend on the order of the list, on the other sets, or on the machine, and adding
one image to a data set moves at most one image between training and validation. The image key is its path
relative to its data root (`/`-separated), so a data set moved to another folder or machine keeps its
split and its noise.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Sequence

from data.items import ImageItem, ScanResult, SkippedFile, item_key, scan_dataset
from data.plan import Sample
from utils.config import ConfigError, ConfigProblem

VAL = "val"  # the held-out set: tag loss/val
STABILIZE = "stabilize-train"  # training images measured like validation (EveryDream2's docs say train-stabilized)
COMBINED = "_all_val_combined"  # the mean of the held-out sets' losses, when there are two or more
RESERVED_NAMES = (VAL, STABILIZE, COMBINED)
SPLIT_MODES = ("automatic", "manual", "none")
IGNORED_KEYS = ("documentation",)  # validation_default.json explains its keys in this object
LEGACY_KEYS = {"val_split_proportion": "auto_split_proportion", "val_data_root": "manual_data_root"}
NO_JITTER = (0.0, 0.0, 0.0, 0.0)
SEED_BITS = 63  # item seeds fit torch.Generator.manual_seed and numpy alike
SHOWN = 10  # skipped files listed in an error about an empty folder


@dataclass(frozen=True)
class ValidationSettings:
    """A validation_config file's values; every key and default is EveryDream2's."""

    validate_training: bool = True  # measure the held-out `val` set (false: no `val`; extras and stabilize still run)
    val_split_mode: str = "automatic"  # automatic: take images out of training; manual: manual_data_root; none
    auto_split_proportion: float = 0.15  # automatic: share of the training images held out, 0 < p < 1
    manual_data_root: str | None = None  # manual: folder (or .json manifest) of validation images
    extra_manual_datasets: tuple[tuple[str, str], ...] = ()  # (name, folder) pairs, each logged as loss/<name>
    stabilize_training_loss: bool = False  # also measure a fixed subset of the training images (loss/stabilize-train)
    stabilize_split_proportion: float = 0.15  # share of the training images in that subset, 0 < p <= 1
    every_n_epochs: float = 1.0  # epochs between validations; 0.25 = four times per epoch
    seed: int = 555  # for the split and the fixed noise; independent of the training seed
    batch_size: int | None = None  # images per validation batch; None = the training batch_size
    use_relative_loss: bool = False  # log each loss minus the set's first (pre-training) value
    source: str = "validation defaults"  # the file the values came from, for messages

    @property
    def extra_sets(self) -> dict[str, str]:
        """extra_manual_datasets as {name: folder}."""
        return dict(self.extra_manual_datasets)

    @property
    def holds_out_val(self) -> bool:
        """Whether there is a `val` set."""
        return self.validate_training and (self.val_split_mode == "automatic" or (
            self.val_split_mode == "manual" and self.manual_data_root is not None))

    @property
    def runs_per_epoch(self) -> int | None:
        """For every_n_epochs < 1: validations per epoch, 1/every_n_epochs rounded as EveryDream2 does."""
        return max(1, round(1 / self.every_n_epochs)) if self.every_n_epochs < 1 else None


FIELD_NAMES = tuple(name for name in ValidationSettings.__dataclass_fields__ if name != "source")


# =================================================================================================
# The settings file
# =================================================================================================

def read_validation_config(path: str, *, check_paths: bool = True) -> tuple[ValidationSettings, list[str]]:
    """The settings of a validation_config file and notes about it. Raises ConfigError listing every problem."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ConfigError([ConfigProblem("validation_config", path, "does not exist.")]) from None
    except IsADirectoryError:
        raise ConfigError([ConfigProblem("validation_config", path, "is a folder: give the .json file.")]) from None
    except json.JSONDecodeError as error:
        raise ConfigError([ConfigProblem("validation_config", path, f"not valid JSON: {error.msg} at line "
                                         f"{error.lineno}, column {error.colno}.")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem("validation_config", path, "not a UTF-8 text file.")]) from None
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem("validation_config", path, "must hold a JSON object of key: value pairs.")])
    return parse_validation_settings(data, path, check_paths=check_paths)


def parse_validation_settings(data: dict[str, Any], source: str, *,
                              check_paths: bool = True) -> tuple[ValidationSettings, list[str]]:
    """Settings from a parsed validation_config object. Raises ConfigError listing every problem.

    Unknown keys are noted, not errors (EveryDream2 files carry stale keys); `documentation` is skipped.
    With check_paths, the folders that will be scanned must exist.
    """
    problems: list[ConfigProblem] = []
    notes: list[str] = []
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in IGNORED_KEYS:
            continue
        name = LEGACY_KEYS.get(key, key)
        if name not in FIELD_NAMES:
            notes.append(f"{source}: {key}: unknown key, ignored.{_closest(key)}")
            continue
        if key in LEGACY_KEYS:
            if name in data and data[name] != value:
                problems.append(ConfigProblem(key, source, f"conflicts with {name} (its new name): remove one."))
                continue
            notes.append(f"{source}: {key} is EveryDream2's old name for {name}; read as {name}.")
        message = _value_problem(name, value)
        if message:
            problems.append(ConfigProblem(key, source, message))
        else:
            values[name] = value
    extras = values.pop("extra_manual_datasets", None) or {}
    for name, folder in extras.items():
        message = _extra_set_problem(name, folder)
        if message:
            problems.append(ConfigProblem(f"extra_manual_datasets.{name}", source, message))
    if values.get("val_split_mode", "automatic") is None:
        values["val_split_mode"] = "none"  # EveryDream2 reads null as none
    settings = ValidationSettings(**values, extra_manual_datasets=tuple(extras.items()), source=source)
    problems += _consistency_problems(settings, check_paths)
    if problems:
        raise ConfigError(problems)
    return settings, notes + _settings_notes(settings)


def _closest(key: str) -> str:
    near = difflib.get_close_matches(key, list(FIELD_NAMES) + list(LEGACY_KEYS), n=1, cutoff=0.6)
    return f" Did you mean {near[0]!r}?" if near else f" Known keys: {', '.join(FIELD_NAMES)}."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _value_problem(name: str, value: Any) -> str | None:
    """What is wrong with one value, or None."""
    shown = json.dumps(value)
    if name in ("validate_training", "stabilize_training_loss", "use_relative_loss") and not isinstance(value, bool):
        return f"expected true or false, got {shown}."
    if name == "val_split_mode" and value is not None and value not in SPLIT_MODES:
        return f"{shown} is not one of: {', '.join(SPLIT_MODES)}."
    if name == "auto_split_proportion" and not (_is_number(value) and 0 < value < 1):
        return f"expected a number above 0 and below 1 (0.15 = 15% of the training images), got {shown}."
    if name == "stabilize_split_proportion" and not (_is_number(value) and 0 < value <= 1):
        return f"expected a number above 0, at most 1 (0.15 = 15% of the training images), got {shown}."
    if name == "manual_data_root" and value is not None and not (isinstance(value, str) and value.strip()):
        return f"expected the path of a folder of validation images, or null, got {shown}."
    if name == "extra_manual_datasets" and value is not None and not isinstance(value, dict):
        return f"expected an object of name: folder pairs, such as {{\"santa suit\": \"data/santa\"}}, got {shown}."
    if name == "every_n_epochs" and not (_is_number(value) and value > 0):
        return f"expected a number of epochs above 0 (1 = every epoch, 0.5 = twice per epoch), got {shown}."
    if name == "seed" and not _is_whole(value):
        return f"expected a whole number, got {shown}."
    if name == "batch_size" and value is not None and not (_is_whole(value) and value >= 1):
        return f"expected a whole number of images, at least 1, or null (= the training batch_size), got {shown}."
    return None


def _extra_set_problem(name: str, folder: Any) -> str | None:
    if not name.strip():
        return "a set needs a name: it is logged as loss/<name>."
    if name in RESERVED_NAMES:
        return (f"the name {name!r} is taken by the trainer's own loss/{name}: choose another "
                f"(taken: {', '.join(RESERVED_NAMES)}).")
    if not (isinstance(folder, str) and folder.strip()):
        return f"expected the path of a folder of images, got {json.dumps(folder)}."
    return None


def _consistency_problems(settings: ValidationSettings, check_paths: bool) -> list[ConfigProblem]:
    """Checks that involve several keys or the file system."""
    source, problems = settings.source, []
    if (settings.validate_training and settings.val_split_mode == "manual" and settings.manual_data_root is None
            and not settings.extra_manual_datasets):
        problems.append(ConfigProblem("val_split_mode", source, "is manual but neither manual_data_root nor "
                                      "extra_manual_datasets names a folder of validation images: set one, or use "
                                      "automatic to hold out part of the training images."))
    if not check_paths:
        return problems
    folders = [("manual_data_root", settings.manual_data_root)] if settings.holds_out_val and \
        settings.val_split_mode == "manual" else []
    folders += [(f"extra_manual_datasets.{name}", folder) for name, folder in settings.extra_manual_datasets]
    for key, folder in folders:
        if os.path.isfile(folder) and not folder.lower().endswith(".json"):
            problems.append(ConfigProblem(key, source, f"{folder!r} is a file but not a .json manifest: give the "
                                          "folder of validation images."))
        elif not os.path.exists(folder):
            problems.append(ConfigProblem(key, source, f"{folder!r} does not exist (relative paths start from the "
                                          f"folder train.py runs in, {os.getcwd()})."))
    return problems


def _settings_notes(settings: ValidationSettings) -> list[str]:
    source, notes = settings.source, []
    if settings.manual_data_root is not None and not (settings.holds_out_val and settings.val_split_mode == "manual"):
        why = "validate_training is false" if not settings.validate_training else \
            f"val_split_mode is {settings.val_split_mode}"
        notes.append(f"{source}: manual_data_root is not used: {why}.")
    if not settings.validate_training and settings.val_split_mode != "none":
        notes.append(f"{source}: validate_training is false, so no images are held out (no loss/val); "
                     "extra_manual_datasets and stabilize_training_loss still apply.")
    runs = settings.runs_per_epoch
    if runs is not None and abs(runs * settings.every_n_epochs - 1) > 1e-9:
        notes.append(f"{source}: every_n_epochs {settings.every_n_epochs:g} is read as {runs} validation(s) per "
                     f"epoch, evenly spaced (every {1 / runs:g} epoch).")
    if not settings.holds_out_val and not settings.extra_manual_datasets and not settings.stabilize_training_loss:
        notes.append(f"{source}: nothing to validate: no held-out set, no extra_manual_datasets, and "
                     "stabilize_training_loss is false.")
    return notes


# =================================================================================================
# Keys and seeds: a stable name per image and the random numbers derived from it
# =================================================================================================

def _hash(*parts: object) -> int:
    """A 64-bit number from the parts; the same on every machine and Python version (unlike hash())."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def item_seed(seed: int, key: str) -> int:
    """The fixed noise seed of one validation image: the same for every pass, whatever the batch or order.

    Draw the image's timestep and noise from a generator seeded with it (torch.Generator().manual_seed).
    """
    return _hash("validation-noise", seed, key) >> (64 - SEED_BITS)


def split_keys(keys: Sequence[str], proportion: float, seed: int, purpose: str) -> set[str]:
    """max(1, ceil(proportion x distinct keys)) of the keys: those ranked first by a hash of (purpose, seed, key).

    Independent of the order of `keys`; adding a key changes the choice by at most one key.
    """
    distinct = sorted(set(keys), key=lambda key: (_hash(purpose, seed, key), key))
    count = max(1, math.ceil(proportion * len(distinct) - 1e-9))  # 0.15 x 100 is 15.000000000000002 in floats
    return set(distinct[:count])


# =================================================================================================
# The plan: which images each set measures
# =================================================================================================

@dataclass(frozen=True)
class ValidationPlan:
    """The training images left after the split, and each validation set with its images, seeds and tag."""

    settings: ValidationSettings
    train_items: list[ImageItem]  # what trains: the input, in its order, less the held-out images
    sets: dict[str, list[ImageItem]]  # name -> images, sorted by key; `val`, extras as named, `stabilize-train`
    seeds: dict[str, list[int]]  # name -> each image's fixed noise seed (item_seed), aligned with sets[name]
    tags: dict[str, str]  # name -> TensorBoard tag, loss/<name>
    batch_size: int  # images per validation batch
    summary: list[str] = field(default_factory=list)  # "name = value (origin)" lines for the derived values
    notes: list[str] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)  # unusable files in the validation folders

    @property
    def held_out(self) -> list[str]:
        """The sets of images that do not train (all but stabilize-train)."""
        return [name for name in self.sets if name != STABILIZE]

    @property
    def combined_tag(self) -> str | None:
        """loss/_all_val_combined, the mean of the held-out sets' losses, when there are two or more."""
        return f"loss/{COMBINED}" if len(self.held_out) >= 2 else None

    def batches(self, name: str) -> list[list[Sample]]:
        """The batches of one set, indexing into sets[name] (validation_batches)."""
        return validation_batches(self.sets[name], self.batch_size)

    def schedule(self, batches_per_epoch: list[int], **kwargs) -> list[ValidationPoint]:
        """When to validate (validation_schedule with this plan's every_n_epochs)."""
        return validation_schedule(self.settings.every_n_epochs, batches_per_epoch, **kwargs)


ScanFunction = Callable[[str, int], ScanResult]


def build_validation_plan(settings: ValidationSettings, train_items: list[ImageItem], *, resolution: int,
                          batch_size: int, data_root: str | list[str] | None = None,
                          scan: ScanFunction | None = None) -> ValidationPlan:
    """Split the training images and gather the validation sets. Raises ConfigError naming the file and key.

    - `train_items`: the scanned training images; `data_root` their root(s), for stable image keys.
    - `resolution`: the training resolution, at which the validation folders are scanned and bucketed.
    - `batch_size`: the training batch_size, used when the settings do not set their own.
    - `scan(folder, resolution)`: how a validation folder is scanned (default data.items.scan_dataset).
    """
    scan = scan or scan_dataset
    source = settings.source
    roots = [data_root] if isinstance(data_root, str) else list(data_root or [])
    keys = [item_key(item.path, roots) for item in train_items]
    problems: list[ConfigProblem] = []
    notes: list[str] = []
    skipped: list[SkippedFile] = []
    summary: list[str] = []
    sets: dict[str, list[tuple[str, ImageItem]]] = {}  # name -> (key, item)
    held_out: set[str] = set()  # absolute paths that leave training

    if settings.holds_out_val and settings.val_split_mode == "automatic":
        taken = split_keys(keys, settings.auto_split_proportion, settings.seed, "validation-split")
        left = len(set(keys)) - len(taken)
        if not train_items:
            problems.append(ConfigProblem("val_split_mode", source, "is automatic but there are no training images "
                                          "to split."))
        elif left == 0:
            problems.append(ConfigProblem("auto_split_proportion", source, (
                f"{settings.auto_split_proportion:g} of {len(set(keys))} training image(s) holds out {len(taken)} "
                "and leaves none to train: lower it, add images, or use val_split_mode manual.")))
        else:
            sets[VAL] = _unique([(key, item) for key, item in zip(keys, train_items) if key in taken])
            held_out.update(os.path.abspath(item.path) for _, item in sets[VAL])
            summary.append(f"validation set {VAL} = {len(sets[VAL])} image(s) held out of training "
                           f"(auto_split_proportion {settings.auto_split_proportion:g} of {len(set(keys))}, "
                           f"seed {settings.seed}, in {source})")
    manual = [(VAL, settings.manual_data_root, "manual_data_root")] if (
        settings.holds_out_val and settings.val_split_mode == "manual") else []
    manual += [(name, folder, f"extra_manual_datasets.{name}") for name, folder in settings.extra_manual_datasets]
    training_paths = {os.path.abspath(item.path) for item in train_items}
    for name, folder, key in manual:
        found = _scan_set(folder, key, source, resolution, scan, problems, notes, skipped)
        if not found:
            continue
        sets[name] = found
        overlap = [item for _, item in found if os.path.abspath(item.path) in training_paths]
        origin = f"from {folder}, {key} in {source}"
        if name == VAL and overlap:
            held_out.update(os.path.abspath(item.path) for item in overlap)
            notes.append(f"{source}: {len(overlap)} image(s) of manual_data_root {folder!r} are also training "
                         f"images (e.g. {overlap[0].path}); they are left out of training so loss/val stays held out.")
        elif overlap:
            notes.append(f"{source}: {len(overlap)} image(s) of {key} {folder!r} are also training images (e.g. "
                         f"{overlap[0].path}): loss/{name} is not a held-out measure for them.")
        summary.append(f"validation set {name} = {len(found)} image(s) ({origin})")

    remaining = [(key, item) for key, item in zip(keys, train_items) if os.path.abspath(item.path) not in held_out]
    if train_items and not problems and not any(item.multiply > 0 for _, item in remaining):
        key = "auto_split_proportion" if settings.val_split_mode == "automatic" else "manual_data_root"
        problems.append(ConfigProblem(key, source, (
            f"holding out the validation images leaves no training image with multiply above 0, so nothing "
            f"would train ({len(remaining)} left of {len(train_items)}).")))
    pool = [(key, item) for key, item in remaining if item.multiply > 0]  # images that actually train
    if settings.stabilize_training_loss and pool and not problems:
        taken = split_keys([key for key, _ in pool], settings.stabilize_split_proportion, settings.seed,
                           "stabilize-split")
        sets[STABILIZE] = _unique([(key, item) for key, item in pool if key in taken])
        summary.append(f"validation set {STABILIZE} = {len(sets[STABILIZE])} training image(s), still trained "
                       f"(stabilize_split_proportion {settings.stabilize_split_proportion:g} of "
                       f"{len({key for key, _ in pool})}, in {source})")
    if problems:
        raise ConfigError(problems)

    order = [name for name in [VAL] + [name for name, _ in settings.extra_manual_datasets] + [STABILIZE]
             if name in sets]
    resolved_batch = settings.batch_size or batch_size
    summary.append(f"validation batch_size = {resolved_batch} ("
                   + (f"batch_size in {source})" if settings.batch_size else "the training batch_size)"))
    runs = settings.runs_per_epoch
    summary.append(f"validation every_n_epochs = {settings.every_n_epochs:g} ("
                   + (f"{runs} per epoch, " if runs else "") + "plus once before training and after the last step)")
    return ValidationPlan(
        settings=settings,
        train_items=[item for _, item in remaining],
        sets={name: [item for _, item in sets[name]] for name in order},
        seeds={name: [item_seed(settings.seed, key) for key, _ in sets[name]] for name in order},
        tags={name: f"loss/{name}" for name in order},
        batch_size=resolved_batch, summary=summary, notes=notes, skipped=skipped)


def _unique(pairs: list[tuple[str, ImageItem]]) -> list[tuple[str, ImageItem]]:
    """One entry per image file (a manifest may list an image twice), sorted by key."""
    seen: dict[str, tuple[str, ImageItem]] = {}
    for key, item in sorted(pairs, key=lambda pair: (pair[0], pair[1].path)):
        seen.setdefault(os.path.abspath(item.path), (key, item))
    return sorted(seen.values(), key=lambda pair: (pair[0], pair[1].path))


def _scan_set(folder: str, key: str, source: str, resolution: int, scan: ScanFunction,
              problems: list[ConfigProblem], notes: list[str],
              skipped: list[SkippedFile]) -> list[tuple[str, ImageItem]]:
    """The usable images of one validation folder with their keys; an empty folder is a problem naming it."""
    try:
        result = scan(folder, resolution)
    except ValueError as error:  # data.scan.DataRootError: a manifest that cannot be read
        problems.append(ConfigProblem(key, source, str(error)))
        return []
    skipped += result.skipped
    notes += [f"{key}: {note}" for note in result.notes]
    if not result.items:
        reasons = "".join(f"\n    {entry.path}: {entry.reason}" for entry in result.skipped[:SHOWN])
        problems.append(ConfigProblem(key, source, f"{folder!r} holds no usable images (.jpg, .jpeg, .png, .bmp, "
                                      f".webp, .jfif), searched recursively.{reasons}"))
        return []
    return _unique([(item_key(item.path, [folder]), item) for item in result.items])


# =================================================================================================
# Batches and schedule
# =================================================================================================

def validation_sample(items: list[ImageItem], index: int) -> Sample:
    """One validation image as the loader prepares it: centred crop, no jitter, no flip, full caption, weight 1.

    Like EveryDream2's validation: no caption dropout, no tag shuffling (tags in weight order), no
    loss_scale (the loss is the plain MSE); multiply and batch_id do not apply.
    """
    item = items[index]
    return Sample(index=index, copy=0, bucket=item.bucket, crop_x=0.5, crop_y=0.5, jitter=NO_JITTER, flip=False,
                  caption=item.caption, loss_scale=1.0)


def validation_batches(items: list[ImageItem], batch_size: int) -> list[list[Sample]]:
    """Every image once, in batches of one bucket, in a fixed order (buckets sorted, images in list order).

    A bucket's last batch is smaller when its count is not a multiple of batch_size; nothing is repeated
    (EveryDream2 pads it with duplicates, which counts those images twice).
    """
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(items):
        by_bucket.setdefault(item.bucket, []).append(index)
    return [[validation_sample(items, index) for index in indices[start:start + batch_size]]
            for _, indices in sorted(by_bucket.items()) for start in range(0, len(indices), batch_size)]


@dataclass(frozen=True)
class ValidationPoint:
    """A moment at which validation runs."""

    epoch: int  # counted from 0
    batch: int  # index in the epoch of the batch after which it runs; -1: before the epoch's first batch
    global_step: int  # batches trained by then (LoopState.global_step)


def validation_schedule(every_n_epochs: float, batches_per_epoch: list[int], *, before_training: bool = True,
                        at_end: bool = True) -> list[ValidationPoint]:
    """When validation runs, in order, one point per global step.

    - every_n_epochs >= 1: after k x every_n_epochs epochs of training, k = 1, 2, ...: at the end of every
      n-th epoch for a whole n; part-way through an epoch for a fractional one (1.5: the middle of the
      second epoch, the end of the third, ...).
    - every_n_epochs < 1: round(1/every_n_epochs) evenly spaced times in each epoch, the last at its end
      (0.5: the middle and the end; 0.25: each quarter), at most once per batch.
    - before_training: once at step 0, the baseline (EveryDream2 does this); at_end: after the last step
      too, so the final model is measured whatever the interval.
    """
    if not every_n_epochs > 0:
        raise ValueError(f"every_n_epochs must be above 0, got {every_n_epochs}")
    starts = [sum(batches_per_epoch[:epoch]) for epoch in range(len(batches_per_epoch))]
    points: dict[int, ValidationPoint] = {}

    def add(epoch: int, batch: int) -> None:
        step = starts[epoch] + batch + 1
        points.setdefault(step, ValidationPoint(epoch, batch, step))

    if before_training and batches_per_epoch:
        add(0, -1)
    if every_n_epochs < 1:
        runs = max(1, round(1 / every_n_epochs))
        for epoch, length in enumerate(batches_per_epoch):
            divisions = min(runs, length)
            for i in range(1, divisions + 1):
                add(epoch, math.ceil(i * length / divisions) - 1)
    else:
        interval = Fraction(every_n_epochs).limit_denominator(1000)  # exact: 1.5 is 3/2, not a float sum
        k = 1
        while k * interval <= len(batches_per_epoch):
            progress = k * interval
            epoch = math.ceil(progress) - 1
            add(epoch, math.ceil((progress - epoch) * batches_per_epoch[epoch]) - 1)
            k += 1
    if at_end and sum(batches_per_epoch):
        last = max(epoch for epoch, length in enumerate(batches_per_epoch) if length)
        add(last, batches_per_epoch[last] - 1)
    return [points[step] for step in sorted(points)]
