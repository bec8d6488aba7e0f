"""The epoch plan: which samples go in which batch, and every random decision about each sample.

A pure function of (buckets of the items, seed, epoch, batch size): the same inputs give the same plan
whatever the number of data-loader workers, and a resumed run can rebuild any epoch. Data-loader workers
only carry out the decisions recorded here; they draw no random numbers of their own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One image as it is trained in one epoch."""

    index: int  # into the list of images
    bucket: tuple[int, int]  # (width, height) px the image is cropped and resized to
    crop_x: float  # 0..1: where the crop window sits along the surplus width (0.5 = centred)
    crop_y: float  # 0..1: the same along the surplus height
    flip: bool  # mirror left-right
    drop_caption: bool  # train this sample with the empty caption (conditional dropout)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream for one image in one epoch, independent of order, workers and processes."""
    return random.Random(f"sample/{seed}/{epoch}/{index}")


def plan_sample(index: int, bucket: tuple[int, int], seed: int, epoch: int, *, flip_p: float,
                cond_dropout: float) -> Sample:
    """Decide crop, flip and caption dropout for one image in one epoch."""
    rng = sample_rng(seed, epoch, index)
    # Centre-biased crop offsets (triangular, as EveryDream2): most crops keep the middle of the image.
    crop_x, crop_y = rng.triangular(0.0, 1.0, 0.5), rng.triangular(0.0, 1.0, 0.5)
    flip = rng.random() < flip_p
    drop_caption = rng.random() < cond_dropout
    return Sample(index, bucket, crop_x, crop_y, flip, drop_caption)


def plan_epoch(buckets: list[tuple[int, int]], seed: int, epoch: int, batch_size: int, *,
               flip_p: float = 0.0, cond_dropout: float = 0.0) -> list[list[Sample]]:
    """The batches of one epoch; `buckets[i]` is the bucket of image i.

    Every image appears exactly once. Each batch holds images of one bucket only. A bucket whose count
    is not a multiple of batch_size ends in one smaller batch (nothing is dropped or repeated). The order
    of images within buckets and of the batches is shuffled with seed + epoch.
    """
    rng = random.Random(seed + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).append(index)
    batches: list[list[Sample]] = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        for start in range(0, len(indices), batch_size):
            batches.append([plan_sample(i, bucket, seed, epoch, flip_p=flip_p, cond_dropout=cond_dropout)
                            for i in indices[start:start + batch_size]])
    rng.shuffle(batches)
    return batches
