"""utils/memory_advice.py: what an out-of-memory error tells the user to change, from the run's own settings."""

from __future__ import annotations

from pathlib import Path

import pytest

import train
from utils.memory_advice import memory_saving_changes, out_of_memory_advice

DEMO = ("--config", "train.json", "--dry_run", "true")  # the demo: batch 2 at 256 px, UNet and text encoder


@pytest.fixture(autouse=True)
def in_the_repo(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])


def suggested(*args: str) -> dict[str, str]:
    """"key: value, key: value" -> what it saves, for the demo with `args`."""
    return {str(change): change.saves for change in memory_saving_changes(train.plan_run([*DEMO, *args]))}


def test_the_demo_is_told_every_setting_it_does_not_use_the_largest_saving_first():
    assert list(suggested()) == ["gradient_checkpointing: true", "optimizer: adamw8bit",
                                 "batch_size: 1, grad_accum: 2", "disable_textenc_training: true"]


def test_settings_in_use_are_not_suggested_and_with_all_of_them_only_more_memory_helps():
    everything = ("--gradient_checkpointing", "--optimizer", "adamw8bit", "--batch_size", "1",
                  "--disable_textenc_training")
    assert suggested(*everything) == {}
    advice = out_of_memory_advice(train.plan_run([*DEMO, *everything]), "with 0 steps done, on cuda (11.6 GiB)")
    assert advice.splitlines()[0] == ("out of GPU memory with 0 steps done, on cuda (11.6 GiB), training the UNet "
                                      "on batches of 1 at 256 px.")
    assert "Every memory-saving setting is on already" in advice and "--force_resume" not in advice


@pytest.mark.parametrize("args, expected", [
    (("--batch_size", "4", "--grad_accum", "2"), "batch_size: 2, grad_accum: 4"),  # 8 images per update still
    (("--optimizer", "lion"), "optimizer: lion8bit"),
    (("--ema_decay_rate", "0.99", "--ema_device", "cuda"), "ema_device: cpu"),
    (("--mixed_precision", "no"), "mixed_precision: bf16"),
    (("--disable_amp", "true"), "disable_amp: false, mixed_precision: bf16"),  # disable_amp overrides the other
    (("--resolution", "512"), "resolution: 448"),
])
def test_each_setting_is_suggested_when_the_run_does_not_use_it(args, expected):
    assert expected in suggested(*args)


def test_what_each_setting_saves_is_said_and_a_setting_in_use_is_left_out():
    changes = suggested("--batch_size", "5", "--optimizer", "lion", "--ema_decay_rate", "0.99", "--ema_device", "cpu")
    assert changes["batch_size: 2, grad_accum: 2"] == "about the same images per update, in smaller batches"
    assert "3 bytes less per trained parameter" in changes["optimizer: lion8bit"]  # Lion keeps one state
    assert "ema_device: cpu" not in changes  # EMA on, and on the CPU already
    assert "mixed_precision: bf16" not in changes  # fp16, the default


def test_the_advice_says_which_changes_a_resumed_run_needs_force_resume_for():
    advice = out_of_memory_advice(train.plan_run([*DEMO, "--ema_decay_rate", "0.99", "--ema_device", "cuda"]),
                                  "with 3 steps done, on cuda (23.6 GiB)")
    assert "  - gradient_checkpointing: true: activations recomputed" in advice
    assert ("also needs --force_resume to change batch_size, disable_textenc_training, grad_accum, optimizer."
            in advice)  # not gradient_checkpointing or ema_device: those may change on resume


def test_with_several_processes_one_out_of_memory_while_loading_tells_every_process_what_to_change(monkeypatch):
    """What agree_to_start shares is the advice, so every process stops with it (one process alone: train()
    says it, as for any set-up step)."""
    from types import SimpleNamespace

    import torch

    import utils.processes

    def out_of_memory(plan, accelerator):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(train, "load_trainee", out_of_memory)
    monkeypatch.setattr(utils.processes, "gathered",  # process 0 loaded the model; this one, process 1, did not
                        lambda accelerator, values: [utils.processes.READY, *values])
    with pytest.raises(utils.processes.ProcessesPlannedDifferently) as stopped:
        train.load_together(train.plan_run(list(DEMO)), SimpleNamespace(num_processes=2, device=torch.device("cpu")))
    message = str(stopped.value)
    assert message.startswith("process(es) 1 could not start the run:\nout of GPU memory loading the model, on cpu")
    assert "  - gradient_checkpointing: true: " in message
