"""bench/step_levers.py: each lever is in effect while it is timed, and undone after, on the tiny model."""

from __future__ import annotations

import functools

import torch

from bench import step_levers


def nhwc(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def test_each_lever_is_applied_while_timed_and_undone_after(monkeypatch, capsys, fresh_accelerator):
    seen = {}
    real_time_bare = step_levers.time_bare

    def spy(bare, settings):
        unet, vae = bare.plain["unet"], bare.vae
        conv = unet.conv_in.weight
        with torch.no_grad():
            latents = bare.encode(bare.pixels)  # the UNet's input: the VAE encodes at every step here
        norms = [module for part in (unet, bare.plain["text_encoder"], vae) for module in part.modules()
                 if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
        lowered = {isinstance(module.forward, functools.partial) for module in norms}  # low_precision_norm's
        seen[(bare.pixels.shape[0], len(seen))] = dict(
            channels_last=nhwc(conv), input_channels_last=nhwc(latents),
            fused=bool(bare.optimizer.defaults.get("fused")), vae=next(vae.parameters()).dtype, unet=conv.dtype,
            norms_lowered=lowered)
        return real_time_bare(bare, settings)

    monkeypatch.setattr(step_levers, "time_bare", spy)
    captured = {}
    real_prepare = step_levers.prepare_bare

    def keep(settings):
        bare, flops, executed = real_prepare(settings)
        captured["bare"] = bare
        captured["before"] = {name: tensor.clone() for name, tensor in bare.plain["unet"].state_dict().items()}
        captured["vae"] = {name: tensor.clone() for name, tensor in bare.vae.state_dict().items()}
        return bare, flops, executed

    monkeypatch.setattr(step_levers, "prepare_bare", keep)
    assert step_levers.main(["--model", "tiny", "--resolution", "64", "--batch", "1", "--batches", "2",
                             "--steps", "1", "--warmup", "0", "--precision", "bf16", "--train_text_encoder",
                             "--device", "cpu"]) == 0

    states = list(seen.values())
    f32, bf16 = torch.float32, torch.bfloat16
    norms_kept, norms_lowered = {False}, {True}  # every norm as built; every norm through low_precision_norm
    expected = [  # baseline, channels_last, fused_adamw, bf16_frozen, bf16_weights, bf16_norms, combined; batch 2
        dict(channels_last=False, fused=False, vae=f32, unet=f32, norms_lowered=norms_kept),
        dict(channels_last=True, fused=False, vae=f32, unet=f32, norms_lowered=norms_kept),
        dict(channels_last=False, fused=True, vae=f32, unet=f32, norms_lowered=norms_kept),
        dict(channels_last=False, fused=False, vae=bf16, unet=f32, norms_lowered=norms_kept),
        dict(channels_last=False, fused=False, vae=bf16, unet=bf16, norms_lowered=norms_kept),
        dict(channels_last=False, fused=False, vae=f32, unet=f32, norms_lowered=norms_lowered),
        dict(channels_last=True, fused=True, vae=bf16, unet=f32, norms_lowered=norms_kept),
        dict(channels_last=False, fused=False, vae=f32, unet=f32, norms_lowered=norms_kept),
        dict(channels_last=True, fused=True, vae=bf16, unet=f32, norms_lowered=norms_kept)]
    assert [{key: state[key] for key in expected[0]} for state in states] == expected
    assert [state["input_channels_last"] for state in states] == [state["channels_last"] for state in expected]
    assert [batch for batch, _ in seen] == [1] * 7 + [2] * 2

    bare = captured["bare"]  # everything undone: fp32 in the default layout (the steps trained the weights)
    after = bare.plain["unet"].state_dict()
    assert after.keys() == captured["before"].keys()
    assert all(tensor.dtype == f32 and tensor.is_contiguous() for tensor in after.values())
    vae = bare.vae.state_dict()  # frozen, so untrained: its fp32 weights come back exactly after the bf16 levers
    assert all(torch.equal(vae[name], tensor) and vae[name].dtype == f32 for name, tensor in captured["vae"].items())

    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0:2] for line in table] == [
        ["| baseline", "1"], ["| channels_last", "1"], ["| fused_adamw", "1"], ["| bf16_frozen", "1"],
        ["| bf16_weights", "1"], ["| bf16_norms", "1"], ["| combined", "1"], ["| baseline", "2"], ["| combined", "2"]]


def test_a_low_precision_norm_computes_the_norm_in_bf16():
    """bf16_norms' forward: the same GroupNorm and LayerNorm, to bf16's precision, in bf16 under autocast; in
    fp32 without it (the lever is refused in fp32, but the function stays the norm)."""
    torch.manual_seed(0)
    for norm, hidden in ((torch.nn.GroupNorm(4, 16), torch.randn(2, 16, 8, 8)),
                         (torch.nn.LayerNorm(32), torch.randn(2, 5, 32))):
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
        with torch.no_grad():
            expected = norm(hidden)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lowered = step_levers.low_precision_norm(norm, hidden)
            assert lowered.dtype == torch.bfloat16
            torch.testing.assert_close(lowered.float(), expected, atol=0.05, rtol=0.02)
            assert torch.equal(step_levers.low_precision_norm(norm, hidden), expected)


def test_a_low_precision_norm_runs_its_kernel_outside_autocast(monkeypatch):
    """On CUDA, autocast would cast a norm's bf16 input back to fp32 (group_norm and layer_norm are on its fp32
    list; on the CPU they are not, so the test above cannot see it): the kernel must run with autocast off."""
    functional = torch.nn.functional
    seen = []

    def recording(kernel):
        def call(*args, **kwargs):
            seen.append((kernel.__name__, torch.is_autocast_enabled("cpu"), args[0].dtype))
            return kernel(*args, **kwargs)
        return call

    monkeypatch.setattr(functional, "group_norm", recording(functional.group_norm))
    monkeypatch.setattr(functional, "layer_norm", recording(functional.layer_norm))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        step_levers.low_precision_norm(torch.nn.GroupNorm(2, 4), torch.randn(1, 4, 2, 2))
        step_levers.low_precision_norm(torch.nn.LayerNorm(8), torch.randn(1, 8))
    assert seen == [("group_norm", False, torch.bfloat16), ("layer_norm", False, torch.bfloat16)]


def test_levers_that_do_not_apply_say_why():
    settings = step_levers.Settings(precision="fp32", optimizer="adamw8bit")
    assert "AdamW8bit" in step_levers.why_not("fused_adamw", settings)
    assert all("fp32" in step_levers.why_not(lever, step_levers.Settings(precision="fp32"))
               for lever in ("bf16_frozen", "bf16_weights", "bf16_norms", "combined"))  # combined: bf16_frozen
    assert step_levers.why_not("channels_last", settings) is None


def test_a_fresh_optimizer_frees_the_state_of_the_one_before(fresh_accelerator):
    settings = step_levers.Settings(model="tiny", resolution=64, batch=1, steps=1, warmup=0, precision="bf16",
                                    device="cpu")
    bare, _, _ = step_levers.prepare_bare(settings)  # its FLOP count took one step: the optimizer has state
    before = bare.optimizer
    assert len(before.state) > 0
    step_levers.fresh_optimizer(bare, fused=True)
    assert len(before.state) == 0 and bare.optimizer is not before and bare.optimizer.defaults["fused"]
