"""The benchmarks' workload, the same for every trainer timed: a model folder and a folder of training images.

- `model_components(model)`: the tiny model (the trainer's builtin:tiny) or SD 1.5 / 2.1's architecture with
  random weights (utils/architectures.py), with a tokenizer and the model's training noise schedule. The real
  architectures get the tiny model's CLIP tokenizer: its token ids are all within their vocabularies, and the
  timings do not depend on which words the ids stand for. Nothing is downloaded.
- `write_model_folder`: those components as a diffusers pipeline folder, which train.py (`resume_ckpt`) and
  diffusers' example scripts (`--pretrained_model_name_or_path`) both load.
- `write_training_images`: square JPEGs of exactly the training resolution, captioned in their file names
  (train.py) and in a `metadata.jsonl` (the `datasets` imagefolder that diffusers' examples read), so that
  every batch of every trainer has the same shape and no image needs a resize.
- `run_trainer`, `timed_steps` and `loader_workers`: how each trainer runs on it, in its own process with a
  time limit, which of its step ends are timed, and how many data-loading workers it gets. A trainer that
  fails raises `TrainerFailed`, which the benchmark reports instead of stopping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import torch

CAPTIONS = ("a red circle on a blue background", "a yellow square on a green background",
            "orange stripes on a white wall", "a green tree on a hill under a blue sky")
METADATA_FILE = "metadata.jsonl"  # the imagefolder's captions: {"file_name": ..., "text": ...} per line


def model_components(model: str, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """unet, vae, text_encoder (fp32, on `device`), tokenizer, and scheduler (the training noise schedule)."""
    from diffusers import DDPMScheduler

    from utils.tiny_model import build_tiny_components, build_tiny_tokenizer, tiny_scheduler

    if model == "tiny":
        parts = build_tiny_components()
        return dict(parts, **{name: parts[name].to(device) for name in ("unet", "vae", "text_encoder")})
    from utils.architectures import ARCHITECTURES, build_random_components

    # The tiny model's schedule is SD's (1.x and 2.x share it); only what the model predicts differs.
    scheduler = DDPMScheduler.from_config(tiny_scheduler().config, prediction_type=ARCHITECTURES[model].prediction_type)
    return dict(build_random_components(model, device, seed), tokenizer=build_tiny_tokenizer(), scheduler=scheduler)


def write_model_folder(model: str, folder: str, seed: int = 0) -> str:
    """`model`'s components (model_components) saved as a diffusers StableDiffusionPipeline folder; `folder`."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(**model_components(model, "cpu", seed), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder


def write_training_images(folder: str, count: int, resolution: int, seed: int = 0) -> list[dict]:
    """`count` different resolution x resolution JPEGs in `folder`, each captioned in its file name (everything
    from the first `_` is ignored) and in `folder`/metadata.jsonl; the metadata records, in order."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    generator = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, resolution, dtype=np.float32)
    records = []
    for index in range(count):
        caption = CAPTIONS[index % len(CAPTIONS)]
        colours = generator.uniform(0, 255, size=(2, 3)).astype(np.float32)
        gradient = ramp[None, :, None] * colours[0] + ramp[::-1, None, None] * colours[1]  # a photo's smooth areas
        pixels = np.clip(gradient / 2 + generator.normal(0, 12, (resolution, resolution, 3)), 0, 255)  # and grain
        name = f"{caption}_({index}).jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, name), quality=90)
        records.append({"file_name": name, "text": caption})
    with open(os.path.join(folder, METADATA_FILE), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    return records


class TrainerFailed(Exception):
    """A trainer that exited with an error, ran past its time limit or timed too few steps: why, and the end of
    its output."""

    def __init__(self, reason: str, output: str = "", command: list[str] | None = None):
        super().__init__(reason)
        self.reason, self.output, self.command = reason, output, command or []

    def last_lines(self, count: int = 20) -> list[str]:
        return self.output.rstrip().splitlines()[-count:]


def run_trainer(command: list[str], env: dict, name: str, cwd: str | None = None,
                timeout: float | None = None) -> str:
    """Run a trainer to its end; its output (stdout and stderr interleaved, so the last lines are the last
    said). Raises TrainerFailed when it fails or runs past `timeout` seconds."""
    # Its own process group: a timeout, or Ctrl-C here, then stops its data-loader workers with it.
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(process)
        output, _ = process.communicate()
        raise TrainerFailed(f"{name} ran past the time limit of {timeout:g} s (--trainer_timeout_s) and was "
                            "stopped", output, command) from None
    finally:
        stop(process)
    if process.returncode != 0:
        raise TrainerFailed(f"{name} exited with code {process.returncode}", output, command)
    return output


def stop(process: subprocess.Popen) -> None:
    """Kill a trainer still running, and the processes it started (its process group)."""
    if process.poll() is not None:
        return
    if hasattr(os, "killpg"):
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.kill()


def loader_workers(num_workers: int | None) -> int:
    """The data-loading worker processes a trainer gets: `num_workers`, or for None train.py's automatic
    choice (its num_workers: null), which diffusers' example is given too."""
    from utils.config import automatic_num_workers

    return automatic_num_workers() if num_workers is None else num_workers


def timed_steps(step_ends: list[float], warmup: int, steps: int, name: str) -> list[float]:
    """The seconds of the timed steps from a trainer's step-end times (s), one per step: the gaps between
    consecutive ends after the `warmup` steps (so a run of warmup + steps + 1 steps times `steps`)."""
    if len(step_ends) < warmup + steps + 1:
        raise TrainerFailed(f"{name} timed {len(step_ends)} steps, fewer than the {warmup + steps + 1} asked for")
    gaps = [later - earlier for earlier, later in zip(step_ends, step_ends[1:])]
    return gaps[warmup:warmup + steps]


def seconds_inside_steps(step_starts: list[float | None], step_ends: list[float], warmup: int,
                         steps: int) -> list[float] | None:
    """Of the steps timed_steps times, the part from each one's start to its end (the trainer's step itself,
    without loading its batch); None when a start was not recorded."""
    timed = range(warmup + 1, warmup + steps + 1)  # gap i ends at step_ends[i + 1]
    if any(step_starts[index] is None for index in timed):
        return None
    return [step_ends[index] - step_starts[index] for index in timed]
