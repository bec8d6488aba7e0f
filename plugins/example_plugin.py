"""An example plugin: logs where training is at each hook, and can put a trigger word before every caption.

    "plugins": ["plugins.example_plugin.ExampleLoggingPlugin"]

Copy it as the start of your own (any module on the path, e.g. my_plugins.py in the folder you train
from). Hooks take keyword arguments; see utils/plugins.py for each hook's arguments.
"""

from __future__ import annotations

import logging
import os

from utils.plugins import BasePlugin

log = logging.getLogger("train")


class ExampleLoggingPlugin(BasePlugin):
    """Logs each epoch and every 100th step; with EXAMPLE_PLUGIN_TRIGGER set, prefixes captions with it."""

    def __init__(self):
        self.trigger = os.environ.get("EXAMPLE_PLUGIN_TRIGGER", "")

    def on_training_start(self, log_folder=None, project_name=None, **kwargs):
        log.info("example plugin: training %s starts, logging to %s", project_name, log_folder)

    def on_epoch_start(self, epoch=0, epoch_length=0, **kwargs):
        log.info("example plugin: epoch %d starts, %d batches", epoch, epoch_length)

    def on_step_end(self, global_step=0, loss=None, **kwargs):
        if global_step % 100 == 0:
            log.info("example plugin: step %d, loss %s", global_step, "skipped" if loss is None else f"{loss:.4f}")

    def on_epoch_end(self, epoch=0, global_step=0, **kwargs):
        log.info("example plugin: epoch %d ended at step %d", epoch, global_step)

    def on_training_end(self, **kwargs):
        log.info("example plugin: training ended")

    def transform_caption(self, caption: str) -> str:
        return f"{self.trigger}, {caption}" if self.trigger and caption else caption
