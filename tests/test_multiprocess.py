"""Several processes (accelerate launch, gloo on CPU): the epoch plan is split, not repeated, and only the
main process writes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import types
from collections import Counter
from pathlib import Path

import psutil  # accelerate's dependency
import pytest

from data.items import ImageItem, scan_dataset
from data.plan import PlanOptions, batch_positions, batches_per_epoch, plan_epoch, process_share
from tests.test_train_e2e import run_train, scalars
from utils.latent_cache import fill_latent_cache

REPO = Path(__file__).resolve().parents[1]


def items(buckets: list[tuple[int, int]]) -> list[ImageItem]:
    return [ImageItem(path=f"img{i}.jpg", size=(w, h), bucket=(w, h), main_prompt=f"caption {i}")
            for i, (w, h) in enumerate(buckets)]


def test_the_processes_share_each_epoch_once_in_lockstep():
    images = items([(512, 512)] * 9 + [(576, 448)] * 5 + [(448, 576)] * 3)
    for processes, grad_accum in ((2, 1), (3, 2), (4, 1)):
        options = PlanOptions(seed=7, batch_size=2, grad_accum=grad_accum, processes=processes, max_epochs=3)
        for epoch in range(3):
            planned = plan_epoch(images, epoch, options)
            shares = [process_share(planned, process, options) for process in range(processes)]
            assert len({len(share) for share in shares}) == 1  # every process steps at the same batches
            assert len(shares[0]) == batches_per_epoch(images, options)[epoch]
            trained = [sample for share in shares for batch in share for sample in batch if not sample.stand_in]
            assert Counter(s.index for s in trained) == Counter(range(len(images)))  # each image once
            for batch in (batch for share in shares for batch in share):
                assert len({sample.bucket for sample in batch}) == 1
                assert len({sample.stand_in for sample in batch}) == 1
            for batch, (process, position) in zip(planned, batch_positions(len(planned), options), strict=True):
                assert shares[process][position] == batch  # where the batch schedule file says it trains


def test_one_process_trains_the_whole_plan():
    images = items([(512, 512)] * 5)
    options = PlanOptions(seed=7, batch_size=2)
    planned = plan_epoch(images, 0, options)
    assert process_share(planned, 0, options) is planned


def launch_two(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """accelerate launch with two processes on the CPU (gloo). A launch that hangs is ended whole when the
    timeout passes: the launcher, its training processes and their loader workers (killing the launcher alone
    left the others running, and slowing every test after)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as launch:
        try:
            stdout, stderr = launch.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_tree(launch.pid)
            stdout, stderr = launch.communicate()
            pytest.fail(f"the launch ran past {timeout} s:\n{stdout}{stderr}")
    return subprocess.CompletedProcess(command, launch.returncode, stdout, stderr)


def end_tree(pid: int) -> None:
    """Kill a launcher and whatever is left of its training processes and their loader workers. The launcher
    starts each training process in a session of its own: the tree, not a process group."""
    with contextlib.suppress(psutil.NoSuchProcess):  # it may have ended already
        tree = psutil.Process(pid)
        for process in [*tree.children(recursive=True), tree]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def launch_as_two_machines(*args: str, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Two launches of one process each, as on two machines (--num_machines 2), each launcher knowing only its
    own process: when one process ends, nothing ends the other, as on a real cluster."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    launches = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--machine_rank",
         str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "--mixed_precision", "no", "--dynamo_backend", "no", *args], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    deadline = time.monotonic() + timeout
    try:
        outputs = [launch.communicate(timeout=max(1.0, deadline - time.monotonic())) for launch in launches]
    except subprocess.TimeoutExpired:
        for launch in launches:
            end_tree(launch.pid)
        outputs = [launch.communicate() for launch in launches]
        pytest.fail(f"the launches ran past {timeout} s:\n" + "\n".join(out + err for out, err in outputs))
    return [subprocess.CompletedProcess(launch.args, launch.returncode, out, err)
            for launch, (out, err) in zip(launches, outputs)]


def test_two_processes_train_the_demo_once_per_epoch_and_write_one_run(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on the CPU (gloo), the text encoder training: one run
    folder, one set of checkpoints, every image loaded once per epoch across the two processes, and a NaN
    loss on process 1 skipped without the other waiting for ever, and counted in the main process's log, as
    an image process 1 could not load is listed in the main process's skipped_images.txt. With seed: -1 both
    train the main process's draw. With cache_latents the two encode the images between them, keyed as the
    main process read the files (process 1 reads one as replaced), and a later one-process run of the same
    data and seed reuses every entry. The two measure the validation loss between them, and the untrained
    model's value is the one-process run's."""
    log = tmp_path / "captions"
    validation = tmp_path / "validation.json"  # every training image in the stabilize set, none held out
    validation.write_text(json.dumps({"validate_training": False, "stabilize_training_loss": True,
                                      "stabilize_split_proportion": 1.0}))
    env = {**os.environ, "CAPTION_LOG_FILE": str(log), "NAN_AT_STEP": "1", "NAN_PROCESS": "1",
           "SKIPPED_IMAGE_ON_PROCESS": "1", "REPLACED_IMAGE_ON_PROCESS": "1"}
    settings = ("--config", "train.json", "--cond_dropout", "0", "--log_step", "1", "--no_save_ckpt", "true",
                "--sample_prompts", "null", "--cache_latents", "--latent_cache_dir", str(tmp_path / "latents"),
                "--validation_config", str(validation))
    result = launch_two("tests/nan_injection.py", *settings, "--max_epochs", "2", "--logdir", str(tmp_path / "logs"),
                        "--plugins", "tests.recording_plugin.CaptionLog", "--seed", "-1", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "effective batch: 4 images per optimizer step (batch_size 2 x grad_accum 1 x 2 processes)" in output
    assert "12 image variants encoded, 0 reused" in output  # the demo's 12 images, no flips, shared out
    assert "step 2: the loss is nan, so this batch is skipped" in output
    assert "broadcast_buffers" not in output  # torch's deprecation warning, which says nothing to the user

    (run_dir,) = (tmp_path / "logs").iterdir()
    # 7 batches per epoch in runs of 2: each process trains 4 per epoch (one stand-in at the end), so 8 steps.
    assert [p.name for p in (run_dir / "ckpts").iterdir()] == ["last-demo-ep02-gs00008"]
    losses = scalars(run_dir, "loss/log_step")
    assert [step for step, _ in losses] == list(range(1, 9)) and all(math.isfinite(v) for _, v in losses)
    assert scalars(run_dir, "loss/nonfinite batches skipped")[-1] == (8, 1.0)
    listed = (run_dir / "skipped_images.txt").read_text()
    assert listed == "injected/unreadable.jpg\tcannot be read: injected on process 1\n"
    per_process = [Counter((log.parent / f"{log.name}.{rank}").read_text().splitlines()) for rank in (0, 1)]
    assert all(per_process)  # both processes loaded images
    demo = scan_dataset(str(REPO / "examples" / "images"), 256).items
    once = Counter(item.caption for item in demo)
    assert per_process[0] + per_process[1] == once + once  # the 12 demo images, once in each of the 2 epochs

    seed = json.loads((run_dir / "train_config.json").read_text())["seed"]  # the main process's draw
    again = run_train(*settings, "--seed", str(seed), "--cache_text_embeddings", "--disable_textenc_training",
                      "--max_epochs", "1", "--logdir", str(tmp_path / "again"), samples=True, in_process=True)
    assert "0 image variants encoded, 12 reused" in again.stdout + again.stderr
    (one_process_run,) = (tmp_path / "again").iterdir()
    two, one = scalars(run_dir, "loss/stabilize-train"), scalars(one_process_run, "loss/stabilize-train")
    assert [step for step, _ in two] == [0, 4, 8] and [step for step, _ in one] == [0, 7]
    assert two[0][1] == pytest.approx(one[0][1], rel=1e-6)


def test_an_error_on_one_process_ends_the_run_with_its_saves_intact_and_the_same_launch_resumes(tmp_path):
    """Process 1 raises at step 6. Process 0 learns of it from gloo (the connection closed) and keeps the
    weights at the error (errored-); the launcher ends the run. The periodic save of epoch 1 (step 4) is
    intact, and the same launch with --resume_run continues from it to the end. One process continues it
    too with --force_resume, its steps counted anew for one process. An image process 1 could not load at
    step 5 is in the main process's skipped_images.txt, though the epoch never ended."""
    settings = ("--config", "train.json", "--max_epochs", "2", "--save_every_n_epochs", "1", "--no_save_ckpt",
                "true", "--sample_prompts", "null", "--log_step", "2", "--num_workers", "0", "--logdir",
                str(tmp_path / "logs"))
    failed = launch_two("tests/error_injection.py", *settings, env={
        **os.environ, "ERROR_AT_STEP": "6", "SKIPPED_IMAGE_ON_PROCESS": "1", "SKIPPED_IMAGE_AT_BATCH": "5"})
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0, output
    assert "[process 1] training failed with 6 steps done" in output
    assert "RuntimeError: injected failure at step 6" in output
    (run_dir,) = (tmp_path / "logs").iterdir()
    assert sorted(p.name for p in (run_dir / "ckpts").iterdir()) == ["demo-ep01-gs00004", "errored-demo-ep01-gs00006"]
    listed = (run_dir / "skipped_images.txt").read_text()
    assert listed == "injected/unreadable.jpg\tcannot be read: injected on process 1\n", output

    one_process = tmp_path / "one_process"  # a copy of the run, continued by one process with --force_resume
    shutil.copytree(run_dir, one_process)
    forced = run_train("--resume_run", str(one_process), "--force_resume", "true", samples=True, in_process=True)
    assert "step 4 is now 7" in forced.stdout + forced.stderr  # 7 batches an epoch for one process
    assert sorted(p.name for p in (one_process / "ckpts").iterdir()) == [  # each save once, the last at the end
        "demo-ep01-gs00004", "errored-demo-ep01-gs00006", "last-demo-ep02-gs00014"]

    resumed = launch_two("train.py", "--resume_run", str(run_dir), env=dict(os.environ))
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output
    assert "demo-ep01-gs00004" in output  # where it continued from
    checkpoints = sorted(p.name for p in (run_dir / "ckpts").iterdir())
    assert "last-demo-ep02-gs00008" in checkpoints and not any(name.startswith(".tmp-") for name in checkpoints)
    losses = scalars(run_dir, "loss/log_step")
    assert [step for step, _ in losses] == [2, 4, 6, 8]  # one curve over both sessions


def test_a_stop_that_reaches_one_process_waits_for_the_main_process_to_save(tmp_path):
    """SIGTERM to process 1 alone: both stop at the same step, and process 1 leaves only once the main
    process has written the interrupted- checkpoint (the launcher would end the main process, mid-save, as
    soon as process 1 exits). The run resumes from it."""
    report = tmp_path / "process_1_exit"
    settings = ("--config", "train.json", "--max_epochs", "2", "--save_every_n_epochs", "1", "--no_save_ckpt",
                "true", "--sample_prompts", "null", "--num_workers", "0", "--logdir", str(tmp_path / "logs"))
    stopped = launch_two("tests/stop_injection.py", *settings,
                         env={**os.environ, "STOP_AT_STEP": "2", "SAVE_DELAY_S": "4", "EXIT_REPORT": str(report)})
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0, output
    assert "stopped by SIGTERM at step 3" in output  # signalled while training step 3 (2 steps done)
    assert report.read_text().splitlines() == ["interrupted-demo-ep00-gs00003"], output

    (run_dir,) = (tmp_path / "logs").iterdir()
    resumed = launch_two("train.py", "--resume_run", str(run_dir), env=dict(os.environ))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "last-demo-ep02-gs00008" in sorted(p.name for p in (run_dir / "ckpts").iterdir())


def test_a_machine_whose_latent_cache_is_full_waits_for_another_filling_its_own_past_the_group_timeout(
        tmp_path, tiny):
    """Machines with their own copies of latent_cache_dir: one full, one empty. The full one's process has
    nothing to encode and waits while the other encodes every image, longer than the process group's
    timeout (an hour in train.py; 2 s here, against 7 batches of 0.6 s): the processes keep in step batch by
    batch (keep_pace), so no single wait outlasts the timeout."""
    from tests.long_wait_process import demo_cache

    shutil.copytree(REPO / "examples" / "images", tmp_path / "images")
    cache, variants, items = demo_cache(tmp_path / "cache-0", tiny["vae"])
    fill_latent_cache(cache, items, variants, tiny["vae"], "cpu", batch_size=2, progress=False)
    started = [subprocess.Popen([sys.executable, "tests/long_wait_process.py", str(rank), str(tmp_path)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [process.communicate(timeout=120)[0] for process in started]
    assert [process.returncode for process in started] == [0, 0], "\n".join(outputs)
    reports = [re.fullmatch(r"process (\d): (\d+) encoded, (\d+) reused in ([\d.]+) s; 12 encoded and 12 reused "
                            r"in all", output.splitlines()[-1]) for output in outputs]
    assert all(reports), "\n".join(outputs)
    assert [report.group(1, 2, 3) for report in reports] == [("0", "0", "12"), ("1", "12", "0")]
    assert float(reports[0].group(4)) > 4  # process 0 waited the other's 7 batches, past the 2 s timeout


def test_a_session_finished_in_one_machines_logdir_and_not_in_anothers_stops_every_process(tmp_path, monkeypatch):
    """`--resume_run auto` on machines with their own copies of logdir: machine 0's says the session finished,
    machine 1's has no run. The finished process used to end at once, leaving the other waiting for it to
    join the process group (for the group's timeout, an hour). Now both join, compare, and stop with the
    reason; where every copy says finished, both end with nothing to do."""
    import train

    machines = [tmp_path / "machine-0", tmp_path / "machine-1"]
    for machine in machines:
        machine.mkdir()
    settings = {**json.loads((REPO / "train.json").read_text()), "data_root": str(REPO / "examples" / "images"),
                "logdir": "logs", "sample_prompts": None, "no_save_ckpt": True, "num_workers": 0}
    config = tmp_path / "session.json"
    config.write_text(json.dumps(settings))
    session = ("tests/in_own_folder.py", *map(str, machines), "--config", str(config), "--resume_run", "auto")

    monkeypatch.chdir(machines[0])  # machine 0's copy: the session ran to the end (its records, a final save)
    run_dir = Path(train.start_run(train.plan_run(["--config", str(config)]),
                                   types.SimpleNamespace(is_main_process=True)))
    final = run_dir / "ckpts" / "last-demo-ep08-gs00048"
    final.mkdir(parents=True)
    (final / "checkpoint.json").write_text(json.dumps({"global_step": 48, "saved_at": 0, "final": True}))

    disagree = launch_two(*session, timeout=180)
    assert disagree.returncode != 0
    assert "process(es) 0 found this session already finished in their copy of logdir" in disagree.stderr
    assert not (machines[1] / "logs").exists()  # stopped before machine 1 started a run of its own

    shutil.copytree(machines[0] / "logs", machines[1] / "logs")
    agree = launch_two(*session, timeout=180)
    assert agree.returncode == 0, agree.stdout + agree.stderr
    assert agree.stdout.count("this session already finished") == 2


def test_a_process_whose_config_is_wrong_stops_the_processes_of_the_other_machines_too(tmp_path):
    """Machines that each read their own copy of the config: machine 1's has a misspelt key. Its process used
    to end at once, and the process on machine 0 (whose launcher knows nothing of machine 1's) waited for it
    to join the process group for the group's timeout, an hour. Now it joins all the same, and both stop with
    machine 1's error."""
    machines = [tmp_path / "machine-0", tmp_path / "machine-1"]
    settings = {**json.loads((REPO / "train.json").read_text()), "data_root": str(REPO / "examples" / "images"),
                "sample_prompts": None, "no_save_ckpt": True, "num_workers": 0}
    for machine, extra in zip(machines, ({}, {"learning_rate_typo": 1e-4})):
        machine.mkdir()
        (machine / "session.json").write_text(json.dumps({**settings, **extra}))
    launches = launch_as_two_machines("tests/in_own_folder.py", *map(str, machines), "--config", "session.json",
                                      timeout=180)
    for launch in launches:
        assert launch.returncode != 0
        assert "process(es) 1 could not start the run" in launch.stderr, launch.stdout + launch.stderr
        assert "learning_rate_typo" in launch.stderr
    assert not any((machine / "logs").exists() for machine in machines)  # nothing started


def test_a_dry_run_set_in_the_config_file_stops_every_process_when_one_cannot_read_its_config(tmp_path):
    """`dry_run: true` in the config file, which a process that cannot load its config cannot see: the
    processes that could still join the process group, so the one that could not is not left waiting for
    them (a dry run asked with --dry_run, the same on every command line, forms no group at all)."""
    machines = [tmp_path / "machine-0", tmp_path / "machine-1"]
    settings = {**json.loads((REPO / "train.json").read_text()), "sample_prompts": None, "dry_run": True}
    for machine, data_root in zip(machines, (str(REPO / "examples" / "images"), "no-such-folder")):
        machine.mkdir()
        (machine / "session.json").write_text(json.dumps({**settings, "data_root": data_root}))
    launch = launch_two("tests/in_own_folder.py", *map(str, machines), "--config", "session.json", timeout=180)
    assert launch.returncode != 0
    assert "process(es) 1 could not start the run" in launch.stderr and "no-such-folder" in launch.stderr


def test_a_stray_world_size_without_a_launcher_leaves_a_config_error_as_it_is(tmp_path):
    """WORLD_SIZE left in the environment, but no launcher (no MASTER_ADDR): a config error is printed as
    it is, not turned into an attempt to join a process group that does not exist."""
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT", "RANK")}
    result = subprocess.run([sys.executable, "train.py", "--config", str(REPO / "train.json"), "--data_root",
                             str(tmp_path / "missing")], cwd=REPO, env={**env, "WORLD_SIZE": "2"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "data_root" in result.stderr and "Traceback" not in result.stderr


def test_a_machine_whose_copy_of_the_model_is_incomplete_stops_the_others_too(tmp_path, tiny_folder):
    """Machines with their own copies of the base model: machine 1's lacks its UNet weights. Both planned the
    same run; machine 1 cannot load the model and says so to the others, and both stop with its error."""
    machines = [tmp_path / "machine-0", tmp_path / "machine-1"]
    settings = {**json.loads((REPO / "train.json").read_text()), "data_root": str(REPO / "examples" / "images"),
                "resume_ckpt": "model", "sample_prompts": None, "no_save_ckpt": True, "num_workers": 0}
    for machine in machines:
        shutil.copytree(tiny_folder, machine / "model")
        (machine / "session.json").write_text(json.dumps(settings))
    (machines[1] / "model" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    launches = launch_as_two_machines("tests/in_own_folder.py", *map(str, machines), "--config", "session.json",
                                      timeout=180)
    for launch in launches:
        assert launch.returncode != 0
        output = launch.stdout + launch.stderr
        assert "process(es) 1 could not start the run" in output, output
        assert "resume_ckpt: model could not be loaded" in output, output


def test_a_machine_that_cannot_write_its_latent_cache_stops_the_others_too(tmp_path, monkeypatch):
    """cache_latents with machine 1's disk full: it stops encoding, keeps pace with machine 0 until that one
    has filled its share, and both stop with machine 1's error before training, instead of machine 0 waiting
    in the next collective for the process group's timeout."""
    monkeypatch.setenv("DISK_FULL_ON_PROCESS", "1")
    launches = launch_as_two_machines("tests/error_injection.py", "--config", "train.json", "--max_epochs", "1",
                                      "--cache_latents", "true", "--no_save_ckpt", "true", "--sample_prompts", "null",
                                      "--num_workers", "0", "--logdir", str(tmp_path / "logs"), timeout=180)
    for launch in launches:
        output = launch.stdout + launch.stderr
        assert launch.returncode != 0 and "exitcode  : 2" in output, output  # train.py's 2; the launcher says 1
        assert "process(es) 1 could not start the run" in output and "No space left on device" in output, output
    (run_dir,) = (tmp_path / "logs").glob("demo-*")
    assert not (run_dir / "ckpts").exists() or not list((run_dir / "ckpts").iterdir())  # nothing trained


def test_the_gradient_buckets_are_regrouped_before_the_first_step():
    """DDP regroups its gradient buckets at the first forward after its first backward.
    settle_gradient_buckets does both, so every process regroups there and not at its first training
    forward, which one process may skip (its batch unreadable) while the others broadcast the grouping. One
    process in a gloo group has DDP's reducer as several do."""
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch.nn.parallel import DistributedDataParallel

    import train
    from utils.config import TrainConfig
    from utils.models import load_model

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for train_text_encoder in (False, True):
            model = load_model("builtin:tiny")
            model.text_encoder.requires_grad_(train_text_encoder)
            unet = DistributedDataParallel(model.unet)
            text_encoder = DistributedDataParallel(model.text_encoder) if train_text_encoder else model.text_encoder
            trainee = train.Trainee(model, unet, text_encoder, train_unet=True, train_text_encoder=train_text_encoder,
                                    alphas_cumprod=model.scheduler.alphas_cumprod)
            assert not unet._has_rebuilt_buckets
            train.settle_gradient_buckets(trainee, Accelerator(cpu=True), TrainConfig(resume_ckpt="builtin:tiny"))
            assert unet._has_rebuilt_buckets  # before any training forward
            assert not train_text_encoder or text_encoder._has_rebuilt_buckets
            assert all(p.grad is None for p in model.unet.parameters())  # nothing of it trains
    finally:
        dist.destroy_process_group()
        AcceleratorState._reset_state(True)  # made while the group existed: not for the tests after this one


def test_each_machine_shares_the_latent_cache_among_its_own_processes(monkeypatch):
    """The fill's share (index on this machine, processes on it): the launcher's LOCAL_RANK and
    LOCAL_WORLD_SIZE, or, from a launcher that sets neither, the processes' host names."""
    import accelerate.utils

    from utils.processes import share_on_this_machine

    accelerator = types.SimpleNamespace(num_processes=4, process_index=3, local_process_index=1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert share_on_this_machine(accelerator) == (1, 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    accelerator.local_process_index = -1  # what accelerate makes of a missing LOCAL_RANK
    monkeypatch.setattr("socket.gethostname", lambda: "node-b")
    ranks_hosts = ["node-a", "node-b", "node-a"]  # processes 0 to 2; this one is process 3
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: ranks_hosts + mine)
    assert share_on_this_machine(accelerator) == (1, 2)



def run_main_process_first(failing_rank: int | None = None) -> list[tuple[str, int]]:
    """utils.processes.main_process_first on four threads standing for processes 0-3 of two machines (0 and
    1 on the first, 2 and 3 on the second), whose wait_for_everyone is a real barrier. What each block did,
    in order; `failing_rank`'s block raises."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from utils.processes import main_process_first

    barrier, lock, events = threading.Barrier(4), threading.Lock(), []

    def process(rank: int) -> None:
        accelerator = types.SimpleNamespace(is_main_process=rank == 0, is_local_main_process=rank in (0, 2),
                                            wait_for_everyone=lambda: barrier.wait(timeout=20))
        with contextlib.suppress(ValueError), main_process_first(accelerator):
            with lock:
                events.append(("start", rank))
            time.sleep(0.05)
            with lock:
                events.append(("end", rank))
            if rank == failing_rank:
                raise ValueError("this process's copy of the model is damaged")

    with ThreadPoolExecutor(4) as pool:
        for finished in [pool.submit(process, rank) for rank in range(4)]:
            finished.result()  # a broken or timed-out barrier raises here
    return events


@pytest.mark.parametrize("failing_rank", [None, 0, 2])
def test_a_single_file_is_converted_by_the_main_process_then_by_one_process_per_machine(failing_rank):
    """With a ckpt_cache_dir on each machine, the other machines' processes used to convert the file all at
    once, each holding a whole model in memory. A block that raises still passes its barriers."""
    events = run_main_process_first(failing_rank)
    assert events[:4] == [("start", 0), ("end", 0), ("start", 2), ("end", 2)]
    assert sorted(events[4:]) == [("end", 1), ("end", 3), ("start", 1), ("start", 3)]


def test_every_process_takes_part_in_sharing_the_seed_whatever_its_own_seed_setting(monkeypatch):
    """With `seed: -1` the processes train the main process's draw. Machines may each read their own copy of
    the config: one whose copy says `seed: 42` while the main process's says -1 used to skip the broadcast the
    others were in, and wait in the next collective for an hour. Now every process takes part, and
    check_same_plan then names the difference; so it does when a process cannot plan again."""
    import accelerate.utils

    import train
    from utils.processes import share_random_seed

    settings = ["--config", str(REPO / "train.json"), "--data_root", str(REPO / "examples" / "images")]
    accelerator = types.SimpleNamespace(num_processes=2)
    main = train.plan_run([*settings, "--seed", "-1"], random_seed=1234)  # the main process drew 1234
    broadcasts = []

    def from_main(values, from_process=0):
        broadcasts.append(values)
        return [(main.loaded.config.seed, main.config.seed)]

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", from_main)
    fixed = train.plan_run([*settings, "--seed", "42"])  # process 1's copy of the config fixes the seed
    assert share_random_seed(fixed, accelerator, [*settings, "--seed", "42"]) is fixed
    assert len(broadcasts) == 1  # it took part; check_same_plan then names the settings that differ
    drawn = train.plan_run([*settings, "--seed", "-1"], random_seed=99)  # process 1 drew another
    assert share_random_seed(drawn, accelerator, [*settings, "--seed", "-1"]).config.seed == 1234

    # Planning again fails (the data folder emptied meanwhile): process 1 keeps its first plan, with its own
    # seed, so it meets the others in check_same_plan, which stops every process, instead of ending alone.
    from utils.config import ConfigError
    from utils.processes import ProcessesPlannedDifferently, check_same_plan

    def data_gone(argv, random_seed=None):
        raise ConfigError([])

    monkeypatch.setattr("utils.run_plan.plan_run", data_gone)
    accelerator.process_index = 1
    assert share_random_seed(drawn, accelerator, [*settings, "--seed", "-1"]) is drawn
    main_digests = []
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: main_digests.extend(mine) or mine + mine)
    check_same_plan(main, accelerator)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: main_digests + mine)
    with pytest.raises(ProcessesPlannedDifferently, match=r"process\(es\) 1 found other settings"):
        check_same_plan(drawn, accelerator)


def test_processes_that_planned_different_runs_stop_before_training(tmp_path, monkeypatch):
    """Each process plans the run itself. An image added while they started would make their shares of each
    epoch not fit together; other settings, or another checkpoint to resume (machines each with their own
    copy of logdir), would have them train different steps and wait on each other for ever. Every process
    compares its plan with the others', and all stop with the same message, naming what differs."""
    import dataclasses

    import accelerate.utils

    import train
    from utils.processes import ProcessesPlannedDifferently, check_same_plan

    images = tmp_path / "images"
    shutil.copytree(REPO / "examples" / "images", images)
    settings = ["--config", str(REPO / "train.json"), "--data_root", str(images)]
    accelerator = types.SimpleNamespace(num_processes=2)
    process_0 = []
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: process_0.extend(mine) or mine + mine)
    plan = train.plan_run(settings)
    check_same_plan(plan, accelerator)  # the same plan on both: nothing to say
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: process_0 + mine)
    check_same_plan(train.plan_run([*settings, "--num_workers", "7"]), accelerator)  # each machine's own

    def differences(plan_of_process_1) -> str:
        with pytest.raises(ProcessesPlannedDifferently) as raised:
            check_same_plan(plan_of_process_1, accelerator)
        return str(raised.value)

    assert "process(es) 1 found other settings" in differences(train.plan_run([*settings, "--lr", "3e-6"]))
    resumed = dataclasses.replace(plan, resume=types.SimpleNamespace(checkpoint="logs/run/ckpts/demo-ep01-gs00004",
                                                                      record={"global_step": 4}))
    assert "process(es) 1 found other checkpoint to resume from" in differences(resumed)
    shutil.copyfile(images / "sunset.jpg", images / "a new sunset.jpg")  # added before process 1 scanned
    message = differences(train.plan_run(settings))
    assert f"process(es) 1 found other training data in {images}" in message and "settings" not in message


def test_processes_that_found_other_optimizer_states_in_the_model_to_start_from_stop_before_training(
        tmp_path, tiny_folder, monkeypatch):
    """A warm start from a checkpoint folder saved with its optimizer state: DDP gives every process the main
    process's weights, but each restores the moments its own machine's copy holds. A copy without them would
    have the processes step differently from the first step on; every process stops instead."""
    import accelerate.utils
    import torch

    import train
    from optimizer.optimizers import save_optimizer_state
    from utils.checkpoint import DamagedCheckpoint
    from utils.processes import ProcessesPlannedDifferently

    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    plan = train.plan_run(["--config", str(REPO / "train.json"), "--data_root", str(REPO / "examples" / "images"),
                           "--resume_ckpt", str(model)])
    accelerator = types.SimpleNamespace(num_processes=1, device=torch.device("cpu"), is_main_process=True,
                                        is_local_main_process=True, wait_for_everyone=lambda: None,
                                        prepare=lambda prepared: prepared)
    trainee = train.load_trainee(plan, accelerator)
    optimizer, _ = train.prepare_optimizer(plan, trainee, accelerator)
    save_optimizer_state(optimizer, str(model))  # as a run with save_optimizer leaves it

    accelerator.num_processes = 2
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: mine + [None])  # process 1's copy: none
    with pytest.raises(ProcessesPlannedDifferently) as raised:
        train.prepare_optimizer(plan, train.load_trainee(plan, accelerator), accelerator)
    assert f"process(es) 1 found other optimizer state in their copy of {model}" in str(raised.value)
    assert "Let every machine see the same copy of the checkpoint folder" in str(raised.value)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: mine + mine)  # the same on both
    train.prepare_optimizer(plan, train.load_trainee(plan, accelerator), accelerator)
    assert any(line.startswith(f"optimizer state restored from {model}") for line in plan.derived)

    (model / "optimizer.pt").write_bytes(b"cut short")  # every copy damaged alike: said plainly, no traceback
    with pytest.raises(DamagedCheckpoint, match="its optimizer state cannot be read .* Delete optimizer.pt there"):
        train.prepare_optimizer(plan, train.load_trainee(plan, accelerator), accelerator)


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_a_launch_that_shards_the_model_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, variable,
                                                                          name):
    """accelerate launch --use_fsdp or --use_deepspeed (or a config file asking for them) sets these variables.
    train.py prepares its models and optimizer one by one, as plain data parallelism does, and every process
    keeps the whole model: such a launch used to fail in accelerate after the model loaded (on the CPU,
    accelerate's FSDP plugin raised in the Accelerator). Now a config error names it, and nothing starts."""
    import train

    settings = ["--config", str(REPO / "train.json"), "--data_root", str(REPO / "examples" / "images"),
                "--logdir", str(tmp_path / "logs")]
    monkeypatch.setenv(variable, "True")  # read as accelerate reads it
    for dry_run in ([], ["--dry_run"]):
        code = train.main(settings + dry_run)
        stderr = capsys.readouterr().err
        assert code == 2, stderr
        assert f"accelerate launch ({variable}): launch: {name} is not supported" in stderr
        assert "doc/MULTIGPU.md" in stderr and "Traceback" not in stderr
        assert not (tmp_path / "logs").exists()
    monkeypatch.setenv(variable, "false")  # what accelerate launch sets for a plain launch
    assert train.main(settings + ["--dry_run"]) == 0
