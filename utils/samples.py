"""Sample images during training: one picture per prompt, one panel per CFG value, saved as JPEG with a
.txt of its settings and returned for TensorBoard.

Sampling must not change the run it observes: the global RNG streams (torch CPU and CUDA, Python, NumPy)
are the same afterwards as before, every module goes back to its train/eval mode, no gradient is
recorded and `requires_grad` is left alone. The noise comes from CPU generators seeded per prompt, so a
seed gives the same starting noise on any device and at any batch size (as diffusers recommends for
reproducibility: https://huggingface.co/docs/diffusers/using-diffusers/reusing_seeds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from utils.model_family import ModelFamily
from utils.sample_prompts import SamplePrompt, SampleSettings, sample_seed, scheduler_problem, scheduler_spec

JPEG_QUALITY = 95  # as EveryDream2
SLUG_CHARS = 40  # prompt characters kept in file names


@dataclass(frozen=True)
class SampleImage:
    """One composed sample: what to show in TensorBoard and where it was written."""

    tag: str  # TensorBoard image tag, the same at every step so its slider walks through training
    image: Image.Image  # RGB, one panel per CFG value side by side; np.asarray(image) is HWC uint8
    path: str  # the .jpg (the .txt beside it has the settings)
    prompt: SamplePrompt  # as generated: random caption filled in, seed resolved


# --- schedulers and pipelines ---------------------------------------------------------------------

def build_scheduler(name: str, scheduler_config: Any):
    """The named sampler (utils/sample_prompts.SCHEDULERS) over the model's own noise schedule.

    `scheduler_config` is the model's scheduler or its config, so the betas, prediction type and
    zero-terminal-SNR rescaling the model was trained with carry over.
    """
    import diffusers

    problem = scheduler_problem(name)
    if problem:
        raise ValueError(problem)
    spec = scheduler_spec(name)
    config = getattr(scheduler_config, "config", scheduler_config)
    return getattr(diffusers, spec.class_name).from_config(config, **spec.kwargs)


def make_pipeline(components: dict[str, Any], family: ModelFamily, scheduler):
    """The family's diffusers pipeline around the modules being trained (no copy, no safety checker)."""
    return family.pipeline_class()(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        unet=components["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


# --- keeping training undisturbed -----------------------------------------------------------------

@contextlib.contextmanager
def isolated_rng(device: torch.device | None = None) -> Iterator[None]:
    """Every global RNG stream (torch CPU, the CUDA `device`'s, Python `random`, NumPy) as it was on entry,
    on exit. Only the device sampled on is forked, so other GPUs of the machine are never touched."""
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """The modules in eval mode (no dropout), then each submodule back in its own mode, mixed ones included."""
    modes = [(sub, sub.training) for module in modules for sub in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for sub, training in modes:
            sub.training = training


def _autocast(device: torch.device, dtype: torch.dtype | None):
    # On CUDA, fp16/bf16 sampling as in mixed-precision training, whatever precision each part is held in.
    # On the CPU everything is fp32: CPU autocast would only slow it down and change the pictures.
    if device.type == "cuda" and dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# --- generation -----------------------------------------------------------------------------------

@torch.no_grad()
def generate_samples(components: dict[str, Any], family: ModelFamily, settings: SampleSettings,
                     prompts: tuple[SamplePrompt, ...] | list[SamplePrompt], samples_dir: str, global_step: int, *,
                     clip_skip: int = 0, label: str = "", guidance_rescale: float = 0.0,
                     autocast_dtype: torch.dtype | None = torch.float16) -> list[SampleImage]:
    """Generate, save and return one picture per prompt, with one panel per CFG value.

    `components`: unet, vae, text_encoder, tokenizer and scheduler (or its config), as
    SDModel.components() gives them; pass an EMA UNet in place of the trained one to sample the EMA.
    Random captions must already be filled in (sample_prompts.with_random_captions). `label` (e.g. "ema")
    goes into file names, tags and the .txt. `clip_skip` is the trainer's (0/1 = last layer, 2 =
    penultimate); the prompts are encoded by the family exactly as in training.
    """
    if not prompts:
        return []
    os.makedirs(samples_dir, exist_ok=True)
    unet, vae, text_encoder = components["unet"], components["vae"], components["text_encoder"]
    device = next(unet.parameters()).device
    pipeline = make_pipeline(components, family, build_scheduler(settings.scheduler, components["scheduler"]))
    pipeline.set_progress_bar_config(disable=not settings.show_progress_bars, leave=False)
    resolved = [dataclasses.replace(p, seed=sample_seed(p.seed, settings.seed, global_step, i))
                for i, p in enumerate(prompts)]
    results: list[tuple[int, SampleImage]] = []
    with isolated_rng(device), eval_mode(unet, vae, text_encoder), _autocast(device, autocast_dtype):
        for batch in _batches(resolved, settings.batch_size):
            first = batch[0][1]
            embeddings = _encode(family, components["tokenizer"], text_encoder, clip_skip,
                                 [p.prompt for _, p in batch] + [p.negative_prompt for _, p in batch])
            positive, negative = embeddings[:len(batch)], embeddings[len(batch):]
            panels: list[list[Image.Image]] = [[] for _ in batch]
            for cfg in first.cfgs:
                # Fresh generators for every CFG value: the panels differ only in guidance.
                generators = [torch.Generator("cpu").manual_seed(p.seed) for _, p in batch]
                images = pipeline(prompt_embeds=positive, negative_prompt_embeds=negative,
                                  width=first.width, height=first.height, guidance_scale=cfg,
                                  num_inference_steps=settings.num_inference_steps, generator=generators,
                                  guidance_rescale=guidance_rescale, output_type="pil").images
                for row, image in zip(panels, images):
                    row.append(image.convert("RGB"))
            for (index, prompt), row in zip(batch, panels):
                results.append((index, _save(index, prompt, row, settings, samples_dir, global_step, label,
                                             clip_skip)))
    return [sample for _, sample in sorted(results, key=lambda r: r[0])]


def _batches(prompts: list[SamplePrompt], batch_size: int) -> Iterator[list[tuple[int, SamplePrompt]]]:
    """(index, prompt) groups of at most batch_size that share a size and CFG values, in file order."""
    groups: dict[tuple, list[tuple[int, SamplePrompt]]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault((prompt.width, prompt.height, prompt.cfgs), []).append((index, prompt))
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            yield members[start:start + batch_size]


def _encode(family: ModelFamily, tokenizer, text_encoder, clip_skip: int, texts: list[str]) -> torch.Tensor:
    # The family's own encoding, the one training uses, rather than the pipeline's `clip_skip` argument:
    # that would be clip_skip - 1 there, and diffusers reaches for `text_encoder.text_model`, which
    # transformers 5's CLIPTextModel no longer has.
    ids = family.tokenize(tokenizer, texts).to(text_encoder.device)
    return family.encode(text_encoder, ids, clip_skip).hidden_states


# --- output ---------------------------------------------------------------------------------------

def cfg_label(cfg: float) -> str:
    """"cfg 7.0", "cfg 1.01": one decimal unless more are needed."""
    return f"cfg {cfg:.1f}" if round(cfg, 1) == cfg else f"cfg {cfg:g}"


def compose_panels(panels: list[Image.Image], labels: list[str]) -> Image.Image:
    """The panels side by side, left to right, each with its label in a white box in its top-left corner."""
    width, height = sum(p.width for p in panels), max(p.height for p in panels)
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    font = _font(max(10, height // 20))
    x = 0
    for panel, text in zip(panels, labels):
        picture.paste(panel, (x, 0))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = max(2, (bottom - top) // 4)
        draw.rectangle((x, 0, x + right - left + 2 * pad, bottom - top + 2 * pad), fill="white")
        draw.text((x + pad - left, pad - top), text, fill="black", font=font)
        x += panel.width
    return picture


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def slug(text: str, max_chars: int = SLUG_CHARS) -> str:
    """`A photo of Ted, 35mm!` -> `a-photo-of-ted-35mm`: lower-case ASCII words joined by hyphens."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return words[:max_chars].rstrip("-") or "empty-prompt"


def sample_stem(global_step: int, index: int, prompt: SamplePrompt, label: str = "") -> str:
    """`gs00250_00_a-red-circle` (`gs00250_00_ema_a-red-circle` for label "ema"): sorts by step, then index."""
    return "_".join(part for part in (f"gs{global_step:05d}", f"{index:02d}", label, slug(prompt.prompt)) if part)


def sample_tag(index: int, prompt: SamplePrompt, label: str = "") -> str:
    """`samples/00_a-red-circle` (`..._ema`); a random caption changes, so its tag does not name it."""
    name = "random-caption" if prompt.random_caption else slug(prompt.prompt)
    return f"samples/{index:02d}_{name}" + (f"_{label}" if label else "")


def describe(prompt: SamplePrompt, settings: SampleSettings, global_step: int, label: str = "",
             clip_skip: int = 0) -> str:
    """The .txt written beside a sample: everything needed to generate it again."""
    lines = [f"prompt: {prompt.prompt}", f"negative prompt: {prompt.negative_prompt}", f"seed: {prompt.seed}",
             f"cfgs: {', '.join(f'{c:g}' for c in prompt.cfgs)}", f"steps: {settings.num_inference_steps}",
             f"scheduler: {settings.scheduler}", f"size: {prompt.width}x{prompt.height}",
             f"global step: {global_step}"]
    if clip_skip >= 2:
        lines.append(f"clip_skip: {clip_skip}")
    if label:
        lines.append(f"model: {label}")
    if prompt.random_caption:
        lines.append("random caption: yes")
    return "\n".join(lines) + "\n"


def _save(index: int, prompt: SamplePrompt, panels: list[Image.Image], settings: SampleSettings,
          samples_dir: str, global_step: int, label: str, clip_skip: int) -> SampleImage:
    picture = compose_panels(panels, [cfg_label(c) for c in prompt.cfgs])
    stem = os.path.join(samples_dir, sample_stem(global_step, index, prompt, label))
    picture.save(stem + ".jpg", format="JPEG", quality=JPEG_QUALITY)
    with open(stem + ".txt", "w", encoding="utf-8") as handle:
        handle.write(describe(prompt, settings, global_step, label, clip_skip))
    return SampleImage(sample_tag(index, prompt, label), picture, stem + ".jpg", prompt)
