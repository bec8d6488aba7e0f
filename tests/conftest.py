"""Fixtures shared by the model tests: the built-in tiny model, in memory and as a diffusers folder."""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as train.main sets it, before torch loads: for in-process runs

import pytest  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from utils.tiny_model import build_tiny_components  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components()


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    StableDiffusionPipeline(**tiny, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return str(folder)
