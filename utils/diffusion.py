"""Diffusion training maths as small pure tensor functions (torch only, no diffusers).

Each takes the noise schedule as a tensor `alphas_cumprod` (ᾱ_t, one value per timestep) and its random
numbers from an explicit generator, so a step is reproducible from (seed, step) alone.
"""

from __future__ import annotations

import random

import torch


def step_generator(seed: int, global_step: int, device: torch.device, process: int = 0) -> torch.Generator:
    """The random stream for one training step: noise, timesteps and the VAE's latent sample.

    Derived from (seed, step), so a run resumed at any step draws exactly what it would have drawn; in a
    multi-GPU run each process draws its own stream (process 0's is the single-process one).
    """
    # The CPU generator keeps 32 bits of the seed: processes are 2^24 steps apart in that space.
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + global_step + process * 2**24) % 2**32)


def sample_timesteps(batch_size: int, start: int, end: int, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """Timesteps drawn uniformly from [start, end)."""
    return torch.randint(start, end, (batch_size,), generator=generator, device=device)


def sample_noise(latents: torch.Tensor, generator: torch.Generator, zero_frequency_noise_ratio: float = 0.0,
                 pyramid_discount: float = 0.0) -> torch.Tensor:
    """Gaussian noise shaped like `latents`, plus optional pyramid and offset (zero-frequency) noise.

    Pyramid noise is applied first, then offset noise, as in EveryDream2.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if pyramid_discount > 0:
        noise = pyramid_noise(noise, generator, pyramid_discount)
    if zero_frequency_noise_ratio > 0:
        noise = noise + zero_frequency_noise_ratio * offset_noise(latents, generator)
    return noise


def offset_noise(latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random constant per image and channel, (batch, C, 1, 1): it lets the model shift the mean
    brightness of an image. N. Guttenberg, "Diffusion with offset noise" (2023),
    https://www.crosslabs.org/blog/diffusion-with-offset-noise"""
    batch, channels = latents.shape[:2]
    return torch.randn((batch, channels, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)


PYRAMID_SHRINK = (2.0, 4.0)  # each level is this many times smaller than the one before (drawn once per step)


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, discount: float) -> torch.Tensor:
    """Multi-resolution noise: noise at 1/r, 1/r², ... of the size, upsampled and added with weights
    discount, discount², ..., down to a single latent pixel; then scaled back to unit variance per image.

    J. Whitaker, "Multi-resolution noise for diffusion model training" (2023),
    https://wandb.ai/johnowhitaker/multires_noise/reports/--VmlldzozNjYyOTU2 . Each level's size is taken
    from the full size (EveryDream2 shrank an already shrunk size, so only 2-3 levels were ever used).
    """
    batch, channels, height, width = noise.shape
    # Drawn on the CPU from the step's seed: reading a number drawn on the GPU would wait for the GPU.
    shrink = random.Random(generator.initial_seed()).uniform(*PYRAMID_SHRINK)
    result, level = noise.clone(), 1
    while True:
        size = (max(1, int(height / shrink**level)), max(1, int(width / shrink**level)))
        coarse = torch.randn((batch, channels, *size), generator=generator, device=noise.device, dtype=noise.dtype)
        result = result + discount**level * torch.nn.functional.interpolate(coarse, (height, width), mode="bilinear")
        if size == (1, 1):
            break
        level += 1
    return result / result.std(dim=(1, 2, 3), keepdim=True)


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] for each sample, shaped to broadcast over a (batch, C, H, W) tensor."""
    picked = values.to(like.device)[timesteps].to(like.dtype)
    return picked.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε: the forward process in closed form (Ho et al. 2020, eq. 4,
    arXiv 2006.11239)."""
    alpha_bar = _per_sample(alphas_cumprod, timesteps, latents)
    return alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise


def velocity(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0: the v-prediction target (Salimans & Ho 2022, §4,
    arXiv 2202.00512), used by SD 2.x 768-v models."""
    alpha_bar = _per_sample(alphas_cumprod, timesteps, latents)
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents


def training_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon models) or the velocity (v models)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(latents, noise, timesteps, alphas_cumprod)
    raise ValueError(f"prediction type {prediction_type!r} is not supported (epsilon or v_prediction)")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) per sample (the same values as diffusers'
    training_utils.compute_snr, without needing a scheduler object)."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, arXiv 2303.09556), for the prediction the model makes.

    The paper weights the x0 loss by min(SNR, γ). The ε loss is SNR times the x0 loss, so its weight is
    min(SNR, γ) / SNR; the v loss is (SNR + 1) times it, so min(SNR, γ) / (SNR + 1). (EveryDream2 used the
    ε form for v models too.) With zero-terminal SNR the last timestep has SNR 0: its ε weight is the limit, 1.
    """
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1)
    if prediction_type == "epsilon":
        return torch.where(snr_values > 0, clipped / snr_values.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
    raise ValueError(f"prediction type {prediction_type!r} is not supported (epsilon or v_prediction)")


LOSS_TYPES = ("mse", "huber", "mse_huber", "huber_mse")
HUBER_DELTA = 1.0  # quadratic below, linear above: 0.5 x² near 0


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "mse",
                    timestep_fraction: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each sample (the mean over its elements), computed in fp32 whatever the autocast dtype.

    - mse: squared error;
    - huber: Huber loss with delta 1, robust to outliers (0.5 x² near 0, linear far away);
    - mse_huber: a blend over timesteps, Huber at t = 0 moving linearly to MSE at the last timestep
      (the direction of EveryDream2's code; its docs state the reverse); `timestep_fraction` is t / T;
    - huber_mse: the mirror, MSE at t = 0 and Huber at the last timestep.
    """
    prediction, target = prediction.float(), target.float()
    squared = torch.nn.functional.mse_loss(prediction, target, reduction="none").flatten(1).mean(dim=1)
    if loss_type == "mse":
        return squared
    huber = torch.nn.functional.huber_loss(prediction, target, reduction="none", delta=HUBER_DELTA)
    huber = huber.flatten(1).mean(dim=1)
    if loss_type == "huber":
        return huber
    if timestep_fraction is None:
        raise ValueError(f"loss_type {loss_type} needs the timesteps")
    to_mse = timestep_fraction.float().to(squared.device)
    if loss_type == "mse_huber":
        return to_mse * squared + (1 - to_mse) * huber
    if loss_type == "huber_mse":
        return (1 - to_mse) * squared + to_mse * huber
    raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


def weighted_mean(per_sample: torch.Tensor, *weights: torch.Tensor | None) -> torch.Tensor:
    """The batch loss: each sample's loss times its weights (loss_scale, min-SNR), averaged. A weight from the
    data loader's pinned memory is copied without waiting: a blocking copy would wait for the whole forward pass."""
    for weight in weights:
        if weight is not None:
            per_sample = per_sample * weight.to(per_sample.device, torch.float32, non_blocking=True)
    return per_sample.mean()


def denoising_losses(predict, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     alphas_cumprod: torch.Tensor, prediction_type: str, loss_type: str = "mse",
                     min_snr_gamma: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sample's loss at predicting the target back from the noised latents, and its min-SNR weight
    (None without min_snr_gamma): the training objective, shared by training and the validation loss.

    `predict(noisy_latents, timesteps)` is the model's prediction (the UNet with its text conditioning).
    """
    prediction = predict(add_noise(latents, noise, timesteps, alphas_cumprod), timesteps)
    target = training_target(prediction_type, latents, noise, timesteps, alphas_cumprod)
    losses = per_sample_loss(prediction, target, loss_type, timesteps / len(alphas_cumprod))
    if not min_snr_gamma:
        return losses, None
    return losses, min_snr_weights(snr(alphas_cumprod, timesteps), min_snr_gamma, prediction_type)


def perturb_embeddings(hidden_states: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Text embeddings plus Gaussian noise of standard deviation strength / sqrt(dim), in training only
    ("embedding perturbation", arXiv 2405.20494, as EveryDream2's embedding_perturbation)."""
    noise = torch.randn(hidden_states.shape, generator=generator, device=hidden_states.device,
                        dtype=hidden_states.dtype)
    return hidden_states + noise * (strength / hidden_states.shape[-1] ** 0.5)
