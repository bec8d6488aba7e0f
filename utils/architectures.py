"""The published architectures of Stable Diffusion 1.5 and 2.1, and the models built from them with random weights.

For what needs a real model's shape but not its weights: the benchmarks (bench/train_throughput.py) and the
tests that compare the tiny model's topology and the single-file key layout with the real ones. Nothing is
downloaded. The configs are those of the models' diffusers folders (unet/, vae/, text_encoder/config.json),
less the keys that equal diffusers' and transformers' defaults:

- SD 1.5: stable-diffusion-v1-5/stable-diffusion-v1-5 (UNet 859.5M, CLIP ViT-L/14 text encoder 123.1M,
  VAE 83.7M parameters).
- SD 2.1: stabilityai/stable-diffusion-2-1 (the 768 px v-prediction model; the repo was removed from the Hub
  in November 2025, its configs are kept in the many copies of it there, e.g.
  huggingface.co/mlpc-lab/TokenCompose_SD21_B/blob/main/text_encoder/config.json). Its UNet has per-level
  head counts (5, 10, 20, 20), 1024-wide cross-attention, linear attention projections and attention upcast
  to fp32; its text encoder is OpenCLIP ViT-H/14's text tower in CLIP's layout with 23 of its 24 layers
  (SD 2.x conditions on the penultimate layer, so the last one is dropped), GELU, 16 heads of 64.
  The VAE is SD 1.5's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8,
                 cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")

SD21_UNET = dict(SD15_UNET, sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                 use_linear_projection=True, upcast_attention=True)
SD21_VAE = dict(SD15_VAE, sample_size=768)
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)


@dataclass(frozen=True)
class Architecture:
    """One model generation's three configs, and what its scheduler predicts."""

    name: str
    label: str
    unet: dict
    vae: dict
    text_encoder: dict
    prediction_type: str  # "epsilon" | "v_prediction"


ARCHITECTURES = {
    "sd15": Architecture("sd15", "SD 1.5", SD15_UNET, SD15_VAE, SD15_TEXT, "epsilon"),
    "sd21": Architecture("sd21", "SD 2.1 (768-v)", SD21_UNET, SD21_VAE, SD21_TEXT, "v_prediction"),
}


def build_random_components(name: str, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """{"unet", "vae", "text_encoder"} of architecture `name` ("sd15", "sd21") with random weights on `device`.

    On the meta device the modules have shapes only (for counting parameters and FLOPs). Elsewhere they are
    built without their own initialisation (20 s for SD 1.5's UNet on two CPU cores) and given a cheap one
    (initialise_cheaply: 8 s for all three): good for timing, with activations of a real model's scale, but
    not for generating anything. The same seed gives the same weights on the same kind of device.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    architecture = ARCHITECTURES[name]

    def build() -> dict:
        return dict(unet=UNet2DConditionModel(**architecture.unet), vae=AutoencoderKL(**architecture.vae),
                    text_encoder=CLIPTextModel(CLIPTextConfig(**architecture.text_encoder)))

    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return build()
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (position ids) real
        modules = build()
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in modules.values():
        buffers = {key: value.clone() for key, value in module.named_buffers()}
        module.to_empty(device=device)
        with torch.no_grad():
            for key, value in module.named_buffers():
                value.copy_(buffers[key])
            initialise_cheaply(module, generator)
    return modules


def initialise_cheaply(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights in one pass over memory, drawn where the weights are (`generator` is of that device):
    linear and convolution weights with the variance of PyTorch's default U(±1/sqrt(fan_in)) but normal
    (normal_ is several times faster than uniform_ on the CPU), biases 0, norms 1 and 0, anything else
    N(0, 0.02)."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    for submodule in module.modules():
        for key, param in submodule.named_parameters(recurse=False):
            if isinstance(submodule, norms):
                param.fill_(1.0 if key == "weight" else 0.0)
            elif key == "bias":
                param.zero_()
            elif isinstance(submodule, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = param[0].numel()  # in_features x kernel area
                param.normal_(0.0, (3 * fan_in) ** -0.5, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
