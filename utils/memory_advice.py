"""What to change when a run does not fit in GPU memory: the memory-saving settings it does not use yet.

Torch-free: it reads the run's plan only. The settings are listed in the order of what they save for SD 1.x
at 512 px (UNet 860M parameters): gradient checkpointing (most of the activations, which grow with the
batch), 8-bit optimizer states (about 5 GB), a smaller batch with more accumulation (the same update), the
EMA copy off the GPU (3.4 GB in fp32), the text encoder frozen (its gradients and optimizer state, about
1.5 GB), 16-bit activations, then a lower resolution. (diffusers' sliced attention is not suggested: in
training its backward pass keeps every slice's attention matrix, and PyTorch's fused attention, the
default, needs less.)
"""

from __future__ import annotations

from typing import NamedTuple

from utils.resume import CHANGEABLE_ON_RESUME

# The same optimizer with its states in 8 bits, and the bytes that saves per trained parameter (AdamW keeps two
# states, Lion one). Both parts always use one optimizer (optimizer.json refuses two).
EIGHT_BIT_TWINS = {"adamw": ("adamw8bit", 6), "lion": ("lion8bit", 3)}


class Change(NamedTuple):
    """One memory-saving change: the config keys to write, with their values, and what it saves."""

    settings: dict[str, object]
    saves: str

    def __str__(self) -> str:
        return ", ".join(f"{key}: {value}" for key, value in self.settings.items())


def out_of_memory_advice(plan, where: str) -> str:
    """The message for running out of GPU memory `where` ("with 12 steps done, on cuda (23.6 GiB)", say): what
    trained at what size, then each setting that would take less memory, with the value to write."""
    config = plan.config
    changes = memory_saving_changes(plan)
    parts = " and ".join(part for part, trained in (("UNet", not config.disable_unet_training),
                                                    ("text encoder", not config.disable_textenc_training)) if trained)
    lines = [f"out of GPU memory {where}, training the {parts} on batches of {config.batch_size} at "
             f"{config.resolution} px."]
    if not changes:
        lines.append("Every memory-saving setting is on already: a GPU with more memory is needed.")
    else:
        lines.append("These settings take less memory, the largest saving first; set one or more and run again:")
        lines += [f"  - {change}: {change.saves}" for change in changes]
        fixed = sorted({key for change in changes for key in change.settings} - CHANGEABLE_ON_RESUME)
        if fixed:
            lines.append(f"A run continued with --resume_run also needs --force_resume to change {', '.join(fixed)}.")
    lines.append("See doc/TWEAKING.md, \"Memory and speed\".")
    return "\n".join(lines)


def memory_saving_changes(plan) -> list[Change]:
    """Each memory-saving setting the run does not use, largest saving first."""
    config = plan.config
    changes = []
    if not config.gradient_checkpointing:
        changes.append(Change({"gradient_checkpointing": "true"}, "activations recomputed in the backward pass "
                              "instead of kept, much less memory for 20-30% more time"))
    twin = EIGHT_BIT_TWINS.get(plan.optimizer_settings.unet.optimizer)
    if twin:
        changes.append(Change({"optimizer": twin[0]}, f"the optimizer's states in 8 bits instead of 32, {twin[1]} "
                              "bytes less per trained parameter"))
    if config.batch_size > 1:
        smaller = config.batch_size // 2
        accumulation = config.grad_accum * config.batch_size // smaller
        same = "the same" if smaller * accumulation == config.batch_size * config.grad_accum else "about the same"
        changes.append(Change({"batch_size": smaller, "grad_accum": accumulation},
                              f"{same} images per update, in smaller batches"))
    if plan.ema_decay is not None and config.ema_device == "cuda":
        changes.append(Change({"ema_device": "cpu"}, "the EMA copy of the model kept in CPU memory"))
    if not config.disable_textenc_training and not config.disable_unet_training:
        changes.append(Change({"disable_textenc_training": "true"}, "the text encoder frozen: no gradients or "
                              "optimizer state for it"))
    sixteen_bits = "activations in 16 bits (fp16 on GPUs older than Ampere)"
    if config.disable_amp:
        changes.append(Change({"disable_amp": "false", "mixed_precision": "bf16"}, sixteen_bits))
    elif config.mixed_precision == "no":
        changes.append(Change({"mixed_precision": "bf16"}, sixteen_bits))
    if config.resolution > 256:
        changes.append(Change({"resolution": config.resolution - 64}, "buckets of fewer pixels, which the model "
                              "then learns at"))
    return changes
