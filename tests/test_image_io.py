"""Unit tests of data/image_io.py beyond the basics in test_data.py: crop jitter, reduced-scale JPEG decoding,
mode conversions and the limits on what is read.

Torch-free, like the module: images are synthetic, made with Pillow and numpy in tmp_path.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin

from data import image_io
from data.image_io import (
    ALPHA_BACKGROUND,
    MAX_CROP_JITTER,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    NO_JITTER,
    UNREADABLE,
    crop_box,
    draft_scale,
    jitter_fraction,
    jitter_trims,
    load_image,
    read_image_size,
    to_rgb,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save(pixels_or_image, path, **save_args) -> str:
    """Save an array or an image to `path` (format from the extension) and return the path."""
    image = pixels_or_image if isinstance(pixels_or_image, Image.Image) else Image.fromarray(pixels_or_image)
    image.save(path, **save_args)
    return str(path)


def smooth_rgb(width: int, height: int) -> np.ndarray:
    """Gradients and slow waves: what a reduced-scale decode should reproduce almost exactly."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = (x / width * 255, y / height * 255, 128 + 100 * np.sin(x / 97 + y / 61))
    return np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8)


def waves_rgb(width: int, height: int) -> np.ndarray:
    """Waves of a few dozen px: a crop misplaced by a few px shows as a large difference."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = (128 + 100 * np.sin(x / 37), 128 + 100 * np.cos(y / 23), 128 + 60 * np.sin((x + y) / 51))
    return np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8)


def full_decode(path: str, bucket, crop_x=0.5, crop_y=0.5) -> np.ndarray:
    """The reference: decode everything, turn per EXIF, crop, resize with LANCZOS."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    box = crop_box(*image.size, bucket, crop_x, crop_y)
    return np.array(image.crop(box).resize(bucket, Image.Resampling.LANCZOS))


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture
def draft_calls(monkeypatch):
    """Records the reduced width (in stored orientation) each JPEG draft() call decodes the full image to."""
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        result = original(self, mode, size)
        calls.append(None if result is None else result[1][2])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    return calls


# =================================================================================================
# Crop jitter
# =================================================================================================

def plain_crop_box(width, height, bucket, crop_x, crop_y):
    """The crop box as it was before jitter existed, written out again as the reference."""
    bucket_w, bucket_h = bucket
    if width * bucket_h > height * bucket_w:
        box_w, box_h = round(height * bucket_w / bucket_h), height
    else:
        box_w, box_h = width, round(width * bucket_h / bucket_w)
    left, top = round((width - box_w) * crop_x), round((height - box_h) * crop_y)
    return left, top, left + box_w, top + box_h


def test_max_crop_jitter_is_two_percent():
    assert MAX_CROP_JITTER == 0.02


@pytest.mark.parametrize("width, height", [(1000, 500), (500, 1000), (640, 384), (101, 99), (2048, 1536), (513, 512)])
@pytest.mark.parametrize("bucket", [(512, 512), (640, 384), (320, 192), (1024, 256)])
@pytest.mark.parametrize("crop_x, crop_y", [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (0.2, 0.9)])
def test_no_jitter_gives_the_plain_crop(width, height, bucket, crop_x, crop_y):
    expected = plain_crop_box(width, height, bucket, crop_x, crop_y)
    assert crop_box(width, height, bucket, crop_x, crop_y) == expected
    assert crop_box(width, height, bucket, crop_x, crop_y, jitter=(0.0, 0.0, 0.0, 0.0)) == expected


@pytest.mark.parametrize("size, bucket, expected", [
    ((2048, 1536), (512, 384), MAX_CROP_JITTER),  # plenty of room: the cap
    ((512, 512), (512, 512), 0.0),  # exactly the bucket: none
    ((400, 300), (512, 384), 0.0),  # smaller than the bucket: none (no negative jitter)
    ((522, 1000), (512, 512), pytest.approx(10 / 512)),  # 1.95% larger than the bucket on the tighter side
])
def test_jitter_fraction_is_the_room_above_the_bucket_capped(size, bucket, expected):
    assert jitter_fraction(*size, bucket) == expected


def test_jitter_trims_each_side_by_its_draw_times_the_allowed_fraction_of_the_short_side():
    # 1000x800 into 512x512: the fraction is capped at 0.02, so each side loses up to 0.02 x 800 = 16 px
    assert jitter_trims(1000, 800, (512, 512), (0.5, 0.0, 0.999, 0.25)) == (8, 0, 16, 4)


def test_jittered_box_is_the_largest_of_the_buckets_shape_inside_the_trimmed_image():
    # trimmed to x 8..984, y 0..796: a 796 px square, centred in 976 px: left = 8 + 90
    assert crop_box(1000, 800, (512, 512), 0.5, 0.5, jitter=(0.5, 0.0, 0.999, 0.25)) == (98, 0, 894, 796)


def test_no_jitter_for_an_image_the_size_of_its_bucket():
    assert crop_box(512, 512, (512, 512), 0.5, 0.5, jitter=(0.9, 0.9, 0.9, 0.9)) == (0, 0, 512, 512)


@pytest.mark.parametrize("width, height, bucket", [(2048, 1536, (576, 448)), (777, 333, (640, 384)),
                                                   (1200, 1200, (512, 512)), (3000, 700, (1024, 256))])
def test_jittered_boxes_are_the_largest_of_the_buckets_shape_inside_the_trimmed_image(width, height, bucket):
    rng = np.random.default_rng(0)
    bucket_aspect = bucket[0] / bucket[1]
    for _ in range(200):
        jitter = tuple(rng.random(4))
        trim_left, trim_top, trim_right, trim_bottom = jitter_trims(width, height, bucket, jitter)
        assert max(jitter_trims(width, height, bucket, jitter)) <= round(MAX_CROP_JITTER * min(width, height))
        left, top, right, bottom = crop_box(width, height, bucket, 0.5, 0.5, jitter=jitter)
        assert trim_left <= left < right <= width - trim_right and trim_top <= top < bottom <= height - trim_bottom
        assert abs((right - left) / (bottom - top) - bucket_aspect) < 0.01
        touches_left_and_right = (left, right) == (trim_left, width - trim_right)
        touches_top_and_bottom = (top, bottom) == (trim_top, height - trim_bottom)
        assert touches_left_and_right or touches_top_and_bottom


def test_load_image_applies_the_jitter(tmp_path):
    path = save(waves_rgb(400, 300), tmp_path / "waves.png")
    plain = load_image(path, (128, 96), 0.5, 0.5, False)
    assert np.array_equal(load_image(path, (128, 96), 0.5, 0.5, False, jitter=NO_JITTER), plain)
    assert not np.array_equal(load_image(path, (128, 96), 0.5, 0.5, False, jitter=(0.9, 0.1, 0.0, 0.7)), plain)


# =================================================================================================
# Reduced-scale JPEG decoding
# =================================================================================================

@pytest.mark.parametrize("box_size, bucket, expected", [
    ((2048, 1536), (512, 384), 4),
    ((4096, 3072), (512, 384), 8),  # exactly 8x the bucket
    ((4095, 3072), (512, 384), 4),  # 1 px short of 8x
    ((1975, 1536), (576, 448), 2),  # 1/4 would leave 493 px < 576
    ((600, 450), (512, 384), 1),
    ((300, 200), (512, 384), 1),  # smaller than the bucket: full scale, then an upscale
])
def test_draft_scale_is_the_smallest_decode_that_keeps_the_crop_at_least_the_bucket(box_size, bucket, expected):
    assert draft_scale((10, 20, 10 + box_size[0], 20 + box_size[1]), bucket) == expected


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_matches_a_full_decode(tmp_path, draft_calls):
    path = save(smooth_rgb(2048, 1536), tmp_path / "big.jpg", quality=95)
    pixels = load_image(path, (512, 384), 0.5, 0.5, False)
    assert draft_calls == [512]  # 1/4 scale
    assert pixels.shape == (384, 512, 3) and pixels.dtype == np.uint8
    assert mean_abs_diff(pixels, full_decode(path, (512, 384))) < 3


def test_the_decode_never_goes_below_the_bucket(tmp_path, draft_calls):
    path = save(smooth_rgb(2048, 1536), tmp_path / "big.jpg", quality=95)
    pixels = load_image(path, (576, 448), 0.5, 0.5, False)  # the crop is 1975 px wide: 1/4 would be 493 < 576
    assert draft_calls == [1024]  # 1/2 scale
    assert mean_abs_diff(pixels, full_decode(path, (576, 448))) < 3


def test_a_jpeg_close_to_the_bucket_is_decoded_at_full_scale(tmp_path, draft_calls):
    path = save(smooth_rgb(600, 450), tmp_path / "small.jpg", quality=95)
    assert np.array_equal(load_image(path, (512, 384), 0.5, 0.5, False), full_decode(path, (512, 384)))
    assert draft_calls == []


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_reduced_decode_crops_the_same_part_for_every_exif_orientation(tmp_path, orientation):
    # 1/8 scale of an image whose sides are not multiples of 8: the partial last pixel must not shift the crop
    exif = Image.Exif()
    exif[image_io.EXIF_ORIENTATION] = orientation
    path = save(waves_rgb(1023, 771), tmp_path / "turned.jpg", quality=95, exif=exif)
    bucket = (96, 64) if orientation < 5 else (64, 96)
    pixels = load_image(path, bucket, 0.3, 0.7, False)
    assert mean_abs_diff(pixels, full_decode(path, bucket, 0.3, 0.7)) < 2  # a misplaced crop gives 5-7


def test_reduced_decode_with_jitter_matches_a_full_decode_of_the_same_box(tmp_path):
    path = save(smooth_rgb(2048, 1536), tmp_path / "big.jpg", quality=95)
    jitter = (0.9, 0.2, 0.1, 0.8)
    box = crop_box(2048, 1536, (512, 384), 0.4, 0.6, jitter=jitter)
    with Image.open(path) as image:
        reference = np.array(image.convert("RGB").crop(box).resize((512, 384), Image.Resampling.LANCZOS))
    assert mean_abs_diff(load_image(path, (512, 384), 0.4, 0.6, False, jitter=jitter), reference) < 3


def test_reduced_decode_of_greyscale_and_cmyk_jpegs(tmp_path, draft_calls):
    grey = save(Image.new("L", (1024, 768), 90), tmp_path / "grey.jpg", quality=95)
    cmyk = save(Image.new("CMYK", (1024, 768), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert np.abs(load_image(grey, (128, 96), 0.5, 0.5, False).astype(int) - 90).max() <= 1
    assert np.abs(load_image(cmyk, (128, 96), 0.5, 0.5, False).astype(int) - (255, 0, 0)).max() <= 3
    assert draft_calls == [128, 128]


# =================================================================================================
# Modes
# =================================================================================================

def load_one_pixel(path) -> tuple[int, int, int]:
    """The pixel of a uniform image, loaded at its own size (no resampling)."""
    with Image.open(path) as image:
        size = image.size
    pixels = load_image(str(path), size, 0.5, 0.5, False)
    assert (pixels == pixels[0, 0]).all()
    return tuple(int(v) for v in pixels[0, 0])


def test_alpha_background_is_white():
    assert ALPHA_BACKGROUND == (255, 255, 255)


def test_cmyk_becomes_rgb(tmp_path):
    assert load_one_pixel(save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "a.tif")) == (255, 0, 0)
    assert load_one_pixel(save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path / "b.tif")) == (255, 255, 255)


def palette_image(colours, index, transparent=None) -> Image.Image:
    image = Image.new("P", (8, 8), index)
    image.putpalette([channel for colour in colours for channel in colour])
    if transparent is not None:
        image.info["transparency"] = transparent
    return image


def test_palette_without_transparency_keeps_its_colours(tmp_path):
    path = save(palette_image([(200, 30, 60), (0, 0, 255)], 0), tmp_path / "p.png")
    assert load_one_pixel(path) == (200, 30, 60)


@pytest.mark.parametrize("index, expected", [(0, ALPHA_BACKGROUND), (1, (0, 0, 255))])
def test_palette_with_a_transparent_entry(tmp_path, index, expected):
    path = save(palette_image([(200, 30, 60), (0, 0, 255)], index, transparent=0), tmp_path / "p.png",
                transparency=0)
    assert load_one_pixel(path) == expected


@pytest.mark.parametrize("alpha, expected", [(0, (255, 255, 255)), (255, (200, 30, 60)), (128, (228, 142, 157))])
def test_rgba_is_composited_onto_white(tmp_path, alpha, expected):
    path = save(Image.new("RGBA", (8, 8), (200, 30, 60, alpha)), tmp_path / "a.png")
    assert np.abs(np.array(load_one_pixel(path)) - expected).max() <= 1


@pytest.mark.parametrize("alpha, expected", [(0, (255, 255, 255)), (255, (90, 90, 90))])
def test_grey_with_alpha_is_composited_onto_white(tmp_path, alpha, expected):
    assert load_one_pixel(save(Image.new("LA", (8, 8), (90, alpha)), tmp_path / "la.png")) == expected


def test_grey_becomes_three_equal_channels(tmp_path):
    assert load_one_pixel(save(Image.new("L", (8, 8), 90), tmp_path / "l.png")) == (90, 90, 90)


@pytest.mark.parametrize("mode, colour", [("RGB", (10, 20, 30)), ("L", 10)])
def test_a_transparent_colour_key_becomes_white(tmp_path, mode, colour):
    path = save(Image.new(mode, (8, 8), colour), tmp_path / "keyed.png", transparency=colour)
    assert load_one_pixel(path) == ALPHA_BACKGROUND


def test_one_bit_becomes_black_and_white(tmp_path):
    image = Image.new("1", (16, 8), 0)
    image.paste(1, (8, 0, 16, 8))
    pixels = load_image(save(image, tmp_path / "bits.png"), (16, 8), 0.5, 0.5, False)
    assert (pixels[:, :8] == 0).all() and (pixels[:, 8:] == 255).all()


def sixteen_bit_values_in(path) -> list[int]:
    """Grey levels of 0, 32768 and 65535 in a 3x1 16-bit image, as loaded (one channel)."""
    with Image.open(path) as image:
        assert image.mode.startswith("I;16")
    return [int(v) for v in load_image(str(path), (3, 1), 0.5, 0.5, False)[0, :, 0]]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert sixteen_bit_values_in(save(image, tmp_path / "deep.png")) == [0, 128, 255]


def test_big_endian_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=">u2")
    image = Image.frombytes("I;16B", (3, 1), values.tobytes())
    assert sixteen_bit_values_in(save(image, tmp_path / "deep.tif")) == [0, 128, 255]


@pytest.mark.parametrize("values, expected", [
    (np.array([[0, 32768, 65535]], dtype=np.int32), [0, 128, 255]),  # 16-bit data held as mode I
    (np.array([[-100, 0, 100]], dtype=np.int32), [0, 128, 255]),  # outside 16 bits: its own range
    (np.array([[0.0, 0.5, 1.0]], dtype=np.float32), [0, 128, 255]),  # float in 0..1
    (np.array([[10.0, 20.0, 30.0]], dtype=np.float32), [0, 128, 255]),  # float outside 0..1: its own range
])
def test_thirty_two_bit_integer_and_float_greyscale(values, expected):
    image = Image.fromarray(values)
    assert image.mode in ("I", "F")
    rgb = np.array(to_rgb(image))
    assert rgb.dtype == np.uint8 and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[0, :, 0].tolist() == expected


def test_rgb_is_returned_as_is():
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(image) is image


# =================================================================================================
# Limits and unreadable files
# =================================================================================================

def png_header_only(path, width: int, height: int) -> str:
    """A PNG that declares width x height but holds no pixel data: enough for a header read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return str(path)


def test_unreadable_includes_value_error():
    assert ValueError in UNREADABLE


def test_an_image_too_small_to_train_is_refused_with_its_size(tmp_path):
    path = save(Image.new("RGB", (40, 30)), tmp_path / "tiny.png")
    with pytest.raises(ValueError, match="is 40x30 px; images need at least 64 px on each side"):
        read_image_size(path, min_side=MIN_IMAGE_SIDE)


@pytest.mark.parametrize("size", [(64, 64), (64, 1000), (1000, 64)])
def test_an_image_of_the_minimum_side_is_accepted(tmp_path, size):
    assert read_image_size(save(Image.new("RGB", size), tmp_path / "a.png"), min_side=MIN_IMAGE_SIDE) == size


@pytest.mark.parametrize("size", [(63, 1000), (1000, 63)])
def test_either_side_below_the_minimum_is_refused(tmp_path, size):
    with pytest.raises(ValueError, match="at least 64 px"):
        read_image_size(save(Image.new("RGB", size), tmp_path / "a.png"), min_side=MIN_IMAGE_SIDE)


def test_without_min_side_any_size_is_read(tmp_path):
    assert read_image_size(save(Image.new("RGB", (40, 30)), tmp_path / "tiny.png")) == (40, 30)


def test_pillows_own_thresholds_sit_at_and_above_ours():
    assert MAX_IMAGE_PIXELS == 178_956_970
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS  # Pillow warns above ours and refuses at twice ours


def test_a_large_but_sane_header_reads_without_a_bomb_warning(tmp_path):
    path = png_header_only(tmp_path / "large.png", 13377, 13377)  # 178,944,129 px: just under the limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image_size(path, min_side=MIN_IMAGE_SIDE) == (13377, 13377)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("size", [(13377, 13378), (40000, 40000)])  # just over the limit; over twice it
def test_absurd_dimensions_are_refused_with_our_message(tmp_path, size):
    path = png_header_only(tmp_path / "bomb.png", *size)
    with pytest.raises(ValueError, match="178,956,970 px in all are refused"):
        read_image_size(path)
    with pytest.raises(ValueError, match="178,956,970 px in all are refused"):
        load_image(path, (512, 512), 0.5, 0.5, False)


def test_truncated_files_do_not_load_with_grey():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("name, content", [("empty.jpg", b""), ("empty.png", b""),
                                           ("noise.jpg", bytes(np.random.default_rng(0).integers(0, 256, 5000,
                                                                                                  dtype=np.uint8))),
                                           ("text.jpg", b"not a JPEG at all\n" * 20)])
def test_files_that_are_not_images_are_unreadable(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UNREADABLE):
        read_image_size(str(path))
    with pytest.raises(UNREADABLE):
        load_image(str(path), (64, 64), 0.5, 0.5, False)


def truncated_copy(path: str, fraction: float = 0.6) -> str:
    """The first `fraction` of the file, as a file named truncated.<same extension>."""
    with open(path, "rb") as file:
        data = file.read()
    truncated = os.path.join(os.path.dirname(path), "truncated" + os.path.splitext(path)[1])
    with open(truncated, "wb") as file:
        file.write(data[: int(len(data) * fraction)])
    return truncated


@pytest.mark.parametrize("name, bucket", [("a.jpg", (256, 192)), ("a.jpg", (64, 64)), ("a.png", (256, 192))])
def test_a_truncated_file_passes_the_header_read_but_fails_to_load(tmp_path, name, bucket):
    noise = np.random.default_rng(1).integers(0, 256, size=(384, 512, 3), dtype=np.uint8)
    path = truncated_copy(save(noise, tmp_path / name))
    assert read_image_size(path) == (512, 384)
    with pytest.raises(UNREADABLE):  # (64, 64) decodes at 1/4 scale: truncation is caught there too
        load_image(path, bucket, 0.5, 0.5, False)


def test_the_module_does_not_import_torch():
    code = "import sys, data.image_io; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_exif_orientation_of_a_png_is_read_from_the_header_and_applied_at_load(tmp_path):
    exif = Image.Exif()
    exif[image_io.EXIF_ORIENTATION] = 6
    path = save(waves_rgb(80, 40), tmp_path / "turned.png", exif=exif)
    assert read_image_size(path) == (40, 80)
    assert load_image(path, (40, 80), 0.5, 0.5, False).shape == (80, 40, 3)


@pytest.mark.parametrize("size, bucket", [((523, 523), (512, 512)), ((1100, 530), (1024, 512))])
def test_jitter_never_trims_an_image_into_an_upscale(size, bucket):
    """With the largest draws the box still holds the bucket: jitter alone never forces an upscale."""
    left, top, right, bottom = crop_box(*size, bucket, 0.5, 0.5, jitter=(0.99, 0.99, 0.99, 0.99))
    assert right - left >= bucket[0] and bottom - top >= bucket[1]
