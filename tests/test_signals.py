"""SIGINT/SIGTERM handling of CLI commands (tickcast/signals.py), with real signals to this
process (pytest runs tests in the main thread, where Python delivers them)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tickcast import signals
from tickcast.signals import Interrupted


def _deliver(sig: signal.Signals) -> None:
    """Send ``sig`` to this process and let the interpreter run its handler."""
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs between bytecodes of the main thread


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_raises_interrupted_and_the_handlers_are_restored(sig: signal.Signals) -> None:
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as info, signals.handled() as stops:
        assert stops is not None and signals.installed() is stops
        _deliver(sig)
        pytest.fail("the signal did not interrupt")
    assert info.value.signum == sig and info.value.exit_code == 128 + sig
    assert signal.getsignal(sig) is before and signals.installed() is None


def test_later_signals_do_not_cut_the_clean_up_short(capfd: pytest.CaptureFixture[str]) -> None:
    cleaned = False
    with pytest.raises(Interrupted), signals.handled():
        try:
            _deliver(signal.SIGTERM)
        finally:
            _deliver(signal.SIGINT)  # Ctrl-C while cleaning up: noted, not raised
            cleaned = True
    assert cleaned
    assert "already stopping" in capfd.readouterr().err


def test_graceful_mode_only_sets_stop_and_a_later_kbd_interrupt_names_the_signal() -> None:
    with pytest.raises(Interrupted) as info, signals.handled() as stops:
        assert stops is not None
        with stops.graceful() as stop:
            _deliver(signal.SIGTERM)
            assert stop.is_set() and stops.received == signal.SIGTERM
        # Ray's blocking calls raise a KeyboardInterrupt of their own after running the
        # handler; the command still reports the signal that caused it.
        raise KeyboardInterrupt
    assert info.value.signum == signal.SIGTERM


def test_a_signal_before_graceful_mode_raises_on_entry() -> None:
    with signals.handled() as stops:
        assert stops is not None
        with stops.graceful():
            _deliver(signal.SIGINT)
        with pytest.raises(Interrupted), stops.graceful():
            pytest.fail("entered graceful mode after a signal")


def test_plain_keyboard_interrupt_without_a_signal_stays_one() -> None:
    with pytest.raises(KeyboardInterrupt) as info, signals.handled():
        raise KeyboardInterrupt
    assert not isinstance(info.value, Interrupted)
