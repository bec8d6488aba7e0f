"""What to change when a run does not fit in GPU memory: the memory-saving settings it does not use yet.

Torch-free: it reads the run's plan only. The settings are listed largest saving first, as they weigh for
SD 1.x at 512 px (UNet 860M parameters): gradient checkpointing (most of the activations, which grow with the
batch), 8-bit optimizer states (about 5 GB), a smaller batch with more accumulation (the same update), the
text encoder frozen (its gradients and optimizer state, about 1.5 GB), the EMA copy off the GPU (3.4 GB in
fp32), then 16-bit activations, the attention that uses least memory, and a lower resolution.
"""

from __future__ import annotations

# The same optimizer with its states in 8 bits, and the bytes that saves per trained parameter (AdamW keeps two
# states, Lion one).
EIGHT_BIT_TWINS = {"adamw": ("adamw8bit", 6), "lion": ("lion8bit", 3)}
LEAST_MEMORY_ATTENTION = "slice"


def out_of_memory_advice(plan, where: str) -> str:
    """The message for running out of GPU memory `where` ("in step 12 on cuda:0 (23.6 GiB)", say): what
    trained at what size, then each setting that would take less memory, with its value to set."""
    config = plan.config
    changes = memory_saving_changes(plan)
    parts = " and ".join(part for part, trained in (("UNet", not config.disable_unet_training),
                                                    ("text encoder", not config.disable_textenc_training)) if trained)
    lines = [f"out of GPU memory {where}, training the {parts} on batches of {config.batch_size} at "
             f"{config.resolution} px."]
    if changes:
        lines.append("These settings take less memory, the largest saving first; set one or more and run again:")
        lines += [f"  - {setting}: {why}" for setting, why in changes]
    else:
        lines.append("Every memory-saving setting is on already: a GPU with more memory is needed.")
    lines.append("See doc/TWEAKING.md, \"Memory and speed\".")
    return "\n".join(lines)


def memory_saving_changes(plan) -> list[tuple[str, str]]:
    """(setting to write, what it saves) for each memory-saving setting the run does not use, largest first."""
    config = plan.config
    changes = []
    if not config.gradient_checkpointing:
        changes.append(("gradient_checkpointing: true", "activations recomputed in the backward pass instead of "
                        "kept, much less memory for 20-30% more time"))
    trained_groups = [settings for settings, trained in (
        (plan.optimizer_settings.unet, not config.disable_unet_training),
        (plan.optimizer_settings.text_encoder, not config.disable_textenc_training)) if trained]
    twins = {EIGHT_BIT_TWINS[group.optimizer] for group in trained_groups if group.optimizer in EIGHT_BIT_TWINS}
    if len(twins) == 1:  # one optimizer for every trained part: `optimizer` sets both
        (twin, saved_bytes), = twins
        changes.append((f"optimizer: {twin}", f"the optimizer's states in 8 bits instead of 32, {saved_bytes} bytes "
                        "less per trained parameter"))
    if config.batch_size > 1:
        smaller = config.batch_size // 2
        accumulation = config.grad_accum * config.batch_size // smaller
        same = "the same" if smaller * accumulation == config.batch_size * config.grad_accum else "about the same"
        changes.append((f"batch_size: {smaller} with grad_accum: {accumulation}",
                        f"{same} images per update, in smaller batches"))
    if not config.disable_textenc_training and not config.disable_unet_training:
        changes.append(("disable_textenc_training: true", "the text encoder frozen: no gradients or optimizer "
                        "state for it"))
    if plan.ema_decay is not None and config.ema_device == "cuda":
        changes.append(("ema_device: cpu", "the EMA copy of the model kept in CPU memory"))
    if config.mixed_precision == "no" or config.disable_amp:
        changes.append(("mixed_precision: bf16", "activations in 16 bits (fp16 on GPUs older than Ampere)"))
    if config.attn_type != LEAST_MEMORY_ATTENTION:
        changes.append((f"attn_type: {LEAST_MEMORY_ATTENTION}", "attention computed in slices, the least memory "
                        "and the slowest"))
    if config.resolution > 256:
        changes.append((f"resolution: {config.resolution - 64}", "buckets of fewer pixels, which the model then "
                        "learns at"))
    return changes
