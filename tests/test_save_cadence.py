"""When periodic checkpoints are due: by epochs, by minutes, and not before save_ckpts_from_n_epochs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from train import periodic_save_due
from utils.config import TrainConfig
from utils.loop_state import LoopState

def due(config: TrainConfig, end_of_epoch: bool, total_batches: int = 10**9, **state) -> bool:
    plan = SimpleNamespace(config=config, total_batches=total_batches)  # what the decision reads of a plan
    return periodic_save_due(plan, LoopState(**state), end_of_epoch)


@pytest.mark.parametrize("epoch, expected", [(1, False), (2, True), (3, False), (4, True), (6, False)])
def test_every_n_epochs_at_the_end_of_those_epochs_but_not_the_last(epoch, expected):
    config = TrainConfig(save_every_n_epochs=2, max_epochs=6)
    at_epoch_end = dict(total_batches=60, epoch=epoch, global_step=10 * epoch)  # 10 batches per epoch
    assert due(config, True, **at_epoch_end) is expected
    assert due(config, False, **at_epoch_end) is False  # epoch saves happen only at an epoch's end


def test_every_n_minutes_since_the_last_save():
    config = TrainConfig(ckpt_every_n_minutes=10)
    assert not due(config, False, elapsed_seconds=599, last_save_seconds=0)
    assert due(config, False, elapsed_seconds=600, last_save_seconds=0)
    assert not due(config, False, elapsed_seconds=1100, last_save_seconds=600)
    assert due(config, False, elapsed_seconds=1200, last_save_seconds=600)


def test_zero_or_null_turns_a_cadence_off():
    assert not due(TrainConfig(ckpt_every_n_minutes=0), False, elapsed_seconds=10**6)
    assert not due(TrainConfig(save_every_n_epochs=0, max_epochs=9), True, epoch=3)
    assert not due(TrainConfig(save_every_n_epochs=None, max_epochs=9), True, epoch=3)


def test_no_periodic_save_before_save_ckpts_from_n_epochs():
    config = TrainConfig(save_every_n_epochs=1, ckpt_every_n_minutes=1, save_ckpts_from_n_epochs=3, max_epochs=9)
    assert not due(config, True, epoch=2, elapsed_seconds=10**6)
    assert due(config, True, epoch=3)


def test_never_twice_at_one_step():
    config = TrainConfig(save_every_n_epochs=1, ckpt_every_n_minutes=1, max_epochs=9)
    assert due(config, True, epoch=2, global_step=50, elapsed_seconds=120, last_save_seconds=0)
    assert not due(config, True, epoch=2, global_step=50, elapsed_seconds=120, last_save_step=50)


def test_not_at_the_last_step_which_the_final_save_covers():
    config = TrainConfig(ckpt_every_n_minutes=1, max_epochs=3)
    assert not due(config, False, total_batches=30, epoch=2, global_step=30, elapsed_seconds=600)
    assert due(config, False, total_batches=30, epoch=2, global_step=29, elapsed_seconds=600)
