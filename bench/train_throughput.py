"""Training throughput: images/s, ms/step, peak memory and MFU of one model and setting.

    .venv/bin/python bench/train_throughput.py --model sd15 --resolution 512 --batch 8 --precision bf16 \\
        --train_text_encoder --device cuda

1. The bare step: the plain training step of diffusers' examples/text_to_image/train_text_to_image.py (VAE
   encode -> noise -> add_noise -> text encode -> UNet -> MSE -> backward -> AdamW step -> zero_grad), with
   accelerate's Accelerator for mixed precision, repeated on one fixed batch of random pixels and tokens.
   It is the same math as train.py's step on the same model: every weight stays fp32, the frozen VAE and text
   encoder too, and mixed precision computes under autocast (train.py's load_trainee; the example casts the
   frozen parts to the compute dtype instead), and the optimizer is the one train.py builds for the same
   settings (its class and per-part groups from its own config and optimizer.json), with train.py's gradient
   clipping when its config clips (by default it does not). `--model sd15`/`sd21` build the real
   architecture with random weights (utils/architectures.py), `--model tiny` the trainer's builtin:tiny.
2. FLOPs: torch.utils.flop_counter.FlopCounterMode over one whole step, before timing, with the default
   attention (SDPA) and without gradient checkpointing: the model FLOPs (matmuls, convolutions, attention;
   norms and elementwise ops are not counted). With --gradient_checkpointing the step is counted again as
   executed (its recomputed forward included). MFU = model FLOPs / median step time / the device's peak.
3. --full: the trainer's real loop, `train.py` in a subprocess with the same settings, on the same model saved
   as a diffusers folder and on square images of exactly the resolution (bench/workload.py: every batch has
   the bare step's shape), timed by the bench/step_timer.py plugin; the ratio full/bare is the trainer's
   overhead. --num_workers sets its data-loading workers (default: 0 on the CPU, train.py's automatic choice
   on CUDA). A trainer that fails or runs past --trainer_timeout_s is reported as failed; the bare step's
   numbers are printed as soon as they are measured.
4. --diffusers_example PATH: diffusers' train_text_to_image.py itself, on the same model folder and images
   (bench/diffusers_example.py), timed from its TensorBoard events; with --full, the ratio example/full is
   the trainer's speed-up over it.

Prints a markdown table with the command, the machine and the date, ready for doc/PERFORMANCE.md. Exits with
status 1 when a trainer failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run as a script from anywhere: bench/ is not a package
# As train.py: MKL may otherwise use fewer threads when the machine is busy, and its strict reproducibility
# mode (which train.py sets) may cost time on the CPU, so the bare step runs with it too. Set before torch loads.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

PRECISIONS = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}  # this script's name -> accelerate's
ATTENTIONS = ("sdp", "xformers", "slice")  # as the trainer's attn_type
TOKENS = 77  # CLIP's context: every caption is padded to it
LEARNING_RATE = 1e-5
TRAINER_TIMEOUT_S = 900  # per run of a trainer: SD 1.5's 14 steps take about a minute on an H100

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOPS, from NVIDIA's datasheets and whitepapers. The
# longest name contained in torch.cuda.get_device_name() wins, so "NVIDIA H200 NVL" gets the NVL card's
# figure, not the SXM module's. The GeForce figures are fp16/bf16 with fp32 accumulation (what PyTorch
# uses); with fp16 accumulation they are twice as high.
PEAK_TFLOPS = (
    ("H100", 989.0),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),  # H200 SXM ("NVIDIA H200")
    ("H200 NVL", 835.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.2),  # fp16/bf16 with fp32 accumulation
    ("RTX 3090", 71.0),  # fp16/bf16 with fp32 accumulation
)

DIFFUSERS_EXAMPLE = "diffusers' examples/text_to_image/train_text_to_image.py"
TRAINERS = {"full": "train.py", "example": "diffusers' example"}  # the trainers timed besides the bare step


# -------------------------------------------------------------------------------------------------
# Settings and results
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """What one measurement trains, and how."""

    model: str = "tiny"  # tiny | sd15 | sd21
    resolution: int = 512  # px, square
    batch: int = 1
    steps: int = 10  # timed steps
    warmup: int = 3  # untimed steps before them
    precision: str = "fp32"  # fp32 | fp16 | bf16
    attention: str = "sdp"
    gradient_checkpointing: bool = False
    train_text_encoder: bool = False
    cache_latents: bool = False
    compile: bool = False
    optimizer: str = "adamw"  # adamw | adamw8bit
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None  # CPU threads of torch (here and in train.py); None = torch's default
    num_workers: int | None = 0  # the trainers' data-loading workers; None = train.py's automatic choice

    def describe(self) -> str:
        parts = ["UNet + text encoder" if self.train_text_encoder else "UNet"]
        parts.append("cached latents" if self.cache_latents else "VAE encode every step")
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        if self.compile:
            parts.append("torch.compile(UNet)")
        return (f"{self.model}, {self.resolution} px, batch {self.batch}, {self.precision}, attention "
                f"{self.attention}, {self.optimizer}, trains {', '.join(parts)}, on {self.device}")


@dataclass
class Measurement:
    """Step times and memory of one loop (the bare step or the trainer)."""

    step_seconds: list[float]  # the timed steps, in order
    batch: int
    peak_memory_bytes: int | None
    memory_kind: str  # how peak_memory_bytes was measured
    reserved_bytes: int | None = field(default=None, kw_only=True)  # CUDA: torch.cuda.max_memory_reserved

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch / self.median_seconds


@dataclass
class BareResult(Measurement):
    """The bare step's measurement, with its FLOPs per step by phase (model FLOPs) and as executed."""

    flops: dict[str, int] = field(default_factory=dict)
    executed_flops: int | None = None  # with gradient checkpointing: the recomputation included

    @property
    def model_flops(self) -> int:
        return sum(self.flops.values())


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
        generator = torch.Generator().manual_seed(settings.seed)
        size = settings.resolution
        self.pixels = (torch.rand(settings.batch, 3, size, size, generator=generator) * 2 - 1).to(device)  # fp32
        vocabulary = text_encoder.config.vocab_size
        self.input_ids = torch.randint(0, vocabulary, (settings.batch, TOKENS), generator=generator).to(device)
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


# -------------------------------------------------------------------------------------------------
# The trainer's loop (--full)
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """What the trainers timed besides the bare step train on: one model folder, one image folder."""

    folder: str  # a temporary folder holding both, and the trainers' outputs
    model_folder: str
    data_folder: str


def write_workload(settings: Settings, folder: str) -> Workload:
    """The model of `settings` as a diffusers folder and enough images for warmup + steps + 1 steps of one
    epoch, in `folder`."""
    from bench.workload import write_model_folder, write_training_images

    model_folder = write_model_folder(settings.model, os.path.join(folder, "model"), settings.seed)
    data_folder = os.path.join(folder, "data")
    write_training_images(data_folder, (settings.warmup + settings.steps + 1) * settings.batch, settings.resolution,
                          settings.seed)
    return Workload(folder, model_folder, data_folder)


def train_command(settings: Settings, model_folder: str, data_root: str, logdir: str) -> list[str]:
    """train.py's command line for the same training as the bare step, with nothing else in the loop."""
    command = [sys.executable, os.path.join(REPO_ROOT, "train.py"), "--resume_ckpt", model_folder,
               "--data_root", data_root, "--logdir", logdir, "--project_name", "bench",
               "--resolution", str(settings.resolution), "--batch_size", str(settings.batch), "--grad_accum", "1",
               "--max_epochs", "1", "--lr", str(LEARNING_RATE), "--flip_p", "0",
               "--sample_prompts", "null", "--validation_config", "null",
               "--num_workers", "null" if settings.num_workers is None else str(settings.num_workers),
               "--log_step", "1000000", "--ckpt_every_n_minutes", "0", "--save_every_n_epochs", "0",
               "--no_save_ckpt", "true", "--attn_type", settings.attention, "--optimizer", settings.optimizer,
               "--gradient_checkpointing", str(settings.gradient_checkpointing).lower(),
               "--disable_textenc_training", str(not settings.train_text_encoder).lower(),
               "--plugins", "bench.step_timer.StepTimer"]
    if settings.precision == "fp32":
        command += ["--disable_amp", "true"]
    else:
        command += ["--mixed_precision", settings.precision]
    if settings.cache_latents:
        command += ["--cache_latents", "true"]
    return command


def process_environment(settings: Settings) -> dict:
    """The environment of a trainer run in a subprocess: the device and thread count of `settings`."""
    env = dict(os.environ)
    if settings.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainers take the GPU whenever they see one
    if settings.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(settings.threads)
    return env


def measure_full(settings: Settings, workload: Workload, timeout: float | None = None) -> Measurement:
    """Run train.py for warmup + steps + 1 steps; the step times are the gaps between consecutive step ends,
    after the warm-up. Raises TrainerFailed."""
    from bench.step_timer import ENV_VAR, read_step_times
    from bench.workload import TrainerFailed, run_trainer, timed_steps

    with tempfile.TemporaryDirectory(prefix="train_py_", dir=workload.folder) as folder:
        times_path = os.path.join(folder, "step_times.txt")
        env = dict(process_environment(settings), **{ENV_VAR: times_path})
        command = train_command(settings, workload.model_folder, workload.data_folder, os.path.join(folder, "logs"))
        output = run_trainer(command, env, "train.py", cwd=REPO_ROOT, timeout=timeout)
        if not os.path.exists(times_path):
            raise TrainerFailed("train.py ran but the StepTimer plugin wrote nothing: does this train.py call "
                                "plugins' on_step_end?", output, command)
        times, peak, peak_kind, reserved = read_step_times(times_path)
    try:
        seconds = timed_steps(times, settings.warmup, settings.steps, "train.py")
    except TrainerFailed as failure:  # with what train.py said
        raise TrainerFailed(failure.reason, output, command) from None
    return Measurement(seconds, settings.batch, peak, peak_kind or "not recorded", reserved_bytes=reserved)


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------

def peak_tflops(device: str, precision: str, override: float | None) -> tuple[float | None, str]:
    """The peak to divide by, and where it came from; None when there is none to use."""
    if override:
        return override, "--peak_tflops"
    if device != "cuda":
        return None, "no peak known for a CPU: give --peak_tflops"
    name = torch.cuda.get_device_name()
    if precision == "fp32":
        return None, f"{name} in fp32: the table holds bf16/fp16 peaks; give --peak_tflops"
    entry = table_peak(name)
    if entry is None:
        return None, f"{name} is not in the peak table: give --peak_tflops"
    return entry[1], f'{name}, the table\'s "{entry[0]}": dense bf16/fp16 peak {entry[1]:g} TFLOPS'


def table_peak(device_name: str) -> tuple[str, float] | None:
    """The PEAK_TFLOPS entry for a device name: the longest table name it contains, case aside; None if none."""
    found = [(key, value) for key, value in PEAK_TFLOPS if key.lower() in device_name.lower()]
    return max(found, key=lambda entry: len(entry[0]), default=None)


def machine(device: str, load_before: float | None = None) -> str:
    from bench.bench_data_loader import cpu_model

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()
    text = (f"{usable} usable CPU cores of {os.cpu_count()} ({cpu_model()}), {platform.system()} "
            f"{platform.machine()}, torch on {threads} thread{'' if threads == 1 else 's'}")
    if load_before is not None:
        text += f", 1-minute load average {load_before:.2f} before the run"
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        text += f"; GPU {properties.name} ({properties.total_memory / 2**30:.0f} GiB)"
    return text


def versions() -> str:
    import accelerate
    import diffusers
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}"
            + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")
            + f", diffusers {diffusers.__version__}, transformers {transformers.__version__}, accelerate "
            f"{accelerate.__version__}")


def gigabytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f} GB"


def memory_text(result: Measurement) -> str:
    """The peak memory, and on CUDA the peak reserved in brackets."""
    reserved = "" if result.reserved_bytes is None else f" ({gigabytes(result.reserved_bytes)})"
    return gigabytes(result.peak_memory_bytes) + reserved


def flop_text(value: float) -> str:
    return f"{value / 1e12:.3f} TFLOP" if value >= 1e11 else f"{value / 1e9:.2f} GFLOP"


def result_row(what: str, result: Measurement, flops: int | None, peak: float | None) -> str:
    """A table row; `flops` None: the loop's FLOPs per step are not known (no TFLOPS, no MFU)."""
    achieved = flops / result.median_seconds / 1e12 if flops else None
    mfu = f"{100 * achieved / peak:.1f}%" if peak and achieved else "n/a"
    spread = f"{min(result.step_seconds) * 1e3:.1f}-{max(result.step_seconds) * 1e3:.1f}"
    return (f"| {what} | {result.median_seconds * 1e3:.1f} ({spread}) | {result.images_per_second:.2f} | "
            f"{memory_text(result)} | {'n/a' if achieved is None else f'{achieved:.3f}'} | {mfu} |")


def failed_row(what: str, failure) -> str:
    """A table row for a loop whose trainer failed (bench.workload.TrainerFailed); its output follows the table."""
    return f"| {what} | failed: {failure.reason.replace('|', '/')} (its last lines below) | | | | |"


def bare_section(bare: BareResult, peak: float | None) -> str:
    """The bare step's table, printed as soon as it is measured: a trainer timed after it may fail or take long."""
    return "\n".join(["Bare step, measured (the report follows when the trainers are done):", "", *TABLE_HEAD,
                      result_row(BARE_ROW, bare, bare.model_flops, peak), ""])


def failure_text(what: str, failure) -> str:
    """What a failed trainer said last, and its command."""
    lines = [f"{what} failed: {failure.reason}."]
    if failure.output.strip():
        lines += ["Its last lines:", "```", *failure.last_lines(), "```"]
    if failure.command:
        lines.append(f"Command: `{' '.join(failure.command)}`")
    return "\n".join(lines)


TABLE_HEAD = ("| loop | ms/step | images/s | peak memory | achieved TFLOPS (model FLOPs) | MFU |",
              "|---|---|---|---|---|---|")
BARE_ROW = "bare step (diffusers example's inner loop)"
FULL_ROW = "full step (train.py, StepTimer plugin)"
EXAMPLE_ROW = "diffusers example (train_text_to_image.py, TensorBoard wall times)"


def report(command: str, settings: Settings, bare: BareResult, full: Measurement | None, peak: float | None,
           peak_origin: str, load_before: float | None = None, ratios: list[float] | None = None,
           example: Measurement | None = None, example_origin: str = "", failures: dict | None = None) -> str:
    """The markdown for doc/PERFORMANCE.md: command and date, machine, setting, the table, the FLOPs; a trainer
    that failed ("full", "example" in `failures`, bench.workload.TrainerFailed) has a failed row and its output."""
    failures = failures or {}
    lines = [f"`{command.strip()}`, {datetime.date.today().isoformat()}", "",
             f"Machine: {machine(settings.device, load_before)}; {versions()}.", "",
             f"Setting: {settings.describe()}. {rounds_text(settings, len(bare.step_seconds), bool(full or example))}",
             "", *TABLE_HEAD, result_row(BARE_ROW, bare, bare.model_flops, peak)]
    if full is not None:
        lines.append(result_row(FULL_ROW, full, bare.model_flops, peak))
        ratio = full.median_seconds / bare.median_seconds
        rounds = (f"; per round (bare, then full): {', '.join(f'{r:.3f}x' for r in ratios)}, median "
                  f"{statistics.median(ratios):.3f}x" if ratios and len(ratios) > 1 else "")
        lines.append(f"| overhead full / bare | {ratio:.3f}x (medians of all steps{rounds}) | | | | |")
    elif "full" in failures:
        lines.append(failed_row(FULL_ROW, failures["full"]))
    if example is not None:
        # With cache_latents the bare step counts no VAE encode, which the example still does at every step.
        lines.append(result_row(EXAMPLE_ROW, example, None if settings.cache_latents else bare.model_flops, peak))
        if full is not None:
            lines.append(f"| speed-up of train.py over the example | "
                         f"{example.median_seconds / full.median_seconds:.3f}x (example / full, medians of all steps)"
                         " | | | | |")
    elif "example" in failures:
        lines.append(failed_row(EXAMPLE_ROW, failures["example"]))
    phases = ", ".join(f"{name} {flop_text(value)}" for name, value in bare.flops.items())
    per_image = bare.model_flops / settings.batch
    lines += ["", f"Model FLOPs per step (torch.utils.flop_counter.FlopCounterMode over one step, SDPA counted as "
              f"the matmul attention, no recomputation): {phases}; total {flop_text(bare.model_flops)} "
              f"({flop_text(per_image)} per image)."]
    if bare.executed_flops is not None:
        lines.append(f"Executed with gradient checkpointing (recomputation included): "
                     f"{flop_text(bare.executed_flops)} ({bare.executed_flops / bare.model_flops:.2f}x); MFU "
                     "above counts model FLOPs only.")
    lines.append(f"MFU peak: {peak_origin}. Peak memory: {bare.memory_kind}"
                 + (f" (full step: {full.memory_kind})." if full else "."))
    lines.append("The bare step is train.py's math: fp32 weights (the frozen VAE and text encoder too) under "
                 "autocast, train.py's optimizer for these settings, and its gradient clipping (none by default).")
    if settings.attention == "xformers":
        lines.append("xformers' kernels are invisible to FlopCounterMode: the FLOPs were counted with SDPA.")
    if full is not None or example is not None:
        lines.append("The full step's and the example's MFU use the bare step's FLOPs (the same model, batch and "
                     "resolution). Their step times are the gaps between consecutive step ends (the StepTimer "
                     "plugin waits for the GPU; the example waits for its loss every step).")
    ran = [TRAINERS[name] for name, result in (("full", full), ("example", example)) if result or name in failures]
    if ran:
        lines.append(data_loading_text(settings, " and ".join(ran)))
    if example is not None:
        lines.append(f"The example: {example_origin}. It trains the UNet only, with the frozen VAE and text encoder "
                     "cast to the compute precision, and clips the gradient norm to 1.0 at every step (its "
                     "--max_grad_norm; train.py by default does not clip)."
                     + (" It has no latent cache: it encodes every image at every step, so its FLOPs are not the "
                        "bare step's and its MFU is not given." if settings.cache_latents else ""))
    elif "example" not in failures:
        lines += ["", why_the_diffusers_example_was_not_run()]
    for name, failure in failures.items():
        lines += ["", failure_text(TRAINERS[name], failure)]
    return "\n".join(lines)


def data_loading_text(settings: Settings, trainers: str = "train.py") -> str:
    """How many data-loading workers the trainers had, and who chose."""
    from bench.workload import loader_workers

    workers = loader_workers(settings.num_workers)
    chosen = ("train.py's automatic choice, num_workers null: CPU cores - 1, at most 8" if settings.num_workers is None
              else "--num_workers, 0 unless given on the CPU")
    serial = "; the images are decoded in the training process, in turn with the steps" if not workers else ""
    return f"Data loading: {workers} worker process{'' if workers == 1 else 'es'} in {trainers} ({chosen}){serial}."


def rounds_text(settings: Settings, timed: int, others: bool) -> str:
    rounds = timed // settings.steps
    each = f"{settings.steps} steps after {settings.warmup} warm-up steps"
    if rounds == 1:
        return f"Median of {each} (range in brackets)."
    order = ""
    if others:
        order = (", the loops alternated" if settings.model == "tiny"
                 else ", the bare step's rounds first, then the trainers' (the bare step released in between)")
    return f"Median of {rounds} rounds of {each}{order} (range in brackets)."


def why_the_diffusers_example_was_not_run() -> str:
    """The bare step stands in for diffusers' example script; say why the script itself was not timed."""
    import importlib.util

    missing = [name for name in ("torchvision", "datasets") if importlib.util.find_spec(name) is None]
    needs = (f"; it also needs {' and '.join(missing)}, not installed here" if missing else "")
    return (f"{DIFFUSERS_EXAMPLE} was not run: it is not part of the diffusers pip package; give its path from a "
            f"checkout of diffusers' repository with --diffusers_example{needs}. The bare step is that script's "
            "inner training loop (VAE encode, noise, add_noise, text encode, UNet, MSE, backward, AdamW step, "
            "zero_grad), written out and run on one fixed batch.")


# -------------------------------------------------------------------------------------------------
# Main
# -------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "sd15", "sd21"), default="tiny",
                        help="tiny: the trainer's builtin:tiny; sd15, sd21: the real architecture, random weights")
    parser.add_argument("--resolution", type=int, default=512, help="square image side in px (default 512)")
    parser.add_argument("--batch", type=int, default=1, help="images per step (default 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                        help="fp32, or fp16/bf16 mixed precision via accelerate (default fp32)")
    parser.add_argument("--attention", choices=ATTENTIONS, default="sdp", help="the UNet's attention kernel")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--train_text_encoder", action="store_true", help="train the text encoder too")
    parser.add_argument("--cache_latents", action="store_true",
                        help="encode the batch with the VAE once before timing; train from those latents")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (compiled in the warm-up)")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's peak TFLOPS for MFU (default: the built-in table on CUDA; none on CPU)")
    parser.add_argument("--full", action="store_true",
                        help="also time train.py's real loop with the same settings and print the ratio")
    parser.add_argument("--diffusers_example", metavar="PATH", default=None,
                        help="also time diffusers' examples/text_to_image/train_text_to_image.py (its path in a "
                             "checkout of diffusers; needs torchvision and datasets) on the same model and images")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of timing, alternating the bare step, the full step and the example (default 1)")
    parser.add_argument("--workdir", default=None,
                        help="folder for the temporary model, images and runs of --full and --diffusers_example "
                             "(default: the system's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch, here and in train.py (default: torch's, one per core)")
    parser.add_argument("--num_workers", type=worker_count, default=None, metavar="N|auto",
                        help="data-loading worker processes of train.py and the example (default: 0 on the CPU, "
                             "where they would compete with the step for the cores; auto, train.py's automatic "
                             "choice, on CUDA)")
    parser.add_argument("--trainer_timeout_s", type=float, default=TRAINER_TIMEOUT_S,
                        help=f"stop a trainer's run after this many seconds and report it failed (default "
                             f"{TRAINER_TIMEOUT_S})")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def worker_count(text: str) -> int | str:
    """--num_workers: a count from 0, or auto."""
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number from 0, or auto, got {text!r}")
    return int(text)


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings of the command line, checked before anything is measured."""
    if args.resolution % 8:
        raise SystemExit("--resolution must be a multiple of 8 (the VAE downscales by 8)")
    if args.full and (args.resolution % 64 or not 256 <= args.resolution <= 2048):
        raise SystemExit("--full: train.py trains at a multiple of 64 from 256 to 2048 px")
    if args.full and args.compile:
        raise SystemExit("--full: train.py has no torch.compile option; leave out --compile")
    if args.full and args.device == "cpu" and args.precision != "fp32":
        raise SystemExit("--full on the CPU: train.py trains in fp32 there; use --precision fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    workers = args.num_workers if args.num_workers is not None else ("auto" if args.device == "cuda" else 0)
    settings = Settings(model=args.model, resolution=args.resolution, batch=args.batch, steps=args.steps,
                        warmup=args.warmup, precision=args.precision, attention=args.attention,
                        gradient_checkpointing=args.gradient_checkpointing, train_text_encoder=args.train_text_encoder,
                        cache_latents=args.cache_latents, compile=args.compile, optimizer=args.optimizer,
                        device=args.device, seed=args.seed, threads=args.threads,
                        num_workers=None if workers == "auto" else workers)
    if args.diffusers_example:
        from bench.diffusers_example import unsupported

        if not os.path.isfile(args.diffusers_example):
            raise SystemExit(f"--diffusers_example: {args.diffusers_example} is not a file: give the path of "
                             "examples/text_to_image/train_text_to_image.py in a checkout of diffusers")
        why = unsupported(settings)
        if why:
            raise SystemExit(f"--diffusers_example: {why}")
    return settings


def main(argv: list[str] | None = None) -> int:
    """Measure and print the report; the exit status: 1 when a trainer failed."""
    from bench.diffusers_example import describe

    # `timeout` and job schedulers stop the bench with SIGTERM: as an exception, the trainer it runs is stopped
    # too (bench.workload.run_trainer's finally), instead of training on alone.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    args = parse_args(argv)
    settings = settings_from(args)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    peak, origin = peak_tflops(settings.device, settings.precision, args.peak_tflops)
    trainers = bool(args.full or args.diffusers_example)
    bare, flops, executed = prepare_bare(settings)
    # The tiny model's rounds alternate the loops, so that other work on the machine slows each alike. A real
    # model's bare step is timed first and released, so that the trainers don't share the device with it.
    alternate = settings.model == "tiny"
    bare_rounds = [time_bare(bare, settings) for _ in range(1 if alternate else args.repeats)]
    memory = bare_memory(bare)  # before the workload is written (a second model in this process)
    if trainers:
        print(bare_section(bare_result(settings, bare_rounds[0], flops, executed, memory), peak), flush=True)
    others, failures = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_train_", dir=args.workdir) as folder:
        if not alternate:
            release(bare)
            del bare
        workload = write_workload(settings, folder) if trainers else None
        for round_ in range(args.repeats):
            if alternate and round_:
                bare_rounds.append(time_bare(bare, settings))
            others.append(time_trainers(settings, args, workload, failures))
    bare_measured = bare_result(settings, [s for round_ in bare_rounds for s in round_], flops, executed, memory)
    full, example = merged([f for f, _ in others if f]), merged([e for _, e in others if e])
    ratios = [statistics.median(f.step_seconds) / statistics.median(b)
              for b, (f, _) in zip(bare_rounds, others) if f] if alternate else []
    command = "python bench/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(report(command, settings, bare_measured, full, peak, origin, load_before, ratios, example,
                 describe(args.diffusers_example) if example else "", failures), flush=True)
    return 1 if failures else 0


def time_trainers(settings: Settings, args: argparse.Namespace, workload: Workload | None,
                  failures: dict) -> tuple[Measurement | None, Measurement | None]:
    """One round of train.py (--full) and of diffusers' example (--diffusers_example), each when asked for; a
    failure is kept in `failures` under "full" or "example"."""
    from bench.diffusers_example import time_example

    full = example = None
    if args.full:
        full = attempt("full", failures, lambda: measure_full(settings, workload, args.trainer_timeout_s))
    if args.diffusers_example:
        seconds = attempt("example", failures, lambda: time_example(
            settings, args.diffusers_example, workload.model_folder, workload.data_folder, workload.folder,
            process_environment(settings), LEARNING_RATE, args.trainer_timeout_s))
        if seconds:
            example = Measurement(seconds, settings.batch, None, "not measured (its own process)")
    return full, example


def attempt(name: str, failures: dict, measure):
    """measure(), or None when it fails: the failure (bench.workload.TrainerFailed) is kept in `failures` under
    `name` and said at once. A trainer that failed is not run again: each try may take --trainer_timeout_s."""
    from bench.workload import TrainerFailed

    if name in failures:
        return None
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 - reported with the other loops' numbers, instead of losing them
        failure = (error if isinstance(error, TrainerFailed)
                   else TrainerFailed(f"{type(error).__name__}: {error}", traceback.format_exc()))
        failures[name] = failure
        print(f"{TRAINERS[name]} failed: {failure.reason} (its output is at the end of the report)", flush=True)
        return None


def release(bare: BareStep) -> None:
    """Free the device memory the bare step holds (its models, gradients and optimizer state)."""
    import gc

    bare.accelerator.free_memory()  # the accelerator's own references to what it prepared
    for name in ("unet", "text_encoder", "vae", "optimizer", "lr_scheduler", "plain", "trained", "pixels", "latents"):
        setattr(bare, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merged(rounds: list[Measurement]) -> Measurement | None:
    """The rounds' step times as one measurement, with the highest peak memory; None without rounds."""
    if not rounds:
        return None
    peaks = [round_.peak_memory_bytes for round_ in rounds if round_.peak_memory_bytes is not None]
    return Measurement([s for round_ in rounds for s in round_.step_seconds], rounds[0].batch,
                       max(peaks) if peaks else None, rounds[0].memory_kind)


if __name__ == "__main__":
    sys.exit(main())
