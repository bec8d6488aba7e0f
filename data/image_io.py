"""Reading images with Pillow: sizes from headers at scan time, pixels cropped to a bucket at load time."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# What Pillow raises for a file that is not a readable image: missing, truncated, corrupt, not an image
# (SyntaxError for some malformed headers), or too large to decode safely (decompression-bomb guard).
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
EXIF_ORIENTATION = 0x0112  # orientations 5-8 are rotated by 90 degrees: width and height swap
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


def read_image_size(path: str) -> tuple[int, int]:
    """(width, height) as displayed, after EXIF rotation; reads the header only, not the pixels."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS:
            width, height = height, width
    return width, height


def crop_box(width: int, height: int, bucket: tuple[int, int], crop_x: float, crop_y: float) -> tuple[int, int, int, int]:
    """The largest box of the bucket's aspect ratio inside the image, placed by crop_x/crop_y in 0..1."""
    bucket_w, bucket_h = bucket
    if width * bucket_h > height * bucket_w:  # image wider than the bucket: trim the sides
        box_w, box_h = round(height * bucket_w / bucket_h), height
    else:  # image taller: trim top and bottom
        box_w, box_h = width, round(width * bucket_h / bucket_w)
    left = round((width - box_w) * crop_x)
    top = round((height - box_h) * crop_y)
    return left, top, left + box_w, top + box_h


def load_image(path: str, bucket: tuple[int, int], crop_x: float, crop_y: float, flip: bool) -> np.ndarray:
    """The image as uint8 RGB (height, width, 3), rotated per EXIF, cropped to the bucket's aspect ratio,
    resized to the bucket and mirrored if asked."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    image = image.crop(crop_box(*image.size, bucket, crop_x, crop_y))
    image = image.resize(bucket, Image.Resampling.LANCZOS)
    if flip:
        image = ImageOps.mirror(image)
    return np.array(image)  # a writable copy, as torch.from_numpy expects
