"""Ctrl-C and SIGTERM as stop requests (utils/interrupts.py); the end-to-end Ctrl-C run is in test_resume.py."""

from __future__ import annotations

import os
import signal

import pytest

from utils.interrupts import StopRequests, ignore_stop_signals


def test_sigterm_is_a_stop_request_with_exit_code_143_and_the_handlers_are_put_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stop:
        assert stop.requested is None and stop.exit_code == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM and stop.exit_code == 143
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM changes nothing
        assert stop.requested == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_ctrl_c_stops_at_once():
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == signal.SIGINT and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_stop_another_process_received_is_honoured_here_and_a_first_ctrl_c_here_still_saves():
    with StopRequests() as stop:
        assert not stop.share(interrupted=False, terminated=False) and stop.exit_code == 0
        assert stop.share(interrupted=False, terminated=True)  # another process's SIGTERM
        assert stop.requested is None and stop.stop_signal == signal.SIGTERM and stop.exit_code == 143
        os.kill(os.getpid(), signal.SIGINT)  # this process's first Ctrl-C: a request, not "stop at once"
        assert stop.requested == signal.SIGINT and stop.exit_code == 130


def test_loader_workers_ignore_both_signals():
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(number) is signal.SIG_IGN for number in previous)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
