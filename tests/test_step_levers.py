"""bench/step_levers.py: each lever is in effect while it is timed, and undone after, on the tiny model."""

from __future__ import annotations

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
        seen[(bare.pixels.shape[0], len(seen))] = dict(
            channels_last=nhwc(conv), input_channels_last=nhwc(latents),
            fused=bool(bare.optimizer.defaults.get("fused")), vae=next(vae.parameters()).dtype, unet=conv.dtype)
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
    expected = [  # baseline, channels_last, fused_adamw, bf16_frozen, bf16_weights, combined; then batch 2
        dict(channels_last=False, fused=False, vae=f32, unet=f32),
        dict(channels_last=True, fused=False, vae=f32, unet=f32),
        dict(channels_last=False, fused=True, vae=f32, unet=f32),
        dict(channels_last=False, fused=False, vae=bf16, unet=f32),
        dict(channels_last=False, fused=False, vae=bf16, unet=bf16),
        dict(channels_last=True, fused=True, vae=bf16, unet=f32),
        dict(channels_last=False, fused=False, vae=f32, unet=f32),
        dict(channels_last=True, fused=True, vae=bf16, unet=f32)]
    assert [{key: state[key] for key in expected[0]} for state in states] == expected
    assert [state["input_channels_last"] for state in states] == [state["channels_last"] for state in expected]
    assert [batch for batch, _ in seen] == [1] * 6 + [2] * 2

    bare = captured["bare"]  # everything undone: fp32 in the default layout (the steps trained the weights)
    after = bare.plain["unet"].state_dict()
    assert after.keys() == captured["before"].keys()
    assert all(tensor.dtype == f32 and tensor.is_contiguous() for tensor in after.values())
    vae = bare.vae.state_dict()  # frozen, so untrained: its fp32 weights come back exactly after the bf16 levers
    assert all(torch.equal(vae[name], tensor) and vae[name].dtype == f32 for name, tensor in captured["vae"].items())

    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0:2] for line in table] == [
        ["| baseline", "1"], ["| channels_last", "1"], ["| fused_adamw", "1"], ["| bf16_frozen", "1"],
        ["| bf16_weights", "1"], ["| combined", "1"], ["| baseline", "2"], ["| combined", "2"]]


def test_levers_that_do_not_apply_say_why():
    settings = step_levers.Settings(precision="fp32", optimizer="adamw8bit")
    assert "AdamW8bit" in step_levers.why_not("fused_adamw", settings)
    assert all("fp32" in step_levers.why_not(lever, step_levers.Settings(precision="fp32"))
               for lever in ("bf16_frozen", "bf16_weights", "combined"))  # combined holds bf16_frozen
    assert step_levers.why_not("channels_last", settings) is None


def test_a_fresh_optimizer_frees_the_state_of_the_one_before(fresh_accelerator):
    settings = step_levers.Settings(model="tiny", resolution=64, batch=1, steps=1, warmup=0, precision="bf16",
                                    device="cpu")
    bare, _, _ = step_levers.prepare_bare(settings)  # its FLOP count took one step: the optimizer has state
    before = bare.optimizer
    assert len(before.state) > 0
    step_levers.fresh_optimizer(bare, fused=True)
    assert len(before.state) == 0 and bare.optimizer is not before and bare.optimizer.defaults["fused"]
