"""Gradient accumulation is exact: batch b with grad_accum k gives the update of one batch of k*b.

EveryDream2 summed the micro-batch losses (k times the gradient) and stepped its lr schedule on every
micro-batch. Here train.train_batch divides each loss by its group's size and steps once per group.
The test trains the tiny model with the real loss maths; only the noise and timesteps are tied to each
sample (instead of to the step) so that both ways see exactly the same samples, noise and timesteps.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import train
from utils import diffusion
from utils.loop_state import LoopState
from utils.tiny_model import build_tiny_components

SAMPLES = 4


def per_sample_noise_step(trainee, batch, config, global_step, accelerator):
    """train.train_step's maths, with noise and timesteps drawn per sample from its index."""
    model = trainee.model
    latents = model.vae.encode(batch["pixels"]).latent_dist.mean * model.vae.config.scaling_factor
    noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(100 + i))
                         for i in batch["indices"]])
    timesteps = torch.tensor([(37 * i + 11) % 1000 for i in batch["indices"]])
    noisy = diffusion.add_noise(latents, noise, timesteps, trainee.alphas_cumprod)
    hidden = model.text_encoder(batch["input_ids"]).last_hidden_state
    prediction = trainee.unet(noisy, timesteps, hidden).sample
    target = diffusion.training_target(model.prediction_type, latents, noise, timesteps, trainee.alphas_cumprod)
    return diffusion.weighted_mean(diffusion.per_sample_loss(prediction, target), batch["loss_scale"])


@pytest.fixture(scope="module")
def samples():
    generator = torch.Generator().manual_seed(0)
    tokenizer = build_tiny_components()["tokenizer"]
    captions = ["a red square", "a blue circle", "a green triangle", "a yellow star"]
    return {"pixels": torch.rand(SAMPLES, 3, 64, 64, generator=generator) * 2 - 1,
            "input_ids": tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids,
            "indices": list(range(SAMPLES)), "loss_scale": torch.tensor([1.0, 0.5, 2.0, 1.0])}


def per_part(optimizer_class, trainee, **options) -> torch.optim.Optimizer:
    """An optimizer as train.py builds it (optimizer.optimizers.build_optimizer): one group per trained part,
    named as the part, which is how train.step_optimizer finds each part's gradients."""
    return optimizer_class([{"params": list(module.parameters()), "name": name}
                            for name, module in trainee.trained_parts().items()], **options)


def loader_batch(values: dict) -> dict:
    """A batch as data.dataset.Collate makes it, from the tensors the tests choose."""
    return {"latent_params": None, "stand_in": False, "bucket": (64, 64), "captions": [], **values}


def train_one_update(samples, batch_size: int, grad_accum: int, monkeypatch, accelerator=None):
    """One optimizer step over the samples in micro-batches of batch_size; the UNet's weights after it."""
    from accelerate import Accelerator

    monkeypatch.setattr(train, "train_step", per_sample_noise_step)
    torch.manual_seed(0)
    parts = build_tiny_components()
    model = SimpleNamespace(**parts, prediction_type="epsilon")
    model.text_encoder.requires_grad_(False)
    model.vae.requires_grad_(False)
    trainee = train.Trainee(model, model.unet, model.text_encoder, train_unet=True, train_text_encoder=False,
                            alphas_cumprod=parts["scheduler"].alphas_cumprod)
    # SGD: the update is the gradient itself (Adam divides by |gradient|, which blows float rounding in
    # near-zero gradients up to a full step).
    optimizer = per_part(torch.optim.SGD, trainee, lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    plan = SimpleNamespace(config=SimpleNamespace(grad_accum=grad_accum, clip_grad_norm=None, seed=0),
                           optimizer_settings=SimpleNamespace(log_grad_norm=False, grad_scaler_step_tweaks=False))
    state = LoopState()
    batches = [loader_batch({key: value[start:start + batch_size] for key, value in samples.items()})
               for start in range(0, len(samples["indices"]), batch_size)]
    for index, batch in enumerate(batches):
        train.train_batch(trainee, batch, index, len(batches), optimizer, schedule, plan, state,
                          accelerator or Accelerator(cpu=True))
    return [p.detach().clone() for p in model.unet.parameters()], state, schedule


def test_grad_accum_gives_the_same_update_as_one_big_batch(samples, monkeypatch):
    reference, state, schedule = train_one_update(samples, SAMPLES, 1, monkeypatch)
    assert state.optimizer_step == 1 and schedule.last_epoch == 1
    for batch_size, grad_accum in ((2, 2), (1, 4)):
        weights, state, schedule = train_one_update(samples, batch_size, grad_accum, monkeypatch)
        assert state.optimizer_step == 1 and schedule.last_epoch == 1  # one step, one schedule step
        for ours, big in zip(weights, reference):
            torch.testing.assert_close(ours, big, rtol=1e-5, atol=1e-6)


def test_summing_instead_of_averaging_would_be_caught(samples, monkeypatch):
    """The comparison above is sharp: EveryDream2's summed losses give a different update."""
    reference, _, _ = train_one_update(samples, SAMPLES, 1, monkeypatch)
    original = train.train_batch

    def summing(trainee, batch, index, batches_in_epoch, optimizer, schedule, plan, state, accelerator):
        loss = per_sample_noise_step(trainee, batch, plan.config, state.global_step, accelerator)
        loss.backward()  # no division by the group's size
        if index == batches_in_epoch - 1:
            optimizer.step()
        return loss.detach(), {}

    monkeypatch.setattr(train, "train_batch", summing)
    try:
        summed, _, _ = train_one_update(samples, 2, 2, monkeypatch)
    finally:
        monkeypatch.setattr(train, "train_batch", original)
    differences = [(a - b).abs().max().item() for a, b in zip(summed, reference)]
    assert max(differences) > 1e-4


def test_training_lowers_the_loss_on_fixed_noise_and_timesteps(samples, monkeypatch):
    """It learns: after a few updates on four images, the loss on the same noise and timesteps is lower."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    parts = build_tiny_components()
    model = SimpleNamespace(**parts, prediction_type="epsilon")
    model.vae.requires_grad_(False)
    trainee = train.Trainee(model, model.unet, model.text_encoder, train_unet=True, train_text_encoder=True,
                            alphas_cumprod=parts["scheduler"].alphas_cumprod)
    optimizer = per_part(torch.optim.AdamW, trainee, lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    plan = SimpleNamespace(config=SimpleNamespace(grad_accum=1, clip_grad_norm=1.0, seed=0),
                           optimizer_settings=SimpleNamespace(log_grad_norm=False, grad_scaler_step_tweaks=False))
    monkeypatch.setattr(train, "train_step", per_sample_noise_step)
    with torch.no_grad():
        before = per_sample_noise_step(trainee, samples, None, 0, None).item()
    state, accelerator = LoopState(), Accelerator(cpu=True)
    for _ in range(15):
        train.train_batch(trainee, loader_batch(samples), 0, 1, optimizer, schedule, plan, state, accelerator)
    with torch.no_grad():
        after = per_sample_noise_step(trainee, samples, None, 0, None).item()
    assert state.optimizer_step == 15
    assert after < 0.7 * before, (before, after)


# =================================================================================================
# Frozen parts, through the real train_step
# =================================================================================================

@pytest.mark.parametrize("train_unet, train_text_encoder", [(True, False), (False, True)])
def test_a_frozen_part_gets_no_gradient_no_graph_and_no_optimizer_state(samples, train_unet, train_text_encoder):
    """disable_textenc_training / disable_unet_training: the frozen module has requires_grad off, so the
    real train_step builds no graph through it and it never enters the optimizer."""
    from accelerate import Accelerator

    from utils.config import TrainConfig
    from utils.model_family import SD1
    from utils.models import SDModel

    torch.manual_seed(0)
    model = SDModel(**build_tiny_components(), family=SD1, source="test")
    for module, trained in ((model.unet, train_unet), (model.text_encoder, train_text_encoder), (model.vae, False)):
        module.requires_grad_(trained)
    trainee = train.Trainee(model, model.unet, model.text_encoder, train_unet, train_text_encoder,
                            model.scheduler.alphas_cumprod)
    parts = trainee.trained_parts()
    optimizer = torch.optim.AdamW([p for m in parts.values() for p in m.parameters()], lr=1e-3)
    config = TrainConfig(resume_ckpt="builtin:tiny", cond_dropout=0.0)
    loss = train.train_step(trainee, loader_batch(samples), config, 0, Accelerator(cpu=True))
    loss.backward()
    optimizer.step()
    frozen = model.text_encoder if train_unet else model.unet
    trained = model.unet if train_unet else model.text_encoder
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.grad is not None for p in trained.parameters() if p.requires_grad)
    assert not any(p in optimizer.state for p in frozen.parameters())
    if not train_text_encoder:  # no graph at all through the text encoder: its output needs no gradient
        with torch.set_grad_enabled(True):
            hidden = model.family.encode(model.text_encoder, samples["input_ids"]).hidden_states
        assert not hidden.requires_grad


class TwinProcesses:
    """An accelerator as one of two processes would see it when the other trains exactly the same: DDP's
    average of the gradients leaves them as they are, and a sum over processes doubles."""

    num_processes = 2

    def __init__(self):
        from accelerate import Accelerator

        self.one = Accelerator(cpu=True)

    def __getattr__(self, name):
        return getattr(self.one, name)

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor * 2


def test_two_processes_step_with_the_mean_gradient_over_all_their_batches(samples, monkeypatch):
    alone, _, _ = train_one_update(samples, 2, 2, monkeypatch)
    twins, state, _ = train_one_update(samples, 2, 2, monkeypatch, accelerator=TwinProcesses())
    assert state.optimizer_step == 1
    for ours, reference in zip(twins, alone):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)


def test_an_unreadable_batch_in_a_group_does_not_shrink_the_update(samples, monkeypatch):
    """If every image of one batch of a grad_accum group fails to load, the group's update is the average
    over the batches that trained, the same as training those alone."""
    first_two = {key: value[:2] for key, value in samples.items()}
    reference, _, _ = train_one_update(first_two, 2, 1, monkeypatch)
    unreadable = loader_batch({"pixels": None, "input_ids": None, "indices": [], "loss_scale": None})
    original = train.train_batch

    def with_a_broken_second_batch(trainee, batch, index, batches_in_epoch, *args):
        return original(trainee, batch if index == 0 else unreadable, index, batches_in_epoch, *args)

    monkeypatch.setattr(train, "train_batch", with_a_broken_second_batch)
    try:
        weights, state, _ = train_one_update(samples, 2, 2, monkeypatch)
    finally:
        monkeypatch.setattr(train, "train_batch", original)
    assert state.optimizer_step == 1 and state.batches_in_group == 0
    for ours, alone in zip(weights, reference):
        torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-6)


def test_steps_at_a_position_follow_the_plan_given():
    """--force_resume recounts a checkpoint's steps for the new plan: whole epochs, then the batches done in the
    current one (capped at its length), and the optimizer steps of grad_accum groups, the last one short."""
    from utils.loop_state import LoopState, steps_at

    assert steps_at(LoopState(epoch=1, batch_in_epoch=0), [7, 7, 7], grad_accum=2) == (7, 4)
    assert steps_at(LoopState(epoch=1, batch_in_epoch=4), [7, 7, 7], grad_accum=2) == (11, 6)
    assert steps_at(LoopState(epoch=1, batch_in_epoch=6), [4, 4, 4], grad_accum=1) == (8, 8)  # more processes
    assert steps_at(LoopState(epoch=3, batch_in_epoch=0), [4, 4, 4], grad_accum=3) == (12, 6)  # the end
