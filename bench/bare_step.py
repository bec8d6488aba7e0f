"""The bare training step of bench/train_throughput.py: built, FLOP-counted, timed, measured and released.

`BareStep` is the plain training step of diffusers' examples/text_to_image/train_text_to_image.py (VAE encode
-> noise -> add_noise -> text encode -> UNet -> MSE -> backward -> optimizer step -> zero_grad), with
accelerate's Accelerator for mixed precision, on one fixed batch of random pixels and tokens, and with
train.py's math: fp32 weights under autocast, the optimizer train.py builds for the same settings
(`trainer_settings`, `make_optimizer`) and its gradient clipping.

`prepare_bare` builds it and counts one step's model FLOPs (`FlopTally`, with `attention_flop_formulas` for the
attention kernels), `time_bare` times its steps, `bare_memory` reads its peak memory, `bare_result` makes the
`BareResult`, and `release` frees the device for the trainers timed after it; `measure_bare` does it all in one
call. bench/train_throughput.py orders these calls and the trainers' runs.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
from torch.utils import flop_counter

from bench.settings import PRECISIONS, REPO_ROOT, BareResult, Settings, train_command

TOKENS = 77  # CLIP's context: every caption is padded to it


# -------------------------------------------------------------------------------------------------
# Models
# -------------------------------------------------------------------------------------------------

def load_parts(model: str, device: str, seed: int) -> dict:
    """unet, vae, text_encoder (fp32, on device), the training noise scheduler, and the prediction type."""
    from bench.workload import model_components

    parts = model_components(model, device, seed)
    return dict(parts, prediction_type=parts["scheduler"].config.prediction_type)


def set_attention(unet, attention: str) -> None:
    """As the trainer's set_attention: SDPA is diffusers' default; the others are switched on."""
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif attention == "slice":
        unet.set_attention_slice("auto")


def enable_gradient_checkpointing(unet, text_encoder, train_text_encoder: bool) -> None:
    """As the trainer does it: the UNet's, and the trained text encoder's (non-reentrant)."""
    unet.enable_gradient_checkpointing()
    if train_text_encoder:  # transformers 5 renamed the method
        new_name = getattr(text_encoder, "activation_checkpointing_enable", None)
        if new_name:
            new_name(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def trainer_settings(settings: Settings):
    """What train.py resolves for the bare step's training: its config (utils.config.TrainConfig) for
    train_command(settings), and its optimizer settings (optimizer.optimizer_config.OptimizerSettings) from
    that config over optimizer.json, which train.py reads in the repository root, where the bench runs it."""
    import dataclasses

    from optimizer.optimizer_config import load_optimizer_settings
    from utils.config import BUILTIN_TINY, load_config

    # Stand-ins for the workload's folders (written later) and for a resolution train.py may not take (the bare
    # step alone takes any): they change nothing of the optimizer.
    stand_in = dataclasses.replace(settings, resolution=512)
    loaded = load_config(train_command(stand_in, BUILTIN_TINY, REPO_ROOT, os.path.join(REPO_ROOT, "logs"))[2:])
    config = loaded.config
    if not os.path.isabs(config.optimizer_config):
        config = dataclasses.replace(config, optimizer_config=os.path.join(REPO_ROOT, config.optimizer_config))
    return loaded.config, load_optimizer_settings(config, loaded.origins)


def make_optimizer(optimizer_settings, parameters: dict[str, list]) -> torch.optim.Optimizer:
    """The optimizer train.py builds (optimizer.optimizers.build_optimizer): one named group per trained part
    ("unet", "text encoder") with its lr, betas, eps and weight decay; torch's AdamW with torch's defaults
    (foreach on CUDA, not fused), or bitsandbytes' AdamW8bit."""
    from optimizer.optimizers import build_optimizer

    try:
        return build_optimizer(optimizer_settings, parameters)
    except ImportError as error:
        raise SystemExit(f"--optimizer {optimizer_settings.unet.optimizer}: {error} (pip install "
                         f"{error.name or 'its package'})") from None


# -------------------------------------------------------------------------------------------------
# The bare step
# -------------------------------------------------------------------------------------------------

def no_count(name: str):
    return contextlib.nullcontext()


class FlopTally:
    """Counts FLOPs per named phase of a step: `with tally("unet forward"): ...`."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.formulas = attention_flop_formulas()

    @contextlib.contextmanager
    def __call__(self, name: str):
        with flop_counter.FlopCounterMode(display=False, custom_mapping=self.formulas) as counter:
            yield
        self.counts[name] = self.counts.get(name, 0) + counter.get_total_flops()


def random_inputs(batch: int, resolution: int, vocabulary: int, seed: int,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """The bare step's fixed batch: fp32 pixels in [-1, 1) and caption token ids, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1).to(device)
    input_ids = torch.randint(0, vocabulary, (batch, TOKENS), generator=generator).to(device)
    return pixels, input_ids


class BareStep:
    """The inner loop of diffusers' train_text_to_image.py on one fixed batch, with train.py's precision and
    optimizer: the same math as train.py's step on the same model."""

    def __init__(self, settings: Settings):
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler

        from optimizer.optimizers import freeze_text_encoder_parts

        if settings.device == "cpu" and settings.precision == "fp16":
            raise SystemExit("--precision fp16 needs --device cuda (on the CPU: fp32 or bf16)")
        if settings.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer: fp32 matmuls in TF32 on Ampere+
            torch.backends.cudnn.allow_tf32 = True
        self.settings = settings
        config, optimizer_settings = trainer_settings(settings)
        self.clip_grad_norm, self.log_grad_norm = config.clip_grad_norm, optimizer_settings.log_grad_norm
        self.accelerator = Accelerator(mixed_precision=PRECISIONS[settings.precision], cpu=settings.device == "cpu")
        device = self.accelerator.device
        parts = load_parts(settings.model, device, settings.seed)
        self.noise_scheduler, self.prediction_type = parts["scheduler"], parts["prediction_type"]
        unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
        # Every weight stays fp32, the frozen VAE and text encoder too, and mixed precision computes under
        # autocast, as in train.py (load_trainee): the example's cast of the frozen parts to the compute dtype
        # would time a lighter model than the one train.py trains.
        vae.requires_grad_(False).eval()
        text_encoder.requires_grad_(settings.train_text_encoder).train(settings.train_text_encoder)
        if settings.train_text_encoder:  # optimizer.json's text_encoder_freezing, as train.py applies it
            freeze_text_encoder_parts(text_encoder, optimizer_settings.freezing)
        unet.train()
        self.vae, self.scaling_factor = vae, vae.config.scaling_factor
        self.pixels, self.input_ids = random_inputs(settings.batch, settings.resolution,
                                                    text_encoder.config.vocab_size, settings.seed, device)
        self.latents = None
        if settings.cache_latents:  # encoded once: every step trains from these
            with torch.no_grad():
                self.latents = self.encode(self.pixels)
        self.trained = {"unet": unet} | ({"text encoder": text_encoder} if settings.train_text_encoder else {})
        optimizer = make_optimizer(optimizer_settings, {name: [p for p in module.parameters() if p.requires_grad]
                                                        for name, module in self.trained.items()})
        lr_scheduler = get_scheduler("constant", optimizer=optimizer)
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(unet, optimizer, lr_scheduler)
        self.text_encoder = self.accelerator.prepare(text_encoder) if settings.train_text_encoder else text_encoder
        self.plain = dict(unet=unet, text_encoder=text_encoder)  # the unwrapped modules

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """fp32 latents, as train.py's: the VAE computes under autocast."""
        with self.accelerator.autocast():
            latents = self.vae.encode(pixels).latent_dist.sample()
        return latents.float().contiguous() * self.scaling_factor

    def step(self, phase=no_count) -> torch.Tensor:
        """One training step; `phase(name)` wraps each part (FlopTally counts them). Returns the loss."""
        import torch.nn.functional as F

        with self.accelerator.autocast():  # as train.py's train_step: the whole forward, the loss included
            if self.latents is None:
                with phase("VAE encode"), torch.no_grad():
                    latents = self.encode(self.pixels)
            else:
                latents = self.latents
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=latents.device).long()
            noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
            with phase("text encoder forward"):
                encoder_hidden_states = self.text_encoder(self.input_ids, return_dict=False)[0]
            if self.prediction_type == "epsilon":
                target = noise
            else:
                target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
            with phase("UNet forward"):
                model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        with phase("backward"):
            self.accelerator.backward(loss)
        if self.clip_gradients():
            self.optimizer.step()
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def clip_gradients(self) -> bool:
        """As train.py's step_optimizer when its config clips (clip_grad_norm) or logs the gradient norm: unscale,
        then each trained part's norm, clipped on its own; False where train.py skips the step (a non-finite
        norm without fp16's grad scaler), a check that waits for the GPU."""
        if not (self.clip_grad_norm or self.log_grad_norm):  # train.py's defaults: neither
            return True
        self.accelerator.unscale_gradients()
        norms = []
        for module in self.trained.values():
            params = [p for p in module.parameters() if p.grad is not None]
            if self.clip_grad_norm:
                norms.append(torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm))
            else:
                norms.append(torch.nn.utils.get_total_norm([p.grad for p in params]))
        return self.accelerator.scaler is not None or all(bool(torch.isfinite(norm)) for norm in norms)

    def count_flops(self) -> dict[str, int]:
        """FLOPs of one whole step, by phase."""
        tally = FlopTally()
        self.step(tally)
        return tally.counts


def attention_flop_formulas() -> dict:
    """FlopCounterMode formulas (custom_mapping) that count the attention kernels' model FLOPs.

    torch 2.13 counts SDPA's CUDA kernels but not its CPU kernel, so on the CPU the attention FLOPs would be
    missing; and it counts the flash-attention backward's recomputation of the scores (five matrix products
    instead of four), hardware FLOPs that no other kernel executes. Here every kernel is counted the same,
    as model FLOPs: forward QK^T and PV (2 FLOPs per multiply-add), backward twice that, as the math
    (matmul) attention is counted and as MFU is defined (PaLM, arXiv 2204.02311, appendix B).
    """
    aten = torch.ops.aten

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    names = {"_scaled_dot_product_flash_attention_for_cpu": forward,
             "_scaled_dot_product_flash_attention_for_cpu_backward": backward,
             "_scaled_dot_product_flash_attention_backward": backward,
             "_scaled_dot_product_efficient_attention_backward": backward,
             "_scaled_dot_product_cudnn_attention_backward": backward}
    return {getattr(aten, name): formula for name, formula in names.items() if hasattr(aten, name)}


def prepare_bare(settings: Settings) -> tuple[BareStep, dict[str, int], int | None]:
    """The bare step, ready to time; its model FLOPs by phase (counted with the default attention, without
    checkpointing or compilation), and with --gradient_checkpointing the FLOPs it executes."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    bare = BareStep(settings)
    flops = bare.count_flops()
    executed = None
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(bare.plain["unet"], bare.plain["text_encoder"], settings.train_text_encoder)
        executed = sum(bare.count_flops().values())
    set_attention(bare.plain["unet"], settings.attention)
    if settings.compile:
        bare.unet = torch.compile(bare.unet)
    if bare.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the FLOP-count steps ran without checkpointing
    return bare, flops, executed


def time_bare(bare: BareStep, settings: Settings) -> list[float]:
    """Seconds of each of `steps` bare steps, after `warmup` untimed ones."""
    cuda = bare.accelerator.device.type == "cuda"
    seconds = []
    for _ in range(settings.warmup + settings.steps):
        start = time.perf_counter()
        bare.step()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds[settings.warmup:]


def bare_memory(bare: BareStep) -> tuple[int, int | None, str]:
    """The bare step's peak memory so far, its peak reserved memory on CUDA (None on the CPU), and how they were
    measured. On the CPU read it before the workload is written: that builds a second copy of the model in this
    process, which the peak RSS would keep."""
    from bench.step_timer import peak_rss_bytes

    if bare.accelerator.device.type == "cuda":
        return (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(),
                "torch.cuda.max_memory_allocated (max_memory_reserved in brackets: what the card must hold)")
    return peak_rss_bytes(), None, "peak RSS of the process"


def bare_result(settings: Settings, seconds: list[float], flops: dict[str, int], executed: int | None,
                memory: tuple[int, int | None, str]) -> BareResult:
    """The bare step's measurement from its step times, FLOPs and bare_memory()."""
    peak, reserved, kind = memory
    return BareResult(seconds, settings.batch, peak, kind, flops, executed, reserved_bytes=reserved)


def measure_bare(settings: Settings) -> BareResult:
    """Build the model, count one step's FLOPs, then time warmup + steps bare steps."""
    bare, flops, executed = prepare_bare(settings)
    seconds = time_bare(bare, settings)
    return bare_result(settings, seconds, flops, executed, bare_memory(bare))


def release(bare: BareStep) -> None:
    """Free the device memory the bare step holds (its models, gradients and optimizer state)."""
    import gc

    bare.accelerator.free_memory()  # the accelerator's own references to what it prepared
    for name in ("unet", "text_encoder", "vae", "optimizer", "lr_scheduler", "plain", "trained", "pixels", "latents"):
        setattr(bare, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
