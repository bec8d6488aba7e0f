"""EveryDream2's dataset conventions, one small folder tree per rule, and the plan features they feed.

Torch-free: these tests scan real files and plan epochs, and load no model.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter

import pytest
from PIL import Image

from data.captions import Tag, compose_caption
from data.image_config import ImageConfigError, parse_mapping
from data.items import ImageItem, scan_dataset
from data.plan import (PlanOptions, batch_positions, batches_per_epoch, epoch_batches, epoch_selection, plan_epoch,
                       rated_fraction)
from data.report import dataset_report, schedule_lines, undersized_lines
from data.scan import DataRootError


def image(path, size=(96, 96)):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.new("RGB", size, (120, 80, 40)).save(str(path))
    return str(path)


def write(path, text, encoding="utf-8"):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(str(path), "w", encoding=encoding) as handle:
        handle.write(text)


def scan(root, resolution=256):
    result = scan_dataset(root if isinstance(root, list) else str(root), resolution)
    return result


def by_name(result):
    return {os.path.basename(item.path): item for item in result.items}


def only(result):
    assert len(result.items) == 1, (result.items, result.skipped)
    return result.items[0]


# =================================================================================================
# Sidecars: .txt, .caption, .yaml/.yml, .json
# =================================================================================================

def test_yaml_sidecar_gives_main_prompt_and_tags_sorted_by_weight(tmp_path):
    image(tmp_path / "img_1.png")
    write(tmp_path / "img_1.yaml", "main_prompt: a portrait of ted\ntags:\n  - tag: smiling\n    weight: 0.5\n"
          "  - hat\n  - tag: blue background\n    weight: 2\n")
    item = only(scan(tmp_path))
    assert item.main_prompt == "a portrait of ted"
    assert item.caption == "a portrait of ted, blue background, hat, smiling"
    assert item.tags == (Tag("smiling", 0.5), Tag("hat", 1.0), Tag("blue background", 2.0))  # as written


def test_yml_and_json_sidecars_are_read(tmp_path):
    image(tmp_path / "a.png")
    write(tmp_path / "a.yml", "main_prompt: from yml\n")
    image(tmp_path / "b.png")
    write(tmp_path / "b.json", json.dumps({"main_prompt": "from json", "tags": ["one", {"tag": "two"}]}))
    items = by_name(scan(tmp_path))
    assert items["a.png"].caption == "from yml"
    assert items["b.png"].caption == "from json, one, two"


def test_every_sidecar_key_reaches_the_item(tmp_path):
    image(tmp_path / "x.png")
    write(tmp_path / "x.yaml", "main_prompt: m\nrating: 3\nmax_caption_length: 40\nmultiply: 2.5\ncond_dropout: 0.2\n"
          "flip_p: 0.7\nshuffle_tags: true\nbatch_id: style\nloss_scale: -0.5\n")
    item = only(scan(tmp_path))
    assert (item.rating, item.max_caption_length, item.multiply, item.cond_dropout, item.flip_p, item.shuffle_tags,
            item.batch_id, item.loss_scale) == (3.0, 40, 2.5, 0.2, 0.7, True, "style", -0.5)


def test_sidecars_fold_txt_then_caption_then_yaml_then_json(tmp_path):
    """Later files are more specific: their main prompt is used, their scalars win, tags are merged."""
    image(tmp_path / "x.png")
    write(tmp_path / "x.txt", "txt prompt, txt tag")
    write(tmp_path / "x.yaml", "main_prompt: yaml prompt\ntags: [yaml tag]\nmultiply: 2\n")
    write(tmp_path / "x.json", json.dumps({"multiply": 3}))
    item = only(scan(tmp_path))
    assert item.main_prompt == "yaml prompt"
    assert [tag.text for tag in item.tags] == ["yaml tag", "txt tag"]
    assert item.multiply == 3.0


def test_yaml_caption_key_as_text_and_as_nested_settings(tmp_path):
    image(tmp_path / "a.png")
    write(tmp_path / "a.yaml", "caption: a red car, parked\nflip_p: 0.5\n")
    image(tmp_path / "b.png")
    write(tmp_path / "b.yaml", "caption:\n  main_prompt: nested\n  tags: [t]\nloss_scale: 2\n")
    items = by_name(scan(tmp_path))
    assert items["a.png"].caption == "a red car, parked" and items["a.png"].flip_p == 0.5
    assert items["b.png"].caption == "nested, t" and items["b.png"].loss_scale == 2.0


def test_a_caption_file_holding_a_file_name_loads_that_file(tmp_path):
    image(tmp_path / "x.png")
    write(tmp_path / "shared.yaml", "main_prompt: from the shared file\nmultiply: 2\n")
    write(tmp_path / "x.txt", "shared.yaml\n")
    item = only(scan(tmp_path))
    assert item.caption == "from the shared file" and item.multiply == 2.0


def test_latin1_caption_file_is_read(tmp_path):
    image(tmp_path / "x.png")
    write(tmp_path / "x.txt", "café, crème", encoding="latin-1")
    assert only(scan(tmp_path)).caption == "café, crème"


@pytest.mark.parametrize("text, reason", [
    ("main_prompt: [unclosed\n", "not valid YAML"),
    ("flip_p: 2\n", "flip_p is 2"),
    ("multiply: lots\n", "multiply must be a number"),
    ("tags: 5\n", "tags must be a list"),
    ("- just\n- a list\n", "expected key: value pairs"),
])
def test_a_bad_sidecar_skips_its_image_with_the_file_and_reason(tmp_path, text, reason):
    image(tmp_path / "bad.png")
    write(tmp_path / "bad.yaml", text)
    image(tmp_path / "good.png")
    result = scan(tmp_path)
    assert [os.path.basename(i.path) for i in result.items] == ["good.png"]
    (skipped,) = result.skipped
    assert skipped.path.endswith("bad.png") and "bad.yaml" in skipped.reason and reason in skipped.reason


def test_unknown_sidecar_keys_are_noted_not_fatal(tmp_path):
    image(tmp_path / "x.png")
    write(tmp_path / "x.yaml", "main_prompt: ok\nmultipy: 3\n")
    result = scan(tmp_path)
    assert only(result).caption == "ok"
    assert any("multipy" in note for note in result.notes)


def test_parse_mapping_rejects_a_negative_tag_weight():
    with pytest.raises(ImageConfigError, match="weight"):
        parse_mapping({"tags": [{"tag": "t", "weight": -1}]}, "x.yaml", [])


# =================================================================================================
# Folder files
# =================================================================================================

def test_local_folder_files_apply_to_the_folder_only_not_sub_folders(tmp_path):
    image(tmp_path / "top.png")
    write(tmp_path / "multiply.txt", "3")
    write(tmp_path / "flip_p.txt", "0.25\n")
    write(tmp_path / "cond_dropout.txt", "0.5")
    write(tmp_path / "loss_scale.txt", "2")
    write(tmp_path / "shuffle_tags.txt", "")
    image(tmp_path / "sub" / "below.png")
    items = by_name(scan(tmp_path))
    top, below = items["top.png"], items["below.png"]
    assert (top.multiply, top.flip_p, top.cond_dropout, top.loss_scale, top.shuffle_tags) == (3.0, 0.25, 0.5, 2.0, True)
    assert (below.multiply, below.flip_p, below.cond_dropout, below.loss_scale, below.shuffle_tags) == (
        1.0, None, None, 1.0, False)


def test_batch_id_txt_is_stripped(tmp_path):
    """EveryDream2 kept the newline, so "mybatch\\n" was a different batch from "mybatch"."""
    image(tmp_path / "a" / "x.png")
    write(tmp_path / "a" / "batch_id.txt", "mybatch\n")
    image(tmp_path / "b" / "y.png")
    write(tmp_path / "b" / "y.yaml", "batch_id: mybatch\n")
    assert {item.batch_id for item in scan(tmp_path).items} == {"mybatch"}


def test_local_yaml_beats_multiply_txt_and_sidecars_beat_both(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    write(tmp_path / "multiply.txt", "2")
    write(tmp_path / "local.yaml", "multiply: 4\ntags: [folder tag]\n")
    write(tmp_path / "b.yaml", "multiply: 5\n")
    items = by_name(scan(tmp_path))
    assert items["a.png"].multiply == 4.0 and items["b.png"].multiply == 5.0
    assert items["a.png"].caption == "a, folder tag"  # the file name's caption is still used


def test_global_yaml_is_inherited_and_a_child_global_overrides_it(tmp_path):
    write(tmp_path / "global.yaml", "flip_p: 0.3\ntags: [root tag]\n")
    image(tmp_path / "r.png")
    image(tmp_path / "child" / "c.png")
    write(tmp_path / "child" / "global.yml", "flip_p: 0.6\ntags: [child tag]\n")
    image(tmp_path / "child" / "grand" / "g.png")
    items = by_name(scan(tmp_path))
    assert items["r.png"].flip_p == 0.3 and items["r.png"].caption == "r, root tag"
    assert items["c.png"].flip_p == 0.6 and items["c.png"].caption == "c, child tag, root tag"
    assert items["g.png"].flip_p == 0.6 and items["g.png"].caption == "g, child tag, root tag"


def test_a_main_prompt_in_global_yaml_replaces_file_name_captions_below_it(tmp_path):
    write(tmp_path / "set" / "global.yaml", "main_prompt: a photo of sks\n")
    image(tmp_path / "set" / "inner" / "ignored name_1.png")
    image(tmp_path / "other" / "kept name_1.png")
    captions = {os.path.basename(i.path): i.caption for i in scan(tmp_path).items}
    assert captions == {"ignored name_1.png": "a photo of sks", "kept name_1.png": "kept name"}


def test_the_most_specific_main_prompt_wins_and_the_conflict_is_noted(tmp_path):
    write(tmp_path / "global.yaml", "main_prompt: general\n")
    image(tmp_path / "x.png")
    write(tmp_path / "x.yaml", "main_prompt: specific\n")
    result = scan(tmp_path)
    assert only(result).main_prompt == "specific"
    assert any("several main prompts" in note for note in result.notes)


def test_a_bad_folder_file_skips_the_folder_and_its_sub_folders_with_the_reason(tmp_path):
    write(tmp_path / "bad" / "global.yaml", "flip_p: [oops\n")
    image(tmp_path / "bad" / "a.png")
    image(tmp_path / "bad" / "deeper" / "b.png")
    write(tmp_path / "worse" / "multiply.txt", "many")
    image(tmp_path / "worse" / "c.png")
    image(tmp_path / "fine" / "d.png")
    result = scan(tmp_path)
    assert [os.path.basename(i.path) for i in result.items] == ["d.png"]
    reasons = {os.path.basename(s.path): s.reason for s in result.skipped}
    assert "global.yaml" in reasons["a.png"] and "global.yaml" in reasons["b.png"]
    assert "multiply.txt" in reasons["c.png"] and "must be a number" in reasons["c.png"]


# =================================================================================================
# Manifests and lists of roots
# =================================================================================================

def test_manifest_paths_are_relative_to_the_manifest_file_not_the_working_folder(tmp_path, monkeypatch):
    image(tmp_path / "set" / "pics" / "one.png")
    image(tmp_path / "set" / "pics" / "two_1.png")
    write(tmp_path / "set" / "list.json", json.dumps([
        {"image": "pics/one.png", "main_prompt": "first", "multiply": 2},
        {"image": "pics/one.png", "caption": "again, with a tag"},  # EveryDream2 crashed on `caption`
        {"image": "pics/two_1.png"},  # and on entries relying on the file name
    ]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = scan(str(tmp_path / "set" / "list.json"))
    assert result.skipped == []
    assert [(os.path.basename(i.path), i.caption, i.multiply) for i in result.items] == [
        ("one.png", "first", 2.0), ("one.png", "again, with a tag", 1.0), ("two_1.png", "two", 1.0)]


def test_manifest_entries_that_cannot_train_are_skipped_with_their_entry(tmp_path):
    image(tmp_path / "ok.png")
    write(tmp_path / "m.json", json.dumps([{"image": "ok.png"}, {"main_prompt": "no image"},
                                           {"image": "missing.png"}, {"image": "ok.png", "flip_p": 7}]))
    result = scan(str(tmp_path / "m.json"))
    assert len(result.items) == 1
    reasons = " | ".join(s.path + ": " + s.reason for s in result.skipped)
    assert "entry 1" in reasons and "missing.png" in reasons and "does not exist" in reasons
    assert "entry 3" in reasons and "flip_p" in reasons


def test_a_manifest_that_is_not_a_json_list_is_an_error(tmp_path):
    write(tmp_path / "m.json", "{not json")
    with pytest.raises(DataRootError, match="not valid JSON"):
        scan(str(tmp_path / "m.json"))
    write(tmp_path / "n.json", json.dumps({"image": "x.png"}))
    with pytest.raises(DataRootError, match="list"):
        scan(str(tmp_path / "n.json"))


def test_data_root_may_list_folders_and_manifests(tmp_path):
    image(tmp_path / "a" / "from folder a.png")
    image(tmp_path / "b" / "from folder b.png")
    image(tmp_path / "c" / "pic.png")
    write(tmp_path / "c" / "m.json", json.dumps([{"image": "pic.png", "main_prompt": "from manifest"}]))
    result = scan([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c" / "m.json")])
    assert [i.caption for i in result.items] == ["from folder a", "from folder b", "from manifest"]


# =================================================================================================
# Captions as trained: shuffling, keep_tags, weights
# =================================================================================================

TAGS = tuple(Tag(t) for t in ("one", "two", "three", "four", "five", "six"))


def test_without_shuffling_the_caption_is_main_then_tags_in_order():
    assert compose_caption("main", TAGS) == "main, one, two, three, four, five, six"


def test_shuffling_keeps_the_main_prompt_first_and_every_tag():
    seen = set()
    for seed in range(50):
        parts = compose_caption("main", TAGS, random.Random(seed)).split(", ")
        assert parts[0] == "main" and sorted(parts[1:]) == sorted(t.text for t in TAGS)
        seen.add(tuple(parts))
    assert len(seen) > 20


@pytest.mark.parametrize("keep", [1, 2, 4])
def test_keep_tags_keeps_the_first_n_tags_in_place(keep):
    """EveryDream2's keep_tags never worked (min instead of max)."""
    orders = set()
    for seed in range(40):
        parts = compose_caption("main", TAGS, random.Random(seed), keep_tags=keep).split(", ")
        assert parts[1:1 + keep] == [t.text for t in TAGS[:keep]]
        orders.add(tuple(parts))
    assert len(orders) > 1


def test_weighted_tags_are_drawn_in_proportion_to_their_weight():
    tags = (Tag("heavy", 8.0), Tag("light", 1.0))
    first = Counter(compose_caption("m", tags, random.Random(seed)).split(", ")[1] for seed in range(3000))
    assert first["heavy"] / 3000 == pytest.approx(8 / 9, abs=0.03)


def test_weighted_shuffling_stops_before_max_caption_length():
    tags = tuple(Tag(f"tag number {i}", float(i + 1)) for i in range(20))
    for seed in range(30):
        caption = compose_caption("main", tags, random.Random(seed), max_length=60)
        assert len(caption) <= 60 and caption.startswith("main, ")
        assert len(compose_caption("main", tags, random.Random(seed), max_length=10_000).split(", ")) == 21


def items_of(*settings, bucket=(256, 256)):
    return [ImageItem(f"/d/{i}.png", bucket, bucket, main_prompt=f"p{i}", **s) for i, s in enumerate(settings)]


def flat(batches):
    return [s for batch in batches for s in batch]


def test_config_shuffle_tags_shuffles_each_image_differently_in_an_epoch():
    """EveryDream2 gave every image the same permutation in an epoch; here each sample has its own."""
    tags = tuple(Tag(str(i)) for i in range(8))
    items = [ImageItem(f"/d/{i}.png", (256, 256), (256, 256), main_prompt="m", tags=tags) for i in range(30)]
    samples = flat(plan_epoch(items, 0, PlanOptions(seed=1, batch_size=1, shuffle_tags=True, cond_dropout=0)))
    assert len({s.caption for s in samples}) > 20
    unshuffled = flat(plan_epoch(items, 0, PlanOptions(seed=1, batch_size=1, cond_dropout=0)))
    assert {s.caption for s in unshuffled} == {"m, 0, 1, 2, 3, 4, 5, 6, 7"}


def test_an_image_can_turn_shuffling_on_for_itself():
    tags = tuple(Tag(str(i)) for i in range(8))
    items = [ImageItem("/d/a.png", (256, 256), (256, 256), main_prompt="m", tags=tags, shuffle_tags=True)]
    captions = {flat(plan_epoch(items, e, PlanOptions(seed=1, batch_size=1)))[0].caption for e in range(20)}
    assert len(captions) > 10


# =================================================================================================
# Per-image flip_p, cond_dropout, loss_scale; the global flip_p
# =================================================================================================

def test_the_global_flip_p_applies_to_images_without_their_own():
    """EveryDream2's --flip_p was dead code: only per-image flip_p flipped anything."""
    items = items_of(*[{}] * 400)
    samples = flat(plan_epoch(items, 0, PlanOptions(seed=2, batch_size=4, flip_p=1.0)))
    assert all(s.flip for s in samples)


def test_an_images_flip_p_and_cond_dropout_override_the_global_ones():
    items = items_of(*[{"flip_p": 0.0, "cond_dropout": 1.0}] * 50, *[{}] * 50)
    samples = flat(plan_epoch(items, 0, PlanOptions(seed=2, batch_size=5, flip_p=1.0, cond_dropout=0.0)))
    own = [s for s in samples if s.index < 50]
    others = [s for s in samples if s.index >= 50]
    assert not any(s.flip for s in own) and all(s.caption == "" for s in own)
    assert all(s.flip for s in others) and all(s.caption for s in others)


def test_loss_scale_is_carried_to_each_sample():
    items = items_of({"loss_scale": -1.5}, {})
    scales = {s.index: s.loss_scale for s in flat(plan_epoch(items, 0, PlanOptions(seed=0, batch_size=1)))}
    assert scales == {0: -1.5, 1: 1.0}


# =================================================================================================
# multiply
# =================================================================================================

def test_whole_multipliers_repeat_images_with_independent_decisions():
    items = items_of({"multiply": 3}, {"multiply": 0}, {})
    samples = flat(plan_epoch(items, 0, PlanOptions(seed=4, batch_size=2)))
    assert Counter(s.index for s in samples) == {0: 3, 2: 1}
    copies = [s for s in samples if s.index == 0]
    assert sorted(s.copy for s in copies) == [0, 1, 2]
    assert len({(s.crop_x, s.crop_y) for s in copies}) == 3


def test_fractional_multipliers_give_floor_of_the_sum_and_the_right_average():
    items = items_of(*[{"multiply": 0.5}] * 10, *[{"multiply": 1.25}] * 8, {"multiply": 2.7})
    expected_size = math.floor(10 * 0.5 + 8 * 1.25 + 2.7)  # 17
    totals = Counter()
    epochs = 400
    sizes = set()
    for epoch in range(epochs):
        selection = epoch_selection(items, epoch, PlanOptions(seed=9, batch_size=1))
        assert len(selection) == expected_size
        counts = Counter(index for index, _ in selection)
        for index, item in enumerate(items):
            assert counts[index] in (math.floor(item.multiply), math.floor(item.multiply) + 1)
        totals.update(counts)
        sizes.add(tuple(sorted(counts.items())))
    assert len(sizes) > 1  # the fractional part is drawn anew each epoch
    scale = (expected_size - 10 * 0 - 8 * 1 - 2) / (10 * 0.5 + 8 * 0.25 + 0.7)  # free slots / sum of fractions
    for index, item in enumerate(items):
        fraction = item.multiply - math.floor(item.multiply)
        assert totals[index] / epochs == pytest.approx(math.floor(item.multiply) + fraction * scale, abs=0.08)


def test_batches_per_epoch_matches_every_epochs_plan():
    items = items_of(*[{"multiply": 0.5}] * 7, *[{"multiply": 1.5}] * 5)
    items += [ImageItem("/d/w.png", (512, 128), (512, 128), multiply=0.3)]
    options = PlanOptions(seed=3, batch_size=2, max_epochs=12)
    counts = batches_per_epoch(items, options)
    assert counts == [len(plan_epoch(items, epoch, options)) for epoch in range(12)]


# =================================================================================================
# batch_id and the layout of optimizer steps
# =================================================================================================

def test_a_batch_holds_one_batch_id_and_named_leftovers_join_the_default_batches():
    items = items_of(*[{"batch_id": "style"}] * 5, *[{}] * 4)
    batches = plan_epoch(items, 0, PlanOptions(seed=5, batch_size=2))
    assert sorted(s.index for s in flat(batches)) == list(range(9))
    styled = [batch for batch in batches if any(items[s.index].batch_id for s in batch)]
    whole = [batch for batch in styled if all(items[s.index].batch_id for s in batch) and len(batch) == 2]
    assert len(whole) == 2  # 4 of the 5 in two whole batches of their own
    # the fifth trains with the default images (in a default batch, or alone in the bucket's last one)
    rest = [s for batch in batches if batch not in whole for s in batch]
    assert sum(1 for s in rest if items[s.index].batch_id) == 1 and len(rest) == 5


def test_named_batches_fill_whole_optimizer_steps_with_grad_accum():
    items = items_of(*[{"batch_id": "a"}] * 8, *[{"batch_id": "b"}] * 8, *[{}] * 8)
    for seed in range(10):
        batches = epoch_batches(items, 0, PlanOptions(seed=seed, batch_size=2, grad_accum=2))
        steps = [batches[i:i + 2] for i in range(0, len(batches), 2)]
        for step in steps:
            assert len({items[index].batch_id for batch in step for index, _ in batch}) == 1


@pytest.mark.parametrize("grad_accum, processes", [(1, 1), (3, 1), (2, 2)])
def test_every_image_trains_once_per_epoch_whatever_the_step_layout(grad_accum, processes):
    items = items_of(*[{"batch_id": "a"}] * 7, *[{}] * 10) + [ImageItem("/d/t.png", (128, 512), (128, 512))]
    options = PlanOptions(seed=8, batch_size=3, grad_accum=grad_accum, processes=processes)
    assert sorted(s.index for s in flat(plan_epoch(items, 1, options))) == list(range(len(items)))


# =================================================================================================
# rated_dataset
# =================================================================================================

def test_rated_dataset_shrinks_epochs_to_the_target_and_prefers_high_ratings():
    items = items_of(*[{"rating": 5.0, "multiply": 2}] * 20, *[{"rating": 0.5}] * 20)
    options = PlanOptions(seed=1, batch_size=1, max_epochs=5, rated_dataset=True,
                          rated_dataset_target_dropout_percent=40)
    assert len(epoch_selection(items, 0, options)) == 60  # epoch 0: every image with its multiplier
    assert [rated_fraction(e, options) for e in range(5)] == pytest.approx([1.0, 0.85, 0.7, 0.55, 0.4])
    last = epoch_selection(items, 4, options)
    assert len(last) == math.ceil(40 * 0.4)
    high = sum(1 for index, _ in last if items[index].rating == 5.0)
    assert high >= 13  # 16 drawn, mostly from the 5.0-rated half
    assert len(set(last)) == len(last)


# =================================================================================================
# Report, schedule and undersized list
# =================================================================================================

def test_dataset_report_names_counts_leftovers_undersized_and_long_captions(tmp_path):
    for i in range(3):
        image(tmp_path / f"square {i}.png", size=(300, 300))
    image(tmp_path / "small.png", size=(100, 100))
    (tmp_path / "broken.jpg").write_bytes(b"")
    result = scan(tmp_path, 256)
    options = PlanOptions(seed=1, batch_size=3, max_epochs=2)
    first = plan_epoch(result.items, 0, options)
    text = dataset_report(str(tmp_path), 256, result, options, first, batches_per_epoch(result.items, options),
                          [("/x/long.png", 90)], 77)
    assert "images found: 5, used: 4, skipped: 1" in text
    assert "broken.jpg" in text
    assert "256x256" in text and "1 image(s) train in a smaller batch" in text
    assert "undersized images (smaller than their bucket, so upscaled): 1" in text and "small.png" in text
    assert "longer than the text encoder's 77 tokens: 1" in text and "/x/long.png: 90 tokens" in text
    assert "truncated" in text
    assert "images per epoch after multipliers: 4" in text and "batches (steps) per epoch: 2" in text
    assert undersized_lines(result.items) == [f"{os.path.abspath(tmp_path / 'small.png')}\t100x100\tbucket 256x256"]


def test_schedule_lines_are_json_with_the_caption_as_trained():
    items = items_of({"flip_p": 1.0}, {}, {})
    batches = plan_epoch(items, 0, PlanOptions(seed=3, batch_size=2, cond_dropout=0.0))
    lines = [json.loads(line) for line in schedule_lines(batches, items, first_step=14)]
    assert [line["step"] for line in lines] == [14 + i for i, b in enumerate(batches) for _ in b]
    for line in lines:
        assert set(line) >= {"step", "bucket", "path", "caption", "flip"}
        index = int(os.path.basename(line["path"]).split(".")[0])
        assert line["caption"] == f"p{index}" and line["flip"] is (index == 0) and line["bucket"] == [256, 256]
        assert line["process"] == 0


def test_with_two_processes_the_schedule_says_which_process_trains_each_batch_and_at_which_step():
    items = items_of(*[{}] * 10)
    options = PlanOptions(seed=3, batch_size=2, processes=2)
    batches = plan_epoch(items, 0, options)  # 5 batches: steps 14, 14, 15, 15, 16 on processes 0, 1, 0, 1, 0
    lines = [json.loads(line) for line in schedule_lines(batches, items, 14, batch_positions(len(batches), options))]
    assert [(line["step"], line["process"]) for line in lines[::2]] == [(14, 0), (14, 1), (15, 0), (15, 1), (16, 0)]


# =================================================================================================
# Zips and bad input, as the scan reports them
# =================================================================================================

def test_zip_files_are_unpacked_once_beside_themselves_and_scanned(tmp_path):
    """EveryDream2's unzip opened the folder instead of the zip, so zipped images never trained."""
    import zipfile

    source = image(tmp_path / "src" / "zipped cat.png")
    write(tmp_path / "src" / "zipped cat.txt", "a zipped cat, tabby")
    data = tmp_path / "data"
    data.mkdir()
    with zipfile.ZipFile(data / "pack.zip", "w") as archive:
        archive.write(source, "zipped cat.png")
        archive.write(tmp_path / "src" / "zipped cat.txt", "zipped cat.txt")
    result = scan(data)
    assert only(result).caption == "a zipped cat, tabby"
    assert only(result).path == os.path.abspath(data / "pack" / "zipped cat.png")
    assert any("unpacked" in note for note in result.notes)
    assert not [n for n in scan(data).notes if "unpacked" in n]  # the second scan finds it unpacked already


def test_a_damaged_or_escaping_zip_is_reported_and_not_unpacked(tmp_path):
    import zipfile

    data = tmp_path / "data"
    image(data / "fine.png")
    (data / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with zipfile.ZipFile(data / "evil.zip", "w") as archive:
        archive.writestr("../../escaped.png", b"x")
    result = scan(data)
    assert [os.path.basename(i.path) for i in result.items] == ["fine.png"]
    reasons = {os.path.basename(s.path): s.reason for s in result.skipped}
    assert "zip not unpacked" in reasons["broken.zip"] and "outside" in reasons["evil.zip"]
    assert not (tmp_path / "escaped.png").exists() and not (data / "evil").exists()


def test_every_kind_of_bad_image_is_skipped_with_a_reason_and_the_rest_scan(tmp_path):
    image(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    whole = (tmp_path / "whole.jpg")
    Image.new("RGB", (200, 200), (1, 2, 3)).save(whole)
    (tmp_path / "cut.jpg").write_bytes(whole.read_bytes()[:20])  # the header itself is cut
    os.remove(whole)
    image(tmp_path / "tiny.png", size=(40, 30))
    result = scan(tmp_path)
    assert [os.path.basename(i.path) for i in result.items] == ["good.png"]
    reasons = {os.path.basename(s.path): s.reason for s in result.skipped}
    assert set(reasons) == {"empty.jpg", "text.png", "cut.jpg", "tiny.png"}
    assert "at least 64 px" in reasons["tiny.png"]
    assert all(reason.startswith("cannot be read as an image") for reason in reasons.values())


# =================================================================================================
# Odd input found in review: each once, in a small tree
# =================================================================================================

def test_a_trailing_slash_on_data_root_keeps_global_yaml_inheritance(tmp_path):
    write(tmp_path / "global.yaml", "main_prompt: from root global\nflip_p: 0.3\n")
    image(tmp_path / "sub" / "ted_1.jpg")
    for root in (str(tmp_path), str(tmp_path) + os.sep, str(tmp_path / "sub" / ".."), ):
        item = only(scan(root))
        assert (item.main_prompt, item.flip_p) == ("from root global", 0.3), root


@pytest.mark.parametrize("where", ["yaml", "manifest"])
def test_a_caption_key_naming_a_file_reads_that_file(tmp_path, where):
    image(tmp_path / "x_1.png")
    write(tmp_path / "shared.txt", "from the shared file, its tag")
    if where == "yaml":
        write(tmp_path / "x_1.yaml", "caption: shared.txt\n")
        result = scan(tmp_path)
    else:
        write(tmp_path / "m.json", json.dumps([{"image": "x_1.png", "caption": "shared.txt"}]))
        result = scan(str(tmp_path / "m.json"))
    assert only(result).caption == "from the shared file, its tag"


def test_caption_key_is_more_specific_than_the_keys_beside_it():
    """EveryDream2 merges the parsed `caption` over the object's own keys."""
    config = parse_mapping({"main_prompt": "own", "caption": "from caption, t", "flip_p": 0.1}, "x.yaml", [])
    assert config.main_prompts[0] == "from caption" and config.flip_p == 0.1


def test_numbers_and_empty_entries_in_yaml_tags_and_prompts_are_text_not_errors(tmp_path):
    image(tmp_path / "x.png")
    write(tmp_path / "x.yaml", "main_prompt: 1984\ntags:\n  - 1girl\n  - 2023\n  - tag: 1.5\n    weight: 2\n  -\n")
    assert only(scan(tmp_path)).caption == "1984, 1.5, 1girl, 2023"


def test_tags_given_as_one_string_keep_every_tag():
    assert [t.text for t in parse_mapping({"tags": "a, b, c"}, "x.yaml", []).tags] == ["a", "b", "c"]


def test_a_caption_starting_with_a_comma_has_no_main_prompt_so_the_file_name_gives_it(tmp_path):
    image(tmp_path / "name prompt_1.png")
    write(tmp_path / "name prompt_1.txt", ", lead, b")
    assert only(scan(tmp_path)).caption == "name prompt, lead, b"


def test_caption_files_that_refer_to_each_other_skip_the_image_not_the_scan(tmp_path):
    image(tmp_path / "y_1.png")
    write(tmp_path / "y_1.txt", "z.txt")
    write(tmp_path / "z.txt", "y_1.txt")
    image(tmp_path / "fine.png")
    result = scan(tmp_path)
    assert [os.path.basename(i.path) for i in result.items] == ["fine.png"]
    assert "loop" in result.skipped[0].reason


def test_yaml_with_a_number_as_key_is_noted_not_a_crash(tmp_path):
    image(tmp_path / "x.png")
    write(tmp_path / "x.yaml", "2023: year\nfoo: bar\nmain_prompt: ok\n")
    result = scan(tmp_path)
    assert only(result).caption == "ok" and any("2023" in note for note in result.notes)


def test_an_empty_folder_number_file_is_ignored_with_a_note(tmp_path):
    image(tmp_path / "x.png")
    write(tmp_path / "multiply.txt", "\n")
    result = scan(tmp_path)
    assert only(result).multiply == 1.0 and any("multiply.txt: empty" in note for note in result.notes)


def test_a_manifest_with_a_byte_order_mark_is_read(tmp_path):
    image(tmp_path / "x.png")
    (tmp_path / "m.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"image": "x.png"}]).encode())
    assert only(scan(str(tmp_path / "m.json"))).caption == "x"


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="folder links need POSIX here")
def test_linked_folders_are_scanned_once_and_link_loops_end(tmp_path):
    image(tmp_path / "outside" / "linked_1.png")
    data = tmp_path / "data"
    image(data / "own.png")
    os.symlink(tmp_path / "outside", data / "link")
    os.symlink(data, data / "link" / "back to data")  # a loop
    names = sorted(os.path.basename(i.path) for i in scan(data).items)
    assert names == ["linked_1.png", "own.png"]


@pytest.mark.parametrize("kind", ["encrypted", "unsupported method"])
def test_zips_python_cannot_unpack_are_reported_not_a_crash(tmp_path, kind, monkeypatch):
    import zipfile

    data = tmp_path / "data"
    image(data / "fine.png")
    with zipfile.ZipFile(data / "pack.zip", "w") as archive:
        archive.writestr("inside.png", b"x")
    error = RuntimeError("File is encrypted") if kind == "encrypted" else NotImplementedError("compression")

    def refuse(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(zipfile.ZipFile, "extractall", refuse)
    result = scan(data)
    assert [os.path.basename(i.path) for i in result.items] == ["fine.png"]
    assert "zip not unpacked" in result.skipped[0].reason
    assert sorted(os.listdir(data)) == ["fine.png", "pack.zip"]  # no half-unpacked folder left


def test_images_with_multiply_0_never_train_in_rated_epochs_either():
    items = items_of({"multiply": 0}, {"multiply": 0}, {}, {})
    options = PlanOptions(seed=1, batch_size=1, max_epochs=3, rated_dataset=True,
                          rated_dataset_target_dropout_percent=100)
    for epoch in range(3):
        assert {index for index, _ in epoch_selection(items, epoch, options)} == {2, 3}


def test_report_notes_are_capped():
    from data.items import ScanResult

    items = items_of({})
    notes = [f"note {i}" for i in range(30)]
    options = PlanOptions(seed=1, batch_size=1)
    text = dataset_report("d", 256, ScanResult(items, [], notes), options, plan_epoch(items, 0, options), [1],
                          None, None)
    assert "note 9" in text and "note 10" not in text and "and 20 more notes" in text
