"""bench/train_throughput.py (with bench/bare_step.py, bench/report.py and bench/settings.py) and
bench/step_timer.py: the bare training step, its FLOP count, the trainer command it times, how a trainer's
failure is reported, and the random-weight architectures it builds (utils/architectures.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from bench import bare_step, diffusers_example, train_throughput, workload
from bench.bare_step import BareStep, attention_flop_formulas, measure_bare
from bench.report import data_loading_text, report, table_peak
from bench.settings import REPO_ROOT, BareResult, Measurement, Settings, train_command
from bench.step_timer import ENV_VAR, StepTimer, read_step_times
from bench.workload import METADATA_FILE, TrainerFailed, timed_steps, write_model_folder, write_training_images
from utils.architectures import ARCHITECTURES, build_random_components
from utils.config import merge, parse_cli
from utils.tiny_model import build_tiny_components


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def one_thread():
    """torch on one thread: on a machine busy with other work, two threads of tiny ops can wait on each
    other for 100x longer than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_bare_step_of_the_tiny_model_reports_throughput_and_flops(one_thread):
    settings = Settings(model="tiny", resolution=64, batch=1, steps=2, warmup=0, device="cpu")
    result = measure_bare(settings)
    assert len(result.step_seconds) == 2 and result.images_per_second > 0
    assert result.peak_memory_bytes > 0
    assert list(result.flops) == ["VAE encode", "text encoder forward", "UNet forward", "backward"]
    assert all(count > 0 for count in result.flops.values()) and result.model_flops > 0
    # Only the UNet trains: its backward computes the weights' and the activations' gradients, two matrix
    # products per forward one (conv_in's input needs no gradient, so a little under 2x).
    assert 1.5 < result.flops["backward"] / result.flops["UNet forward"] < 2.5
    text = report("python bench/train_throughput.py --model tiny", settings, result, None, None, "none")
    assert "| bare step" in text and "train_text_to_image.py was not run" in text


def test_sdpa_flops_are_counted_as_the_matmul_attention_is(one_thread):
    """On the CPU torch's counter does not see SDPA's kernel; the bench's formulas make it count what the
    plain matmul attention counts, forward and backward."""
    unet = build_tiny_components()["unet"]
    sample, context, timestep = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64), torch.tensor([500])
    counts = []
    for processor in (None, AttnProcessor()):
        if processor is not None:
            unet.set_attn_processor(processor)
        with FlopCounterMode(display=False, custom_mapping=attention_flop_formulas()) as forward:
            output = unet(sample, timestep, context).sample
        with FlopCounterMode(display=False, custom_mapping=attention_flop_formulas()) as backward:
            output.square().mean().backward()
        counts.append((forward.get_total_flops(), backward.get_total_flops()))
    assert counts[0] == counts[1]


def test_sd15_and_sd21_have_their_published_parameter_counts():
    sd15 = build_random_components("sd15", "meta")
    assert parameters(sd15["unet"]) == 859_520_964  # 859.5M
    assert parameters(sd15["text_encoder"]) == 123_060_480  # CLIP ViT-L/14's text tower, 123.1M
    assert parameters(sd15["vae"]) == 83_653_863  # 83.7M
    sd21 = build_random_components("sd21", "meta")
    assert parameters(sd21["unet"]) == 865_910_724
    assert parameters(sd21["text_encoder"]) == 340_387_840  # OpenCLIP ViT-H/14's text tower, 23 of 24 layers
    assert ARCHITECTURES["sd21"].prediction_type == "v_prediction"


def test_the_trainer_command_is_a_valid_config_with_the_same_settings(tmp_path):
    records = write_training_images(str(tmp_path / "data"), 3, 256)
    model_folder = write_model_folder("tiny", str(tmp_path / "model"))
    settings = Settings(model="tiny", resolution=256, batch=2, train_text_encoder=True, gradient_checkpointing=True)
    command = train_command(settings, model_folder, str(tmp_path / "data"), str(tmp_path / "logs"))
    config_file, values, problems = parse_cli(command[2:])
    assert config_file is None and not problems
    config = merge(cli_values=values).config
    assert (config.resolution, config.batch_size, config.grad_accum) == (256, 2, 1)
    assert config.gradient_checkpointing and not config.disable_textenc_training and config.disable_amp
    assert config.plugins == ["bench.step_timer.StepTimer"] and config.sample_prompts is None
    assert config.resume_ckpt == model_folder and config.data_root == str(tmp_path / "data")
    assert config.num_workers == 0  # Settings' default, the CPU's
    assert len(records) == 3


def test_the_step_timer_appends_a_timestamp_per_step(tmp_path, monkeypatch):
    path = tmp_path / "steps.txt"
    monkeypatch.setenv(ENV_VAR, str(path))
    timer = StepTimer()
    timer.on_training_start(log_folder=str(tmp_path))
    for step in range(1, 4):
        timer.on_step_start(global_step=step - 1, local_step=step - 1)
        timer.on_step_end(global_step=step, loss=None, epoch=0)
    timer.on_step_end(global_step=4)  # a trainer that calls no on_step_start: no start recorded
    timer.on_training_end()
    recorded = read_step_times(str(path))
    assert len(recorded.ends) == 4 and recorded.ends == sorted(recorded.ends)
    assert all(start <= end for start, end in zip(recorded.starts[:3], recorded.ends))
    assert recorded.starts[0] > 0 and recorded.starts[1] >= recorded.ends[0] and recorded.starts[3] is None
    assert recorded.peak_kind == "peak RSS of the train.py process"
    assert recorded.peak_bytes > 50e6  # this test process: torch is loaded
    assert recorded.reserved_bytes is None  # CUDA only
    monkeypatch.delenv(ENV_VAR)
    StepTimer().on_step_end(global_step=5)  # without the variable: does nothing
    assert len(read_step_times(str(path)).ends) == 4


def test_the_full_step_is_split_into_the_part_inside_the_step_and_the_part_between_batches():
    """Steps end at 1, 2, 4 and 7 s and start 0.1, 0.2, 0.5 and 0.75 s before: the timed steps (after 1 warm-up)
    last 2 and 3 s, of which 0.5 and 0.75 s inside; the report gives both medians and the inside part
    against the bare step."""
    from bench.workload import seconds_inside_steps

    ends, starts = [1.0, 2.0, 4.0, 7.0], [0.9, 1.8, 3.5, 6.25]
    assert timed_steps(ends, 1, 2, "t") == [2.0, 3.0]
    inside = seconds_inside_steps(starts, ends, 1, 2)
    assert inside == pytest.approx([0.5, 0.75])
    assert seconds_inside_steps([0.9, 1.8, None, 6.25], ends, 1, 2) is None
    full = Measurement([2.0, 3.0], 1, None, "n/a", inside_seconds=inside)
    assert full.split_medians() == pytest.approx((0.625, 1.875))
    bare = BareResult([0.5, 0.5], 1, None, "n/a", {"backward": 10**9})
    text = report("python bench/train_throughput.py", Settings(resolution=256, steps=2, warmup=1), bare, full,
                  None, "none")
    assert "| full step: inside the step / between batches | 625.0 / 1875.0 ms (medians; inside minus the " \
           "bare step: +125.0 ms) |" in text
    merged = train_throughput.merged([full, Measurement([1.0], 1, None, "n/a", inside_seconds=[0.25])])
    assert merged.inside_seconds == pytest.approx([0.5, 0.75, 0.25])
    assert train_throughput.merged([full, Measurement([1.0], 1, None, "n/a")]).inside_seconds is None
    assert "inside the step" not in report("c", Settings(resolution=256, steps=2, warmup=1), bare,
                                              Measurement([2.0, 3.0], 1, None, "n/a"), None, "none")


def test_the_workload_is_a_model_folder_the_trainer_loads_and_square_captioned_images(tmp_path):
    """The same model and images for train.py and diffusers' example: a diffusers folder with builtin:tiny's
    weights, and JPEGs of exactly the resolution captioned both ways."""
    import json

    from PIL import Image

    from data.captions import caption_from_filename
    from utils.models import load_model

    folder = write_model_folder("tiny", str(tmp_path / "model"))
    loaded, builtin = load_model(folder), load_model("builtin:tiny")
    assert loaded.family.name == builtin.family.name and loaded.prediction_type == "epsilon"
    for part in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(loaded, part).state_dict(), getattr(builtin, part).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[key], theirs[key]) for key in mine)

    records = write_training_images(str(tmp_path / "data"), 5, 64)
    lines = [json.loads(line) for line in (tmp_path / "data" / METADATA_FILE).read_text().splitlines()]
    assert lines == records and len({record["file_name"] for record in records}) == 5
    pictures = []
    for record in records:
        with Image.open(tmp_path / "data" / record["file_name"]) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
            pictures.append(image.tobytes())
        assert caption_from_filename(record["file_name"]) == record["text"]
    assert len(set(pictures)) == 5  # different pictures, not one repeated


def test_the_full_step_runs_train_py_on_the_workload_and_reports_the_overhead(tmp_path, capsys, one_thread):
    train_throughput.main(["--model", "tiny", "--resolution", "256", "--batch", "1", "--steps", "2", "--warmup", "0",
                           "--threads", "1", "--full", "--workdir", str(tmp_path)])
    text = capsys.readouterr().out
    assert "| full step (train.py, StepTimer plugin) |" in text and "| overhead full / bare |" in text
    assert "| full step: inside the step / between batches |" in text  # train.py calls on_step_start
    assert "peak RSS of the train.py process" in text and list(tmp_path.iterdir()) == []  # cleaned up


def test_the_diffusers_example_command_trains_the_same_workload():
    settings = Settings(model="sd15", resolution=512, batch=8, steps=10, warmup=3, precision="bf16",
                        gradient_checkpointing=True, optimizer="adamw8bit", device="cuda", seed=7)
    command = diffusers_example.example_command(settings, "ex.py", "model", "data", "out", 1e-5)

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert command[1] == "ex.py"
    assert value("--pretrained_model_name_or_path") == "model" and value("--train_data_dir") == "data"
    assert (value("--resolution"), value("--train_batch_size"), value("--max_train_steps")) == ("512", "8", "14")
    assert (value("--mixed_precision"), value("--learning_rate"), value("--seed")) == ("bf16", "1e-05", "7")
    assert {"--gradient_checkpointing", "--use_8bit_adam", "--allow_tf32", "--center_crop"} <= set(command)
    fp32 = diffusers_example.example_command(Settings(precision="fp32"), "ex.py", "m", "d", "o", 1e-5)
    assert fp32[fp32.index("--mixed_precision") + 1] == "no" and "--allow_tf32" not in fp32
    assert "--use_8bit_adam" not in fp32 and "--gradient_checkpointing" not in fp32
    assert diffusers_example.unsupported(Settings(train_text_encoder=True)) is not None
    assert diffusers_example.unsupported(Settings(attention="slice")) is not None
    assert diffusers_example.unsupported(settings) is None


def test_the_example_is_timed_from_its_tensorboard_events(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "logs" / "text2image-fine-tune"))
    for step, wall_time in [(2, 101.5), (1, 100.0), (3, 103.5)]:  # by step, whatever the order written
        writer.add_scalar(diffusers_example.LOSS_TAG, 0.1, step, walltime=wall_time)
    writer.add_scalar("other", 0.1, 4, walltime=200.0)
    writer.close()
    assert diffusers_example.logged_step_times(str(tmp_path)) == [100.0, 101.5, 103.5]
    script = tmp_path / "train_text_to_image.py"
    script.write_text('check_min_version("0.22.0.dev0")\n')
    assert diffusers_example.describe(str(script)) == f"{script} (check_min_version 0.22.0.dev0)"


def test_the_report_compares_the_trainer_with_the_example_and_gives_no_mfu_where_the_flops_differ():
    flops = {"text encoder forward": 10**9, "UNet forward": 3 * 10**9, "backward": 6 * 10**9}
    bare = BareResult([0.5, 0.5], 2, 10**9, "peak RSS", flops)
    full, example = Measurement([0.5, 0.5], 2, 10**9, "peak RSS"), Measurement([0.75, 0.75], 2, None, "n/a")
    cached = Settings(model="tiny", resolution=256, batch=2, steps=2, warmup=0, cache_latents=True)
    text = report("python bench/train_throughput.py", cached, bare, full, 100.0, "--peak_tflops", None, [1.0],
                  example, "train_text_to_image.py (check_min_version 0.22.0.dev0)")
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| 0.020 | 0.0% |" in rows["| full step (train.py, StepTimer plugin)"]  # 10 GFLOP / 0.5 s
    assert rows["| diffusers example (train_text_to_image.py, TensorBoard wall times)"].endswith("| n/a | n/a |")
    assert "| 1.500x (example / full" in rows["| speed-up of train.py over the example"]
    assert "was not run" not in text and "its MFU is not given" in text
    uncached = Settings(model="tiny", resolution=256, batch=2, steps=2, warmup=0)
    text = report("python bench/train_throughput.py", uncached, bare, None, 100.0, "--peak_tflops", None, [],
                  example, "train_text_to_image.py")
    assert "| 0.013 | 0.0% |" in text and "speed-up" not in text  # without --full: no ratio


def test_a_trainer_started_by_the_bench_reports_its_own_peak_memory_not_the_bench_process_s():
    """A child inherits its parent's peak RSS at fork and keeps it across exec in getrusage's ru_maxrss; the
    StepTimer reads the child's own (VmHWM), so train.py's peak is not the bench's loaded model."""
    import pathlib
    import subprocess
    import sys

    held = bytearray(600 * 2**20)
    held[::4096] = b"\x01" * len(held[::4096])  # touched: resident
    code = "from bench.step_timer import peak_rss_bytes; print(peak_rss_bytes())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=pathlib.Path(__file__).parents[1])
    assert int(child.stdout) < 300 * 2**20 < len(held)


def test_the_bare_step_builds_the_optimizer_train_py_builds_and_clips_as_it_does(tmp_path, monkeypatch, one_thread,
                                                                                  fresh_accelerator):
    """The same class, named groups and settings (lr, betas, eps, weight decay; torch's foreach default, never
    fused) as train.py's prepare_optimizer for the bench's command, and its gradient clipping (none by default)."""
    from optimizer.optimizers import build_optimizer
    from utils.run_plan import plan_run

    monkeypatch.chdir(REPO_ROOT)  # where the bench runs train.py, which reads optimizer.json there
    settings = Settings(model="tiny", resolution=256, batch=1, train_text_encoder=True, device="cpu")
    write_training_images(str(tmp_path / "data"), 2, 256)
    command = train_command(settings, write_model_folder("tiny", str(tmp_path / "model")), str(tmp_path / "data"),
                            str(tmp_path / "logs"))
    plan = plan_run(command[2:])
    parts = build_tiny_components()
    theirs = build_optimizer(plan.optimizer_settings, {"unet": list(parts["unet"].parameters()),
                                                       "text encoder": list(parts["text_encoder"].parameters())})
    bare = BareStep(settings)
    mine = bare.optimizer.optimizer  # accelerate's wrapper holds it

    def groups(optimizer) -> list[dict]:  # initial_lr: set by the lr schedule, which both have
        return [{key: value for key, value in group.items() if key not in ("params", "initial_lr")}
                for group in optimizer.param_groups]

    assert type(mine) is type(theirs) and mine.defaults == theirs.defaults and groups(mine) == groups(theirs)
    assert [group["name"] for group in mine.param_groups] == ["unet", "text encoder"]
    assert not mine.defaults.get("fused") and bare.clip_grad_norm == plan.config.clip_grad_norm is None
    assert torch.isfinite(bare.step())


def test_the_bare_step_keeps_the_frozen_parts_in_fp32_under_autocast_as_train_py(one_thread, fresh_accelerator):
    settings = Settings(model="tiny", resolution=64, batch=1, precision="bf16", device="cpu")
    bare = BareStep(settings)
    assert {p.dtype for p in bare.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in bare.plain["text_encoder"].parameters()} == {torch.float32}
    assert bare.pixels.dtype == torch.float32 and bare.encode(bare.pixels).dtype == torch.float32
    assert torch.isfinite(bare.step())
    bare_step.release(bare)  # before the trainers run: no module of it may stay on the device

    def holds_a_module(value) -> bool:
        inside = value.values() if isinstance(value, dict) else ()
        return isinstance(value, torch.nn.Module) or any(map(holds_a_module, inside))

    assert not [name for name, value in vars(bare).items() if holds_a_module(value)]


def test_the_trainers_data_loading_workers_are_0_on_the_cpu_and_train_py_s_choice_on_cuda(monkeypatch):
    from utils.config import automatic_num_workers, load_config

    def settings(*flags: str) -> Settings:
        return train_throughput.settings_from(train_throughput.parse_args(["--resolution", "256", *flags]))

    assert settings("--device", "cpu").num_workers == 0
    assert settings("--device", "cpu", "--num_workers", "3").num_workers == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert settings("--device", "cuda").num_workers is None  # train.py's automatic choice
    assert settings("--device", "cuda", "--num_workers", "0").num_workers == 0
    with pytest.raises(SystemExit):
        settings("--num_workers", "-1")
    for workers, expected in ((None, None), (0, 0), (2, 2)):
        command = train_command(Settings(resolution=256, num_workers=workers), "builtin:tiny", REPO_ROOT, "logs")
        assert load_config(command[2:]).config.num_workers == expected
        example = diffusers_example.example_command(Settings(num_workers=workers), "ex.py", "m", "d", "o", 1e-5)
        given = automatic_num_workers() if workers is None else workers
        assert example[example.index("--dataloader_num_workers") + 1] == str(given)
        assert f"Data loading: {given} worker" in data_loading_text(Settings(num_workers=workers))


def test_a_failing_trainer_is_reported_failed_and_the_bare_step_s_numbers_are_kept(tmp_path, capsys, monkeypatch,
                                                                                   one_thread):
    """train.py failing does not end the benchmark: the bare step is printed when measured, the report has a
    failed row with the trainer's last lines, and the exit status is 1. The bare step's peak memory is read
    before the workload (a second copy of the model) is written."""
    import sys

    real_run_trainer, events = workload.run_trainer, []

    def failing(command, env, name, cwd=None, timeout=None):
        code = "print('loading the model'); raise SystemExit('boom: the trainer broke')"
        return real_run_trainer([sys.executable, "-c", code], env, name, cwd, timeout)

    def spy(function, event: str):
        def spied(*args, **kwargs):
            events.append(event)
            return function(*args, **kwargs)
        return spied

    monkeypatch.setattr(workload, "run_trainer", failing)
    # main calls them by its own module's names (bare_memory imported from bench.bare_step): spied there.
    monkeypatch.setattr(train_throughput, "bare_memory", spy(train_throughput.bare_memory, "bare memory"))
    monkeypatch.setattr(train_throughput, "write_workload", spy(train_throughput.write_workload, "workload"))
    status = train_throughput.main(["--model", "tiny", "--resolution", "256", "--batch", "1", "--steps", "2",
                                    "--warmup", "0", "--threads", "1", "--full", "--workdir", str(tmp_path)])
    text = capsys.readouterr().out
    assert status == 1 and events == ["bare memory", "workload"]
    assert text.index("Bare step, measured") < text.index("train.py failed: train.py exited with code 1")
    report_text = text[text.index("`python bench/train_throughput.py"):]
    assert "| bare step (diffusers example's inner loop) |" in report_text
    assert "| full step (train.py, StepTimer plugin) | failed: train.py exited with code 1" in report_text
    assert "boom: the trainer broke" in report_text and "overhead" not in report_text


def test_a_trainer_past_its_time_limit_is_stopped_and_reported():
    import sys
    import time

    start = time.perf_counter()
    with pytest.raises(TrainerFailed, match="time limit of 1 s") as failed:
        workload.run_trainer([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"],
                             {}, "train.py", timeout=1)
    assert time.perf_counter() - start < 30 and failed.value.last_lines() == ["started"]


def test_the_peak_table_takes_the_most_specific_name():
    table = table_peak
    assert table("NVIDIA H200 NVL") == ("H200 NVL", 835.0) and table("NVIDIA H200") == ("H200", 989.0)
    assert table("NVIDIA H100 NVL") == ("H100 NVL", 835.0) and table("NVIDIA H100 PCIe") == ("H100 PCIe", 756.0)
    assert table("NVIDIA H100 80GB HBM3") == ("H100", 989.0) and table("NVIDIA A100-SXM4-80GB") == ("A100", 312.0)
    assert table("NVIDIA GeForce RTX 4090") == ("RTX 4090", 165.2) and table("Tesla T4") is None


def test_cuda_memory_is_reported_allocated_and_reserved(tmp_path, monkeypatch):
    """The StepTimer records train.py's max_memory_reserved beside max_memory_allocated on CUDA; the report
    shows the reserved peak in brackets."""
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "steps.txt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 10**9)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 4 * 10**9)
    StepTimer().on_training_end()
    recorded = read_step_times(str(tmp_path / "steps.txt"))
    peak, kind, reserved = recorded.peak_bytes, recorded.peak_kind, recorded.reserved_bytes
    assert (peak, kind, reserved) == (3 * 10**9, "torch.cuda.max_memory_allocated", 4 * 10**9)
    bare = BareResult([0.5], 1, 10**9, "torch.cuda.max_memory_allocated", {"backward": 10**9},
                      reserved_bytes=2 * 10**9)
    full = Measurement([0.5], 1, peak, kind, reserved_bytes=reserved)
    text = report("python bench/train_throughput.py", Settings(resolution=256, steps=1, warmup=0), bare, full,
                  None, "none")
    assert "| 1.00 GB (2.00 GB) |" in text and "| 3.00 GB (4.00 GB) |" in text


def test_merged_rounds_keep_the_highest_peak_reserved_memory_too():
    """The GPU report's train.py row showed no reserved memory: the rounds' merge dropped it."""
    rounds = [Measurement([0.2, 0.3], 8, 10, "torch.cuda.max_memory_allocated", reserved_bytes=12),
              Measurement([0.25], 8, 11, "torch.cuda.max_memory_allocated", reserved_bytes=14)]
    merged = train_throughput.merged(rounds)
    assert (merged.step_seconds, merged.peak_memory_bytes, merged.reserved_bytes) == ([0.2, 0.3, 0.25], 11, 14)
    no_reserved = train_throughput.merged([Measurement([0.2], 1, 5, "peak RSS")])
    assert (no_reserved.peak_memory_bytes, no_reserved.reserved_bytes) == (5, None)
