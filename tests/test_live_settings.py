"""load_settings_every_epoch: what a re-read config file changes, and what it must not."""

from __future__ import annotations

import json

from utils.config import load_config
from utils.live_settings import LiveSettings


def write(path, values: dict) -> None:
    path.write_text(json.dumps(values))


def test_live_keys_change_flags_stay_and_other_keys_wait_for_a_restart(tmp_path):
    (tmp_path / "images").mkdir()
    path = tmp_path / "train.json"
    base = {"resume_ckpt": "builtin:tiny", "data_root": str(tmp_path / "images"), "min_snr_gamma": 5.0, "lr": 1e-6}
    write(path, base)
    loaded = load_config(["--config", str(path), "--log_step", "7"])
    live = LiveSettings(loaded)
    current = loaded.config

    write(path, {**base, "min_snr_gamma": 1.0, "log_step": 50, "lr": 2e-6})
    current, changes, warnings = live.reload(current)
    assert current.min_snr_gamma == 1.0 and changes == ["min_snr_gamma: 5.0 -> 1.0"]
    assert current.log_step == 7  # given on the command line: EveryDream2 lost it here
    assert current.lr == 1e-6  # built into the schedule: reported, not applied
    assert len(warnings) == 1 and "lr changed" in warnings[0] and "started again" in warnings[0]

    current, changes, warnings = live.reload(current)  # nothing new: nothing said
    assert (changes, warnings) == ([], [])


def test_a_broken_or_invalid_file_is_reported_and_the_run_keeps_its_settings(tmp_path):
    (tmp_path / "images").mkdir()
    path = tmp_path / "train.json"
    base = {"resume_ckpt": "builtin:tiny", "data_root": str(tmp_path / "images")}
    write(path, base)
    loaded = load_config(["--config", str(path)])
    live = LiveSettings(loaded)

    path.write_text("{ not json")
    current, changes, warnings = live.reload(loaded.config)
    assert current == loaded.config and not changes
    assert "not applied" in warnings[0] and "not valid JSON" in warnings[0]

    write(path, {**base, "timestep_start": 900, "timestep_end": 100, "save_every_n_epochs": None})
    current, changes, warnings = live.reload(loaded.config)
    assert current == loaded.config and not changes
    assert "timestep_start" in warnings[0]

    write(path, {**base, "save_every_n_epochs": None, "zero_frequency_noise_ratio": 0.1})
    current, changes, _ = live.reload(loaded.config)  # null is a valid value, not EveryDream2's crash
    assert current.zero_frequency_noise_ratio == 0.1 and current.save_every_n_epochs is None
