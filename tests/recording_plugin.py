"""A plugin for tests/test_plugins.py: records every hook call as a JSON line in $RECORDING_PLUGIN_FILE, blacks
out every image, tags every caption, and edits the run's config file after the first epoch (for
load_settings_every_epoch)."""

from __future__ import annotations

import json
import os

from PIL import Image

from utils.plugins import BasePlugin


class RecordingPlugin(BasePlugin):
    def __init__(self):
        self.path = os.environ["RECORDING_PLUGIN_FILE"]

    def record(self, hook: str, **values) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"hook": hook, **values}) + "\n")

    def on_training_start(self, log_folder, project_name, **kwargs):
        self.record("on_training_start", log_folder=log_folder, project_name=project_name)

    def on_epoch_start(self, epoch, global_step, epoch_length, **kwargs):
        self.record("on_epoch_start", epoch=epoch, global_step=global_step, epoch_length=epoch_length)

    def on_step_start(self, epoch, local_step, global_step, batch, ed_state, **kwargs):
        pixels = batch["pixels"]
        self.record("on_step_start", epoch=epoch, local_step=local_step, global_step=global_step,
                    captions=batch["captions"], pixels_max=float(pixels.max()),
                    has_optimizer=ed_state.optimizer is not None and ed_state.unet is not None)

    def on_step_end(self, global_step, loss, **kwargs):
        self.record("on_step_end", global_step=global_step, loss=loss)

    def on_epoch_end(self, epoch, global_step, **kwargs):
        self.record("on_epoch_end", epoch=epoch, global_step=global_step)
        edit = os.environ.get("RECORDING_PLUGIN_EDIT_CONFIG")
        if edit and epoch == 0:
            with open(edit, encoding="utf-8") as handle:
                config = json.load(handle)
            config.update(min_snr_gamma=1.5, lr=0.5)  # one live key, one that needs a restart
            with open(edit, "w", encoding="utf-8") as handle:
                json.dump(config, handle)

    def on_training_end(self, **kwargs):
        self.record("on_training_end")

    def transform_caption(self, caption: str) -> str:
        return caption + ", plugged"

    def transform_pil_image(self, image):
        return Image.new("RGB", image.size)


class CaptionLog:
    """Appends every caption a process loads to $CAPTION_LOG_FILE.<RANK> (data hooks run on every process)."""

    def transform_caption(self, caption: str) -> str:
        with open(f"{os.environ['CAPTION_LOG_FILE']}.{os.environ.get('RANK', '0')}", "a", encoding="utf-8") as handle:
            handle.write(caption + "\n")
        return caption
