"""Single-file export: an SD 1.x/2.x model as one `.safetensors` in the original Stable Diffusion (LDM)
key layout, the format A1111, ComfyUI and diffusers' `from_single_file` load.

diffusers reads this layout but ships no writer: its `DIFFUSERS_TO_LDM_MAPPING` covers only the top-level
names, and the block renaming lives in its conversion scripts, which are not importable. So the block
table below is written by hand, following diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py`,
and checked by the test suite against diffusers' own reader. Every weight must be mapped: a key this
module does not know is an error, never a silently dropped weight.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file

from utils.checkpoint import fsync_file
from utils.model_family import with_text_model_prefix

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {"sd1": "cond_stage_model.transformer.", "sd2": "cond_stage_model.model."}

# Inside a resnet block only the layer names differ.
UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                     "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class SingleFileExportError(Exception):
    """The model cannot be written in the LDM layout (its topology is not SD 1.x/2.x's)."""


# =================================================================================================
# Block tables: (diffusers prefix, LDM prefix, sub-layer renames). SD 1.x and 2.x share them: four
# levels, two resnets per down level, three per up level, attention in all but the deepest level.
# =================================================================================================

def _unet_blocks() -> list[tuple[str, str, dict]]:
    blocks = []
    for level in range(4):
        for j in range(2):
            blocks.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{3 * level + j + 1}.0.",
                           UNET_RESNET_NAMES))
            if level < 3:
                blocks.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{3 * level + j + 1}.1.", {}))
        for j in range(3):
            blocks.append((f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{3 * level + j}.0.",
                           UNET_RESNET_NAMES))
            if level > 0:
                blocks.append((f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{3 * level + j}.1.", {}))
        if level < 3:
            blocks.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{3 * (level + 1)}.0.op.", {}))
            upsampler_index = 1 if level == 0 else 2
            blocks.append((f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{3 * level + 2}.{upsampler_index}.", {}))
    blocks.append(("mid_block.attentions.0.", "middle_block.1.", {}))
    for j in range(2):
        blocks.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", UNET_RESNET_NAMES))
    return blocks


def _vae_blocks() -> list[tuple[str, str, dict]]:
    blocks = []
    for level in range(4):  # the LDM decoder counts its levels from the bottom, diffusers from the top
        for j in range(2):
            blocks.append((f"encoder.down_blocks.{level}.resnets.{j}.", f"encoder.down.{level}.block.{j}.",
                           VAE_RESNET_NAMES))
        for j in range(3):
            blocks.append((f"decoder.up_blocks.{level}.resnets.{j}.", f"decoder.up.{3 - level}.block.{j}.",
                           VAE_RESNET_NAMES))
        if level < 3:
            blocks.append((f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample.", {}))
            blocks.append((f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{3 - level}.upsample.", {}))
    for side in ("encoder", "decoder"):
        for j in range(2):
            blocks.append((f"{side}.mid_block.resnets.{j}.", f"{side}.mid.block_{j + 1}.", VAE_RESNET_NAMES))
        blocks.append((f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", VAE_ATTENTION_NAMES))
    return blocks


def _rename(key: str, exact: dict[str, str], blocks: list[tuple[str, str, dict]], what: str) -> str:
    if key in exact:
        return exact[key]
    for prefix, ldm_prefix, names in blocks:
        if key.startswith(prefix):
            module, _, param = key[len(prefix):].rpartition(".")
            for old, new in names.items():  # rename the sub-layer at the start of the module path
                if module == old or module.startswith(old + "."):
                    module = new + module[len(old):]
                    break
            return ldm_prefix + (f"{module}.{param}" if module else param)
    raise SingleFileExportError(f"{what} weight {key!r} has no place in the SD 1.x/2.x single-file layout.")


def unet_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UNet weights under their LDM names (without the `model.diffusion_model.` prefix)."""
    exact, blocks = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], _unet_blocks()
    return {_rename(k, exact, blocks, "UNet"): v for k, v in state_dict.items()}


def vae_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VAE weights under their LDM names; the mid-block attention becomes 1x1 convolutions."""
    exact, blocks = DIFFUSERS_TO_LDM_MAPPING["vae"], _vae_blocks()
    converted = {}
    for key, value in state_dict.items():
        name = _rename(key, exact, blocks, "VAE")
        if ".mid.attn_1." in name and name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value.reshape(*value.shape, 1, 1)  # LDM's attention uses 1x1 convs where diffusers has linears
        converted[name] = value
    return converted


def _with_text_model_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers >= 5 saves CLIPTextModel without its `text_model.` wrapper; the LDM layout keeps it.
    return {k: v for k, v in with_text_model_prefix(state_dict).items() if not k.endswith("position_ids")}


def clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x: OpenAI CLIP keeps transformers' own names."""
    return _with_text_model_prefix(state_dict)


def open_clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 2.x: OpenCLIP names, with q, k and v fused into one in_proj per layer."""
    top = {k: v for k, v in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items()}
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
    converted: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _with_text_model_prefix(state_dict).items():
        if key in top:
            converted[top[key]] = value
            continue
        if not key.startswith("text_model.encoder.layers."):
            raise SingleFileExportError(f"text encoder weight {key!r} has no place in the OpenCLIP layout.")
        index, module_param = key[len("text_model.encoder.layers."):].split(".", 1)
        module, _, param = module_param.rpartition(".")
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused.setdefault(f"transformer.resblocks.{index}.attn.in_proj_{param}", {})[module[-6]] = value
        elif module in layer_names:
            converted[f"transformer.resblocks.{index}.{layer_names[module]}.{param}"] = value
        else:
            raise SingleFileExportError(f"text encoder weight {key!r} has no place in the OpenCLIP layout.")
    for name, parts in fused.items():
        converted[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


def to_ldm_state_dict(family_name: str, unet: dict, vae: dict, text_encoder: dict) -> dict[str, torch.Tensor]:
    """The whole model in the LDM layout, prefixes included."""
    if family_name not in CLIP_PREFIX:
        raise SingleFileExportError(f"no single-file layout for model family {family_name!r}.")
    text = clip_to_ldm(text_encoder) if family_name == "sd1" else open_clip_to_ldm(text_encoder)
    return {**_prefixed(UNET_PREFIX, unet_to_ldm(unet)), **_prefixed(VAE_PREFIX, vae_to_ldm(vae)),
            **_prefixed(CLIP_PREFIX[family_name], text)}


def _prefixed(prefix: str, state_dict: dict) -> dict:
    return {prefix + k: v for k, v in state_dict.items()}


def _for_file(tensors: Iterable[tuple[str, torch.Tensor]], half: bool) -> dict[str, torch.Tensor]:
    dtype = torch.float16 if half else torch.float32
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in tensors}


def save_single_file(path: str, family_name: str, unet: torch.nn.Module | dict, vae: torch.nn.Module | dict,
                     text_encoder: torch.nn.Module | dict, *, half: bool) -> str:
    """Write the model (modules, or their state dicts) to `path` (fp16 when `half`), under a temporary name
    renamed when complete."""
    unet, vae, text_encoder = (part if isinstance(part, dict) else part.state_dict()
                               for part in (unet, vae, text_encoder))
    state_dict = to_ldm_state_dict(family_name, unet, vae, text_encoder)
    temporary = path + ".tmp"
    save_file(_for_file(state_dict.items(), half), temporary, metadata={"format": "pt"})
    fsync_file(temporary)
    os.replace(temporary, path)
    return path
