"""What to sample during training: `sample_prompts.txt` or EveryDream2's `sample_prompts.json`, read into
frozen values. Pure and torch-free; utils/samples.py turns them into images.

The file is re-read before every sampling round, so it can be edited while training runs. A broken file
raises SamplePromptsError naming the file and every problem; the caller keeps the prompts it had. Keys
this trainer does not know are not errors (EveryDream2 files carry stale keys): they come back as notes.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any

from data.buckets import GRID, generate_buckets, nearest_bucket

DEFAULT_CFGS = (7.0, 4.0, 1.01)  # EveryDream2's code; its LOGGING.md says 1, 4, 7
DEFAULT_SCHEDULER = "ddim"
DEFAULT_INFERENCE_STEPS = 30
RANDOM_CAPTION_COUNT = 4  # a file with no prompts samples min(4, batch_size) training captions, as EveryDream2


class SamplePromptsError(Exception):
    """The sample prompts file cannot be used; the message names the file and each problem."""

    def __init__(self, path: str, problems: list[str]):
        self.path, self.problems = path, problems
        listed = problems[0] if len(problems) == 1 else "".join(f"\n  - {p}" for p in problems)
        super().__init__(f"{path}: {listed}")


@dataclass(frozen=True)
class SampleSettings:
    """How every prompt of one file is sampled."""

    batch_size: int  # prompts generated together (per CFG value)
    seed: int  # the default seed of each prompt; -1 = a new seed every round
    cfgs: tuple[float, ...]  # guidance scales: one panel per value, side by side
    scheduler: str  # a name from SCHEDULERS
    num_inference_steps: int
    show_progress_bars: bool
    generate_pretrain_samples: bool  # also sample once before the first training step
    sample_steps: int  # steps between sampling rounds (the JSON's generate_samples_every_n_steps)
    resolution: int  # px: the side of the default (square) sample size


@dataclass(frozen=True)
class SamplePrompt:
    """One image per CFG value, composed into one picture."""

    prompt: str
    negative_prompt: str = ""
    seed: int = -1  # -1 = a new seed every round, derived from the settings seed, the step and the index
    width: int = 512  # px, a multiple of 64
    height: int = 512  # px, a multiple of 64
    cfgs: tuple[float, ...] = DEFAULT_CFGS
    random_caption: bool = False  # the prompt is a training caption, filled in by with_random_captions


@dataclass(frozen=True)
class SampleFile:
    """What one read of the prompts file gave."""

    path: str
    settings: SampleSettings
    prompts: tuple[SamplePrompt, ...]
    notes: tuple[str, ...] = ()  # things to tell the user: unknown keys, rounded sizes, ...


# --- schedulers -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class and the arguments that make it the named sampler."""

    class_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    needs: str | None = None  # a package the class needs beyond diffusers
    min_steps: int = 1  # fewest num_inference_steps the sampler runs with


# EveryDream2's names (utils/sample_generator.py `_create_scheduler`). Samplers whose class accepts
# `use_karras_sigmas` also get a Karras variant `<name>_k` (EveryDream2 has dpm++_2m_k, dpm++_2s_k,
# dpm++_sde_k, dpm++_2m_sde_k); the flag is always set explicitly, so a model saved with Karras sigmas
# in its own scheduler config does not turn them on behind the name.
_SAMPLERS: dict[str, tuple[str, dict[str, Any], bool, str | None]] = {
    # name: (class, kwargs, has a Karras variant, extra package)
    "ddim": ("DDIMScheduler", {}, False, None),
    "pndm": ("PNDMScheduler", {}, False, None),  # its Runge-Kutta warm-up needs 4 steps or more
    "ddpm": ("DDPMScheduler", {}, False, None),
    "lms": ("LMSDiscreteScheduler", {}, True, "scipy"),
    "euler": ("EulerDiscreteScheduler", {}, True, None),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, False, None),
    "kdpm2": ("KDPM2AncestralDiscreteScheduler", {}, True, None),  # EveryDream2's kdpm2 is the ancestral one
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, True, None),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, True, None),
    "dpm++_2s": ("DPMSolverSinglestepScheduler", {}, True, None),
    "dpm++_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, True, None),
    # The Brownian-tree noise of this SDE sampler has its own seed (EveryDream2 fixes it at 0 too).
    "dpm++_sde": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}, True, "torchsde"),
}


def _scheduler_table() -> dict[str, SchedulerSpec]:
    table = {}
    for name, (class_name, kwargs, karras, needs) in _SAMPLERS.items():
        if not karras:
            table[name] = SchedulerSpec(class_name, dict(kwargs), needs, min_steps=4 if name == "pndm" else 1)
            continue
        table[name] = SchedulerSpec(class_name, {**kwargs, "use_karras_sigmas": False}, needs)
        table[name + "_k"] = SchedulerSpec(class_name, {**kwargs, "use_karras_sigmas": True}, needs)
    return table


SCHEDULERS = _scheduler_table()
KARRAS_SUFFIX = "_karras"  # accepted as a spelling of EveryDream2's `_k`: dpm++_2m_karras = dpm++_2m_k


def canonical_scheduler_name(name: str) -> str:
    """`name` as a key of SCHEDULERS: lower case, `_karras` spelt `_k`; unknown names are returned as given."""
    key = name.strip().lower()
    if key.endswith(KARRAS_SUFFIX):
        key = key[: -len(KARRAS_SUFFIX)] + "_k"
    return key if key in SCHEDULERS else name


def scheduler_spec(name: str) -> SchedulerSpec:
    """The diffusers class and arguments for a sampler name; ValueError says which names exist."""
    key = canonical_scheduler_name(name)
    if key not in SCHEDULERS:
        near = difflib.get_close_matches(name.strip().lower(), SCHEDULERS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ValueError(f"unknown scheduler {name!r}: {hint}choose one of {', '.join(SCHEDULERS)}.")
    return SCHEDULERS[key]


def scheduler_problem(name: str) -> str | None:
    """Why `name` cannot be used here (unknown, or its package is not installed), or None."""
    try:
        spec = scheduler_spec(name)
    except ValueError as error:
        return str(error)
    if spec.needs and importlib.util.find_spec(spec.needs) is None:
        return (f"scheduler {name!r} needs the {spec.needs} package, which is not installed: "
                f"`pip install {spec.needs}`, or choose another scheduler such as dpm++ or euler_a.")
    return None


# --- sizes ----------------------------------------------------------------------------------------

def snap_to_grid(pixels: float) -> int:
    """The nearest multiple of 64 px, at least 64: UNet-friendly, as the training buckets."""
    return max(GRID, int(round(pixels / GRID)) * GRID)


def size_for_aspect_ratio(aspect_ratio: float, resolution: int) -> tuple[int, int]:
    """(width, height) of about resolution² px with the aspect ratio closest to `aspect_ratio` (w / h).

    These are the training buckets (data/buckets.py), so a sample is drawn at a shape the model trains
    on, from 1:4 to 4:1, at any resolution. (EveryDream2 searched 256-960 px only, so its aspect_ratio
    failed at resolution 1024 and above.)
    """
    if resolution < 2 * GRID:  # a 64 px resolution has one bucket (and generate_buckets needs two rows)
        return resolution, resolution
    return nearest_bucket(aspect_ratio * 1000.0, 1000.0, generate_buckets(resolution))


# --- seeds and random captions --------------------------------------------------------------------

def sample_seed(prompt_seed: int, base_seed: int, global_step: int, index: int) -> int:
    """The seed a prompt is generated with: its own, or for -1 one derived from (base seed, step, index).

    Derived, not drawn from the global RNG, so a run and its resume draw the same "random" samples.
    """
    if prompt_seed != -1:
        return prompt_seed
    return random.Random(f"sample/{base_seed}/{global_step}/{index}").randrange(2**31)


def with_random_captions(prompts: tuple[SamplePrompt, ...] | list[SamplePrompt], captions: list[str],
                         seed: int) -> tuple[SamplePrompt, ...]:
    """The prompts with each `random_caption` one given a training caption, drawn with `seed`.

    The same captions and seed give the same draw whatever the order of `captions`; different prompts
    get different captions while there are enough. Without captions the prompts stay empty.
    """
    wanted = [i for i, p in enumerate(prompts) if p.random_caption]
    pool = sorted({c.strip() for c in captions if c and c.strip()})
    if not wanted or not pool:
        return tuple(prompts)
    rng = random.Random(seed)
    picks = rng.sample(pool, len(wanted)) if len(wanted) <= len(pool) else [rng.choice(pool) for _ in wanted]
    result = list(prompts)
    for i, caption in zip(wanted, picks):
        result[i] = dataclasses.replace(result[i], prompt=caption)
    return tuple(result)


# --- reading the file -----------------------------------------------------------------------------

def default_settings(*, resolution: int, train_batch_size: int, seed: int, sample_steps: int) -> SampleSettings:
    """The settings of a .txt file, and of every key a .json file leaves out (EveryDream2's defaults)."""
    return SampleSettings(batch_size=max(1, train_batch_size // 2), seed=seed, cfgs=DEFAULT_CFGS,
                          scheduler=DEFAULT_SCHEDULER, num_inference_steps=DEFAULT_INFERENCE_STEPS,
                          show_progress_bars=False, generate_pretrain_samples=False, sample_steps=sample_steps,
                          resolution=resolution)


def settings_for(config) -> SampleSettings:
    """default_settings from a TrainConfig's resolution, batch size, seed and sample_steps."""
    return default_settings(resolution=config.resolution, train_batch_size=config.batch_size, seed=config.seed,
                            sample_steps=config.sample_steps)


def read_sample_prompts(path: str, defaults: SampleSettings) -> SampleFile:
    """Read a .txt or .json prompts file; raises SamplePromptsError for people."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".txt", ".json"):
        raise SamplePromptsError(path, ["sample_prompts must be a .txt file (one prompt per line) or a .json file."])
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: Windows editors may start the file with a BOM
            text = handle.read()
    except FileNotFoundError:
        raise SamplePromptsError(path, ["does not exist. Create it (one prompt per line) or point sample_prompts "
                                        "at another file."]) from None
    except UnicodeDecodeError:
        raise SamplePromptsError(path, ["is not a UTF-8 text file."]) from None
    except OSError as error:
        raise SamplePromptsError(path, [f"cannot be read: {error.strerror or error}."]) from None
    if extension == ".txt":
        return parse_txt(text, path, defaults)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        lines = text.splitlines()
        line = lines[error.lineno - 1] if 0 < error.lineno <= len(lines) else ""
        hint = " JSON has no comments: remove the `# ...` text." if "#" in line else ""
        raise SamplePromptsError(path, [f"not valid JSON: {error.msg} at line {error.lineno}, column "
                                        f"{error.colno}.{hint}"]) from None
    return parse_json(data, path, defaults)


def reload_sample_prompts(path: str, defaults: SampleSettings,
                          previous: SampleFile | None) -> tuple[SampleFile | None, str | None]:
    """Re-read the file before a sampling round: (the new file, None), or (previous, a warning) if it is
    broken, so an edit made while training runs can never stop the run."""
    try:
        return read_sample_prompts(path, defaults), None
    except SamplePromptsError as error:
        keeping = "keeping the previous prompts" if previous is not None else "no samples until it is fixed"
        return previous, f"sample prompts not reloaded ({keeping}): {error}"


def parse_txt(text: str, source: str, defaults: SampleSettings) -> SampleFile:
    """One prompt per line; blank lines and lines starting with `#` are skipped. Settings are the defaults."""
    prompts = tuple(_square_prompt(line.strip(), defaults) for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#"))
    notes: tuple[str, ...] = ()
    if not prompts:
        prompts, notes = _random_caption_prompts(defaults, source)
    return SampleFile(source, defaults, prompts, notes)


TOP_LEVEL_KEYS = ("batch_size", "seed", "cfgs", "scheduler", "num_inference_steps", "show_progress_bars",
                  "generate_pretrain_samples", "generate_samples_every_n_steps", "resolution", "samples")
SAMPLE_KEYS = ("prompt", "negative_prompt", "seed", "size", "aspect_ratio", "random_caption", "cfgs")


def parse_json(data: Any, source: str, defaults: SampleSettings) -> SampleFile:
    """EveryDream2's sample_prompts.json (already parsed). Every problem is collected, then raised together.

    Unlike EveryDream2, a sample's own `cfgs` is used (its shipped example sets one, which it ignored).
    """
    if not isinstance(data, dict):
        raise SamplePromptsError(source, ["must hold a JSON object such as "
                                          '{"cfgs": [7, 4], "samples": [{"prompt": "..."}]}.'])
    problems: list[str] = []
    notes = [_unknown_key(key, TOP_LEVEL_KEYS, source) for key in data if key not in TOP_LEVEL_KEYS]
    read = _Reader(data, "", problems)
    resolution = read.integer("resolution", minimum=GRID, default=defaults.resolution)
    if resolution % GRID:
        notes.append(f"{source}: resolution {resolution} is not a multiple of {GRID}: sampling at "
                     f"{snap_to_grid(resolution)}.")
        resolution = snap_to_grid(resolution)
    scheduler = read.text("scheduler", default=defaults.scheduler)
    problem = scheduler_problem(scheduler)
    if problem:
        problems.append(f"scheduler: {problem}")
    else:
        scheduler = canonical_scheduler_name(scheduler)
    steps = read.integer("num_inference_steps", minimum=1, default=defaults.num_inference_steps)
    if not problem and steps < SCHEDULERS[scheduler].min_steps:
        problems.append(f"num_inference_steps: {scheduler} needs at least {SCHEDULERS[scheduler].min_steps} "
                        f"steps, not {steps}.")
    settings = SampleSettings(
        batch_size=read.integer("batch_size", minimum=1, default=defaults.batch_size),
        seed=read.integer("seed", minimum=-1, default=defaults.seed),
        cfgs=read.cfgs("cfgs", default=defaults.cfgs),
        scheduler=scheduler,
        num_inference_steps=steps,
        show_progress_bars=read.boolean("show_progress_bars", default=defaults.show_progress_bars),
        generate_pretrain_samples=read.boolean("generate_pretrain_samples",
                                               default=defaults.generate_pretrain_samples),
        sample_steps=read.integer("generate_samples_every_n_steps", minimum=1, default=defaults.sample_steps),
        resolution=resolution)
    samples = data.get("samples")
    prompts: list[SamplePrompt] = []
    if samples is not None and not isinstance(samples, list):
        problems.append('samples: must be a list of objects such as [{"prompt": "a photo of ..."}].')
    for index, entry in enumerate(samples if isinstance(samples, list) else []):
        prompt = _parse_sample(entry, f"samples[{index}]", settings, source, problems, notes)
        if prompt is not None:
            prompts.append(prompt)
    if problems:
        raise SamplePromptsError(source, problems)
    if not prompts:
        random_prompts, random_notes = _random_caption_prompts(settings, source)
        return SampleFile(source, settings, random_prompts, tuple(notes) + random_notes)
    return SampleFile(source, settings, tuple(prompts), tuple(notes))


def _parse_sample(entry: Any, where: str, settings: SampleSettings, source: str, problems: list[str],
                  notes: list[str]) -> SamplePrompt | None:
    if not isinstance(entry, dict):
        problems.append(f'{where}: must be an object such as {{"prompt": "a photo of ..."}}, not {entry!r}.')
        return None
    notes.extend(_unknown_key(key, SAMPLE_KEYS, source, where) for key in entry if key not in SAMPLE_KEYS)
    read = _Reader(entry, where + ".", problems)
    width = height = settings.resolution
    size = entry.get("size")
    if size is not None:  # size wins over aspect_ratio, as in EveryDream2
        if (isinstance(size, list) and len(size) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in size)):
            width, height = snap_to_grid(size[0]), snap_to_grid(size[1])
            if [width, height] != list(size):
                notes.append(f"{source}: {where}.size {size} is not a multiple of {GRID} px: sampling at "
                             f"{width}x{height}.")
        else:
            problems.append(f"{where}.size: must be [width, height] in px, e.g. [640, 384], not {size!r}.")
    elif entry.get("aspect_ratio") is not None:
        aspect = _aspect_ratio(entry["aspect_ratio"])
        if aspect is None:
            problems.append(f"{where}.aspect_ratio: must be a positive number (width / height) such as 1.5 "
                            f"or a string such as \"16:9\", not {entry['aspect_ratio']!r}.")
        else:
            width, height = size_for_aspect_ratio(aspect, settings.resolution)
    return SamplePrompt(prompt=read.text("prompt", default=""),
                        negative_prompt=read.text("negative_prompt", default=""),
                        seed=read.integer("seed", minimum=-1, default=settings.seed),
                        width=width, height=height,
                        cfgs=read.cfgs("cfgs", default=settings.cfgs),
                        random_caption=read.boolean("random_caption", default=False))


def _aspect_ratio(value: Any) -> float | None:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[:x/]\s*(\d+(?:\.\d+)?)\s*", value)
        if not match or float(match[2]) == 0:
            return None
        value = float(match[1]) / float(match[2])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def _square_prompt(prompt: str, settings: SampleSettings) -> SamplePrompt:
    return SamplePrompt(prompt=prompt, seed=settings.seed, width=settings.resolution, height=settings.resolution,
                        cfgs=settings.cfgs)


def _random_caption_prompts(settings: SampleSettings, source: str) -> tuple[tuple[SamplePrompt, ...], tuple[str]]:
    count = min(RANDOM_CAPTION_COUNT, settings.batch_size)
    prompts = tuple(dataclasses.replace(_square_prompt("", settings), random_caption=True) for _ in range(count))
    return prompts, (f"{source} has no prompts: sampling {count} random training caption(s).",)


def _unknown_key(key: str, known: tuple[str, ...], source: str, where: str = "") -> str:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    place = f"{where}: " if where else ""
    return f"{source}: {place}unknown key {key!r} ignored{hint}."


class _Reader:
    """Typed values of one JSON object; a wrong value is added to `problems` and its default returned."""

    def __init__(self, data: dict, prefix: str, problems: list[str]):
        self.data, self.prefix, self.problems = data, prefix, problems

    def _value(self, key: str, default: Any) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def _wrong(self, key: str, expected: str, value: Any, default: Any) -> Any:
        self.problems.append(f"{self.prefix}{key}: must be {expected}, not {value!r}.")
        return default

    def integer(self, key: str, minimum: int, default: int) -> int:
        value = self._value(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return self._wrong(key, f"a whole number >= {minimum}", value, default)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._value(key, default)
        return value if isinstance(value, bool) else self._wrong(key, "true or false", value, default)

    def text(self, key: str, default: str) -> str:
        value = self._value(key, default)
        return value if isinstance(value, str) else self._wrong(key, "a string", value, default)

    def cfgs(self, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
        value = self._value(key, default)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # a single guidance scale
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                           for v in value)):
            return self._wrong(key, "a list of guidance scales >= 0, e.g. [7, 4, 1.01]", value, default)
        return tuple(float(v) for v in value)
