"""Optimizer settings (optimizer.json + training config), the LR schedule and the optimizer itself."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from optimizer.optimizer_config import (GroupSettings, OptimizerSettings, load_optimizer_settings,
                                        read_optimizer_file, resolve_optimizer_settings, schedule_steps)
from optimizer.optimizers import build_lr_schedule, build_optimizer
from utils.config import ConfigError, TrainConfig

SOURCE = "optimizer.json"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**values) -> TrainConfig:
    return TrainConfig(resume_ckpt="builtin:tiny", **values)


def resolve(data: dict, **config_values):
    return resolve_optimizer_settings(config(**config_values), data, SOURCE)


def problems_of(error: pytest.ExceptionInfo) -> dict[str, str]:
    return {p.key: p.message for p in error.value.problems}


def test_optimizer_settings_are_torch_free():
    """A bad optimizer.json is reported with the rest of the config, before torch loads."""
    code = "import sys, optimizer.optimizer_config; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, "optimizer/optimizer_config.py imported torch\n" + result.stderr


# =================================================================================================
# Reading the file
# =================================================================================================

def test_a_missing_optimizer_file_reads_as_empty(tmp_path):
    assert read_optimizer_file(str(tmp_path / "nope.json")) == {}


def test_read_optimizer_file_parses_json(tmp_path):
    path = tmp_path / "opt.json"
    path.write_text(json.dumps({"base": {"lr": 3e-6}}))
    assert read_optimizer_file(str(path)) == {"base": {"lr": 3e-6}}


def test_invalid_json_is_a_config_error_with_the_line(tmp_path):
    path = tmp_path / "opt.json"
    path.write_text('{\n  "base": {"lr": 1e-6,}\n}')
    with pytest.raises(ConfigError, match="line 2"):
        read_optimizer_file(str(path))


def test_a_json_array_is_a_config_error(tmp_path):
    path = tmp_path / "opt.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        read_optimizer_file(str(path))


# =================================================================================================
# Defaults and precedence
# =================================================================================================

def test_defaults_without_a_file(tmp_path):
    settings = load_optimizer_settings(config(optimizer_config=str(tmp_path / "missing.json")))
    expected = GroupSettings(optimizer="adamw", lr=1e-6, betas=(0.9, 0.999), epsilon=1e-8, weight_decay=0.01)
    assert settings.unet == expected
    assert settings.text_encoder == expected
    assert settings.notes == ()


def test_load_optimizer_settings_reads_the_configured_file(tmp_path):
    path = tmp_path / "my_optimizer.json"
    path.write_text(json.dumps({"base": {"lr": 5e-6, "weight_decay": 0.0}}))
    settings = load_optimizer_settings(config(optimizer_config=str(path)))
    assert settings.unet.lr == settings.text_encoder.lr == 5e-6
    assert settings.unet.weight_decay == 0.0


@pytest.mark.parametrize("config_lr, base_lr, override_lr, unet_lr, te_lr", [
    (None, None, None, 1e-6, 1e-6),   # default
    (None, 2e-6, None, 2e-6, 2e-6),   # base > default
    (3e-6, None, None, 3e-6, 3e-6),   # training config > default
    (3e-6, 2e-6, None, 3e-6, 3e-6),   # training config > base
    (None, None, 4e-6, 1e-6, 4e-6),   # override: text encoder only
    (None, 2e-6, 4e-6, 2e-6, 4e-6),   # override > base
    (3e-6, 2e-6, 4e-6, 3e-6, 4e-6),   # override > training config
])
def test_lr_precedence(config_lr, base_lr, override_lr, unet_lr, te_lr):
    data = {"base": {"lr": base_lr}, "text_encoder_overrides": {"lr": override_lr}}
    settings = resolve(data, lr=config_lr)
    assert settings.unet.lr == unet_lr
    assert settings.text_encoder.lr == te_lr


@pytest.mark.parametrize("config_opt, base_opt, override_opt, expected", [
    (None, None, None, "adamw"),
    (None, "adamw8bit", None, "adamw8bit"),
    ("adamw8bit", "adamw", None, "adamw8bit"),
    ("adamw", "adamw8bit", None, "adamw"),
    ("adamw8bit", None, "adamw8bit", "adamw8bit"),
    (None, "adamw8bit", "adamw8bit", "adamw8bit"),
])
def test_optimizer_precedence(config_opt, base_opt, override_opt, expected):
    data = {"base": {"optimizer": base_opt}, "text_encoder_overrides": {"optimizer": override_opt}}
    settings = resolve(data, optimizer=config_opt)
    assert settings.unet.optimizer == settings.text_encoder.optimizer == expected


@pytest.mark.parametrize("key, json_key, default, base_value, override_value", [
    ("betas", "betas", (0.9, 0.999), [0.8, 0.99], [0.7, 0.95]),
    ("epsilon", "epsilon", 1e-8, 1e-7, 1e-6),
    ("weight_decay", "weight_decay", 0.01, 0.1, 0.0),
])
@pytest.mark.parametrize("in_base, in_override", [(False, False), (True, False), (False, True), (True, True)])
def test_base_and_override_precedence_per_key(key, json_key, default, base_value, override_value,
                                               in_base, in_override):
    data = {"base": {json_key: base_value} if in_base else {},
            "text_encoder_overrides": {json_key: override_value} if in_override else {}}
    settings = resolve(data, lr=5e-6, optimizer="adamw")  # training-config keys do not touch these
    as_setting = (lambda v: tuple(v)) if key == "betas" else (lambda v: v)
    unet_expected = as_setting(base_value) if in_base else default
    te_expected = as_setting(override_value) if in_override else unet_expected
    assert getattr(settings.unet, key) == unet_expected
    assert getattr(settings.text_encoder, key) == te_expected


def test_null_values_mean_not_set():
    data = {"base": {key: None for key in ("optimizer", "lr", "betas", "epsilon", "weight_decay")},
            "text_encoder_overrides": None}
    settings = resolve(data)
    assert settings.unet == settings.text_encoder == resolve({}).unet


def test_origins_name_where_each_value_came_from():
    data = {"base": {"weight_decay": 0.05}, "text_encoder_overrides": {"lr": 4e-6}}
    settings = resolve_optimizer_settings(config(lr=3e-6), data, SOURCE, {"lr": "train.json"})
    unet_line, te_line = settings.origins
    assert unet_line.startswith("unet:") and "lr in train.json" in unet_line
    assert f"base.weight_decay in {SOURCE}" in unet_line
    assert te_line.startswith("text encoder:") and f"text_encoder_overrides.lr in {SOURCE}" in te_line


# =================================================================================================
# scale_lr
# =================================================================================================

@pytest.mark.parametrize("batch_size, grad_accum", [(1, 1), (2, 1), (4, 3), (8, 2)])
def test_scale_lr_multiplies_both_lrs(batch_size, grad_accum):
    data = {"base": {"lr": 2e-6}, "text_encoder_overrides": {"lr": 5e-6}}
    settings = resolve(data, scale_lr=True, batch_size=batch_size, grad_accum=grad_accum)
    factor = (batch_size * grad_accum) ** 0.55
    assert settings.unet.lr == pytest.approx(2e-6 * factor, rel=1e-12)
    assert settings.text_encoder.lr == pytest.approx(5e-6 * factor, rel=1e-12)
    assert settings.unet.betas == (0.9, 0.999)  # nothing else changes


def test_without_scale_lr_the_lrs_are_not_scaled():
    settings = resolve({"base": {"lr": 2e-6}}, scale_lr=False, batch_size=8, grad_accum=4)
    assert settings.unet.lr == settings.text_encoder.lr == 2e-6


# =================================================================================================
# Errors
# =================================================================================================

@pytest.mark.parametrize("data, key, suggestion", [
    ({"bse": {}}, "bse", "base"),
    ({"text_encoder_overide": {}}, "text_encoder_overide", "text_encoder_overrides"),
    ({"base": {"weight_decy": 0.1}}, "base.weight_decy", "weight_decay"),
    ({"base": {"lr_schedular": "cosine"}}, "base.lr_schedular", "lr_scheduler"),
    ({"text_encoder_overrides": {"epsilom": 1e-8}}, "text_encoder_overrides.epsilom", "epsilon"),
    ({"text_encoder_freezing": {"freeze_embedding": True}}, "text_encoder_freezing.freeze_embedding",
     "freeze_embeddings"),
])
def test_unknown_keys_are_errors_with_a_suggestion(data, key, suggestion):
    with pytest.raises(ConfigError) as error:
        resolve(data)
    problems = problems_of(error)
    assert key in problems
    assert f"Did you mean {suggestion!r}?" in problems[key]
    assert SOURCE in str(error.value) and key in str(error.value)


def test_an_unknown_key_far_from_any_lists_the_known_keys():
    with pytest.raises(ConfigError) as error:
        resolve({"base": {"zzzzzz": 1}})
    assert "Known keys" in problems_of(error)["base.zzzzzz"]


@pytest.mark.parametrize("key, value", [
    ("betas", [0.9]),
    ("betas", [0.9, 0.999, 0.5]),
    ("betas", [0.9, 1.0]),
    ("betas", [-0.1, 0.999]),
    ("betas", "0.9, 0.999"),
    ("betas", [True, 0.999]),
    ("lr", -1e-6),
    ("lr", 0),
    ("lr", "1e-6"),
    ("lr", True),
    ("epsilon", 0.0),
    ("weight_decay", -0.01),
    ("optimizer", "adam"),
    ("optimizer", "sgd"),
])
@pytest.mark.parametrize("section", ["base", "text_encoder_overrides"])
def test_bad_values_are_errors(section, key, value):
    with pytest.raises(ConfigError) as error:
        resolve({section: {key: value}})
    assert f"{section}.{key}" in problems_of(error)


@pytest.mark.parametrize("section", ["base", "text_encoder_overrides", "text_encoder_freezing"])
def test_a_section_that_is_not_an_object_is_an_error(section):
    with pytest.raises(ConfigError) as error:
        resolve({section: [1, 2]})
    assert section in problems_of(error)


@pytest.mark.parametrize("data, config_values", [
    ({"base": {"optimizer": "adamw"}, "text_encoder_overrides": {"optimizer": "adamw8bit"}}, {}),
    ({"text_encoder_overrides": {"optimizer": "adamw8bit"}}, {}),
    ({"base": {"optimizer": "adamw8bit"}, "text_encoder_overrides": {"optimizer": "adamw"}}, {}),
    ({"text_encoder_overrides": {"optimizer": "adamw"}}, {"optimizer": "adamw8bit"}),
])
def test_a_different_text_encoder_optimizer_is_an_error(data, config_values):
    with pytest.raises(ConfigError) as error:
        resolve(data, **config_values)
    assert "text_encoder_overrides.optimizer" in problems_of(error)


def test_all_problems_in_a_file_are_reported_together():
    data = {"bse": {},
            "base": {"lr": -1, "betas": [1, 2], "optimzer": "adamw"},
            "text_encoder_overrides": {"weight_decay": -1},
            "text_encoder_freezing": {"freeze_embedding": True}}
    with pytest.raises(ConfigError) as error:
        resolve(data)
    assert set(problems_of(error)) == {"bse", "base.lr", "base.betas", "base.optimzer",
                                       "text_encoder_overrides.weight_decay",
                                       "text_encoder_freezing.freeze_embedding"}
    assert "6 problem(s)" in str(error.value)


def test_a_different_text_encoder_optimizer_is_reported_with_the_other_problems():
    """The optimizer mismatch can be seen in the same pass as an unknown key: both come in one error."""
    data = {"bse": {}, "base": {"optimizer": "adamw"}, "text_encoder_overrides": {"optimizer": "adamw8bit"}}
    with pytest.raises(ConfigError) as error:
        resolve(data)
    assert set(problems_of(error)) == {"bse", "text_encoder_overrides.optimizer"}


# =================================================================================================
# Notes: keys read but without effect yet
# =================================================================================================

@pytest.mark.parametrize("data, named", [
    ({"base": {"momentum": 0.9}}, "base.momentum"),  # adamw takes no momentum
    ({"base": {"optimizer": "lion", "epsilon": 1e-6}}, "base.epsilon"),  # nor does lion an epsilon
    ({"text_encoder_lr_scale": 0.5}, "text_encoder_lr_scale"),
])
def test_keys_without_effect_are_noted(data, named):
    notes = resolve(data).notes
    assert len(notes) == 1
    assert named in notes[0] and "no effect" in notes[0] and SOURCE in notes[0]


def test_null_and_all_false_settings_give_no_notes():
    data = {"doc": {"lr": "some text"},
            "base": {"lr_scheduler": None, "lr_warmup_steps": None, "lr_decay_steps": None},
            "text_encoder_overrides": {"lr_scheduler": None},
            "text_encoder_freezing": {"freeze_embeddings": False, "freeze_final_layer_norm": False,
                                      "unfreeze_last_n_layers": None},
            "text_encoder_lr_scale": None, "log_grad_norm": None}
    assert resolve(data).notes == ()


def test_every_noted_key_is_listed():
    data = {"base": {"lr_scheduler": "cosine", "d0": 1e-6}, "text_encoder_overrides": {"momentum": 0.5}}
    notes = "\n".join(resolve(data).notes)
    assert "lr_scheduler" not in notes  # applied: each part has its own schedule
    for key in ("base.d0", "text_encoder_overrides.momentum"):
        assert key in notes


# =================================================================================================
# Schedule lengths
# =================================================================================================

@pytest.mark.parametrize("scheduler", ["cosine", "linear", "polynomial"])
def test_default_decay_and_warmup_for_decaying_schedules(scheduler):
    for total in list(range(1, 3001)) + [10_000, 123_457]:
        steps = schedule_steps(total, scheduler, None, None)
        decay = total * 3 // 2  # 1.5 x the run, in integer arithmetic
        assert steps.decay == max(1, decay), total
        assert steps.warmup == steps.decay * 2 // 100, total  # 2% of decay, rounded down


def test_default_warmup_is_zero_for_constant():
    steps = schedule_steps(1000, "constant", None, None)
    assert steps.warmup == 0
    assert steps.decay == 1500


@pytest.mark.parametrize("scheduler", ["constant", "cosine", "linear"])
def test_explicit_lengths_are_kept(scheduler):
    steps = schedule_steps(1000, scheduler, 7, 400)
    assert (steps.warmup, steps.decay) == (7, 400)


def test_explicit_zero_warmup_is_kept_and_zero_decay_means_default():
    steps = schedule_steps(1000, "cosine", 0, 0)
    assert steps.warmup == 0
    assert steps.decay == 1500


def test_schedule_steps_says_where_the_values_came_from():
    origin = schedule_steps(1000, "cosine", None, None).origin
    assert "lr_decay_steps = 1,500" in origin and "lr_warmup_steps = 30" in origin


# =================================================================================================
# The LR schedule on a real optimizer
# =================================================================================================

BASE_LR = 0.1


def stepped_lrs(optimizer, schedule, steps: int) -> list[float]:
    """The first group's lr in effect at optimizer steps 0..steps-1."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def lrs_over(scheduler: str, warmup: int, decay: int, steps: int) -> list[float]:
    """The lr in effect at optimizer steps 0..steps-1."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=BASE_LR)
    schedule = build_lr_schedule(optimizer, scheduler, schedule_steps(decay, scheduler, warmup, decay))
    return stepped_lrs(optimizer, schedule, steps)


def test_constant_schedule_keeps_the_lr():
    assert lrs_over("constant", 0, 100, 120) == [BASE_LR] * 120


def test_constant_schedule_with_warmup_ramps_then_stays():
    lrs = lrs_over("constant", 10, 100, 30)
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(BASE_LR * min(1.0, step / 10))


@pytest.mark.parametrize("warmup, decay", [(0, 50), (5, 50), (20, 300)])
def test_cosine_schedule_follows_the_closed_form(warmup, decay):
    lrs = lrs_over("cosine", warmup, decay, decay)
    for step, lr in enumerate(lrs):
        if step < warmup:
            expected = step / warmup
        else:
            expected = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup)))
        assert lr == pytest.approx(BASE_LR * expected, abs=1e-12), step
    assert lrs[warmup] == pytest.approx(BASE_LR)  # the peak right after warmup


@pytest.mark.parametrize("warmup, decay", [(0, 40), (4, 40)])
def test_linear_schedule_follows_the_closed_form(warmup, decay):
    lrs = lrs_over("linear", warmup, decay, decay)
    for step, lr in enumerate(lrs):
        expected = step / warmup if step < warmup else (decay - step) / (decay - warmup)
        assert lr == pytest.approx(BASE_LR * expected, abs=1e-12), step


@pytest.mark.parametrize("warmup, decay", [(0, 40), (4, 40)])
def test_polynomial_schedule_follows_the_closed_form(warmup, decay):
    """diffusers' polynomial decay with its defaults: power 1, down to lr_end 1e-7."""
    lr_end = 1e-7
    lrs = lrs_over("polynomial", warmup, decay, decay)
    for step, lr in enumerate(lrs):
        if step < warmup:
            expected = BASE_LR * step / warmup
        else:
            expected = (BASE_LR - lr_end) * (1 - (step - warmup) / (decay - warmup)) + lr_end
        assert lr == pytest.approx(expected, abs=1e-12), step


def test_default_lengths_give_the_documented_schedule_values():
    """The defaults end to end: decay 1.5 x the run, warmup 2% of it, for a cosine schedule over 1,000 steps."""
    steps = schedule_steps(1000, "cosine", None, None)
    assert (steps.decay, steps.warmup) == (1500, 30)
    lrs = lrs_over("cosine", steps.warmup, steps.decay, 1001)
    assert lrs[15] == pytest.approx(BASE_LR * 15 / 30)
    assert lrs[1000] == pytest.approx(BASE_LR * 0.5 * (1 + math.cos(math.pi * (1000 - 30) / (1500 - 30))))


def test_default_cosine_schedule_never_reaches_zero_within_the_run():
    total = 200
    steps = schedule_steps(total, "cosine", None, None)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=BASE_LR)
    schedule = build_lr_schedule(optimizer, "cosine", steps)
    for _ in range(total):
        optimizer.step()
        schedule.step()
    progress = (total - steps.warmup) / (steps.decay - steps.warmup)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR * 0.5 * (1 + math.cos(math.pi * progress)))
    assert optimizer.param_groups[0]["lr"] > 0.2 * BASE_LR


def test_schedule_scales_every_param_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.25}])
    schedule = build_lr_schedule(optimizer, "linear", schedule_steps(10, "linear", 0, 10))
    for _ in range(5):
        optimizer.step()
        schedule.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.125])


# =================================================================================================
# Building the optimizer
# =================================================================================================

UNET = GroupSettings(optimizer="adamw", lr=2e-6, betas=(0.85, 0.99), epsilon=1e-7, weight_decay=0.02)
TEXT = GroupSettings(optimizer="adamw", lr=3e-6, betas=(0.8, 0.95), epsilon=1e-6, weight_decay=0.0)


def settings_for(optimizer: str) -> OptimizerSettings:
    return OptimizerSettings(replace(UNET, optimizer=optimizer), replace(TEXT, optimizer=optimizer), (), ())


def params(*shapes):
    return [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]


def assert_group(group: dict, settings: GroupSettings, parameters: list):
    assert group["params"] == parameters
    assert group["lr"] == settings.lr
    assert tuple(group["betas"]) == settings.betas
    assert group["eps"] == settings.epsilon
    assert group["weight_decay"] == settings.weight_decay


def test_build_optimizer_has_one_group_per_trained_model():
    unet, text = params((4, 3), (3,)), params((5,))
    optimizer = build_optimizer(settings_for("adamw"), {"unet": unet, "text encoder": text})
    assert type(optimizer) is torch.optim.AdamW
    assert len(optimizer.param_groups) == 2
    assert_group(optimizer.param_groups[0], UNET, unet)
    assert_group(optimizer.param_groups[1], TEXT, text)
    assert [g["name"] for g in optimizer.param_groups] == ["unet", "text encoder"]  # for the lr log tags


def test_build_optimizer_leaves_out_a_frozen_text_encoder():
    unet = params((4, 3))
    optimizer = build_optimizer(settings_for("adamw"), {"unet": unet})
    assert len(optimizer.param_groups) == 1
    assert_group(optimizer.param_groups[0], UNET, unet)


def test_build_optimizer_leaves_out_a_frozen_unet():
    text = params((4, 3))
    optimizer = build_optimizer(settings_for("adamw"), {"text encoder": text})
    assert len(optimizer.param_groups) == 1
    assert_group(optimizer.param_groups[0], TEXT, text)


def test_adamw_step_changes_the_parameters():
    unet = params((4, 3))
    before = unet[0].detach().clone()
    optimizer = build_optimizer(settings_for("adamw"), {"unet": unet})
    unet[0].sum().backward()
    optimizer.step()
    assert not torch.equal(unet[0].detach(), before)


def test_adamw8bit_is_bitsandbytes_and_keeps_uint8_state_on_cpu():
    bitsandbytes = pytest.importorskip("bitsandbytes")
    unet, text = params((64, 128)), params((32, 160))  # >= 4096 elements: bitsandbytes' 8-bit threshold
    optimizer = build_optimizer(settings_for("adamw8bit"), {"unet": unet, "text encoder": text})
    assert isinstance(optimizer, bitsandbytes.optim.AdamW8bit)
    assert len(optimizer.param_groups) == 2
    assert_group(optimizer.param_groups[0], UNET, unet)
    assert_group(optimizer.param_groups[1], TEXT, text)
    before = [p.detach().clone() for p in unet + text]
    (unet[0].sum() + text[0].pow(2).sum()).backward()
    optimizer.step()
    for p, old in zip(unet + text, before):
        assert not torch.equal(p.detach(), old)
        state = optimizer.state[p]
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


# =================================================================================================
# Every optimizer, text-encoder freezing, grad norms, the grad-scaler schedule
# =================================================================================================

from optimizer.optimizer_config import OPTIMIZERS, TextEncoderFreezing, grad_scaler_tweak  # noqa: E402
from optimizer.optimizers import freeze_text_encoder_parts  # noqa: E402
from utils.model_family import clip_text_transformer  # noqa: E402


def test_every_optimizer_name_has_a_class_and_the_config_offers_exactly_these():
    from utils.config import FIELDS

    import importlib

    assert set(OPTIMIZERS) == set(FIELDS["optimizer"].metadata["choices"])
    for kind in OPTIMIZERS.values():
        module, name = kind.class_path.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), kind.class_path


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_builds_with_its_settings_and_steps(name):
    """lion/lion8bit (bitsandbytes), prodigy (prodigyopt) and the D-Adaptation family (dadaptation) run on the
    CPU too; each takes the optimizer.json keys it knows, with per-group values."""
    extra = {"d0": 1e-5} if name.startswith(("dadapt", "prodigy")) else {}
    settings = resolve({"base": {"optimizer": name, "lr": 1.0 if extra else 1e-3, **extra},
                        "text_encoder_overrides": {"weight_decay": 0.0}})
    unet_params, te_params = [torch.nn.Parameter(torch.randn(64, 64))], [torch.nn.Parameter(torch.randn(64, 64))]
    optimizer = build_optimizer(settings, {"unet": unet_params, "text encoder": te_params})
    assert type(optimizer).__name__ == OPTIMIZERS[name].class_path.rsplit(".", 1)[1]
    unet_group, te_group = optimizer.param_groups
    assert (unet_group["name"], te_group["name"]) == ("unet", "text encoder")
    assert unet_group["weight_decay"] == 0.01 and te_group["weight_decay"] == 0.0
    if extra:
        assert unet_group["d0"] == 1e-5
    before = [p.detach().clone() for p in unet_params + te_params]
    for _ in range(2):
        for p in unet_params + te_params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, unet_params + te_params))


def test_lion_defaults_to_its_papers_betas_unless_set():
    assert resolve({"base": {"optimizer": "lion"}}).unet.betas == (0.9, 0.99)
    assert resolve({"base": {"optimizer": "lion", "betas": [0.95, 0.98]}}).unet.betas == (0.95, 0.98)
    assert resolve({}).unet.betas == (0.9, 0.999)


def test_a_missing_optimizer_package_is_named_before_any_model_loads(tmp_path, monkeypatch):
    """plan_run checks the package that provides the optimizer and names what to pip install."""
    import importlib.util

    import train
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else
                        real_find_spec(name, *a))
    with pytest.raises(ConfigError) as error:
        train.plan_run(["--resume_ckpt", "builtin:tiny", "--data_root", str(tmp_path), "--optimizer", "prodigy"])
    assert "pip install prodigyopt" in str(error.value)


def test_an_unknown_optimizer_name_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError) as error:
        resolve({"base": {"optimizer": "dadapt_adamm"}})
    assert "Did you mean 'dadapt_adam'?" in problems_of(error)["base.optimizer"]


@pytest.mark.parametrize("section, expected", [
    ({}, TextEncoderFreezing()),
    ({"unfreeze_last_n_layers": 2}, TextEncoderFreezing(unfreeze_last_n_layers=2)),
    ({"freeze_front_n_layers": -3}, TextEncoderFreezing(unfreeze_last_n_layers=3)),  # EveryDream2's reading
    ({"freeze_front_n_layers": 4}, TextEncoderFreezing(freeze_first_n_layers=4)),
    ({"freeze_embeddings": False, "freeze_final_layer_norm": True},
     TextEncoderFreezing(freeze_embeddings=False, freeze_final_layer_norm=True)),
])
def test_text_encoder_freezing_is_read(section, expected):
    assert resolve({"text_encoder_freezing": section}).freezing == expected


@pytest.mark.parametrize("section", [{"unfreeze_last_n_layers": 0}, {"freeze_embeddings": "yes"},
                                     {"unfreeze_last_n_layers": 2, "freeze_front_n_layers": 3}])
def test_bad_text_encoder_freezing_is_an_error(section):
    with pytest.raises(ConfigError):
        resolve({"text_encoder_freezing": section})


def tiny_text_encoder():
    from utils.tiny_model import build_tiny_components

    return build_tiny_components()["text_encoder"]


def test_frozen_text_encoder_parts_get_no_gradient_and_no_optimizer_state():
    text_encoder = tiny_text_encoder()
    layers = len(clip_text_transformer(text_encoder).encoder.layers)
    summary = freeze_text_encoder_parts(text_encoder, TextEncoderFreezing(unfreeze_last_n_layers=2,
                                                                          freeze_final_layer_norm=True))
    assert summary == f"layers 1-{layers - 2} of {layers}, embeddings, final layer norm"
    trainable = {name for name, p in text_encoder.named_parameters() if p.requires_grad}
    assert trainable and all(f"layers.{layers - 2}." in n or f"layers.{layers - 1}." in n for n in trainable)
    settings = resolve({})
    optimizer = build_optimizer(settings, {"text encoder": [p for p in text_encoder.parameters() if p.requires_grad]})
    ids = torch.randint(0, 100, (2, 8))
    text_encoder(ids).last_hidden_state.sum().backward()
    optimizer.step()
    for name, p in text_encoder.named_parameters():
        assert (p.grad is None) is (name not in trainable), name
        assert (p in optimizer.state) is (name in trainable), name


def test_without_freezing_settings_every_text_encoder_weight_trains():
    text_encoder = tiny_text_encoder()
    assert freeze_text_encoder_parts(text_encoder, TextEncoderFreezing()) is None
    assert all(p.requires_grad for p in text_encoder.parameters())


def test_log_grad_norm_and_grad_scaler_tweaks_are_read():
    assert resolve({"log_grad_norm": True}).log_grad_norm and not resolve({}).log_grad_norm
    assert resolve({}).grad_scaler_step_tweaks and not resolve({"apply_grad_scaler_step_tweaks": False}) \
        .grad_scaler_step_tweaks
    with pytest.raises(ConfigError):
        resolve({"log_grad_norm": "yes"})


def test_grad_scaler_schedule_follows_everydream2():
    assert [grad_scaler_tweak(step) for step in (1, 499, 500, 1000, 2000, 4000, 4001)] == [
        None, None, (1.8, 100), (1.6, 200), (1.3, 500), (1.15, 2000), None]


# =================================================================================================
# A schedule per part (EveryDream2's optimizer.json: constant UNet, cosine text encoder)
# =================================================================================================

from optimizer.optimizers import build_group_schedules  # noqa: E402


def test_each_part_resolves_its_own_schedule_with_the_one_precedence():
    data = {"base": {"lr_scheduler": "constant"}, "text_encoder_overrides": {"lr_scheduler": "cosine",
                                                                              "lr_decay_steps": 500}}
    settings = resolve(data)
    assert (settings.unet.lr_scheduler, settings.unet.lr_decay_steps) == ("constant", None)
    assert (settings.text_encoder.lr_scheduler, settings.text_encoder.lr_decay_steps) == ("cosine", 500)
    # a training-config key given explicitly beats base, but not the text encoder's override
    explicit = resolve_optimizer_settings(config(lr_scheduler="linear"), data, SOURCE, {"lr_scheduler": "cli"})
    assert (explicit.unet.lr_scheduler, explicit.text_encoder.lr_scheduler) == ("linear", "cosine")
    # the training config's default does not hide base's value
    assert resolve({"base": {"lr_scheduler": "cosine"}}).unet.lr_scheduler == "cosine"
    assert resolve({}).unet.lr_scheduler == "constant"


def test_bad_schedule_values_in_optimizer_json_are_errors():
    with pytest.raises(ConfigError) as error:
        resolve({"base": {"lr_scheduler": "cosine_annealing", "lr_warmup_steps": -1}})
    assert set(problems_of(error)) == {"base.lr_scheduler", "base.lr_warmup_steps"}


def test_group_schedules_follow_each_parts_own_schedule():
    unet, text = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [unet], "name": "unet", "lr": 0.1},
                                   {"params": [text], "name": "text encoder", "lr": 0.01}])
    schedule = build_group_schedules(optimizer, {"unet": ("constant", schedule_steps(100, "constant", 0, 100)),
                                                 "text encoder": ("cosine", schedule_steps(100, "cosine", 0, 100))})
    for _ in range(50):
        optimizer.step()
        schedule.step()
    unet_lr, text_lr = (group["lr"] for group in optimizer.param_groups)
    assert unet_lr == pytest.approx(0.1)
    assert text_lr == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 50 / 100)))


@pytest.mark.parametrize("override", [{"lr": 0.5}, {"lr_scheduler": "cosine"}, {"betas": [0.8, 0.9]}, {"d0": 1e-4}])
def test_adaptive_optimizers_need_the_same_step_settings_for_both_parts(override):
    """Prodigy and D-Adaptation keep one step-size estimate: they refuse different lrs across groups (at
    their first step) and read betas/d0/growth_rate from the first group only, so a difference is an error."""
    with pytest.raises(ConfigError) as error:
        resolve({"base": {"optimizer": "prodigy", "lr": 1.0}, "text_encoder_overrides": override})
    (key,) = problems_of(error)
    assert key == f"text_encoder_overrides.{next(iter(override))}" and "one step-size estimate" in \
        problems_of(error)[key]


def test_an_adaptive_optimizer_with_a_tiny_lr_is_noted():
    assert any("about 1.0 is usual" in note for note in resolve({"base": {"optimizer": "dadapt_adam"}}).notes)
    assert not any("about 1.0" in note for note in resolve({"base": {"optimizer": "dadapt_adam", "lr": 1.0}}).notes)


def test_polynomial_decay_through_the_training_path_ends_at_lr_end_and_cosine_holds_after_decay():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [param], "name": "unet", "lr": 1e-4}])
    schedule = build_group_schedules(optimizer, {"unet": ("polynomial", schedule_steps(40, "polynomial", 0, 40))})
    lrs = stepped_lrs(optimizer, schedule, 60)
    assert lrs[20] == pytest.approx((1e-4 - 1e-7) * 0.5 + 1e-7)
    assert lrs[40] == pytest.approx(1e-7) and lrs[59] == pytest.approx(1e-7)
    optimizer = torch.optim.AdamW([{"params": [param], "name": "unet", "lr": 1.0}])
    schedule = build_group_schedules(optimizer, {"unet": ("cosine", schedule_steps(10, "cosine", 0, 10))})
    lrs = stepped_lrs(optimizer, schedule, 20)
    assert lrs[10] == pytest.approx(0.0, abs=1e-12) and max(lrs[10:]) == pytest.approx(0.0, abs=1e-12)


# =================================================================================================
# save_optimizer: the state saved in a checkpoint, restored when it fits
# =================================================================================================

from optimizer.optimizers import restore_optimizer_state, save_optimizer_state  # noqa: E402


def two_part_optimizer(lr: float, shapes=((4, 4), (3,))):
    params = [torch.nn.Parameter(torch.ones(shape)) for shape in shapes]
    return torch.optim.AdamW([{"params": [params[0]], "name": "unet", "lr": lr},
                              {"params": [params[1]], "name": "text encoder", "lr": lr / 10}]), params


def test_optimizer_state_is_restored_with_this_runs_settings(tmp_path):
    saved, params = two_part_optimizer(1e-3)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    saved.step()
    save_optimizer_state(saved, str(tmp_path))
    fresh, fresh_params = two_part_optimizer(5e-5)
    assert restore_optimizer_state(fresh, str(tmp_path)).startswith("restored from")
    for old, new in zip(params, fresh_params):
        assert torch.equal(saved.state[old]["exp_avg"], fresh.state[new]["exp_avg"])
    assert [g["lr"] for g in fresh.param_groups] == [5e-5, 5e-6]  # this run's lrs, not the saved ones


def test_optimizer_state_that_does_not_fit_is_not_used(tmp_path):
    saved, params = two_part_optimizer(1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    saved.step()
    save_optimizer_state(saved, str(tmp_path))
    other_shapes, _ = two_part_optimizer(1e-3, shapes=((4, 4), (5,)))
    assert "other trained parts or shapes" in restore_optimizer_state(other_shapes, str(tmp_path))
    assert not other_shapes.state
    lion = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    assert "belongs to torch.optim.adamw.AdamW" in restore_optimizer_state(lion, str(tmp_path))
    assert restore_optimizer_state(lion, str(tmp_path / "nothing here")) is None
