"""Plugins: loading with clear errors, the hooks' order and arguments in a real run, the data hooks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.plugins import DataTransforms, PluginError, PluginRunner, load_plugins


def test_plugins_load_by_module_and_class():
    (example,) = load_plugins(["plugins.example_plugin.ExampleLoggingPlugin"])
    assert type(example).__name__ == "ExampleLoggingPlugin"


@pytest.mark.parametrize("name, message", [
    ("NoModule", "as module.Class"),
    ("no_such_module.Plugin", "cannot import no_such_module: ModuleNotFoundError"),
    ("plugins.example_plugin.Missing", "has no class Missing"),
    ("utils.plugins.PluginError", "defines none of the hooks"),
])
def test_a_plugin_that_cannot_load_is_named_with_the_reason(name, message):
    with pytest.raises(PluginError, match=message) as error:
        load_plugins([name])
    assert repr(name) in str(error.value)


class Slow:
    def on_step_end(self, **kwargs):
        import time

        time.sleep(0.6)


def test_a_slow_hook_is_reported_once(caplog):
    runner = PluginRunner([Slow()])
    runner.run("on_step_end", global_step=1)
    runner.run("on_step_end", global_step=2)
    runner.run("on_epoch_end", epoch=0)  # not defined: skipped
    assert [r.message for r in caplog.records].count(
        next(r.message for r in caplog.records if "Slow" in r.message)) == 1
    assert "on_step_end took" in caplog.records[0].message


class Upper:
    def transform_caption(self, caption):
        return caption.upper()

    def transform_pil_image(self, image):
        return image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)


class Shrinks:
    def transform_pil_image(self, image):
        return image.resize((8, 8))


def test_data_hooks_apply_in_order_and_are_checked():
    transforms = DataTransforms([Upper(), Upper()])
    assert transforms.caption("a cat") == "A CAT"
    pixels = np.arange(4 * 2 * 3, dtype=np.uint8).reshape(4, 2, 3)
    assert np.array_equal(transforms.pixels(pixels), pixels)  # flipped twice
    with pytest.raises(PluginError, match="Shrinks.transform_pil_image must return .* size"):
        DataTransforms([Shrinks()]).pixels(pixels)
    assert DataTransforms([]).pixels(pixels) is pixels


# --- end to end: plugins, load_settings_every_epoch and wandb in one run of train.py -------------------------

def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline wandb run file: a LevelDB-style log (32 KiB blocks of records with a
    7-byte header: crc32c, length, type) after wandb's 7-byte file header, each record a protobuf Record."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, position, pending, rows = run_file.read_bytes(), 7, b"", []
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_plugins_live_settings_and_wandb_in_a_real_run(tmp_path):
    import shutil
    import subprocess
    import sys

    from tests.test_train_e2e import BATCHES_PER_EPOCH, REPO, scalars

    config = tmp_path / "train.json"
    shutil.copy(REPO / "train.json", config)
    record = tmp_path / "hooks.jsonl"
    env = {**os.environ, "RECORDING_PLUGIN_FILE": str(record), "RECORDING_PLUGIN_EDIT_CONFIG": str(config),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(
        [sys.executable, "train.py", "--config", str(config), "--max_epochs", "2", "--log_step", "2",
         "--logdir", str(tmp_path / "logs"), "--no_save_ckpt", "true", "--sample_prompts", "null",
         "--plugins", "tests.recording_plugin.RecordingPlugin", "--load_settings_every_epoch", "--wandb"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    (run_dir,) = (tmp_path / "logs").iterdir()

    calls = [json.loads(line) for line in record.read_text().splitlines()]
    hooks = [call["hook"] for call in calls]
    steps = ["on_step_start", "on_step_end"] * BATCHES_PER_EPOCH
    assert hooks == ["on_training_start", "on_epoch_start", *steps, "on_epoch_end", "on_epoch_start", *steps,
                     "on_epoch_end", "on_training_end"]
    assert calls[0] == {"hook": "on_training_start", "log_folder": str(run_dir), "project_name": "demo"}
    assert calls[1] == {"hook": "on_epoch_start", "epoch": 0, "global_step": 0, "epoch_length": BATCHES_PER_EPOCH}
    starts = [call for call in calls if call["hook"] == "on_step_start"]
    ends = [call for call in calls if call["hook"] == "on_step_end"]
    assert [call["global_step"] for call in starts] == list(range(2 * BATCHES_PER_EPOCH))
    assert [call["global_step"] for call in ends] == list(range(1, 2 * BATCHES_PER_EPOCH + 1))
    assert all(call["has_optimizer"] and call["pixels_max"] == -1.0 for call in starts)  # images blacked out
    captions = [caption for call in starts for caption in call["captions"]]
    assert all(caption.endswith(", plugged") for caption in captions if caption)
    assert all(isinstance(call["loss"], float) for call in ends)

    # The plugin edited the config after epoch 0: the live key applied at epoch 1, the other one waits.
    assert "settings changed in" in output and "min_snr_gamma: None -> 1.5" in output
    assert "lr changed" in output and "started again" in output
    recorded = json.loads((run_dir / "train_config.json").read_text())
    assert recorded["min_snr_gamma"] == 1.5 and recorded["lr"] == 1e-4

    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert wandb_file.name == f"run-{run_dir.name}.wandb"  # the run folder names the wandb run
    logged = [(row["_step"], row["loss/log_step"]) for row in wandb_history(wandb_file) if "loss/log_step" in row]
    expected = scalars(run_dir, "loss/log_step")
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)
