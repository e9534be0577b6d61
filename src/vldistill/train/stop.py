"""Stopping a run cleanly on request. SIGTERM, what schedulers (SLURM, Kubernetes) send before they kill
a job and what torchrun forwards to its workers, lets the current step finish; the loop then writes a
checkpoint of that step and ends with `TrainingStopped`, and `--resume` continues from there. A second
SIGTERM is handled as it would be without vldistill (by default the process dies at once)."""

from __future__ import annotations

import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM,)


class TrainingStopped(RuntimeError):
    """The run stopped on a signal after a completed step (`signal_number` says which signal)."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number


class StopRequests:
    """Between `install` and `restore`, records a stop signal instead of dying on it (only in the main
    thread, where Python runs signal handlers; elsewhere nothing changes)."""

    def __init__(self) -> None:
        self.signal_number: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _record(self, signal_number: int, frame) -> None:
        if self.signal_number is not None:  # asked twice: act as the handler before us would (default: die)
            self.restore()
            signal.raise_signal(signal_number)
            return
        self.signal_number = signal_number

    def install(self) -> None:
        """Start recording stop signals."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}

    def restore(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signal_number is not None
