"""The training images as a torch dataset and loader.

Each epoch the plan (data/plan.py) decides the batches and every random choice; the loader's workers
only load, crop, resize and flip as told, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from data.image_io import load_image
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
        pixels = load_image(item.path, sample.bucket, sample.crop_x, sample.crop_y, sample.flip)
        return {"pixels": to_model_input(pixels), "caption": "" if sample.drop_caption else item.caption,
                "index": sample.index}


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


def collate(samples: list[dict]) -> dict:
    return {"pixels": torch.stack([s["pixels"] for s in samples]),
            "captions": [s["caption"] for s in samples],
            "indices": [s["index"] for s in samples]}


def default_num_workers() -> int:
    """One worker per spare core, at most 8: enough to keep a GPU fed without starving the trainer."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(items: list[ImageItem], batches: EpochBatches, num_workers: int, pin_memory: bool):
    """A DataLoader over the planned batches; workers persist across epochs."""
    return torch.utils.data.DataLoader(
        PlannedImages(items), batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=pin_memory)
