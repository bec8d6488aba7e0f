"""Sampling rounds in a run: when they happen, which model draws (the trained one, its EMA, or both), and
where the pictures go (the run's samples/ folder and TensorBoard). utils/samples.py draws them.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

from utils.sample_prompts import SampleFile, reload_sample_prompts, settings_for, with_random_captions
from utils.samples import generate_samples

log = logging.getLogger("train")

SAMPLES_FOLDER = "samples"


class SampleRounds:
    """Re-reads the prompts file before each round, so it can be edited while training runs."""

    def __init__(self, config, sample_file: SampleFile | None, captions: list[str], run_dir: str | None):
        self.config = config
        self.file = sample_file
        self.captions = captions  # for prompts with random_caption
        self.folder = os.path.join(run_dir, SAMPLES_FOLDER) if run_dir else None
        self.last_step: int | None = None

    def due(self, global_step: int) -> bool:
        return self.file is not None and global_step % self.file.settings.sample_steps == 0

    def before_training(self) -> bool:
        return self.file is not None and self.file.settings.generate_pretrain_samples

    def draw(self, trainee, accelerator, tracker, global_step: int) -> None:
        """One round on the main process: the prompts as the file now says, by each model asked for."""
        if self.file is None or self.folder is None or self.last_step == global_step:
            return
        self.last_step = global_step
        self.file, warning = reload_sample_prompts(self.file.path, settings_for(self.config), self.file)
        if warning:
            log.warning("%s", warning)
        if self.file is None:
            return
        prompts = with_random_captions(self.file.prompts, self.captions, self.config.seed)
        try:
            self._draw(prompts, trainee, accelerator, tracker, global_step)
        except Exception as error:  # noqa: BLE001 - pictures are never worth the run
            log.warning("samples at step %d failed, training goes on: %s: %s", global_step, type(error).__name__,
                        error)

    def _draw(self, prompts, trainee, accelerator, tracker, global_step: int) -> None:
        model, config = trainee.model, self.config
        for label in models_to_sample(trainee.ema is not None, config.ema_sample_ema_model,
                                      config.ema_sample_nonema_model):
            with ema_weights(trainee) if label == "ema" else contextlib.nullcontext():
                samples = generate_samples(
                    {**model.components(), "unet": accelerator.unwrap_model(trainee.unet),
                     "text_encoder": accelerator.unwrap_model(trainee.text_encoder)},
                    model.family, self.file.settings, prompts, self.folder, global_step, clip_skip=config.clip_skip,
                    label=label, guidance_rescale=0.7 if config.enable_zero_terminal_snr else 0.0,
                    autocast_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision))
            tracker.images({sample.tag: np.asarray(sample.image) for sample in samples}, global_step)
        log.info("samples at step %d in %s", global_step, self.folder)


def models_to_sample(ema_on: bool, ema_model: bool, nonema_model: bool) -> list[str]:
    """Labels of the models that draw: "" the trained one, "ema" its average. With EMA on and neither flag
    set, the EMA draws (what EveryDream2's docs promise; its code drew nothing)."""
    if not ema_on:
        return [""]
    return [label for label, wanted in (("", nonema_model), ("ema", ema_model or not nonema_model)) if wanted]


@contextlib.contextmanager
def ema_weights(trainee):
    """The EMA's averages in the trained modules' own parameters, and the trained weights back afterwards,
    exactly: the optimizer keeps its parameter objects and no second model is made on the device."""
    saved = {}
    with torch.no_grad():
        for part, module in trainee.trained_modules().items():
            averages = trainee.ema.averages[part]
            for name, parameter in module.named_parameters():
                if name in averages:
                    saved[(part, name)] = parameter.detach().to("cpu", copy=True)
                    parameter.copy_(averages[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for part, module in trainee.trained_modules().items():
                for name, parameter in module.named_parameters():
                    if (part, name) in saved:
                        parameter.copy_(saved[(part, name)])
