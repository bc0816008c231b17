"""Surviving preemption: what SLURM sends before a time limit or a preemption (SIGTERM, or
SIGUSR1 with `#SBATCH --signal=B:USR1@N`) asks the run to stop at the next safe point.

The loop checks `requested` after every RL iteration (and between SFT steps): there it
writes a checkpoint and raises `Preempted`, and the command exits with `exit_code` (75,
EX_TEMPFAIL: try again), which launch/kimi_rl.sbatch turns into a requeue; the requeued
job resumes from that checkpoint. If the checkpoint is not written within `grace_seconds`
of the signal (an iteration longer than the grace period), the process exits with the
same code anyway: checkpoints are written atomically, so the previous one stays valid and
only the work since then is lost.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Sequence


class Preempted(Exception):
    """The run stopped early on a preemption signal; the message says where and whether a
    checkpoint lets it resume. The command exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Preemption:
    """Signal handlers for the duration of a `with` block (main thread only)."""

    def __init__(self, signals: Sequence[str], grace_seconds: float, exit_code: int):
        self.signals = [self._parse(s) for s in signals]
        self.grace_seconds = grace_seconds
        self.exit_code = exit_code
        self.received: str | None = None
        self.at: float | None = None
        self._timer: threading.Timer | None = None
        self._previous: dict[int, object] = {}

    @staticmethod
    def _parse(name: str) -> signal.Signals:
        try:
            return signal.Signals[name.upper() if name.upper().startswith("SIG")
                                  else "SIG" + name.upper()]
        except KeyError:
            raise ValueError(f"preemption.signals: unknown signal {name!r}") from None

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._timer is not None:
            self._timer.cancel()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            return
        self.received, self.at = signal.Signals(signum).name, time.monotonic()
        print(f"kimi-rl: {self.received} received: stopping after the current step "
              f"(grace {self.grace_seconds:g} s)", file=sys.stderr, flush=True)
        self._timer = threading.Timer(self.grace_seconds, self._give_up)
        self._timer.daemon = True
        self._timer.start()

    def _give_up(self) -> None:
        print(f"kimi-rl: no checkpoint within the {self.grace_seconds:g} s grace period: "
              f"exiting, the previous checkpoint stays valid", file=sys.stderr, flush=True)
        os._exit(self.exit_code)

    def done(self) -> None:
        """The checkpoint is written: the grace timer is no longer needed."""
        if self._timer is not None:
            self._timer.cancel()
