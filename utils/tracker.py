"""Where metrics go: a tiny interface with TensorBoard and a no-op behind it.

Only the main process writes; `make_tracker` is the one place that decides, so the loop calls the
tracker unconditionally.
"""

from __future__ import annotations

import html
import os


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


class WandbTracker(Tracker):
    """Weights & Biases (`wandb: true`): the same scalars, images and text as TensorBoard.

    The wandb run's id is the run folder's name, so a resumed run continues the same wandb run. Offline
    (WANDB_MODE=offline) it writes under the run folder, for `wandb sync` later.
    """

    def __init__(self, run_dir: str, project: str, name: str | None, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=name or os.path.basename(run_dir), config=config, dir=run_dir,
                              id=os.path.basename(run_dir), resume="allow")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def images(self, images: dict, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image) for tag, image in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers(Tracker):
    """Several trackers as one."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.scalars(values, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        for tracker in self.trackers:
            tracker.text(tag, text, step)

    def images(self, images: dict, step: int) -> None:
        for tracker in self.trackers:
            tracker.images(images, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def make_tracker(run_dir: str, is_main_process: bool, purge_step: int | None = None, wandb_config: dict | None = None
                 ) -> Tracker:
    """purge_step: a resumed run drops the events an earlier process logged from that step on. wandb_config:
    the run's settings, when they also go to Weights & Biases (`wandb: true`)."""
    if not is_main_process:
        return Tracker()
    tensorboard = TensorBoardTracker(run_dir, purge_step)
    if wandb_config is None:
        return tensorboard
    return Trackers([tensorboard, WandbTracker(run_dir, wandb_config["project_name"], wandb_config["run_name"],
                                               wandb_config)])
