"""Where metrics go: a tiny interface with TensorBoard and a no-op behind it.

Only the main process writes; `make_tracker` is the one place that decides, so the loop calls the
tracker unconditionally.
"""

from __future__ import annotations


class Tracker:
    """Does nothing: what non-main processes get."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int = 0) -> None:
        pass

    def images(self, images: dict, step: int) -> None:
        """{tag: HWC uint8 array}."""

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files in the run folder, read by `tensorboard --logdir logs`."""

    def __init__(self, log_dir: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def images(self, images: dict, step: int) -> None:
        for tag, image in images.items():
            self.writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def make_tracker(run_dir: str, is_main_process: bool, purge_step: int | None = None) -> Tracker:
    """purge_step: a resumed run drops the events an earlier process logged from that step on."""
    return TensorBoardTracker(run_dir, purge_step) if is_main_process else Tracker()
