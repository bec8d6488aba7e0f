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

Layout: this file is the command line, the order of the measurements and the trainers' runs (the workload
written once, train.py timed with --full); bench/settings.py holds the settings, the results and train.py's
command line, bench/bare_step.py the bare step and its FLOP count, bench/report.py the machine and the
report's text. bench/workload.py, bench/step_timer.py and bench/diffusers_example.py are the trainers' workload,
train.py's clock and diffusers' example.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import traceback
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run as a script from anywhere: bench/ is not a package
# As train.py: MKL may otherwise use fewer threads when the machine is busy, and its strict reproducibility
# mode (which train.py sets) may cost time on the CPU, so the bare step runs with it too. Set before torch loads.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402

from bench.bare_step import bare_memory, bare_result, prepare_bare, release, time_bare  # noqa: E402
from bench.report import TRAINERS, bare_section, peak_tflops, report  # noqa: E402
from bench.settings import ATTENTIONS, LEARNING_RATE, PRECISIONS, Measurement, Settings, train_command  # noqa: E402

TRAINER_TIMEOUT_S = 900  # per run of a trainer: SD 1.5's 14 steps take about a minute on an H100


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
    from bench.workload import TrainerFailed, run_trainer, seconds_inside_steps, timed_steps

    with tempfile.TemporaryDirectory(prefix="train_py_", dir=workload.folder) as folder:
        times_path = os.path.join(folder, "step_times.txt")
        env = dict(process_environment(settings), **{ENV_VAR: times_path})
        command = train_command(settings, workload.model_folder, workload.data_folder, os.path.join(folder, "logs"))
        output = run_trainer(command, env, "train.py", cwd=REPO_ROOT, timeout=timeout)
        if not os.path.exists(times_path):
            raise TrainerFailed("train.py ran but the StepTimer plugin wrote nothing: does this train.py call "
                                "plugins' on_step_end?", output, command)
        recorded = read_step_times(times_path)
    try:
        seconds = timed_steps(recorded.ends, settings.warmup, settings.steps, "train.py")
    except TrainerFailed as failure:  # with what train.py said
        raise TrainerFailed(failure.reason, output, command) from None
    return Measurement(seconds, settings.batch, recorded.peak_bytes, recorded.peak_kind or "not recorded",
                       reserved_bytes=recorded.reserved_bytes,
                       inside_seconds=seconds_inside_steps(recorded.starts, recorded.ends, settings.warmup,
                                                           settings.steps))


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


def merged(rounds: list[Measurement]) -> Measurement | None:
    """The rounds' step times (and the parts inside the steps, where every round recorded them) as one
    measurement, with the highest peak memory (allocated, and reserved where recorded); None without rounds."""
    if not rounds:
        return None

    def highest(values):
        known = [value for value in values if value is not None]
        return max(known) if known else None

    inside = None if any(round_.inside_seconds is None for round_ in rounds) else [
        s for round_ in rounds for s in round_.inside_seconds]
    return Measurement([s for round_ in rounds for s in round_.step_seconds], rounds[0].batch,
                       highest(round_.peak_memory_bytes for round_ in rounds), rounds[0].memory_kind,
                       reserved_bytes=highest(round_.reserved_bytes for round_ in rounds), inside_seconds=inside)


if __name__ == "__main__":
    sys.exit(main())
