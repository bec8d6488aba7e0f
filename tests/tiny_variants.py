"""Variants of the built-in tiny model for tests: the same smallness, another model family."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel


def sd2_like_components(tiny: dict) -> dict:
    """The tiny model reshaped as SD 2.x: linear attention projections, an OpenCLIP-style (GELU, 23-layer)
    text encoder and v-prediction."""
    tokenizer = tiny["tokenizer"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        unet = UNet2DConditionModel(**{**dict(tiny["unet"].config), "attention_head_dim": (2, 4, 8, 8),
                                       "use_linear_projection": True})
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=23,
            num_attention_heads=8, max_position_embeddings=77, hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    scheduler = tiny["scheduler"].__class__.from_config(tiny["scheduler"].config, prediction_type="v_prediction")
    return {**tiny, "unet": unet, "text_encoder": text_encoder, "scheduler": scheduler}


def save_sd2_like_folder(tiny: dict, folder: str) -> dict:
    """An SD 2.x-shaped tiny model saved as a diffusers pipeline folder; its components."""
    sd2 = sd2_like_components(tiny)
    StableDiffusionPipeline(**sd2, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return sd2
