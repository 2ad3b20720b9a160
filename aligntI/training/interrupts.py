"""SIGINT and SIGTERM that keep the work: during the step loop the first one asks every rank to finish its step
and checkpoint (the loop's per-step reduction carries the request, so the ranks agree on the step); outside it,
or on a second one, the command stops at once with one line.

Launchers forward the signal they receive (``deepspeed``'s launcher sends SIGTERM to every rank, ``torchrun`` the
signal itself) while Ctrl-C has already reached every process of the terminal's group: a rank gets one Ctrl-C
two or three times within milliseconds. Signals within ``SAME_INTERRUPT_S`` of the first count as that one.
Both launchers kill the ranks 30 s after forwarding, so a step plus a checkpoint longer than that is cut short
(the previous checkpoint stays); ``run_dir/stop_request`` has no such limit.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager

SAME_INTERRUPT_S = 2.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The command was stopped by a signal; ``code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.code = 128 + signum


class Interrupts:
    """The signal handlers of one command (installed by :meth:`installed`, on the main thread)."""

    def __init__(self):
        self.received: int | None = None  # the signal the loop is asked to stop for
        self.outside = "during start-up: nothing new to save; the same command starts or resumes again"  # what stopping outside the loop loses
        self._first_at = 0.0
        self._deferring = False
        self._raised = False

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextmanager
    def deferred(self):
        """Inside: the first signal only sets :attr:`received`; the loop reads it after each step."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self._raised or (self.received is not None and now - self._first_at < SAME_INTERRUPT_S):
            return  # the same interrupt, forwarded by a launcher, or one that is already ending the command
        if self.received is None and self._deferring:
            self.received, self._first_at = signum, now
            return
        name = signal.Signals(signum).name
        if self.received is not None:  # a second interrupt: the step and its checkpoint are abandoned
            sys.stderr.write(f"aligntI: {name} again: stopped at once, without a checkpoint of this step\n")
            sys.stderr.flush()
            os._exit(128 + signum)  # unwinding from inside a collective would leave the other ranks waiting
        self._raised, self._first_at = True, now
        raise Interrupted(signum, f"{name}: stopped {self.outside}")
