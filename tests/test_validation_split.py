"""Validation, the torch-free side (data/validation.py): the settings file, the split into training and
validation sets, the schedule, the fixed per-image seeds and the batches.

Torch-free except the last test, which loads a validation set through data/dataset.py's loader.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from PIL import Image

from data.captions import Tag
from data.items import ImageItem, ScanResult, SkippedFile, scan_dataset
from data.validation import (COMBINED, STABILIZE, VAL, ValidationPoint, ValidationSettings, build_validation_plan,
                             item_key, item_seed, parse_validation_settings, read_validation_config, split_keys,
                             validation_batches, validation_schedule)
from utils.config import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.abspath("/data/train")


def image(path, size=(96, 96)):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.new("RGB", size, (120, 80, 40)).save(str(path))
    return str(path)


def items(count, root=ROOT, bucket=(256, 256), **settings):
    return [ImageItem(path=os.path.join(root, f"img{i:03}.png"), size=bucket, bucket=bucket, main_prompt=f"p{i}",
                      **settings) for i in range(count)]


def settings(**values):
    return parse_validation_settings(values, "val.json", check_paths=False)[0]


def plan_of(values, train, data_root=ROOT, batch_size=2, scan=None):
    return build_validation_plan(settings(**values), train, resolution=256, batch_size=batch_size,
                                 data_root=data_root, scan=scan)


def names(item_list):
    return [os.path.basename(item.path) for item in item_list]


def test_the_module_does_not_import_torch():
    code = "import sys; import data.validation; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# =================================================================================================
# The settings file
# =================================================================================================

def test_an_empty_file_gives_everydream2s_defaults():
    parsed, notes = parse_validation_settings({}, "val.json")
    assert parsed == ValidationSettings(source="val.json")
    assert (parsed.validate_training, parsed.val_split_mode, parsed.auto_split_proportion, parsed.manual_data_root,
            parsed.extra_manual_datasets, parsed.stabilize_training_loss, parsed.stabilize_split_proportion,
            parsed.every_n_epochs, parsed.seed, parsed.batch_size, parsed.use_relative_loss) == (
        True, "automatic", 0.15, None, (), False, 0.15, 1.0, 555, None, False)
    assert notes == []


def test_every_key_is_read(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "santa").mkdir()
    data = {"documentation": {"seed": "explained here"}, "validate_training": True, "val_split_mode": "manual",
            "auto_split_proportion": 0.2, "manual_data_root": str(tmp_path / "val"),
            "extra_manual_datasets": {"santa suit": str(tmp_path / "santa")}, "stabilize_training_loss": True,
            "stabilize_split_proportion": 0.3, "every_n_epochs": 0.25, "seed": 7, "batch_size": 3,
            "use_relative_loss": True}
    path = tmp_path / "validation.json"
    path.write_text(json.dumps(data))
    parsed, notes = read_validation_config(str(path))
    assert parsed == ValidationSettings(
        validate_training=True, val_split_mode="manual", auto_split_proportion=0.2,
        manual_data_root=str(tmp_path / "val"), extra_manual_datasets=(("santa suit", str(tmp_path / "santa")),),
        stabilize_training_loss=True, stabilize_split_proportion=0.3, every_n_epochs=0.25, seed=7, batch_size=3,
        use_relative_loss=True, source=str(path))
    assert parsed.extra_sets == {"santa suit": str(tmp_path / "santa")}
    assert parsed.runs_per_epoch == 4
    assert notes == []


def test_the_old_key_names_are_read_with_a_note():
    parsed, notes = parse_validation_settings({"val_split_proportion": 0.3, "val_data_root": "v"}, "val.json",
                                              check_paths=False)
    assert (parsed.auto_split_proportion, parsed.manual_data_root) == (0.3, "v")
    assert any("val_split_proportion" in note and "auto_split_proportion" in note for note in notes)
    assert any("val_data_root" in note and "manual_data_root" in note for note in notes)


def test_an_old_and_a_new_name_that_disagree_is_an_error():
    with pytest.raises(ConfigError, match="val.json: val_split_proportion: conflicts with auto_split_proportion"):
        parse_validation_settings({"val_split_proportion": 0.3, "auto_split_proportion": 0.2}, "val.json")


def test_unknown_keys_are_notes_naming_the_key_and_the_file():
    parsed, notes = parse_validation_settings({"every_n_epoch": 2, "lowvram": True}, "val.json")
    assert parsed.every_n_epochs == 1.0
    assert any(note.startswith("val.json: every_n_epoch: unknown key") and "'every_n_epochs'" in note
               for note in notes)
    assert any(note.startswith("val.json: lowvram: unknown key") for note in notes)


@pytest.mark.parametrize("key, value, message", [
    ("validate_training", "yes", "expected true or false"),
    ("stabilize_training_loss", 1, "expected true or false"),
    ("use_relative_loss", None, "expected true or false"),
    ("val_split_mode", "auto", "is not one of: automatic, manual, none"),
    ("auto_split_proportion", 0, "above 0 and below 1"),
    ("auto_split_proportion", 1, "above 0 and below 1"),
    ("auto_split_proportion", "0.1", "above 0 and below 1"),
    ("stabilize_split_proportion", 1.5, "above 0, at most 1"),
    ("stabilize_split_proportion", 0.0, "above 0, at most 1"),
    ("every_n_epochs", 0, "above 0"),
    ("every_n_epochs", -1, "above 0"),
    ("every_n_epochs", True, "above 0"),
    ("seed", 1.5, "whole number"),
    ("batch_size", 0, "at least 1"),
    ("batch_size", 2.0, "at least 1"),
    ("manual_data_root", 3, "path of a folder"),
    ("extra_manual_datasets", ["a", "b"], "object of name: folder pairs"),
])
def test_a_bad_value_is_an_error_naming_the_file_and_the_key(key, value, message):
    with pytest.raises(ConfigError) as raised:
        parse_validation_settings({key: value}, "my_val.json", check_paths=False)
    (problem,) = raised.value.problems
    assert (problem.source, problem.key) == ("my_val.json", key)
    assert message in problem.message
    assert f"my_val.json: {key}: " in str(raised.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as raised:
        parse_validation_settings({"seed": "x", "every_n_epochs": 0, "val_split_mode": "auto"}, "val.json")
    assert sorted(p.key for p in raised.value.problems) == ["every_n_epochs", "seed", "val_split_mode"]


@pytest.mark.parametrize("name", [VAL, STABILIZE, COMBINED, "  "])
def test_an_extra_set_may_not_take_a_reserved_or_empty_name(name):
    with pytest.raises(ConfigError, match="extra_manual_datasets"):
        parse_validation_settings({"extra_manual_datasets": {name: "folder"}}, "val.json", check_paths=False)


def test_manual_mode_needs_a_folder():
    with pytest.raises(ConfigError, match="val.json: val_split_mode: is manual but neither manual_data_root"):
        parse_validation_settings({"val_split_mode": "manual"}, "val.json")
    parsed, _ = parse_validation_settings({"val_split_mode": "manual", "extra_manual_datasets": {"a": "x"}},
                                          "val.json", check_paths=False)
    assert not parsed.holds_out_val  # extras only, as EveryDream2


def test_folders_that_will_be_scanned_must_exist(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as raised:
        parse_validation_settings({"val_split_mode": "manual", "manual_data_root": missing,
                                   "extra_manual_datasets": {"santa": missing}}, "val.json")
    assert sorted(p.key for p in raised.value.problems) == ["extra_manual_datasets.santa", "manual_data_root"]
    assert all(missing in p.message and "does not exist" in p.message for p in raised.value.problems)
    # An unused manual_data_root is only noted.
    _, notes = parse_validation_settings({"manual_data_root": missing}, "val.json")
    assert any("manual_data_root is not used: val_split_mode is automatic" in note for note in notes)


def test_null_split_mode_means_none_and_validate_training_false_holds_nothing_out():
    assert settings(val_split_mode=None).val_split_mode == "none"
    assert not settings(val_split_mode=None).holds_out_val
    parsed, notes = parse_validation_settings({"validate_training": False}, "val.json")
    assert not parsed.holds_out_val
    assert any("validate_training is false" in note for note in notes)
    assert any("nothing to validate" in note for note in notes)


def test_a_fraction_that_is_not_one_over_a_whole_number_is_rounded_with_a_note():
    parsed, notes = parse_validation_settings({"every_n_epochs": 0.3}, "val.json")
    assert parsed.runs_per_epoch == 3
    assert any("every_n_epochs 0.3 is read as 3 validation(s) per epoch" in note for note in notes)
    assert parse_validation_settings({"every_n_epochs": 0.25}, "val.json")[1] == []


@pytest.mark.parametrize("text, message", [("{", "not valid JSON"), ("[1, 2]", "must hold a JSON object")])
def test_a_broken_file_is_an_error_naming_it(tmp_path, text, message):
    path = tmp_path / "v.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as raised:
        read_validation_config(str(path))
    assert raised.value.problems[0].source == str(path)


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_validation_config(str(tmp_path / "none.json"))


def test_the_shipped_everydream2_style_file_loads(tmp_path):
    """validation_default.json as EveryDream2 ships it (documentation block, old key names, use_relative_loss)."""
    data = {"documentation": {"validate_training": "..."}, "validate_training": True,
            "val_split_mode": "automatic", "val_data_root": None, "val_split_proportion": 0.15,
            "stabilize_training_loss": False, "stabilize_split_proportion": 0.15, "every_n_epochs": 1, "seed": 555,
            "use_relative_loss": False}
    parsed, _ = parse_validation_settings(data, "validation_default.json")
    assert parsed == ValidationSettings(source="validation_default.json")


# =================================================================================================
# The automatic split
# =================================================================================================

@pytest.mark.parametrize("count, proportion, expected", [(20, 0.15, 3), (100, 0.15, 15), (7, 0.15, 2), (3, 0.1, 1),
                                                         (10, 0.5, 5)])
def test_the_automatic_split_holds_out_ceil_of_the_proportion(count, proportion, expected):
    train = items(count)
    plan = plan_of({"auto_split_proportion": proportion}, train)
    assert len(plan.sets[VAL]) == expected  # 0.15 x 100 = 15 exactly, not 16 from float rounding
    assert len(plan.train_items) == count - expected
    assert {item.path for item in plan.sets[VAL]}.isdisjoint(item.path for item in plan.train_items)
    assert set(plan.sets[VAL]) | set(plan.train_items) == set(train)
    assert plan.tags == {VAL: "loss/val"}


def test_the_split_is_the_same_every_time_and_whatever_the_input_order():
    train = items(40)
    first = plan_of({}, train)
    shuffled = list(train)
    random.Random(3).shuffle(shuffled)
    again = plan_of({}, shuffled)
    assert first.sets == again.sets == plan_of({}, list(reversed(train))).sets
    assert names(first.sets[VAL]) == sorted(names(first.sets[VAL]))  # listed in key order
    assert again.train_items == [item for item in shuffled if item not in first.sets[VAL]]  # input order kept


def test_another_seed_holds_out_other_images():
    train = items(60)
    assert plan_of({"seed": 1}, train).sets[VAL] != plan_of({"seed": 2}, train).sets[VAL]


def test_adding_an_image_moves_at_most_one_image_between_training_and_validation():
    before = set(names(plan_of({"auto_split_proportion": 0.2}, items(50)).sets[VAL]))
    after = set(names(plan_of({"auto_split_proportion": 0.2}, items(51)).sets[VAL]))
    assert len(after - before) <= 1 and len(before - after) <= 1


def test_the_split_follows_the_path_within_the_data_root_not_where_the_root_is():
    here = plan_of({}, items(30, root="/disk1/set"), data_root="/disk1/set")
    there = plan_of({}, items(30, root="/mnt/other/set"), data_root="/mnt/other/set")
    assert names(here.sets[VAL]) == names(there.sets[VAL])
    assert here.seeds == there.seeds


def test_an_image_listed_twice_stays_on_one_side_and_validates_once():
    train = items(10)
    doubled = train + [train[i] for i in range(10)]  # a manifest may list an image twice
    plan = plan_of({"auto_split_proportion": 0.3}, doubled)
    held = {item.path for item in plan.sets[VAL]}
    assert len(plan.sets[VAL]) == len(held) == 3
    assert held.isdisjoint(item.path for item in plan.train_items)
    assert len(plan.train_items) == 14


def test_a_proportion_that_leaves_nothing_to_train_is_an_error():
    with pytest.raises(ConfigError) as raised:
        plan_of({"auto_split_proportion": 0.5}, items(1))
    (problem,) = raised.value.problems
    assert (problem.source, problem.key) == ("val.json", "auto_split_proportion")
    assert "leaves none to train" in problem.message
    with pytest.raises(ConfigError, match="leaves none to train"):
        plan_of({"auto_split_proportion": 0.9}, items(5))


def test_holding_out_every_image_that_trains_is_an_error():
    train = items(1) + items(4, root="/data/train/reg", multiply=0.0)  # multiply 0: never trains
    keys = [item_key(item.path, [ROOT]) for item in train]
    seed = next(seed for seed in range(100) if keys[0] in split_keys(keys, 0.2, seed, "validation-split"))
    with pytest.raises(ConfigError, match="auto_split_proportion: holding out .* leaves no training image with "
                                          "multiply above 0"):
        plan_of({"auto_split_proportion": 0.2, "seed": seed}, train)
    with pytest.raises(ConfigError, match="manual_data_root: holding out"):
        plan_of({"val_split_mode": "manual", "manual_data_root": "/v"}, train,
                scan=lambda folder, resolution: ScanResult(train[:1], []))


def test_split_keys_is_ceil_of_the_distinct_keys_and_order_free():
    keys = [f"k{i}" for i in range(40)]
    assert split_keys(keys, 0.25, 5, "x") == split_keys(list(reversed(keys)) + keys, 0.25, 5, "x")
    assert len(split_keys(keys, 0.25, 5, "x")) == 10
    assert len(split_keys(keys[:10], 0.25, 5, "x")) == 3
    assert split_keys(keys, 0.25, 5, "x") != split_keys(keys, 0.25, 5, "y")  # purposes draw independently


# =================================================================================================
# Manual folders and extra sets
# =================================================================================================

def test_manual_mode_validates_a_folder_and_trains_on_everything(tmp_path):
    for name in ("b.png", "a.png", "sub/c.png"):
        image(tmp_path / "val" / name)
    train = items(5)
    plan = plan_of({"val_split_mode": "manual", "manual_data_root": str(tmp_path / "val")}, train,
                   scan=scan_dataset)
    assert names(plan.sets[VAL]) == ["a.png", "b.png", "c.png"]
    assert plan.train_items == train
    assert plan.sets[VAL][0].main_prompt == "a" and plan.sets[VAL][0].bucket == (256, 256)


def test_an_empty_manual_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError) as raised:
        plan_of({"val_split_mode": "manual", "manual_data_root": str(tmp_path / "val")}, items(5))
    (problem,) = raised.value.problems
    assert (problem.source, problem.key) == ("val.json", "manual_data_root")
    assert str(tmp_path / "val") in problem.message and "no usable images" in problem.message


def test_a_manual_folder_of_unreadable_images_lists_why(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="broken.png"):
        plan_of({"val_split_mode": "manual", "manual_data_root": str(tmp_path / "val")}, items(5))


def test_manual_validation_images_that_are_also_training_images_leave_training(tmp_path):
    root = tmp_path / "train"
    for i in range(4):
        image(root / f"t{i}.png")
    image(root / "val" / "v.png")  # the validation folder inside the data root
    train = scan_dataset(str(root), 256).items
    plan = plan_of({"val_split_mode": "manual", "manual_data_root": str(root / "val")}, train, data_root=str(root))
    assert names(plan.sets[VAL]) == ["v.png"]
    assert sorted(names(plan.train_items)) == ["t0.png", "t1.png", "t2.png", "t3.png"]
    assert any("left out of training" in note for note in plan.notes)


def test_extra_sets_are_measured_under_their_names_in_any_mode(tmp_path):
    image(tmp_path / "santa" / "s1.png")
    image(tmp_path / "santa" / "s2.png")
    image(tmp_path / "hats" / "h.png")
    train = items(10)
    extras = {"santa suit": str(tmp_path / "santa"), "hats": str(tmp_path / "hats")}
    plan = plan_of({"extra_manual_datasets": extras}, train)
    assert list(plan.sets) == [VAL, "santa suit", "hats"]
    assert plan.tags == {VAL: "loss/val", "santa suit": "loss/santa suit", "hats": "loss/hats"}
    assert names(plan.sets["santa suit"]) == ["s1.png", "s2.png"]
    assert plan.held_out == [VAL, "santa suit", "hats"]
    assert plan.combined_tag == "loss/_all_val_combined"
    only_extras = plan_of({"val_split_mode": "none", "extra_manual_datasets": extras}, train)
    assert list(only_extras.sets) == ["santa suit", "hats"] and only_extras.train_items == train


def test_an_empty_extra_folder_is_an_error_naming_its_key(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as raised:
        plan_of({"extra_manual_datasets": {"empty set": str(tmp_path / "empty")}}, items(5))
    assert raised.value.problems[0].key == "extra_manual_datasets.empty set"
    assert str(tmp_path / "empty") in raised.value.problems[0].message


def test_extra_images_that_also_train_stay_in_training_with_a_note(tmp_path):
    root = tmp_path / "train"
    for i in range(3):
        image(root / f"t{i}.png")
    train = scan_dataset(str(root), 256).items
    plan = plan_of({"val_split_mode": "none", "extra_manual_datasets": {"same": str(root)}}, train,
                   data_root=str(root))
    assert plan.train_items == train
    assert any("loss/same is not a held-out measure" in note for note in plan.notes)


def test_the_caller_may_scan_the_folders_itself():
    calls = []

    def fake_scan(folder, resolution):
        calls.append((folder, resolution))
        return ScanResult(items(2, root=folder, bucket=(320, 192)), [SkippedFile("/v/x.png", "broken")], ["a note"])

    plan = build_validation_plan(settings(extra_manual_datasets={"x": "/v"}, val_split_mode="none"), items(4),
                                 resolution=320, batch_size=2, data_root=ROOT, scan=fake_scan)
    assert calls == [("/v", 320)]
    assert len(plan.sets["x"]) == 2 and plan.skipped == [SkippedFile("/v/x.png", "broken")]
    assert "extra_manual_datasets.x: a note" in plan.notes


# =================================================================================================
# The stabilize subset
# =================================================================================================

def test_the_stabilize_subset_is_training_images_that_keep_training():
    train = items(40)
    plan = plan_of({"stabilize_training_loss": True, "stabilize_split_proportion": 0.25}, train)
    stabilize = plan.sets[STABILIZE]
    assert len(plan.sets[VAL]) == 6 and len(plan.train_items) == 34
    assert len(stabilize) == 9  # ceil(0.25 x 34)
    assert set(stabilize) <= set(plan.train_items)  # still trained
    assert set(stabilize).isdisjoint(plan.sets[VAL])
    assert list(plan.sets) == [VAL, STABILIZE] and plan.tags[STABILIZE] == "loss/stabilize-train"
    assert plan.held_out == [VAL] and plan.combined_tag is None  # a training loss is not a validation loss


def test_the_stabilize_subset_does_not_depend_on_the_input_order_or_take_images_that_never_train():
    train = items(20) + items(5, root="/data/train/off", multiply=0.0)
    values = {"val_split_mode": "none", "stabilize_training_loss": True, "stabilize_split_proportion": 1.0}
    plan = plan_of(values, train)
    assert len(plan.sets[STABILIZE]) == 20 and all(item.multiply > 0 for item in plan.sets[STABILIZE])
    values["stabilize_split_proportion"] = 0.3
    assert plan_of(values, train).sets == plan_of(values, list(reversed(train))).sets


def test_the_summary_says_where_each_set_comes_from():
    plan = plan_of({"stabilize_training_loss": True, "every_n_epochs": 0.5}, items(20), batch_size=4)
    text = "\n".join(plan.summary)
    assert "validation set val = 3 image(s) held out of training (auto_split_proportion 0.15 of 20" in text
    assert "validation set stabilize-train = 3 training image(s)" in text
    assert "validation batch_size = 4 (the training batch_size)" in text
    assert "every_n_epochs = 0.5 (2 per epoch" in text
    assert plan_of({"batch_size": 8}, items(20)).batch_size == 8


# =================================================================================================
# The schedule
# =================================================================================================

def steps(every, per_epoch, **kwargs):
    return [(p.epoch, p.batch, p.global_step) for p in validation_schedule(every, per_epoch, **kwargs)]


def test_every_epoch_runs_at_each_epochs_end_and_before_training():
    assert steps(1, [4, 4, 4]) == [(0, -1, 0), (0, 3, 4), (1, 3, 8), (2, 3, 12)]
    assert steps(1, [4, 4, 4], before_training=False) == [(0, 3, 4), (1, 3, 8), (2, 3, 12)]


def test_half_an_epoch_runs_mid_epoch_and_at_the_end():
    assert steps(0.5, [4, 4], before_training=False) == [(0, 1, 2), (0, 3, 4), (1, 1, 6), (1, 3, 8)]
    assert steps(0.5, [5], before_training=False) == [(0, 2, 3), (0, 4, 5)]  # after ceil(2.5) batches


def test_a_quarter_epoch_runs_four_times_per_epoch():
    assert steps(0.25, [8, 8], before_training=False) == [(0, 1, 2), (0, 3, 4), (0, 5, 6), (0, 7, 8),
                                                          (1, 1, 10), (1, 3, 12), (1, 5, 14), (1, 7, 16)]


def test_more_runs_than_batches_run_after_every_batch_once():
    assert steps(0.1, [3], before_training=False) == [(0, 0, 1), (0, 1, 2), (0, 2, 3)]


def test_two_epochs_runs_at_every_second_epochs_end_and_after_the_last_step():
    assert steps(2, [3] * 4, before_training=False) == [(1, 2, 6), (3, 2, 12)]
    assert steps(2, [3] * 5, before_training=False) == [(1, 2, 6), (3, 2, 12), (4, 2, 15)]  # the final model
    assert steps(2, [3] * 5, before_training=False, at_end=False) == [(1, 2, 6), (3, 2, 12)]


def test_a_fractional_interval_above_one_lands_part_way_through_an_epoch():
    # 1.5 epochs: the middle of the 2nd epoch, the end of the 3rd (EveryDream2 ran only at the 3rd and 6th).
    assert steps(1.5, [4, 4, 4], before_training=False, at_end=False) == [(1, 1, 6), (2, 3, 12)]


def test_epochs_of_different_lengths_count_global_steps():
    assert steps(1, [3, 2, 4]) == [(0, -1, 0), (0, 2, 3), (1, 1, 5), (2, 3, 9)]
    assert steps(0.5, [3, 2], before_training=False) == [(0, 1, 2), (0, 2, 3), (1, 0, 4), (1, 1, 5)]


def test_the_plan_schedules_with_its_settings():
    plan = plan_of({"every_n_epochs": 0.5}, items(10))
    assert plan.schedule([4]) == [ValidationPoint(0, -1, 0), ValidationPoint(0, 1, 2), ValidationPoint(0, 3, 4)]


# =================================================================================================
# Fixed per-image seeds
# =================================================================================================

def test_item_seeds_are_stable_distinct_and_in_range():
    assert item_seed(555, "a/b.png") == item_seed(555, "a/b.png")
    seeds = {item_seed(555, f"img{i}.png") for i in range(1000)}
    assert len(seeds) == 1000
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert item_seed(556, "a/b.png") != item_seed(555, "a/b.png")


def test_item_seeds_are_pinned():
    """A change here changes the validation noise of every run, so it must be deliberate."""
    assert item_seed(555, "img000.png") == 7256448545168489782
    assert item_seed(0, "x") == 3607155508784373070


def test_plan_seeds_follow_the_image_not_its_position():
    train = items(30)
    plan = plan_of({"stabilize_training_loss": True}, train)
    reordered = plan_of({"stabilize_training_loss": True}, list(reversed(train)))
    for name in plan.sets:
        assert len(plan.seeds[name]) == len(plan.sets[name])
        assert plan.seeds[name] == [item_seed(555, item_key(item.path, [ROOT])) for item in plan.sets[name]]
        assert plan.seeds[name] == reordered.seeds[name]


def test_item_key_is_relative_to_the_root_with_forward_slashes(tmp_path):
    assert item_key(os.path.join(ROOT, "sub", "a.png"), [ROOT]) == "sub/a.png"
    assert item_key("/elsewhere/a.png", [ROOT]) == os.path.abspath("/elsewhere/a.png").replace(os.sep, "/")
    manifest = tmp_path / "list.json"
    manifest.write_text("[]")
    assert item_key(str(tmp_path / "imgs" / "a.png"), [str(manifest)]) == "imgs/a.png"


# =================================================================================================
# Batches
# =================================================================================================

def test_batches_hold_one_bucket_each_and_every_image_once():
    mixed = (items(5, bucket=(256, 256)) + items(3, root="/data/train/wide", bucket=(320, 192))
             + items(1, root="/data/train/tall", bucket=(192, 320)))
    batches = validation_batches(mixed, 2)
    assert [len(batch) for batch in batches] == [1, 2, 2, 1, 2, 1]  # buckets sorted, last batch short
    assert all(len({sample.bucket for sample in batch}) == 1 for batch in batches)
    assert sorted(sample.index for batch in batches for sample in batch) == list(range(9))
    assert batches == validation_batches(mixed, 2)
    assert all(sample.bucket == mixed[sample.index].bucket for batch in batches for sample in batch)


def test_validation_samples_are_not_augmented():
    item = ImageItem(path="/d/a.png", size=(400, 300), bucket=(320, 192), main_prompt="a cat",
                     tags=(Tag("b", 1.0), Tag("c", 2.0)), shuffle_tags=True, flip_p=1.0, cond_dropout=1.0,
                     loss_scale=-1.0, multiply=3.0, batch_id="style")
    (batch,) = validation_batches([item], 4)
    (sample,) = batch
    assert (sample.index, sample.copy, sample.crop_x, sample.crop_y, sample.jitter, sample.flip) == (
        0, 0, 0.5, 0.5, (0.0, 0.0, 0.0, 0.0), False)
    assert sample.caption == "a cat, c, b" == item.caption  # no dropout, no shuffle, heaviest tag first
    assert sample.loss_scale == 1.0


def test_plan_batches_use_the_validation_batch_size():
    plan = plan_of({"batch_size": 3, "auto_split_proportion": 0.5}, items(14))
    assert [len(batch) for batch in plan.batches(VAL)] == [3, 3, 1]


def test_the_loader_loads_a_validation_set(tmp_path):
    torch = pytest.importorskip("torch")
    from data.dataset import EpochBatches, make_loader

    image(tmp_path / "val" / "a.png", (96, 64))
    image(tmp_path / "val" / "b.png", (96, 64))
    image(tmp_path / "val" / "c.png", (64, 96))
    plan = build_validation_plan(settings(val_split_mode="manual", manual_data_root=str(tmp_path / "val")),
                                 items(3), resolution=256, batch_size=2, data_root=ROOT)
    sampler = EpochBatches()
    sampler.set_plan(plan.batches(VAL))
    loaded = list(make_loader(plan.sets[VAL], sampler, num_workers=0, pin_memory=False))
    assert [tuple(batch["pixels"].shape) for batch in loaded] == [(1, 3, 320, 192), (2, 3, 192, 320)]
    assert [batch["captions"] for batch in loaded] == [["c"], ["a", "b"]]
    assert all(batch["loss_scale"].tolist() == [1.0] * len(batch["captions"]) for batch in loaded)
    seeds = [plan.seeds[VAL][index] for batch in loaded for index in batch["indices"]]
    assert sorted(seeds) == sorted(plan.seeds[VAL]) and torch.is_tensor(loaded[0]["pixels"])


def test_a_schedule_needs_a_positive_interval():
    with pytest.raises(ValueError, match="every_n_epochs must be above 0"):
        validation_schedule(0, [4])


@pytest.mark.parametrize("settings, measured", [
    ({"validate_training": False, "stabilize_training_loss": True}, " (only stabilize-train)"),
    ({"val_split_mode": "none"}, ""),  # nothing measured at all
])
def test_early_stopping_and_the_best_checkpoint_need_a_held_out_set(tmp_path, settings, measured):
    from utils.run_plan import plan_run

    config = tmp_path / "validation.json"
    config.write_text(json.dumps(settings))
    with pytest.raises(ConfigError) as caught:
        plan_run(["--config", os.path.join(REPO_ROOT, "train.json"), "--validation_config", str(config),
                  "--early_stopping_patience", "2", "--save_best_val", "true", "--logdir", str(tmp_path)])
    message = str(caught.value)
    for key in ("early_stopping_patience", "save_best_val"):
        assert f"{key}" in message
    assert f"{config} holds out none{measured}." in message
