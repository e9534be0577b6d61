"""Stop requests: SIGTERM is recorded while training (the loop stops after the step), a second one goes
to the handler that was there before, and leaving restores it."""

from __future__ import annotations

import signal

from vldistill.train.stop import StopRequests


def test_first_sigterm_is_recorded_the_second_reaches_the_previous_handler():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        stop = StopRequests()
        stop.install()
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.signal_number == signal.SIGTERM and received == []
        signal.raise_signal(signal.SIGTERM)  # asked twice: the earlier handler runs
        assert received == [signal.SIGTERM]
        stop.restore()
        signal.raise_signal(signal.SIGTERM)
        assert received == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_restore_gives_the_signal_back():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequests()
    stop.install()
    assert signal.getsignal(signal.SIGTERM) is not before
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before
