"""Fixtures shared by the model tests: the built-in tiny model, in memory and as a diffusers folder."""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as train.main sets it, before torch loads: for in-process runs
# pytest -n: the workers share the cores, so one thread each, for them and the training runs they start. With
# torch's default of a thread per core, two workers on two cores took the suite from 12 to 28 minutes.
ONE_THREAD_EACH = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if ONE_THREAD_EACH:
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from utils.tiny_model import build_tiny_components  # noqa: E402

if ONE_THREAD_EACH:
    torch.set_num_threads(1)  # in case a plugin imported torch before the variable was set

# The files that take longest (each a minute or more of training runs in new processes), started first under
# pytest -n so that none is left running alone at the end while the other workers have nothing to do.
LONGEST_FILES = ("test_resume.py", "test_multiprocess.py", "test_train_e2e.py", "test_validation_loss.py",
                 "test_plugins.py", "test_checkpoint_safety.py", "test_bench.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own pytest_configure makes its scheduler
def pytest_configure(config):
    """Under pytest -n, each test file stays on one worker (--dist loadfile), so a file's module fixtures (the
    demo runs) are made once and its two-process launches, which share a port, never overlap; and the files go
    out in the order below, not reordered by their number of tests. Set here rather than in pytest.ini's
    addopts, so that pytest without pytest-xdist still runs (serially)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    explicit = any(arg in ("--dist", "-d", "--distload") or arg.startswith("--dist=")
                   for arg in config.invocation_params.args)
    if config.getoption("dist") == "load" and not explicit:  # -n alone means --dist load
        config.option.dist = "loadfile"
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: each file's tests stay together and in their order


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components()


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    StableDiffusionPipeline(**tiny, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def fresh_accelerator():
    """accelerate's state is per process and keeps the first Accelerator's mixed precision: reset around a test
    that builds one with its own (other tests in the same worker process built theirs)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
