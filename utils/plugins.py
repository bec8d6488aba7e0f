"""Plugins: user code called at fixed points of training (EveryDream2's hooks, same names and arguments).

    "plugins": ["plugins.example_plugin.ExampleLoggingPlugin", "my_plugins.MyPlugin"]

Each entry is `module.Class`, imported from the working folder or the trainer's folder and instantiated
with no arguments. Every hook is optional: a plugin defines the ones it needs (subclassing BasePlugin is
not required, so EveryDream2 plugins load as they are). Hooks get keyword arguments; accept **kwargs so
that arguments added later do not break a plugin.

Training hooks run on the main training process only: on_training_start, on_epoch_start, on_step_start,
on_step_end, on_epoch_end, on_training_end. The data hooks, transform_caption and transform_pil_image, run
where the images are loaded (in data-loader workers when num_workers > 0) on every process. Unlike
EveryDream2, which passes a numpy array, transform_pil_image gets and returns a PIL image.

A hook slower than its budget (0.5 s per step, 5 s per epoch, 20 s at start and end, as EveryDream2) is
reported once, naming the plugin. An exception in a hook is an error of the run, like any other.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time

log = logging.getLogger("train")

TRAINING_HOOKS = ("on_training_start", "on_epoch_start", "on_step_start", "on_step_end", "on_epoch_end",
                  "on_training_end")
DATA_HOOKS = ("transform_caption", "transform_pil_image")
SLOW_HOOK_SECONDS = {"on_step_start": 0.5, "on_step_end": 0.5, "on_epoch_start": 5.0, "on_epoch_end": 5.0,
                     "on_training_start": 20.0, "on_training_end": 20.0}


class BasePlugin:
    """What a plugin can define; each hook here does nothing."""

    def on_training_start(self, **kwargs) -> None:
        """log_folder, project_name: before the first step (after the model, optimizer and data are ready)."""

    def on_epoch_start(self, **kwargs) -> None:
        """epoch, global_step, epoch_length (batches), project_name, log_folder, data_root."""

    def on_step_start(self, **kwargs) -> None:
        """epoch, local_step (batch in the epoch), global_step, project_name, log_folder, batch, ed_state."""

    def on_step_end(self, **kwargs) -> None:
        """As on_step_start, plus data_root and loss (None when the batch did not train)."""

    def on_epoch_end(self, **kwargs) -> None:
        """epoch, global_step, project_name, log_folder, data_root."""

    def on_training_end(self, **kwargs) -> None:
        """After the final save; also after a stop or an error, so a plugin can close what it opened."""

    def transform_caption(self, caption: str) -> str:
        """The caption as it goes to the tokenizer (not called for captions dropped by cond_dropout)."""
        return caption

    def transform_pil_image(self, image):
        """The image after crop, resize and flip; must return an RGB image of the same size."""
        return image


class PluginError(Exception):
    """A plugin that cannot be loaded, or a data hook that returned the wrong thing."""


def load_plugins(names: list[str]) -> list:
    """Import and instantiate each `module.Class`. Raises PluginError naming the entry and what went wrong."""
    for folder in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        if folder not in sys.path:
            sys.path.append(folder)  # after everything else: a plugin cannot shadow an installed package
    plugins = []
    for name in names:
        module_name, _, class_name = name.rpartition(".")
        if not module_name:
            raise PluginError(f"{name!r}: give the module and the class, as module.Class")
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # noqa: BLE001 - whatever the plugin's module raises, say which entry
            raise PluginError(f"{name!r}: cannot import {module_name}: {type(error).__name__}: {error}") from None
        plugin_class = getattr(module, class_name, None)
        if not isinstance(plugin_class, type):
            raise PluginError(f"{name!r}: {module_name} has no class {class_name}")
        known = [hook for hook in TRAINING_HOOKS + DATA_HOOKS if callable(getattr(plugin_class, hook, None))]
        if not known:
            raise PluginError(f"{name!r} defines none of the hooks ({', '.join(TRAINING_HOOKS + DATA_HOOKS)})")
        try:
            plugins.append(plugin_class())
        except Exception as error:  # noqa: BLE001
            raise PluginError(f"{name!r}: {class_name}() failed: {type(error).__name__}: {error}") from None
    return plugins


class PluginRunner:
    """Calls a hook on every plugin that defines it, in the order they were listed, timing each call."""

    def __init__(self, plugins: list):
        self.plugins = plugins
        self.reported_slow: set[tuple[str, str]] = set()

    def __bool__(self) -> bool:
        return bool(self.plugins)

    def run(self, hook: str, **kwargs) -> None:
        for plugin in self.plugins:
            if not defines(plugin, hook):
                continue
            method = getattr(plugin, hook)
            started = time.monotonic()
            method(**kwargs)
            seconds = time.monotonic() - started
            name = type(plugin).__name__
            if seconds > SLOW_HOOK_SECONDS[hook] and (name, hook) not in self.reported_slow:
                self.reported_slow.add((name, hook))
                log.warning("plugin %s: %s took %.1f s (budget %.1f s); it slows training down", name, hook,
                            seconds, SLOW_HOOK_SECONDS[hook])


def defines(plugin, hook: str) -> bool:
    """Whether the plugin has the hook, other than BasePlugin's, which does nothing."""
    method = getattr(type(plugin), hook, None)
    return callable(method) and method is not getattr(BasePlugin, hook)


class DataTransforms:
    """The data hooks of the plugins, applied in order; picklable, for data-loader workers."""

    def __init__(self, plugins: list):
        self.caption_hooks = [p for p in plugins if defines(p, "transform_caption")]
        self.image_hooks = [p for p in plugins if defines(p, "transform_pil_image")]

    def caption(self, caption: str) -> str:
        for plugin in self.caption_hooks:
            caption = plugin.transform_caption(caption)
            if not isinstance(caption, str):
                raise PluginError(f"{type(plugin).__name__}.transform_caption returned {type(caption).__name__}, "
                                  "not a str")
        return caption

    def pixels(self, pixels):
        """uint8 (H, W, 3) array -> the same after every transform_pil_image (as PIL images in between)."""
        if not self.image_hooks:
            return pixels
        import numpy as np
        from PIL import Image

        image = Image.fromarray(pixels)
        for plugin in self.image_hooks:
            image = plugin.transform_pil_image(image)
            if not isinstance(image, Image.Image) or image.size != (pixels.shape[1], pixels.shape[0]):
                raise PluginError(f"{type(plugin).__name__}.transform_pil_image must return a PIL image of the "
                                  f"size it was given ({pixels.shape[1]}x{pixels.shape[0]}), not {image!r}")
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
