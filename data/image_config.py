"""Per-image settings from caption text, sidecar files, folder files and manifest entries. Pure, torch-free.

Every source gives an ImageConfig in which unset values are None. Sources are folded from the most
general to the most specific (global.yaml of the data root, ..., of the image's folder, then the folder's
own files, then the image's sidecars): a set scalar overrides the ones before it; main prompts and tags
are ordered unions, the most specific first; `shuffle_tags` is on if any source turns it on. These are
EveryDream2's rules, so its datasets train unchanged.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import yaml

from data.captions import Tag, read_text


class ImageConfigError(ValueError):
    """A caption, sidecar, folder or manifest file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class ImageConfig:
    """Settings for one image, or for the images a file applies to. None = not set by this source."""

    main_prompts: tuple[str, ...] = ()  # the image uses the first: the most specific
    tags: tuple[Tag, ...] = ()
    rating: float | None = None  # for rated_dataset; 1.0 when unset
    max_caption_length: int | None = None  # characters, for weighted tag shuffling
    multiply: float | None = None  # copies per epoch; fractions allowed
    cond_dropout: float | None = None  # overrides the config's cond_dropout for this image
    flip_p: float | None = None  # overrides the config's flip_p for this image
    shuffle_tags: bool | None = None
    batch_id: str | None = None  # images with the same id share batches
    loss_scale: float | None = None  # multiplies this image's loss (may be negative)


SCALARS = ("rating", "max_caption_length", "multiply", "cond_dropout", "flip_p", "batch_id", "loss_scale")
KNOWN_KEYS = frozenset({"main_prompt", "tags", "caption", "shuffle_tags", *SCALARS})


def fold(configs: list[ImageConfig]) -> ImageConfig:
    """Merge configs given from the most general to the most specific."""
    merged = ImageConfig()
    for specific in configs:
        merged = _merge(merged, specific)
    return merged


def _merge(general: ImageConfig, specific: ImageConfig) -> ImageConfig:
    scalars = {name: getattr(specific, name) if getattr(specific, name) is not None else getattr(general, name)
               for name in SCALARS}
    shuffle = None if general.shuffle_tags is None and specific.shuffle_tags is None else bool(
        general.shuffle_tags or specific.shuffle_tags)
    specific_tag_texts = {tag.text for tag in specific.tags}
    return ImageConfig(
        main_prompts=tuple(dict.fromkeys(specific.main_prompts + general.main_prompts)),
        tags=specific.tags + tuple(tag for tag in general.tags if tag.text not in specific_tag_texts),
        shuffle_tags=shuffle, **scalars)


# =================================================================================================
# Parsing each kind of source
# =================================================================================================

def parse_caption_text(text: str) -> ImageConfig:
    """`main prompt, tag, tag`: the first comma-separated part is the main prompt, the rest are tags.

    An empty first part (`, tag, tag`) means no main prompt, so the file name's is used (as EveryDream2).
    """
    parts = [part.strip() for part in " ".join(text.split()).split(",")]
    main = (parts[0],) if parts and parts[0] else ()
    return ImageConfig(main_prompts=main, tags=_unique_tags(Tag(part) for part in parts[1:] if part))


def _unique_tags(tags) -> tuple[Tag, ...]:
    """Tags in order with repeated texts dropped (the first one stays)."""
    seen, unique = set(), []
    for tag in tags:
        if tag.text not in seen:
            seen.add(tag.text)
            unique.append(tag)
    return tuple(unique)


def parse_mapping(data: dict, source: str, notes: list[str], folder: str | None = None) -> ImageConfig:
    """A YAML or JSON object of image settings. Unknown keys are noted, not fatal (EveryDream2 ignores them).

    `folder` is where file names in `caption:` are looked up: the folder of the YAML file or manifest.
    """
    if not isinstance(data, dict):
        raise ImageConfigError(f"{source}: expected key: value pairs, got {type(data).__name__}")
    for key in sorted(set(data) - KNOWN_KEYS - {"image"}, key=str):
        notes.append(f"{source}: unknown key {key!r} ignored (known: {', '.join(sorted(KNOWN_KEYS))})")
    own = ImageConfig(
        main_prompts=_main_prompts(data.get("main_prompt"), source),
        tags=_tags(data.get("tags"), source),
        rating=_number(data, "rating", source, minimum=0.0),
        max_caption_length=_integer(data, "max_caption_length", source),
        multiply=_number(data, "multiply", source, minimum=0.0),
        cond_dropout=_number(data, "cond_dropout", source, minimum=0.0, maximum=1.0),
        flip_p=_number(data, "flip_p", source, minimum=0.0, maximum=1.0),
        shuffle_tags=_boolean(data, "shuffle_tags", source),
        batch_id=_text(data, "batch_id", source),
        loss_scale=_number(data, "loss_scale", source))
    if data.get("caption") is None:
        return own
    # As EveryDream2: what `caption:` holds is more specific than the keys beside it.
    return fold([own, _parse_caption_value(data["caption"], source, notes, folder)])


def _parse_caption_value(value, source: str, notes: list[str], folder: str | None) -> ImageConfig:
    """`caption:` holds caption text, the name of a caption/YAML/JSON file, or nested settings."""
    if isinstance(value, dict):
        return parse_mapping(value, f"{source} (caption)", notes, folder)
    if isinstance(value, str):
        referenced = _referenced_file(folder, value)
        return read_config_file(referenced, notes) if referenced else parse_caption_text(value)
    raise ImageConfigError(f"{source}: caption must be text or key: value pairs, got {value!r}")


def _as_text(value) -> str | None:
    """Text as written; YAML reads `2023` or `1.5` as numbers, which are text here. None for other values."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _main_prompts(value, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    texts = [_as_text(v) for v in (value if isinstance(value, list) else [value]) if v is not None]
    if any(text is None for text in texts):
        raise ImageConfigError(f"{source}: main_prompt must be text or a list of texts, got {value!r}")
    return tuple(dict.fromkeys(text for text in texts if text))


def _tags(value, source: str) -> tuple[Tag, ...]:
    """A list of tags, each text or {tag, weight}; a comma-separated string is accepted too."""
    if value is None:
        return ()
    if isinstance(value, str):
        return _unique_tags(Tag(part.strip()) for part in value.split(",") if part.strip())
    if not isinstance(value, list):
        raise ImageConfigError(f"{source}: tags must be a list, got {value!r}")
    tags = []
    for entry in value:
        if entry is None:  # a stray `- ` line in YAML
            continue
        if isinstance(entry, dict) and _as_text(entry.get("tag")) is not None:
            tags.append(Tag(_as_text(entry["tag"]), _weight(entry, source)))
        elif _as_text(entry) is not None:
            tags.append(Tag(_as_text(entry)))
        else:
            raise ImageConfigError(f"{source}: each tag is text or {{tag: text, weight: number}}, got {entry!r}")
    return _unique_tags(tag for tag in tags if tag.text)


def _weight(entry: dict, source: str) -> float:
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0 or math.isinf(weight):
        raise ImageConfigError(f"{source}: tag {entry['tag']!r} has weight {weight!r}; weights are numbers >= 0")
    return float(weight)


def _number(data: dict, key: str, source: str, minimum: float | None = None,
            maximum: float | None = None) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, str):  # YAML reads `multiply: 1e2` as text
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ImageConfigError(f"{source}: {key} must be a number, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise ImageConfigError(f"{source}: {key} is {value}; it must be {bounds}")
    return float(value)


def _integer(data: dict, key: str, source: str) -> int | None:
    value = _number(data, key, source, minimum=1)
    return None if value is None else int(value)


def _boolean(data: dict, key: str, source: str) -> bool | None:
    value = data.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise ImageConfigError(f"{source}: {key} must be true or false, got {value!r}")


def _text(data: dict, key: str, source: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value).strip() or None
    raise ImageConfigError(f"{source}: {key} must be text, got {value!r}")


# =================================================================================================
# Files
# =================================================================================================

CONFIG_FILE_EXTENSIONS = (".txt", ".caption", ".yaml", ".yml", ".json")


def _referenced_file(folder: str | None, text: str) -> str | None:
    """The settings file a caption names (`shared.yaml`), looked up in `folder`; None if it names none."""
    name = text.strip()
    if folder is None or not name or not name.lower().endswith(CONFIG_FILE_EXTENSIONS):
        return None
    path = os.path.join(folder, name)
    return path if os.path.isfile(path) else None


def read_config_file(path: str, notes: list[str], _seen: frozenset = frozenset()) -> ImageConfig:
    """A caption (.txt/.caption), YAML (.yaml/.yml) or JSON (.json) file as image settings."""
    real = os.path.realpath(path)
    if real in _seen:
        raise ImageConfigError(f"{path}: caption files refer to each other in a loop")
    try:
        text = read_text(path)
    except OSError as error:
        raise ImageConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    folder = os.path.dirname(path)
    extension = os.path.splitext(path)[1].lower()
    if extension in (".yaml", ".yml", ".json"):
        try:
            data = json.loads(text) if extension == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as error:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ImageConfigError(f"{path}: not valid {extension[1:].upper()}: {first_line}") from None
        return ImageConfig() if data is None else parse_mapping(data, path, notes, folder)
    referenced = _referenced_file(folder, text)
    if referenced:  # EveryDream2: a caption file may name a settings file
        return read_config_file(referenced, notes, _seen | {real})
    return parse_caption_text(text)


SIDECAR_EXTENSIONS = (".txt", ".caption", ".yml", ".yaml", ".json")  # folded in this order: later wins


def sidecar_config(image_path: str, notes: list[str]) -> ImageConfig:
    """The image's own files, `IMG.txt`, `IMG.caption`, `IMG.yml`, `IMG.yaml`, `IMG.json`, folded."""
    base = os.path.splitext(image_path)[0]
    return fold([read_config_file(base + ext, notes) for ext in SIDECAR_EXTENSIONS if os.path.isfile(base + ext)])


# Folder files for the images directly in a folder, folded in EveryDream2's order (later wins).
LOCAL_FILES = ("multiply.txt", "cond_dropout.txt", "flip_p.txt", "local.yaml", "local.yml", "batch_id.txt",
               "loss_scale.txt", "shuffle_tags.txt")
GLOBAL_FILES = ("global.yaml", "global.yml")  # for the folder and every folder below it
NUMBER_FILES = {"multiply.txt": "multiply", "cond_dropout.txt": "cond_dropout", "flip_p.txt": "flip_p",
                "loss_scale.txt": "loss_scale"}


def folder_file_config(path: str, notes: list[str]) -> ImageConfig:
    """One folder file: `multiply.txt` and the like hold one value; `shuffle_tags.txt` counts by presence."""
    name = os.path.basename(path)
    if name == "shuffle_tags.txt":
        return ImageConfig(shuffle_tags=True)
    if name in NUMBER_FILES or name == "batch_id.txt":
        try:
            text = read_text(path).strip()
        except OSError as error:
            raise ImageConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
        if not text:  # as EveryDream2: an empty file sets nothing
            notes.append(f"{path}: empty, ignored")
            return ImageConfig()
        key = NUMBER_FILES.get(name, "batch_id")
        # One value: parse it as the same key of a YAML file would be, with the same checks.
        return parse_mapping({key: text}, path, notes)
    return read_config_file(path, notes)


def local_config(folder: str, notes: list[str]) -> ImageConfig:
    """The settings a folder's own files give the images directly in it."""
    return fold([folder_file_config(os.path.join(folder, name), notes) for name in LOCAL_FILES
                 if os.path.isfile(os.path.join(folder, name))])


def global_config(folder: str, notes: list[str]) -> ImageConfig:
    """The settings of a folder's global.yaml / global.yml (only that folder's, not its parents')."""
    return fold([read_config_file(os.path.join(folder, name), notes) for name in GLOBAL_FILES
                 if os.path.isfile(os.path.join(folder, name))])


def with_filename_caption(config: ImageConfig, caption_from_name: str) -> ImageConfig:
    """The file name's caption is used only when no source gave a main prompt (EveryDream2's rule)."""
    if config.main_prompts:
        return config
    return fold([config, parse_caption_text(caption_from_name)])  # the name is the most specific source
