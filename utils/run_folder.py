"""The run folder, `<logdir>/<project_name>-<YYYYmmdd-HHMMSS>/`, and the logging that writes into it."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings

from tqdm import tqdm

LOG_FILE = "train.log"
CONFIG_FILE = "train_config.json"  # the resolved settings: `python train.py --config` it to run them again
INFO_FILE = "run_info.json"  # where the settings came from: derived values, origins, notes
SKIPPED_FILE = "skipped_images.txt"
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"

log = logging.getLogger(__name__)


def create_run_folder(logdir: str, project_name: str, now: float | None = None) -> str:
    """A new, empty run folder; a second run in the same second gets a `-2` suffix."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = os.path.join(logdir, f"{project_name}-{stamp}")
    for attempt in range(1, 100):
        folder = base if attempt == 1 else f"{base}-{attempt}"
        try:
            os.makedirs(folder)
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder next to {base}")


class _TqdmHandler(logging.StreamHandler):
    """Console logging that does not tear through progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # pragma: no cover - as logging.Handler does
            self.handleError(record)


def setup_logging(run_dir: str | None, process_index: int = 0) -> None:
    """Console (and `train.log` in the run folder, when given) at INFO level; processes other than the main
    one of a multi-GPU run report warnings and errors only, each line marked `[process N]`.

    Libraries' own progress bars and chatter are turned down: the trainer reports what matters.
    """
    root = logging.getLogger()
    root.setLevel(logging.WARNING if process_index else logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()  # an earlier run's train.log, when runs follow each other in one process
    console = _TqdmHandler()
    prefix = f"[process {process_index}] " if process_index else ""
    console.setFormatter(logging.Formatter(prefix + "%(message)s"))
    root.addHandler(console)
    if run_dir:
        to_file = logging.FileHandler(os.path.join(run_dir, LOG_FILE), encoding="utf-8")
        to_file.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(to_file)
    quiet_libraries()


def quiet_libraries() -> None:
    """Silence library progress bars and warnings that say nothing about the user's run."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("bitsandbytes", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def write_json(path: str, data: dict) -> None:
    """Pretty JSON, written under a temporary name and renamed, so a reader never sees half a file."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(temporary, path)


def write_run_settings(run_dir: str, config: dict, info: dict) -> None:
    """The resolved config (a valid --config file) and, beside it, how it was arrived at."""
    write_json(os.path.join(run_dir, CONFIG_FILE), config)
    write_json(os.path.join(run_dir, INFO_FILE), info)


class SkipReport:
    """Images left out of training, each listed once in skipped_images.txt.

    Those skipped by the scan are already in the dataset report; images that fail later (deleted or
    damaged while training) are also logged as they happen. A resumed run adds to the run's list.
    """

    def __init__(self, run_dir: str | None, scanned: list):
        self.path = os.path.join(run_dir, SKIPPED_FILE) if run_dir else None  # None: not the main process
        self.seen: set[str] = set()
        self.unshared: list[tuple[str, str]] = []  # skipped by this process since take_unshared
        if self.path and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as handle:
                self.seen.update(line.split("\t", 1)[0] for line in handle if line.strip())
        self.record([(entry.path, entry.reason) for entry in scanned])

    def add(self, entries: list[tuple[str, str]]) -> None:
        """Images this process could not load: logged, listed, and kept for take_unshared."""
        for path, reason in self.record(entries):
            log.warning("skipped %s: %s", path, reason)
            self.unshared.append((path, reason))

    @property
    def has_unshared(self) -> bool:
        """Whether add() found images since the last take_unshared."""
        return bool(self.unshared)

    def take_unshared(self) -> list[tuple[str, str]]:
        """What add() found since the last call, for the main process to list (each process loads its share)."""
        entries, self.unshared = self.unshared, []
        return entries

    def record(self, entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Write the entries not seen before to the file; return them."""
        new = []
        for path, reason in entries:
            if path not in self.seen:
                self.seen.add(path)
                new.append((path, reason))
        if new and self.path:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.writelines(f"{path}\t{reason}\n" for path, reason in new)
        return new

    def summary(self) -> str:
        return f"; {len(self.seen)} image(s) skipped, listed in {SKIPPED_FILE}" if self.seen else ""
