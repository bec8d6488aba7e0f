"""The training config: precedence, every key usable both ways, legacy keys, and every kind of error."""

from __future__ import annotations

import dataclasses
import json

import pytest

from utils.config import (FIELD_TYPES, FIELDS, LEGACY_KEYS, SUPPORTED_RESOLUTIONS, ConfigError, TrainConfig,
                          build_parser, load_config, merge, validate)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    return str(folder)


def write_config(tmp_path, values: dict, name: str = "train.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return str(path)


def problems_of(excinfo) -> list[str]:
    return [str(p) for p in excinfo.value.problems]


# --- precedence -----------------------------------------------------------------------------------

def test_defaults_then_file_then_command_line(tmp_path, images):
    path = write_config(tmp_path, {"resume_ckpt": "builtin:tiny", "data_root": images, "batch_size": 3, "lr": 1e-5})
    loaded = load_config(["--config", path, "--batch_size", "4"])
    assert loaded.config.batch_size == 4  # command line beats the file
    assert loaded.config.lr == 1e-5  # the file beats the default
    assert loaded.config.resolution == 512  # the default when neither sets it
    assert loaded.origins["batch_size"] == "command line"
    assert loaded.origins["lr"] == path
    assert loaded.origins["resolution"] == "default"


def test_command_line_can_turn_off_a_flag_the_file_turned_on(tmp_path, images):
    path = write_config(tmp_path, {"resume_ckpt": "builtin:tiny", "data_root": images, "gradient_checkpointing": True})
    assert load_config(["--config", path]).config.gradient_checkpointing is True
    assert load_config(["--config", path, "--gradient_checkpointing", "false"]).config.gradient_checkpointing is False
    assert load_config(["--config", path, "--gradient_checkpointing"]).config.gradient_checkpointing is True


def test_command_line_null_clears_a_nullable_key(tmp_path, images):
    path = write_config(tmp_path, {"resume_ckpt": "builtin:tiny", "data_root": images, "lr": 3e-6})
    assert load_config(["--config", path, "--lr", "null"]).config.lr is None


def example_value(name: str, images: str, optimizer_file: str):
    """A valid value for `name` that differs from its default."""
    special = {"resume_ckpt": "builtin:tiny", "data_root": images, "optimizer_config": optimizer_file,
               "resolution": 768, "plugins": ["my_plugins.Example"], "project_name": "other_project",
               "timestep_start": 10, "timestep_end": 900, "seed": 42, "lr_warmup_steps": 7, "lr_decay_steps": 70,
               "ema_resume_model": images}  # a folder (what it holds is checked when the model loads)
    if name in special:
        return special[name]
    field, tp = FIELDS[name], FIELD_TYPES[name]
    meta = field.metadata
    default = field.default
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != default)
    base = tp if tp in (bool, int, float, str) else next(a for a in tp.__args__ if a is not type(None))
    if base is bool:
        return not default
    if base is str:
        return "somewhere"
    upper = meta["maximum"]
    if base is int:
        value = (default or 0) + 1
        return value if upper is None or value <= upper else upper - 1
    value = 0.5 if upper is not None and upper <= 1 else 2.5
    return value


def as_flag_values(value) -> list[str]:
    """How a value is typed after its --flag."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value).lower() if isinstance(value, bool) else str(value)]


def test_every_key_is_usable_in_json_and_on_the_command_line(tmp_path, images):
    optimizer_file = write_config(tmp_path, {}, "optimizer_custom.json")
    base = {"resume_ckpt": "builtin:tiny", "data_root": images}
    for name in FIELDS:
        value = example_value(name, images, optimizer_file)
        assert value != FIELDS[name].default, name
        needs = {"ema_resume_model": {"ema_decay_rate": 0.9},  # the keys it only works with
                 "early_stopping_patience": {"validation_config": "validation.json"},
                 "save_best_val": {"validation_config": "validation.json"},
                 "cache_text_embeddings": {"disable_textenc_training": True}}.get(name, {})
        from_json = load_config(["--config", write_config(tmp_path, {**base, **needs, name: value})]).config
        from_cli = load_config(["--config", write_config(tmp_path, {**base, **needs}), f"--{name}",
                                *as_flag_values(value)]).config
        assert getattr(from_json, name) == value, name
        assert getattr(from_cli, name) == value, name


# --- legacy EveryDream2 keys ----------------------------------------------------------------------

# Every key EveryDream2 defines (its argparse flags and the keys of its train.json and chain*.json), by
# name: see ../shared/reference/ED2_BEHAVIOR.md section 1.
EVERYDREAM2_KEYS = """
amp attn_type batch_size ckpt_every_n_minutes clip_grad_norm clip_skip cond_dropout data_root disable_amp
disable_textenc_training disable_unet_training disable_xformers ed1_mode embedding_perturbation ema_decay_rate
ema_device ema_resume_model ema_sample_ema_model ema_sample_nonema_model ema_strength_target
ema_update_interval enable_zero_terminal_snr flip_p gpuid grad_accum gradient_checkpointing hf_repo_subfolder
keep_tags load_settings_every_epoch log_step logdir loss_type lowvram lr lr_decay_steps lr_scheduler
lr_warmup_steps max_epochs min_snr_gamma no_prepend_last no_save_ckpt notebook optimizer_config plugins
project_name pyramid_noise_discount rated_dataset rated_dataset_target_dropout_percent resolution resume_ckpt
run_name sample_prompts sample_steps save_ckpt_dir save_ckpts_from_n_epochs save_every_n_epochs
save_full_precision save_optimizer scale_lr seed shuffle_tags timestep_end timestep_start train_sampler
useadam8bit validation_config wandb write_schedule zero_frequency_noise_ratio
""".split()


def test_every_everydream2_key_is_known():
    unknown = [key for key in EVERYDREAM2_KEYS if key not in FIELDS and key not in LEGACY_KEYS]
    assert not unknown


def test_an_everydream2_era_chain_file_loads(tmp_path, images):
    """The shape of EveryDream2's own chain0.json: legacy keys and nulls, all accepted and explained."""
    path = write_config(tmp_path, {
        "amp": True, "batch_size": 12, "ckpt_every_n_minutes": None, "clip_grad_norm": None, "clip_skip": 0,
        "cond_dropout": 0.0, "data_root": images, "disable_textenc_training": False, "disable_xformers": True,
        "flip_p": 0.0, "ed1_mode": True, "gpuid": 0, "gradient_checkpointing": True, "grad_accum": 1,
        "logdir": "logs", "log_step": 25, "lowvram": False, "lr": 2.5e-6, "lr_decay_steps": 0,
        "lr_scheduler": "constant", "lr_warmup_steps": None, "max_epochs": 15, "project_name": "myproj_ch0",
        "resolution": 384, "resume_ckpt": "findlast", "sample_prompts": "sample_prompts.txt", "sample_steps": 300,
        "save_ckpt_dir": None, "save_every_n_epochs": 99, "save_optimizer": False, "scale_lr": False, "seed": -1,
        "shuffle_tags": False, "useadam8bit": True, "wandb": False, "write_schedule": True})
    loaded = load_config(["--config", path])
    assert loaded.config.optimizer == "adamw8bit" and loaded.config.resolution == 384
    assert not any(key in n for n in loaded.notes for key in ("write_schedule", "sample_steps"))  # they work now


def test_every_legacy_key_is_accepted_and_explained(tmp_path, images):
    values = {"amp": True, "useadam8bit": False, "disable_xformers": True, "ed1_mode": True, "lowvram": False,
              "notebook": False, "gpuid": 0, "hf_repo_subfolder": None, "rated_dataset_target_dropout_rate": 40,
              "ema_decay_resume_model": None}
    assert set(values) == set(LEGACY_KEYS)
    path = write_config(tmp_path, {"resume_ckpt": "builtin:tiny", "data_root": images, **values})
    loaded = load_config(["--config", path])
    for key in values:
        assert any(f"legacy key {key}:" in note for note in loaded.notes), key
    assert loaded.config.rated_dataset_target_dropout_percent == 40


def test_legacy_amp_false_maps_to_disable_amp(tmp_path, images):
    path = write_config(tmp_path, {"resume_ckpt": "builtin:tiny", "data_root": images, "amp": False})
    loaded = load_config(["--config", path])
    assert loaded.config.disable_amp is True
    assert any("amp: false mapped to disable_amp: true" in note for note in loaded.notes)


def test_legacy_useadam8bit_maps_to_the_8bit_optimizer(tmp_path, images):
    loaded = load_config(["--resume_ckpt", "builtin:tiny", "--data_root", images, "--useadam8bit"])
    assert loaded.config.optimizer == "adamw8bit"


def test_no_effect_legacy_keys_say_why(tmp_path, images):
    loaded = load_config(["--resume_ckpt", "builtin:tiny", "--data_root", images, "--gpuid", "1", "--lowvram"])
    gpu_note = next(n for n in loaded.notes if "legacy key gpuid" in n)
    assert "no effect" in gpu_note and "CUDA_VISIBLE_DEVICES" in gpu_note
    assert any("legacy key lowvram" in n and "gradient_checkpointing" in n for n in loaded.notes)


def test_a_legacy_key_that_contradicts_its_new_key_is_an_error(tmp_path, images):
    path = write_config(tmp_path, {"resume_ckpt": "builtin:tiny", "data_root": images, "amp": False,
                                   "disable_amp": False})
    with pytest.raises(ConfigError) as excinfo:
        load_config(["--config", path])
    assert any("conflicts" in p for p in problems_of(excinfo))


# --- errors ---------------------------------------------------------------------------------------

def test_unknown_key_names_the_file_and_the_closest_key(tmp_path, images):
    path = write_config(tmp_path, {"resume_ckpt": "builtin:tiny", "data_root": images, "batchsize": 4})
    with pytest.raises(ConfigError) as excinfo:
        load_config(["--config", path])
    (problem,) = problems_of(excinfo)
    assert path in problem and "batchsize" in problem and "Did you mean 'batch_size'?" in problem


def test_unknown_flag_names_the_closest_key(images):
    with pytest.raises(ConfigError) as excinfo:
        load_config(["--resume_ckpt", "builtin:tiny", "--data_root", images, "--max_epoch", "3"])
    (problem,) = problems_of(excinfo)
    assert "command line" in problem and "--max_epoch" in problem and "'max_epochs'" in problem


@pytest.mark.parametrize("key, value, expected", [
    ("batch_size", "2", "expected an integer"),
    ("batch_size", 2.5, "expected an integer"),
    ("lr", True, "expected a number or null"),
    ("flip_p", "half", "expected a number"),
    ("gradient_checkpointing", "yes", "expected true or false"),
    ("data_root", 5, "expected a string"),
    ("plugins", "a.B", "expected a list of strings"),
    ("resolution", None, "expected an integer, got null"),
])
def test_wrong_types_are_errors(tmp_path, images, key, value, expected):
    path = write_config(tmp_path, {"resume_ckpt": "builtin:tiny", "data_root": images, key: value})
    with pytest.raises(ConfigError) as excinfo:
        load_config(["--config", path])
    assert any(key in p and expected in p for p in problems_of(excinfo)), problems_of(excinfo)


def test_wrong_types_on_the_command_line_are_errors(images):
    with pytest.raises(ConfigError) as excinfo:
        load_config(["--resume_ckpt", "builtin:tiny", "--data_root", images, "--batch_size", "two",
                     "--shuffle_tags", "maybe"])
    found = problems_of(excinfo)
    assert any("batch_size" in p and "'two'" in p for p in found)
    assert any("shuffle_tags" in p and "true or false" in p for p in found)


@pytest.mark.parametrize("key, value, expected", [
    ("batch_size", -1, "below the minimum 1"),
    ("batch_size", 0, "below the minimum 1"),
    ("grad_accum", 0, "below the minimum 1"),
    ("max_epochs", 0, "below the minimum 1"),
    ("resolution", 500, "multiple of 64"),
    ("resolution", 4096, "multiple of 64 from 256 to 2048"),
    ("cond_dropout", 1.5, "above the maximum 1.0"),
    ("flip_p", -0.1, "below the minimum 0.0"),
    ("lr", 0, "greater than 0.0"),
    ("seed", -2, "below the minimum -1"),
    ("clip_skip", 7, "above the maximum 4"),
    ("lr_scheduler", "cosin", "Did you mean 'cosine'?"),
    ("attn_type", "flash", "is not one of: sdp, xformers, slice"),
])
def test_out_of_range_values_are_errors(tmp_path, images, key, value, expected):
    path = write_config(tmp_path, {"resume_ckpt": "builtin:tiny", "data_root": images, key: value})
    with pytest.raises(ConfigError) as excinfo:
        load_config(["--config", path])
    assert any(key in p and expected in p for p in problems_of(excinfo)), problems_of(excinfo)


def test_cross_key_rules(tmp_path, images):
    path = write_config(tmp_path, {"resume_ckpt": "builtin:tiny", "data_root": images, "disable_unet_training": True,
                                   "disable_textenc_training": True, "timestep_start": 500, "timestep_end": 400,
                                   "project_name": "my/project"})
    with pytest.raises(ConfigError) as excinfo:
        load_config(["--config", path])
    found = problems_of(excinfo)
    assert any("nothing would train" in p for p in found)
    assert any("timestep_start" in p and "below timestep_end" in p for p in found)
    assert any("project_name" in p and "folder names" in p for p in found)


def test_missing_paths_are_errors_that_name_the_key(tmp_path):
    path = write_config(tmp_path, {"resume_ckpt": "./no/such/model", "data_root": str(tmp_path / "nope"),
                                   "optimizer_config": "missing_optimizer.json"})
    with pytest.raises(ConfigError) as excinfo:
        load_config(["--config", path])
    found = problems_of(excinfo)
    assert any("resume_ckpt" in p and "neither an existing file or folder nor a Hugging Face repo id" in p
               for p in found)
    assert any("data_root" in p and "does not exist" in p for p in found)
    assert any("optimizer_config" in p and "does not exist" in p for p in found)


def test_the_default_optimizer_file_may_be_missing(tmp_path, images, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no optimizer.json here
    config = load_config(["--resume_ckpt", "builtin:tiny", "--data_root", images]).config
    assert config.optimizer_config == "optimizer.json"


def test_resume_ckpt_is_required_and_checked(tmp_path, images):
    with pytest.raises(ConfigError) as excinfo:
        load_config(["--data_root", images])
    assert any("resume_ckpt" in p and "is required" in p for p in problems_of(excinfo))
    with pytest.raises(ConfigError) as excinfo:
        load_config(["--data_root", images, "--resume_ckpt", "builtin:huge"])
    assert any("not a built-in model" in p for p in problems_of(excinfo))
    for accepted in ("builtin:tiny", "findlast", "stable-diffusion-v1-5/stable-diffusion-v1-5", images):
        assert load_config(["--data_root", images, "--resume_ckpt", accepted]).config.resume_ckpt == accepted


def test_all_problems_are_reported_together(tmp_path):
    path = write_config(tmp_path, {"resume_ckpt": "builtin:tiny", "data_root": str(tmp_path / "missing"),
                                   "batch_size": -1, "resolution": 300, "cond_dropout": 2, "lrr": 1})
    with pytest.raises(ConfigError) as excinfo:
        load_config(["--config", path, "--flip_p", "3"])
    found = problems_of(excinfo)
    assert len(found) == 6, found
    message = str(excinfo.value)
    for key in ("data_root", "batch_size", "resolution", "cond_dropout", "lrr", "flip_p"):
        assert key in message
    assert message.startswith("6 problem(s)")


def test_json_syntax_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "batch_size": 2,\n  "lr": 1e-6,,\n}')
    with pytest.raises(ConfigError) as excinfo:
        load_config(["--config", str(path)])
    (problem,) = problems_of(excinfo)
    assert str(path) in problem and "line 3" in problem


def test_config_file_must_exist_and_hold_an_object(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "nope.json")])
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(["--config", write_config(tmp_path, [1, 2])])


def test_validate_reports_wrong_types_of_a_directly_built_config(images):
    config = dataclasses.replace(TrainConfig(resume_ckpt="builtin:tiny", data_root=images), batch_size="2")
    assert any(p.key == "batch_size" and "expected an integer" in p.message for p in validate(config))


def test_merge_with_nothing_gives_the_defaults_except_the_required_model(images):
    loaded = merge({"resume_ckpt": "builtin:tiny", "data_root": images}, "x.json")
    defaults = TrainConfig()
    for name in FIELDS:
        if name not in ("resume_ckpt", "data_root"):
            assert getattr(loaded.config, name) == getattr(defaults, name), name


# --- help -----------------------------------------------------------------------------------------

def test_help_lists_every_key_with_its_default_and_description():
    text = " ".join(build_parser().format_help().split())
    for name, field in FIELDS.items():
        assert f"--{name}" in text, name
        description_start = " ".join(field.metadata["help"].split()[:3])
        assert description_start in text, name
    assert text.count("(default: ") >= len(FIELDS)
    for name in LEGACY_KEYS:
        assert f"--{name}" in text


def test_supported_resolutions_are_every_multiple_of_64_from_256_to_2048():
    assert SUPPORTED_RESOLUTIONS == tuple(range(256, 2049, 64))


@pytest.mark.parametrize("values, key, text", [
    ({"ema_decay_rate": 0.9, "ema_strength_target": 0.1}, "ema_strength_target", "both set"),
    ({"ema_resume_model": "findlast"}, "ema_resume_model", "EMA is off"),
    ({"ema_decay_rate": 0.9, "ema_resume_model": "no/such/folder"}, "ema_resume_model", "not a folder"),
])
def test_ema_settings_that_cannot_work_are_errors(tmp_path, images, values, key, text):
    path = write_config(tmp_path, {"resume_ckpt": "builtin:tiny", "data_root": images, **values})
    with pytest.raises(ConfigError) as error:
        load_config(["--config", path])
    assert any(p.key == key and text in p.message for p in error.value.problems)


def test_early_stopping_and_the_best_checkpoint_need_a_validation_config(tmp_path, images):
    path = write_config(tmp_path, {"resume_ckpt": "builtin:tiny", "data_root": images, "early_stopping_patience": 3,
                                   "save_best_val": True})
    with pytest.raises(ConfigError) as excinfo:
        load_config(["--config", path])
    found = problems_of(excinfo)
    assert all(any(key in p and "needs validation_config" in p for p in found)
               for key in ("early_stopping_patience", "save_best_val"))
