"""The training images as scanned: caption, size and bucket of each, and the files that were skipped.

Torch-free: scanning reads file names, caption files and image headers only, so a data_root with no
usable image is reported before any model or framework loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from data.buckets import generate_buckets, nearest_bucket
from data.captions import image_caption
from data.image_io import UNREADABLE, read_image_size
from data.scan import find_images


@dataclass(frozen=True)
class ImageItem:
    """A training image: where it is, what it says, and the bucket it trains at."""

    path: str  # absolute
    caption: str
    size: tuple[int, int]  # (width, height) px as displayed, after EXIF rotation
    bucket: tuple[int, int]  # (width, height) px


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


def scan_dataset(data_root: str, resolution: int) -> tuple[list[ImageItem], list[SkippedFile]]:
    """Every usable image under data_root with its caption and bucket, and the files that were skipped."""
    buckets = generate_buckets(resolution)
    items, skipped = [], []
    for path in find_images(data_root):
        try:
            size = read_image_size(path)
            caption = image_caption(path)
        except UNREADABLE as error:
            skipped.append(SkippedFile(path, f"cannot be read: {error}"))
            continue
        items.append(ImageItem(os.path.abspath(path), caption, size, nearest_bucket(*size, buckets)))
    return items, skipped
