"""The diffusion maths (utils/diffusion.py) against diffusers' scheduler and against closed forms."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from utils.diffusion import (add_noise, sample_noise, sample_timesteps, step_generator, training_target,
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


def test_step_generator_gives_each_process_its_own_stream():
    first, second = (torch.randn(16, generator=step_generator(555, 42, CPU, process)) for process in (0, 1))
    assert not torch.equal(first, second)
    single = torch.randn(16, generator=torch.Generator().manual_seed(555 * 1_000_003 + 42))  # the stream before
    assert torch.equal(first, single)  # processes came in: one process draws what it drew before


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


def mse_loss(prediction, target):
    """The batch loss as train_step computes it for loss_type mse and no weights."""
    from utils.diffusion import per_sample_loss, weighted_mean

    return weighted_mean(per_sample_loss(prediction, target, "mse"))


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


# =================================================================================================
# Pyramid noise, min-SNR, loss types, embedding perturbation, zero-terminal SNR
# =================================================================================================

from utils.diffusion import (min_snr_weights, per_sample_loss, perturb_embeddings, pyramid_noise,  # noqa: E402
                             snr, weighted_mean)


def neighbour_correlation(noise):
    """Correlation of horizontally adjacent values: 0 for white noise, higher for low-frequency noise."""
    a, b = noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_pyramid_noise_is_off_at_zero_and_unit_variance_low_frequency_noise_when_on():
    latents = torch.zeros(8, 4, 64, 64)
    plain = sample_noise(latents, torch.Generator().manual_seed(1))
    assert torch.equal(sample_noise(latents, torch.Generator().manual_seed(1), 0.0, 0.0), plain)
    pyramid = sample_noise(latents, torch.Generator().manual_seed(1), 0.0, 0.8)
    assert torch.allclose(pyramid.std(dim=(1, 2, 3)), torch.ones(8), atol=1e-5)  # scaled back per image
    assert abs(neighbour_correlation(plain)) < 0.02
    assert neighbour_correlation(pyramid) > 0.2  # coarse levels make neighbours alike
    assert neighbour_correlation(sample_noise(latents, torch.Generator().manual_seed(1), 0.0, 0.3)) < \
        neighbour_correlation(pyramid)  # a smaller discount, less low-frequency energy


def test_pyramid_noise_goes_down_to_a_single_pixel(monkeypatch):
    """Every level's size comes from the full size, so the pyramid reaches 1x1 (EveryDream2 stopped after 2-3)."""
    sizes = []
    original = torch.nn.functional.interpolate

    def record(tensor, size, mode):
        sizes.append(tuple(tensor.shape[-2:]))
        return original(tensor, size, mode=mode)

    monkeypatch.setattr(torch.nn.functional, "interpolate", record)
    pyramid_noise(torch.randn(2, 4, 64, 96), torch.Generator().manual_seed(0), 0.5)
    assert sizes[-1] == (1, 1) and len(sizes) >= 3
    assert all(a[0] >= b[0] and a[1] >= b[1] for a, b in zip(sizes, sizes[1:]))


def test_snr_matches_diffusers_compute_snr(scheduler):
    from diffusers.training_utils import compute_snr

    timesteps = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(snr(scheduler.alphas_cumprod, timesteps), compute_snr(scheduler, timesteps), rtol=1e-5)


def test_min_snr_weights_follow_the_paper_for_epsilon_and_v():
    values = torch.tensor([0.01, 1.0, 5.0, 20.0, 400.0])
    gamma = 5.0
    eps = min_snr_weights(values, gamma, "epsilon")
    v = min_snr_weights(values, gamma, "v_prediction")
    assert torch.allclose(eps, torch.minimum(values, torch.tensor(gamma)) / values)
    assert torch.allclose(v, torch.minimum(values, torch.tensor(gamma)) / (values + 1))
    assert torch.allclose(eps[:3], torch.ones(3))  # low SNR (noisy) timesteps keep full weight for epsilon
    assert eps[-1] == pytest.approx(gamma / 400) and v[-1] == pytest.approx(gamma / 401)


def test_min_snr_weights_at_zero_snr_are_the_limits():
    zero = torch.tensor([0.0])
    assert min_snr_weights(zero, 5.0, "epsilon").item() == 1.0
    assert min_snr_weights(zero, 5.0, "v_prediction").item() == 0.0


def test_loss_types_against_closed_forms():
    prediction = torch.tensor([[0.0, 0.0], [0.0, 0.0]]).reshape(2, 2, 1, 1)
    target = torch.tensor([[0.5, 3.0], [0.5, 3.0]]).reshape(2, 2, 1, 1)
    mse = (0.25 + 9.0) / 2
    huber = (0.5 * 0.25 + (3.0 - 0.5)) / 2  # 0.5 x² below delta 1, |x| - 0.5 above
    assert per_sample_loss(prediction, target, "mse").tolist() == pytest.approx([mse, mse])
    assert per_sample_loss(prediction, target, "huber").tolist() == pytest.approx([huber, huber])
    fraction = torch.tensor([0.0, 1.0])  # timestep 0 and the last one
    assert per_sample_loss(prediction, target, "mse_huber", fraction).tolist() == pytest.approx([huber, mse])
    assert per_sample_loss(prediction, target, "huber_mse", fraction).tolist() == pytest.approx([mse, huber])
    half = per_sample_loss(prediction, target, "mse_huber", torch.tensor([0.5, 0.5]))
    assert half.tolist() == pytest.approx([(mse + huber) / 2] * 2)


def test_weighted_mean_applies_every_weight_per_sample():
    losses = torch.tensor([1.0, 2.0, 4.0])
    assert weighted_mean(losses).item() == pytest.approx(7 / 3)
    assert weighted_mean(losses, torch.tensor([1.0, 0.0, -1.0]), None, torch.tensor([2.0, 1.0, 0.5])).item() == \
        pytest.approx((2.0 + 0.0 - 2.0) / 3)


def test_embedding_perturbation_has_the_documented_scale():
    hidden = torch.zeros(64, 77, 768)
    perturbed = perturb_embeddings(hidden, 0.5, torch.Generator().manual_seed(0))
    assert perturbed.std().item() == pytest.approx(0.5 / 768 ** 0.5, rel=0.02)


def test_zero_terminal_snr_rescales_the_training_schedule_and_the_saved_sampler():
    from utils.models import SDModel, training_noise_scheduler, zero_terminal_snr_inference_scheduler
    from utils.model_family import SD1
    from utils.tiny_model import tiny_scheduler

    model = SDModel(None, None, None, None, tiny_scheduler(), SD1, "test")
    plain = training_noise_scheduler(model).alphas_cumprod
    rescaled = training_noise_scheduler(model, zero_terminal_snr=True).alphas_cumprod
    assert plain[-1] > 1e-3 and rescaled[-1] < 1e-6  # the last timestep is (nearly exactly) pure noise
    assert rescaled[0] == pytest.approx(plain[0].item(), rel=1e-3)  # the first stays where it was
    sampler = zero_terminal_snr_inference_scheduler(model)
    assert sampler.config.rescale_betas_zero_snr and sampler.config.timestep_spacing == "trailing"
    assert not sampler.config.clip_sample and not sampler.config.set_alpha_to_one
    # a model saved that way trains without the rescaling when the next session does not ask for it
    saved = SDModel(None, None, None, None, sampler, SD1, "saved")
    assert training_noise_scheduler(saved).alphas_cumprod[-1] > 1e-3
