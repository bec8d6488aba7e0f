"""Ctrl-C and SIGTERM (cloud preemption) as a request to stop cleanly: the loop finishes its optimizer step,
saves an `interrupted-` checkpoint with the full training state, and exits. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as shells report a kill


class StopRequests:
    """Installed for the training loop (a context manager); `requested` is the signal received, or None."""

    def __init__(self):
        self.requested: signal.Signals | None = None  # received by this process
        self.elsewhere: signal.Signals | None = None  # received by another process of the launch, and shared
        self._previous: dict = {}

    def __enter__(self) -> StopRequests:
        for number in EXIT_CODES:
            self._previous[number] = signal.signal(number, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    @property
    def stop_signal(self) -> signal.Signals | None:
        """The stop this process honours: its own signal, else another process's."""
        return self.requested or self.elsewhere

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.stop_signal] if self.stop_signal else 0

    def share(self, interrupted: bool, terminated: bool) -> bool:
        """Whether to stop, given whether any process received SIGINT, SIGTERM; a stop that reached another
        process alone becomes this one's too (without counting as its first Ctrl-C)."""
        if self.requested is None and (interrupted or terminated):
            self.elsewhere = signal.SIGINT if interrupted else signal.SIGTERM
        return interrupted or terminated

    def _on_signal(self, number: int, frame) -> None:
        if self.requested is not None:
            if number == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a save
            return
        self.requested = signal.Signals(number)
        # The command that resumes is printed once the checkpoint is saved (it differs under a launcher).
        log.warning("%s: finishing this optimizer step, then saving an interrupted- checkpoint to resume from. "
                    "Press Ctrl-C again to stop at once without saving.", self.requested.name)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """For data-loading workers (a DataLoader worker_init_fn): the training process decides when to stop,
    and stops them."""
    for number in EXIT_CODES:
        signal.signal(number, signal.SIG_IGN)
