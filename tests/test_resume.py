"""`--resume_run`: a run killed (SIGKILL) or stopped (Ctrl-C) and then resumed ends bitwise identical to the
same run left alone, on CPU; what resuming refuses and reports.

The end-to-end runs train the tiny model on the bundled images with everything that carries state across
steps switched on: gradient accumulation, a warmup + cosine schedule, EMA, flips, caption dropout, a data
loader worker and the text encoder training. They save at the end of every optimizer step, so the kill
lands between two saves, or during one.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from utils.config import ConfigError
from utils.resume import NothingToResume

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"resume_ckpt": "builtin:tiny", "data_root": "examples/images", "project_name": "resume",
            "resolution": 256, "batch_size": 2, "grad_accum": 2, "max_epochs": 2, "lr": 1e-4,
            "lr_scheduler": "cosine", "lr_warmup_steps": 2, "seed": 7, "flip_p": 0.5, "cond_dropout": 0.1,
            "ema_decay_rate": 0.9, "ema_update_interval": 1, "log_step": 1, "num_workers": 1,
            "ckpt_every_n_minutes": 0.0001, "no_save_ckpt": True, "sample_prompts": None}
TOTAL_STEPS = 14  # 12 images in 7 batches per epoch, 2 epochs


def write_config(folder: Path, **changes) -> Path:
    path = folder / "resume.json"
    path.write_text(json.dumps({**SETTINGS, "logdir": str(folder / "logs"), **changes}))
    return path


def train_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def start_train(*args: str) -> subprocess.Popen:
    """train.py in its own process group, as a terminal runs it (Ctrl-C reaches the workers too)."""
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_checkpoints(logdir: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        done = [p for p in glob.glob(str(logdir / "*" / "ckpts" / "*")) if not os.path.basename(p).startswith(".tmp-")]
        if len(done) >= count:
            return
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoints appeared")


def run_folder(logdir: Path) -> Path:
    (folder,) = glob.glob(str(logdir / "*"))
    return Path(folder)


def final_checkpoint(logdir: Path) -> Path:
    (folder,) = glob.glob(str(logdir / "*" / "ckpts" / "last-*"))
    return Path(folder)


def weights(checkpoint: Path) -> dict:
    """Every tensor of every weight file of a checkpoint (model and EMA), by file and name."""
    found = {}
    for path in sorted(checkpoint.rglob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            found[f"{path.relative_to(checkpoint)}:{name}"] = tensor
    return found


def assert_bitwise_equal(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    differing = [name for name in reference if not bool((ours[name] == reference[name]).all())]
    assert not differing, f"{len(differing)} of {len(reference)} tensors differ, e.g. {differing[:3]}"


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars("loss/log_step")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run left alone, without the periodic saves: saving must not change what trains either."""
    folder = tmp_path_factory.mktemp("reference")
    result = train_py("--config", str(write_config(folder, ckpt_every_n_minutes=0)))
    assert result.returncode == 0, result.stdout + result.stderr
    return {"weights": weights(final_checkpoint(folder / "logs")), "losses": logged_losses(run_folder(folder / "logs"))}


def test_a_run_killed_after_a_periodic_save_resumes_to_the_same_weights(reference, tmp_path):
    config = write_config(tmp_path)
    process = start_train("--config", str(config))
    wait_for_checkpoints(tmp_path / "logs", 3, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    run_dir = run_folder(tmp_path / "logs")
    assert not list((run_dir / "ckpts").glob("last-*"))

    # No --config: the run's own recorded settings. The run continues in its folder.
    result = train_py("--resume_run", "last", "--logdir", str(tmp_path / "logs"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_folder(tmp_path / "logs") == run_dir
    assert_bitwise_equal(weights(final_checkpoint(tmp_path / "logs")), reference["weights"])
    # TensorBoard shows one curve: what the killed process logged after its last save was dropped.
    assert logged_losses(run_dir) == reference["losses"]
    assert [step for step, _ in reference["losses"]] == list(range(1, TOTAL_STEPS + 1))
    info = json.loads((run_dir / "run_info.json").read_text())
    assert len(info["resumed"]) == 1


def test_ctrl_c_saves_an_interrupted_checkpoint_that_resumes_to_the_same_weights(reference, tmp_path):
    config = write_config(tmp_path)
    process = start_train("--config", str(config))
    wait_for_checkpoints(tmp_path / "logs", 1, process)
    os.killpg(process.pid, signal.SIGINT)  # the whole group, as a terminal's Ctrl-C: the loader worker too
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 130, output
    (interrupted,) = (run_folder(tmp_path / "logs") / "ckpts").glob("interrupted-*")
    assert (interrupted / "resume_state.pt").is_file() and (interrupted / "optimizer.pt").is_file()
    assert "--resume_run" in output

    result = train_py("--config", str(config), "--resume_run", str(run_folder(tmp_path / "logs")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_bitwise_equal(weights(final_checkpoint(tmp_path / "logs")), reference["weights"])
    # Only the newest checkpoint keeps an optimizer state; a finished run keeps none (save_optimizer is off).
    assert not list((run_folder(tmp_path / "logs") / "ckpts").glob("*/optimizer.pt"))


# =================================================================================================
# What resuming refuses and reports (no training: the plan is checked before any model loads)
# =================================================================================================

def fake_run(tmp_path: Path, config: Path) -> Path:
    """A run folder as train.py leaves it after a periodic save, without training: start_run's records and
    one checkpoint with the training-state files (their contents are not read by the plan)."""
    plan = train.plan_run(["--config", str(config)])
    run_dir = Path(train.start_run(plan, type("Main", (), {"is_main_process": True})()))
    checkpoint = run_dir / "ckpts" / "resume-ep00-gs00004"
    checkpoint.mkdir(parents=True)
    for name in ("model_index.json", "resume_state.pt", "optimizer.pt"):
        (checkpoint / name).write_text("{}")
    (checkpoint / "checkpoint.json").write_text(json.dumps({"global_step": 4, "saved_at": time.time()}))
    return run_dir


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in (REPO / "examples" / "images").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_changed_settings_are_refused_with_the_list_unless_forced(tmp_path, images):
    run_dir = fake_run(tmp_path, write_config(tmp_path, data_root=str(images)))
    changed = write_config(tmp_path, data_root=str(images), lr=2e-4, batch_size=4, log_step=5, num_workers=0)
    with pytest.raises(ConfigError) as refused:
        train.plan_run(["--config", str(changed), "--resume_run", str(run_dir)])
    message = str(refused.value)
    assert "lr: 0.0001 -> 0.0002" in message and "batch_size: 2 -> 4" in message and "--force_resume" in message
    assert "log_step" not in message and "num_workers" not in message  # they do not change what is trained
    plan = train.plan_run(["--config", str(changed), "--resume_run", str(run_dir), "--force_resume", "true"])
    assert plan.resume.run_dir == str(run_dir) and plan.config.lr == 2e-4
    assert any("lr: 0.0001 -> 0.0002" in note for note in plan.loaded.notes)


def test_another_number_of_processes_is_refused_unless_forced(tmp_path, images, monkeypatch):
    config = write_config(tmp_path, data_root=str(images))
    run_dir = fake_run(tmp_path, config)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch --num_processes 2 sets it
    with pytest.raises(ConfigError, match=r"processes: 1 -> 2 \(the epochs are split among them\)"):
        train.plan_run(["--config", str(config), "--resume_run", str(run_dir)])
    plan = train.plan_run(["--config", str(config), "--resume_run", str(run_dir), "--force_resume", "true"])
    assert plan.data_options.processes == 2


def test_a_run_with_held_out_validation_images_resumes(tmp_path, images):
    """The data record covers every scanned image, the held-out ones too, as the resume check reads it."""
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"auto_split_proportion": 0.25}))
    config = write_config(tmp_path, data_root=str(images), validation_config=str(validation))
    run_dir = fake_run(tmp_path, config)
    plan = train.plan_run(["--config", str(config), "--resume_run", str(run_dir)])
    assert plan.resume.run_dir == str(run_dir) and plan.validation.held_out


def test_a_changed_dataset_is_reported_with_counts(tmp_path, images):
    fake_run(tmp_path, write_config(tmp_path, data_root=str(images)))
    names = sorted(p.name for p in images.iterdir() if p.suffix == ".png")
    (images / names[0]).unlink()
    (images / "new image.png").write_bytes((images / names[1]).read_bytes())
    os.utime(images / names[3], (1, 1))  # only its time changed (copied again, say): the same image
    (images / names[2]).write_bytes((images / names[4]).read_bytes())  # modified
    with pytest.raises(ConfigError) as refused:
        train.plan_run(["--config", str(write_config(tmp_path, data_root=str(images))), "--resume_run", "last"])
    # The modified image is also of another size, so it trains in another bucket: new settings too.
    assert "images: 1 added, 1 removed, 1 modified, 1 with another caption or settings\n" in str(refused.value)


def test_resume_run_auto_skips_a_finished_session_and_starts_an_unknown_one(tmp_path, images):
    config = write_config(tmp_path, data_root=str(images))
    plan = train.plan_run(["--config", str(config), "--resume_run", "auto"])
    assert plan.resume is None  # never started: a fresh run
    run_dir = fake_run(tmp_path, config)
    plan = train.plan_run(["--config", str(config), "--resume_run", "auto"])
    assert plan.resume.run_dir == str(run_dir)  # started and unfinished: continued
    final = run_dir / "ckpts" / "last-resume-ep02-gs00014"
    final.mkdir()
    (final / "checkpoint.json").write_text(json.dumps({"global_step": 14, "saved_at": time.time(), "final": True}))
    with pytest.raises(NothingToResume):
        train.plan_run(["--config", str(config), "--resume_run", "auto"])
    other = write_config(tmp_path, data_root=str(images), lr=3e-4)  # another session: not this run
    assert train.plan_run(["--config", str(other), "--resume_run", "auto"]).resume is None


def test_nothing_to_resume_is_a_clear_error(tmp_path, images):
    config = write_config(tmp_path, data_root=str(images))
    with pytest.raises(ConfigError, match="no unfinished run"):
        train.plan_run(["--config", str(config), "--resume_run", "last"])
    with pytest.raises(ConfigError, match="is not a run folder"):
        train.plan_run(["--config", str(config), "--resume_run", str(tmp_path)])


def test_resume_run_in_the_config_file_counts_like_the_flag(tmp_path, images):
    run_dir = fake_run(tmp_path, write_config(tmp_path, data_root=str(images)))
    plan = train.plan_run(["--config", str(write_config(tmp_path, data_root=str(images), resume_run="last"))])
    assert plan.resume.run_dir == str(run_dir)


def test_a_damaged_newest_checkpoint_is_passed_over_for_the_one_before(tmp_path, images):
    run_dir = fake_run(tmp_path, write_config(tmp_path, data_root=str(images)))
    newer = run_dir / "ckpts" / "resume-ep01-gs00008"
    newer.mkdir()
    for name in ("model_index.json", "resume_state.pt", "optimizer.pt"):
        (newer / name).write_text("{}")
    (newer / "checkpoint.json").write_text(json.dumps({"global_step": 8, "saved_at": time.time(),
                                                       "files": {"optimizer.pt": "0" * 64}}))
    plan = train.plan_run(["--config", str(write_config(tmp_path, data_root=str(images))), "--resume_run", "last"])
    assert plan.resume.checkpoint.endswith("resume-ep00-gs00004")
    assert any("passed over a damaged checkpoint" in note and "optimizer.pt" in note for note in plan.loaded.notes)


def test_the_newest_save_is_resumed_and_keeps_its_optimizer_state_though_an_older_one_has_a_higher_step(
        tmp_path, images):
    """--force_resume on more processes counts the steps anew, fewer of them ("step 10 is now 5"), and a run
    resumed from an older checkpoint goes on from its step: what they save is newer than the checkpoints with
    higher steps before it. The newest by save time is resumed, and keeps its optimizer state."""
    from utils.run_checkpoints import drop_older_optimizer_states

    run_dir = fake_run(tmp_path, write_config(tmp_path, data_root=str(images)))  # resume-ep00-gs00004, now
    before = run_dir / "ckpts" / "resume-ep01-gs00010"  # saved a minute earlier, before the recount
    before.mkdir()
    for name in ("model_index.json", "resume_state.pt", "optimizer.pt"):
        (before / name).write_text("{}")
    (before / "checkpoint.json").write_text(json.dumps({"global_step": 10, "saved_at": time.time() - 60}))
    for spec in ("last", "auto", str(run_dir)):
        plan = train.plan_run(["--config", str(write_config(tmp_path, data_root=str(images))), "--resume_run", spec])
        assert plan.resume.checkpoint.endswith("resume-ep00-gs00004"), spec
    drop_older_optimizer_states(str(run_dir / "ckpts"), keep=1)
    assert (run_dir / "ckpts" / "resume-ep00-gs00004" / "optimizer.pt").is_file()
    assert not (before / "optimizer.pt").exists()
    # The clock set back between two saves: the one just written keeps its state all the same.
    (before / "optimizer.pt").write_text("{}")
    drop_older_optimizer_states(str(run_dir / "ckpts"), keep=1, just_written=str(before))
    assert (before / "optimizer.pt").is_file()
    assert not (run_dir / "ckpts" / "resume-ep00-gs00004" / "optimizer.pt").exists()


def test_force_resume_applies_the_new_learning_rate_from_the_current_step(tmp_path):
    import torch

    from optimizer.optimizers import apply_group_settings, load_optimizer_state_exactly, save_optimizer_state

    def optimizer_and_schedule(lr):
        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([{"params": [weight], "name": "unet", "lr": lr}])
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))

    old, old_schedule = optimizer_and_schedule(1e-4)
    for _ in range(3):
        old.step()
        old_schedule.step()
    save_optimizer_state(old, str(tmp_path))
    new, new_schedule = optimizer_and_schedule(3e-4)
    load_optimizer_state_exactly(new, str(tmp_path))
    new_schedule.load_state_dict(old_schedule.state_dict())
    assert new.param_groups[0]["lr"] == old.param_groups[0]["lr"]  # the saved run's, as resumed exactly
    group = type("Group", (), {"optimizer_kwargs": lambda self: {"lr": 3e-4, "weight_decay": 0.01}})()
    apply_group_settings(new, new_schedule, type("Settings", (), {"unet": group, "text_encoder": group})())
    assert new.param_groups[0]["lr"] == pytest.approx(3e-4 / 4)  # the new lr at step 3 of the schedule
    new_schedule.step()
    assert new.param_groups[0]["lr"] == pytest.approx(3e-4 / 5)


def test_running_a_crashed_chain_again_finishes_it_without_redoing_sessions(tmp_path):
    """chain.sh as shipped, on copies of the chain configs cut to one epoch each of half the example images
    (session 1 saving after every step, so there is something to continue): kill it during session 1, run
    it again."""
    for name in ("train.py", "utils", "data", "optimizer"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "examples" / "images").mkdir(parents=True)
    for image in sorted(p for p in (REPO / "examples" / "images").iterdir() if p.suffix != ".txt")[::2]:
        for file in (image, image.with_suffix(".txt")):  # with its caption file, if it has one
            if file.exists():
                (tmp_path / "examples" / "images" / file.name).symlink_to(file)
    (tmp_path / "chain.sh").write_text((REPO / "chain.sh").read_text())
    for index in range(3):
        settings = json.loads((REPO / f"chain{index}.json").read_text())
        settings.update(max_epochs=1, num_workers=0, no_save_ckpt=True)
        if index == 1:
            settings.update(ckpt_every_n_minutes=0.0001)
        (tmp_path / f"chain{index}.json").write_text(json.dumps(settings))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # this environment's
    (tmp_path / "bin" / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}

    chain = subprocess.Popen(["bash", "chain.sh"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while not glob.glob(str(tmp_path / "logs" / "chain_ch1-*" / "ckpts" / "chain_ch1-*")):
        assert chain.poll() is None and time.monotonic() < deadline, chain.stdout.read()
        time.sleep(0.05)
    os.killpg(chain.pid, signal.SIGKILL)
    chain.wait()
    assert not glob.glob(str(tmp_path / "logs" / "chain_ch2-*"))

    again = subprocess.run(["bash", "chain.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    runs = sorted(path.name.split("-")[0] for path in (tmp_path / "logs").iterdir())
    assert runs == ["chain_ch0", "chain_ch1", "chain_ch2"]  # one run folder per session: nothing redone
    assert "already finished" in again.stdout
    (session1,) = (tmp_path / "logs").glob("chain_ch1-*")
    assert len(json.loads((session1 / "run_info.json").read_text())["resumed"]) == 1
    (final1,) = (session1 / "ckpts").glob("last-*")
    (session2,) = (tmp_path / "logs").glob("chain_ch2-*")
    assert tmp_path / json.loads((session2 / "train_config.json").read_text())["resume_ckpt"] == final1


def test_a_run_resumes_without_its_config_even_when_its_base_model_is_gone(tmp_path, images):
    base = tmp_path / "base_model"  # stands for the previous session's checkpoint, deleted since
    base.mkdir()
    run_dir = fake_run(tmp_path, write_config(tmp_path, data_root=str(images), resume_ckpt=str(base)))
    base.rmdir()
    plan = train.plan_run(["--resume_run", str(run_dir), "--dry_run", "true"])
    assert plan.resume.run_dir == str(run_dir) and plan.model_source == plan.resume.checkpoint
    before = sorted(p.name for p in run_dir.rglob("*"))
    assert train.dry_run(plan) == 0
    assert sorted(p.name for p in run_dir.rglob("*")) == before and len(list((tmp_path / "logs").iterdir())) == 1
