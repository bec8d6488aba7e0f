"""Fine-tune a Stable Diffusion model on captioned images.

    python train.py --config train.json [--key value ...]

Phases, top to bottom: plan (utils/run_plan.py: config, optimizer.json, data scan, schedule; torch-free)
-> accelerator -> run folder and logging -> model -> optimizer -> loop -> final save. Everything a phase
needs is built by the phase before it; the loop's changing state lives in LoopState.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass

from utils.config import ConfigError, ConfigProblem, TrainConfig, short_usage, to_json_dict
from utils.run_plan import RunPlan, plan_run

log = logging.getLogger("train")


# =================================================================================================
# Phases 2-5: accelerator, run folder, model, optimizer
# =================================================================================================

def make_accelerator(plan: RunPlan):
    """accelerate handles the device and mixed precision. Raises ConfigError."""
    import torch
    from accelerate import Accelerator

    config = plan.config
    cuda = torch.cuda.is_available()
    precision = "no" if config.disable_amp or not cuda else config.mixed_precision
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError([ConfigProblem("mixed_precision", plan.loaded.origins["mixed_precision"],
                                         "bf16 needs an Ampere or newer GPU: use fp16.")])
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere+: fast fp32 matmuls, ample precision for training
        torch.backends.cudnn.allow_tf32 = True
    handlers = []
    if precision == "fp16" and plan.optimizer_settings.grad_scaler_step_tweaks:
        from accelerate.utils import GradScalerKwargs

        from optimizer.optimizer_config import GRAD_SCALER_START

        handlers.append(GradScalerKwargs(**GRAD_SCALER_START))
    handlers += multi_process_settings(config)
    # torch.compile is not used: on the CPU it was slower and took minutes to compile, and on GPUs it is
    # unmeasured (doc/PERFORMANCE.md, "torch.compile"). An accelerate config that asks for it
    # (ACCELERATE_DYNAMO_BACKEND, set by `accelerate launch --dynamo_backend`) would compile the trained
    # modules, and recompile them for every bucket, untested: it is turned off, and said so.
    dynamo_backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no")
    if dynamo_backend.lower() != "no":
        log.warning("note: accelerate's dynamo_backend (%s) is ignored: train.py does not torch.compile its models "
                    "(doc/PERFORMANCE.md)", dynamo_backend)
    # cpu=True without CUDA: several processes then train on the CPU with gloo (tests, and a launch on a
    # machine without GPUs) instead of each training alone.
    accelerator = Accelerator(mixed_precision=precision, kwargs_handlers=handlers, cpu=not cuda, dynamo_backend="no")
    if accelerator.num_processes != plan.data_options.processes:
        raise ConfigError([ConfigProblem("launch", "command line", (
            f"{accelerator.num_processes} processes, but WORLD_SIZE says {plan.data_options.processes}: launch "
            "with accelerate launch or torchrun, which set WORLD_SIZE (doc/MULTIGPU.md)."))])
    why = "disable_amp" if config.disable_amp else ("mixed_precision" if cuda else "CPU trains in fp32")
    plan.derived.append(f"mixed precision = {precision} ({why}) on {accelerator.device}")
    return accelerator


# What accelerate launch sets for a launch that shards the model (--use_fsdp, --use_deepspeed, an accelerate
# config file's distributed_type), and the name to tell the user.
SHARDED_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def refuse_sharded_launch() -> None:
    """train.py trains with plain data parallelism: every process holds the whole model (its saves, samples,
    EMA and validation use the process's own copy), and it prepares its models and optimizer one by one, which
    accelerate's FSDP and DeepSpeed integrations expect to wrap together (a two-process FSDP launch on the CPU
    ended in a traceback inside accelerate; on GPUs it was never tried). Such a launch is refused before the
    model loads, a dry run's too. The variables are read as accelerate reads them ("true", in any case).
    Raises ConfigError."""
    asked = [(variable, name) for variable, name in SHARDED_LAUNCHES.items()
             if os.environ.get(variable, "false").lower() == "true"]
    if asked:
        variable, name = asked[0]
        raise ConfigError([ConfigProblem("launch", f"accelerate launch ({variable})", (
            f"{name} is not supported: train.py trains with plain data parallelism, each GPU holding the whole "
            "model (doc/MULTIGPU.md). Launch with `accelerate launch --multi_gpu`, or an accelerate config whose "
            "distributed_type is MULTI_GPU; on a small GPU, gradient_checkpointing and optimizer adamw8bit "
            "save the memory instead."))])


def multi_process_settings(config: TrainConfig) -> list:
    """How DistributedDataParallel and the process group are set up when several processes train."""
    from accelerate.utils import DistributedDataParallelKwargs

    from utils.processes import process_group_settings

    # find_unused_parameters: with clip_skip the text encoder's last layers get no gradient, and gradient
    # averaging must be told not to wait for them (clip_skip may change live with load_settings_every_epoch).
    # broadcast_buffers off: no buffer of the UNet or text encoder changes in training, and the broadcast at
    # each forward would pair wrongly when one process runs an extra forward (train_batch's stand-in).
    unused = not config.disable_textenc_training and (config.clip_skip > 1 or config.load_settings_every_epoch)
    return [DistributedDataParallelKwargs(find_unused_parameters=unused, broadcast_buffers=False),
            process_group_settings()]


def start_run(plan: RunPlan, accelerator) -> str | None:
    """The run folder with the settings in it, and logging into it; None on processes other than the main.

    A resumed run continues in its own folder, minus what a save cut short left there. What --resume_run
    compares against stays as the run started, unless differences were accepted with --force_resume:
    those become the run's settings.
    """
    from utils.checkpoint import remove_unfinished_saves
    from utils.resume import DATASET_FILE, optimizer_summary, read_run_info
    from utils.run_folder import (CONFIG_FILE, INFO_FILE, create_run_folder, setup_logging, write_json,
                                  write_run_settings)

    if not accelerator.is_main_process:
        setup_logging(None, accelerator.process_index)
        return None
    if plan.resume:
        run_dir = plan.resume.run_dir
        setup_logging(run_dir)
        remove_unfinished_saves(os.path.join(run_dir, "ckpts"))
        info = read_run_info(run_dir)
        info["resumed"] = info.get("resumed", []) + [{"at": time.time(), "from": plan.resume.checkpoint,
                                                      "derived": plan.derived, "notes": plan.loaded.notes}]
        if plan.config.force_resume:
            write_json(os.path.join(run_dir, CONFIG_FILE), to_json_dict(plan.config))
            write_json(os.path.join(run_dir, DATASET_FILE), plan.fingerprint)
            info.update(optimizer=optimizer_summary(plan.optimizer_settings), processes=plan.data_options.processes)
        write_json(os.path.join(run_dir, INFO_FILE), info)
        return run_dir
    run_dir = create_run_folder(plan.config.logdir, plan.config.project_name)
    setup_logging(run_dir)
    write_run_settings(run_dir, to_json_dict(plan.config), run_info(plan, started=True))
    write_json(os.path.join(run_dir, DATASET_FILE), plan.fingerprint)
    return run_dir


def run_info(plan: RunPlan, started: bool = False) -> dict:
    """Where the settings came from, beside the settings themselves; for a started run, what --resume_run
    compares against: the session key and the optimizer settings."""
    from utils.resume import optimizer_summary

    info = {"config_file": plan.loaded.config_file, "derived": plan.derived,
            "origins": {k: v for k, v in plan.loaded.origins.items() if v != "default"},
            "notes": plan.loaded.notes + list(plan.optimizer_settings.notes)}
    if started:
        info.update(started_at=time.time(), session_key=plan.session_key,
                    optimizer=optimizer_summary(plan.optimizer_settings), processes=plan.data_options.processes)
    return info


@dataclass
class Trainee:
    """The model being trained, placed on the device, and which of its parts train."""

    model: object  # utils.models.SDModel: the plain modules, for saving
    unet: object  # the UNet as called in training (wrapped by accelerate when it trains)
    text_encoder: object  # likewise
    train_unet: bool
    train_text_encoder: bool
    alphas_cumprod: object  # the training schedule's ᾱ_t, on the device
    ema: object = None  # utils.ema.EMA of the trained parts, when EMA is on
    text_embeddings: object = None  # utils.latent_cache.TextEmbeddingCache, with cache_text_embeddings

    def trained_parts(self) -> dict:
        """{"unet": module, "text encoder": module} for the parts that train, as called in training."""
        parts = {"unet": (self.unet, self.train_unet), "text encoder": (self.text_encoder, self.train_text_encoder)}
        return {name: module for name, (module, trained) in parts.items() if trained}

    def trained_modules(self) -> dict:
        """The same parts as the plain modules (not wrapped), for the EMA and for saving."""
        parts = {"unet": (self.model.unet, self.train_unet),
                 "text encoder": (self.model.text_encoder, self.train_text_encoder)}
        return {name: module for name, (module, trained) in parts.items() if trained}


def load_together(plan: RunPlan, accelerator) -> Trainee:
    """load_trainee on every process, going on only if every one loaded the model: under a launch a process
    that could not (its machine's copy of the model, out of memory) would otherwise end while the others wait
    an hour for it. Raises what load_trainee raises, or ProcessesPlannedDifferently naming the processes that
    could not load and why (utils.processes.agree_to_start)."""
    import torch

    from utils.checkpoint import DamagedCheckpoint
    from utils.models import ModelLoadError
    from utils.processes import READY, agree_to_start

    try:
        trainee = load_trainee(plan, accelerator)
    except torch.OutOfMemoryError:  # every process is told what to change (one process: train() tells it)
        agree_to_start(accelerator, out_of_memory_report(plan, accelerator, "loading the model"))
        raise
    except (ModelLoadError, DamagedCheckpoint, RuntimeError, OSError) as error:  # OSError: ema_resume_model's files
        agree_to_start(accelerator, error)
        raise
    agree_to_start(accelerator, READY)
    return trainee


def load_trainee(plan: RunPlan, accelerator) -> Trainee:
    """Load the model and set which parts train, their attention kernel and checkpointing."""
    import torch

    from optimizer.optimizers import freeze_text_encoder_parts
    from utils.models import load_model, training_noise_scheduler, zero_terminal_snr_inference_scheduler
    from utils.processes import main_process_first

    config = plan.config
    with main_process_first(accelerator):  # a single file is converted once; other processes reuse it
        model = load_model(plan.model_source, config.logdir, config.ckpt_cache_dir, config.single_file_config)
    train_unet, train_te = not config.disable_unet_training, not config.disable_textenc_training
    for module, trained in ((model.unet, train_unet), (model.text_encoder, train_te), (model.vae, False)):
        module.requires_grad_(trained)  # frozen: no gradients at all, so no graph and no memory for them
        module.train(trained)
        # All weights stay fp32, frozen ones too: mixed precision computes under autocast, and what is saved
        # is exactly what was loaded or trained, never a copy rounded to fp16.
        module.to(accelerator.device, dtype=torch.float32)
    if train_te:
        frozen = freeze_text_encoder_parts(model.text_encoder, plan.optimizer_settings.freezing)
        if frozen:
            plan.derived.append(f"text encoder frozen parts: {frozen} (text_encoder_freezing)")
    set_attention(model.unet, config.attn_type)
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if train_te:  # transformers 5 renamed the method; the old name still works, with a warning
            # Non-reentrant checkpointing passes gradients to later layers even when the embeddings are frozen
            # (text_encoder_freezing); the reentrant kind, transformers 4's default, would stop them there.
            new_name = getattr(model.text_encoder, "activation_checkpointing_enable", None)
            if new_name:
                new_name(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    noise_scheduler = training_noise_scheduler(model, config.enable_zero_terminal_snr)
    if config.enable_zero_terminal_snr:  # checkpoints must sample with the schedule they were trained on
        model.scheduler = zero_terminal_snr_inference_scheduler(model)
    elif model.scheduler.config.get("rescale_betas_zero_snr"):
        log.warning("note: %s was trained with zero-terminal SNR and this run trains without it; set "
                    "enable_zero_terminal_snr: true to keep it", config.resume_ckpt)
    alphas = noise_scheduler.alphas_cumprod.to(accelerator.device)
    trainee = Trainee(model, model.unet, model.text_encoder, train_unet, train_te, alphas)
    if plan.ema_decay is not None:
        trainee.ema = start_ema(plan, trainee, accelerator)
    if config.cache_text_embeddings:
        from utils.latent_cache import TextEmbeddingCache

        trainee.text_embeddings = TextEmbeddingCache(lambda input_ids, clip_skip: model.family.encode(
            model.text_encoder, input_ids.to(accelerator.device), clip_skip).hidden_states)
    return trainee


def start_ema(plan: RunPlan, trainee: Trainee, accelerator):
    """The EMA of the trained parts, from the model as loaded or from ema_resume_model."""
    from utils.ema import EMA, load_saved_ema

    config = plan.config
    device = config.ema_device if accelerator.device.type == "cuda" else "cpu"
    modules = trainee.trained_modules()
    ema = EMA(modules, plan.ema_decay, device)
    source = "the model being trained"
    saved_ema = plan.resume.checkpoint if plan.resume else config.ema_resume_model
    if saved_ema:
        saved = load_saved_ema(saved_ema)
        taken = {part: ema.load(part, saved[part]) for part in modules if part in saved}
        source = f"{saved_ema} ({', '.join(f'{part}: {n} weights' for part, n in taken.items())})"
    plan.derived.append(f"EMA on {device}, decay {plan.ema_decay:.6g} every {config.ema_update_interval} optimizer "
                        f"steps, starting from {source}")
    return ema


def fill_latent_cache(plan: RunPlan, trainee: Trainee, accelerator):
    """cache_latents: encode every image variant the run can train (data/plan.py image_variants) that is not
    cached yet, shared out among the processes of each machine (each machine may have its own copy of the
    folder); the cache, ready for the loader."""
    import torch

    from data.plan import image_variants
    from utils.latent_cache import LatentCache, LatentCacheError, fill_latent_cache as fill
    from utils.processes import READY, agree_to_start, any_process, main_process_value, share_on_this_machine, \
        sum_over_processes

    config = plan.config
    folder = config.latent_cache_dir or os.path.join(config.logdir, "latent_cache")
    share = share_on_this_machine(accelerator)
    # The main process's reading of the files (the keys): a file replaced while the others read it cannot split them.
    fingerprint = main_process_value(accelerator, plan.fingerprint if accelerator.is_main_process else None)
    cache = LatentCache.open(folder, trainee.model.vae, plan.items, fingerprint, accelerator.mixed_precision)
    variants = image_variants(plan.items, plan.data_options)
    # One machine may have its copy of the cache full and another none of it: the processes keep in step batch
    # by batch, so none waits longer than a batch in one collective (the process group's timeout is an hour).
    try:
        result = fill(cache, plan.items, variants, trainee.model.vae, accelerator.device, config.batch_size,
                      autocast=accelerator.autocast, share=share, progress=accelerator.is_main_process,
                      keep_pace=lambda encoding: any_process(accelerator, encoding)[0])
    except torch.OutOfMemoryError:
        stopped = LatentCacheError(f"cache_latents: out of memory while the VAE encoded batches of {config.batch_size} "
                                   "images (the entries written so far are kept): lower batch_size, or free the "
                                   "GPU's memory.")
    except OSError as error:
        stopped = LatentCacheError(f"cache_latents: cannot write to {folder} ({error}); the entries written so far "
                                   "are kept. Free space there, or set latent_cache_dir to a folder with room.")
    except Exception as error:  # unforeseen: its traceback here, its message to every process
        log.exception("cache_latents: filling %s failed", folder)
        stopped = LatentCacheError(f"cache_latents: filling {folder} failed: {type(error).__name__}: {error}")
    else:
        stopped = READY
    agree_to_start(accelerator, stopped)  # every process stops if one could not fill its share
    if stopped is not READY:
        raise stopped
    encoded, reused, failed = sum_over_processes(accelerator, result.encoded, result.reused, len(result.failed))
    log.info("latent cache %s: %d image variants encoded, %d reused%s", folder, encoded, reused,
             f", {failed} images unreadable (skipped in training)" if failed else "")
    return cache


def set_attention(unet, attn_type: str) -> None:
    """sdp is diffusers' default (PyTorch's scaled-dot-product attention); the others are switched on."""
    if attn_type == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as error:  # installed but unusable here (no CUDA, a build for another torch)
            raise RuntimeError(f"attn_type: xformers cannot be used here ({error}). Use attn_type: sdp.") from None
    elif attn_type == "slice":
        unet.set_attention_slice("auto")


def prepare_optimizer(plan: RunPlan, trainee: Trainee, accelerator):
    """The optimizer over the trained parts and its schedule; accelerate wraps the trained modules. A warm
    start takes a saved optimizer state's moments; a resumed run gets its whole state later (train())."""
    from optimizer.optimizers import build_group_schedules, build_optimizer

    parts = trainee.trained_parts()
    optimizer = build_optimizer(plan.optimizer_settings, {name: [p for p in m.parameters() if p.requires_grad]
                                                          for name, m in parts.items()})
    if not plan.resume:
        restore_saved_moments(plan, optimizer, accelerator)
    settings = {"unet": plan.optimizer_settings.unet, "text encoder": plan.optimizer_settings.text_encoder}
    schedule = build_group_schedules(optimizer, {part: (settings[part].lr_scheduler, steps)
                                                 for part, steps in plan.schedule.items()})
    # The schedule is stepped by hand once per optimizer step; accelerate would count processes too.
    with warnings.catch_warnings():
        # torch 2.13 deprecates DDP's broadcast_buffers for forward_sync_buffers, which accelerate's kwargs
        # handler cannot pass and older torch lacks; broadcast_buffers=False still means what
        # multi_process_settings wants, so its warning at every launch says nothing to the user.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        if "unet" in parts:
            trainee.unet = accelerator.prepare(trainee.unet)
        if "text encoder" in parts:
            trainee.text_encoder = accelerator.prepare(trainee.text_encoder)
    return accelerator.prepare(optimizer), schedule


def restore_saved_moments(plan: RunPlan, optimizer, accelerator) -> None:
    """A warm start from a checkpoint folder saved with save_optimizer takes its optimizer's moments, the same
    on every process: DDP makes every process's weights the main process's, not the moments. Raises
    DamagedCheckpoint when the state cannot be read, or ProcessesPlannedDifferently (on every process) when the
    processes' copies of the folder differ in it."""
    from optimizer.optimizers import restore_optimizer_state
    from utils.checkpoint import OPTIMIZER_STATE_FILE, DamagedCheckpoint
    from utils.processes import check_same_on_every_process

    folder, restored, unreadable = plan.config.resume_ckpt, None, None
    if os.path.isdir(folder):
        try:
            restored = restore_optimizer_state(optimizer, folder)
        except Exception as error:  # cut short or damaged: torch.load's RuntimeError, EOFError, UnpicklingError...
            first_line = (str(error).strip().splitlines() or [""])[0]
            unreadable = DamagedCheckpoint(f"{folder}: its optimizer state cannot be read ({type(error).__name__}: "
                                           f"{first_line}). Delete {OPTIMIZER_STATE_FILE} there to start with fresh "
                                           "moments, or copy the folder again.")
            restored = str(unreadable)
    check_same_on_every_process(accelerator, restored, f"optimizer state in their copy of {folder}",
                                "Let every machine see the same copy of the checkpoint folder")
    if unreadable:
        raise unreadable
    if restored:
        plan.derived.append(f"optimizer state {restored}")


# =================================================================================================
# One batch
# =================================================================================================

def train_step(trainee: Trainee, batch: dict, config: TrainConfig, global_step: int, accelerator):
    """The loss of one batch: encode images and captions, add noise, predict it back."""
    import torch

    from utils import diffusion
    from utils.latent_cache import posterior_from

    model, device = trainee.model, accelerator.device
    generator = diffusion.step_generator(config.seed, global_step, device, accelerator.process_index)
    with accelerator.autocast():
        with torch.no_grad():
            if batch["latent_params"] is not None:  # cache_latents: the VAE's posterior, computed once
                params = batch["latent_params"].to(device, non_blocking=True)
            else:
                params = model.vae.encode(batch["pixels"].to(device, non_blocking=True)).latent_dist.parameters
            posterior = posterior_from(params)
            # Contiguous: the VAE may hand back channels-last latents (oneDNN on the CPU), the cache never does,
            # and the UNet's kernels (so the last bits of the loss) depend on the layout.
            latents = posterior.sample(generator).contiguous() * model.vae.config.scaling_factor
        noise = diffusion.sample_noise(latents, generator, config.zero_frequency_noise_ratio,
                                       config.pyramid_noise_discount or 0.0)
        timesteps = diffusion.sample_timesteps(len(latents), config.timestep_start, config.timestep_end, generator,
                                               device)
        if trainee.text_embeddings is not None:  # cache_text_embeddings: a frozen text encoder, each caption once
            hidden_states, unet_kwargs = trainee.text_embeddings(batch["input_ids"], config.clip_skip), {}
        else:
            with torch.set_grad_enabled(trainee.train_text_encoder):
                conditioning = model.family.encode(trainee.text_encoder,
                                                   batch["input_ids"].to(device, non_blocking=True), config.clip_skip)
            hidden_states, unet_kwargs = conditioning.hidden_states, conditioning.unet_kwargs
        if config.embedding_perturbation:
            hidden_states = diffusion.perturb_embeddings(hidden_states, config.embedding_perturbation, generator)
        per_sample, snr_weights = diffusion.denoising_losses(
            lambda noisy, t: trainee.unet(noisy, t, hidden_states, **unet_kwargs).sample, latents, noise, timesteps,
            trainee.alphas_cumprod, model.prediction_type, config.loss_type, config.min_snr_gamma)
    return diffusion.weighted_mean(per_sample, batch["loss_scale"], snr_weights)


def train_batch(trainee: Trainee, batch: dict, index: int, batches_in_epoch: int, optimizer, schedule,
                plan: RunPlan, state, accelerator):
    """Accumulate one batch's gradients; step the optimizer when the batch ends its grad_accum group.

    Returns the batch's loss (None if none of its images could be read, or the loss was not finite) and,
    when the optimizer stepped and they were measured, the gradient norms per part. Groups are counted
    within the epoch, and the epoch's last group may be shorter: each batch's loss is divided by its group's
    real size, so a group's update is the average over its batches. A batch none of whose images could be
    read, or whose loss is NaN or infinite, counts for nothing: the group's gradients are rescaled to the
    average over the batches that trained, on every process. MAX_NONFINITE_IN_A_ROW non-finite losses in a
    row stop the run.

    With several processes, gradients are averaged across them in the backward pass of a group's last batch,
    in which every process must take part: a process whose share ran short (a stand-in batch from the plan)
    or whose batch could not train backpropagates a stand-in that adds nothing.
    """
    import torch

    from utils.processes import sum_over_processes

    config = plan.config
    group_start = index - index % config.grad_accum
    group_size = min(config.grad_accum, batches_in_epoch - group_start)
    steps_now = ends_group(index, batches_in_epoch, config.grad_accum)
    loss, trained = None, False
    if has_images(batch) and not batch["stand_in"]:
        with gradient_sync(accelerator, trainee, enabled=steps_now):
            loss = train_step(trainee, batch, config, state.global_step, accelerator)
            trained = bool(torch.isfinite(loss))  # waits for the forward pass: one sync per batch
            if trained:
                accelerator.backward(loss / group_size)
        if trained:
            state.batches_in_group += 1
            state.nonfinite_in_a_row = 0
        else:
            state.nonfinite_in_group += 1  # added up over the processes at the group's end
            skip_nonfinite(f"the loss is {loss.item()}, so this batch is skipped", state)
            loss = None
    if steps_now and accelerator.num_processes > 1 and not trained:
        stand_in = stand_in_batch(trainee, batch, config.cache_latents)
        with gradient_sync(accelerator, trainee, enabled=True):
            accelerator.backward(train_step(trainee, stand_in, config, state.global_step, accelerator))
    norms = {}
    if steps_now:
        trained_batches, diverged, nonfinite = sum_over_processes(
            accelerator, state.batches_in_group, int(state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW),
            state.nonfinite_in_group)
        state.nonfinite_batches, state.nonfinite_in_group = state.nonfinite_batches + nonfinite, 0
        if diverged:  # decided at the end of a group, where every process is, so that all of them stop
            raise NonFiniteTraining(f"the loss was NaN or infinite for {MAX_NONFINITE_IN_A_ROW} batches in a row "
                                    f"(up to step {state.global_step + 1}): training has diverged. Lower lr, or "
                                    "train with mixed_precision: bf16 or no if fp16 overflows; then continue from "
                                    "the last checkpoint.")
        norms = step_optimizer(trainee, optimizer, schedule, plan, state, accelerator, trained_batches,
                               gradient_scale=group_size * accelerator.num_processes / max(1, trained_batches))
        state.batches_in_group = 0
    return (None if loss is None else loss.detach()), norms


def settle_gradient_buckets(trainee: Trainee, accelerator, config: TrainConfig) -> None:
    """A throwaway forward and backward through the trained modules, then a forward, on every process, before
    the first step.

    DistributedDataParallel regroups the gradients it averages once, at the forward after its first
    backward, by the order in which they became ready, and broadcasts the grouping from the main process.
    Done here, that happens at the same point on every process. Otherwise it would come at the first training
    forward: a process whose first batch could not be read skips that forward, and would pair the broadcast
    with another collective (a hang); and a resumed run would train its first steps with the initial grouping
    where the uninterrupted run had the regrouped one (with three or more processes the sums would be added
    in another order: a difference in the last bits). The gradients are dropped; nothing random is drawn.
    """
    import torch

    model, device = trainee.model, accelerator.device
    latents = torch.zeros(1, model.unet.config.in_channels, 8, 8, device=device)
    input_ids = model.family.tokenize(model.tokenizer, [""]).to(device)

    def forward() -> torch.Tensor:
        with accelerator.autocast():
            with torch.set_grad_enabled(trainee.train_text_encoder):
                conditioning = model.family.encode(trainee.text_encoder, input_ids, config.clip_skip)
            return trainee.unet(latents, torch.zeros(1, dtype=torch.long, device=device),
                                conditioning.hidden_states, **conditioning.unet_kwargs).sample

    accelerator.backward(forward().float().mean() * 0)
    with gradient_sync(accelerator, trainee, enabled=False):  # a forward that no backward follows
        forward()
    for module in trainee.trained_modules().values():
        module.zero_grad(set_to_none=True)


def has_images(batch: dict) -> bool:
    """Whether any image of the batch could be read (or its latents were cached)."""
    return batch["pixels"] is not None or batch["latent_params"] is not None


def stand_in_batch(trainee: Trainee, batch: dict, cached_latents: bool) -> dict:
    """A batch of the same bucket whose loss weighs nothing: black images (or zero latents), empty captions."""
    import torch

    model = trainee.model
    count, (width, height) = max(1, len(batch["captions"])), batch["bucket"]
    pixels = latent_params = None
    if cached_latents:
        latent_params = torch.zeros(count, 2 * model.vae.config.latent_channels, height // 8, width // 8)
    else:
        pixels = torch.zeros(count, 3, height, width)
    return {**batch, "pixels": pixels, "latent_params": latent_params, "captions": [""] * count,
            "input_ids": model.family.tokenize(model.tokenizer, [""] * count),
            "loss_scale": torch.zeros(count)}


MAX_NONFINITE_IN_A_ROW = 5  # batches whose loss is NaN or infinite, in a row, before the run is stopped


class NonFiniteTraining(Exception):
    """The loss stayed NaN or infinite, or the weights stopped being finite: training cannot go on."""


def skip_nonfinite(what: str, state) -> None:
    """Report a batch whose loss (or, in fp32 and bf16, a group whose gradient) is NaN or infinite, which
    does not train; train_batch stops the run after MAX_NONFINITE_IN_A_ROW in a row on any process. The
    caller counts it in the run's total (state.nonfinite_batches, the same on every process)."""
    state.nonfinite_in_a_row += 1
    log.warning("step %d: %s (%d in a row)", state.global_step + 1, what, state.nonfinite_in_a_row)


def ends_group(index: int, batches_in_epoch: int, grad_accum: int) -> bool:
    """Whether batch `index` of the epoch is the last of its grad_accum group (the epoch's last group may be
    shorter): the optimizer steps after it, and nothing is accumulated, so the run can be saved there."""
    group_start = index - index % grad_accum
    return index == min(group_start + grad_accum, batches_in_epoch) - 1


def step_optimizer(trainee: Trainee, optimizer, schedule, plan: RunPlan, state, accelerator, trained_batches: float,
                   gradient_scale: float = 1.0) -> dict:
    """Clip, step and clear the accumulated gradients (first multiplied by gradient_scale); advance the
    schedule when the step was taken. No step when no batch of the group trained, on any process.

    clip_grad_norm clips the UNet and the text encoder each on its own (EveryDream2's text-encoder clip
    read an exhausted iterator and never clipped). Their norms, before clipping, are returned when
    clipping or log_grad_norm measured them.
    """
    import torch

    from optimizer.optimizer_config import grad_scaler_tweak

    config, settings = plan.config, plan.optimizer_settings
    # The optimizer's named groups (one per trained part) rather than module.parameters(): walking the modules'
    # trees for their parameters took 7 ms a step on the tiny model on the CPU, at every optimizer step.
    parts = {group["name"]: [p for p in group["params"] if p.grad is not None] for group in optimizer.param_groups}
    if not trained_batches:  # every image of the group was unreadable, or every loss NaN
        optimizer.zero_grad(set_to_none=True)
        return {}
    if gradient_scale != 1.0:
        for param in (p for params in parts.values() for p in params):
            param.grad.mul_(gradient_scale)
    norms = {}
    # Measured for clipping and logging, and always without fp16's grad scaler (which skips steps with inf
    # gradients itself: that is how it finds its scale): a NaN or infinite gradient from a finite loss would
    # otherwise go into the weights, and AdamW's moments would carry it into every step after.
    if config.clip_grad_norm or settings.log_grad_norm or accelerator.scaler is None:
        accelerator.unscale_gradients()  # fp16: measure and clip the true gradients (once per step)
        for name, params in parts.items():
            if not params:
                continue
            if config.clip_grad_norm:
                norms[name] = torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            else:
                norms[name] = torch.nn.utils.get_total_norm([p.grad for p in params])
    # One check over the stacked norms: one wait for the GPU per optimizer step, not one per part.
    if accelerator.scaler is None and norms and not bool(torch.isfinite(torch.stack(list(norms.values()))).all()):
        state.nonfinite_batches += 1  # the norm is of the gradients summed over the processes: one count for all
        skip_nonfinite("the gradient norm is NaN or infinite, so this optimizer step is skipped", state)
        optimizer.zero_grad(set_to_none=True)
        return {}
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16: the grad scaler skips steps with inf gradients
        schedule.step()
        state.optimizer_step += 1
        if trainee.ema is not None and state.optimizer_step % config.ema_update_interval == 0:
            trainee.ema.update(trainee.trained_modules())
    tweak = grad_scaler_tweak(state.optimizer_step) if settings.grad_scaler_step_tweaks else None
    if tweak and accelerator.scaler is not None:
        accelerator.scaler.set_growth_factor(tweak[0])
        accelerator.scaler.set_growth_interval(tweak[1])
    optimizer.zero_grad(set_to_none=True)
    return norms if settings.log_grad_norm else {}


def gradient_sync(accelerator, trainee: Trainee, enabled: bool):
    """Skip the cross-process gradient all-reduce on batches that do not end an accumulation group."""
    import contextlib

    stack = contextlib.ExitStack()
    if not enabled:
        for module in trainee.trained_parts().values():
            stack.enter_context(accelerator.no_sync(module))
    return stack


# =================================================================================================
# Periodic actions
# =================================================================================================

def periodic_save_due(plan: RunPlan, state, end_of_epoch: bool) -> bool:
    """Whether a periodic checkpoint is due now. Never twice at one step, never at the last step (the final
    save is that one)."""
    config = plan.config
    if (state.epoch < config.save_ckpts_from_n_epochs or state.global_step == state.last_save_step
            or state.global_step == plan.total_batches):
        return False
    by_epochs = end_of_epoch and bool(config.save_every_n_epochs) and state.epoch % config.save_every_n_epochs == 0
    by_minutes = (bool(config.ckpt_every_n_minutes)
                  and state.elapsed_seconds - state.last_save_seconds >= config.ckpt_every_n_minutes * 60)
    return by_epochs or by_minutes


def save_periodic(run) -> None:
    """A periodic save; a full disk is reported and training goes on (the next one tries again)."""
    run.state.mark_saved()
    save_unless_the_disk_is_full(run, "periodic", "the next periodic save tries again")


def save_unless_the_disk_is_full(run, kind: str, next_try: str) -> None:
    """A save that training can go on without: a full disk is reported, saying when it is tried again."""
    from utils.checkpoint import NotEnoughDiskSpace
    from utils.run_checkpoints import save_checkpoint

    try:
        save_checkpoint(run, kind)
    except NotEnoughDiskSpace as error:
        log.error("%s Training goes on; %s.", error, next_try)


# =================================================================================================
# What the data will do: the dataset report, the undersized-image list, the batch schedules
# =================================================================================================

def dataset_report(plan: RunPlan, tokenizer, first_epoch: list) -> str:
    """The report of data/report.py for the epoch-0 plan; caption lengths are checked when the tokenizer is
    at hand."""
    from data.report import dataset_report as report
    from utils.models import caption_token_counts

    long_captions, limit = None, None
    if tokenizer is not None:
        limit = tokenizer.model_max_length
        counts = caption_token_counts(tokenizer, [item.caption for item in plan.items])
        long_captions = [(item.path, count) for item, count in zip(plan.items, counts) if count > limit]
    return report(plan.config.data_root, plan.config.resolution, plan.scan, plan.data_options, first_epoch,
                  plan.batches_per_epoch, long_captions, limit)


def write_data_records(run_dir: str, report: str, plan: RunPlan) -> None:
    """dataset_report.txt and, when some images are smaller than their bucket, undersized_images.txt."""
    from data.report import undersized_lines

    with open(os.path.join(run_dir, "dataset_report.txt"), "w", encoding="utf-8") as handle:
        handle.write(report)
    undersized = undersized_lines(plan.items)
    if undersized:
        with open(os.path.join(run_dir, "undersized_images.txt"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(undersized) + "\n")


def write_schedule(run_dir: str, plan: RunPlan, epoch: int, batches: list) -> None:
    """ep<N>_batch_schedule.txt (N counts from 0): every sample of the epoch as it will train."""
    from data.plan import batch_positions
    from data.report import schedule_lines

    first_step = sum(plan.batches_per_epoch[:epoch]) + 1  # steps count from 1, as in the logs and TensorBoard
    lines = schedule_lines(batches, plan.items, first_step, batch_positions(len(batches), plan.data_options))
    with open(os.path.join(run_dir, f"ep{epoch}_batch_schedule.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def dry_run(plan: RunPlan) -> int:
    """--dry_run: the checks, the report and the records, in a run folder; no model is loaded. With
    --resume_run, only what would be resumed: the run's folder is left as it is."""
    from utils.models import load_tokenizer
    from utils.run_folder import SkipReport, create_run_folder, write_run_settings

    if int(os.environ.get("RANK", "0")):  # launched on several processes: the first one reports
        return 0
    if plan.resume:
        for line in plan.derived + [f"note: {note}" for note in run_info(plan)["notes"]]:
            print(f"  {line}")
        print(f"dry run: {plan.resume.run_dir} can be resumed from {plan.resume.checkpoint}; nothing was written.")
        return 0

    run_dir = create_run_folder(plan.config.logdir, plan.config.project_name)
    write_run_settings(run_dir, to_json_dict(plan.config), run_info(plan))
    first_epoch = plan.epoch_plan(0)
    report = dataset_report(plan, load_tokenizer(plan.config.resume_ckpt), first_epoch)
    print(report, end="")
    write_data_records(run_dir, report, plan)
    SkipReport(run_dir, plan.scan.skipped)
    if plan.config.write_schedule:
        write_schedule(run_dir, plan, 0, first_epoch)
    for line in plan.derived:
        print(f"  {line}")
    for note in run_info(plan)["notes"]:
        print(f"note: {note}")
    print(f"dry run: the config and the data are usable. Records in {run_dir}; no model was loaded.")
    return 0


# =================================================================================================
# Start-up summary
# =================================================================================================

def log_summary(plan: RunPlan, trainee: Trainee, run_dir: str, accelerator) -> None:
    config = plan.config
    log.info("model: %s", trainee.model.describe())
    log.info("training: %s", " + ".join({"unet": "UNet"}.get(name, name) for name in trainee.trained_parts()))
    report = dataset_report(plan, trainee.model.tokenizer, plan.epoch_plan(0))
    log.info("%s", report.rstrip())
    if run_dir:
        write_data_records(run_dir, report, plan)
    processes = accelerator.num_processes
    log.info("effective batch: %d images per optimizer step (batch_size %d x grad_accum %d x %d process%s)",
             effective_batch(config, accelerator), config.batch_size, config.grad_accum, processes,
             "" if processes == 1 else "es")
    for line in plan.derived:
        log.info("  %s", line)
    for note in run_info(plan)["notes"]:
        log.warning("note: %s", note)
    log.info("run folder: %s (tensorboard --logdir %s)", run_dir, config.logdir)
    log.info("single-file checkpoints: %s", "off" if config.no_save_ckpt else (config.save_ckpt_dir or os.getcwd()))


def effective_batch(config: TrainConfig, accelerator) -> int:
    """Images per optimizer step, over every process."""
    return config.batch_size * config.grad_accum * accelerator.num_processes


# =================================================================================================
# Main
# =================================================================================================

def main(argv: list[str]) -> int:
    # Intel MKL may use fewer threads when the machine is busy, which changes the order of its sums: a
    # CPU run would then differ in the last bits from the same run on an idle machine. And its code paths may
    # depend on how the data happens to be aligned in memory (on an AMD EPYC, a resumed run's weights came out
    # different in the last bits from the uninterrupted run's): MKL_CBWR's strict mode keeps the results the same
    # whatever the alignment (MKL's "Conditional Numerical Reproducibility"). Set before torch loads.
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    if not argv:
        print(short_usage())
        return 0
    from utils.processes import ProcessesPlannedDifferently, leave_launch
    from utils.resume import NothingToResume

    # A launch's processes leave its process group where they end together (torn down at exit instead, gloo
    # can abort a process whose peer has just left). After an error one process may end alone, and NCCL's
    # teardown could then wait for the others: the process exits as it is.
    try:
        plan, accelerator = plan_together(argv)
    except (ConfigError, ProcessesPlannedDifferently) as error:  # every process stops here, with this message
        print(error, file=sys.stderr)
        leave_launch()
        return 2
    except NothingToResume as finished:
        print(f"--resume_run auto: this session already finished in {finished}; nothing to do.")
        leave_launch()
        return 0
    if plan.config.dry_run:
        code = dry_run(plan)
        leave_launch()
        return code
    run_dir = start_run(plan, accelerator)
    code = train(plan, accelerator, run_dir)
    if code == 0:
        leave_launch()
    return code


def plan_together(argv: list[str]):
    """(the plan, the accelerator; None for a dry run). Under a launch of several processes, each joins the
    process group whatever its planning found, and they go on only together (utils.processes.agree_to_start):
    a process that could not plan the run (its machine's copy of the config, the data or logdir; bf16 on an
    older GPU), or found the session finished, would otherwise end while the others wait an hour for it.
    Raises ConfigError, NothingToResume or ProcessesPlannedDifferently, alike on every process of a launch."""
    from utils.processes import READY, agree_to_start, check_same_plan, join_launch, share_random_seed
    from utils.resume import NothingToResume

    together = launched_with_others(argv)
    try:
        plan = plan_run(argv)
        refuse_sharded_launch()
        accelerator = None if plan.config.dry_run else make_accelerator(plan)
    except (ConfigError, NothingToResume) as error:
        if together:
            agree_to_start(join_launch(), error)
        raise
    if together:  # also for a dry run set in the config file, which a process that could not read it cannot know
        agree_to_start(accelerator if accelerator is not None else join_launch(), READY)
    if accelerator is None:  # a dry run: the main process reports, the others end
        return plan, None
    plan = share_random_seed(plan, accelerator, argv)
    check_same_plan(plan, accelerator)
    return plan, accelerator


def launched_with_others(argv: list[str]) -> bool:
    """Whether this process is one of several that form a process group: started by accelerate launch or
    torchrun (they set WORLD_SIZE and MASTER_ADDR), and not for a dry run asked on the command line (the same
    for every process), which forms none."""
    from utils.config import parse_cli

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or "MASTER_ADDR" not in os.environ:
        return False
    try:
        return not parse_cli(argv)[1].get("dry_run")
    except ConfigError:
        return True


@dataclass
class Run:
    """A run in training: what the loop and the saves (utils/run_checkpoints.py) work with."""

    plan: RunPlan
    trainee: Trainee
    optimizer: object
    schedule: object  # the lr schedule, stepped once per optimizer step
    accelerator: object
    run_dir: str | None
    state: object  # utils.loop_state.LoopState
    tracker: object = None  # utils.tracker.Tracker: TensorBoard on the main process
    samples: object = None  # utils.sample_rounds.SampleRounds
    validation: object = None  # utils.validation_loss.Validation, when validation_config asks for it
    plugins: object = None  # utils.plugins.PluginRunner: the plugins on the main process, none elsewhere
    plugin_view: object = None  # what plugin hooks get as ed_state: the modules and the optimizer
    live_settings: object = None  # utils.live_settings.LiveSettings, with load_settings_every_epoch
    latent_cache: object = None  # utils.latent_cache.LatentCache, with cache_latents


def train(plan: RunPlan, accelerator, run_dir: str | None) -> int:
    """Train from the start or from the resumed checkpoint to the end, or until a signal or an error; save
    accordingly. Returns the exit code."""
    import functools

    import torch

    from optimizer.optimizers import apply_group_settings
    from utils.checkpoint import DamagedCheckpoint, NotEnoughDiskSpace
    from utils.interrupts import StopRequests
    from utils.latent_cache import LatentCacheError
    from utils.live_settings import LiveSettings
    from utils.loop_state import LoopState
    from utils.models import ModelLoadError
    from utils.plugins import PluginRunner
    from utils.processes import ProcessesPlannedDifferently
    from utils.run_checkpoints import NonFiniteWeights, resumable_save_at, save_checkpoint
    from utils.sample_rounds import SampleRounds
    from utils.tracker import make_tracker
    from utils.training_state import ResumeStateError, load_resume_state

    try:
        trainee = load_together(plan, accelerator)
        optimizer, schedule = prepare_optimizer(plan, trainee, accelerator)
        run = Run(plan, trainee, optimizer, schedule, accelerator, run_dir, LoopState())
        log_summary(plan, trainee, run_dir, accelerator)
        if plan.config.cache_latents:
            run.latent_cache = fill_latent_cache(plan, trainee, accelerator)
        if plan.resume:  # last: it sets every random generator as it was when the checkpoint was saved
            run.state = load_resume_state(plan.resume.checkpoint, optimizer, schedule, accelerator.scaler)
            if plan.config.force_resume:  # the saved state brought the run's old lr and settings
                recount_steps(run)
                apply_group_settings(optimizer, schedule, plan.optimizer_settings)
        if accelerator.num_processes > 1:
            settle_gradient_buckets(trainee, accelerator, plan.config)
    except torch.OutOfMemoryError as error:
        log.error("%s\ntorch: %s", out_of_memory_report(plan, accelerator, "while setting up"), error)
        return 2
    except (ModelLoadError, DamagedCheckpoint, LatentCacheError, ResumeStateError, RuntimeError,
            ProcessesPlannedDifferently) as error:
        log.error("%s", error)
        return 2
    # Events a killed run logged after the checkpoint being resumed are dropped: the resumed run logs them anew.
    recounted = plan.resume and run.state.global_step != plan.resume.record["global_step"]
    run.tracker = make_tracker(run_dir, accelerator.is_main_process,  # recounted: keep the curve logged so far
                               purge_step=run.state.global_step + 1 if plan.resume and not recounted else None,
                               wandb_config=to_json_dict(plan.config) if plan.config.wandb else None)
    run.samples = SampleRounds(plan.config, plan.sample_file, [item.caption for item in plan.items], run_dir)
    run.plugins = PluginRunner(plan.plugins if accelerator.is_main_process else [])
    run.plugin_view = plugin_view(trainee, optimizer)
    if plan.config.load_settings_every_epoch:
        run.live_settings = LiveSettings(plan.loaded)
    if not plan.resume:
        run.tracker.text("config", "\n".join(f"    {k}: {v}" for k, v in to_json_dict(plan.config).items()))
        run.tracker.scalars({"hyperparameter/effective batch size": effective_batch(plan.config, accelerator)}, 0)
    if plan.validation:
        from utils.validation_loss import Validation

        run.validation = Validation(plan.validation, plan.batches_per_epoch,
                                    functools.partial(trainee.model.family.tokenize, trainee.model.tokenizer))
        run.validation.adopt(run.state)
    with StopRequests() as stop, contextlib.closing(run.tracker):
        try:
            run.plugins.run("on_training_start", log_folder=run_dir, project_name=plan.config.project_name)
            if not train_epochs(run, stop):
                if not resumable_save_at(run):  # a periodic save at this very step is as good, and done
                    save_checkpoint(run, "interrupted")
                if accelerator.is_main_process:
                    how = "python train.py" if accelerator.num_processes == 1 else "the same launch command and"
                    log.warning("stopped by %s at step %d; continue with: %s --resume_run %s",
                                stop.stop_signal.name, run.state.global_step, how, run_dir)
                return stop.exit_code
            run.state.mark_saved()
            save_checkpoint(run, "final")
            run.samples.draw(run.trainee, accelerator, run.tracker, run.state.global_step)  # after the save
        except KeyboardInterrupt:
            log.error("stopped at once by a second Ctrl-C at step %d, without saving", run.state.global_step)
            return 130
        except (NonFiniteTraining, NonFiniteWeights) as error:  # found on every process at the same step
            log.error("%s", error)
            save_after_error(run, together=True)
            return 1
        except NotEnoughDiskSpace as error:
            log.error("%s", error)
            save_after_error(run)
            return 1
        except torch.OutOfMemoryError as error:  # on this process alone, perhaps: it cannot wait for the others
            log.error("%s\ntorch: %s", out_of_memory_report(plan, accelerator,
                                                             f"with {run.state.global_step} steps done"), error)
            free_failed_step(error, run)  # room to save
            save_after_error(run)
            return 1
        except Exception:
            log.exception("training failed with %d steps done", run.state.global_step)
            save_after_error(run)
            return 1
        finally:
            run.plugins.run("on_training_end")
    log.info("done: %d steps in %.1f min%s", run.state.global_step, run.state.elapsed_seconds / 60,
             f"; {run.state.nonfinite_batches} batches skipped for a NaN or infinite loss"
             if run.state.nonfinite_batches else "")
    return 0


def recount_steps(run: Run) -> None:
    """--force_resume with another number of processes (or other data): the step counts become the new plan's
    at the same epoch and batch, so that the run ends, saves, validates and ends its lr schedule where this
    plan says. The steps of TensorBoard's curve and of the checkpoint names jump there."""
    from utils.loop_state import steps_at

    state = run.state
    global_step, optimizer_step = steps_at(state, run.plan.batches_per_epoch, run.plan.config.grad_accum)
    if (global_step, optimizer_step) == (state.global_step, state.optimizer_step):
        return
    if run.accelerator.is_main_process:
        log.warning("note: the steps are counted for this plan (--force_resume): step %d is now %d, optimizer step "
                    "%d is now %d", state.global_step, global_step, state.optimizer_step, optimizer_step)
    if state.last_save_step == state.global_step:
        state.last_save_step = global_step
    state.global_step, state.optimizer_step = global_step, optimizer_step
    run.schedule.last_epoch = optimizer_step  # apply_group_settings then sets the lr of this step


def train_epochs(run: Run, stop) -> bool:
    """The loop, from where run.state stands to the end of the last epoch. False when a stop was requested
    (it is honoured at the end of an optimizer step, where the run can be saved and resumed exactly)."""
    import functools

    from data.dataset import EpochBatches, make_loader, stop_workers
    from utils.loop_reports import LossMeter, Progress
    from utils.plugins import DataTransforms
    from utils.run_folder import SkipReport
    from utils.watch import SpikeWatch

    plan, state, model, tracker = run.plan, run.state, run.trainee.model, run.tracker
    skipped = SkipReport(run.run_dir, plan.scan.skipped + (plan.validation.skipped if plan.validation else []))
    epoch_batches = EpochBatches()
    loader = make_loader(plan.items, epoch_batches, plan.config.num_workers,
                         pin_memory=run.accelerator.device.type == "cuda",
                         tokenize=functools.partial(model.family.tokenize, model.tokenizer),
                         latent_cache=run.latent_cache, transforms=DataTransforms(plan.plugins))
    meter, spikes = LossMeter(), SpikeWatch()
    progress = Progress(plan.config.max_epochs, plan.total_batches, run.accelerator.is_main_process, state.epoch,
                        state.global_step)
    if not state.global_step and run.samples.before_training():
        run.samples.draw(run.trainee, run.accelerator, tracker, 0)
    if not state.global_step:
        validate_if_due(run)  # the baseline: it cannot stop the run
    try:
        while state.epoch < plan.config.max_epochs:
            batches = start_epoch(run)
            epoch_batches.set_plan(batches[state.batch_in_epoch:])  # a resumed epoch goes on where it stopped
            meter.start_epoch()
            early_stop = False
            for index, batch in enumerate(loader, start=state.batch_in_epoch):
                skipped.add(batch["failed"])
                run.plugins.run("on_step_start", **hook_arguments(run, local_step=index, batch=batch))
                loss, grad_norms = train_batch(run.trainee, batch, index, len(batches), run.optimizer, run.schedule,
                                               plan, state, run.accelerator)
                meter.grad_norms.update(grad_norms)
                state.batch_in_epoch, state.global_step = index + 1, state.global_step + 1
                state.elapsed_seconds += meter.add(loss, len(batch["indices"]))
                progress.step(log_step(run, meter, spikes) if state.global_step % plan.config.log_step == 0 else None)
                run.plugins.run("on_step_end", **hook_arguments(run, local_step=index, batch=batch, loss=(
                    None if loss is None or not run.plugins else loss.item())))
                if run.samples.due(state.global_step):
                    run.samples.draw(run.trainee, run.accelerator, tracker, state.global_step)
                if validate_if_due(run):
                    early_stop = True  # the run is done, and gets its final save
                    break
                if ends_group(index, len(batches), plan.config.grad_accum) and index + 1 < len(batches):
                    stop_now, save_now = decide_together(run, stop, skipped, end_of_epoch=False)
                    if stop_now:
                        return False
                    if save_now:
                        save_periodic(run)
            list_skipped_images(skipped, run.accelerator)
            if state.batch_in_epoch < len(batches):  # stopped early within the epoch
                return True
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            epoch_values = over_processes(meter.epoch_scalars(), meter.counts, run.accelerator)
            tracker.scalars(epoch_values, state.global_step)
            log.info("epoch %d/%d: %s", state.epoch, plan.config.max_epochs, meter.epoch_summary(epoch_values))
            progress.epoch_done()
            run.plugins.run("on_epoch_end", **hook_arguments(run, epoch=state.epoch - 1))
            if early_stop:
                return True
            stop_now, save_now = decide_together(run, stop, skipped, end_of_epoch=True)
            if save_now:
                save_periodic(run)
            if stop_now and state.epoch < plan.config.max_epochs:  # at the very end, the final save
                return False
        return True
    finally:
        stop_workers(loader)
        progress.close()
        if skipped.seen:
            log.info("%s", skipped.summary().lstrip("; "))


def list_skipped_images(skipped, accelerator) -> None:
    """The images every process skipped since the last call, into the main process's skipped_images.txt
    (each process loads its own share of the epoch). Every process calls this at the same point."""
    from utils.processes import gathered

    skipped.record(gathered(accelerator, skipped.take_unshared()))  # the main process's own are listed already


def log_step(run: Run, meter, spikes) -> str:
    """The log-step scalars to TensorBoard (over every process), the spike warning; the progress bar's text."""
    from utils.loop_reports import device_scalars, warn_of_a_spike

    state = run.state
    values = over_processes(meter.log_step_scalars(run.optimizer, state), meter.counts, run.accelerator)
    run.tracker.scalars({**values, **device_scalars(run.accelerator)}, state.global_step)
    if run.accelerator.is_main_process:
        warn_of_a_spike(spikes, values["loss/log_step"], state.global_step)
    return meter.postfix(values)


def decide_together(run: Run, stop, skipped, end_of_epoch: bool) -> tuple[bool, bool]:
    """(stop now, save now) at the end of an optimizer step, the same on every process: a stop requested on
    any of them; a periodic save when the main process's clock says so. Images that any process could not load
    since the last such step go into the main process's skipped_images.txt now, not at the end of the epoch,
    so that an error later in the epoch on any process cannot lose them."""
    import signal

    from utils.processes import any_process

    save_due = run.accelerator.is_main_process and periodic_save_due(run.plan, run.state, end_of_epoch)
    interrupted, terminated, save_due, unlisted = any_process(
        run.accelerator, stop.requested == signal.SIGINT, stop.requested == signal.SIGTERM, save_due,
        skipped.has_unshared)
    if unlisted:
        list_skipped_images(skipped, run.accelerator)
    return stop.share(interrupted, terminated), save_due


def over_processes(values: dict[str, float], counts: dict[str, int], accelerator) -> dict[str, float]:
    """Losses averaged over every process's batches (`counts`: how many each value averages) and images per
    second summed (every process calls this; the tags reduced are in every process's values)."""
    from utils.processes import mean_over_processes, sum_over_processes

    if accelerator.num_processes == 1:
        return values
    reduced = {tag: mean_over_processes(accelerator, values[tag], counts[tag])
               for tag in ("loss/log_step", "loss/epoch") if tag in values}
    if "performance/images per second" in values:
        (reduced["performance/images per second"],) = sum_over_processes(accelerator,
                                                                         values["performance/images per second"])
    return {**values, **reduced}


def start_epoch(run: Run) -> list:
    """What happens before an epoch's first batch (or the first batch after a resume): the live settings,
    the batch schedule file, the plugins' on_epoch_start. Returns the epoch's planned batches."""
    plan, state = run.plan, run.state
    if plan.config.load_settings_every_epoch and state.epoch and not state.batch_in_epoch:
        reload_live_settings(run)
    if plan.config.write_schedule and run.run_dir and not state.batch_in_epoch:
        write_schedule(run.run_dir, plan, state.epoch, plan.epoch_plan(state.epoch))
    batches = plan.process_plan(state.epoch, run.accelerator.process_index)
    run.plugins.run("on_epoch_start", **hook_arguments(run, epoch_length=len(batches)))
    return batches


def reload_live_settings(run: Run) -> None:
    """load_settings_every_epoch: apply what changed in the config file, and record it in the run folder so
    that --resume_run continues with the settings as they are now. The main process reads the file; every
    process applies what it read."""
    from utils.processes import main_process_value
    from utils.run_folder import CONFIG_FILE, write_json

    main = run.accelerator.is_main_process
    config, changes, warnings = main_process_value(run.accelerator, run.live_settings.reload(run.plan.config)
                                                   if main else None)
    for warning in warnings if main else ():
        log.warning("%s", warning)
    if changes:
        log.info("epoch %d: settings changed in %s: %s", run.state.epoch + 1, run.plan.loaded.config_file,
                 "; ".join(changes))
        run.plan.config = run.samples.config = config
        if run.run_dir:
            write_json(os.path.join(run.run_dir, CONFIG_FILE), to_json_dict(config))


def hook_arguments(run: Run, **values) -> dict:
    """What every plugin hook is given (EveryDream2's names), with the hook's own values."""
    config = run.plan.config
    return {"epoch": run.state.epoch, "global_step": run.state.global_step, "project_name": config.project_name,
            "log_folder": run.run_dir, "data_root": config.data_root, "ed_state": run.plugin_view, **values}


def plugin_view(trainee: Trainee, optimizer):
    """EveryDream2's ed_state for plugins: the plain modules, the tokenizer, the optimizer and the EMA."""
    import types

    model = trainee.model
    return types.SimpleNamespace(optimizer=optimizer, unet=model.unet, text_encoder=model.text_encoder,
                                 tokenizer=model.tokenizer, vae=model.vae, scheduler=model.scheduler, ema=trainee.ema)


def validate_if_due(run: Run) -> bool:
    """Measure and log the validation losses when the validation schedule says so; keep the best
    checkpoint (save_best_val). True when early stopping ends the run.

    The processes share the measuring out and add up their sums; all of them then go by the main process's
    values (bit for bit), so that they stop and save together.
    """
    from utils.processes import main_process_value
    from utils.watch import validation_verdict

    state, config = run.state, run.plan.config
    if run.validation is None or not run.validation.due(state.global_step):
        return False
    values = main_process_value(run.accelerator, run.validation.measure(run.trainee, config, run.accelerator))
    logged = run.validation.logged(values, state.first_validation_losses)
    run.tracker.scalars(logged, state.global_step)
    log.info("validation at step %d: %s", state.global_step,
             ", ".join(f"{tag} {value:.4f}" for tag, value in logged.items()))
    watched = run.validation.watched_tag
    if watched is None:
        return False
    improved, state.validations_without_improvement, stop = validation_verdict(
        values[watched], state.best_validation_loss, state.validations_without_improvement,
        config.early_stopping_patience)
    if improved:
        state.best_validation_loss = values[watched]
        if config.save_best_val and state.global_step:
            save_unless_the_disk_is_full(run, "best", "the next improvement tries again")
    if stop and run.accelerator.is_main_process:
        log.warning("early stopping at step %d: %s has not improved on its best (%.4f) for %d validations in a "
                    "row (early_stopping_patience)", state.global_step, watched, state.best_validation_loss,
                    state.validations_without_improvement)
    return stop


def out_of_memory_report(plan: RunPlan, accelerator, when: str) -> str:
    """utils.memory_advice's advice for this run, saying `when` ("while setting up") and on which device: "on
    cuda (23.6 GiB)", "on cuda:1 (79.1 GiB)", "on cpu"."""
    import torch

    from utils.memory_advice import out_of_memory_advice

    device = accelerator.device
    where = f"{when}, on {device}"
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB)"
    return out_of_memory_advice(plan, where)


def free_failed_step(error: BaseException, run: Run) -> None:
    """Let go of what the step that failed left in memory: its activations (held by its frames, which the
    error's traceback keeps) and its gradients; then give the CUDA caching allocator's free blocks back."""
    import gc
    import traceback

    import torch

    traceback.clear_frames(error.__traceback__)  # all but the frames still running: train()'s, which caught it
    run.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if run.accelerator.device.type == "cuda":
        torch.cuda.empty_cache()


def save_after_error(run: Run, together: bool = False) -> None:
    """An errored- checkpoint of the weights as they are, when they can be saved at all.

    `together`: the error struck every process at the same point, and the others wait until the main process
    has written, for a launcher ends every process as soon as one exits. (An error that may have struck one
    process alone cannot wait for the others: they may never come.)
    """
    from utils.run_checkpoints import save_checkpoint

    try:
        folder = save_checkpoint(run, "errored")
        if folder:
            log.error("the weights at the error are in %s (not resumable; --resume_run continues from the last "
                      "periodic or interrupted- checkpoint)", folder)
    except Exception as error:  # noqa: BLE001 - a failed rescue must not hide the error that caused it
        log.error("no errored- checkpoint could be saved: %s", error)
    finally:
        if together:
            run.accelerator.wait_for_everyone()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
