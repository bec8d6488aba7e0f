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


def save_pipeline(folder: str, pipeline, record: dict, config: dict) -> str:
    """Write `pipeline` (diffusers `save_pretrained`), the loop record and the config to `folder`, atomically."""
    parent, name = os.path.split(folder.rstrip("/\\"))
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".tmp-{name}")
    shutil.rmtree(temporary, ignore_errors=True)  # left by a crash during an earlier save
    pipeline.save_pretrained(temporary, safe_serialization=True)
    write_json(os.path.join(temporary, CONFIG_FILE), config)
    write_json(os.path.join(temporary, CHECKPOINT_RECORD), {**record, "saved_at": time.time()})
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    return folder


class NoCheckpointFound(Exception):
    """`findlast` found no complete checkpoint to continue from."""


def is_finished_checkpoint(folder: str) -> bool:
    """A complete, normally saved checkpoint: renamed into place, with its record, not from a crash."""
    name = os.path.basename(folder)
    return (not name.startswith((".tmp-", "errored-", "interrupted-"))
            and os.path.isfile(os.path.join(folder, CHECKPOINT_RECORD))
            and os.path.isfile(os.path.join(folder, "model_index.json")))


def find_last_checkpoint(logdir: str) -> str:
    """The newest finished checkpoint under logdir, by the save time it records (not by file times)."""
    newest: tuple[float, int, str] | None = None
    for folder, subfolders, _ in os.walk(logdir):
        subfolders[:] = [d for d in subfolders if not d.startswith(".tmp-")]
        if not is_finished_checkpoint(folder):
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
        raise NoCheckpointFound(f"resume_ckpt: findlast found no finished checkpoint under {logdir!r}. Run the "
                                "first session of the chain (with a base model in resume_ckpt) first.")
    return newest[2]
