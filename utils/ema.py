"""An exponential moving average (EMA) of the trained weights, kept beside the model and saved with it.

Written here rather than with diffusers' EMAModel because the average may live on the CPU while the
model trains on the GPU: each update streams one parameter at a time to the average's device, so no
second copy of the model is ever made (EveryDream2 deep-copied the whole model to the CPU on every
update). Only trained parameters are averaged; frozen ones are the model's own.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

EMA_FOLDER = "ema"  # inside a checkpoint folder: ema/unet/, ema/text_encoder/ in diffusers layout
PART_FOLDERS = {"unet": "unet", "text encoder": "text_encoder"}


class EMA:
    """ema = decay x ema + (1 - decay) x weights, for each trained weight of each part, on `device`."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float, device: str | torch.device):
        self.decay = decay
        self.device = torch.device(device)
        self.averages = {part: {name: p.detach().to(self.device, torch.float32, copy=True)
                                for name, p in module.named_parameters() if p.requires_grad}
                         for part, module in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module]) -> None:
        for part, module in modules.items():
            averages = self.averages[part]
            for name, parameter in module.named_parameters():
                if name in averages:
                    # A blocking copy: a non-blocking GPU-to-CPU copy would still be in flight when lerp_ reads it.
                    weights = parameter.detach().to(self.device, torch.float32)
                    averages[name].lerp_(weights, 1.0 - self.decay)

    def load(self, part: str, state_dict: dict[str, torch.Tensor]) -> int:
        """Continue from saved averages (ema_resume_model); returns how many weights were taken."""
        averages = self.averages[part]
        taken = 0
        for name, value in state_dict.items():
            if name in averages:
                if averages[name].shape != value.shape:
                    raise ValueError(f"EMA weight {name} has shape {tuple(value.shape)}, the model's is "
                                     f"{tuple(averages[name].shape)}: the EMA belongs to another model")
                averages[name].copy_(value)
                taken += 1
        return taken

    def state_dict_for(self, part: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with its trained weights replaced by their averages."""
        averages = self.averages[part]
        return {name: averages.get(name, value) for name, value in module.state_dict().items()}

    def save(self, folder: str, modules: dict[str, torch.nn.Module]) -> None:
        """`folder/unet/` and `folder/text_encoder/`, each loadable with its class's from_pretrained."""
        from utils.checkpoint import save_text_encoder

        for part, module in modules.items():
            target = os.path.join(folder, PART_FOLDERS[part])
            os.makedirs(target, exist_ok=True)
            state_dict = {name: value.detach().to("cpu").contiguous()
                          for name, value in self.state_dict_for(part, module).items()}
            if part == "text encoder":  # as the checkpoint's own text encoder: the original `text_model.` names
                save_text_encoder(module, target, state_dict)
            else:
                module.save_config(target)
                save_file(state_dict, os.path.join(target, "diffusion_pytorch_model.safetensors"))


def save_ema_into(ema: EMA, modules: dict[str, torch.nn.Module], checkpoint_folder: str) -> None:
    """The EMA weights in `checkpoint_folder/ema/` (save_pipeline calls this before its atomic rename)."""
    ema.save(os.path.join(checkpoint_folder, EMA_FOLDER), modules)


def load_saved_ema(folder: str) -> dict[str, dict[str, torch.Tensor]]:
    """The weights in an EMA folder (ours, a checkpoint holding one, or EveryDream2's `_ema` pipeline folder).
    Raises utils.models.ModelLoadError for a weight file that is missing, cut short or of another model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from utils.models import load_part

    if os.path.isdir(os.path.join(folder, EMA_FOLDER)):
        folder = os.path.join(folder, EMA_FOLDER)
    found = {}
    if os.path.isdir(os.path.join(folder, "unet")):
        found["unet"] = load_part(folder, "unet", UNet2DConditionModel, "EMA weights").state_dict()
    if os.path.isdir(os.path.join(folder, "text_encoder")):
        found["text encoder"] = load_part(folder, "text_encoder", CLIPTextModel, "EMA weights").state_dict()
    if not found:
        raise FileNotFoundError(f"ema_resume_model: {folder!r} holds no unet/ or text_encoder/ folder of EMA weights")
    return found

