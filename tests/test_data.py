"""Unit tests of the pure, torch-free data layer: scan, captions, buckets, epoch plan, image reading, items.

This file must not import torch (STYLE principle 7): images are made with Pillow in tmp_path.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data.buckets import generate_buckets, nearest_bucket
from data.captions import caption_from_filename, compose_caption, read_text
from data.image_config import parse_caption_text
from data.image_io import crop_box, load_image, read_image_size
from data.items import ImageItem, scan_dataset
from data.plan import PlanOptions, Sample, plan_epoch, plan_sample
from data.scan import find_images
from utils.config import SUPPORTED_RESOLUTIONS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = 64
AREA_FLOOR = 0.9  # a bucket holds at least this fraction of resolution² pixels


def make_image(path, size=(8, 8), mode="RGB", color=None, fmt=None, **save_args):
    """A small real image file at `path` (folders created)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if color is None:
        color = {"RGB": (200, 30, 60), "RGBA": (200, 30, 60, 128), "L": 90, "P": 3}[mode]
    Image.new(mode, size, color).save(path, format=fmt, **save_args)
    return path


# =================================================================================================
# The layer is torch-free
# =================================================================================================

def test_pure_data_modules_do_not_import_torch():
    code = ("import sys; import data.scan, data.captions, data.buckets, data.plan, data.image_io, data.items, "
            "data.image_config, data.report; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, "a pure data module imported torch\n" + result.stderr


# =================================================================================================
# find_images
# =================================================================================================

@pytest.mark.parametrize("name", ["a.jpg", "b.jpeg", "c.png", "d.bmp", "e.webp", "f.jfif",
                                  "g.JPG", "h.Png", "i.JPEG", "j.WebP", "k.BMP", "l.JFIF"])
def test_find_images_accepts_every_image_extension_in_any_case(tmp_path, name):
    (tmp_path / name).write_bytes(b"")  # found by name only; nothing is opened
    assert find_images(str(tmp_path)) == [str(tmp_path / name)]


def test_find_images_ignores_non_image_files(tmp_path):
    for name in ("a.txt", "a.caption", "settings.yaml", "train.json", "noext", "image.jpg.bak", "x.gif"):
        (tmp_path / name).write_text("x")
    make_image(str(tmp_path / "a.jpg"))
    assert find_images(str(tmp_path)) == [str(tmp_path / "a.jpg")]


def test_find_images_is_recursive(tmp_path):
    paths = [make_image(str(tmp_path / rel)) for rel in ("top.png", "sub/mid.png", "sub/deeper/low.png")]
    assert sorted(find_images(str(tmp_path))) == sorted(paths)


def test_find_images_skips_hidden_files_and_hidden_folders(tmp_path):
    visible = make_image(str(tmp_path / "sub" / "seen.png"))
    make_image(str(tmp_path / ".hidden.png"))
    make_image(str(tmp_path / "sub" / ".also_hidden.jpg"))
    make_image(str(tmp_path / ".cache" / "inside_hidden_folder.png"))
    make_image(str(tmp_path / "sub" / ".thumbs" / "deep" / "x.jpg"))
    assert find_images(str(tmp_path)) == [visible]


def test_find_images_is_sorted_and_deterministic(tmp_path):
    for rel in ("z.png", "a.png", "m/b.png", "m/a.png", "B.png", "c/z.jpg"):
        make_image(str(tmp_path / rel))
    first = find_images(str(tmp_path))
    assert first == sorted(first)
    assert len(first) == 6
    assert find_images(str(tmp_path)) == first


def test_find_images_of_an_empty_folder_is_empty(tmp_path):
    assert find_images(str(tmp_path)) == []


# =================================================================================================
# Captions
# =================================================================================================

@pytest.mark.parametrize("name, caption", [
    ("a photo of ted_(1).jpg", "a photo of ted"),
    ("a photo of ted_(2).jpg", "a photo of ted"),
    ("under_score.webp", "under"),
    ("plain caption.png", "plain caption"),
    ("folder/sub/a dog, running_3.jpeg", "a dog, running"),
])
def test_caption_from_filename(name, caption):
    assert caption_from_filename(name) == caption


def caption_of(image_path):
    """The caption the scan gives one image."""
    result = scan_dataset(os.path.dirname(image_path), 256)
    return next(item.caption for item in result.items if item.path == os.path.abspath(image_path))


def test_txt_sidecar_wins_over_the_file_name(tmp_path):
    image = make_image(str(tmp_path / "file name caption_1.png"), size=(64, 64))
    (tmp_path / "file name caption_1.txt").write_text("sidecar caption, tag", encoding="utf-8")
    assert caption_of(image) == "sidecar caption, tag"


def test_caption_sidecar_is_used_when_there_is_no_txt(tmp_path):
    image = make_image(str(tmp_path / "file name caption.png"), size=(64, 64))
    (tmp_path / "file name caption.caption").write_text("from the caption file", encoding="utf-8")
    assert caption_of(image) == "from the caption file"


def test_caption_falls_back_to_the_file_name_without_sidecar(tmp_path):
    image = make_image(str(tmp_path / "a red car_07.jpg"), size=(64, 64))
    assert caption_of(image) == "a red car"


def test_sidecar_caption_is_normalized(tmp_path):
    image = make_image(str(tmp_path / "x.png"), size=(64, 64))
    (tmp_path / "x.txt").write_text("  a cat ,\n  sitting   on a mat,, \n", encoding="utf-8")
    assert caption_of(image) == "a cat, sitting on a mat"


@pytest.mark.parametrize("text, expected", [
    ("a, b, c", "a, b, c"),
    ("  a  ,b ,   c  ", "a, b, c"),
    ("a,,b, ,c,", "a, b, c"),
    ("a photo\nof   ted,\n\ttag  one", "a photo of ted, tag one"),
    ("", ""),
    (" , , ", ""),
    ("single", "single"),
    ("a, b, b, c, a", "a, b, c, a"),  # a repeated tag counts once; a tag may equal the main prompt
])
def test_caption_text_round_trips_normalized(text, expected):
    config = parse_caption_text(text)
    main = config.main_prompts[0] if config.main_prompts else ""
    assert compose_caption(main, config.tags) == expected


def test_read_text_reads_utf8(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("café, naïve".encode("utf-8"))
    assert read_text(str(path)) == "café, naïve"


def test_read_text_strips_a_utf8_bom(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "bom caption".encode("utf-8"))
    assert read_text(str(path)) == "bom caption"


def test_read_text_falls_back_to_latin1_for_non_utf8_bytes(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("café über".encode("latin-1"))  # 0xE9 / 0xFC alone are invalid UTF-8
    assert read_text(str(path)) == "café über"


# =================================================================================================
# Buckets
# =================================================================================================

def extreme_pair(resolution):
    """The largest exact 4:1 shape on the 64-px grid within resolution² px, and its transpose."""
    height = max(h for h in range(GRID, resolution + 1, GRID) if 4 * h * h <= resolution * resolution)
    return (4 * height, height), (height, 4 * height)


@pytest.fixture(scope="module", params=SUPPORTED_RESOLUTIONS, ids=lambda r: f"res{r}")
def resolution_buckets(request):
    return request.param, generate_buckets(request.param)


def test_bucket_sides_are_multiples_of_64(resolution_buckets):
    _, buckets = resolution_buckets
    assert all(w % GRID == 0 and h % GRID == 0 and w > 0 and h > 0 for w, h in buckets)


def test_bucket_area_is_at_most_resolution_squared_and_at_least_90_percent(resolution_buckets):
    """Every bucket but the 4:1 pair keeps 90%+ of resolution²; the 4:1 pair keeps 64%+ (79%+ from 576 up)."""
    resolution, buckets = resolution_buckets
    area = resolution * resolution
    extremes = set(extreme_pair(resolution))
    assert all(w * h <= area for w, h in buckets)
    assert not [(w, h) for w, h in buckets if (w, h) not in extremes and w * h < AREA_FLOOR * area]
    floor = 0.79 if resolution >= 576 else 0.64
    assert all(w * h >= floor * area for w, h in extremes)


def test_each_bucket_is_the_widest_grid_shape_for_its_short_side(resolution_buckets):
    """One bucket per short side, as wide as the area allows (brute force: one grid step more is too big)."""
    resolution, buckets = resolution_buckets
    landscape = [(w, h) for w, h in buckets if w >= h and (w, h) != extreme_pair(resolution)[0]]
    assert len({h for _, h in landscape}) == len(landscape)
    for w, h in landscape:
        assert (w + GRID) * h > resolution * resolution, (w, h)


def test_bucket_aspect_ratio_is_between_1_to_4_and_4_to_1(resolution_buckets):
    _, buckets = resolution_buckets
    assert all(1 / 4 <= w / h <= 4 for w, h in buckets)


def test_buckets_are_closed_under_transposition(resolution_buckets):
    _, buckets = resolution_buckets
    assert {(h, w) for w, h in buckets} == set(buckets)


def test_buckets_have_no_duplicates(resolution_buckets):
    _, buckets = resolution_buckets
    assert len(buckets) == len(set(buckets))


def test_buckets_contain_the_square(resolution_buckets):
    resolution, buckets = resolution_buckets
    assert (resolution, resolution) in buckets


def test_buckets_contain_exactly_4_to_1_and_1_to_4_at_every_resolution(resolution_buckets):
    """The promised range, 1:4 to 4:1, is always covered: the extremes are the largest exact 4:1 shapes."""
    resolution, buckets = resolution_buckets
    wide, tall = extreme_pair(resolution)
    assert wide in buckets and tall in buckets
    assert max(w / h for w, h in buckets) == 4 and min(w / h for w, h in buckets) == 1 / 4


def test_buckets_for_512_include_the_4_to_1_pair():
    buckets = generate_buckets(512)
    assert (1024, 256) in buckets and (256, 1024) in buckets


def test_generate_buckets_rejects_a_resolution_off_the_grid():
    with pytest.raises(ValueError):
        generate_buckets(500)


@pytest.mark.parametrize("resolution", SUPPORTED_RESOLUTIONS)
def test_nearest_bucket_of_a_square_image_is_the_square_bucket(resolution):
    buckets = generate_buckets(resolution)
    for side in (10, 512, 3000):
        assert nearest_bucket(side, side, buckets) == (resolution, resolution)


@pytest.mark.parametrize("resolution", SUPPORTED_RESOLUTIONS)
@pytest.mark.parametrize("long_side, short_side", [(2000, 1000), (1500, 1000), (4000, 1000), (1000, 999),
                                                   (7000, 1000)])
def test_nearest_bucket_is_symmetric_in_log_aspect(resolution, long_side, short_side):
    """A w:h and an h:w image get transposed buckets (2:1 and 1:2 among them)."""
    buckets = generate_buckets(resolution)
    w, h = nearest_bucket(long_side, short_side, buckets)
    assert w >= h
    assert nearest_bucket(short_side, long_side, buckets) == (h, w)


def test_nearest_bucket_of_2_to_1_and_1_to_2_at_512_are_transposed():
    """At 512, 768x320 (2.4:1) and 640x384 (1.67:1) are equally far from 2:1 in log aspect (x1.2 either
    way) and have the same area: whichever wins, 1:2 must get the transposed bucket."""
    buckets = generate_buckets(512)
    w, h = nearest_bucket(2000, 1000, buckets)
    assert nearest_bucket(1000, 2000, buckets) == (h, w)


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024, 1344, 2048])
def test_nearest_bucket_minimises_log_aspect_distance(resolution):
    buckets = generate_buckets(resolution)
    sides = [37, 100, 199, 256, 333, 480, 512, 640, 777, 1000, 1234, 2048, 3000]
    for width, height in itertools.product(sides, sides):
        chosen = nearest_bucket(width, height, buckets)
        assert chosen in buckets
        target = math.log(width / height)
        best = min(abs(math.log(w / h) - target) for w, h in buckets)
        assert abs(math.log(chosen[0] / chosen[1]) - target) <= best + 1e-12, (width, height, chosen)


# =================================================================================================
# The epoch plan
# =================================================================================================

PLAN_BUCKETS = ([(512, 512)] * 11 + [(640, 384)] * 7 + [(384, 640)] * 4 + [(1024, 256)] * 1)
PLAN_BUCKETS = PLAN_BUCKETS[::2] + PLAN_BUCKETS[1::2]  # interleave so buckets are not contiguous runs


def make_items(buckets, **settings):
    """Images with the given buckets (no files needed: the plan reads no file)."""
    return [ImageItem(f"/data/{i}.jpg", bucket, bucket, main_prompt=f"image {i}", **settings)
            for i, bucket in enumerate(buckets)]


PLAN_ITEMS = make_items(PLAN_BUCKETS)


def plan(items, epoch=0, **options):
    options.setdefault("seed", 7)
    options.setdefault("batch_size", 2)
    return plan_epoch(items, epoch, PlanOptions(**options))


def flat(batches):
    return [sample for batch in batches for sample in batch]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 16])
def test_plan_has_every_image_exactly_once(batch_size):
    batches = plan(PLAN_ITEMS, 3, batch_size=batch_size)
    assert sorted(s.index for s in flat(batches)) == list(range(len(PLAN_BUCKETS)))


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_each_batch_holds_one_bucket_and_the_samples_bucket_is_the_images(batch_size):
    for batch in plan(PLAN_ITEMS, batch_size=batch_size):
        assert len({s.bucket for s in batch}) == 1
        for s in batch:
            assert s.bucket == PLAN_BUCKETS[s.index]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 5, 16])
def test_batch_sizes_are_bounded_and_at_most_one_short_batch_per_bucket(batch_size):
    batches = plan(PLAN_ITEMS, 2, seed=11, batch_size=batch_size)
    assert all(1 <= len(batch) <= batch_size for batch in batches)
    short = Counter(batch[0].bucket for batch in batches if len(batch) < batch_size)
    assert all(count <= 1 for count in short.values())
    for bucket, count in Counter(PLAN_BUCKETS).items():  # the number of batches is the minimum possible
        assert sum(1 for batch in batches if batch[0].bucket == bucket) == math.ceil(count / batch_size)


def test_plan_is_a_pure_function_of_its_inputs():
    args = dict(seed=5, batch_size=3, flip_p=0.5, cond_dropout=0.2, shuffle_tags=True)
    assert plan(list(PLAN_ITEMS), 4, **args) == plan(list(PLAN_ITEMS), 4, **args)


def test_plan_does_not_modify_its_input():
    items = list(PLAN_ITEMS)
    plan(items, 1, seed=5, batch_size=3)
    assert items == PLAN_ITEMS


def test_a_different_epoch_gives_a_different_order():
    orders = {tuple(s.index for s in flat(plan(PLAN_ITEMS, e, seed=5))) for e in range(4)}
    assert len(orders) == 4


def test_a_different_seed_gives_a_different_order():
    assert [s.index for s in flat(plan(PLAN_ITEMS, seed=1))] != [s.index for s in flat(plan(PLAN_ITEMS, seed=2))]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_sample_decisions_do_not_depend_on_order_or_batching(batch_size):
    options = PlanOptions(seed=13, batch_size=batch_size, flip_p=0.5, cond_dropout=0.3, shuffle_tags=True)
    for sample in flat(plan_epoch(PLAN_ITEMS, 6, options)):
        assert sample == plan_sample(PLAN_ITEMS, sample.index, sample.copy, 6, options)


def test_sample_decisions_change_with_the_epoch():
    options = PlanOptions(seed=1, batch_size=1, flip_p=0.5, cond_dropout=0.5)
    items = make_items([(512, 512)] * 50)
    a = [plan_sample(items, i, 0, 0, options) for i in range(50)]
    b = [plan_sample(items, i, 0, 1, options) for i in range(50)]
    assert [(s.crop_x, s.crop_y) for s in a] != [(s.crop_x, s.crop_y) for s in b]


def rate(values):
    return sum(values) / len(values)


def within_binomial_bound(observed, p, n, sigmas=5.0):
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("flip_p, cond_dropout", [(0.5, 0.04), (0.3, 0.1), (0.9, 0.5)])
def test_flip_and_caption_dropout_rates_match_their_probabilities(flip_p, cond_dropout):
    n = 5000
    samples = flat(plan(make_items([(512, 512)] * n), seed=21, batch_size=8, flip_p=flip_p,
                        cond_dropout=cond_dropout))
    assert within_binomial_bound(rate([s.flip for s in samples]), flip_p, n)
    assert within_binomial_bound(rate([s.caption == "" for s in samples]), cond_dropout, n)


@pytest.mark.parametrize("p, expected", [(0.0, False), (1.0, True)])
def test_flip_and_caption_dropout_are_exact_at_zero_and_one(p, expected):
    samples = flat(plan(make_items([(512, 512)] * 500), 2, seed=3, batch_size=4, flip_p=p, cond_dropout=p))
    assert all(s.flip is expected for s in samples)
    assert all((s.caption == "") is expected for s in samples)


def test_plan_defaults_never_flip_nor_drop_captions():
    samples = flat(plan(make_items([(512, 512)] * 200), seed=3, batch_size=4))
    assert not any(s.flip or s.caption == "" for s in samples)


def test_crop_offsets_are_in_the_unit_interval_and_centre_biased():
    samples = flat(plan(make_items([(512, 512)] * 3000), 1, seed=9, batch_size=4))
    xs = [s.crop_x for s in samples]
    ys = [s.crop_y for s in samples]
    assert all(0.0 <= v <= 1.0 for v in xs + ys)
    # triangular(0, 1, 0.5): mean 0.5, standard deviation sqrt(1/24)
    bound = 5 * math.sqrt(1 / 24 / len(xs))
    assert abs(rate(xs) - 0.5) < bound and abs(rate(ys) - 0.5) < bound
    assert all(0.0 <= j < 1.0 for s in samples for j in s.jitter)


def test_plan_of_no_images_is_empty():
    assert plan([], batch_size=4) == []


def test_sample_is_immutable():
    sample = plan_sample(PLAN_ITEMS, 0, 0, 0, PlanOptions(seed=0, batch_size=1))
    assert isinstance(sample, Sample)
    with pytest.raises(AttributeError):
        sample.flip = True


# =================================================================================================
# Image reading: crop box, EXIF size, loading
# =================================================================================================

CROP_CASES = [
    (1000, 500, (512, 512)),   # wider than the bucket
    (500, 1000, (512, 512)),   # taller
    (1000, 500, (1024, 256)),  # image less wide than a 4:1 bucket: trim top and bottom
    (333, 777, (384, 640)),
    (777, 333, (640, 384)),
    (640, 384, (640, 384)),    # exactly the bucket
    (101, 99, (320, 192)),
]


@pytest.mark.parametrize("width, height, bucket", CROP_CASES)
@pytest.mark.parametrize("crop_x, crop_y", [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (0.2, 0.9)])
def test_crop_box_is_inside_the_image_with_the_buckets_aspect(width, height, bucket, crop_x, crop_y):
    left, top, right, bottom = crop_box(width, height, bucket, crop_x, crop_y)
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    box_w, box_h = right - left, bottom - top
    bucket_w, bucket_h = bucket
    # the largest such box: one side is the image's whole side, the other follows the aspect (1 px rounding)
    if box_h == height:
        assert abs(box_w - height * bucket_w / bucket_h) <= 1
    else:
        assert box_w == width
        assert abs(box_h - width * bucket_h / bucket_w) <= 1


@pytest.mark.parametrize("width, height, bucket", CROP_CASES)
def test_crop_box_is_centred_for_half(width, height, bucket):
    left, top, right, bottom = crop_box(width, height, bucket, 0.5, 0.5)
    assert abs(left - (width - right)) <= 1
    assert abs(top - (height - bottom)) <= 1


@pytest.mark.parametrize("width, height, bucket", CROP_CASES)
def test_crop_box_touches_the_edges_for_zero_and_one(width, height, bucket):
    left, top, _, _ = crop_box(width, height, bucket, 0.0, 0.0)
    assert (left, top) == (0, 0)
    _, _, right, bottom = crop_box(width, height, bucket, 1.0, 1.0)
    assert (right, bottom) == (width, height)


def test_crop_box_for_a_wide_image_in_a_square_bucket():
    assert crop_box(300, 100, (64, 64), 0.0, 0.5) == (0, 0, 100, 100)
    assert crop_box(300, 100, (64, 64), 0.5, 0.5) == (100, 0, 200, 100)
    assert crop_box(300, 100, (64, 64), 1.0, 0.5) == (200, 0, 300, 100)


def save_with_orientation(path, size, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return make_image(path, size=size, exif=exif)


def test_read_image_size_swaps_for_exif_orientation_6(tmp_path):
    path = save_with_orientation(str(tmp_path / "rotated.jpg"), (40, 20), 6)
    with Image.open(path) as image:
        assert image.size == (40, 20)  # stored landscape ...
    assert read_image_size(path) == (20, 40)  # ... displayed portrait


def test_read_image_size_keeps_the_size_for_exif_orientation_1(tmp_path):
    path = save_with_orientation(str(tmp_path / "upright.jpg"), (40, 20), 1)
    assert read_image_size(path) == (40, 20)


def test_read_image_size_without_exif(tmp_path):
    assert read_image_size(make_image(str(tmp_path / "a.png"), size=(33, 17))) == (33, 17)


def test_load_image_rotates_per_exif(tmp_path):
    path = save_with_orientation(str(tmp_path / "rotated.jpg"), (64, 32), 6)
    assert load_image(path, (16, 32), 0.5, 0.5, False).shape == (32, 16, 3)


@pytest.mark.parametrize("bucket", [(64, 64), (128, 64), (64, 192)])
def test_load_image_returns_uint8_rgb_of_the_bucket_size(tmp_path, bucket):
    path = make_image(str(tmp_path / "a.png"), size=(150, 90))
    pixels = load_image(path, bucket, 0.5, 0.5, False)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (bucket[1], bucket[0], 3)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_load_image_converts_other_modes_to_rgb(tmp_path, mode):
    path = make_image(str(tmp_path / f"{mode}.png"), size=(40, 40), mode=mode)
    pixels = load_image(path, (32, 32), 0.5, 0.5, False)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    if mode == "L":  # grey stays grey: the three channels are equal
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
        assert (pixels == 90).all()


def test_load_image_flip_mirrors_left_right(tmp_path):
    noise = np.random.RandomState(0).randint(0, 256, size=(24, 48, 3), dtype=np.uint8)
    path = str(tmp_path / "asym.png")
    Image.fromarray(noise).save(path)
    plain = load_image(path, (32, 16), 0.3, 0.7, False)
    flipped = load_image(path, (32, 16), 0.3, 0.7, True)
    assert not np.array_equal(plain, np.fliplr(plain))  # the test image is asymmetric
    assert np.array_equal(flipped, np.fliplr(plain))


def test_load_image_at_the_buckets_size_keeps_the_pixels(tmp_path):
    noise = np.random.RandomState(1).randint(0, 256, size=(16, 32, 3), dtype=np.uint8)
    path = str(tmp_path / "exact.png")
    Image.fromarray(noise).save(path)
    assert np.array_equal(load_image(path, (32, 16), 0.5, 0.5, False), noise)


@pytest.mark.parametrize("crop_x, colour", [(0.0, (255, 0, 0)), (1.0, (0, 0, 255))])
def test_load_image_crop_position_selects_the_part_of_the_image(tmp_path, crop_x, colour):
    left_red_right_blue = np.zeros((100, 300, 3), dtype=np.uint8)
    left_red_right_blue[:, :100] = (255, 0, 0)
    left_red_right_blue[:, 200:] = (0, 0, 255)
    path = str(tmp_path / "halves.png")
    Image.fromarray(left_red_right_blue).save(path)
    pixels = load_image(path, (64, 64), crop_x, 0.5, False)
    assert (pixels == np.array(colour, dtype=np.uint8)).all()


# =================================================================================================
# scan_dataset
# =================================================================================================

def test_scan_dataset_items_have_absolute_paths_captions_and_buckets(tmp_path, monkeypatch):
    make_image(str(tmp_path / "data" / "a square cat_1.png"), size=(300, 300))
    make_image(str(tmp_path / "data" / "sub" / "wide.jpg"), size=(600, 200))
    (tmp_path / "data" / "sub" / "wide.txt").write_text("a wide  landscape,\n sunset")
    monkeypatch.chdir(tmp_path)
    result = scan_dataset("data", 512)  # relative root
    items = result.items
    assert result.skipped == []
    by_name = {os.path.basename(item.path): item for item in items}
    assert set(by_name) == {"a square cat_1.png", "wide.jpg"}
    for item in items:
        assert os.path.isabs(item.path) and os.path.isfile(item.path)
    square, wide = by_name["a square cat_1.png"], by_name["wide.jpg"]
    assert square.caption == "a square cat"
    assert square.size == (300, 300) and square.bucket == (512, 512)
    assert wide.caption == "a wide landscape, sunset"
    assert wide.size == (600, 200)
    buckets = generate_buckets(512)
    assert wide.bucket in buckets
    best = min(abs(math.log(w / h) - math.log(3)) for w, h in buckets)
    assert abs(math.log(wide.bucket[0] / wide.bucket[1]) - math.log(3)) == pytest.approx(best)


def test_scan_dataset_uses_the_displayed_size_of_rotated_images(tmp_path):
    save_with_orientation(str(tmp_path / "portrait.jpg"), (400, 200), 6)
    items = scan_dataset(str(tmp_path), 512).items
    assert items[0].size == (200, 400)
    assert items[0].bucket[0] < items[0].bucket[1]


def test_scan_dataset_skips_unreadable_files_with_a_reason_and_scans_the_rest(tmp_path):
    good = make_image(str(tmp_path / "good.png"), size=(64, 64))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    other = make_image(str(tmp_path / "z" / "other.webp"), size=(128, 64))
    result = scan_dataset(str(tmp_path), 256)
    items, skipped = result.items, result.skipped
    assert sorted(item.path for item in items) == sorted(os.path.abspath(p) for p in (good, other))
    assert {os.path.basename(s.path) for s in skipped} == {"empty.png", "notes.jpg"}
    for s in skipped:
        assert s.reason and isinstance(s.reason, str)


def test_scan_dataset_of_a_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    result = scan_dataset(str(tmp_path), 512)
    assert result.items == [] and result.skipped == []
