"""Prune a checkpoint into a small inference-only single file: model weights in fp16, no training state.

    python -m utils.prune logs/<run>/ckpts/<name>            # a diffusers checkpoint folder
    python -m utils.prune logs/<run>/ckpts/<name> --ema      # ... with its EMA weights
    python -m utils.prune model.ckpt                         # a single file (.ckpt or .safetensors)

Writes `<name>-pruned.safetensors` beside the input (or --out): the UNet, VAE and text encoder in the
original Stable Diffusion layout, in fp16, which A1111 and ComfyUI load. EMA copies (`model_ema.*`),
optimizer state and anything else a training file carries are left out. The input is never changed.
Keep the full checkpoint to continue training: a pruned file has no optimizer state or EMA.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from safetensors.torch import load_file, save_file

MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")  # SD 1.x / 2.x


def pruned_path(source: str) -> str:
    """`<name>-pruned.safetensors` beside the input."""
    base = source.rstrip("/\\")
    base = os.path.splitext(base)[0] if os.path.isfile(base) else base
    return base + "-pruned.safetensors"


def prune_folder(folder: str, target: str, use_ema: bool = False) -> str:
    """A diffusers checkpoint folder to an fp16 single file; with use_ema, the averaged weights of its ema/."""
    from utils.ema import load_saved_ema
    from utils.models import load_diffusers_folder
    from utils.single_file import save_single_file

    model = load_diffusers_folder(folder)
    parts = {"unet": model.unet.state_dict(), "vae": model.vae.state_dict(),
             "text encoder": model.text_encoder.state_dict()}
    if use_ema:
        for part, weights in load_saved_ema(folder).items():  # trained parts only; the others as saved
            parts[part] = {**parts[part], **weights}
    return save_single_file(target, model.family.name, parts["unet"], parts["vae"], parts["text encoder"], half=True)


def prune_single_file(path: str, target: str) -> str:
    """A .ckpt or .safetensors in the original layout, reduced to its model weights in fp16."""
    if path.lower().endswith(".safetensors"):
        state_dict = load_file(path)
    else:
        try:  # tensors, numbers and containers only: a pickle that needs code is refused, never run
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{path} cannot be read safely ({type(error).__name__}: {str(error).splitlines()[0]}). "
                             "It holds more than weights, and unpickling it could run code; convert it with a "
                             "tool you trust, or prune a .safetensors file instead.") from None
        state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
    weights = {key: value for key, value in state_dict.items()
               if isinstance(value, torch.Tensor) and key.startswith(MODEL_PREFIXES)}
    if not weights:
        raise ValueError(f"{path} holds no Stable Diffusion weights (no keys starting with "
                         f"{', '.join(MODEL_PREFIXES)})")
    half = {key: (value.half() if value.is_floating_point() else value).contiguous() for key, value in weights.items()}
    temporary = target + ".tmp"
    save_file(half, temporary, metadata={"format": "pt"})
    os.replace(temporary, target)
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.prune", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a diffusers checkpoint folder, or a .ckpt/.safetensors file")
    parser.add_argument("--out", help="the pruned file (default: <name>-pruned.safetensors beside the input)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights (folders with ema/)")
    args = parser.parse_args(argv)
    from utils.models import ModelLoadError

    source, target = args.checkpoint, args.out or pruned_path(args.checkpoint)
    try:
        if os.path.isdir(source):
            written = prune_folder(source, target, args.ema)
        elif os.path.isfile(source):
            if args.ema:
                raise ValueError("--ema needs a checkpoint folder with ema/ (single files keep their own weights)")
            written = prune_single_file(source, target)
        else:
            raise ValueError(f"{source} does not exist")
    except (ValueError, OSError, ModelLoadError) as error:
        print(f"prune: {error}", file=sys.stderr)
        return 2
    print(f"pruned {source} -> {written} ({os.path.getsize(written) / 2**20:,.1f} MiB, fp16)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
