"""utils/memory_advice.py: what an out-of-memory error tells the user to change, from the run's own settings."""

from __future__ import annotations

import pytest

import train
from utils.memory_advice import memory_saving_changes, out_of_memory_advice

DEMO = ("--config", "train.json", "--dry_run", "true")  # the demo: batch 2 at 256 px, UNet and text encoder


def settings_suggested(*args: str) -> list[str]:
    return [setting for setting, _ in memory_saving_changes(train.plan_run([*DEMO, *args]))]


@pytest.fixture(autouse=True)
def in_the_repo(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])


def test_the_demo_is_told_every_setting_it_does_not_use_the_largest_saving_first():
    assert settings_suggested() == ["gradient_checkpointing: true", "optimizer: adamw8bit",
                                    "batch_size: 1 with grad_accum: 2", "disable_textenc_training: true",
                                    "attn_type: slice"]


def test_settings_in_use_are_not_suggested_and_with_all_of_them_only_more_memory_helps():
    everything = ("--gradient_checkpointing", "--optimizer", "adamw8bit", "--batch_size", "1",
                  "--disable_textenc_training", "--attn_type", "slice")
    assert settings_suggested(*everything) == []
    advice = out_of_memory_advice(train.plan_run([*DEMO, *everything]), "in step 1, on cuda:0 (11.6 GiB)")
    assert advice.splitlines()[0] == ("out of GPU memory in step 1, on cuda:0 (11.6 GiB), training the UNet on "
                                      "batches of 1 at 256 px.")
    assert "Every memory-saving setting is on already" in advice


@pytest.mark.parametrize("args, expected", [
    (("--batch_size", "4", "--grad_accum", "2"), "batch_size: 2 with grad_accum: 4"),  # 8 images per update still
    (("--optimizer", "lion"), "optimizer: lion8bit"),
    (("--ema_decay_rate", "0.99", "--ema_device", "cuda"), "ema_device: cpu"),
    (("--mixed_precision", "no",), "mixed_precision: bf16"),
    (("--resolution", "512",), "resolution: 448"),
])
def test_each_setting_is_suggested_when_the_run_does_not_use_it(args, expected):
    assert expected in settings_suggested(*args)


def test_what_each_setting_saves_is_said():
    changes = dict(memory_saving_changes(train.plan_run([*DEMO, "--batch_size", "5", "--optimizer", "lion"])))
    assert changes["batch_size: 2 with grad_accum: 2"] == "about the same images per update, in smaller batches"
    assert "3 bytes less per trained parameter" in changes["optimizer: lion8bit"]  # Lion keeps one state
    assert "ema_device: cpu" not in changes  # EMA off; and on the CPU by default when on
