"""The training images as a torch dataset and loader.

Each epoch the plan (data/plan.py) decides the batches and every random choice; the loader's workers
only load, crop, resize, flip and tokenize as told, so the result does not depend on the number of
workers. An image that cannot be decoded (deleted, truncated or corrupted since the scan) is left out of
its batch and reported; the rest of the batch trains.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from data.image_io import UNREADABLE, load_image
from data.items import ImageItem
from data.plan import Sample


def to_model_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0)


class PlannedImages(torch.utils.data.Dataset):
    """Indexed by plan Samples, not integers: each sample says how its image is to be prepared."""

    def __init__(self, items: list[ImageItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, sample: Sample) -> dict:
        item = self.items[sample.index]
        try:
            pixels = load_image(item.path, sample.bucket, sample.crop_x, sample.crop_y, sample.flip,
                                jitter=sample.jitter)
        except UNREADABLE as error:
            return {"failed": item.path, "reason": f"cannot be read: {error}"}
        return {"pixels": to_model_input(pixels), "caption": sample.caption, "index": sample.index,
                "loss_scale": sample.loss_scale}


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
    (path, reason) for the images left out.
    """

    def __init__(self, tokenize: Callable[[list[str]], torch.Tensor] | None = None):
        self.tokenize = tokenize

    def __call__(self, samples: list[dict]) -> dict:
        good = [s for s in samples if "failed" not in s]
        captions = [s["caption"] for s in good]
        return {"pixels": torch.stack([s["pixels"] for s in good]) if good else None,
                "captions": captions,
                "input_ids": self.tokenize(captions) if good and self.tokenize else None,
                "indices": [s["index"] for s in good],
                "loss_scale": torch.tensor([s["loss_scale"] for s in good], dtype=torch.float32),
                "failed": [(s["failed"], s["reason"]) for s in samples if "failed" in s]}


def make_loader(items: list[ImageItem], batches: EpochBatches, num_workers: int, pin_memory: bool,
                tokenize: Callable[[list[str]], torch.Tensor] | None = None):
    """A DataLoader over the planned batches; workers persist across epochs and leave Ctrl-C and SIGTERM to
    the training process."""
    from utils.interrupts import ignore_stop_signals  # Ctrl-C stops training cleanly, not the workers mid-batch

    return torch.utils.data.DataLoader(
        PlannedImages(items), batch_sampler=batches, collate_fn=Collate(tokenize), num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=pin_memory,
        worker_init_fn=ignore_stop_signals if num_workers else None)
