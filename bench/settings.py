"""What bench/train_throughput.py measures and what it finds, and train.py's command line for the same settings.

- `Settings`: one model and setting (model, resolution, batch, precision, attention, what trains, device...).
- `Measurement`: the step times and peak memory of one loop (the bare step or a trainer); `BareResult`: the bare
  step's, with its FLOPs per step by phase.
- `train_command`: train.py's command line for the same training as the bare step. The full step runs it
  (bench/train_throughput.py --full), and the bare step reads train.py's config and optimizer settings from
  it (bench/bare_step.py), so that both train what train.py trains.

Imports no torch, and no other bench module: bench/bare_step.py, bench/report.py and bench/train_throughput.py
import it, and train_throughput.py the other two, so that the imports form no cycle.
"""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRECISIONS = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}  # --precision's name -> accelerate's
ATTENTIONS = ("sdp", "xformers", "slice")  # as the trainer's attn_type
LEARNING_RATE = 1e-5


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
    # train.py: of each timed step, the part inside the trainer's step (train_batch and its bookkeeping), its
    # batch already loaded; the rest of step_seconds lies between batches (the loop's checks, loading the next
    # batch). None where not recorded.
    inside_seconds: list[float] | None = field(default=None, kw_only=True)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch / self.median_seconds

    def split_medians(self) -> tuple[float, float] | None:
        """(inside the step, between batches): the medians over the timed steps, in seconds; None when the
        part inside was not recorded."""
        if self.inside_seconds is None:
            return None
        between = [total - inside for total, inside in zip(self.step_seconds, self.inside_seconds, strict=True)]
        return statistics.median(self.inside_seconds), statistics.median(between)


@dataclass
class BareResult(Measurement):
    """The bare step's measurement, with its FLOPs per step by phase (model FLOPs) and as executed."""

    flops: dict[str, int] = field(default_factory=dict)
    executed_flops: int | None = None  # with gradient checkpointing: the recomputation included

    @property
    def model_flops(self) -> int:
        return sum(self.flops.values())


# -------------------------------------------------------------------------------------------------
# train.py's command line
# -------------------------------------------------------------------------------------------------

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
