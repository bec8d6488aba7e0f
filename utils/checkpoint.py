"""Saving a checkpoint: a diffusers pipeline folder plus the run's record, complete or not at all.

`<run>/ckpts/<name>/` is written as `<run>/ckpts/.tmp-<name>/` and renamed only when every file is in
place, so a crash mid-save never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

from utils.run_folder import CONFIG_FILE, write_json

CHECKPOINT_RECORD = "checkpoint.json"


def checkpoint_name(project_name: str, epochs_done: int, global_step: int, prefix: str = "") -> str:
    """`<prefix><project>-ep<EE>-gs<GGGGG>`, EveryDream2's naming (`last-` prefix for the final save)."""
    return f"{prefix}{project_name}-ep{epochs_done:02d}-gs{global_step:05d}"


def save_pipeline(folder: str, pipeline, record: dict, config: dict, write_extra=None) -> str:
    """Write `pipeline` (diffusers `save_pretrained`), the loop record and the config to `folder`, atomically.

    `write_extra(temporary_folder)` adds more files (the EMA weights) before the folder is renamed into place.
    """
    parent, name = os.path.split(folder.rstrip("/\\"))
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".tmp-{name}")
    shutil.rmtree(temporary, ignore_errors=True)  # left by a crash during an earlier save
    pipeline.save_pretrained(temporary, safe_serialization=True)
    for component in ("text_encoder", "text_encoder_2"):
        if getattr(pipeline, component, None) is not None:
            resave_in_original_layout(getattr(pipeline, component), os.path.join(temporary, component))
    if write_extra is not None:
        write_extra(temporary)
    write_json(os.path.join(temporary, CONFIG_FILE), config)
    write_json(os.path.join(temporary, CHECKPOINT_RECORD), {**record, "saved_at": time.time()})
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    return folder


def resave_in_original_layout(text_encoder, folder: str) -> None:
    """Write a CLIP text encoder under its original `text_model.*` names if transformers wrote it flat.

    transformers 5 flattened CLIPTextModel and saves a model it did not load from a file (the built-in
    model, say) without the `text_model.` prefix; transformers 4, which many other tools still use, then
    silently loads random weights. Both versions read the original names, and a model loaded from them is
    saved with them again, so this rewrite happens once in a model's life, not at every save.
    """
    if hasattr(text_encoder, "text_model") or all(k.startswith("text_model.") for k in _saved_weight_names(folder)):
        return
    save_text_encoder(text_encoder, folder, text_encoder.state_dict())


def save_text_encoder(text_encoder, folder: str, state_dict: dict) -> None:
    """transformers' save_pretrained of a CLIP text encoder (config and weights) with `state_dict` as its
    weights, under the original `text_model.*` names."""
    from utils.model_family import with_text_model_prefix

    text_encoder.save_pretrained(folder, safe_serialization=True, save_original_format=False,
                                 state_dict=with_text_model_prefix(state_dict))


def _saved_weight_names(folder: str) -> list[str]:
    """The tensor names in a transformers model folder, read from the index or the file header only."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            return list(json.load(handle)["weight_map"])
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), framework="numpy") as handle:
        return list(handle.keys())


class NoCheckpointFound(Exception):
    """`findlast` found no complete checkpoint to continue from."""


def is_finished_checkpoint(folder: str) -> bool:
    """A complete, normally saved checkpoint: renamed into place, with its record, not from a crash."""
    name = os.path.basename(folder)
    return (not name.startswith((".tmp-", "errored-", "interrupted-"))
            and os.path.isfile(os.path.join(folder, CHECKPOINT_RECORD))
            and os.path.isfile(os.path.join(folder, "model_index.json")))


def find_last_checkpoint(logdir: str, containing: str | None = None) -> str:
    """The newest finished checkpoint under logdir, by the save time it records (not by file times);
    with `containing`, the newest that has that sub-folder (e.g. `ema`)."""
    newest: tuple[float, int, str] | None = None
    for folder, subfolders, _ in os.walk(logdir):
        subfolders[:] = [d for d in subfolders if not d.startswith(".tmp-")]
        if not is_finished_checkpoint(folder) or (containing and not os.path.isdir(os.path.join(folder, containing))):
            continue
        try:
            with open(os.path.join(folder, CHECKPOINT_RECORD), encoding="utf-8") as handle:
                record = json.load(handle)
            key = (float(record["saved_at"]), int(record["global_step"]), folder)
            if not math.isfinite(key[0]):
                raise ValueError("saved_at is not a time")
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged record: not a checkpoint to trust
        if newest is None or key > newest:
            newest = key
    if newest is None:
        if containing:
            raise NoCheckpointFound(f"findlast found no finished checkpoint with {containing}/ under {logdir!r}: "
                                    "no earlier session saved EMA weights.")
        raise NoCheckpointFound(f"resume_ckpt: findlast found no finished checkpoint under {logdir!r}. Run the "
                                "first session of the chain (with a base model in resume_ckpt) first.")
    return newest[2]
