"""`load_settings_every_epoch`: the config file re-read at each epoch start, for the keys that can change live.

Torch-free. Fixes EveryDream2's version, which re-applied the whole file over the command line (so a flag
given there was lost) and crashed on a null value it had filled in at start-up:

- flags given on the command line keep their values;
- the new file is checked like the first one; a file that does not parse or holds a bad value is reported
  and the run goes on with its current settings;
- only the keys below change; a change to any other key is reported once as needing a restart;
- each change is printed with its old and new value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from utils.config import ConfigError, LoadedConfig, TrainConfig, merge, read_json_config

# The keys the loop reads at every step or save, as in EveryDream2 (which also lists them as live); the
# learning rate, optimizer, data and batch settings are built into the schedule and the plan at start-up.
LIVE_KEYS = (
    "zero_frequency_noise_ratio", "pyramid_noise_discount", "min_snr_gamma", "loss_type", "timestep_start",
    "timestep_end", "embedding_perturbation", "clip_skip", "log_step", "save_every_n_epochs",
    "ckpt_every_n_minutes", "save_ckpts_from_n_epochs",
)


@dataclass
class LiveSettings:
    """The config file as last read, and the keys fixed by the command line."""

    loaded: LoadedConfig
    baseline: TrainConfig = None  # the file (and flags) as last read, before start-up filled in any value
    restart_reported: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.baseline = self.baseline or self.loaded.config

    def reload(self, current: TrainConfig) -> tuple[TrainConfig, list[str], list[str]]:
        """(the config to go on with, the changes applied as "key: old -> new", warnings)."""
        path = self.loaded.config_file
        flags = {key for key, origin in self.loaded.origins.items() if origin == "command line"}
        try:
            fresh = merge(read_json_config(path), path, {key: getattr(self.baseline, key) for key in flags}).config
        except ConfigError as error:
            return current, [], [f"load_settings_every_epoch: {path} was not applied, the run goes on with its "
                                 f"current settings:\n{error}"]
        changes, warnings, updates = [], [], {}
        for f in dataclasses.fields(TrainConfig):
            key, before, after = f.name, getattr(self.baseline, f.name), getattr(fresh, f.name)
            if before == after:
                continue
            if key in LIVE_KEYS:
                updates[key] = after
                changes.append(f"{key}: {getattr(current, key)!r} -> {after!r}")
            elif key not in self.restart_reported:
                self.restart_reported.add(key)
                warnings.append(f"load_settings_every_epoch: {key} changed in {path} ({before!r} -> {after!r}) but "
                                "cannot change during a run; it applies when the run is started again")
        self.baseline = dataclasses.replace(self.baseline, **updates)
        return dataclasses.replace(current, **updates), changes, warnings
