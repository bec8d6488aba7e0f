"""diffusers' examples/text_to_image/train_text_to_image.py, timed on the benchmark's workload.

The script is not in the diffusers pip package: give its path from a checkout of diffusers' repository
(`git clone https://github.com/huggingface/diffusers`; nothing of it is copied here), and run the benchmark
in an environment that also has the script's own requirements (torchvision and datasets, see its
requirements.txt):

    python bench/train_throughput.py ... --full \\
        --diffusers_example ~/diffusers/examples/text_to_image/train_text_to_image.py

It trains the same model folder on the same images (bench/workload.py) with the same batch, resolution,
precision, learning rate and optimizer as train.py does in `--full`. It logs `train_loss` to TensorBoard
once per optimizer step; the gaps between those events' wall times are its step times, as the StepTimer
plugin's are train.py's. It trains the UNet only; it gets as many data-loading workers as train.py
(`--dataloader_num_workers`: the bench's --num_workers, or train.py's automatic choice).
"""

from __future__ import annotations

import os
import re
import shutil
import sys

from bench.workload import TrainerFailed, loader_workers, run_trainer, timed_steps

LOSS_TAG = "train_loss"  # logged by the example at every optimizer step
NEVER = str(10**9)  # steps: no checkpoint during the timing


def unsupported(settings) -> str | None:
    """Why the example cannot train what `settings` (bench.settings.Settings) asks for; None if it can."""
    if settings.train_text_encoder:
        return "it trains the UNet only: leave out --train_text_encoder"
    if settings.attention == "slice":
        return "it has no sliced attention: use --attention sdp or xformers"
    return None


def example_command(settings, script: str, model_folder: str, data_folder: str, output_folder: str,
                    learning_rate: float) -> list[str]:
    """The example's command line for the workload of `settings`."""
    mixed_precision = "no" if settings.precision == "fp32" else settings.precision
    command = [sys.executable, script, "--pretrained_model_name_or_path", model_folder,
               "--train_data_dir", data_folder, "--cache_dir", os.path.join(output_folder, "datasets_cache"),
               "--output_dir", output_folder, "--resolution", str(settings.resolution), "--center_crop",
               "--train_batch_size", str(settings.batch), "--gradient_accumulation_steps", "1",
               "--max_train_steps", str(settings.warmup + settings.steps + 1), "--learning_rate", str(learning_rate),
               "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", str(settings.seed),
               "--mixed_precision", mixed_precision,
               "--dataloader_num_workers", str(loader_workers(settings.num_workers)),
               "--report_to", "tensorboard", "--checkpointing_steps", NEVER]
    if settings.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    if settings.optimizer == "adamw8bit":
        command.append("--use_8bit_adam")
    if settings.attention == "xformers":
        command.append("--enable_xformers_memory_efficient_attention")
    if settings.device == "cuda":
        command.append("--allow_tf32")  # as train.py, which allows TF32 on every GPU
    return command


def logged_step_times(folder: str, tag: str = LOSS_TAG) -> list[float]:
    """The wall times (s) of the `tag` scalars in the TensorBoard event files under `folder`, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times = {}
    for root, _, files in os.walk(folder):
        if any(name.startswith("events.out.tfevents") for name in files):
            events = EventAccumulator(root, size_guidance={"scalars": 0})
            events.Reload()
            if tag in events.Tags()["scalars"]:
                times.update({event.step: event.wall_time for event in events.Scalars(tag)})
    return [times[step] for step in sorted(times)]


def time_example(settings, script: str, model_folder: str, data_folder: str, workdir: str, env: dict,
                 learning_rate: float, timeout: float | None = None) -> list[float]:
    """Run the example for warmup + steps + 1 steps; the seconds of the timed steps: the gaps between consecutive
    `train_loss` events, after the warm-up. Raises TrainerFailed."""
    output_folder = os.path.join(workdir, "diffusers_example")
    shutil.rmtree(output_folder, ignore_errors=True)  # an earlier round's events
    command = example_command(settings, script, model_folder, data_folder, output_folder, learning_rate)
    env = dict(env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # everything it needs is on disk
    output = run_trainer(command, env, script, timeout=timeout)
    try:
        return timed_steps(logged_step_times(output_folder), settings.warmup, settings.steps, f"{script} ({LOSS_TAG})")
    except TrainerFailed as failure:  # with what the example said
        raise TrainerFailed(failure.reason, output, command) from None


def describe(script: str) -> str:
    """The script's path and the diffusers version it asks for (its check_min_version), for the report."""
    with open(script, encoding="utf-8") as handle:
        wanted = re.search(r'check_min_version\("([^"]+)"\)', handle.read())
    return f"{script}" + (f" (check_min_version {wanted.group(1)})" if wanted else "")
