"""The report of bench/train_throughput.py: the machine it ran on, and the markdown for doc/PERFORMANCE.md.

`report` writes the command and the date, the machine (`machine`, `versions`), the setting, one table row per
loop (ms/step, images/s, peak memory, achieved TFLOPS and MFU against the device's peak: `peak_tflops` from
`PEAK_TFLOPS`), the FLOPs per phase and how each figure was measured. `bare_section` is the bare step's table,
printed as soon as it is measured; `failed_row` and `failure_text` report a trainer that failed. Text only:
nothing here trains or times.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics

import torch

from bench.settings import BareResult, Measurement, Settings

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
# Peak and machine
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


# -------------------------------------------------------------------------------------------------
# The report's text
# -------------------------------------------------------------------------------------------------

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
        split = full.split_medians()
        if split is not None:
            inside, between = split
            lines.append(f"| full step: inside the step / between batches | {inside * 1e3:.1f} / "
                         f"{between * 1e3:.1f} ms (medians; inside minus the bare step: "
                         f"{(inside - bare.median_seconds) * 1e3:+.1f} ms) | | | | |")
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
    if full is not None and full.inside_seconds is not None:
        lines.append("Inside the step: from the StepTimer's on_step_start (the batch loaded) to its on_step_end, "
                     "train_batch and its bookkeeping (the loss meter, the progress bar; logging on log steps, "
                     "none here), to set against the bare step; between batches: the rest (the loop's sample, "
                     "validation and save checks, and the next batch from the data loader).")
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
