"""What a checkpoint needs beyond the weights for `--resume_run` to continue a run exactly.

`resume_state.pt` holds the loop's position and clocks, the lr schedule, the fp16 grad scaler and every
random number generator; the optimizer's moments are `optimizer.pt` beside it (optimizer/optimizers.py).
Everything is tensors, numbers and strings, loaded with `weights_only=True`: a checkpoint never runs code.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from utils.checkpoint import RESUME_STATE_FILE
from utils.loop_state import LoopState


class ResumeStateError(Exception):
    """The saved state does not fit this run; the message says what differs."""


def save_resume_state(folder: str, state: LoopState, schedule, scaler) -> None:
    """`folder/resume_state.pt` (save_pipeline calls this before its atomic rename)."""
    torch.save({"loop": state.to_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": capture_rng()},
               os.path.join(folder, RESUME_STATE_FILE))


def load_resume_state(folder: str, optimizer, schedule, scaler) -> LoopState:
    """Restore the optimizer, the schedule, the scaler and the random generators saved in `folder`; return
    the loop state. Called once everything is built: building a schedule sets the optimizer's lr, and
    building anything may draw random numbers."""
    from optimizer.optimizers import load_optimizer_state_exactly

    saved = torch.load(os.path.join(folder, RESUME_STATE_FILE), map_location="cpu", weights_only=True)
    try:
        load_optimizer_state_exactly(optimizer, folder)
    except ValueError as error:
        raise ResumeStateError(str(error)) from None
    if (saved["scaler"] is None) != (scaler is None):
        raise ResumeStateError(f"{folder} was saved {'with' if saved['scaler'] is not None else 'without'} an fp16 "
                               f"grad scaler and this run trains {'with' if scaler is not None else 'without'} one: "
                               "resume on the same kind of device with the same mixed_precision.")
    schedule.load_state_dict(saved["schedule"])
    if scaler is not None:
        scaler.load_state_dict(saved["scaler"])
    restore_rng(saved["rng"])
    try:
        return LoopState(**saved["loop"])
    except TypeError as error:  # saved by another version of the trainer
        raise ResumeStateError(f"{folder}: its loop state does not fit this version ({error})") from None


def capture_rng() -> dict:
    """The state of every random generator a run may draw from: Python's, NumPy's, torch's CPU and CUDA ones."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.copy()), position, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(saved: dict) -> None:
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, keys.numpy(), position, has_gauss, cached))
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        states = saved["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
