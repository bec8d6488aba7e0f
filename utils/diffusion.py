"""Diffusion training maths as small pure tensor functions (torch only, no diffusers).

Each takes the noise schedule as a tensor `alphas_cumprod` (ᾱ_t, one value per timestep) and its random
numbers from an explicit generator, so a step is reproducible from (seed, step) alone.
"""

from __future__ import annotations

import torch


def step_generator(seed: int, global_step: int, device: torch.device) -> torch.Generator:
    """The random stream for one training step: noise, timesteps and the VAE's latent sample.

    Derived from (seed, step), so a run resumed at any step draws exactly what it would have drawn.
    """
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + global_step)


def sample_timesteps(batch_size: int, start: int, end: int, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """Timesteps drawn uniformly from [start, end)."""
    return torch.randint(start, end, (batch_size,), generator=generator, device=device)


def sample_noise(latents: torch.Tensor, generator: torch.Generator,
                 zero_frequency_noise_ratio: float = 0.0) -> torch.Tensor:
    """Gaussian noise shaped like `latents`, plus optional offset (zero-frequency) noise.

    Offset noise adds one random constant per image and channel, which lets the model shift the mean
    brightness of an image: N. Guttenberg, "Diffusion with offset noise" (2023),
    https://www.crosslabs.org/blog/diffusion-with-offset-noise
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if zero_frequency_noise_ratio > 0:
        batch, channels = latents.shape[:2]
        offset = torch.randn((batch, channels, 1, 1), generator=generator, device=latents.device,
                             dtype=latents.dtype)
        noise = noise + zero_frequency_noise_ratio * offset
    return noise


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


def mse_loss(prediction: torch.Tensor, target: torch.Tensor, loss_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error, computed in fp32 whatever the autocast dtype.

    `loss_scale` (one number per sample, from the data's `loss_scale`) weights each sample's mean error;
    with all ones this is the plain mean over every element.
    """
    per_sample = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.flatten(1).mean(dim=1)
    if loss_scale is not None:
        per_sample = per_sample * loss_scale.to(per_sample.device, torch.float32)
    return per_sample.mean()
