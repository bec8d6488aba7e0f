"""Saving a checkpoint: a diffusers pipeline folder plus the run's record, complete or not at all.

`<run>/ckpts/<name>/` is written as `<run>/ckpts/.tmp-<name>/`, flushed to disk, and renamed only when
every file is in place, so a crash or a kill mid-save never leaves a folder that looks finished. The
record (`checkpoint.json`) holds the SHA-256 of every weight file, checked before the checkpoint is used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import time

from utils.run_folder import CONFIG_FILE, write_json

CHECKPOINT_RECORD = "checkpoint.json"
OPTIMIZER_STATE_FILE = "optimizer.pt"  # optimizer/optimizers.py
RESUME_STATE_FILE = "resume_state.pt"  # utils/training_state.py
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")  # the files whose checksums the record holds
TEMPORARY_PREFIX, ERRORED_PREFIX, INTERRUPTED_PREFIX = ".tmp-", "errored-", "interrupted-"
INCOMPLETE_PREFIXES = (TEMPORARY_PREFIX, ERRORED_PREFIX, INTERRUPTED_PREFIX)  # never a finished model


def checkpoint_name(project_name: str, epochs_done: int, global_step: int, prefix: str = "") -> str:
    """`<prefix><project>-ep<EE>-gs<GGGGG>`, EveryDream2's naming (`last-` prefix for the final save)."""
    return f"{prefix}{project_name}-ep{epochs_done:02d}-gs{global_step:05d}"


def save_pipeline(folder: str, pipeline, record: dict, config: dict, write_extra=None) -> str:
    """Write `pipeline` (diffusers `save_pretrained`), the loop record and the config to `folder`, atomically.

    `write_extra(temporary_folder)` adds more files (the EMA weights, the training state) before the folder
    is checksummed, flushed to disk and renamed into place.
    """
    parent, name = os.path.split(folder.rstrip("/\\"))
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, TEMPORARY_PREFIX + name)
    shutil.rmtree(temporary, ignore_errors=True)  # left by a crash during an earlier save
    pipeline.save_pretrained(temporary, safe_serialization=True)
    for component in ("text_encoder", "text_encoder_2"):
        if getattr(pipeline, component, None) is not None:
            resave_in_original_layout(getattr(pipeline, component), os.path.join(temporary, component))
    if write_extra is not None:
        write_extra(temporary)
    write_json(os.path.join(temporary, CONFIG_FILE), config)
    write_json(os.path.join(temporary, CHECKPOINT_RECORD),
               {**record, "saved_at": time.time(), "files": weight_checksums(temporary)})
    sync_to_disk(temporary)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    _fsync_folder(parent)
    return folder


# =================================================================================================
# Checksums and flushing
# =================================================================================================

class DamagedCheckpoint(Exception):
    """A checkpoint's weight files are missing or differ from the checksums recorded when it was saved."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_checksums(folder: str) -> dict[str, str]:
    """{path relative to folder, with `/`: SHA-256} of every weight file under folder."""
    sums = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(WEIGHT_SUFFIXES):
                path = os.path.join(root, name)
                sums[os.path.relpath(path, folder).replace(os.sep, "/")] = file_sha256(path)
    return dict(sorted(sums.items()))


def read_record(folder: str) -> dict:
    """A checkpoint's checkpoint.json. Raises OSError or ValueError when it is missing or damaged."""
    with open(os.path.join(folder, CHECKPOINT_RECORD), encoding="utf-8") as handle:
        record = json.load(handle)
    if not isinstance(record, dict):
        raise ValueError(f"{CHECKPOINT_RECORD} is not a JSON object")
    return record


def save_order(record: dict) -> tuple[float, int]:
    """What orders a run's checkpoints, newest last: the save time its record holds, then the step. Not the
    step first: a run resumed with --force_resume on more processes counts fewer steps (utils.loop_state.steps_at),
    and one resumed from an older checkpoint goes on from its step, and what they save is newer than the
    higher-numbered checkpoints before. Raises KeyError, TypeError or ValueError for a damaged record."""
    saved_at, step = float(record["saved_at"]), int(record["global_step"])
    if not math.isfinite(saved_at):
        raise ValueError("saved_at is not a time")
    return saved_at, step


def ordered_record(folder: str) -> tuple[tuple[float, int], dict] | None:
    """(save_order, checkpoint.json) of a checkpoint; None when its record is missing or damaged: not a
    checkpoint to trust."""
    try:
        record = read_record(folder)
        return save_order(record), record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify_checkpoint(folder: str, needed: tuple[str, ...] = ()) -> None:
    """Check the weight files against the checksums in the record; `needed` files must also be present.

    Raises DamagedCheckpoint naming each file that is missing or changed. A checkpoint saved before
    checksums were recorded is accepted as it is.
    """
    try:
        recorded = read_record(folder).get("files", {})
    except (OSError, ValueError) as error:
        raise DamagedCheckpoint(f"{folder}: its {CHECKPOINT_RECORD} cannot be read ({error})") from None
    problems = [f"{name}: missing" for name in needed if name not in recorded
                and not os.path.isfile(os.path.join(folder, name))]
    for name, expected in recorded.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append(f"{name}: missing")
        elif file_sha256(path) != expected:
            problems.append(f"{name}: its contents differ from the checksum recorded when it was saved")
    if problems:
        raise DamagedCheckpoint(f"checkpoint {folder} is damaged (disk error, or changed by hand), so it is not "
                                "used:\n    " + "\n    ".join(problems) + "\nUse an earlier checkpoint of the run.")


def forget_file(folder: str, name: str) -> None:
    """Delete one file of a checkpoint (a superseded optimizer state) and its checksum from the record."""
    record = read_record(folder)
    record.get("files", {}).pop(name, None)
    write_json(os.path.join(folder, CHECKPOINT_RECORD), record)
    try:
        os.remove(os.path.join(folder, name))
    except FileNotFoundError:
        pass


def remove_unfinished_saves(ckpts_dir: str) -> None:
    """Delete the `.tmp-` folders a save cut short by a crash or a kill left in a run's ckpts/."""
    if os.path.isdir(ckpts_dir):
        for name in os.listdir(ckpts_dir):
            if name.startswith(TEMPORARY_PREFIX):
                shutil.rmtree(os.path.join(ckpts_dir, name), ignore_errors=True)


def sync_to_disk(folder: str) -> None:
    """fsync every file and folder under folder, so a power cut after the rename cannot lose their data."""
    for root, folders, files in os.walk(folder):
        for name in files:
            fsync_file(os.path.join(root, name))
        for name in folders:
            _fsync_folder(os.path.join(root, name))
    _fsync_folder(folder)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))  # Windows flushes only files opened for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    if os.name == "nt":  # Windows cannot open a folder to flush it; its renames are journalled
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:  # some network and FUSE file systems cannot flush a folder: nothing more to do
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


# =================================================================================================
# Free space
# =================================================================================================

class NotEnoughDiskSpace(Exception):
    """A save would not fit on its disk; nothing was written."""


def ensure_free_space(needs: dict[str, int], margin: float = 1.05) -> None:
    """Raise NotEnoughDiskSpace unless each disk has room for what `needs` ({folder: bytes}) puts on it.

    Folders on the same disk add up. A folder that does not exist yet is measured at its nearest parent.
    """
    by_disk: dict[int, tuple[str, int]] = {}
    for folder, size in needs.items():
        existing = os.path.abspath(folder)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        device = os.stat(existing).st_dev
        where, total = by_disk.get(device, (existing, 0))
        by_disk[device] = (where, total + size)
    for where, size in by_disk.values():
        free = free_bytes(where)
        if free < size * margin:
            raise NotEnoughDiskSpace(f"not enough free disk space to save a checkpoint in {where}: it needs about "
                                     f"{size * margin / 1e9:.2f} GB, {free / 1e9:.2f} GB are free. Nothing was "
                                     "written and the earlier checkpoints are untouched. Free some space (old runs "
                                     "in logdir, .safetensors files in save_ckpt_dir) or set save_ckpt_dir to "
                                     "another disk.")


def free_bytes(folder: str) -> int:
    return shutil.disk_usage(folder).free


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
    return (not name.startswith(INCOMPLETE_PREFIXES)
            and os.path.isfile(os.path.join(folder, CHECKPOINT_RECORD))
            and os.path.isfile(os.path.join(folder, "model_index.json")))


def find_last_checkpoint(logdir: str, containing: str | None = None) -> str:
    """The newest finished checkpoint under logdir, by the save time it records (not by file times);
    with `containing`, the newest that has that sub-folder (e.g. `ema`)."""
    newest: tuple[float, int, str] | None = None
    for folder, subfolders, _ in os.walk(logdir):
        subfolders[:] = [d for d in subfolders if not d.startswith(TEMPORARY_PREFIX)]
        if not is_finished_checkpoint(folder) or (containing and not os.path.isdir(os.path.join(folder, containing))):
            continue
        found = ordered_record(folder)
        if found is None:
            continue
        key = (*found[0], folder)
        if newest is None or key > newest:
            newest = key
    if newest is None:
        if containing:
            raise NoCheckpointFound(f"findlast found no finished checkpoint with {containing}/ under {logdir!r}: "
                                    "no earlier session saved EMA weights.")
        raise NoCheckpointFound(f"resume_ckpt: findlast found no finished checkpoint under {logdir!r}. Run the "
                                "first session of the chain (with a base model in resume_ckpt) first.")
    return newest[2]
