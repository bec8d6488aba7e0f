"""The training images as a torch dataset and loader.

Each epoch the plan (data/plan.py) decides the batches and every random choice; the loader's workers
only load, crop, resize, flip and tokenize as told, so the result does not depend on the number of
workers. An image that cannot be decoded (deleted, truncated or corrupted since the scan) is left out of
its batch and reported; the rest of the batch trains.

With a latent cache (utils/latent_cache.py, cache_latents) the images are not opened at all: each sample
loads the VAE posterior parameters stored for its variant, and the training step samples latents from them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from data.image_io import UNREADABLE, load_image
from data.items import ImageItem
from data.plan import Sample, Variant


def to_model_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0)


def load_pixels(path: str, variant: Sample | Variant, transforms=None) -> torch.Tensor:
    """The VAE input for one sample or variant: loaded, cropped, resized and flipped as planned, then passed
    through the plugins' transform_pil_image (`transforms`: utils.plugins.DataTransforms).

    Raises one of UNREADABLE for a file that cannot be decoded.
    """
    pixels = load_image(path, variant.bucket, variant.crop_x, variant.crop_y, variant.flip, jitter=variant.jitter)
    return to_model_input(transforms.pixels(pixels) if transforms else pixels)


class PlannedImages(torch.utils.data.Dataset):
    """Indexed by plan Samples, not integers: each sample says how its image is to be prepared.

    With `latent_cache` (a utils.latent_cache.LatentCache) a sample gives `latent_params` from the cache
    instead of `pixels`, and its image is not opened. `transforms` (utils.plugins.DataTransforms) are the
    plugins' data hooks. A stand-in sample (several processes, data/plan.py process_share) loads nothing.
    """

    def __init__(self, items: list[ImageItem], latent_cache=None, transforms=None):
        self.items = items
        self.latent_cache = latent_cache
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, sample: Sample) -> dict:
        item = self.items[sample.index]
        if sample.stand_in:
            return {"stand_in": True, "bucket": sample.bucket}
        try:
            if self.latent_cache is not None:  # raises LookupError, not UNREADABLE, for an entry never filled
                loaded = {"latent_params": self.latent_cache.load(item.path, sample.variant)}
            else:
                loaded = {"pixels": load_pixels(item.path, sample, self.transforms)}
        except UNREADABLE as error:
            return {"failed": item.path, "reason": f"cannot be read: {error}", "bucket": sample.bucket}
        caption = self.transforms.caption(sample.caption) if self.transforms and sample.caption else sample.caption
        return {**loaded, "caption": caption, "index": sample.index, "loss_scale": sample.loss_scale,
                "bucket": sample.bucket}


class EpochBatches(torch.utils.data.Sampler):
    """Yields the current epoch's batches; `set_plan` swaps in the next epoch's (persistent workers stay)."""

    def __init__(self):
        self.batches: list[list[Sample]] = []

    def set_plan(self, batches: list[list[Sample]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Collate:
    """Stacks a batch and tokenizes its captions (in the worker, off the training loop's thread).

    Captions arrive as planned (shuffled, or empty when dropped); `loss_scale` has one weight per image.

    `pixels` and `input_ids` are None when no image of the batch could be read; `failed` lists
    (path, reason) for the images left out. `latent_params` (batch, 2 x latent channels, h, w) replaces
    `pixels` with a latent cache; the other of the two is None.
    """

    def __init__(self, tokenize: Callable[[list[str]], torch.Tensor] | None = None):
        self.tokenize = tokenize

    def __call__(self, samples: list[dict]) -> dict:
        good = [s for s in samples if "failed" not in s and "stand_in" not in s]
        captions = [s["caption"] for s in good]
        return {"pixels": _stacked(good, "pixels"),
                "latent_params": _stacked(good, "latent_params"),
                "captions": captions,
                "input_ids": self.tokenize(captions) if good and self.tokenize else None,
                "indices": [s["index"] for s in good],
                "loss_scale": torch.tensor([s["loss_scale"] for s in good], dtype=torch.float32),
                "failed": [(s["failed"], s["reason"]) for s in samples if "failed" in s],
                "bucket": samples[0]["bucket"] if samples else None,  # (width, height) px: every sample's
                "stand_in": bool(samples) and all("stand_in" in s for s in samples)}


def _stacked(samples: list[dict], key: str) -> torch.Tensor | None:
    """The samples' `key` tensors as one batch; None when there are none (no sample, or not this kind)."""
    return torch.stack([s[key] for s in samples]) if samples and key in samples[0] else None


def make_loader(items: list[ImageItem], batches: EpochBatches, num_workers: int, pin_memory: bool,
                tokenize: Callable[[list[str]], torch.Tensor] | None = None, latent_cache=None, transforms=None):
    """A DataLoader over the planned batches; workers persist across epochs and leave Ctrl-C and SIGTERM to
    the training process. With `latent_cache`, batches hold cached VAE posterior parameters (PlannedImages)."""
    from utils.interrupts import ignore_stop_signals  # Ctrl-C stops training cleanly, not the workers mid-batch

    return torch.utils.data.DataLoader(
        PlannedImages(items, latent_cache, transforms), batch_sampler=batches, collate_fn=Collate(tokenize),
        num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory,
        worker_init_fn=ignore_stop_signals if num_workers else None)


def stop_workers(loader: torch.utils.data.DataLoader) -> None:
    """End the loader's persistent workers now; call it when training ends, however it ends.

    The workers ignore SIGTERM (above), and Python's multiprocessing ends its remaining children at exit with
    SIGTERM and then waits for them: a process whose loader outlived the loop (an exception raised in a
    worker keeps the loader's iterator referenced) would wait for ever instead of exiting. DataLoader has no
    public way to end persistent workers; its iterator's own shutdown is what it runs when collected.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
