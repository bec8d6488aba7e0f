"""The bundled example images: made by the script in the repo, in the aspect ratios the demo needs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from data.buckets import generate_buckets, nearest_bucket
from data.items import scan_dataset
from examples.make_example_images import EXAMPLES, make_example_images

IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"


def test_the_script_recreates_the_bundled_images(tmp_path):
    written = make_example_images(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(IMAGES))
    for path in written:
        bundled = IMAGES / os.path.basename(path)
        fresh, kept = np.asarray(Image.open(path), dtype=float), np.asarray(Image.open(bundled), dtype=float)
        assert fresh.shape == kept.shape
        if path.endswith(".png"):
            assert np.array_equal(fresh, kept), path
        else:  # JPEG encoders may differ by a level here and there
            assert np.abs(fresh - kept).mean() < 1.0, path
    for name in os.listdir(tmp_path):
        if name.endswith(".txt"):
            assert (tmp_path / name).read_text() == (IMAGES / name).read_text()


def test_examples_cover_the_demo_aspect_ratios_and_caption_sources():
    ratios = {round(w / h, 2) for _, _, (w, h), _ in EXAMPLES}
    assert {1.0, 1.5, 0.67, 1.78, 4.0, 0.25} <= ratios
    assert len(EXAMPLES) >= 12
    assert any(sidecar for _, sidecar, _, _ in EXAMPLES) and any(not sidecar for _, sidecar, _, _ in EXAMPLES)
    names = [name for name, _, _, _ in EXAMPLES]
    assert any("_(1)" in n for n in names) and any("_(2)" in n for n in names)  # the shared-caption rule


def test_examples_scan_into_five_buckets_at_the_demo_resolution():
    result = scan_dataset(str(IMAGES), 256)
    items, skipped = result.items, result.skipped
    assert not skipped and len(items) == len(EXAMPLES)
    assert {item.bucket for item in items} == {(256, 256), (320, 192), (192, 320), (512, 128), (128, 512)}
    squares = [item.caption for item in items if "yellow square" in item.caption]
    assert squares == ["a yellow square on a green background"] * 2  # `_(1)` and `_(2)` dropped
    assert "a sunset over the sea, orange sky, horizon" in [item.caption for item in items]  # from sunset.txt
    buckets = generate_buckets(256)
    for item in items:  # none is smaller than its bucket, so none is upscaled
        assert item.size[0] >= item.bucket[0] and item.size[1] >= item.bucket[1]
        assert nearest_bucket(*item.size, buckets) == item.bucket
