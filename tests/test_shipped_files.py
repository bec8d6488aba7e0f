"""The files a user runs or reads: configs that validate, docs in step with the code, and the README."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from optimizer.optimizer_config import load_optimizer_settings
from utils.config import load_config
from utils.config_reference import DOC_PATH, render_markdown

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # shipped configs use paths relative to the repository root


@pytest.mark.parametrize("name", ["train.json", "chain0.json", "chain1.json", "chain2.json"])
def test_shipped_configs_validate_and_use_only_working_keys(name):
    loaded = load_config(["--config", name])
    assert not [note for note in loaded.notes if "no effect" in note or "legacy" in note]
    settings = load_optimizer_settings(loaded.config, loaded.origins)
    assert not settings.notes


def test_the_demo_config_trains_the_builtin_model_on_the_bundled_images():
    config = load_config(["--config", "train.json"]).config
    assert (config.resume_ckpt, config.data_root) == ("builtin:tiny", "examples/images")


def test_the_chain_starts_from_a_base_model_and_then_finds_the_last_checkpoint():
    configs = [load_config(["--config", f"chain{i}.json"]).config for i in range(3)]
    assert configs[0].resume_ckpt == "builtin:tiny"
    assert [c.resume_ckpt for c in configs[1:]] == ["findlast", "findlast"]
    changed = {key for key in ("resolution", "batch_size", "grad_accum", "lr", "disable_textenc_training",
                               "cond_dropout") if len({getattr(c, key) for c in configs}) > 1}
    assert changed == {"resolution", "batch_size", "grad_accum", "lr", "disable_textenc_training", "cond_dropout"}


def test_chain_scripts_run_the_sessions_in_order_stop_at_a_failure_and_can_be_rerun_after_one():
    sh = (REPO / "chain.sh").read_text()
    assert "set -euo pipefail" in sh
    sessions = ["chain0.json", "chain1.json", "chain2.json"]
    assert re.findall(r"train\.py --config (chain\d\.json) --resume_run auto\n", sh) == sessions
    bat = (REPO / "chain.bat").read_text()
    assert re.findall(r"train\.py --config (chain\d\.json) --resume_run auto \|\| exit /b 1", bat) == sessions


def test_config_reference_is_generated_from_the_config_class():
    assert Path(DOC_PATH).read_text() == render_markdown(), "run: python -m utils.config_reference"


def readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```[a-z]*\n(.*?)\n```\s*<!-- /{marker} -->", text, re.S)
    assert match, f"README.md has no {marker} block"
    return match.group(1).strip()


def test_readme_holds_the_demo_and_test_commands():
    demo, tests = readme_block("demo-command"), readme_block("test-command")
    assert "pip install -r requirements.txt" in demo and "python train.py --config train.json" in demo
    assert "pip install -r requirements-test.txt" in tests and "pytest" in tests


def test_ci_runs_exactly_the_readme_test_command():
    extracted = subprocess.run(
        ["bash", "-c", "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md "
                       "| grep -v -e '<!--' -e '^```'"], cwd=REPO, capture_output=True, text=True, check=True)
    assert extracted.stdout.strip() == readme_block("test-command")
    ci_script = (REPO / ".ci" / "run").read_text()
    assert "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md" in ci_script


def test_requirements_are_pinned_and_have_no_torchvision():
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert "torch==2.13.0" in lines
    assert all("==" in line for line in lines), lines
    assert not any(line.lower().startswith("torchvision") for line in lines)
    assert "-r requirements.txt" in (REPO / "environment.yml").read_text()


def test_the_code_passes_the_linter():
    """ruff with ruff.toml's settings: no unused imports or names, no undefined ones, no line over 120."""
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                          text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_run_outputs_are_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", "logs/x/train.log", "last-demo-ep01-gs00007.safetensors",
                              "ckpt_cache/x"], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == ["logs/x/train.log", "last-demo-ep01-gs00007.safetensors", "ckpt_cache/x"]


def test_shipped_json_files_parse():
    for name in ("train.json", "chain0.json", "chain1.json", "chain2.json", "optimizer.json"):
        json.loads((REPO / name).read_text())
