"""Saving a checkpoint: a diffusers pipeline folder plus the run's record, complete or not at all.

`<run>/ckpts/<name>/` is written as `<run>/ckpts/.tmp-<name>/` and renamed only when every file is in
place, so a crash mid-save never leaves a folder that looks finished.
"""

from __future__ import annotations

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
