"""Validation loss in a run: fixed noise per image (the same model measures the same), the training loss,
logged under EveryDream2's tags at the scheduled steps."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from data.items import scan_dataset
from data.validation import build_validation_plan, parse_validation_settings
from utils.config import TrainConfig
from utils.model_family import SD1
from utils.models import SDModel, training_noise_scheduler
from utils.tiny_model import build_tiny_components
from utils.validation_loss import Validation

REPO = Path(__file__).resolve().parents[1]
IMAGES = str(REPO / "examples" / "images")


@pytest.fixture(scope="module")
def measured():
    """The tiny model and a validation plan over the bundled images (a held-out split and a stabilize set)."""
    model = SDModel(**build_tiny_components(), family=SD1, source="builtin:tiny")
    trainee = train.Trainee(model, model.unet, model.text_encoder, True, True,
                            training_noise_scheduler(model).alphas_cumprod)
    settings, _ = parse_validation_settings({"auto_split_proportion": 0.25, "stabilize_training_loss": True}, "v.json")
    plan = build_validation_plan(settings, scan_dataset(IMAGES, 256).items, resolution=256, batch_size=2,
                                 data_root=IMAGES)
    validation = Validation(plan, [4, 4], lambda captions: model.family.tokenize(model.tokenizer, captions))
    return trainee, validation


def test_the_same_model_measures_the_same_and_the_global_random_state_is_untouched(measured):
    trainee, validation = measured
    config, accelerator = TrainConfig(resume_ckpt="builtin:tiny"), Accelerator(cpu=True)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = validation.measure(trainee, config, accelerator)
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
    assert (before[2] == np.random.get_state()[1]).all()
    assert set(first) == {"loss/val", "loss/stabilize-train"} and all(v > 0 for v in first.values())
    assert validation.measure(trainee, config, accelerator) == first
    assert trainee.unet.training  # back in training mode


def test_relative_losses_stay_relative_to_the_first_values_after_a_resume(measured, tmp_path):
    """use_relative_loss logs each curve minus its first value. The first values are kept in the loop state,
    which each checkpoint saves: a resumed run's curve goes on from where it was, instead of starting at 0
    again (and early stopping compares the losses themselves, not the logged differences)."""
    import copy
    import dataclasses

    from utils.loop_state import LoopState

    _, validation = measured
    relative = copy.copy(validation)
    relative.plan = dataclasses.replace(validation.plan, settings=dataclasses.replace(validation.plan.settings,
                                                                                      use_relative_loss=True))
    state = LoopState()
    assert relative.logged({"loss/val": 0.5, "loss/other": 2.0}, state.first_validation_losses) == {
        "loss/val": 0.0, "loss/other": 0.0}
    assert relative.logged({"loss/val": 0.25, "loss/other": 2.5}, state.first_validation_losses) == {
        "loss/val": -0.25, "loss/other": 0.5}
    torch.save({"loop": state.to_dict()}, tmp_path / "resume_state.pt")  # as utils.training_state saves it
    resumed = LoopState(**torch.load(tmp_path / "resume_state.pt", weights_only=True)["loop"])
    assert relative.logged({"loss/val": 0.125, "loss/other": 2.0}, resumed.first_validation_losses) == {
        "loss/val": -0.375, "loss/other": 0.0}
    assert validation.logged({"loss/val": 0.125}, {}) == {"loss/val": 0.125}  # without use_relative_loss

    resumed.best_validation_loss = 0.125
    relative.adopt(resumed)  # a state that kept its first values: left as it is
    assert resumed.best_validation_loss == 0.125
    older = LoopState(best_validation_loss=-0.25, validations_without_improvement=2)  # saved before they were kept
    relative.adopt(older)
    assert (older.best_validation_loss, older.validations_without_improvement) == (None, 0)


def test_the_loss_type_and_min_snr_apply_as_in_training(measured):
    trainee, validation = measured
    accelerator = Accelerator(cpu=True)
    mse = validation.measure(trainee, TrainConfig(resume_ckpt="builtin:tiny"), accelerator)
    huber = validation.measure(trainee, TrainConfig(resume_ckpt="builtin:tiny", loss_type="huber"), accelerator)
    snr = validation.measure(trainee, TrainConfig(resume_ckpt="builtin:tiny", min_snr_gamma=1.0), accelerator)
    assert huber["loss/val"] != mse["loss/val"] and snr["loss/val"] != mse["loss/val"]


class OneOfTwoProcesses:
    """An accelerator as process `index` of two would see it, whose all-reduce keeps (and records) the
    process's own sums, so what each process measured can be compared."""

    num_processes = 2

    def __init__(self, index: int):
        self.one, self.process_index, self.sums = Accelerator(cpu=True), index, None

    def __getattr__(self, name):
        return getattr(self.one, name)

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        self.sums = tensor.tolist()
        return tensor


def test_two_processes_share_the_batches_out_and_their_sums_make_the_whole(measured):
    trainee, validation = measured
    config, alone = TrainConfig(resume_ckpt="builtin:tiny"), OneOfTwoProcesses(0)
    alone.num_processes = 1  # one process: measures everything, and no all-reduce
    whole = validation.share_sums(trainee, config, alone)
    processes = [OneOfTwoProcesses(index) for index in (0, 1)]
    for process in processes:
        validation.measure(trainee, config, process)
    counts = [sum(process.sums[1::2]) for process in processes]
    assert all(counts) and sum(counts) == sum(count for _, count in whole.values())  # both measured, no image twice
    for i, (total, count) in enumerate(whole.values()):
        shares = [process.sums[2 * i: 2 * i + 2] for process in processes]
        assert sum(share_count for _, share_count in shares) == count  # each image of the set exactly once
        assert sum(share_total for share_total, _ in shares) == pytest.approx(total, rel=1e-6)


def test_two_identical_runs_log_the_same_validation_losses_at_the_scheduled_steps(tmp_path):
    config = tmp_path / "validation.json"
    config.write_text(json.dumps({"auto_split_proportion": 0.25, "stabilize_training_loss": True,
                                  "every_n_epochs": 0.5}))
    curves = []
    for name in ("first", "second"):  # the second starts with the global random state the first left behind
        assert train.main(["--config", str(REPO / "train.json"), "--data_root", IMAGES, "--max_epochs", "1",
                           "--num_workers", "0", "--validation_config", str(config), "--logdir",
                           str(tmp_path / name), "--sample_prompts", "null", "--no_save_ckpt", "true"]) == 0
        (run_dir,) = (tmp_path / name).iterdir()
        events = EventAccumulator(str(run_dir))
        events.Reload()
        curves.append({tag: [(e.step, e.value) for e in events.Scalars(tag)]
                       for tag in ("loss/val", "loss/stabilize-train")})
    batches = 6  # the 9 images left after holding out 3, at batch size 2 in their buckets
    for values in curves[0].values():
        assert [step for step, _ in values] == [0, batches // 2, batches]  # before, mid-epoch, end
        assert len({value for _, value in values}) == 3  # the model changed between them
    assert curves[0] == curves[1]  # exactly: every image's noise, timestep and latent sample are fixed


def test_early_stopping_ends_the_run_with_its_final_save_when_validation_stops_improving(tmp_path):
    """At lr 1e-30 the weights cannot change in fp32, so the validation loss never falls below the baseline:
    two validations later, the run stops."""
    config = tmp_path / "validation.json"
    config.write_text(json.dumps({"auto_split_proportion": 0.25, "every_n_epochs": 0.5}))
    assert train.main(["--config", str(REPO / "train.json"), "--data_root", IMAGES, "--max_epochs", "3",
                       "--lr", "1e-30", "--num_workers", "0", "--validation_config", str(config),
                       "--early_stopping_patience", "2",
                       "--save_best_val", "true", "--logdir", str(tmp_path / "logs"), "--sample_prompts", "null",
                       "--no_save_ckpt", "true"]) == 0
    (run_dir,) = (tmp_path / "logs").iterdir()
    (final,) = (run_dir / "ckpts").iterdir()  # no best- one: nothing ever improved on the baseline
    assert final.name == "last-demo-ep01-gs00006"  # validations at 0, 3 and 6: stopped after the third
    assert "early stopping at step 6: loss/val has not improved" in (run_dir / "train.log").read_text()


def test_the_best_validation_checkpoint_is_kept_and_replaced(tmp_path):
    config = tmp_path / "validation.json"
    config.write_text(json.dumps({"auto_split_proportion": 0.25, "every_n_epochs": 0.5}))
    assert train.main(["--config", str(REPO / "train.json"), "--data_root", IMAGES, "--max_epochs", "1",
                       "--lr", "1e-3", "--num_workers", "0", "--validation_config", str(config), "--save_best_val",
                       "true", "--logdir", str(tmp_path / "logs"), "--sample_prompts", "null",
                       "--no_save_ckpt", "true"]) == 0
    (run_dir,) = (tmp_path / "logs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss/val")]
    best_step = min((value, step) for step, value in losses)[1]
    best = [p.name for p in (run_dir / "ckpts").iterdir() if p.name.startswith("best-")]
    if best_step == 0:
        assert best == []  # the untrained model was the best: nothing to keep beyond the base model
    else:
        assert best == [f"best-demo-ep00-gs{best_step:05d}"]  # saved as validated, before the epoch is counted
