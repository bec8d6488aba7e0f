"""`--resume_run`: which run and which of its checkpoints to continue, and whether the settings still fit.

Torch-free, like the rest of the plan: a refused resume is reported before any model loads.

A run folder's checkpoints are *resumable* when they carry the training state (`resume_state.pt` and
`optimizer.pt`): periodic saves and `interrupted-` ones do. A run is *finished* once its final save is in
place (its record says `final`). `--resume_run` takes:

- `last`: the newest unfinished run under logdir that has a resumable checkpoint;
- a run folder (or one of its checkpoints);
- `auto`: for chains, the newest run started from the same settings (the same session key); finished
  runs are skipped, unfinished ones continued, and a session never started (or killed before its first
  save) starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

from utils.checkpoint import (CHECKPOINT_RECORD, ERRORED_PREFIX, OPTIMIZER_STATE_FILE, RESUME_STATE_FILE,
                              TEMPORARY_PREFIX, DamagedCheckpoint, ordered_record, save_order,
                              verify_checkpoint)
from utils.config import (ConfigError, ConfigProblem, LoadedConfig, field_default, load_config, parse_cli,
                          to_json_dict)
from utils.run_folder import CONFIG_FILE, INFO_FILE

LAST, AUTO = "last", "auto"
DATASET_FILE = "dataset_fingerprint.json"  # in the run folder: data/fingerprint.py's record of the data at the start
RESUME_FILES = (RESUME_STATE_FILE, OPTIMIZER_STATE_FILE)

# Keys that may differ when a run is resumed: where things are written, how often, how it is shown, how
# fast it runs. Every other key changes what is trained, so a difference needs --force_resume.
CHANGEABLE_ON_RESUME = frozenset((
    # The weights come from the run's own checkpoint, whatever the model was started from:
    "resume_ckpt", "ema_resume_model", "single_file_config", "ckpt_cache_dir",
    "num_workers", "attn_type", "gradient_checkpointing", "ema_device",
    "write_schedule", "dry_run", "log_step", "logdir", "project_name", "run_name", "wandb",
    "save_ckpt_dir", "ckpt_every_n_minutes", "save_every_n_epochs", "save_ckpts_from_n_epochs",
    "save_full_precision", "no_save_ckpt", "no_prepend_last", "save_optimizer",
    "sample_prompts", "sample_steps", "ema_sample_nonema_model", "ema_sample_ema_model",
    "load_settings_every_epoch", "resume_run", "force_resume",
    # The same values, from a cache or computed (latent_cache_dir only says where the cache is):
    "latent_cache_dir", "cache_text_embeddings",
    # Plugins that only watch or log may come and go; one that transforms captions changes what is trained
    # (doc/PLUGINS.md says so):
    "plugins",
))


class ResumeError(Exception):
    """There is nothing to resume, or the run cannot be resumed as asked; the message says why."""


@dataclass(frozen=True)
class ResumeTarget:
    run_dir: str
    checkpoint: str  # the resumable checkpoint folder to continue from, its checksums verified
    record: dict  # its checkpoint.json
    damaged: tuple[str, ...] = ()  # newer checkpoints of the run passed over because they are damaged


@dataclass(frozen=True)
class FinishedRun:
    """`--resume_run auto` found this session's run already finished: there is nothing to do."""

    run_dir: str


def session_key(config: dict) -> str:
    """A digest of the settings a session was started with, to find its run again (`--resume_run auto`)."""
    given = {key: value for key, value in config.items() if key not in ("resume_run", "force_resume", "dry_run")}
    return hashlib.sha256(json.dumps(given, sort_keys=True).encode()).hexdigest()[:16]


class NothingToResume(Exception):
    """`--resume_run auto` found this session's run already finished (str(): its folder)."""


def load_settings(argv: list[str]) -> tuple[LoadedConfig, ResumeTarget | None]:
    """The config and, with resume_run (a flag, or a key of the config file), what it continues. Without
    --config, a resumed run runs with its own recorded settings (flags still override them).
    Raises ConfigError, NothingToResume."""
    config_file, flags, _ = parse_cli(argv)
    try:
        if config_file or not flags.get("resume_run"):
            loaded = load_config(argv)
            if not loaded.config.resume_run:
                return loaded, None
            project = loaded.config.project_name if loaded.origins["project_name"] != "default" else None
            target = find_resume_target(loaded.config.logdir, loaded.config.resume_run,
                                        session_key(to_json_dict(loaded.config)), project)
        else:
            target = find_resume_target(flags.get("logdir", field_default("logdir")), flags["resume_run"], "")
            # The weights come from the checkpoint: the model the run started from may be gone by now.
            loaded = load_config(["--config", os.path.join(target.run_dir, CONFIG_FILE),
                                  "--resume_ckpt", target.checkpoint, *argv])
    except ResumeError as error:
        raise ConfigError([ConfigProblem("resume_run", "command line", str(error))]) from None
    if isinstance(target, FinishedRun):
        raise NothingToResume(target.run_dir)
    return loaded, target


def resume_differences(target: ResumeTarget, config: dict, optimizer: dict, fingerprint: dict,
                       processes: int = 1) -> list[str]:
    """What would make the resumed run train differently from the run it continues: settings (the
    resolved config as a dict), the optimizer settings (optimizer_summary), the data (fingerprint) and the
    number of processes (each epoch's plan is split among them)."""
    from data.fingerprint import dataset_changes

    differences = settings_differences(read_run_config(target.run_dir), config)
    info = read_run_info(target.run_dir)
    if "optimizer" in info and info["optimizer"] != optimizer:
        differences.append("the optimizer settings (optimizer.json) changed")
    if info.get("processes", 1) != processes:
        differences.append(f"processes: {info.get('processes', 1)} -> {processes} (the epochs are split among them)")
    recorded = read_dataset_fingerprint(target.run_dir)
    changes = dataset_changes(recorded, fingerprint) if recorded is not None else None
    if changes:
        differences.append(f"the data changed since the run started: {changes}")
    return differences


def optimizer_summary(settings) -> dict:
    """The resolved optimizer settings of both groups (optimizer_config.OptimizerSettings), as JSON values."""
    return json.loads(json.dumps({"unet": dataclasses.asdict(settings.unet),
                                  "text encoder": dataclasses.asdict(settings.text_encoder)}))


def find_resume_target(logdir: str, spec: str, key: str, project: str | None = None
                       ) -> ResumeTarget | FinishedRun | None:
    """What `--resume_run spec` continues (`last` within `project` when given). None: `auto` found nothing
    to continue, so the run starts afresh."""
    if spec == AUTO:
        runs = [run for run in _run_folders(logdir)
                if _read_json(os.path.join(run, INFO_FILE)).get("session_key") == key]
        if not runs:
            return None
        newest = max(runs, key=_started_at)
        if is_finished_run(newest):
            return FinishedRun(newest)
        return _newest_resumable(newest)
    if spec == LAST:
        runs = [run for run in _run_folders(logdir)
                if project is None or os.path.basename(run).startswith(f"{project}-")]
        candidates = [target for run in runs if not is_finished_run(run) for target in [_newest_resumable(run)]
                      if target]
        if not candidates:
            raise ResumeError(f"--resume_run last: no unfinished run{f' of {project}' if project else ''} under "
                              f"{logdir!r} has a checkpoint to resume from (periodic saves and interrupted- saves "
                              "carry the training state; a run killed before its first save has none).")
        return max(candidates, key=lambda target: save_order(target.record))
    run_dir = _run_folder_of(spec)
    if is_finished_run(run_dir):
        raise ResumeError(f"--resume_run: {run_dir} finished; there is nothing to resume. To train it further, start "
                          "a new session from its last checkpoint (resume_ckpt: findlast).")
    if os.path.abspath(spec) == os.path.abspath(run_dir):
        target = _newest_resumable(run_dir)
    else:
        target = _resumable(spec)
        if target is not None:
            _verify(target)
    if target is None:
        raise ResumeError(f"--resume_run: {spec} holds no checkpoint with the training state (resume_state.pt and "
                          "optimizer.pt): the run stopped before its first periodic save, or that checkpoint is "
                          "not its newest (older ones keep no optimizer state) or is an errored- one.")
    return target


def is_finished_run(run_dir: str) -> bool:
    return any(_read_json(os.path.join(folder, CHECKPOINT_RECORD)).get("final") for folder in _checkpoints(run_dir))


def _run_folder_of(spec: str) -> str:
    """The run folder named by spec: the folder itself, or the run holding the checkpoint spec names."""
    folder = os.path.abspath(spec)
    if os.path.isfile(os.path.join(folder, CONFIG_FILE)) and os.path.isdir(os.path.join(folder, "ckpts")):
        return folder
    run_dir = os.path.dirname(os.path.dirname(folder))  # <run>/ckpts/<checkpoint>
    if os.path.basename(os.path.dirname(folder)) == "ckpts" and os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        return run_dir
    raise ResumeError(f"--resume_run: {spec!r} is not a run folder (one holding {CONFIG_FILE} and ckpts/) or a "
                      "checkpoint inside one. Use `last`, or a folder under logdir.")


def _run_folders(logdir: str) -> list[str]:
    if not os.path.isdir(logdir):
        return []
    folders = (os.path.join(logdir, name) for name in os.listdir(logdir))
    return [folder for folder in folders if os.path.isfile(os.path.join(folder, CONFIG_FILE))]


def _checkpoints(run_dir: str) -> list[str]:
    ckpts = os.path.join(run_dir, "ckpts")
    if not os.path.isdir(ckpts):
        return []
    return [os.path.join(ckpts, name) for name in sorted(os.listdir(ckpts))
            if not name.startswith((TEMPORARY_PREFIX, ERRORED_PREFIX)) and os.path.isdir(os.path.join(ckpts, name))]


def _resumable(folder: str) -> ResumeTarget | None:
    """A checkpoint that can be continued: complete, with its record and its training state."""
    if not all(os.path.isfile(os.path.join(folder, name)) for name in (*RESUME_FILES, "model_index.json")):
        return None
    found = ordered_record(folder)
    if found is None:
        return None
    return ResumeTarget(os.path.dirname(os.path.dirname(os.path.abspath(folder))), os.path.abspath(folder), found[1])


def _newest_resumable(run_dir: str) -> ResumeTarget | None:
    """The newest resumable checkpoint whose files match their checksums; newer damaged ones are listed.
    Raises ResumeError when every resumable checkpoint is damaged."""
    targets = sorted((target for target in map(_resumable, _checkpoints(run_dir)) if target),
                     key=lambda target: save_order(target.record), reverse=True)
    damaged = []
    for target in targets:
        try:
            _verify(target)
        except ResumeError as error:
            damaged.append(str(error))
            continue
        return dataclasses.replace(target, damaged=tuple(damaged))
    if damaged:
        raise ResumeError("every checkpoint of the run that could be resumed is damaged:\n" + "\n".join(damaged))
    return None


def _verify(target: ResumeTarget) -> None:
    try:
        verify_checkpoint(target.checkpoint)
    except DamagedCheckpoint as error:
        raise ResumeError(str(error)) from None


def _started_at(run_dir: str) -> float:
    return float(_read_json(os.path.join(run_dir, INFO_FILE)).get("started_at", os.path.getmtime(run_dir)))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def read_run_config(run_dir: str) -> dict:
    """The resolved settings the run was started with (its train_config.json). Raises ResumeError."""
    data = _read_json(os.path.join(run_dir, CONFIG_FILE))
    if not data:
        raise ResumeError(f"--resume_run: {os.path.join(run_dir, CONFIG_FILE)} is missing or damaged.")
    return data


def read_run_info(run_dir: str) -> dict:
    return _read_json(os.path.join(run_dir, INFO_FILE))


def read_dataset_fingerprint(run_dir: str) -> dict | None:
    """The data as the run saw it when it started; None for a run that did not record it."""
    return _read_json(os.path.join(run_dir, DATASET_FILE)) or None


def settings_differences(saved: dict, current: dict) -> list[str]:
    """`key: saved -> now` for each key whose change would change what the run trains."""
    keys = sorted((set(saved) | set(current)) - CHANGEABLE_ON_RESUME)
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in keys if saved.get(key) != current.get(key)]
