"""End to end: `python train.py --config train.json` on the tiny model and the bundled images.

Each run writes only under a temporary folder (logdir and save_ckpt_dir point there).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
BATCHES_PER_EPOCH = 7  # the 12 bundled images in 5 buckets (4+4+2+1+1) at batch size 2
LOG_STEP = 2


NO_SAMPLES = ("--sample_prompts", "null")  # sampling takes longer than training the tiny model


def run_train(*args: str, cwd: Path = REPO, samples: bool = False, in_process: bool = False
              ) -> subprocess.CompletedProcess:
    """python train.py ARGS; in_process: train.main(ARGS) in this process, which saves the 5-7 s a new process
    spends importing torch, diffusers and transformers (conftest.py sets MKL_CBWR as train.main would)."""
    argv = [*args, *(() if samples else NO_SAMPLES)]
    if in_process:
        import train

        out, err = io.StringIO(), io.StringIO()
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train.main(argv)
        result = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    else:
        result = subprocess.run([sys.executable, "train.py", *argv], cwd=cwd, capture_output=True, text=True,
                                timeout=900)
    assert result.returncode == 0, f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def demo_run(out: Path, *extra: str, samples: bool = False, in_process: bool = False) -> dict:
    """The demo config for EPOCHS epochs; returns the paths of its outputs."""
    result = run_train("--config", "train.json", "--max_epochs", str(EPOCHS), "--log_step", str(LOG_STEP),
                       "--logdir", str(out / "logs"), "--save_ckpt_dir", str(out / "single"), *extra, samples=samples,
                       in_process=in_process)
    (run_dir,) = glob.glob(str(out / "logs" / "*"))
    return {"run_dir": Path(run_dir), "single": out / "single", "output": result.stdout + result.stderr}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two demo runs that differ only in the number of data-loader workers (automatic vs none) and in how
    often they sample (at the end only vs every 3 steps), to check the outputs and that neither changes
    what is trained."""
    root = tmp_path_factory.mktemp("demo")
    # One denoising step: what is checked is which pictures are drawn when, and where they go; each step of
    # each picture is a UNet pass over the prompt and, with guidance, the empty prompt (the demo's 3 prompts
    # x 3 CFGs x 30 steps take 40 s here).
    quick = root / "quick_samples.json"
    quick.write_text(json.dumps({"num_inference_steps": 1, "cfgs": [7, 1], "samples": [{"prompt": "a red circle"}]}))
    demo_prompts = root / "demo_prompts.json"  # the demo's prompts and EveryDream2's default 3 CFG panels
    demo_prompts.write_text(json.dumps({"num_inference_steps": 1, "samples": [
        {"prompt": line} for line in (REPO / "sample_prompts.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")]}))
    return (demo_run(root / "a", "--sample_prompts", str(demo_prompts), samples=True, in_process=True),
            demo_run(root / "b", "--num_workers", "0", "--sample_prompts", str(quick), "--sample_steps", "3",
                     samples=True, in_process=True))


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def final_checkpoint(run_dir: Path) -> Path:
    (folder,) = (run_dir / "ckpts").iterdir()
    return folder


def final_checkpoint_named(run_dir: Path, prefix: str) -> Path:
    (folder,) = [p for p in (run_dir / "ckpts").iterdir() if p.name.startswith(prefix)]
    return folder


def test_run_folder_has_events_log_and_resolved_config(runs):
    run_dir = runs[0]["run_dir"]
    assert re.fullmatch(r"demo-\d{8}-\d{6}", run_dir.name)
    assert glob.glob(str(run_dir / "events.out.tfevents.*"))
    log = (run_dir / "train.log").read_text()
    assert f"epoch {EPOCHS}/{EPOCHS}" in log and "done:" in log and "saved" in log
    config = json.loads((run_dir / "train_config.json").read_text())
    assert config["resume_ckpt"] == "builtin:tiny" and config["resolution"] == 256 and config["max_epochs"] == EPOCHS
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["origins"]["max_epochs"] == "command line" and info["config_file"] == "train.json"
    assert any(line.startswith("unet: lr_decay_steps =") for line in info["derived"])
    assert any(line.startswith("mixed precision = no (CPU trains in fp32)") for line in info["derived"])


def test_the_run_folder_config_runs_the_same_settings_again(runs):
    from utils.config import load_config, to_json_dict

    path = runs[0]["run_dir"] / "train_config.json"
    again = load_config(["--config", str(path)])
    assert not again.notes
    assert to_json_dict(again.config) == json.loads(path.read_text())


def test_tensorboard_shows_loss_and_learning_rates(runs):
    run_dir = runs[0]["run_dir"]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/log_step", "loss/epoch", "hyperparameter/lr unet", "hyperparameter/lr text encoder",
            "performance/images per second", "performance/minutes per epoch"} <= tags
    total = EPOCHS * BATCHES_PER_EPOCH
    assert [step for step, _ in scalars(run_dir, "loss/log_step")] == list(range(LOG_STEP, total + 1, LOG_STEP))
    assert all(value == pytest.approx(1e-4) for _, value in scalars(run_dir, "hyperparameter/lr unet"))
    assert [step for step, _ in scalars(run_dir, "loss/epoch")] == [BATCHES_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config as text


def test_final_checkpoint_is_a_complete_diffusers_pipeline_that_generates(runs):
    folder = final_checkpoint(runs[0]["run_dir"])
    total = EPOCHS * BATCHES_PER_EPOCH
    assert folder.name == f"last-demo-ep{EPOCHS:02d}-gs{total:05d}"
    record = json.loads((folder / "checkpoint.json").read_text())
    assert (record["global_step"], record["epoch"], record["optimizer_step"]) == (total, EPOCHS, total)
    assert (record["batch_in_epoch"], record["last_save_step"]) == (0, total)  # between epochs; saved now
    assert 0 < record["elapsed_seconds"] < 600 and record["family"] == "sd1"
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    image = pipeline("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                     output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)


def test_single_file_holds_the_same_weights_in_the_original_sd_layout(runs):
    folder = final_checkpoint(runs[0]["run_dir"])
    path = runs[0]["single"] / f"{folder.name}.safetensors"
    with safe_open(str(path), "pt") as handle:
        assert "model.diffusion_model.input_blocks.0.0.weight" in handle.keys()
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16  # fp16 by default
    trained = StableDiffusionPipeline.from_pretrained(folder)
    reloaded = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        expected, actual = getattr(trained, name).state_dict(), getattr(reloaded, name).state_dict()
        for key in expected:  # the fp16 file holds the trained fp32 weights rounded to fp16
            assert torch.equal(actual[key].half(), expected[key].half()), (name, key)


def test_training_changed_the_weights_and_lowered_the_loss(runs):
    from utils.tiny_model import build_tiny_components

    folder = final_checkpoint(runs[0]["run_dir"])
    before = build_tiny_components()["unet"].state_dict()
    after = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    epoch_losses = [value for _, value in scalars(runs[0]["run_dir"], "loss/epoch")]
    assert epoch_losses[-1] < epoch_losses[0]


def test_the_same_config_gives_the_same_loss_curve_and_weights_whatever_the_workers_and_samples(runs):
    first, second = (run["run_dir"] for run in runs)
    assert scalars(first, "loss/log_step") == scalars(second, "loss/log_step")
    a = load_file(str(final_checkpoint(first) / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(final_checkpoint(second) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_samples_are_drawn_at_the_end_and_every_sample_steps_into_files_and_tensorboard(runs):
    demo_prompts = [line for line in (REPO / "sample_prompts.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    total = EPOCHS * BATCHES_PER_EPOCH
    expected = ((demo_prompts, 3, [total]), (["a red circle"], 2, list(range(3, total + 1, 3)) + [total]))
    for run, (prompts, cfgs, steps) in zip(runs, expected):
        pictures = sorted((run["run_dir"] / "samples").glob("*.jpg"))
        assert len(pictures) == len(prompts) * len(steps)
        assert {int(p.name[2:7]) for p in pictures} == set(steps)
        with Image.open(pictures[0]) as image:
            assert image.size == (cfgs * 256, 256)  # one 256 px panel per CFG value
        assert prompts[0] in (pictures[0].with_suffix(".txt")).read_text()
        events = EventAccumulator(str(run["run_dir"]), size_guidance={"images": 0})
        events.Reload()
        tags = events.Tags()["images"]
        assert len(tags) == len(prompts) and all(tag.startswith("samples/") for tag in tags)
        assert [event.step for event in events.Images(tags[0])] == steps


def test_warm_start_from_a_checkpoint_folder_with_a_frozen_text_encoder(runs, tmp_path):
    """A diffusers folder loads as resume_ckpt; a frozen text encoder is saved untouched; grad_accum groups."""
    start = final_checkpoint(runs[0]["run_dir"])
    run = demo_run(tmp_path, "--resume_ckpt", str(start), "--disable_textenc_training", "--grad_accum", "2",
                   "--max_epochs", "1", "--project_name", "warm", in_process=True)
    assert "training: UNet\n" in run["output"]
    assert f"model: {start}" in run["output"]
    folder = final_checkpoint(run["run_dir"])
    record = json.loads((folder / "checkpoint.json").read_text())
    assert record["global_step"] == BATCHES_PER_EPOCH
    assert record["optimizer_step"] == math.ceil(BATCHES_PER_EPOCH / 2)  # the epoch's last group is short
    te_before = load_file(str(start / "text_encoder" / "model.safetensors"))
    te_after = load_file(str(folder / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(te_before[k], te_after[k]) for k in te_before)
    unet_before = load_file(str(start / "unet" / "diffusion_pytorch_model.safetensors"))
    unet_after = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    assert not [p for p in os.listdir(folder.parent) if p.startswith(".tmp-")]


def test_findlast_continues_from_the_newest_checkpoint(runs, tmp_path):
    logdir = runs[1]["run_dir"].parent
    result = run_train("--config", "train.json", "--resume_ckpt", "findlast", "--logdir", str(logdir),
                       "--max_epochs", "1", "--save_ckpt_dir", str(tmp_path), "--no_save_ckpt",
                       "--project_name", "chained", in_process=True)
    newest = final_checkpoint(runs[1]["run_dir"])
    output = result.stdout + result.stderr
    assert f"resume_ckpt = {newest} (findlast" in output and f"model: {newest}:" in output
    assert not list(tmp_path.iterdir())  # no_save_ckpt: no single file


def optimizer_file(folder: Path) -> Path:
    """An optimizer.json that logs grad norms and trains only the text encoder's last two layers."""
    path = folder / "optimizer.json"
    path.write_text(json.dumps({"base": {"optimizer": "adamw8bit", "lr": 1e-4}, "log_grad_norm": True,
                                "text_encoder_freezing": {"unfreeze_last_n_layers": 2}}))
    return path


def test_training_options_run_together(tmp_path):
    """Code paths the demo does not take: checkpointing, clip_skip, sliced attention, clipping, a cosine
    schedule with warmup, flips, 8-bit AdamW, a random seed, fp32 single files, a periodic save every epoch,
    and every noise and loss option."""
    run = demo_run(tmp_path, "--max_epochs", "2", "--save_every_n_epochs", "1", "--gradient_checkpointing",
                   "--clip_skip", "2", "--attn_type", "slice", "--clip_grad_norm", "1", "--lr_scheduler", "cosine",
                   "--lr_warmup_steps", "2", "--flip_p", "0.5", "--optimizer", "adamw8bit",
                   "--seed", "-1", "--save_full_precision", "--log_step", "1", "--pyramid_noise_discount", "0.1",
                   "--min_snr_gamma", "5", "--loss_type", "mse_huber", "--embedding_perturbation", "0.1",
                   "--enable_zero_terminal_snr", "--optimizer_config", str(optimizer_file(tmp_path)), in_process=True)
    assert "no effect" not in run["output"]
    assert "text encoder frozen parts: layers 1-10 of 12, embeddings" in run["output"]
    for tag in ("optimizer/unet_grad_norm", "optimizer/te_grad_norm"):  # logged, and clipping saw real norms
        norms = [value for _, value in scalars(run["run_dir"], tag)]
        assert len(norms) == 2 * BATCHES_PER_EPOCH and all(value > 0 and math.isfinite(value) for value in norms)
    losses = [value for _, value in scalars(run["run_dir"], "loss/log_step")]
    assert all(math.isfinite(value) for value in losses)
    scheduler = json.loads((final_checkpoint_named(run["run_dir"], "last-") / "scheduler" /
                            "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["rescale_betas_zero_snr"]
    assert "seed = " in run["output"] and "(random, from seed: -1)" in run["output"]
    lrs = [value for _, value in scalars(run["run_dir"], "hyperparameter/lr unet")]
    assert lrs[0] < lrs[1] and lrs[1] > lrs[-1]  # warmup, then cosine decay
    saves = sorted(p.name for p in (run["run_dir"] / "ckpts").iterdir())
    assert saves == [f"demo-ep01-gs{BATCHES_PER_EPOCH:05d}", f"last-demo-ep02-gs{2 * BATCHES_PER_EPOCH:05d}"]
    for name in saves:
        with safe_open(str(run["single"] / f"{name}.safetensors"), "pt") as handle:
            assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float32


def test_an_image_that_breaks_after_the_scan_is_skipped_and_reported(tmp_path):
    """The header reads at scan time, the pixels do not: that image is left out, named, and training goes on."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(REPO / "examples" / "images", images)
    whole = (images / "sunset.jpg").read_bytes()
    (images / "broken sunset.jpg").write_bytes(whole[: len(whole) // 3])  # a truncated JPEG: the header is intact
    run = demo_run(tmp_path, "--data_root", str(images), "--max_epochs", "1", "--no_save_ckpt", in_process=True)
    assert "skipped" in run["output"] and "broken sunset.jpg" in run["output"]
    assert "1 image(s) skipped" in run["output"]
    listed = (run["run_dir"] / "skipped_images.txt").read_text()
    assert "broken sunset.jpg" in listed and "cannot be read" in listed
    assert final_checkpoint(run["run_dir"]).name.startswith("last-demo-ep01-")


def test_an_sd2_v_prediction_model_trains_and_exports_end_to_end(tmp_path):
    """Family detection, the v-prediction target and the OpenCLIP single-file layout in a real run."""
    from tests.tiny_variants import save_sd2_like_folder
    from utils.tiny_model import build_tiny_components

    base = tmp_path / "sd2-base"
    save_sd2_like_folder(build_tiny_components(), str(base))
    run = demo_run(tmp_path, "--resume_ckpt", str(base), "--max_epochs", "1", "--clip_skip", "2", in_process=True)
    assert "SD 2.x, v_prediction prediction" in run["output"]
    folder = final_checkpoint(run["run_dir"])
    assert json.loads((folder / "checkpoint.json").read_text())["family"] == "sd2"
    path = run["single"] / f"{folder.name}.safetensors"
    with safe_open(str(path), "pt") as handle:
        assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" in handle.keys()
    reloaded = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
    assert reloaded.scheduler.config.prediction_type == "v_prediction"


MIXED_PRECISION_RUN = """
import sys, train
from accelerate import Accelerator
plan = train.plan_run(sys.argv[1:])
accelerator = Accelerator(mixed_precision="bf16", cpu=True)  # the autocast paths of a GPU run, on the CPU
sys.exit(train.train(plan, accelerator, train.start_run(plan, accelerator)))
"""


def test_mixed_precision_trains_and_saves_frozen_weights_exactly(tmp_path):
    """Under bf16 autocast the trained UNet changes, and the frozen text encoder and VAE are saved bit for bit
    as loaded, in fp32 (never rounded copies). One step, on two images: bf16 on this CPU takes 8 s a step."""
    import shutil

    from utils.tiny_model import build_tiny_components

    images = tmp_path / "images"
    images.mkdir()
    for name in ("checker.png", "checker.txt", "a red circle on a blue background.png"):  # one 256x256 batch
        shutil.copyfile(REPO / "examples" / "images" / name, images / name)
    result = subprocess.run([sys.executable, "-c", MIXED_PRECISION_RUN, "--config", "train.json", "--max_epochs", "1",
                             "--data_root", str(images), "--disable_textenc_training", "--logdir",
                             str(tmp_path / "logs"), "--no_save_ckpt", *NO_SAMPLES],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = (tmp_path / "logs").iterdir()
    folder = final_checkpoint(run_dir)
    base = build_tiny_components()
    for part, file in (("text_encoder", "model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")):
        saved, loaded = load_file(str(folder / part / file)), base[part].state_dict()
        saved = {k.removeprefix("text_model."): v for k, v in saved.items()}  # saved under the original names
        assert saved.keys() == loaded.keys(), part
        assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], loaded[k]) for k in saved), part
    unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(unet[k], v) for k, v in base["unet"].state_dict().items())


def test_dry_run_reports_the_data_and_writes_the_schedule_without_loading_a_model(tmp_path):
    result = run_train("--config", "train.json", "--dry_run", "--write_schedule", "--logdir", str(tmp_path / "logs"),
                       in_process=True)
    output = result.stdout + result.stderr
    assert "Dataset report: examples/images" in output and "images found: 12, used: 12, skipped: 0" in output
    assert "dry run: the config and the data are usable" in output
    assert "model:" not in output  # the summary line printed once the model is loaded
    (run_dir,) = (tmp_path / "logs").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["dataset_report.txt", "ep0_batch_schedule.txt",
                                                         "run_info.json", "train_config.json"]
    lines = [json.loads(line) for line in (run_dir / "ep0_batch_schedule.txt").read_text().splitlines()]
    assert len(lines) == 12 and {line["step"] for line in lines} == set(range(1, BATCHES_PER_EPOCH + 1))


def test_a_dry_run_under_a_launcher_reports_once(tmp_path, monkeypatch):
    """accelerate launch --num_processes N ... --dry_run: the process of rank 0 reports, the others exit."""
    monkeypatch.setenv("RANK", "1")
    result = run_train("--config", "train.json", "--dry_run", "--logdir", str(tmp_path / "logs"), in_process=True)
    assert "Dataset report" not in result.stdout + result.stderr and not (tmp_path / "logs").exists()


def test_everydream2_data_conventions_train_end_to_end(tmp_path):
    """Folder files, a YAML sidecar, a manifest, an undersized image and write_schedule in one real run: the
    schedule's captions are what trained, the multiplied epoch sets the step count, the records are written."""
    import shutil

    from PIL import Image

    images = tmp_path / "images"
    shutil.copytree(REPO / "examples" / "images", images / "base")
    (images / "extra").mkdir()
    Image.new("RGB", (100, 100), (10, 200, 30)).save(images / "extra" / "small green square.png")  # undersized
    (images / "extra" / "multiply.txt").write_text("3")
    (images / "extra" / "global.yaml").write_text("tags: [flat colour]\nloss_scale: 0.5\n")
    manifest_dir = tmp_path / "manifest"
    manifest_dir.mkdir()
    (manifest_dir / "list.json").write_text(json.dumps([
        {"image": "../images/base/checker.png", "main_prompt": "checkerboard from the manifest",
         "tags": [{"tag": "heavy", "weight": 3}, "light"]}]))
    config = json.loads((REPO / "train.json").read_text())
    config.update(data_root=[str(images), str(manifest_dir / "list.json")], cond_dropout=0.0, max_epochs=2,
                  write_schedule=True, no_save_ckpt=True, logdir=str(tmp_path / "logs"), log_step=1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run_train("--config", str(tmp_path / "config.json"), in_process=True)
    (run_dir,) = (tmp_path / "logs").iterdir()
    report = (run_dir / "dataset_report.txt").read_text()
    assert "images found: 14, used: 14" in report and "images per epoch after multipliers: 16" in report
    assert "small green square.png" in (run_dir / "undersized_images.txt").read_text()
    schedules = [[json.loads(line) for line in (run_dir / f"ep{e}_batch_schedule.txt").read_text().splitlines()]
                 for e in range(2)]
    for lines in schedules:
        assert len(lines) == 16
        small = [line for line in lines if line["path"].endswith("small green square.png")]
        assert [line["caption"] for line in small] == ["small green square, flat colour"] * 3
        assert {line["loss_scale"] for line in small} == {0.5}
        assert "checkerboard from the manifest, heavy, light" in [line["caption"] for line in lines]
    steps = [step for step, _ in scalars(run_dir, "loss/log_step")]
    total = sum(len({line["step"] for line in lines}) for lines in schedules)
    assert steps == list(range(1, total + 1))
    assert "done:" in result.stdout + result.stderr


def test_ema_and_optimizer_state_are_saved_in_the_checkpoint_and_resumed_by_the_next_session(tmp_path):
    """Session 1 keeps an EMA and saves it in the checkpoint (ema/) and as <name>_ema.safetensors, and the
    optimizer state (save_optimizer); session 2 continues from the newest checkpoint, its EMA (EveryDream2
    loaded the non-EMA model instead) and its optimizer moments."""
    from diffusers import UNet2DConditionModel

    first = demo_run(tmp_path / "one", "--max_epochs", "1", "--ema_decay_rate", "0.5", "--ema_update_interval", "2",
                     "--save_optimizer", in_process=True)
    checkpoint = final_checkpoint(first["run_dir"])
    assert (checkpoint / "ema" / "unet").is_dir() and (checkpoint / "ema" / "text_encoder").is_dir()
    assert (checkpoint / "optimizer.pt").is_file()
    assert (first["single"] / f"{checkpoint.name}_ema.safetensors").is_file()
    averaged = UNet2DConditionModel.from_pretrained(checkpoint / "ema", subfolder="unet").state_dict()
    trained = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet").state_dict()
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained)
    ema_file = load_file(str(first["single"] / f"{checkpoint.name}_ema.safetensors"))
    plain_file = load_file(str(first["single"] / f"{checkpoint.name}.safetensors"))
    assert ema_file.keys() == plain_file.keys()
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(ema_file[key], averaged["conv_out.weight"].half())
    second = run_train("--config", "train.json", "--max_epochs", "1", "--logdir", str(tmp_path / "one" / "logs"),
                       "--resume_ckpt", "findlast", "--ema_decay_rate", "0.5", "--ema_resume_model", "findlast",
                       "--no_save_ckpt", in_process=True)
    output = second.stdout + second.stderr
    assert f"ema_resume_model = {checkpoint}" in output
    assert f"starting from {checkpoint} (unet: " in output and "text encoder: " in output
    assert f"optimizer state restored from {checkpoint / 'optimizer.pt'}" in output  # save_optimizer
