"""The embedded tiny model, model-family detection, loading, and the single-file (LDM) export."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from utils.architectures import SD15_TEXT, SD15_UNET, SD15_VAE
from utils.model_family import SD1, SD2, UnsupportedModel, detect_family
from utils.models import ModelLoadError, load_diffusers_folder, load_model
from utils.single_file import SingleFileExportError, save_single_file, to_ldm_state_dict, unet_to_ldm
from tests.tiny_variants import sd2_like_components
from utils.tiny_model import TINY_SEED, VOCABULARY_WORDS, build_tiny_components, build_tiny_tokenizer


def shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


# --- the tiny model -------------------------------------------------------------------------------

def test_tiny_model_is_built_identically_every_time(tiny):
    again = build_tiny_components()
    for name in ("unet", "vae", "text_encoder"):
        first, second = tiny[name].state_dict(), again[name].state_dict()
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), name
    assert again["tokenizer"].get_vocab() == tiny["tokenizer"].get_vocab()


def test_building_the_tiny_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_components()
    assert torch.equal(torch.rand(3), expected)


def test_tiny_model_has_sd15_topology(tiny):
    """The same parameter names as SD 1.5 (so the same blocks, levels and layers), only narrower."""
    with torch.device("meta"):
        sd15_unet = UNet2DConditionModel(**SD15_UNET)
        sd15_vae = AutoencoderKL(**SD15_VAE)
        sd15_text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    assert shapes(tiny["unet"]).keys() == shapes(sd15_unet).keys()
    assert shapes(tiny["vae"]).keys() == shapes(sd15_vae).keys()
    assert shapes(tiny["text_encoder"]).keys() == shapes(sd15_text).keys()
    assert tiny["vae"].config.block_out_channels != SD15_VAE["block_out_channels"]  # small, not a copy
    # The real 8x downscale: a 256 px image becomes a 32 px latent.
    latents = tiny["vae"].encode(torch.zeros(1, 3, 256, 128)).latent_dist.mean
    assert latents.shape == (1, 4, 32, 16)


def test_tiny_unet_has_one_head_count_for_every_level_and_heads_at_least_16_wide(tiny):
    """As SD 1.x, one head count for the whole UNet (SD 2.x's are per level), small enough for heads of real
    width: 8 heads, 4 wide at the first level, made attention most of a CPU training step. The weights do not
    depend on it."""
    unet = tiny["unet"]
    assert isinstance(unet.config.attention_head_dim, int)
    widths = {block.attn1.inner_dim // block.attn1.heads
              for name, block in unet.named_modules() if name.endswith("transformer_blocks.0")}
    assert min(widths) >= 16, widths
    with torch.random.fork_rng(devices=[]):  # the same seed with SD 1.x's 8 heads: the same weights
        torch.manual_seed(TINY_SEED)
        eight_heads = UNet2DConditionModel(**{**unet.config, "attention_head_dim": 8})
    assert all(torch.equal(value, eight_heads.state_dict()[key]) for key, value in unet.state_dict().items())


def test_tiny_tokenizer_spells_every_vocabulary_word_as_one_token():
    tokenizer = build_tiny_tokenizer()
    for word in VOCABULARY_WORDS:
        ids = tokenizer(word).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == 3, (word, tokenizer.convert_ids_to_tokens(ids))
    padded = tokenizer("an unusual word: zyzzyva", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77  # unknown words still tokenize, as byte-level pieces


def test_tiny_text_encoder_knows_the_tokenizer_specials(tiny):
    config, tokenizer = tiny["text_encoder"].config, tiny["tokenizer"]
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)


def test_tiny_model_round_trips_through_a_diffusers_folder_and_generates(tiny, tiny_folder):
    assert sorted(os.listdir(tiny_folder)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                               "unet", "vae"]
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_folder)
    for name in ("unet", "vae", "text_encoder"):
        saved, loaded = tiny[name].state_dict(), getattr(pipeline, name).state_dict()
        assert all(torch.equal(saved[k], loaded[k]) for k in saved), name
    assert pipeline.tokenizer("a red circle").input_ids == tiny["tokenizer"]("a red circle").input_ids
    image = pipeline("a red circle", num_inference_steps=2, height=64, width=96, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 96, 3) and 0 <= image.min() and image.max() <= 1


# --- families and loading -------------------------------------------------------------------------

def test_family_detection():
    assert detect_family({"_class_name": "StableDiffusionPipeline"}, {"attention_head_dim": 8},
                         {"hidden_act": "quick_gelu"}) is SD1
    assert detect_family({"_class_name": "StableDiffusionPipeline"},
                         {"attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True},
                         {"hidden_act": "gelu"}) is SD2
    with pytest.raises(UnsupportedModel, match="SDXL"):
        detect_family({"_class_name": "StableDiffusionXLPipeline"}, {"addition_embed_type": "text_time"}, {})
    with pytest.raises(UnsupportedModel, match="inpainting"):
        detect_family({"_class_name": "StableDiffusionPipeline"}, {"in_channels": 9}, {"hidden_act": "quick_gelu"})


def test_a_diffusers_folder_loads_through_the_same_path_as_the_builtin(tiny, tiny_folder):
    model = load_model(tiny_folder)
    assert model.family is SD1 and model.source == tiny_folder and model.prediction_type == "epsilon"
    assert all(torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(), tiny["unet"].state_dict().values()))
    assert model.unet.dtype == torch.float32


def test_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        load_diffusers_folder(str(tmp_path))


@pytest.mark.parametrize("part, weight_file", [("unet", "diffusion_pytorch_model.safetensors"),
                                                ("vae", "diffusion_pytorch_model.safetensors"),
                                                ("text_encoder", "model.safetensors")])
def test_a_model_folder_with_a_weight_file_missing_or_cut_short_is_a_clear_error(tiny_folder, tmp_path, part,
                                                                                weight_file):
    import shutil

    for damage in ("missing", "cut short"):
        folder = tmp_path / damage.replace(" ", "_")
        shutil.copytree(tiny_folder, folder)
        weights = folder / part / weight_file
        if damage == "missing":
            weights.unlink()
        else:
            with open(weights, "r+b") as handle:
                handle.truncate(weights.stat().st_size - 100)
        with pytest.raises(ModelLoadError) as excinfo:
            load_model(str(folder))
        message = str(excinfo.value)
        assert message.startswith(f"resume_ckpt: {folder} could not be loaded: {part}: "), message
        assert "Copy or download the model folder again" in message


WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}


@pytest.mark.parametrize("part", sorted(WEIGHT_FILES))
@pytest.mark.parametrize("damage", ["keys renamed", "half the keys", "a tensor reshaped"])
def test_a_weight_file_that_does_not_fit_its_part_is_refused_not_trained_from_noise(tiny_folder, tmp_path, part,
                                                                                    damage):
    """diffusers would leave such UNet parameters on the meta device and transformers would start such text
    encoder parameters from random numbers, each with only a warning that a run silences."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    weights = folder / part / WEIGHT_FILES[part]
    tensors = load_file(weights)
    if damage == "keys renamed":
        tensors = {f"model.{key}": tensor for key, tensor in tensors.items()}
    elif damage == "half the keys":
        tensors = dict(list(tensors.items())[::2])
    else:
        key = next(key for key, tensor in tensors.items() if tensor.ndim == 2)
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, weights)
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(str(folder))
    message = str(excinfo.value)
    assert message.startswith(f"resume_ckpt: {folder}/{part} holds weights for a different model."), message
    expected = "of the wrong shape: 1 (first: " if damage == "a tensor reshaped" else "missing from its weight file: "
    assert expected in message and "convert or download the model again" in message


def test_a_folder_saved_in_half_precision_loads_as_fp32_master_weights(tmp_path):
    folder = tmp_path / "fp16"
    parts = build_tiny_components()
    expected = parts["unet"].conv_in.weight.half().float()
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).to(torch.float16).save_pretrained(folder)
    model = load_diffusers_folder(str(folder))
    for name in ("unet", "vae", "text_encoder"):
        assert {p.dtype for p in getattr(model, name).parameters()} == {torch.float32}, name
    assert torch.equal(model.unet.conv_in.weight, expected)


def test_a_hub_id_offline_is_a_clear_error_not_a_stack_trace(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError) as excinfo:
        load_model("nobody-here/no-such-model")
    message = str(excinfo.value)
    assert "nobody-here/no-such-model" in message and "cannot be reached" in message
    assert "online" in message  # says what to do


def test_findlast_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="findlast found no finished checkpoint"):
        load_model("findlast", str(tmp_path))


# --- single-file export ---------------------------------------------------------------------------

def reloaded_from_single_file(path: str, config_folder: str) -> StableDiffusionPipeline:
    """diffusers' own reader of the original SD layout, told to use the run's configs (no download)."""
    return StableDiffusionPipeline.from_single_file(path, config=config_folder, local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    a, b = expected.state_dict(), actual.state_dict()
    assert a.keys() == b.keys()
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, mismatched[:5]


def test_sd1_single_file_reproduces_the_weights_exactly(tiny, tiny_folder, tmp_path):
    path = save_single_file(str(tmp_path / "tiny.safetensors"), "sd1", tiny["unet"], tiny["vae"],
                            tiny["text_encoder"], half=False)
    reloaded = reloaded_from_single_file(path, tiny_folder)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(tiny[name], getattr(reloaded, name))


def test_single_file_uses_the_original_sd_key_layout_and_fp16_by_default(tiny, tmp_path):
    path = save_single_file(str(tmp_path / "tiny.safetensors"), "sd1", tiny["unet"], tiny["vae"],
                            tiny["text_encoder"], half=True)
    with safe_open(path, "pt") as handle:
        keys = set(handle.keys())
        dtypes = {handle.get_tensor(k).dtype for k in keys}
    for key in ("model.diffusion_model.input_blocks.0.0.weight",  # conv_in
                "model.diffusion_model.input_blocks.1.1.proj_in.weight",  # first cross-attention block
                "model.diffusion_model.output_blocks.2.1.conv.weight",  # first upsampler
                "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "first_stage_model.encoder.down.0.block.0.norm1.weight",
                "first_stage_model.decoder.up.3.block.2.conv2.weight",  # diffusers' up_blocks.0, renumbered
                "first_stage_model.encoder.mid.attn_1.q.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert key in keys, key
    assert dtypes == {torch.float16}
    assert not os.path.exists(path + ".tmp")


def test_sd1_key_count_matches_the_real_sd15_layout():
    """Converting SD 1.5's real architecture maps every weight, one to one, with no name collisions."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    converted = unet_to_ldm(unet.state_dict())
    assert len(converted) == len(unet.state_dict()) == 686


def test_sd2_single_file_reproduces_the_weights_exactly(tiny, tmp_path):
    sd2 = sd2_like_components(tiny)
    folder = str(tmp_path / "sd2")
    StableDiffusionPipeline(**sd2, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    assert load_diffusers_folder(folder).family is SD2
    path = save_single_file(str(tmp_path / "sd2.safetensors"), "sd2", sd2["unet"], sd2["vae"], sd2["text_encoder"],
                            half=False)
    with safe_open(path, "pt") as handle:
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in handle.keys()
    reloaded = reloaded_from_single_file(path, folder)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(sd2[name], getattr(reloaded, name))


def test_a_weight_with_no_place_in_the_layout_is_an_error_not_dropped(tiny):
    unet = dict(tiny["unet"].state_dict())
    unet["down_blocks.4.resnets.0.conv1.weight"] = torch.zeros(1)  # a fifth level: not SD 1.x/2.x
    with pytest.raises(SingleFileExportError, match="down_blocks.4"):
        to_ldm_state_dict("sd1", unet, tiny["vae"].state_dict(), tiny["text_encoder"].state_dict())


def test_checkpoints_keep_the_text_encoders_original_weight_names(tiny, tmp_path):
    """transformers 5 would save the built-in CLIP text encoder under flat names (`embeddings.*`), which
    transformers 4 tools load as random weights; checkpoints keep the original `text_model.*` names, which
    both read. (Checked by hand with transformers 4.57.1: exact weights.)"""
    from utils.checkpoint import save_pipeline

    pipeline = StableDiffusionPipeline(**tiny, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    folder = save_pipeline(str(tmp_path / "ckpt"), pipeline, {"global_step": 1}, {})
    with safe_open(os.path.join(folder, "text_encoder", "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    assert names and all(name.startswith("text_model.") for name in names)
    reloaded = StableDiffusionPipeline.from_pretrained(folder)
    assert_same_weights(tiny["text_encoder"], reloaded.text_encoder)
    again = save_pipeline(str(tmp_path / "again"), reloaded, {"global_step": 2}, {})  # saved as loaded
    with safe_open(os.path.join(again, "text_encoder", "model.safetensors"), "pt") as handle:
        assert all(name.startswith("text_model.") for name in handle.keys())
