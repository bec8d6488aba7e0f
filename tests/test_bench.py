"""bench/train_throughput.py and bench/step_timer.py: the bare training step, its FLOP count, the trainer
command it times, and the random-weight architectures it builds (utils/architectures.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from bench.step_timer import ENV_VAR, StepTimer, read_step_times
from bench.train_throughput import (Settings, attention_flop_formulas, measure_bare, report, train_command,
                                    write_square_examples)
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
    write_square_examples(str(tmp_path / "data"), 3)
    settings = Settings(model="tiny", resolution=256, batch=2, train_text_encoder=True, gradient_checkpointing=True)
    command = train_command(settings, str(tmp_path / "data"), str(tmp_path / "logs"))
    config_file, values, problems = parse_cli(command[2:])
    assert config_file is None and not problems
    config = merge(cli_values=values).config
    assert (config.resolution, config.batch_size, config.grad_accum) == (256, 2, 1)
    assert config.gradient_checkpointing and not config.disable_textenc_training and config.disable_amp
    assert config.plugins == ["bench.step_timer.StepTimer"] and config.sample_prompts is None
    assert len(list((tmp_path / "data").iterdir())) == 3


def test_the_step_timer_appends_a_timestamp_per_step(tmp_path, monkeypatch):
    path = tmp_path / "steps.txt"
    monkeypatch.setenv(ENV_VAR, str(path))
    timer = StepTimer()
    timer.on_training_start(log_folder=str(tmp_path))
    for step in range(1, 4):
        timer.on_step_end(global_step=step, loss=None, epoch=0)
    timer.on_training_end()
    times, peak = read_step_times(str(path))
    assert len(times) == 3 and times == sorted(times) and peak is None
    monkeypatch.delenv(ENV_VAR)
    StepTimer().on_step_end(global_step=4)  # without the variable: does nothing
    assert len(read_step_times(str(path))[0]) == 3
