"""Latent and text-embedding caching: fixed crops in the plan, the on-disk VAE posterior cache, the dataset
reading from it, and the in-memory text-embedding cache. CPU, on the tiny model."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import pickle
import shutil

import pytest
import torch

from data.captions import Tag
from data.dataset import EpochBatches, PlannedImages, load_pixels, make_loader
from data.image_io import read_image_size
from data.items import ImageItem
from data.plan import PlanOptions, image_variants, plan_epoch, plan_sample
from utils.latent_cache import (LatentCache, MissingLatents, TextEmbeddingCache, fill_latent_cache,
                                posterior_from, weights_digest)
from utils.model_family import SD1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples", "images")


def flat(batches):
    return [sample for batch in batches for sample in batch]


# =================================================================================================
# The plan with fixed crops (pure: no files, no model)
# =================================================================================================

def plan_items(count=24, **settings):
    buckets = [(512, 512), (640, 384), (384, 640)]
    return [ImageItem(f"/data/{i}.jpg", (700, 700), buckets[i % 3], main_prompt=f"image {i}",
                      tags=(Tag("red"), Tag("blue", 2.0)), **settings) for i in range(count)]


def test_fixed_crops_are_the_same_in_every_epoch_and_copy():
    items = plan_items(multiply=2.0)
    options = PlanOptions(seed=4, batch_size=3, flip_p=0.5, max_epochs=5, fixed_crops=True)
    crops: dict[int, set] = {}
    for epoch in range(5):
        for s in flat(plan_epoch(items, epoch, options)):
            crops.setdefault(s.index, set()).add((s.crop_x, s.crop_y, s.jitter))
    assert all(len(found) == 1 for found in crops.values())
    assert len({found.pop() for found in crops.values()}) == len(items)  # still drawn per image


def test_fixed_crops_leave_order_flips_and_captions_as_they_were():
    items = plan_items()
    args = dict(seed=9, batch_size=4, flip_p=0.5, cond_dropout=0.3, shuffle_tags=True)
    for epoch in (0, 3):
        free = flat(plan_epoch(items, epoch, PlanOptions(**args)))
        fixed = flat(plan_epoch(items, epoch, PlanOptions(**args, fixed_crops=True)))
        assert [(s.index, s.flip, s.caption) for s in free] == [(s.index, s.flip, s.caption) for s in fixed]


def test_fixed_crops_follow_the_image_not_its_place_in_the_list_or_the_data_root():
    items = plan_items()
    options = PlanOptions(seed=4, batch_size=3, fixed_crops=True, data_roots=("/data",))
    crops = {v.index: (v.crop_x, v.crop_y, v.jitter) for v in image_variants(items, options)}
    added = [ImageItem("/data/00 new.jpg", (700, 700), (512, 512))] + items  # sorts first: every index moves
    crops_after = {v.index - 1: (v.crop_x, v.crop_y, v.jitter) for v in image_variants(added, options) if v.index}
    assert crops_after == crops
    moved = [dataclasses.replace(item, path=item.path.replace("/data/", "/mnt/disk/set/")) for item in items]
    moved_options = dataclasses.replace(options, data_roots=("/mnt/disk/set",))
    assert {v.index: (v.crop_x, v.crop_y, v.jitter) for v in image_variants(moved, moved_options)} == crops


def test_image_variants_cover_every_sample_of_a_run():
    items = plan_items(multiply=1.5) + [ImageItem("/data/never.jpg", (700, 700), (512, 512), multiply=0.0)]
    items[0] = ImageItem("/data/flipped.jpg", (700, 700), (512, 512), flip_p=1.0)
    items[1] = ImageItem("/data/upright.jpg", (700, 700), (512, 512), flip_p=0.0)
    options = PlanOptions(seed=2, batch_size=2, flip_p=0.5, max_epochs=8, fixed_crops=True)
    variants = image_variants(items, options)
    trained = {s.variant for epoch in range(8) for s in flat(plan_epoch(items, epoch, options))}
    assert trained == set(variants)  # eight epochs at flip_p 0.5 meet both sides of every image
    assert len(variants) == len(set(variants)) == 2 * (len(items) - 3) + 2
    assert [v.flip for v in variants if v.index in (0, 1)] == [True, False]
    assert all(v.index != len(items) - 1 for v in variants)  # multiply 0 never trains


def test_without_fixed_crops_the_plan_is_unchanged():
    items = [ImageItem(f"/data/{i}.jpg", (700, 700), b, main_prompt=f"image {i}",
                       tags=(Tag("red"), Tag("blue", 2.0), Tag("green")), multiply=1.5 if i % 3 == 0 else 1.0,
                       flip_p=0.9 if i % 5 == 0 else None)
             for i, b in enumerate([(512, 512), (640, 384), (384, 640), (512, 512), (1024, 256)] * 4)]
    options = PlanOptions(seed=11, batch_size=3, flip_p=0.5, cond_dropout=0.2, shuffle_tags=True, max_epochs=4)
    values = [[[(s.index, s.copy, s.bucket, s.crop_x, s.crop_y, s.jitter, s.flip, s.caption, s.loss_scale)
                for s in batch] for batch in plan_epoch(items, epoch, options)] for epoch in range(4)]
    # Recorded before fixed_crops existed (repr keeps every float exactly): the streams draw the same numbers.
    assert hashlib.sha1(repr(values).encode()).hexdigest() == "87c487e33caf5b5e09deb6048d78f84b681b9e0b"
    a, b = (plan_sample(items, 1, 0, epoch, options) for epoch in (0, 1))
    assert (a.crop_x, a.crop_y) != (b.crop_x, b.crop_y)


# =================================================================================================
# The latent cache (tiny VAE)
# =================================================================================================

IMAGES = [  # (file, bucket, flip_p): two buckets with two images each, and one alone in a third
    ("a red circle on a blue background.png", (64, 64), None),
    ("a yellow square on a green background_(1).jpg", (64, 64), 1.0),
    ("orange stripes, striped pattern, abstract.jpg", (96, 64), None),
    ("triangle.png", (96, 64), 0.0),
    ("tower.jpg", (64, 96), None),
]
OPTIONS = PlanOptions(seed=5, batch_size=2, flip_p=0.5, max_epochs=3, fixed_crops=True)


def copy_images(folder) -> list[ImageItem]:
    """Items over copies of example images (so a test may delete or damage them), at small buckets."""
    items = []
    for name, bucket, flip_p in IMAGES:
        path = os.path.join(folder, name)
        shutil.copyfile(os.path.join(EXAMPLES, name), path)
        items.append(ImageItem(path, read_image_size(path), bucket, main_prompt=name, flip_p=flip_p))
    return items


@pytest.fixture(scope="module")
def vae(tiny):
    return tiny["vae"]


@pytest.fixture(scope="module")
def filled(vae, tmp_path_factory):
    """Items, their variants, and a cache filled with every variant."""
    items = copy_images(tmp_path_factory.mktemp("images"))
    variants = image_variants(items, OPTIONS)
    cache = LatentCache.open(str(tmp_path_factory.mktemp("cache")), vae, items)
    result = fill_latent_cache(cache, items, variants, vae, "cpu", batch_size=8, progress=False)
    return items, variants, cache, result


def test_fill_encodes_every_variant_once(filled):
    items, variants, cache, result = filled
    assert len(variants) == 8  # two sides of three images, one of the others
    assert (result.encoded, result.reused, result.failed) == (8, 0, [])
    files = [os.path.join(root, f) for root, _, names in os.walk(cache.folder) for f in names]
    assert sorted(files) == sorted(cache.entry_path(items[v.index].path, v) for v in variants)
    assert all(os.path.basename(os.path.dirname(f)) == os.path.basename(f)[:2] for f in files)


def test_cached_parameters_sample_the_latents_the_vae_gives(filled, vae):
    items, variants, cache, _ = filled
    for bucket in {v.bucket for v in variants}:
        group = [v for v in variants if v.bucket == bucket]  # as the fill batched them: same batch, same maths
        params = torch.stack([cache.load(items[v.index].path, v) for v in group])
        pixels = torch.stack([load_pixels(items[v.index].path, v) for v in group])
        with torch.no_grad():
            expected = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(3))
        assert params.dtype == torch.float32
        assert torch.equal(posterior_from(params).sample(torch.Generator().manual_seed(3)), expected)


def test_cached_parameters_match_a_different_batching_closely(filled, vae):
    items, variants, cache, _ = filled
    v = variants[0]
    with torch.no_grad():
        alone = vae.encode(load_pixels(items[v.index].path, v)[None]).latent_dist.parameters[0]
    # CPU convolutions pick their kernels by batch size, so the last bits differ between batchings.
    assert torch.allclose(cache.load(items[v.index].path, v), alone, atol=1e-5)


def test_a_second_fill_reuses_every_entry(filled, vae):
    items, variants, cache, _ = filled
    again = LatentCache.open(cache.folder, vae, items)
    result = fill_latent_cache(again, items, variants, vae, "cpu", batch_size=8, progress=False)
    assert (result.encoded, result.reused, result.failed) == (0, len(variants), [])


def test_an_added_image_is_the_only_one_encoded(filled, vae):
    items, variants, cache, _ = filled
    folder = os.path.dirname(items[0].path)
    new = os.path.join(folder, "0 added first.png")
    shutil.copyfile(items[0].path, new)  # the same pixels, but another image: its own crop and entries
    more = [ImageItem(new, read_image_size(new), (64, 96), main_prompt="added")] + items
    try:
        again = LatentCache.open(cache.folder, vae, more)
        result = fill_latent_cache(again, more, image_variants(more, OPTIONS), vae, "cpu", batch_size=8,
                                   progress=False)
    finally:
        os.remove(new)
    assert (result.encoded, result.reused, result.failed) == (2, len(variants), [])  # its two sides


def test_the_fill_keeps_pace_with_the_other_processes_batch_by_batch(filled, vae, tmp_path):
    """keep_pace(True) after each batch, then keep_pace(False) until no process is encoding (here the
    others finish two calls later); with the whole share already cached, only the waiting calls."""
    items, variants, cache, _ = filled
    calls, others_encoding = [], [True, True, False]

    def keep_pace(encoding: bool) -> bool:
        calls.append(encoding)
        return True if encoding else others_encoding[len([c for c in calls if not c]) - 1]

    empty = LatentCache.open(str(tmp_path / "empty"), vae, items)
    fill_latent_cache(empty, items, variants, vae, "cpu", batch_size=1, progress=False, keep_pace=keep_pace)
    assert calls == [True] * len(variants) + [False] * 3  # batch 1: a batch per variant
    calls.clear()
    full = LatentCache.open(cache.folder, vae, items)
    fill_latent_cache(full, items, variants, vae, "cpu", batch_size=1, progress=False, keep_pace=keep_pace)
    assert calls == [False] * 3


def test_a_process_that_cannot_write_its_entries_keeps_pace_until_the_others_are_done_then_raises(
        filled, vae, tmp_path, monkeypatch):
    """The disk full: the error is raised only once no process is encoding any more, so none waits for this
    one in keep_pace (train.py then stops every process together)."""
    import errno

    items, variants, _, _ = filled
    calls, others_encoding = [], [True, True, False]

    def keep_pace(encoding: bool) -> bool:
        calls.append(encoding)
        return True if encoding else others_encoding[len([c for c in calls if not c]) - 1]

    def disk_full(self, path, variant, params):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LatentCache, "save", disk_full)
    empty = LatentCache.open(str(tmp_path / "empty"), vae, items)
    with pytest.raises(OSError, match="No space left on device"):
        fill_latent_cache(empty, items, variants, vae, "cpu", batch_size=1, progress=False, keep_pace=keep_pace)
    assert calls[-3:] == [False] * 3 and set(calls[:-3]) <= {True}


def test_a_write_the_file_system_refuses_reaches_the_fill_as_an_oserror_after_it_kept_pace(tmp_path):
    """A real refusal, not a stand-in: under a file-size limit (RLIMIT_FSIZE) the OS refuses each entry as a
    full disk would. safetensors' save_file turned that into a SafetensorError, which nothing caught."""
    script = f"""
import resource, signal, sys
sys.path.insert(0, {REPO!r})
from data.plan import image_variants
from tests.test_latent_cache import OPTIONS, copy_images
from utils.latent_cache import LatentCache, fill_latent_cache
from utils.tiny_model import build_tiny_components

vae = build_tiny_components()["vae"]
items = copy_images({str(tmp_path)!r})
cache = LatentCache.open({str(tmp_path / "cache")!r}, vae, items)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of the process being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (512, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
calls = []
try:
    fill_latent_cache(cache, items, image_variants(items, OPTIONS), vae, "cpu", batch_size=2, progress=False,
                      keep_pace=lambda encoding: calls.append(encoding))
except OSError as error:
    print("OSError", error.errno, calls)
"""
    import errno
    import subprocess
    import sys

    pytest.importorskip("resource", reason="needs POSIX resource limits")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"OSError {errno.EFBIG} [True"), result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("False]")  # it kept pace until no process was encoding


def test_another_precision_gets_other_keys(filled, vae):
    items, variants, cache, _ = filled
    v = variants[0]
    bf16 = LatentCache.open(cache.folder, vae, items, precision="bf16")
    path = items[v.index].path
    assert cache.precision == "no" and bf16.entry_path(path, v) != cache.entry_path(path, v)


def test_another_vae_gets_other_keys(filled, vae):
    items, variants, cache, _ = filled
    other = copy.deepcopy(vae)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    assert weights_digest(other) != weights_digest(vae) == cache.vae_digest
    other_cache = LatentCache.open(cache.folder, other, items)
    v = variants[0]
    assert other_cache.entry_path(items[v.index].path, v) != cache.entry_path(items[v.index].path, v)
    with pytest.raises(MissingLatents, match="fill_latent_cache"):
        other_cache.load(items[v.index].path, v)


def test_unreadable_images_are_reported_and_skipped(vae, tmp_path):
    items = copy_images(tmp_path)
    with open(items[0].path, "r+b") as handle:  # damaged after the scan: the header reads, the pixels do not
        handle.truncate(300)
    os.remove(items[2].path)  # gone
    variants = image_variants(items, OPTIONS)
    cache = LatentCache.open(str(tmp_path / "cache"), vae, items)
    result = fill_latent_cache(cache, items, variants, vae, "cpu", batch_size=8, progress=False)
    assert [path for path, _ in result.failed] == sorted([items[0].path, items[2].path])
    assert all(reason.startswith("cannot be read") for _, reason in result.failed)
    assert result.encoded == len([v for v in variants if v.index not in (0, 2)])
    dataset = PlannedImages(items, cache)  # the dataset reports them as it reports any unreadable image
    for v in variants:
        sample = plan_sample(items, v.index, 0, 0, OPTIONS)
        got = dataset[sample]
        assert ("failed" in got) == (v.index in (0, 2))
        if "failed" in got and v.index == 0:  # read from the failure the fill recorded, said once
            assert got["reason"].startswith("cannot be read: ") and got["reason"].count("cannot be read") == 1
            assert got["reason"].endswith("(when the latent cache was filled)")


def test_a_damaged_entry_is_encoded_again_or_skipped_and_reported(vae, tmp_path):
    """An entry cut short (a power cut, a full disk) is encoded again by the next fill. One whose size is right
    but which safetensors cannot read (a damaged copy) is reported and skipped by the dataset, as an unreadable
    image is, and deleted, so the next fill encodes it again."""
    items = copy_images(tmp_path)
    variants = image_variants(items, OPTIONS)
    cache = LatentCache.open(str(tmp_path / "cache"), vae, items)
    fill_latent_cache(cache, items, variants, vae, "cpu", batch_size=8, progress=False)
    sample = plan_sample(items, variants[0].index, 0, 0, OPTIONS)  # what the dataset loads, below
    unreadable = cache.entry_path(items[sample.index].path, sample.variant)
    cut_variant = next(v for v in variants if v != sample.variant)
    cut = cache.entry_path(items[cut_variant.index].path, cut_variant)
    with open(cut, "r+b") as handle:
        handle.truncate(os.path.getsize(cut) - 4)
    with open(unreadable, "r+b") as handle:  # the same length, an unknown dtype in the header
        data = handle.read()
        handle.seek(0)
        handle.write(data.replace(b'"F32"', b'"X32"', 1))
    assert os.path.getsize(unreadable) == len(data)
    result = fill_latent_cache(cache, items, variants, vae, "cpu", batch_size=8, progress=False)
    assert (result.encoded, result.reused) == (1, len(variants) - 1)  # the one cut short
    assert cache.load(items[cut_variant.index].path, cut_variant).shape[0] == 8

    got = PlannedImages(items, cache)[sample]
    assert got["failed"] == items[sample.index].path
    assert "is damaged" in got["reason"] and "the next run encodes the image again" in got["reason"]
    assert not os.path.exists(unreadable)
    again = PlannedImages(items, cache)[sample]  # met again (next epoch): skipped again, not a missing entry
    assert again["failed"] == items[sample.index].path and "is damaged" in again["reason"]
    result = fill_latent_cache(cache, items, variants, vae, "cpu", batch_size=8, progress=False)
    assert (result.encoded, result.reused) == (1, len(variants) - 1)
    assert cache.load(items[sample.index].path, sample.variant).shape[0] == 8  # encoded again: the failure dropped


def test_an_entry_that_the_disk_fails_to_read_is_skipped_this_time_and_kept(filled, monkeypatch):
    """An I/O error (a network file system, too many open files) says nothing about the entry: the image is
    skipped and reported this time, and the entry is left for the next read."""
    import utils.latent_cache as latent_cache

    items, variants, cache, _ = filled
    sample = plan_sample(items, variants[0].index, 0, 0, OPTIONS)
    entry = cache.entry_path(items[sample.index].path, sample.variant)

    def failing_read(path):
        raise OSError(5, "Input/output error", path)

    monkeypatch.setattr(latent_cache, "load_file", failing_read)
    got = PlannedImages(items, cache)[sample]
    assert got["failed"] == items[sample.index].path and "could not be read" in got["reason"]
    monkeypatch.undo()
    assert os.path.exists(entry) and not os.path.exists(entry + latent_cache.FAILED_SUFFIX)
    assert cache.load(items[sample.index].path, sample.variant).shape[0] == 8


def test_an_entry_another_worker_just_deleted_as_damaged_reads_as_its_recorded_failure(filled, monkeypatch):
    """Two loader workers meet the same damaged entry: one records the failure and deletes the entry between
    the other's check that it exists and its read. The other reports the recorded failure too."""
    import utils.latent_cache as latent_cache

    items, variants, cache, _ = filled
    sample = plan_sample(items, variants[0].index, 0, 0, OPTIONS)
    path = items[sample.index].path
    entry = cache.entry_path(path, sample.variant)
    cache.record_failure(path, sample.variant, f"its latent cache entry {entry} is damaged (bad header)")

    def deleted_meanwhile(name):
        raise FileNotFoundError(2, "No such file or directory", name)

    monkeypatch.setattr(latent_cache, "load_file", deleted_meanwhile)
    try:
        got = PlannedImages(items, cache)[sample]
    finally:
        os.remove(entry + latent_cache.FAILED_SUFFIX)  # the fixture's cache is shared: leave it whole
    assert got["failed"] == path
    assert got["reason"] == f"cannot be read: its latent cache entry {entry} is damaged (bad header)"


def test_an_entry_reaches_the_disk_before_it_gets_its_name(filled, tmp_path, monkeypatch):
    """The entry's bytes are flushed to the disk (fsync) while it still has its temporary name, so a power cut
    cannot leave a named entry whose data never reached the disk (an empty or cut-short file that a journaling
    file system may keep after the rename)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the file behind a descriptor (Linux)")
    items, variants, cache, _ = filled
    cache = dataclasses.replace(cache, folder=str(tmp_path / "cache"))
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", os.path.basename(path), os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(source, target):
        events.append(("rename", os.path.basename(source), os.path.basename(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    variant = variants[0]
    cache.save(items[variant.index].path, variant, torch.ones(8, 8, 8))

    entry = cache.entry_path(items[variant.index].path, variant)
    (rename,) = [event for event in events if event[0] == "rename"]
    temporary = rename[1]
    assert rename[2] == os.path.basename(entry) and temporary != rename[2]
    synced = [event for event in events[:events.index(rename)] if event[:2] == ("fsync", temporary)]
    assert synced and synced[-1][2] == os.path.getsize(entry)  # every byte, before the rename


def test_shares_are_disjoint_and_together_complete(filled, vae, tmp_path):
    items, variants, _, _ = filled
    cache = LatentCache.open(str(tmp_path), vae, items)
    first = fill_latent_cache(cache, items, variants, vae, "cpu", batch_size=8, share=(0, 2), progress=False)
    second = fill_latent_cache(cache, items, variants, vae, "cpu", batch_size=8, share=(1, 2), progress=False)
    assert (first.encoded, first.reused) == (4, 0)
    assert (second.encoded, second.reused) == (4, 0)  # nothing the first share wrote
    whole = fill_latent_cache(cache, items, variants, vae, "cpu", batch_size=8, progress=False)
    assert (whole.encoded, whole.reused) == (0, len(variants))


# =================================================================================================
# The dataset reading the cache
# =================================================================================================

def test_the_loader_gives_cached_parameters_without_opening_images(vae, tmp_path):
    items = copy_images(tmp_path)
    cache = LatentCache.open(str(tmp_path / "cache"), vae, items)
    fill_latent_cache(cache, items, image_variants(items, OPTIONS), vae, "cpu", batch_size=8, progress=False)
    for item in items:
        os.remove(item.path)
    cache = pickle.loads(pickle.dumps(cache))  # as data-loader workers receive it
    batches = EpochBatches()
    loader = make_loader(items, batches, num_workers=0, pin_memory=False, latent_cache=cache)
    for epoch in range(OPTIONS.max_epochs):
        planned = plan_epoch(items, epoch, OPTIONS)
        batches.set_plan(planned)
        for batch, samples in zip(loader, planned):
            assert batch["pixels"] is None and batch["failed"] == []
            expected = torch.stack([cache.load(items[s.index].path, s.variant) for s in samples])
            assert torch.equal(batch["latent_params"], expected)
            assert batch["indices"] == [s.index for s in samples]


def test_a_missing_entry_is_an_error_that_says_to_fill(vae, tmp_path):
    items = copy_images(tmp_path)
    cache = LatentCache.open(str(tmp_path / "empty"), vae, items)
    sample = plan_epoch(items, 0, OPTIONS)[0][0]
    with pytest.raises(MissingLatents, match="fill_latent_cache must run"):
        PlannedImages(items, cache)[sample]


def test_without_a_cache_batches_have_pixels_and_no_latent_params(filled):
    items = filled[0]
    batches = EpochBatches()
    loader = make_loader(items, batches, num_workers=0, pin_memory=False)
    batches.set_plan(plan_epoch(items, 0, OPTIONS))
    for batch in loader:
        assert batch["latent_params"] is None and batch["pixels"].shape[1] == 3


# =================================================================================================
# Text embeddings
# =================================================================================================

def test_text_embedding_cache_encodes_each_caption_once(tiny):
    text_encoder, tokenizer = tiny["text_encoder"], tiny["tokenizer"]
    calls = []

    def encode(input_ids, clip_skip):
        calls.append(len(input_ids))
        return SD1.encode(text_encoder, input_ids, clip_skip).hidden_states

    def direct(input_ids, clip_skip=0):
        with torch.no_grad():
            return SD1.encode(text_encoder, input_ids, clip_skip).hidden_states

    cache = TextEmbeddingCache(encode)
    first = SD1.tokenize(tokenizer, ["a red circle", "blue sky", "a red circle", ""])
    assert torch.equal(cache(first), direct(first[[0, 1, 0, 3]]))  # one encode of the three distinct rows
    assert calls == [3]
    second = SD1.tokenize(tokenizer, ["blue sky", "a green tree", ""])
    got = cache(second)
    assert calls == [3, 1]
    # Rows encoded in other batches: CPU matmuls may round the last bits differently by batch size.
    assert torch.allclose(got, direct(second), atol=1e-5)
    assert torch.equal(cache(first), cache(first)) and calls == [3, 1]
    cache(second, clip_skip=2)  # another layer: new keys
    assert calls == [3, 1, 3] and cache.encoded == 7
    assert not cache(first).requires_grad


# =================================================================================================
# In training: train.train_step from the caches gives the loss it gives from images and captions
# =================================================================================================

@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_train_step_gives_the_same_loss_from_cached_latents_and_text_embeddings(tmp_path, precision, request):
    """Under autocast too: the VAE encodes in bf16 there, and the uncached posterior must not draw its sample in
    bf16 while the cached one (stored in fp32) draws it in fp32."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    import train
    from data.dataset import Collate
    from utils.config import TrainConfig
    from utils.models import load_model

    model = load_model("builtin:tiny")
    for module in (model.unet, model.text_encoder, model.vae):
        module.requires_grad_(False)
    AcceleratorState._reset_state(True)  # the state is per process: other tests' accelerators set it
    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    request.addfinalizer(lambda: AcceleratorState._reset_state(True))
    scheduler = model.scheduler
    trainee = train.Trainee(model, model.unet, model.text_encoder, train_unet=True, train_text_encoder=False,
                            alphas_cumprod=scheduler.alphas_cumprod)
    config = TrainConfig(resume_ckpt="builtin:tiny", data_root=EXAMPLES, min_snr_gamma=5.0,
                         zero_frequency_noise_ratio=0.1)
    (tmp_path / "images").mkdir()
    items = copy_images(tmp_path / "images")
    same_bucket = [item for item in items if item.bucket == items[0].bucket][:2]
    options = PlanOptions(seed=3, batch_size=2, fixed_crops=True)
    samples = [plan_sample(same_bucket, index, 0, 0, options) for index in range(len(same_bucket))]
    collate = Collate(lambda captions: model.family.tokenize(model.tokenizer, captions))

    from_images = collate([PlannedImages(same_bucket)[sample] for sample in samples])
    cache = LatentCache.open(str(tmp_path / "cache"), model.vae, same_bucket, precision=precision)
    fill_latent_cache(cache, same_bucket, image_variants(same_bucket, options), model.vae, "cpu", batch_size=2,
                      autocast=accelerator.autocast, progress=False)
    from_cache = collate([PlannedImages(same_bucket, cache)[sample] for sample in samples])
    assert from_cache["pixels"] is None and from_cache["latent_params"] is not None

    with torch.no_grad():
        expected = train.train_step(trainee, from_images, config, 7, accelerator)
        trainee.text_embeddings = TextEmbeddingCache(
            lambda ids, skip: model.family.encode(model.text_encoder, ids, skip).hidden_states)
        cached = train.train_step(trainee, from_cache, config, 7, accelerator)
    assert torch.equal(cached, expected)  # the same VAE batch, the same step generator: the same draws
    assert trainee.text_embeddings.encoded == 2



def test_the_write_benchmark_writes_entries_the_cache_reads(tmp_path):
    """bench/latent_cache_writes.py times LatentCache.save itself (doc/PERFORMANCE.md's figures)."""
    from bench.latent_cache_writes import milliseconds_per_entry

    assert milliseconds_per_entry(LatentCache.save, 3, 2, str(tmp_path)) > 0
    assert not os.listdir(tmp_path)  # its temporary folder is removed


@pytest.mark.parametrize("failure", ["the disk full", "out of memory"])
def test_a_fill_that_cannot_finish_stops_the_run_with_what_to_do(tmp_path, monkeypatch, failure):
    """train.py, one process: no traceback, exit code 2, the folder or the batch size named; nothing trained."""
    import errno

    import utils.latent_cache
    from tests.test_checkpoint_safety import run_one_demo_epoch

    def disk_full(self, path, variant, params):
        raise OSError(errno.ENOSPC, "No space left on device")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    if failure == "the disk full":
        monkeypatch.setattr(LatentCache, "save", disk_full)
        expected = [f"cache_latents: cannot write to {tmp_path / 'logs' / 'latent_cache'} ([Errno 28] No space left "
                    "on device)", "Free space there"]
    else:
        monkeypatch.setattr(utils.latent_cache, "encode_posterior", out_of_memory)
        expected = ["cache_latents: out of memory while the VAE encoded batches of 2 images", "lower batch_size"]
    code, run_dir = run_one_demo_epoch(tmp_path, monkeypatch, extra=("--cache_latents", "true"))
    log = (run_dir / "train.log").read_text()
    assert code == 2, log
    assert all(part in log for part in expected) and "Traceback" not in log, log
    assert not (run_dir / "ckpts").exists() or not list((run_dir / "ckpts").iterdir())
