"""Validation loss during a run: each set of data/validation.py's plan measured with the training loss
(loss type, min-SNR, offset and pyramid noise as configured), with every image's latent sample, timestep
and noise drawn from its own fixed seed, so two values of a curve differ only because the model changed.

Images are loaded in the training process (validation sets are small); with several processes each loads
and measures its share of all the sets' batches. Nothing here touches a global random generator, a gradient or a
module's mode for good.
"""

from __future__ import annotations

import logging

import torch

from data.dataset import Collate, PlannedImages
from utils import diffusion
from utils.latent_cache import posterior_from
from utils.samples import eval_mode

log = logging.getLogger("train")


class Validation:
    """The validation sets of a run and when to measure them."""

    def __init__(self, plan, batches_per_epoch: list[int], tokenize):
        self.plan = plan  # data.validation.ValidationPlan
        self.due_steps = {point.global_step for point in plan.schedule(batches_per_epoch)}
        self.collate = Collate(tokenize)

    def due(self, global_step: int) -> bool:
        return global_step in self.due_steps

    @property
    def watched_tag(self) -> str | None:
        """The curve early stopping and save_best_val watch: the held-out sets' mean, or the one held-out
        set; None when every set is also trained on."""
        held_out = self.plan.held_out
        return self.plan.combined_tag or (self.plan.tags[held_out[0]] if held_out else None)

    def measure(self, trainee, config, accelerator) -> dict[str, float]:
        """{tag: loss} for every set (and the held-out sets' mean when there are several).

        With several processes each measures every n-th batch of all the sets' batches and the sums are added
        up, so the values are those one process would measure, in about 1/n of the time.
        """
        from utils.processes import sum_over_processes

        sums = self.share_sums(trainee, config, accelerator)
        totals = sum_over_processes(accelerator, *(value for name in self.plan.sets for value in sums[name]))
        losses = {name: totals[2 * i] / max(1, totals[2 * i + 1]) for i, name in enumerate(self.plan.sets)}
        values = {self.plan.tags[name]: loss for name, loss in losses.items()}
        if self.plan.combined_tag:
            values[self.plan.combined_tag] = sum(losses[name] for name in self.plan.held_out) / len(self.plan.held_out)
        return values

    def adopt(self, state) -> None:
        """Take over a resumed run's loop state (utils.loop_state.LoopState). One saved before the state kept
        each curve's first value held its best validation loss relative to it, not comparable with the losses
        now compared: it is forgotten, and the next validation sets it anew."""
        if self.plan.settings.use_relative_loss and state.best_validation_loss is not None \
                and not state.first_validation_losses:
            state.best_validation_loss, state.validations_without_improvement = None, 0

    def logged(self, values: dict[str, float], first: dict[str, float]) -> dict[str, float]:
        """The values as logged: with use_relative_loss, each minus its curve's first value (`first`, from the
        run's LoopState, takes the values of curves measured for the first time)."""
        if not self.plan.settings.use_relative_loss:
            return values
        for tag, value in values.items():
            first.setdefault(tag, value)
        return {tag: value - first[tag] for tag, value in values.items()}

    @torch.no_grad()
    def share_sums(self, trainee, config, accelerator) -> dict[str, tuple[float, int]]:
        """{set: (sum of the losses, images measured)} over this process's share of all the sets' batches
        (each image counts once, whatever its batch)."""
        every_batch = [(name, samples) for name in self.plan.sets for samples in self.plan.batches(name)]
        sums = {name: (0.0, 0) for name in self.plan.sets}
        with eval_mode(trainee.model.unet, trainee.model.text_encoder):
            for name, samples in every_batch[accelerator.process_index::accelerator.num_processes]:
                images, seeds = PlannedImages(self.plan.sets[name]), self.plan.seeds[name]
                batch = self.collate([images[sample] for sample in samples])
                if batch["pixels"] is None:
                    continue  # none of its images could be read (reported by the training loader when it trains)
                per_image = image_losses(trainee, batch, [seeds[i] for i in batch["indices"]], config, accelerator)
                total, count = sums[name]
                sums[name] = (total + float(per_image.sum()), count + len(per_image))
        return sums


def image_losses(trainee, batch: dict, seeds: list[int], config, accelerator) -> torch.Tensor:
    """The training loss of each image, with its latent sample, timestep and noise drawn from its own seed.

    It calls the plain modules: a process measures alone, so DistributedDataParallel's wrapper (whose
    forward expects every process to join in) must not take part.
    """
    model, device = trainee.model, accelerator.device
    with accelerator.autocast():
        distribution = posterior_from(model.vae.encode(batch["pixels"].to(device)).latent_dist.parameters)
        generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        latents = torch.cat([distribution.mean[i:i + 1] + distribution.std[i:i + 1] * torch.randn(
            distribution.mean[i:i + 1].shape, generator=g, device=device) for i, g in enumerate(generators)])
        latents = latents.contiguous() * model.vae.config.scaling_factor  # as train_step
        timesteps = torch.cat([diffusion.sample_timesteps(1, config.timestep_start, config.timestep_end, g, device)
                               for g in generators])
        noise = torch.cat([diffusion.sample_noise(latents[i:i + 1], g, config.zero_frequency_noise_ratio,
                                                  config.pyramid_noise_discount or 0.0)
                           for i, g in enumerate(generators)])
        conditioning = model.family.encode(model.text_encoder, batch["input_ids"].to(device), config.clip_skip)
        losses, snr_weights = diffusion.denoising_losses(
            lambda noisy, t: model.unet(noisy, t, conditioning.hidden_states, **conditioning.unet_kwargs).sample,
            latents, noise, timesteps, trainee.alphas_cumprod, model.prediction_type, config.loss_type,
            config.min_snr_gamma)
    return losses if snr_weights is None else losses * snr_weights
