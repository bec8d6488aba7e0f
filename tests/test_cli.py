"""The command line as a user meets it: usage, --help, and config errors before anything heavy loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from utils.config import FIELDS, SUPPORTED_RESOLUTIONS

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_no_arguments_prints_usage_and_the_supported_resolutions():
    result = run("train.py")
    assert result.returncode == 0
    assert "usage: python train.py --config train.json" in result.stdout
    assert "Supported resolutions (px): " + ", ".join(str(r) for r in SUPPORTED_RESOLUTIONS) in result.stdout


def test_help_lists_every_key_and_exits_zero():
    result = run("train.py", "--help")
    assert result.returncode == 0
    for name in FIELDS:
        assert f"--{name}" in result.stdout, name


def test_a_bad_config_fails_with_every_problem_before_torch_is_imported(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"resume_ckpt": "builtin:tiny", "data_root": str(tmp_path / "none"),
                                  "batch_size": -2, "resolution": 513, "flipp": 0.5}))
    script = ("import sys, train\n"
              f"code = train.main(['--config', {str(config)!r}, '--logdir', {str(tmp_path / 'logs')!r}])\n"
              "print('torch imported:', 'torch' in sys.modules)\n"
              "sys.exit(code)\n")
    result = run("-c", script)
    assert result.returncode == 2
    assert "torch imported: False" in result.stdout  # so certainly no model was loaded
    assert "4 problem(s)" in result.stderr
    for text in ("data_root", "batch_size", "resolution", "flipp: unknown key", "Did you mean 'flip_p'?", str(config)):
        assert text in result.stderr, text
    assert not (tmp_path / "logs").exists()  # no run folder for a run that never started


def train_on_images_reporting_torch(tmp_path):
    """train.main on tmp_path/images with the tiny model, in a fresh process that says whether torch loaded."""
    script = ("import sys, train\n"
              f"code = train.main(['--resume_ckpt', 'builtin:tiny', '--data_root', {str(tmp_path / 'images')!r},"
              f" '--logdir', {str(tmp_path / 'logs')!r}])\n"
              "print('torch imported:', 'torch' in sys.modules)\n"
              "sys.exit(code)\n")
    return run("-c", script)


def test_a_folder_without_images_fails_before_any_model_loads(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    result = train_on_images_reporting_torch(tmp_path)
    assert result.returncode == 2
    assert "holds no usable images" in result.stderr
    assert "torch imported: False" in result.stdout
    assert not (tmp_path / "logs").exists()


def test_a_data_set_where_every_multiply_is_0_fails_before_any_model_loads(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (256, 256), "red").save(tmp_path / "images" / "a red square.png")
    (tmp_path / "images" / "multiply.txt").write_text("0")
    result = train_on_images_reporting_torch(tmp_path)
    assert result.returncode == 2
    assert "every one has multiply: 0" in result.stderr
    assert "torch imported: False" in result.stdout


def test_an_unreachable_model_is_a_clear_error_with_exit_code_2(tmp_path):
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (256, 256), "red").save(tmp_path / "images" / "a red square.png")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--resume_ckpt", "nobody-here/no-such-model",
                             "--data_root", str(tmp_path / "images"), "--logdir", str(tmp_path / "logs")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    assert "nobody-here/no-such-model" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def run_main_in_process(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """train.main in a fresh interpreter; reports whether torch got imported."""
    script = ("import sys, train\n"
              f"code = train.main({list(args)!r} + ['--logdir', {str(tmp_path / 'logs')!r}])\n"
              "print('torch imported:', 'torch' in sys.modules)\n"
              "sys.exit(code)\n")
    return run("-c", script)


def test_findlast_with_nothing_to_find_stops_before_any_model_or_run_folder(tmp_path):
    result = run_main_in_process(tmp_path, "--config", "train.json", "--resume_ckpt", "findlast")
    assert result.returncode == 2
    assert "findlast found no finished checkpoint" in result.stderr
    assert "torch imported: False" in result.stdout and not (tmp_path / "logs").exists()


def test_a_damaged_single_file_model_is_a_clear_error_not_a_stack_trace(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not really")
    result = run_main_in_process(tmp_path, "--config", "train.json", "--resume_ckpt", str(model),
                                 "--ckpt_cache_dir", str(tmp_path / "cache"))
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "is not a readable .safetensors file" in output and "Traceback" not in output
    assert not (tmp_path / "cache").exists()


def test_a_missing_single_file_is_refused_before_anything_loads(tmp_path):
    result = run_main_in_process(tmp_path, "--config", "train.json", "--resume_ckpt", str(tmp_path / "nope.ckpt"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert "torch imported: False" in result.stdout and not (tmp_path / "logs").exists()


def test_a_missing_optional_package_is_a_config_error(monkeypatch):
    import importlib.util

    import train
    from utils.config import ConfigError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("bitsandbytes", "xformers") else real_find_spec(name, *a))
    monkeypatch.chdir(REPO)
    try:
        train.plan_run(["--config", "train.json", "--optimizer", "adamw8bit", "--attn_type", "xformers"])
    except ConfigError as error:
        messages = [str(p) for p in error.problems]
    else:
        raise AssertionError("no ConfigError")
    assert any("optimizer" in m and "pip install bitsandbytes" in m for m in messages)
    assert any("attn_type" in m and "pip install xformers" in m for m in messages)


def test_an_accelerate_config_that_asks_for_torch_compile_is_turned_off_and_said_so(monkeypatch, caplog):
    """`accelerate launch --dynamo_backend inductor` (or a config with dynamo on) would compile the trained
    modules through accelerate's prepare(); train.py does not compile, and says so."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DynamoBackend

    import train

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    plan = train.plan_run(["--config", "train.json"])
    AcceleratorState._reset_state(True)  # the state is per process: other tests' accelerators set it
    try:
        accelerator = train.make_accelerator(plan)
        assert accelerator.state.dynamo_plugin.backend == DynamoBackend.NO
    finally:
        AcceleratorState._reset_state(True)
    assert "dynamo_backend (INDUCTOR) is ignored" in caplog.text


def test_cache_text_embeddings_is_refused_where_a_folder_shuffles_its_tags(tmp_path):
    """shuffle_tags.txt turns shuffling on for one folder: its captions differ every epoch, so the in-memory
    cache would grow every epoch; refused before any model loads, naming the key and an image."""
    import shutil

    import train
    from utils.config import ConfigError

    shutil.copytree(REPO / "examples" / "images", tmp_path / "images")
    folder = next(path.parent for path in sorted((tmp_path / "images").rglob("*.jpg")))
    (folder / "shuffle_tags.txt").write_text("true")
    arguments = ["--resume_ckpt", "builtin:tiny", "--data_root", str(tmp_path / "images"),
                 "--disable_textenc_training", "true", "--sample_prompts", "null", "--validation_config", "null"]
    assert not train.plan_run(arguments).config.cache_text_embeddings  # the folder alone is fine
    try:
        train.plan_run(arguments + ["--cache_text_embeddings", "true"])
    except ConfigError as error:
        messages = [str(p) for p in error.problems]
    else:
        raise AssertionError("no ConfigError")
    assert len(messages) == 1 and "cache_text_embeddings" in messages[0] and str(folder) in messages[0]
