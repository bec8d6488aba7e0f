"""Reading images with Pillow: sizes from headers at scan time, pixels cropped to a bucket at load time.

Torch-free (numpy and Pillow only). Four concerns, one section each: the limits an image must meet, the crop
box (with optional jitter), conversion of every Pillow mode to 8-bit RGB, and loading, where JPEGs are
decoded at a reduced scale when the crop leaves room for it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFile, ImageOps

# What Pillow raises for a file that is not a readable image: missing, truncated, corrupt, not an image
# (SyntaxError for some malformed headers), a mode with no conversion to RGB, a size refused below
# (ValueError), or too large to decode safely (decompression-bomb guard).
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
EXIF_ORIENTATION = 0x0112  # orientations 5-8 are rotated by 90 degrees: width and height swap
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
# How to turn the stored pixels upright for each EXIF orientation (1, or none: as stored), as in
# ImageOps.exif_transpose, which we cannot use: it reads the orientation in a way that decodes PNGs.
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}

# -------------------------------------------------------------------------------------------------
# Limits
# -------------------------------------------------------------------------------------------------

MIN_IMAGE_SIDE = 64  # px: a shorter side is upscaled over 4x at resolution 512 (bucket sides are >= 256 px)
# px in all. Pillow's default refuses more than 2 x Image.MAX_IMAGE_PIXELS = 2 x 89,478,485 = 178,956,970
# px (DecompressionBombError) and warns from 89,478,485 px. The warning would flag 100-megapixel camera
# photos (11,648 x 8,736 = 101.8 Mpx), which train fine, so we refuse at Pillow's hard limit instead, a
# 13,377 px square (537 MB decoded as RGB), and move Pillow's own threshold up to ours just below.
MAX_IMAGE_PIXELS = 178_956_970

# Pillow now warns only for images we refuse anyway, with our message, and raises its own error only at
# twice our limit, for a header so large that we never get to read it (open_image words that one too).
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Pillow's default, restated: a truncated file raises OSError instead of loading with grey at the bottom,
# so it is skipped and reported rather than trained on.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def check_image_size(width: int, height: int, min_side: int = MIN_IMAGE_SIDE) -> None:
    """Raise ValueError, worded for people, for an image too large to decode safely or too small to train."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"the image is {width}x{height} px ({width * height / 1e6:,.0f} megapixels); images "
                         f"over {MAX_IMAGE_PIXELS:,} px in all are refused as possible decompression bombs "
                         f"(MAX_IMAGE_PIXELS in data/image_io.py): downscale it")
    if min(width, height) < min_side:
        raise ValueError(f"the image is {width}x{height} px; images need at least {min_side} px on each side")


def open_image(path: str) -> Image.Image:
    """Image.open (header only, pixels not decoded yet), with Pillow's bomb error worded like ours."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{error} Images over {MAX_IMAGE_PIXELS:,} px in all are refused "
                         f"(MAX_IMAGE_PIXELS in data/image_io.py): downscale it") from error


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (or XMP's), 1 where there is none, from the header alone.

    Image.Image.getexif on purpose: PNG's own getexif decodes the whole image to look for EXIF after the
    pixel data, which would make every scan decode every PNG (and only Pillow-unusual files have it there).
    """
    return Image.Image.getexif(image).get(EXIF_ORIENTATION, 1)


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, after EXIF rotation, from the header alone."""
    width, height = image.size
    if exif_orientation(image) in TRANSPOSED_ORIENTATIONS:
        return height, width
    return width, height


def read_image_size(path: str, min_side: int = 0) -> tuple[int, int]:
    """(width, height) as displayed, after EXIF rotation; reads the header only, not the pixels.

    Raises ValueError for an image over MAX_IMAGE_PIXELS, and for one with a side below `min_side` px: the
    scanner passes MIN_IMAGE_SIDE; the default 0 only reads the size.
    """
    with open_image(path) as image:
        width, height = displayed_size(image)
    check_image_size(width, height, min_side)
    return width, height


# -------------------------------------------------------------------------------------------------
# Crop box
# -------------------------------------------------------------------------------------------------

MAX_CROP_JITTER = 0.02  # of the image's short side, trimmed at most from each side before the crop
NO_JITTER = (0.0, 0.0, 0.0, 0.0)


def jitter_fraction(width: int, height: int, bucket: tuple[int, int]) -> float:
    """How much of the short side each jitter draw may trim: the image's surplus over the bucket (as a
    fraction of the bucket), at most MAX_CROP_JITTER, none for an image no larger than its bucket
    (EveryDream2's rule). jitter_trims also keeps the trims within the surplus, so jitter never forces
    an upscale that was not already needed."""
    bucket_w, bucket_h = bucket
    room = min((width - bucket_w) / bucket_w, (height - bucket_h) / bucket_h)
    return min(max(room, 0.0), MAX_CROP_JITTER)


def jitter_trims(width: int, height: int, bucket: tuple[int, int],
                 jitter: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """px trimmed from the (left, top, right, bottom) of the image for the caller's draws in [0, 1)."""
    allowed = jitter_fraction(width, height, bucket)
    if allowed <= 0:
        return 0, 0, 0, 0
    short_side = min(width, height)
    left, top, right, bottom = (round(draw * allowed * short_side) for draw in jitter)
    # Never trim into the bucket's size: jitter alone must not turn a crop into an upscale.
    left, right = _within(left, right, width - bucket[0])
    top, bottom = _within(top, bottom, height - bucket[1])
    return left, top, right, bottom


def _within(first: int, second: int, room: int) -> tuple[int, int]:
    """Two trims scaled down together so that they add up to at most `room` px."""
    if first + second <= room:
        return first, second
    scale = max(room, 0) / (first + second)
    return int(first * scale), int(second * scale)


def crop_box(width: int, height: int, bucket: tuple[int, int], crop_x: float, crop_y: float, *,
             jitter: tuple[float, float, float, float] = NO_JITTER) -> tuple[int, int, int, int]:
    """The largest box of the bucket's aspect ratio inside the image, placed by crop_x/crop_y in 0..1.

    `jitter` holds four draws in [0, 1) for the (left, top, right, bottom) sides: each side is first trimmed
    by draw x jitter_fraction x the short side, so the same image is cropped a little differently each epoch
    (as EveryDream2 does). No jitter gives the plain crop.
    """
    trim_left, trim_top, trim_right, trim_bottom = jitter_trims(width, height, bucket, jitter)
    left, top, right, bottom = aspect_box(width - trim_left - trim_right, height - trim_top - trim_bottom,
                                          bucket, crop_x, crop_y)
    return left + trim_left, top + trim_top, right + trim_left, bottom + trim_top


def aspect_box(width: int, height: int, bucket: tuple[int, int], crop_x: float,
               crop_y: float) -> tuple[int, int, int, int]:
    """The largest box of the bucket's aspect ratio inside a width x height area, placed by crop_x/crop_y."""
    bucket_w, bucket_h = bucket
    if width * bucket_h > height * bucket_w:  # area wider than the bucket: trim the sides
        box_w, box_h = round(height * bucket_w / bucket_h), height
    else:  # area taller: trim top and bottom
        box_w, box_h = width, round(width * bucket_h / bucket_w)
    left = round((width - box_w) * crop_x)
    top = round((height - box_h) * crop_y)
    return left, top, left + box_w, top + box_h


# -------------------------------------------------------------------------------------------------
# Modes: everything to 8-bit RGB
# -------------------------------------------------------------------------------------------------

ALPHA_BACKGROUND = (255, 255, 255)  # RGB that transparent pixels are composited onto: white, as viewers show them
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SIXTEEN_BIT_RANGE = (0, 65535)
HIGH_DEPTH_MODES = SIXTEEN_BIT_MODES + ("I", "F")  # Pillow's convert() clips these to 0..255: 256 -> white


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB: transparency composited onto ALPHA_BACKGROUND (white), 16-bit and float
    greyscale scaled to 8 bits by their value range (not clipped), CMYK, palette, grey and 1-bit converted.

    An RGB image is returned as is (not copied).
    """
    if image.mode in HIGH_DEPTH_MODES:
        image = high_depth_to_8bit(image)
    if image.mode in ALPHA_MODES or "transparency" in image.info:  # PNG tRNS: a palette, grey or RGB key
        return onto_background(image.convert("RGBA"))
    if image.mode == "RGB":
        return image
    return image.convert("RGB")  # CMYK, YCbCr, P, L, 1 (0/255); ValueError for a mode Pillow cannot convert


def onto_background(rgba: Image.Image) -> Image.Image:
    """RGB of an RGBA image composited onto ALPHA_BACKGROUND: a transparent pixel becomes the background."""
    background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image as 8-bit "L", scaled from its value range."""
    values = np.asarray(image, dtype=np.float32)
    low, high = value_range(image.mode, values)
    scaled = (values - low) * np.float32(255 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def value_range(mode: str, values: np.ndarray) -> tuple[float, float]:
    """The range that maps to 0..255: 0..65535 for 16-bit data (mode I is how Pillow holds 16-bit PNGs and
    TIFFs too), 0..1 for float data in it, else the image's own min..max (no better guess exists)."""
    if mode in SIXTEEN_BIT_MODES:
        return SIXTEEN_BIT_RANGE
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if mode == "I" and low >= SIXTEEN_BIT_RANGE[0] and high <= SIXTEEN_BIT_RANGE[1]:
        return SIXTEEN_BIT_RANGE
    if mode == "F" and low >= 0.0 and high <= 1.0:
        return 0.0, 1.0
    return low, high


# -------------------------------------------------------------------------------------------------
# Loading
# -------------------------------------------------------------------------------------------------

DRAFT_SCALES = (8, 4, 2)  # the reduced scales (1/8, 1/4, 1/2) that JPEG decoders offer, smallest first
# For each EXIF orientation, whether the displayed x and y axes run against the stored ones. A reduced-scale
# decode has a last partial pixel on each axis; where the axis is flipped that pixel ends up first.
FLIPPED_AXES = {2: (True, False), 3: (True, True), 4: (False, True), 5: (False, False),
                6: (True, False), 7: (True, True), 8: (False, True)}


def load_image(path: str, bucket: tuple[int, int], crop_x: float, crop_y: float, flip: bool, *,
               jitter: tuple[float, float, float, float] = NO_JITTER) -> np.ndarray:
    """The image as uint8 RGB (height, width, 3), rotated per EXIF, cropped to the bucket's aspect ratio
    (crop_box, with `jitter`), resized to the bucket with LANCZOS and mirrored if asked.

    A JPEG is decoded at the smallest of 1/2, 1/4, 1/8 scale that leaves the crop at least the bucket's size:
    the decoder skips the detail that the resize would throw away, several times faster. Raises one of
    UNREADABLE for a file that cannot be decoded, truncated ones included.
    """
    with open_image(path) as opened:
        width, height = displayed_size(opened)
        check_image_size(width, height, min_side=0)  # the file may have changed since the scan
        box = crop_box(width, height, bucket, crop_x, crop_y, jitter=jitter)
        drafted_box = draft_for_crop(opened, (width, height), box, bucket)
        image = to_rgb(upright(opened))  # decodes the pixels (at the drafted scale)
        if drafted_box is None:  # full scale: an integer crop, as before drafting existed
            image = image.crop(box).resize(bucket, Image.Resampling.LANCZOS)
        else:  # the same part of the picture in the smaller decode, kept fractional; resize crops it
            image = image.resize(bucket, Image.Resampling.LANCZOS, box=drafted_box)
    if flip:
        image = ImageOps.mirror(image)
    return np.array(image)  # a writable copy, as torch.from_numpy expects


def draft_scale(box: tuple[int, int, int, int], bucket: tuple[int, int]) -> int:
    """The largest of DRAFT_SCALES that leaves the box at least the bucket's size, else 1 (full scale).

    Never below the bucket: a reduced decode must not make the resize an upscale.
    """
    left, top, right, bottom = box
    bucket_w, bucket_h = bucket
    for scale in DRAFT_SCALES:
        if right - left >= scale * bucket_w and bottom - top >= scale * bucket_h:
            return scale
    return 1


def draft_for_crop(image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int],
                   bucket: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """Ask the decoder for a reduced scale where the crop allows it, and return the box in the reduced,
    upright image; None where the image will be decoded at full scale.

    `size` and `box` are in the displayed image at full scale. Pillow's draft() works in stored orientation
    and only for JPEGs (other formats return None); it rounds the reduced size up.
    """
    scale = draft_scale(box, bucket)
    if scale == 1:
        return None
    stored_w, stored_h = image.size
    drafted = image.draft("RGB", (stored_w // scale, stored_h // scale))  # L and CMYK JPEGs keep their mode
    if drafted is None:
        return None
    _, (_, _, extent_w, extent_h) = drafted  # where the full image ends in the reduced one
    orientation = exif_orientation(image)
    if orientation in TRANSPOSED_ORIENTATIONS:
        extent_w, extent_h = extent_h, extent_w
    flip_x, flip_y = FLIPPED_AXES.get(orientation, (False, False))
    reduced_w, reduced_h = displayed_size(image)
    offset_x = reduced_w - extent_w if flip_x else 0.0  # the partial last pixel comes first
    offset_y = reduced_h - extent_h if flip_y else 0.0
    scale_x, scale_y = extent_w / size[0], extent_h / size[1]
    left, top, right, bottom = box
    return (offset_x + left * scale_x, offset_y + top * scale_y,
            offset_x + right * scale_x, offset_y + bottom * scale_y)


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; the image itself where there is nothing to turn."""
    transpose = UPRIGHT.get(exif_orientation(image))
    return image if transpose is None else image.transpose(transpose)
