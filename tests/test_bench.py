"""bench/train_throughput.py and bench/step_timer.py: the bare training step, its FLOP count, the trainer
command it times, and the random-weight architectures it builds (utils/architectures.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from bench import diffusers_example, train_throughput
from bench.step_timer import ENV_VAR, StepTimer, read_step_times
from bench.train_throughput import Settings, attention_flop_formulas, measure_bare, report, train_command
from bench.workload import METADATA_FILE, write_model_folder, write_training_images
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
    assert len(records) == 3


def test_the_step_timer_appends_a_timestamp_per_step(tmp_path, monkeypatch):
    path = tmp_path / "steps.txt"
    monkeypatch.setenv(ENV_VAR, str(path))
    timer = StepTimer()
    timer.on_training_start(log_folder=str(tmp_path))
    for step in range(1, 4):
        timer.on_step_end(global_step=step, loss=None, epoch=0)
    timer.on_training_end()
    times, peak, kind = read_step_times(str(path))
    assert len(times) == 3 and times == sorted(times)
    assert kind == "peak RSS of the train.py process" and peak > 50e6  # this test process: torch is loaded
    monkeypatch.delenv(ENV_VAR)
    StepTimer().on_step_end(global_step=4)  # without the variable: does nothing
    assert len(read_step_times(str(path))[0]) == 3


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
    from bench.train_throughput import BareResult, Measurement

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
