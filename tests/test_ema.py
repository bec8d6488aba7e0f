"""The EMA of the trained weights (utils/ema.py) and its decay (utils/run_plan.resolve_ema_decay)."""

from __future__ import annotations

import pytest
import torch

from utils.run_plan import resolve_ema_decay
from utils.ema import EMA, load_saved_ema
from utils.tiny_model import build_tiny_components


def tiny_modules():
    torch.manual_seed(0)
    parts = build_tiny_components()
    return {"unet": parts["unet"], "text encoder": parts["text_encoder"]}


def test_each_update_moves_the_average_toward_the_weights_by_one_minus_decay():
    layer = torch.nn.Linear(3, 2)
    ema = EMA({"unet": layer}, decay=0.9, device="cpu")
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update({"unet": layer})
    assert torch.allclose(ema.averages["unet"]["weight"], 0.9 * start + 0.1 * (start + 1.0))
    ema.update({"unet": layer})
    assert torch.allclose(ema.averages["unet"]["weight"], start + 1.0 - 0.81)  # (1 - 0.9²) of the way


def test_frozen_weights_are_not_averaged_and_the_model_keeps_its_own():
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    ema = EMA({"unet": layer}, decay=0.5, device="cpu")
    assert set(ema.averages["unet"]) == {"weight"}
    with torch.no_grad():
        layer.weight.add_(2.0)
        layer.bias.add_(2.0)
    ema.update({"unet": layer})
    state = ema.state_dict_for("unet", layer)
    assert torch.equal(state["bias"], layer.bias) and not torch.equal(state["weight"], layer.weight)


def test_the_average_lives_on_its_device_in_fp32_and_is_not_the_models_tensor():
    layer = torch.nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA({"unet": layer}, decay=0.5, device="cpu")
    average = ema.averages["unet"]["weight"]
    assert average.dtype == torch.float32 and average.data_ptr() != layer.weight.data_ptr()


def test_saved_averages_load_back_for_ema_resume_model(tmp_path):
    modules = tiny_modules()
    ema = EMA(modules, decay=0.5, device="cpu")
    with torch.no_grad():
        for module in modules.values():
            for parameter in module.parameters():
                parameter.add_(0.25)
    ema.update(modules)
    ema.save(str(tmp_path / "ckpt" / "ema"), modules)
    fresh = EMA(tiny_modules(), decay=0.5, device="cpu")
    saved = load_saved_ema(str(tmp_path / "ckpt"))  # a checkpoint folder: its ema/ is found
    for part, averages in ema.averages.items():
        assert fresh.load(part, saved[part]) == len(averages)
        for name, value in averages.items():
            assert torch.equal(fresh.averages[part][name], value), (part, name)


def test_loading_an_ema_of_another_model_is_an_error():
    ema = EMA({"unet": torch.nn.Linear(3, 2)}, decay=0.5, device="cpu")
    with pytest.raises(ValueError, match="another model"):
        ema.load("unet", {"weight": torch.zeros(4, 4)})


def test_a_folder_without_ema_weights_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no unet/ or text_encoder/"):
        load_saved_ema(str(tmp_path))


@pytest.mark.parametrize("target, updates", [(0.1, 20), (0.5, 1), (0.01, 300)])
def test_strength_target_leaves_that_share_of_the_start_after_every_update(target, updates):
    decay, origin = resolve_ema_decay(None, target, updates)
    assert decay ** updates == pytest.approx(target) and "ema_strength_target" in origin


def test_decay_rate_is_used_as_given():
    assert resolve_ema_decay(0.995, None, 10) == (0.995, "ema_decay_rate")


def test_ema_weights_of_another_model_are_refused_not_taken_half_empty(tmp_path):
    """An EMA folder whose UNet file lacks half its tensors: diffusers would leave those on the meta device."""
    from safetensors.torch import load_file, save_file

    from utils.models import ModelLoadError

    modules = tiny_modules()
    EMA(modules, decay=0.5, device="cpu").save(str(tmp_path / "ckpt" / "ema"), modules)
    (weights,) = (tmp_path / "ckpt" / "ema" / "unet").glob("*.safetensors")
    save_file(dict(list(load_file(weights).items())[::2]), weights)
    with pytest.raises(ModelLoadError, match=r"^EMA weights: .*/ema/unet holds weights for a different model\. "
                                             r"Its parameters missing from its weight file: \d+"):
        load_saved_ema(str(tmp_path / "ckpt"))
