"""The diffusion maths (utils/diffusion.py) against diffusers' scheduler and against closed forms."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from utils.diffusion import (add_noise, mse_loss, sample_noise, sample_timesteps, step_generator, training_target,
                             velocity)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def scheduler():
    """Stable Diffusion's training noise schedule."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    timesteps = torch.tensor([0, 1, 250, 500, 998, 999])
    return latents, noise, timesteps


def test_add_noise_matches_diffusers(scheduler, batch):
    latents, noise, timesteps = batch
    ours = add_noise(latents, noise, timesteps, scheduler.alphas_cumprod)
    theirs = scheduler.add_noise(latents, noise, timesteps)
    assert ours.shape == latents.shape
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_add_noise_closed_form(scheduler, batch):
    latents, noise, timesteps = batch
    ours = add_noise(latents, noise, timesteps, scheduler.alphas_cumprod)
    for i, t in enumerate(timesteps.tolist()):
        a = scheduler.alphas_cumprod[t].item()
        assert torch.allclose(ours[i], a ** 0.5 * latents[i] + (1 - a) ** 0.5 * noise[i], atol=1e-6)


def test_velocity_matches_diffusers(scheduler, batch):
    latents, noise, timesteps = batch
    ours = velocity(latents, noise, timesteps, scheduler.alphas_cumprod)
    theirs = scheduler.get_velocity(latents, noise, timesteps)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_add_noise_keeps_the_dtype_of_half_latents(scheduler, batch):
    latents, noise, timesteps = batch
    out = add_noise(latents.half(), noise.half(), timesteps, scheduler.alphas_cumprod)
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), scheduler.add_noise(latents, noise, timesteps), atol=2e-2)


def test_training_target_epsilon_is_the_noise(scheduler, batch):
    latents, noise, timesteps = batch
    assert torch.equal(training_target("epsilon", latents, noise, timesteps, scheduler.alphas_cumprod), noise)


def test_training_target_v_prediction_is_the_velocity(scheduler, batch):
    latents, noise, timesteps = batch
    target = training_target("v_prediction", latents, noise, timesteps, scheduler.alphas_cumprod)
    assert torch.allclose(target, scheduler.get_velocity(latents, noise, timesteps), atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["sample", "v-prediction", "", "EPSILON"])
def test_training_target_rejects_unknown_prediction_types(scheduler, batch, prediction_type):
    latents, noise, timesteps = batch
    with pytest.raises(ValueError, match="not supported"):
        training_target(prediction_type, latents, noise, timesteps, scheduler.alphas_cumprod)


@pytest.mark.parametrize("start, end", [(0, 1000), (100, 110), (999, 1000), (0, 1)])
def test_sample_timesteps_stay_in_range_and_cover_it(start, end):
    t = sample_timesteps(20_000, start, end, torch.Generator().manual_seed(1), CPU)
    assert t.shape == (20_000,)
    assert t.dtype == torch.int64
    assert int(t.min()) >= start and int(t.max()) < end
    if end - start <= 20:
        assert set(t.tolist()) == set(range(start, end))
    else:  # 20 draws per value on average: both ends are reached
        assert int(t.min()) == start and int(t.max()) == end - 1


def test_sample_timesteps_are_roughly_uniform():
    t = sample_timesteps(50_000, 0, 10, torch.Generator().manual_seed(2), CPU)
    counts = torch.bincount(t, minlength=10).double()
    expected = 5000.0
    assert torch.all((counts - expected).abs() < 5 * (expected * 0.9) ** 0.5)


def test_step_generator_is_reproducible():
    a = torch.randn(16, generator=step_generator(555, 42, CPU))
    b = torch.randn(16, generator=step_generator(555, 42, CPU))
    assert torch.equal(a, b)


def test_step_generator_differs_across_steps_and_seeds():
    draws = {(seed, step): torch.randn(16, generator=step_generator(seed, step, CPU))
             for seed in (0, 1, 555) for step in (0, 1, 2, 1000)}
    values = list(draws.values())
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert not torch.equal(values[i], values[j])


def test_step_generator_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    torch.randn(8, generator=step_generator(1, 2, CPU))
    assert torch.equal(torch.rand(4), expected)


def test_sample_noise_without_offset_is_plain_randn():
    latents = torch.zeros(3, 4, 8, 8)
    noise = sample_noise(latents, torch.Generator().manual_seed(7), 0.0)
    assert torch.equal(noise, torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7)))


def test_sample_noise_follows_the_latents_shape_and_dtype():
    latents = torch.zeros(2, 4, 6, 10, dtype=torch.float64)
    noise = sample_noise(latents, torch.Generator().manual_seed(7), 0.1)
    assert noise.shape == latents.shape and noise.dtype == torch.float64


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
def test_offset_noise_is_one_constant_per_image_and_channel(ratio):
    """Spatial means of noise + r * offset[b, c] have variance 1/(H*W) + r**2 across images and across
    channels: the offset is drawn per image *and* per channel (shared over either would remove r**2 from
    one of the two variances)."""
    batch, channels, height, width = 256, 16, 8, 8
    noise = sample_noise(torch.zeros(batch, channels, height, width), torch.Generator().manual_seed(11), ratio)
    means = noise.double().mean(dim=(2, 3))  # (batch, channels)
    expected = 1 / (height * width) + ratio ** 2
    across_images = means.var(dim=0).mean().item()
    across_channels = means.var(dim=1).mean().item()
    assert across_images == pytest.approx(expected, rel=0.15)
    assert across_channels == pytest.approx(expected, rel=0.15)
    # and around its mean, every image-channel plane is still unit white noise
    residual = noise.double() - means[..., None, None]
    assert residual.var().item() == pytest.approx(1 - 1 / (height * width), rel=0.05)


def test_mse_loss_is_the_mean_squared_error():
    g = torch.Generator().manual_seed(3)
    prediction, target = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    expected = ((prediction.double() - target.double()) ** 2).sum() / prediction.numel()
    loss = mse_loss(prediction, target)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_mse_loss_of_half_inputs_is_computed_in_fp32():
    prediction = torch.full((2, 4, 8, 8), 300.0, dtype=torch.float16)
    target = torch.full((2, 4, 8, 8), -300.0, dtype=torch.float16)
    loss = mse_loss(prediction, target)
    assert loss.dtype == torch.float32
    assert loss.item() == 600.0 ** 2  # 360000 overflows fp16 (max 65504)
