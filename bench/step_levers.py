"""Which changes to the training step would pay: the bare step timed as train.py trains, then with one
lever changed at a time, in one process on one model, so that one short GPU loan ranks them.

    python bench/step_levers.py --model sd15 --resolution 512 --batch 8 --precision bf16 \\
        --train_text_encoder --cache_latents --device cuda [--batches 16 32]

The bare step is bench/bare_step.py's (train.py's math: every weight fp32 under autocast, train.py's optimizer,
foreach AdamW on CUDA), built and FLOP-counted once. Each lever is applied to it, timed, and undone:

- `channels_last`: the UNet's weights and its input in channels-last memory format (NHWC convolutions).
- `fused_adamw`: torch's AdamW with `fused=True` (one kernel for the whole update) instead of foreach.
- `bf16_frozen`: the frozen parts (the VAE, and the text encoder when it is not trained) stored in bf16
  instead of fp32 (what diffusers' example does); the trained weights stay fp32.
- `bf16_weights`: every weight in bf16, the trained ones too, AdamW on bf16 parameters (kohya's
  `full_bf16`): less memory and traffic, but coarser updates, so a change of the training's math.
- `bf16_norms`: GroupNorm and LayerNorm computed in bf16 instead of the fp32 CUDA's autocast gives them, so the
  activations after them stay bf16 (MosaicML's low-precision GroupNorm/LayerNorm, `../shared/reference/PEERS.md`
  §2.2); the statistics are still accumulated in fp32 by the kernels. A change of the training's math.
- `combined`: channels_last, fused_adamw and bf16_frozen together (the levers that keep train.py's math).
- `--batches N ...`: the baseline and `combined` at other batch sizes (the same FLOPs per image).

Each lever gets a fresh optimizer (its state in the lever's layout and precision), and the peak memory is
reset before it. torch.compile is measured by bench/train_throughput.py --compile. Prints a markdown table
for doc/PERFORMANCE.md; nothing here changes train.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import statistics
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run as a script from anywhere: bench/ is not a package

import torch  # noqa: E402

from bench.bare_step import prepare_bare, random_inputs, time_bare, trainer_settings  # noqa: E402
from bench.report import machine, peak_tflops, versions  # noqa: E402
from bench.settings import ATTENTIONS, Settings  # noqa: E402

LEVERS = ("channels_last", "fused_adamw", "bf16_frozen", "bf16_weights", "bf16_norms", "combined")


# -------------------------------------------------------------------------------------------------
# The levers: each a context that changes the bare step while it is timed
# -------------------------------------------------------------------------------------------------

def fresh_optimizer(bare, fused: bool = False) -> None:
    """A new optimizer of train.py's kind for the bare step's trained parameters as they are now (their layout
    and precision), its state empty; with `fused`, torch's AdamW with fused=True and the same groups."""
    from diffusers.optimization import get_scheduler

    from bench.bare_step import make_optimizer

    parameters = {name: [p for p in module.parameters() if p.requires_grad] for name, module in bare.trained.items()}
    if bare.optimizer is not None:  # its state freed before the new one is made (accelerate keeps a reference
        bare.optimizer.state.clear()  # to the optimizer it prepared)
    optimizer = make_optimizer(trainer_settings(bare.settings)[1], parameters)
    if fused:
        kept = ("params", "name", "lr", "betas", "eps", "weight_decay")
        optimizer = torch.optim.AdamW([{key: group[key] for key in kept if key in group}
                                       for group in optimizer.param_groups], fused=True)
    bare.optimizer, bare.lr_scheduler = optimizer, get_scheduler("constant", optimizer=optimizer)


@contextlib.contextmanager
def channels_last(bare):
    """The UNet's weights and its input (the cached latents, or the VAE's output at every step) in NHWC."""
    unet, encode = bare.plain["unet"], bare.encode
    unet.to(memory_format=torch.channels_last)
    inputs = bare.latents
    if bare.latents is not None:
        bare.latents = bare.latents.contiguous(memory_format=torch.channels_last)
    bare.encode = lambda pixels: encode(pixels).contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        unet.to(memory_format=torch.contiguous_format)
        bare.latents = inputs
        del bare.encode  # the method again


@contextlib.contextmanager
def fused_adamw(bare):
    fresh_optimizer(bare, fused=True)
    yield


@contextlib.contextmanager
def in_bf16(bare, modules: list[torch.nn.Module]):
    """`modules` stored in bf16 while the lever is timed, their fp32 weights kept aside in CPU memory (so that
    the lever's peak GPU memory does not count them) and put back after."""
    saved = [{name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items()}
             for module in modules]
    for module in modules:
        module.to(torch.bfloat16)
    try:
        yield
    finally:
        for module, state in zip(modules, saved):
            module.to(torch.float32).load_state_dict(state)


def frozen_modules(bare) -> list[torch.nn.Module]:
    return [bare.vae] + ([] if bare.settings.train_text_encoder else [bare.plain["text_encoder"]])


@contextlib.contextmanager
def bf16_frozen(bare):
    with in_bf16(bare, frozen_modules(bare)):
        yield


@contextlib.contextmanager
def bf16_weights(bare):
    with in_bf16(bare, [bare.vae, bare.plain["unet"], bare.plain["text_encoder"]]):
        fresh_optimizer(bare)  # its state in bf16, as the weights
        yield


def low_precision_norm(module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The forward of a GroupNorm or LayerNorm in autocast's compute precision (bf16), not in fp32."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    weight = None if module.weight is None else module.weight.to(dtype)
    bias = None if module.bias is None else module.bias.to(dtype)
    with torch.autocast(device, enabled=False):
        if isinstance(module, torch.nn.GroupNorm):
            return torch.nn.functional.group_norm(hidden.to(dtype), module.num_groups, weight, bias, module.eps)
        return torch.nn.functional.layer_norm(hidden.to(dtype), module.normalized_shape, weight, bias, module.eps)


@contextlib.contextmanager
def bf16_norms(bare):
    """Every GroupNorm and LayerNorm of the UNet, the text encoder and the VAE through low_precision_norm."""
    norms = [module for part in (bare.plain["unet"], bare.plain["text_encoder"], bare.vae)
             for module in part.modules() if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    own = {module: module.__dict__.get("forward") for module in norms}  # a forward set on the module itself
    for module in norms:
        module.forward = functools.partial(low_precision_norm, module)
    try:
        yield
    finally:
        for module, forward in own.items():
            if forward is None:
                del module.forward  # the class's forward again
            else:
                module.forward = forward


@contextlib.contextmanager
def combined(bare):
    with channels_last(bare), bf16_frozen(bare), fused_adamw(bare):
        yield


APPLY = {"channels_last": channels_last, "fused_adamw": fused_adamw, "bf16_frozen": bf16_frozen,
         "bf16_weights": bf16_weights, "bf16_norms": bf16_norms, "combined": combined}


def why_not(lever: str, settings: Settings) -> str | None:
    """Why `lever` cannot be measured with `settings`; None if it can."""
    if lever in ("fused_adamw", "combined") and settings.optimizer != "adamw":
        return "fused AdamW replaces torch's AdamW, not bitsandbytes' AdamW8bit"
    if lever in ("bf16_frozen", "bf16_weights", "combined") and settings.precision == "fp32":
        return "the step computes in fp32, without autocast: bf16 weights would not fit its fp32 inputs"
    if lever == "bf16_norms" and settings.precision == "fp32":
        return "the step computes in fp32, without autocast: the norms have no lower precision to run in"
    return None


def with_batch(bare, batch: int) -> None:
    """The bare step's fixed inputs at another batch size (bare_step.random_inputs, as BareStep makes them)."""
    bare.pixels, bare.input_ids = random_inputs(batch, bare.settings.resolution,
                                                bare.plain["text_encoder"].config.vocab_size, bare.settings.seed,
                                                bare.pixels.device)
    if bare.latents is not None:
        with torch.no_grad():
            bare.latents = bare.encode(bare.pixels)


# -------------------------------------------------------------------------------------------------
# Timing and report
# -------------------------------------------------------------------------------------------------

def timed(bare, settings: Settings) -> tuple[list[float], int | None]:
    """The step times of warmup + steps steps, and on CUDA the peak memory allocated meanwhile."""
    cuda = bare.accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = time_bare(bare, settings)
    return seconds, torch.cuda.max_memory_allocated() if cuda else None


def row(what: str, batch: int, seconds: list[float], peak_bytes: int | None, flops_per_image: float,
        peak: float | None, baseline_images_per_second: float | None) -> str:
    median = statistics.median(seconds)
    images_per_second = batch / median
    mfu = f"{100 * flops_per_image * images_per_second / 1e12 / peak:.1f}%" if peak else "n/a"
    speedup = f"{images_per_second / baseline_images_per_second:.3f}x" if baseline_images_per_second else "1.000x"
    memory = "n/a" if peak_bytes is None else f"{peak_bytes / 1e9:.2f} GB"
    return (f"| {what} | {batch} | {median * 1e3:.1f} ({min(seconds) * 1e3:.1f}-{max(seconds) * 1e3:.1f}) | "
            f"{images_per_second:.2f} | {speedup} | {mfu} | {memory} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "sd15", "sd21"), default="tiny")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="the baseline's images per step (default 8)")
    parser.add_argument("--batches", type=int, nargs="*", default=[],
                        help="other batch sizes at which to time the baseline and `combined`")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per lever (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, per lever (default 3)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                        help="fp32, or bf16 mixed precision (fp16's grad scaler is not rebuilt per lever)")
    parser.add_argument("--attention", choices=ATTENTIONS, default="sdp")
    parser.add_argument("--train_text_encoder", action="store_true")
    parser.add_argument("--cache_latents", action="store_true")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw")
    parser.add_argument("--levers", nargs="*", choices=LEVERS, default=list(LEVERS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # each lever's .to(bf16) would warn about casting a model
    try:
        return measure(parse_args(argv), argv)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def measure(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.resolution % 8:
        raise SystemExit("--resolution must be a multiple of 8 (the VAE downscales by 8)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    settings = Settings(model=args.model, resolution=args.resolution, batch=args.batch, steps=args.steps,
                        warmup=args.warmup, precision=args.precision, attention=args.attention,
                        train_text_encoder=args.train_text_encoder, cache_latents=args.cache_latents,
                        optimizer=args.optimizer, device=args.device, seed=args.seed, threads=args.threads)
    peak, origin = peak_tflops(settings.device, settings.precision, args.peak_tflops)
    bare, flops, _ = prepare_bare(settings)
    flops_per_image = sum(flops.values()) / settings.batch
    command = "python bench/step_levers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{command}`, {datetime.date.today().isoformat()}\n\nMachine: {machine(settings.device)}; "
          f"{versions()}.\n\nSetting: {settings.describe()}. Median of {settings.steps} steps after "
          f"{settings.warmup} warm-up steps per lever (range in brackets).\n", flush=True)
    print("| lever | batch | ms/step | images/s | vs baseline | MFU | peak allocated |\n|---|---|---|---|---|---|---|",
          flush=True)
    baseline = None
    for batch in [settings.batch, *args.batches]:
        if batch != settings.batch:
            with_batch(bare, batch)
        levers = ["baseline", *(args.levers if batch == settings.batch else
                                [lever for lever in args.levers if lever == "combined"])]
        for lever in levers:
            reason = why_not(lever, settings) if lever != "baseline" else None
            if reason:
                print(f"| {lever} | {batch} | not measured: {reason} | | | | |", flush=True)
                continue
            fresh_optimizer(bare)  # every lever starts from train.py's optimizer, its state empty
            with APPLY[lever](bare) if lever != "baseline" else contextlib.nullcontext():
                seconds, peak_bytes = timed(bare, settings)
            images_per_second = batch / statistics.median(seconds)
            print(row(lever, batch, seconds, peak_bytes, flops_per_image, peak, baseline), flush=True)
            if lever == "baseline" and baseline is None:
                baseline = images_per_second
    print(f"\nModel FLOPs per image: {flops_per_image / 1e12:.3f} TFLOP (counted once at batch {settings.batch}, "
          f"by phase: {', '.join(f'{name} {value / 1e12:.3f}' for name, value in flops.items())} TFLOP). MFU peak: "
          f"{origin}. \"vs baseline\": images/s against the baseline at batch {settings.batch}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
