"""Fine-tune a Stable Diffusion model on captioned images.

    python train.py --config train.json [--key value ...]

Phases, top to bottom: plan (config, optimizer.json, data scan, schedule; torch-free) -> accelerator ->
run folder and logging -> model -> optimizer -> loop -> final save. Everything a phase needs is built by
the phase before it; the loop's changing state lives in LoopState.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass

from utils.config import (DEFAULT_CKPT_EVERY_N_MINUTES, ConfigError, ConfigProblem, LoadedConfig, TrainConfig,
                          load_config, short_usage, to_json_dict)

log = logging.getLogger("train")


# =================================================================================================
# Phase 1: configuration (torch-free, so a bad config fails before anything heavy is imported)
# =================================================================================================

@dataclass
class RunPlan:
    """The config plus every value derived from it and from the data, each with where it came from."""

    config: TrainConfig
    loaded: LoadedConfig
    optimizer_settings: object  # optimizer.optimizer_config.OptimizerSettings
    items: list  # data.items.ImageItem, the usable images
    skipped: list  # data.items.SkippedFile
    batches_per_epoch: int
    schedule: object  # optimizer.optimizer_config.ScheduleSteps
    derived: list[str]  # "name = value (origin)" lines, printed and recorded

    def plan_epoch(self, epoch: int):
        return epoch_plan(self.config, self.items, epoch)


def epoch_plan(config: TrainConfig, items: list, epoch: int):
    """The batches of one epoch (data/plan.py): a pure function of the images, the seed and the epoch."""
    from data.plan import plan_epoch

    return plan_epoch([item.bucket for item in items], config.seed, epoch, config.batch_size,
                      flip_p=config.flip_p, cond_dropout=config.cond_dropout)


def plan_run(argv: list[str]) -> RunPlan:
    """Everything decided before anything heavy loads: config, optimizer.json, data, schedule.

    Torch-free, so every mistake in the settings or the data folder is reported in about a second.
    Raises ConfigError.
    """
    from data.items import scan_dataset
    from optimizer.optimizer_config import load_optimizer_settings, schedule_steps

    loaded = load_config(argv)
    config, derived = loaded.config, []
    if config.seed == -1:
        config = dataclasses.replace(config, seed=random.SystemRandom().randint(0, 2**31 - 1))
        derived.append(f"seed = {config.seed} (random, from seed: -1)")
    if config.ckpt_every_n_minutes is None and not config.save_every_n_epochs:
        config = dataclasses.replace(config, ckpt_every_n_minutes=DEFAULT_CKPT_EVERY_N_MINUTES)
        derived.append(f"ckpt_every_n_minutes = {DEFAULT_CKPT_EVERY_N_MINUTES} (default when no save cadence is set)")
    optimizer_settings = load_optimizer_settings(config, loaded.origins)
    items, skipped = scan_dataset(config.data_root, config.resolution)
    if not items:
        reasons = "".join(f"\n    {entry.path}: {entry.reason}" for entry in skipped[:10])
        raise ConfigError([ConfigProblem("data_root", loaded.origins["data_root"], f"{config.data_root!r} holds "
                                         "no usable images (.jpg, .jpeg, .png, .bmp, .webp, .jfif), searched "
                                         f"recursively.{reasons}")])
    # The number of batches depends only on the bucket counts, so epoch 0's plan gives every epoch's.
    batches_per_epoch = len(epoch_plan(config, items, 0))
    total_optimizer_steps = math.ceil(batches_per_epoch / config.grad_accum) * config.max_epochs
    schedule = schedule_steps(total_optimizer_steps, config.lr_scheduler, config.lr_warmup_steps,
                              config.lr_decay_steps)
    derived += list(optimizer_settings.origins) + [schedule.origin]
    return RunPlan(config, loaded, optimizer_settings, items, skipped, batches_per_epoch, schedule, derived)


# =================================================================================================
# Phases 2-5: accelerator, run folder, model, optimizer
# =================================================================================================

def make_accelerator(config: TrainConfig):
    """accelerate handles the device, mixed precision and (later) several processes."""
    import torch
    from accelerate import Accelerator

    precision = "no" if config.disable_amp or not torch.cuda.is_available() else config.mixed_precision
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError([ConfigProblem("mixed_precision", "config", "bf16 is not supported by this GPU: use fp16.")])
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere+: fast fp32 matmuls, ample precision for training
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(mixed_precision=precision)


def start_run(plan: RunPlan, accelerator) -> str | None:
    """Create the run folder and logging (main process only); the folder, or None on other processes."""
    from utils.run_folder import CONFIG_FILE, create_run_folder, setup_logging, write_json

    run_dir = create_run_folder(plan.config.logdir, plan.config.project_name) if accelerator.is_main_process else None
    setup_logging(run_dir)
    if run_dir:
        write_json(os.path.join(run_dir, CONFIG_FILE), run_record(plan))
    return run_dir


def run_record(plan: RunPlan) -> dict:
    """What a run folder and every checkpoint record about the settings."""
    return {"config": to_json_dict(plan.config), "derived": plan.derived, "config_file": plan.loaded.config_file,
            "origins": {k: v for k, v in plan.loaded.origins.items() if v != "default"}}


@dataclass
class Trainee:
    """The model being trained, placed on the device: which parts train and how they are called."""

    model: object  # utils.models.SDModel (modules unwrapped, for saving)
    unet: object  # the UNet as called in training (wrapped by accelerate when trained)
    text_encoder: object
    train_unet: bool
    train_text_encoder: bool
    alphas_cumprod: object  # the training schedule's ᾱ_t, on the device

    def trained_parameters(self) -> list:
        parts = ((self.model.unet, self.train_unet), (self.model.text_encoder, self.train_text_encoder))
        return [p for module, trained in parts if trained for p in module.parameters()]


def load_trainee(config: TrainConfig, accelerator):
    """Load the model and set which parts train, their precision, attention and checkpointing."""
    import torch

    from utils.models import load_model, training_noise_scheduler

    model = load_model(config.resume_ckpt, config.logdir)
    train_unet, train_te = not config.disable_unet_training, not config.disable_textenc_training
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module, trained in ((model.unet, train_unet), (model.text_encoder, train_te), (model.vae, False)):
        module.requires_grad_(trained)  # frozen: no gradients at all, so no graph and no memory for them
        module.train(trained)
        module.to(accelerator.device, dtype=torch.float32 if trained else frozen_dtype)
    set_attention(model.unet, config.attn_type)
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if train_te:  # transformers 5 renamed the method; the old name still works, with a warning
            enable = (getattr(model.text_encoder, "activation_checkpointing_enable", None)
                      or model.text_encoder.gradient_checkpointing_enable)
            enable()
    alphas = training_noise_scheduler(model, config.train_sampler).alphas_cumprod.to(accelerator.device)
    return Trainee(model, model.unet, model.text_encoder, train_unet, train_te, alphas)


def set_attention(unet, attn_type: str) -> None:
    if attn_type == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as error:  # diffusers raises ModuleNotFoundError/ValueError when it is unusable
            raise RuntimeError(f"attn_type: xformers cannot be used ({error}). Install it with `pip install "
                               "xformers` (CUDA only), or use attn_type: sdp.") from None
    elif attn_type == "slice":
        unet.set_attention_slice("auto")  # sdp: diffusers' default scaled-dot-product attention


def prepare_optimizer(plan: RunPlan, trainee: Trainee, accelerator):
    """The optimizer over the trained parts and its schedule; accelerate wraps the trained modules."""
    from optimizer.optimizers import build_lr_schedule, build_optimizer

    model = trainee.model
    optimizer = build_optimizer(plan.optimizer_settings,
                                list(model.unet.parameters()) if trainee.train_unet else [],
                                list(model.text_encoder.parameters()) if trainee.train_text_encoder else [])
    schedule = build_lr_schedule(optimizer, plan.config.lr_scheduler, plan.schedule)
    # The schedule is stepped by hand once per optimizer step; accelerate would count processes too.
    if trainee.train_unet:
        trainee.unet = accelerator.prepare(trainee.unet)
    if trainee.train_text_encoder:
        trainee.text_encoder = accelerator.prepare(trainee.text_encoder)
    return accelerator.prepare(optimizer), schedule


# =================================================================================================
# The training step
# =================================================================================================

def train_step(trainee: Trainee, batch: dict, config: TrainConfig, global_step: int, accelerator):
    """The loss of one batch: encode images and captions, add noise, predict it back."""
    import torch

    from utils.diffusion import add_noise, mse_loss, sample_noise, sample_timesteps, step_generator, training_target

    model, device = trainee.model, accelerator.device
    generator = step_generator(config.seed, global_step, device)
    with torch.no_grad():
        pixels = batch["pixels"].to(device, dtype=model.vae.dtype, non_blocking=True)
        latents = model.vae.encode(pixels).latent_dist.sample(generator).float() * model.vae.config.scaling_factor
    noise = sample_noise(latents, generator, config.zero_frequency_noise_ratio)
    timesteps = sample_timesteps(len(latents), config.timestep_start, config.timestep_end, generator, device)
    noisy_latents = add_noise(latents, noise, timesteps, trainee.alphas_cumprod)
    input_ids = model.family.tokenize(model.tokenizer, batch["captions"]).to(device)
    with torch.set_grad_enabled(trainee.train_text_encoder):
        conditioning = model.family.encode(trainee.text_encoder, input_ids, config.clip_skip)
    with accelerator.autocast():
        prediction = trainee.unet(noisy_latents, timesteps, conditioning.hidden_states,
                                  **conditioning.unet_kwargs).sample
    target = training_target(model.prediction_type, latents, noise, timesteps, trainee.alphas_cumprod)
    return mse_loss(prediction, target)


# =================================================================================================
# Periodic actions
# =================================================================================================

def periodic_save_due(config: TrainConfig, state, end_of_epoch: bool, accelerator) -> bool:
    """Whether a periodic checkpoint is due now (the final save is separate).

    The minutes are the main process's clock, shared with the others, so all processes agree.
    """
    if state.epoch < config.save_ckpts_from_n_epochs:
        return False
    by_epochs = (end_of_epoch and bool(config.save_every_n_epochs) and state.epoch % config.save_every_n_epochs == 0
                 and state.epoch < config.max_epochs)
    by_minutes = (bool(config.ckpt_every_n_minutes)
                  and state.elapsed_seconds - state.last_save_seconds >= config.ckpt_every_n_minutes * 60)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        by_minutes = broadcast_object_list([by_minutes])[0]
    return by_epochs or by_minutes


def save_checkpoint(plan: RunPlan, trainee: Trainee, state, run_dir: str, accelerator, prefix: str = "") -> None:
    """A diffusers folder in <run>/ckpts/ and, unless no_save_ckpt, a single-file .safetensors."""
    from utils.checkpoint import checkpoint_name, save_pipeline
    from utils.single_file import save_single_file

    accelerator.wait_for_everyone()
    state.last_save_seconds = state.elapsed_seconds  # on every process: they decide the next save together
    if not accelerator.is_main_process:
        return
    config, model = plan.config, trainee.model
    name = checkpoint_name(config.project_name, state.epoch, state.global_step, prefix)
    pipeline = model.family.pipeline_class()(**model.components(), safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    record = {**state.to_dict(), "family": model.family.name, "base_model": model.source}
    folder = save_pipeline(os.path.join(run_dir, "ckpts", name), pipeline, record, run_record(plan))
    log.info("saved %s", folder)
    if not config.no_save_ckpt:
        target_dir = config.save_ckpt_dir or os.getcwd()
        os.makedirs(target_dir, exist_ok=True)
        path = save_single_file(os.path.join(target_dir, name + ".safetensors"), model.family.name, model.unet,
                                model.vae, model.text_encoder, half=not config.save_full_precision)
        log.info("saved %s (%s)", path, "fp32" if config.save_full_precision else "fp16")


# =================================================================================================
# Start-up summary
# =================================================================================================

def log_summary(plan: RunPlan, trainee: Trainee, run_dir: str, accelerator) -> None:
    from collections import Counter

    config, items = plan.config, plan.items
    log.info("model: %s", trainee.model.describe())
    trained = [name for name, on in (("UNet", trainee.train_unet), ("text encoder", trainee.train_text_encoder)) if on]
    log.info("training: %s on %s, mixed precision %s", " + ".join(trained), accelerator.device,
             accelerator.mixed_precision)
    buckets = Counter(item.bucket for item in items)
    log.info("data: %d images in %s, %d buckets at resolution %d: %s", len(items), config.data_root, len(buckets),
             config.resolution, ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(buckets.items())))
    effective = config.batch_size * config.grad_accum * accelerator.num_processes
    log.info("batch: %d x grad_accum %d x %d process(es) = %d images per optimizer step", config.batch_size,
             config.grad_accum, accelerator.num_processes, effective)
    log.info("steps: %d per epoch (smaller batches close buckets that do not divide evenly), %d in %d epochs",
             plan.batches_per_epoch, plan.batches_per_epoch * config.max_epochs, config.max_epochs)
    for line in plan.derived:
        log.info("  %s", line)
    for note in plan.loaded.notes + list(plan.optimizer_settings.notes):
        log.warning("note: %s", note)
    log.info("run folder: %s (tensorboard --logdir %s)", run_dir, config.logdir)
    log.info("single-file checkpoints: %s", "off" if config.no_save_ckpt else (config.save_ckpt_dir or os.getcwd()))


# =================================================================================================
# Main
# =================================================================================================

def main(argv: list[str]) -> int:
    if not argv:
        print(short_usage())
        return 0
    try:
        plan = plan_run(argv)
        accelerator = make_accelerator(plan.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    run_dir = start_run(plan, accelerator)
    for entry in plan.skipped:
        log.warning("skipped %s: %s", entry.path, entry.reason)
    return train(plan, accelerator, run_dir)


def train(plan: RunPlan, accelerator, run_dir: str | None) -> int:
    from data.dataset import EpochBatches, default_num_workers, make_loader
    from utils.loop_state import LoopState
    from utils.models import ModelLoadError
    from utils.tracker import make_tracker

    config, batches_per_epoch = plan.config, plan.batches_per_epoch
    try:
        trainee = load_trainee(config, accelerator)
    except (ModelLoadError, RuntimeError) as error:
        log.error("%s", error)
        return 2
    optimizer, schedule = prepare_optimizer(plan, trainee, accelerator)
    log_summary(plan, trainee, run_dir, accelerator)
    tracker = make_tracker(run_dir, accelerator.is_main_process)
    tracker.text("config", "\n".join(f"    {k}: {v}" for k, v in to_json_dict(config).items()))
    epoch_batches = EpochBatches()
    loader = make_loader(plan.items, epoch_batches, default_num_workers() if config.num_workers is None else
                         config.num_workers, pin_memory=accelerator.device.type == "cuda")
    state, meter = LoopState(), LossMeter()
    progress = make_progress(batches_per_epoch * config.max_epochs, accelerator.is_main_process)

    while state.epoch < config.max_epochs:
        epoch_batches.set_plan(plan.plan_epoch(state.epoch))
        meter.start_epoch()
        for state.batch_in_epoch, batch in enumerate(loader):
            loss = train_batch(trainee, batch, optimizer, schedule, config, state, batches_per_epoch, accelerator)
            state.global_step += 1
            state.elapsed_seconds = meter.add(loss)
            progress.update(1)
            progress.set_postfix(epoch=f"{state.epoch + 1}/{config.max_epochs}", loss=f"{loss:.4f}",
                                 lr=f"{schedule.get_last_lr()[0]:.2e}")
            if state.global_step % config.log_step == 0:
                tracker.scalars(meter.log_step_scalars(schedule, trainee, config.batch_size), state.global_step)
            if periodic_save_due(config, state, False, accelerator):
                save_checkpoint(plan, trainee, state, run_dir, accelerator)
        state.epoch += 1
        tracker.scalars(meter.epoch_scalars(), state.global_step)
        log.info("epoch %d/%d: %s", state.epoch, config.max_epochs, meter.epoch_summary())
        if periodic_save_due(config, state, True, accelerator):
            save_checkpoint(plan, trainee, state, run_dir, accelerator)

    progress.close()
    save_checkpoint(plan, trainee, state, run_dir, accelerator, prefix="" if config.no_prepend_last else "last-")
    tracker.close()
    log.info("done: %d steps in %.1f min", state.global_step, state.elapsed_seconds / 60)
    return 0


def train_batch(trainee: Trainee, batch: dict, optimizer, schedule, config: TrainConfig, state,
                batches_per_epoch: int, accelerator) -> float:
    """Accumulate one batch's gradients; step the optimizer when its grad_accum group is complete.

    Groups are counted within the epoch, and the epoch's last group may be shorter: each batch's loss is
    divided by its group's real size, so a group's update is the average over its batches.
    """
    group_start = state.batch_in_epoch - state.batch_in_epoch % config.grad_accum
    group_size = min(config.grad_accum, batches_per_epoch - group_start)
    steps_now = state.batch_in_epoch == group_start + group_size - 1
    with gradient_sync(accelerator, trainee, enabled=steps_now):
        loss = train_step(trainee, batch, config, state.global_step, accelerator)
        accelerator.backward(loss / group_size)
    if steps_now:
        if config.clip_grad_norm:
            accelerator.clip_grad_norm_(trainee.trained_parameters(), config.clip_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        state.optimizer_step += 1
    return loss.item()


def gradient_sync(accelerator, trainee: Trainee, enabled: bool):
    """Skip the cross-process gradient all-reduce on batches that do not end an accumulation group."""
    import contextlib

    stack = contextlib.ExitStack()
    if not enabled:
        for module, trained in ((trainee.unet, trainee.train_unet), (trainee.text_encoder, trainee.train_text_encoder)):
            if trained:
                stack.enter_context(accelerator.no_sync(module))
    return stack


def make_progress(total_steps: int, is_main_process: bool):
    """A step progress bar on the main process; tqdm hides it when the output is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total_steps, unit="step", dynamic_ncols=True, disable=None if is_main_process else True)


class LossMeter:
    """Losses and timings for the log-step and epoch scalars."""

    def __init__(self):
        self.started = time.monotonic()
        self.since_log: list[float] = []
        self.epoch: list[float] = []
        self.log_started = self.epoch_started = self.started

    def start_epoch(self) -> None:
        self.epoch, self.epoch_started = [], time.monotonic()

    def add(self, loss: float) -> float:
        """Record a step's loss; the training seconds so far."""
        self.since_log.append(loss)
        self.epoch.append(loss)
        return time.monotonic() - self.started

    def log_step_scalars(self, schedule, trainee: Trainee, batch_size: int) -> dict[str, float]:
        """Mean loss, lrs and throughput since the last log step, under EveryDream2's tag names."""
        now = time.monotonic()
        groups = [name for name, on in (("unet", trainee.train_unet), ("text encoder", trainee.train_text_encoder))
                  if on]
        values = {"loss/log_step": sum(self.since_log) / len(self.since_log),
                  "performance/images per second": len(self.since_log) * batch_size / max(now - self.log_started, 1e-9)}
        values.update({f"hyperparameter/lr {name}": lr for name, lr in zip(groups, schedule.get_last_lr())})
        self.since_log, self.log_started = [], now
        return values

    def epoch_scalars(self) -> dict[str, float]:
        return {"loss/epoch": sum(self.epoch) / len(self.epoch),
                "performance/minutes per epoch": (time.monotonic() - self.epoch_started) / 60}

    def epoch_summary(self) -> str:
        return f"mean loss {sum(self.epoch) / len(self.epoch):.4f}, {(time.monotonic() - self.epoch_started) / 60:.2f} min"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
