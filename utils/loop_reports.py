"""What the training loop reports as it goes: losses and timings for TensorBoard and the console, the
device's scalars, the progress bar and the loss-spike warning."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("train")


class Progress:
    """Two tqdm bars on the main process: epochs, and the run's steps with loss, lr, images/s and the ETA of
    the whole run. tqdm hides them when the output is not a terminal (the log file gets the epoch lines)."""

    def __init__(self, max_epochs: int, total_steps: int, is_main_process: bool, epochs_done: int = 0,
                 steps_done: int = 0):
        from tqdm import tqdm

        shown = None if is_main_process else True
        self.epochs = tqdm(total=max_epochs, initial=epochs_done, unit="epoch", desc="epochs", position=0,
                           dynamic_ncols=True, disable=shown)
        self.steps = tqdm(total=total_steps, initial=steps_done, unit="step", desc="steps", position=1,
                          dynamic_ncols=True, disable=shown)

    def step(self, postfix: str | None = None) -> None:
        if postfix:
            self.steps.set_postfix_str(postfix, refresh=False)
        self.steps.update(1)

    def epoch_done(self) -> None:
        self.epochs.update(1)

    def close(self) -> None:
        self.steps.close()
        self.epochs.close()


GRAD_NORM_TAGS = {"unet": "optimizer/unet_grad_norm", "text encoder": "optimizer/te_grad_norm"}  # EveryDream2's


class LossMeter:
    """Losses and timings for the log-step and epoch scalars.

    Losses are kept as tensors and averaged when they are logged.
    """

    def __init__(self):
        self.images_since_log = 0  # images trained since the last log step (short and unreadable batches count less)
        self.since_log: list = []
        self.epoch: list = []
        self.grad_norms: dict = {}  # part -> norm at the latest optimizer step (log_grad_norm)
        self.counts: dict[str, int] = {}  # loss tag -> how many batch losses its latest value averages
        self.last_tick = self.log_started = self.epoch_started = time.monotonic()

    def start_epoch(self) -> None:
        self.epoch, self.epoch_started = [], time.monotonic()

    def add(self, loss, images: int) -> float:
        """Record a batch's loss (None: nothing trained) and how many images it trained; the seconds since the
        previous batch."""
        if loss is not None:
            self.images_since_log += images
            self.since_log.append(loss)
            self.epoch.append(loss)
        now = time.monotonic()
        seconds, self.last_tick = now - self.last_tick, now
        return seconds

    @staticmethod
    def _mean(losses: list) -> float:
        import torch

        return torch.stack(losses).float().mean().item() if losses else float("nan")

    def log_step_scalars(self, optimizer, state) -> dict[str, float]:
        """Mean loss, learning rates and throughput since the last log step, under EveryDream2's tag names;
        the count of batches skipped for a NaN or infinite loss once there are any."""
        now = time.monotonic()
        self.counts["loss/log_step"] = len(self.since_log)
        values = {"loss/log_step": self._mean(self.since_log),
                  "performance/images per second": self.images_since_log / max(now - self.log_started, 1e-9)}
        values.update({f"hyperparameter/lr {group['name']}": group["lr"] for group in optimizer.param_groups})
        values.update({GRAD_NORM_TAGS[name]: norm.item() for name, norm in self.grad_norms.items()})
        if state.nonfinite_batches:
            values["loss/nonfinite batches skipped"] = state.nonfinite_batches
        self.since_log, self.images_since_log, self.log_started = [], 0, now
        return values

    @staticmethod
    def postfix(values: dict[str, float]) -> str:
        """For the progress bar, from a log step's scalars (the first lr is the UNet's when it trains)."""
        lr = next(value for tag, value in values.items() if tag.startswith("hyperparameter/lr"))
        return f"loss {values['loss/log_step']:.4f}, lr {lr:.2e}, {values['performance/images per second']:.1f} img/s"

    def epoch_scalars(self) -> dict[str, float]:
        self.counts["loss/epoch"] = len(self.epoch)
        return {"loss/epoch": self._mean(self.epoch),
                "performance/minutes per epoch": (time.monotonic() - self.epoch_started) / 60}

    @staticmethod
    def epoch_summary(values: dict[str, float]) -> str:
        """The console's epoch line, from the epoch's scalars (over every process)."""
        return f"mean loss {values['loss/epoch']:.4f}, {values['performance/minutes per epoch']:.2f} min"


def device_scalars(accelerator) -> dict[str, float]:
    """The fp16 grad scaler's scale (when there is one) and the peak VRAM in GiB (on CUDA), as EveryDream2
    logs them."""
    import torch

    values = {}
    if accelerator.scaler is not None:
        values["hyperparameter/grad scale"] = accelerator.scaler.get_scale()
    if accelerator.device.type == "cuda":
        values["performance/vram"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    return values


def warn_of_a_spike(spikes, loss: float, global_step: int) -> None:
    """The first log-step loss far above the recent ones, reported once with its step."""
    recent = spikes.add(loss)
    if recent is not None:
        log.warning("step %d: the training loss (%.4f) is over %g times its recent mean (%.4f). If it stays high, "
                    "lower lr; if it falls back, look at this step's images (write_schedule lists them).",
                    global_step, loss, spikes.factor, recent)
