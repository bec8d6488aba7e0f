"""utils/watch.py: the early-stopping verdict and the loss-spike warning."""

from __future__ import annotations

from utils.watch import SpikeWatch, validation_verdict


def test_patience_counts_validations_without_a_lower_loss():
    best, count, verdicts = None, 0, []
    for value in (1.0, 0.9, 0.95, 0.9, 0.85, 0.86, 0.87):
        improved, count, stop = validation_verdict(value, best, count, patience=2)
        best = value if improved else best
        verdicts.append((improved, count, stop))
    assert verdicts == [(True, 0, False), (True, 0, False), (False, 1, False), (False, 2, True), (True, 0, False),
                        (False, 1, False), (False, 2, True)]
    assert validation_verdict(5.0, 1.0, 100, patience=None) == (False, 101, False)  # no patience: never stops


def test_a_spike_is_reported_once_after_the_warm_up():
    watch = SpikeWatch(factor=3.0, window=5, warm_up=3)
    assert watch.add(10.0) is None  # nothing to compare with yet
    assert [watch.add(v) for v in (1.0, 1.0, 1.0, 1.0)] == [None] * 4
    assert watch.add(9.0) is not None  # over 3 x the mean of the last five (2.8)
    assert watch.add(50.0) is None  # reported once only
    assert watch.add(float("nan")) is None


def test_images_per_second_counts_the_images_that_trained_not_batch_size_times_batches(monkeypatch):
    """Short last batches, unreadable images and the stand-ins of several processes train fewer images."""
    import torch

    from utils import loop_reports
    from utils.loop_reports import LossMeter
    from utils.loop_state import LoopState

    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0])
    monkeypatch.setattr(loop_reports.time, "monotonic", lambda: next(clock))
    meter = LossMeter()  # started at 0 s
    meter.add(torch.tensor(0.5), 4)
    meter.add(None, 0)  # a stand-in or an unreadable batch: nothing trained
    meter.add(torch.tensor(0.7), 1)  # a leftover batch of one image
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    optimizer.param_groups[0]["name"] = "unet"
    values = meter.log_step_scalars(optimizer, LoopState())  # at 4 s
    assert values["performance/images per second"] == 5 / 4
    assert abs(values["loss/log_step"] - 0.6) < 1e-6 and meter.counts["loss/log_step"] == 2
