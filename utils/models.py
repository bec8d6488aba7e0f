"""Loading the model to train from `resume_ckpt`, whatever its source, through one code path.

`builtin:tiny` is built in memory; a diffusers folder is read from disk; a Hugging Face repo id is
downloaded (once, into the usual Hugging Face cache) and then read as a folder; a single `.safetensors` or
`.ckpt` file is converted once into a cached diffusers folder (utils/single_file_load.py) and read as one.
All end as the same :class:`SDModel`, so nothing downstream knows where the weights came from.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError

from utils.config import BUILTIN_TINY, CKPT_CACHE_DIR, FINDLAST, resume_ckpt_problem
from utils.model_family import SD1, ModelFamily, UnsupportedModel, detect_family

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # as StableDiffusionPipeline names them
WEIGHTED_PARTS = ("unet", "vae", "text_encoder")


class ModelLoadError(Exception):
    """The model named by resume_ckpt cannot be loaded; the message says why and what to do."""


@dataclass
class SDModel:
    """A Stable Diffusion model as trained here: the pipeline's parts plus what they are."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler: Any  # the model's own scheduler, saved with every checkpoint for inference
    family: ModelFamily
    source: str  # what resume_ckpt resolved to, for people and for the run record

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    def components(self) -> dict[str, Any]:
        """The parts under the names the family's diffusers pipeline uses."""
        return {name: getattr(self, name) for name in COMPONENTS}

    def describe(self) -> str:
        millions = {name: sum(p.numel() for p in module.parameters()) / 1e6
                    for name, module in (("UNet", self.unet), ("text encoder", self.text_encoder),
                                         ("VAE", self.vae))}
        sizes = ", ".join(f"{name} {count:,.1f}M" for name, count in millions.items())
        return f"{self.source}: {self.family.label}, {self.prediction_type} prediction ({sizes} parameters)"


def load_model(resume_ckpt: str, logdir: str = "logs", cache_dir: str = CKPT_CACHE_DIR,
               single_file_config: str | None = None) -> SDModel:
    """The model named by `resume_ckpt` (`findlast` searches logdir; a single file is converted once into
    cache_dir, read with single_file_config's configs when given). Raises ModelLoadError for people."""
    if resume_ckpt == BUILTIN_TINY:
        from utils.tiny_model import build_tiny_components

        return SDModel(**build_tiny_components(), family=SD1, source=BUILTIN_TINY)
    if resume_ckpt == FINDLAST:
        from utils.checkpoint import NoCheckpointFound, find_last_checkpoint

        try:
            folder = find_last_checkpoint(logdir)
        except NoCheckpointFound as error:
            raise ModelLoadError(str(error)) from None
        return load_diffusers_folder(folder, source=f"findlast: {folder}")
    problem = resume_ckpt_problem(resume_ckpt)  # the config's own check: a file, an unknown builtin, ...
    if problem:
        raise ModelLoadError(f"resume_ckpt: {problem}")
    if os.path.isfile(resume_ckpt):
        from utils.single_file_load import converted_folder

        folder = converted_folder(resume_ckpt, cache_dir, single_file_config)
        return load_diffusers_folder(folder, source=f"{resume_ckpt} (converted: {folder})")
    folder = resume_ckpt if os.path.isdir(resume_ckpt) else _download(resume_ckpt)
    return load_diffusers_folder(folder, source=resume_ckpt)


def load_diffusers_folder(folder: str, source: str | None = None) -> SDModel:
    """A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    One of this trainer's checkpoints is first checked against the checksums it recorded."""
    from utils.checkpoint import CHECKPOINT_RECORD, DamagedCheckpoint, verify_checkpoint

    if os.path.isfile(os.path.join(folder, CHECKPOINT_RECORD)):
        try:
            verify_checkpoint(folder)
        except DamagedCheckpoint as error:
            raise ModelLoadError(f"resume_ckpt: {error}") from None
    model_index = _read_json(folder, "model_index.json")
    try:
        family = detect_family(model_index, _read_json(folder, "unet/config.json"),
                               _read_json(folder, "text_encoder/config.json"))
    except UnsupportedModel as error:
        raise ModelLoadError(f"resume_ckpt: {folder}: {error}") from None
    weights = {name: _load_weights(folder, name, model_index.get(name)) for name in WEIGHTED_PARTS}
    try:
        pipeline = family.pipeline_class().from_pretrained(
            folder, **weights, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError) as error:  # the tokenizer or scheduler missing or damaged
        raise ModelLoadError(f"resume_ckpt: {folder} could not be loaded: {_first_line(error)} Copy or download "
                             "the model folder again: a file in it is missing or incomplete.") from None
    parts = {name: getattr(pipeline, name) for name in COMPONENTS}
    return SDModel(**parts, family=family, source=source or folder)


def _load_weights(folder: str, name: str, library_and_class: Any) -> torch.nn.Module:
    """One weight-bearing part of a pipeline folder, of the class its model_index.json names (load_part)."""
    if not (isinstance(library_and_class, list) and len(library_and_class) == 2
            and library_and_class[0] in ("diffusers", "transformers")):
        raise ModelLoadError(f"resume_ckpt: {folder}/model_index.json names no diffusers or transformers class for "
                             f"{name!r} (it says {library_and_class!r}). Copy or download the model folder again.")
    library, class_name = library_and_class
    model_class = getattr(importlib.import_module(library), class_name, None)
    if model_class is None:
        raise ModelLoadError(f"resume_ckpt: {folder}/model_index.json names {library}.{class_name} for {name!r}, "
                             f"which this {library} does not have.")
    return load_part(folder, name, model_class)


def load_part(folder: str, name: str, model_class, setting: str = "resume_ckpt") -> torch.nn.Module:
    """The model in `folder`/`name` (a diffusers or transformers class), in fp32 master weights whatever the
    file holds, refused unless its weight file filled every parameter with a tensor of the right shape.

    Left alone, diffusers leaves a UNet parameter that the file lacks on the meta device and transformers
    starts a text-encoder parameter from random numbers, each with only a warning (which a run silences):
    a file converted for another architecture, or with renamed keys, would be trained from noise. Raises
    ModelLoadError, its message starting with `setting` (the config key that named the folder, or what it is).
    """
    try:
        module, report = model_class.from_pretrained(folder, subfolder=name, dtype=torch.float32,
                                                     output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, SafetensorError) as error:  # the weight file missing or cut short, a config that
        # does not fit (diffusers reports a cut-short file as an OSError, transformers as a SafetensorError)
        raise ModelLoadError(f"{setting}: {folder} could not be loaded: {name}: {_first_line(error)} Copy or "
                             "download the model folder again: a file in it is missing or incomplete.") from None
    missing = sorted(report["missing_keys"])
    wrong_shape = sorted(key for key, *_shapes in report["mismatched_keys"])
    if missing or wrong_shape:
        found = [f"missing from its weight file: {len(missing)} (first: {missing[0]})"] if missing else []
        found += [f"of the wrong shape: {len(wrong_shape)} (first: {wrong_shape[0]})"] if wrong_shape else []
        raise ModelLoadError(f"{setting}: {folder}/{name} holds weights for a different model. Its parameters "
                             f"{'; '.join(found)}. The folder's files do not belong together: convert or download "
                             "the model again.")
    return module


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ModelLoadError(f"resume_ckpt: {folder!r} is not a diffusers model folder: {name} is missing. "
                             "Point resume_ckpt at the folder that holds model_index.json.") from None
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"resume_ckpt: {path} is damaged: {error}") from None


def _download(repo_id: str) -> str:
    """The local folder of a Hugging Face model repo: from the cache when complete, else downloaded.

    The repo is looked up before downloading so that "does not exist", "gated" and "offline" each get a
    message for people instead of a download stack trace. The safety checker is never fetched.
    """
    import huggingface_hub
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    token = hf_token()
    skip = dict(safety_checker=None, feature_extractor=None)
    try:
        return DiffusionPipeline.download(repo_id, token=token, local_files_only=True, **skip)
    except OSError:
        pass  # not (completely) in the cache: ask the Hub
    try:
        huggingface_hub.model_info(repo_id, token=token)
    except GatedRepoError:
        raise ModelLoadError(f"resume_ckpt: {repo_id!r} is gated: accept its licence on huggingface.co, then set "
                             "HF_TOKEN to an access token.") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"resume_ckpt: {repo_id!r} is not a local folder and there is no such Hugging Face "
                             "repo (or it is private: set HF_TOKEN). Check the spelling, e.g. "
                             "stable-diffusion-v1-5/stable-diffusion-v1-5.") from None
    except Exception as error:  # offline mode, no network, DNS, proxy: the Hub cannot be reached
        raise ModelLoadError(
            f"resume_ckpt: {repo_id!r} is not a local folder, not in the Hugging Face cache, and the Hub cannot be "
            f"reached ({type(error).__name__}: {str(error).splitlines()[0]}). Download the model once while "
            "online, or point resume_ckpt at a diffusers folder.") from None
    try:
        return DiffusionPipeline.download(repo_id, token=token, **skip)
    except OSError as error:  # the download broke off, or the disk is full
        first_line = str(error).splitlines()[0]
        raise ModelLoadError(f"resume_ckpt: {repo_id!r} could not be downloaded: {first_line}") from None


def hf_token() -> str | None:
    """The Hugging Face access token for gated or private repos: HF_TOKEN (EveryDream2 read HF_API_TOKEN)."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HF_API_TOKEN")


def training_noise_scheduler(model: SDModel, zero_terminal_snr: bool = False):
    """The scheduler whose ᾱ_t add noise in training: DDPM over the model's own betas.

    EveryDream2's train_sampler (ddpm, pndm, ddim) names schedulers that share this forward process, so
    DDPM serves all three. The zero-terminal-SNR rescaling (Lin et al. 2023, arXiv 2305.08891, done by
    diffusers) is set explicitly either way, so a model saved by a zero-terminal-SNR session does not carry
    it silently into the next one.
    """
    import diffusers

    return diffusers.DDPMScheduler.from_config(model.scheduler.config, rescale_betas_zero_snr=zero_terminal_snr)


def zero_terminal_snr_inference_scheduler(model: SDModel):
    """The scheduler to save with a model trained with zero-terminal SNR: DDIM over the rescaled betas, with
    timesteps that start at the last one ("trailing"), as the paper prescribes for sampling."""
    import diffusers

    return diffusers.DDIMScheduler.from_config(model.scheduler.config, rescale_betas_zero_snr=True,
                                               timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)


def load_tokenizer(resume_ckpt: str):
    """The model's tokenizer alone, without its weights (for the dataset report of a dry run).

    None when it is not on this machine: a dry run never downloads anything.
    """
    if resume_ckpt == BUILTIN_TINY:
        from utils.tiny_model import build_tiny_tokenizer

        return build_tiny_tokenizer()
    folder = _local_tokenizer_folder(resume_ckpt)
    if folder is None:
        return None
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def _local_tokenizer_folder(resume_ckpt: str) -> str | None:
    """`tokenizer/` of a diffusers folder, or of a Hugging Face repo in the local cache; None if absent (and for
    a single file, whose tokenizer is known only once it is converted)."""
    names = ("vocab.json", "merges.txt")
    if os.path.isfile(resume_ckpt):
        return None
    if os.path.isdir(resume_ckpt):
        folder = os.path.join(resume_ckpt, "tokenizer")
        return folder if all(os.path.isfile(os.path.join(folder, n)) for n in names) else None
    from huggingface_hub import try_to_load_from_cache

    found = [try_to_load_from_cache(resume_ckpt, f"tokenizer/{name}") for name in names]
    return os.path.dirname(found[0]) if all(isinstance(path, str) for path in found) else None


def caption_token_counts(tokenizer, captions: list[str]) -> list[int]:
    """Tokens per caption, start and end tokens included, before the text encoder's truncation."""
    ids = tokenizer(captions, truncation=False, verbose=False).input_ids
    return [len(tokens) for tokens in ids]
