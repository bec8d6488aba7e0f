"""`python -m utils.prune`: a checkpoint to a small inference-only fp16 single file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from utils.prune import main as prune
from utils.prune import pruned_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny model saved as a checkpoint folder, with EMA weights that differ from the model's."""
    from diffusers import StableDiffusionPipeline

    from utils.ema import EMA
    from utils.tiny_model import build_tiny_components

    folder = tmp_path_factory.mktemp("run") / "demo-ep01-gs00007"
    parts = build_tiny_components()
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    ema = EMA({"unet": parts["unet"]}, decay=0.5, device="cpu")
    for average in ema.averages["unet"].values():
        average.add_(1.0)
    ema.save(str(folder / "ema"), {"unet": parts["unet"]})
    return folder


def test_a_checkpoint_folder_prunes_to_an_fp16_single_file(checkpoint):
    assert prune([str(checkpoint)]) == 0
    pruned = load_file(pruned_path(str(checkpoint)))
    assert Path(pruned_path(str(checkpoint))).name == "demo-ep01-gs00007-pruned.safetensors"
    assert all(v.dtype == torch.float16 for v in pruned.values() if v.is_floating_point())
    assert {k.split(".")[0] for k in pruned} == {"model", "first_stage_model", "cond_stage_model"}


def test_the_ema_option_takes_the_averaged_unet(checkpoint, tmp_path):
    plain, averaged = tmp_path / "plain.safetensors", tmp_path / "ema.safetensors"
    assert prune([str(checkpoint), "--out", str(plain)]) == 0
    assert prune([str(checkpoint), "--ema", "--out", str(averaged)]) == 0
    plain_weights, ema_weights = load_file(plain), load_file(averaged)
    key = "model.diffusion_model.out.2.weight"
    assert torch.allclose(ema_weights[key].float(), plain_weights[key].float() + 1.0, atol=1e-2)
    vae_key = next(k for k in plain_weights if k.startswith("first_stage_model."))
    assert torch.equal(ema_weights[vae_key], plain_weights[vae_key])  # parts without EMA as saved


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_a_training_single_file_loses_ema_copies_and_training_state(tmp_path, kind):
    weights = {"model.diffusion_model.out.2.weight": torch.randn(4, 4),
               "first_stage_model.decoder.conv_out.bias": torch.randn(3),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(8),
               "model_ema.diffusion_modelout2weight": torch.randn(4, 4), "model_ema.num_updates": torch.tensor(3)}
    source = tmp_path / f"last.{kind}"
    if kind == "safetensors":
        save_file(weights, source)
    else:
        torch.save({"state_dict": weights, "optimizer_states": [{"lr": 1e-6}], "global_step": 1437}, source)
    assert prune([str(source)]) == 0
    pruned = load_file(tmp_path / "last-pruned.safetensors")
    assert set(pruned) == {k for k in weights if not k.startswith("model_ema.")}
    assert all(v.dtype == torch.float16 for v in pruned.values())
    assert source.is_file()  # the input is kept


def test_a_ckpt_that_needs_code_to_unpickle_is_refused_not_run(tmp_path):
    source = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Path("x")}, source)  # any non-weight object needs unpickling code
    result = subprocess.run([sys.executable, "-m", "utils.prune", str(source)], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "cannot be read safely" in result.stderr
    assert not (tmp_path / "evil-pruned.safetensors").exists()


def test_a_missing_checkpoint_or_ema_on_a_single_file_is_a_clear_error(tmp_path, capsys):
    assert prune([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    save_file({"model.diffusion_model.x": torch.zeros(1)}, tmp_path / "one.safetensors")
    assert prune([str(tmp_path / "one.safetensors"), "--ema"]) == 2
    assert "--ema needs a checkpoint folder" in capsys.readouterr().err
