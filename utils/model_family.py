"""Model families: what differs between SD 1.x, SD 2.x and (later) SDXL, behind one small interface.

The training loop never asks which family it has: it asks the family to turn captions into UNet
conditioning and which pipeline class saves and samples the model. Adding SDXL (two text encoders,
pooled embeddings, size conditioning) means adding a family here, not rewriting the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Conditioning:
    """What the UNet is conditioned on, besides the noisy latents and the timesteps."""

    hidden_states: torch.Tensor  # (batch, tokens, width): cross-attention context
    unet_kwargs: dict[str, Any] = field(default_factory=dict)  # extra UNet inputs (SDXL: added_cond_kwargs)


@dataclass(frozen=True)
class ModelFamily:
    """A Stable Diffusion generation with one CLIP text encoder (SD 1.x and 2.x)."""

    name: str  # "sd1" | "sd2": written into checkpoints and used by the single-file export
    label: str  # for people: "SD 1.x"
    pipeline_class_name: str = "StableDiffusionPipeline"

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def tokenize(self, tokenizer, captions: list[str]) -> torch.Tensor:
        """Token ids padded and truncated to the tokenizer's context length (77 for CLIP)."""
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    def encode(self, text_encoder, input_ids: torch.Tensor, clip_skip: int = 0) -> Conditioning:
        """Text-encoder hidden states; clip_skip k >= 2 takes the k-th layer from the end.

        The skipped layer goes through the final layer norm, as A1111 and diffusers' pipelines do, so
        training and sampling see the same embedding.
        """
        if clip_skip <= 1:
            return Conditioning(text_encoder(input_ids).last_hidden_state)
        hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-clip_skip]
        return Conditioning(_final_layer_norm(text_encoder)(hidden))


def clip_text_transformer(text_encoder) -> torch.nn.Module:
    """The module holding `embeddings`, `encoder.layers` and `final_layer_norm` of a CLIP text encoder."""
    text_encoder = getattr(text_encoder, "module", text_encoder)  # inside DistributedDataParallel
    # transformers >= 5 flattened CLIPTextModel; older versions wrap it in `text_model`.
    return getattr(text_encoder, "text_model", text_encoder)


def with_text_model_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's weights under their original `text_model.*` names, which transformers 4 and 5
    and the original SD layout all read (transformers 5 names them without the prefix)."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state_dict.items()}


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    return clip_text_transformer(text_encoder).final_layer_norm


SD1 = ModelFamily("sd1", "SD 1.x")
SD2 = ModelFamily("sd2", "SD 2.x")


class UnsupportedModel(Exception):
    """The model is a kind this trainer does not train (yet)."""


def detect_family(model_index: dict, unet_config: dict, text_encoder_config: dict) -> ModelFamily:
    """SD 1.x or 2.x from the pipeline's configs.

    SD 2.x pairs OpenCLIP (GELU activations) with linear attention projections; SD 1.x uses OpenAI CLIP
    (quick-GELU). The channel counts are not used, so the tiny model is recognised by the same rule.
    """
    pipeline = model_index.get("_class_name", "")
    if "XL" in pipeline or unet_config.get("addition_embed_type") == "text_time":
        raise UnsupportedModel(f"{pipeline or 'this model'} is SDXL, which is not supported yet: "
                               "use an SD 1.x or SD 2.x model.")
    if pipeline and pipeline not in ("StableDiffusionPipeline", "DiffusionPipeline"):
        raise UnsupportedModel(f"{pipeline} is not a Stable Diffusion 1.x/2.x text-to-image pipeline.")
    if unet_config.get("in_channels", 4) != 4:
        raise UnsupportedModel(f"the UNet has {unet_config['in_channels']} input channels: inpainting and "
                               "depth models are not supported, only text-to-image models (4 channels).")
    if text_encoder_config.get("hidden_act") == "gelu" or unet_config.get("use_linear_projection"):
        return SD2
    return SD1
