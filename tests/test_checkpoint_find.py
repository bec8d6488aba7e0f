"""`findlast`: the newest finished checkpoint under logdir, by its recorded save time; and checkpoint names."""

from __future__ import annotations

import json
import os

import pytest

from utils.checkpoint import NoCheckpointFound, checkpoint_name, find_last_checkpoint, is_finished_checkpoint


def make_checkpoint(parent, name, saved_at=None, global_step=0, *, record=True, model_index=True, raw=None):
    """A fake checkpoint folder: model_index.json and (optionally) a checkpoint.json record."""
    folder = os.path.join(str(parent), name)
    os.makedirs(os.path.join(folder, "unet"), exist_ok=True)
    if model_index:
        with open(os.path.join(folder, "model_index.json"), "w") as handle:
            json.dump({"_class_name": "StableDiffusionPipeline"}, handle)
    if raw is not None:
        with open(os.path.join(folder, "checkpoint.json"), "w") as handle:
            handle.write(raw)
    elif record:
        with open(os.path.join(folder, "checkpoint.json"), "w") as handle:
            json.dump({"saved_at": saved_at, "global_step": global_step}, handle)
    return folder


def set_mtime(folder, when):
    """Make a folder and everything in it look modified at `when` (seconds since the epoch)."""
    for root, dirs, files in os.walk(folder):
        for name in files + dirs:
            os.utime(os.path.join(root, name), (when, when))
    os.utime(folder, (when, when))


@pytest.fixture
def ckpts(tmp_path):
    """logdir/<run>/ckpts, the layout of a run folder."""
    folder = tmp_path / "logs" / "myproj-20240101-000000" / "ckpts"
    folder.mkdir(parents=True)
    return folder


def test_picks_the_newest_recorded_save_time(ckpts, tmp_path):
    make_checkpoint(ckpts, "myproj-ep01-gs00010", 1000.0, 10)
    newest = make_checkpoint(ckpts, "myproj-ep03-gs00030", 3000.0, 30)
    make_checkpoint(ckpts, "myproj-ep02-gs00020", 2000.0, 20)
    assert find_last_checkpoint(str(tmp_path / "logs")) == newest


def test_recorded_save_time_wins_over_file_times(ckpts, tmp_path):
    older = make_checkpoint(ckpts, "myproj-ep01-gs00010", 1_700_000_000.0, 10)
    newer = make_checkpoint(ckpts, "myproj-ep02-gs00020", 1_700_000_500.0, 20)
    set_mtime(older, 1_800_000_000)  # the older checkpoint's files look newest (e.g. copied later)
    set_mtime(newer, 1_600_000_000)
    assert os.path.getmtime(older) > os.path.getmtime(newer)
    assert find_last_checkpoint(str(tmp_path / "logs")) == newer


def test_searches_every_run_folder_under_logdir(tmp_path):
    logs = tmp_path / "logs"
    make_checkpoint(logs / "run-a" / "ckpts", "a-ep05-gs00050", 500.0, 50)
    newest = make_checkpoint(logs / "run-b" / "ckpts", "b-ep01-gs00005", 900.0, 5)
    make_checkpoint(logs / "run-c" / "ckpts", "c-ep09-gs00090", 100.0, 90)
    assert find_last_checkpoint(str(logs)) == newest


@pytest.mark.parametrize("prefix", [".tmp-", "errored-", "interrupted-"])
def test_ignores_unfinished_checkpoints_even_when_newer(ckpts, tmp_path, prefix):
    finished = make_checkpoint(ckpts, "myproj-ep01-gs00010", 1000.0, 10)
    make_checkpoint(ckpts, f"{prefix}myproj-ep02-gs00020", 9000.0, 20)
    assert find_last_checkpoint(str(tmp_path / "logs")) == finished


def test_ignores_a_folder_without_checkpoint_record(ckpts, tmp_path):
    finished = make_checkpoint(ckpts, "myproj-ep01-gs00010", 1000.0, 10)
    make_checkpoint(ckpts, "myproj-ep02-gs00020", record=False)
    assert find_last_checkpoint(str(tmp_path / "logs")) == finished


def test_ignores_a_folder_without_model_index(ckpts, tmp_path):
    finished = make_checkpoint(ckpts, "myproj-ep01-gs00010", 1000.0, 10)
    make_checkpoint(ckpts, "myproj-ep02-gs00020", 9000.0, 20, model_index=False)
    assert find_last_checkpoint(str(tmp_path / "logs")) == finished


@pytest.mark.parametrize("raw", [
    '{"saved_at": 9000.0, "global_step": ',     # truncated JSON
    "",                                         # empty file
    '{"global_step": 20}',                      # no saved_at
    '{"saved_at": 9000.0}',                     # no global_step
    '{"saved_at": "yesterday", "global_step": 20}',
    '{"saved_at": null, "global_step": 20}',
    "[9000.0, 20]",                             # not an object
    "null",
    '{"saved_at": NaN, "global_step": 20}',     # Python's JSON reader accepts NaN and Infinity
    '{"saved_at": Infinity, "global_step": 20}',
])
def test_ignores_a_damaged_checkpoint_record(ckpts, tmp_path, raw):
    finished = make_checkpoint(ckpts, "myproj-ep01-gs00010", 1000.0, 10)
    make_checkpoint(ckpts, "myproj-ep02-gs00020", raw=raw)
    assert find_last_checkpoint(str(tmp_path / "logs")) == finished


def test_ignores_a_record_that_is_not_utf8(ckpts, tmp_path):
    finished = make_checkpoint(ckpts, "myproj-ep01-gs00010", 1000.0, 10)
    damaged = make_checkpoint(ckpts, "myproj-ep02-gs00020", record=False)
    with open(os.path.join(damaged, "checkpoint.json"), "wb") as handle:
        handle.write(b"\xff\xfe\x00garbage\x9c")
    assert find_last_checkpoint(str(tmp_path / "logs")) == finished


def test_equal_save_times_are_decided_by_global_step(ckpts, tmp_path):
    make_checkpoint(ckpts, "z-ep01-gs00010", 1000.0, 10)
    later = make_checkpoint(ckpts, "a-ep02-gs00020", 1000.0, 20)
    assert find_last_checkpoint(str(tmp_path / "logs")) == later


def test_an_empty_logdir_raises_a_helpful_error(tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    with pytest.raises(NoCheckpointFound) as error:
        find_last_checkpoint(str(logdir))
    message = str(error.value)
    assert str(logdir) in message
    assert "findlast" in message and "no finished checkpoint" in message
    assert "resume_ckpt" in message  # says what to do instead


def test_a_missing_logdir_raises_no_checkpoint_found(tmp_path):
    with pytest.raises(NoCheckpointFound):
        find_last_checkpoint(str(tmp_path / "does-not-exist"))


def test_a_logdir_of_only_unfinished_checkpoints_raises(ckpts, tmp_path):
    make_checkpoint(ckpts, ".tmp-myproj-ep01-gs00010", 1000.0, 10)
    make_checkpoint(ckpts, "errored-myproj-ep01-gs00011", 1001.0, 11)
    make_checkpoint(ckpts, "myproj-ep01-gs00012", record=False)
    with pytest.raises(NoCheckpointFound):
        find_last_checkpoint(str(tmp_path / "logs"))


def test_is_finished_checkpoint(ckpts):
    assert is_finished_checkpoint(make_checkpoint(ckpts, "myproj-ep01-gs00010", 1.0, 10))
    assert not is_finished_checkpoint(make_checkpoint(ckpts, "interrupted-myproj-ep01-gs00010", 1.0, 10))
    assert not is_finished_checkpoint(make_checkpoint(ckpts, "no-record", record=False))
    assert not is_finished_checkpoint(str(ckpts / "absent"))


@pytest.mark.parametrize("args, expected", [
    (("demo", 3, 42, "last-"), "last-demo-ep03-gs00042"),
    (("demo", 3, 42), "demo-ep03-gs00042"),
    (("myproj", 0, 0), "myproj-ep00-gs00000"),
    (("myproj", 12, 123456), "myproj-ep12-gs123456"),
    (("myproj", 100, 99999, "last-"), "last-myproj-ep100-gs99999"),
])
def test_checkpoint_name(args, expected):
    assert checkpoint_name(*args) == expected
