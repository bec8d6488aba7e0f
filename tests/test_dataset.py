"""The torch dataset and loader: pixels in the VAE's range, planned batches, and workers-invariance."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import EpochBatches, PlannedImages, make_loader, to_model_input
from data.image_io import crop_box
from data.items import ImageItem
from data.plan import PlanOptions, plan_epoch


def test_to_model_input_maps_0_to_minus_1_and_255_to_1():
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0] = 255
    out = to_model_input(pixels)
    assert out.shape == (3, 2, 3)
    assert out.dtype == torch.float32
    assert torch.all(out[:, 0] == 1.0) and torch.all(out[:, 1] == -1.0)


def test_to_model_input_is_linear_and_moves_channels_first():
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, size=(5, 7, 3), dtype=np.uint8)
    out = to_model_input(pixels)
    assert out.shape == (3, 5, 7)
    expected = torch.tensor(pixels.astype(np.float64) / 127.5 - 1.0).permute(2, 0, 1)
    assert torch.allclose(out.double(), expected, atol=1e-6)
    assert out.min() >= -1.0 and out.max() <= 1.0


def _make_items(folder, count=10):
    """Asymmetric noise images of several shapes, each with its own caption and bucket."""
    rng = np.random.RandomState(42)
    shapes_buckets = [((48, 48), (32, 32)), ((96, 48), (64, 32)), ((40, 90), (32, 64))]
    items = []
    for i in range(count):
        size, bucket = shapes_buckets[i % len(shapes_buckets)]
        pixels = rng.randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = os.path.join(folder, f"img{i:02d}.png")
        Image.fromarray(pixels).save(path)
        items.append(ImageItem(path, size, bucket, main_prompt=f"caption {i}", loss_scale=1.0 + i))
    return items


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return _make_items(str(tmp_path_factory.mktemp("images")))


def plan(items, epoch=0, **options):
    options.setdefault("cond_dropout", 0.0)
    return plan_epoch(items, epoch, PlanOptions(**options))


def _epoch(items, loader, batches, epoch, **plan_args):
    batches.set_plan(plan(items, epoch, seed=3, batch_size=3, **plan_args))
    return list(loader)


def test_planned_images_item_follows_its_sample(items):
    sample = plan(items, seed=1, batch_size=1, cond_dropout=1.0)[0][0]
    got = PlannedImages(items)[sample]
    w, h = items[sample.index].bucket
    assert got["pixels"].shape == (3, h, w)
    assert got["caption"] == "" and got["index"] == sample.index
    assert got["loss_scale"] == items[sample.index].loss_scale


def test_loader_yields_planned_batches_of_bucket_size(items):
    batches = EpochBatches()
    loader = make_loader(items, batches, num_workers=0, pin_memory=False)
    planned_batches = plan(items, seed=3, batch_size=3, flip_p=0.5)
    batches.set_plan(planned_batches)
    got = list(loader)
    assert len(got) == len(planned_batches) == len(batches)
    for batch, planned in zip(got, planned_batches):
        w, h = planned[0].bucket
        assert batch["pixels"].shape == (len(planned), 3, h, w)
        assert batch["pixels"].dtype == torch.float32
        assert batch["indices"] == [s.index for s in planned]
        assert batch["captions"] == [items[s.index].caption for s in planned]
        assert batch["loss_scale"].tolist() == [items[s.index].loss_scale for s in planned]
    assert sorted(i for batch in got for i in batch["indices"]) == list(range(len(items)))


def test_loader_gives_empty_captions_for_dropped_samples(items):
    batches = EpochBatches()
    loader = make_loader(items, batches, num_workers=0, pin_memory=False)
    planned_batches = plan(items, seed=3, batch_size=3, cond_dropout=0.5)
    dropped = {s.index for batch in planned_batches for s in batch if s.caption == ""}
    assert 0 < len(dropped) < len(items)  # the plan mixes both cases
    batches.set_plan(planned_batches)
    for batch in loader:
        for index, caption in zip(batch["indices"], batch["captions"]):
            assert caption == ("" if index in dropped else items[index].caption)


def test_loader_pixels_are_the_planned_crop_and_flip(items):
    batches = EpochBatches()
    loader = make_loader(items, batches, num_workers=0, pin_memory=False)
    planned_batches = plan(items, 1, seed=8, batch_size=2, flip_p=0.5)
    batches.set_plan(planned_batches)
    for batch, planned in zip(loader, planned_batches):
        for pixels, s in zip(batch["pixels"], planned):
            with Image.open(items[s.index].path) as image:
                box = crop_box(*image.size, s.bucket, s.crop_x, s.crop_y, jitter=s.jitter)  # the planned crop
                expected = image.convert("RGB").crop(box).resize(s.bucket, Image.Resampling.LANCZOS)
            expected = np.array(expected)
            if s.flip:
                expected = expected[:, ::-1].copy()
            assert torch.equal(pixels, to_model_input(expected))


def test_loader_follows_a_new_plan_each_epoch(items):
    batches = EpochBatches()
    loader = make_loader(items, batches, num_workers=0, pin_memory=False)
    first = [b["indices"] for b in _epoch(items, loader, batches, 0)]
    second = [b["indices"] for b in _epoch(items, loader, batches, 1)]
    assert first != second
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(len(items)))


def test_batches_are_identical_with_0_and_2_workers(items):
    """Workers only carry out the plan: the same epoch gives the same batches whatever num_workers is."""
    results = {}
    for num_workers in (0, 2):
        batches = EpochBatches()
        loader = make_loader(items, batches, num_workers=num_workers, pin_memory=False)
        try:
            results[num_workers] = [_epoch(items, loader, batches, epoch, flip_p=0.5, cond_dropout=0.3)
                                    for epoch in (0, 1)]  # two epochs: persistent workers see the new plan
        finally:
            del loader
    for serial, parallel in zip(results[0], results[2]):
        assert len(serial) == len(parallel)
        for a, b in zip(serial, parallel):
            assert a["indices"] == b["indices"]
            assert a["captions"] == b["captions"]
            assert torch.equal(a["pixels"], b["pixels"])
