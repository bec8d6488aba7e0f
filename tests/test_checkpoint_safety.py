"""Crash safety: atomic saves, checksums, free-space checks, non-finite losses and weights, and which
checkpoints keep an optimizer state."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline

import train
import utils.checkpoint
from utils.checkpoint import (DamagedCheckpoint, NotEnoughDiskSpace, find_last_checkpoint, save_pipeline,
                              verify_checkpoint)
from utils.config import TrainConfig
from utils.loop_state import LoopState
from utils.model_family import SD1
from utils.models import ModelLoadError, SDModel, load_model
from utils.run_checkpoints import NonFiniteWeights, save_checkpoint
from utils.tiny_model import build_tiny_components

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline():
    return StableDiffusionPipeline(**build_tiny_components(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_intact(pipeline, tmp_path):
    ckpts = tmp_path / "logs" / "run" / "ckpts"
    good = save_pipeline(str(ckpts / "run-ep01-gs00010"), pipeline, {"global_step": 10}, {})

    def crash(folder):
        raise OSError("killed mid-save")

    with pytest.raises(OSError):
        save_pipeline(str(ckpts / "run-ep02-gs00020"), pipeline, {"global_step": 20}, {}, write_extra=crash)
    assert (ckpts / ".tmp-run-ep02-gs00020").is_dir() and not (ckpts / "run-ep02-gs00020").exists()
    assert find_last_checkpoint(str(tmp_path / "logs")) == good
    verify_checkpoint(good)
    save_pipeline(str(ckpts / "run-ep02-gs00020"), pipeline, {"global_step": 20}, {})  # the next save clears it
    assert not (ckpts / ".tmp-run-ep02-gs00020").exists()


def test_checksums_catch_a_changed_or_missing_weight_file(pipeline, tmp_path):
    folder = Path(save_pipeline(str(tmp_path / "ckpt"), pipeline, {"global_step": 1}, {}))
    record = json.loads((folder / "checkpoint.json").read_text())
    assert set(record["files"]) >= {"unet/diffusion_pytorch_model.safetensors",
                                    "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}
    verify_checkpoint(str(folder))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match="unet/diffusion_pytorch_model.safetensors: its contents differ"):
        verify_checkpoint(str(folder))
    with pytest.raises(ModelLoadError, match="is damaged"):
        load_model(str(folder))
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(DamagedCheckpoint, match="vae/diffusion_pytorch_model.safetensors: missing"):
        verify_checkpoint(str(folder))


# =================================================================================================
# save_checkpoint's checks, on a real (tiny) run's objects
# =================================================================================================

def make_run(tmp_path: Path, **settings) -> SimpleNamespace:
    model = SDModel(**build_tiny_components(), family=SD1, source="builtin:tiny")
    model.vae.requires_grad_(False)
    trainee = train.Trainee(model, model.unet, model.text_encoder, train_unet=True, train_text_encoder=True,
                            alphas_cumprod=None)
    optimizer = torch.optim.AdamW([p for m in (model.unet, model.text_encoder) for p in m.parameters()], lr=1e-4)
    optimizer.param_groups[0]["name"] = "unet"
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    optimizer.step()  # so it has moments to save
    config = TrainConfig(resume_ckpt="builtin:tiny", project_name="run", save_ckpt_dir=str(tmp_path / "single"),
                         **settings)
    return SimpleNamespace(plan=SimpleNamespace(config=config), trainee=trainee, optimizer=optimizer,
                           schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                           accelerator=Accelerator(cpu=True), run_dir=str(tmp_path / "run"),
                           state=LoopState(global_step=4, optimizer_step=4))


def test_a_save_that_does_not_fit_on_the_disk_writes_nothing(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    monkeypatch.setattr(utils.checkpoint, "free_bytes", lambda folder: 10_000_000)
    with pytest.raises(NotEnoughDiskSpace, match=r"needs about 0\.\d\d GB, 0\.01 GB are free"):
        save_checkpoint(run, "periodic")
    assert not (tmp_path / "run").exists() and not (tmp_path / "single").exists()


def test_nan_weights_are_never_saved(tmp_path):
    run = make_run(tmp_path)
    with torch.no_grad():
        run.trainee.model.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteWeights, match="unet weight conv_in.weight is NaN or infinite"):
        save_checkpoint(run, "periodic")
    assert not (tmp_path / "run").exists()


def test_after_an_error_every_process_found_the_others_wait_for_the_main_process_to_save(tmp_path, monkeypatch):
    """Divergence (NaN losses in a row) and NaN weights are found by every process at the same step. The others
    then wait until the main process has written its errored- checkpoint: a launcher ends every process as
    soon as one exits, which cut a large model's save short. An error that may have struck one process alone
    waits for no other."""
    import utils.run_checkpoints

    events = []

    def save(run, kind):
        events.append(f"saved {kind}")
        if run.plan.fail:
            raise OSError("the disk failed")

    monkeypatch.setattr(utils.run_checkpoints, "save_checkpoint", save)
    for together, fail in ((True, False), (True, True), (False, False)):
        events.clear()
        run = SimpleNamespace(plan=SimpleNamespace(fail=fail),
                              accelerator=SimpleNamespace(wait_for_everyone=lambda: events.append("waited")))
        train.save_after_error(run, together=together)
        assert events == (["saved errored", "waited"] if together else ["saved errored"])


def test_only_the_two_newest_checkpoints_keep_the_optimizer_state_unless_save_optimizer(tmp_path):
    run = make_run(tmp_path, no_save_ckpt=True)
    first = Path(save_checkpoint(run, "periodic"))
    assert (first / "optimizer.pt").is_file() and (first / "resume_state.pt").is_file()
    run.state.global_step = 8
    second = Path(save_checkpoint(run, "periodic"))
    run.state.global_step = 9
    third = Path(save_checkpoint(run, "interrupted"))
    assert third.name == "interrupted-run-ep00-gs00009"
    assert not (first / "optimizer.pt").exists()
    assert (second / "optimizer.pt").is_file() and (third / "optimizer.pt").is_file()
    verify_checkpoint(str(first))  # its record no longer lists the state it lost
    run.state.global_step = 10
    final = Path(save_checkpoint(run, "final"))
    assert final.name == "last-run-ep00-gs00010"
    assert not list(final.parent.glob("*/optimizer.pt"))

    kept = make_run(tmp_path / "kept", no_save_ckpt=True, save_optimizer=True)
    first = Path(save_checkpoint(kept, "periodic"))
    kept.state.global_step = 10
    final = Path(save_checkpoint(kept, "final"))
    assert (first / "optimizer.pt").is_file() and (final / "optimizer.pt").is_file()
    assert not (final / "resume_state.pt").exists()  # a finished run is not resumed


# =================================================================================================
# Non-finite losses, end to end
# =================================================================================================

def run_demo_with_nan_losses(tmp_path: Path, monkeypatch, nan_steps: set[int]) -> tuple[int, Path]:
    real_step = train.train_step

    def sometimes_nan(trainee, batch, config, global_step, accelerator):
        loss = real_step(trainee, batch, config, global_step, accelerator)
        return loss * float("nan") if global_step in nan_steps else loss

    monkeypatch.setattr(train, "train_step", sometimes_nan)
    return run_one_demo_epoch(tmp_path, monkeypatch)


def run_one_demo_epoch(tmp_path: Path, monkeypatch, num_workers: int = 0, extra: tuple[str, ...] = ()
                       ) -> tuple[int, Path]:
    """train.main on one epoch of the demo in this process, without samples or single files, with `extra`
    arguments: (exit code, run folder)."""
    monkeypatch.chdir(REPO)
    code = train.main(["--config", "train.json", "--max_epochs", "1", "--num_workers", str(num_workers), "--logdir",
                       str(tmp_path / "logs"), "--no_save_ckpt", "true", "--sample_prompts", "null", *extra])
    (run_dir,) = (tmp_path / "logs").iterdir()
    return code, run_dir


def test_a_nan_loss_skips_its_batch_and_training_goes_on(tmp_path, monkeypatch):
    code, run_dir = run_demo_with_nan_losses(tmp_path, monkeypatch, {2})
    assert code == 0
    (final,) = (run_dir / "ckpts").iterdir()
    record = json.loads((final / "checkpoint.json").read_text())
    assert record["nonfinite_batches"] == 1 and record["global_step"] == 7
    assert "step 3: the loss is nan, so this batch is skipped" in (run_dir / "train.log").read_text()


def test_nan_losses_in_a_row_stop_the_run_with_a_message(tmp_path, monkeypatch):
    code, run_dir = run_demo_with_nan_losses(tmp_path, monkeypatch, set(range(1, 100)))
    assert code == 1
    log = (run_dir / "train.log").read_text()
    assert "NaN or infinite for 5 batches in a row" in log and "Lower lr" in log
    (saved,) = (run_dir / "ckpts").iterdir()  # the weights never took a NaN step: kept for inspection
    assert saved.name.startswith("errored-")


def test_a_nan_gradient_from_a_finite_loss_skips_its_step_and_never_reaches_the_weights(tmp_path, monkeypatch):
    """Without fp16's grad scaler, and with neither clip_grad_norm nor log_grad_norm set, the gradient norm
    is still measured, so a NaN gradient skips its optimizer step instead of going into the weights (which
    the final save would then refuse)."""
    real_step, hooks = train.train_step, []

    def nan_gradient_at_step_3(trainee, batch, config, global_step, accelerator):
        while hooks:
            hooks.pop().remove()
        if global_step == 2:
            first_weight = next(trainee.unet.parameters())
            hooks.append(first_weight.register_hook(lambda gradient: gradient * float("nan")))
        return real_step(trainee, batch, config, global_step, accelerator)

    monkeypatch.setattr(train, "train_step", nan_gradient_at_step_3)
    code, run_dir = run_one_demo_epoch(tmp_path, monkeypatch)
    assert code == 0
    (final,) = (run_dir / "ckpts").iterdir()
    record = json.loads((final / "checkpoint.json").read_text())
    assert record["nonfinite_batches"] == 1 and record["global_step"] == 7 and record["optimizer_step"] == 6
    assert "step 3: the gradient norm is NaN or infinite" in (run_dir / "train.log").read_text()


def test_an_error_in_a_loading_worker_saves_the_weights_and_ends_the_workers(tmp_path, monkeypatch):
    """An exception raised in a data-loading worker (a bug, a disk gone) ends the run as any error does: exit
    code 1 and an errored- checkpoint. And the workers are stopped: they ignore SIGTERM, the signal Python's
    exit sends them, so a process that left them running waited for them for ever instead of exiting."""
    import itertools
    import multiprocessing

    from data.dataset import PlannedImages

    real_item, calls = PlannedImages.__getitem__, itertools.count(1)  # counted in the (forked) worker

    def third_item_fails(self, sample):
        if next(calls) == 3:
            raise OSError("injected: the disk went away")
        return real_item(self, sample)

    monkeypatch.setattr(PlannedImages, "__getitem__", third_item_fails)
    children_before = set(multiprocessing.active_children())
    code, run_dir = run_one_demo_epoch(tmp_path, monkeypatch, num_workers=1)
    assert code == 1
    assert "OSError: injected: the disk went away" in (run_dir / "train.log").read_text()
    (saved,) = (run_dir / "ckpts").iterdir()
    assert saved.name == "errored-demo-ep00-gs00001"
    assert set(multiprocessing.active_children()) <= children_before


def test_running_out_of_gpu_memory_says_which_settings_take_less_and_saves_the_weights(tmp_path, monkeypatch):
    """torch's out-of-memory error in a step (raised here on the CPU as CUDA raises it): no traceback, but the
    steps done, the device and what to change, taken from this run's settings; then an errored- checkpoint."""
    real_step = train.train_step

    def out_of_memory_in_step_3(trainee, batch, config, global_step, accelerator):
        if global_step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_step(trainee, batch, config, global_step, accelerator)

    monkeypatch.setattr(train, "train_step", out_of_memory_in_step_3)
    code, run_dir = run_one_demo_epoch(tmp_path, monkeypatch, extra=("--optimizer", "adamw8bit"))
    assert code == 1
    log = (run_dir / "train.log").read_text()
    advice = log.split("out of GPU memory with 2 steps done, on cpu, training the UNet and text encoder on batches "
                       "of 2 at 256 px.")[1]
    assert "  - gradient_checkpointing: true: " in advice and "  - batch_size: 1, grad_accum: 2: " in advice
    assert "optimizer:" not in advice  # 8-bit already
    assert "torch: CUDA out of memory. Tried to allocate 2.00 GiB (injected)" in advice
    assert "Traceback" not in log
    (saved,) = (run_dir / "ckpts").iterdir()
    assert saved.name.startswith("errored-") and json.loads((saved / "checkpoint.json").read_text())["global_step"] == 2


def test_running_out_of_gpu_memory_while_setting_up_says_what_to_change_and_exits_2(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(train, "prepare_optimizer", out_of_memory)
    code, run_dir = run_one_demo_epoch(tmp_path, monkeypatch)
    assert code == 2
    log = (run_dir / "train.log").read_text()
    assert "out of GPU memory while setting up, on cpu, training the UNet and text encoder" in log
    assert "  - gradient_checkpointing: true: " in log and "Traceback" not in log
    assert not (run_dir / "ckpts").exists() or not list((run_dir / "ckpts").iterdir())
