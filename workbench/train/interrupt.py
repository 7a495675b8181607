"""Stopping a run without losing it: SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends before it pre-empts a job)
ask the trainer to finish the step it is in, save a checkpoint there and stop with :class:`Interrupted`, whose one-line
message names the command that continues the run.  A second signal stops at once (:class:`StoppedAtOnce`), saving
nothing more: the last checkpoint stays as it was (checkpoints are written atomically).

A second signal that comes within ``REPEAT_S`` seconds of the first is taken as the same request delivered twice:
torchrun passes a terminal's Ctrl-C on to workers that received it already, and schedulers signal every process of a
job; a person's second Ctrl-C comes later than that.

Signal handlers can only be set in the main thread; elsewhere :func:`stop_requests` does nothing and a run stops as
it always did.  Nested uses share the outermost one (a study worker holds one for its life; each run inside it reads
the same request).

Imports: the standard library only.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 0.5
_state = {"depth": 0, "signum": None, "at": 0.0, "previous": {}, "forward": None}


def signal_name(signum: int) -> str:
    return {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}.get(signum, f"signal {signum}")


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT / SIGTERM after saving what continuing it needs; the message says how to continue.
    A KeyboardInterrupt, so that whatever handles Ctrl-C (a notebook, a caller's ``except KeyboardInterrupt``) sees
    it as one.  ``exit_code``: the shell's convention, 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str = "interrupted", signum: int = signal.SIGINT):
        super().__init__(message, int(signum))
        self.message, self.signum = message, int(signum)

    def __str__(self) -> str:
        return self.message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StoppedAtOnce(Interrupted):
    """A second SIGINT / SIGTERM: stopped where it was, nothing more saved."""


def requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _state["signum"]


def _handler(signum, frame) -> None:
    now = time.monotonic()
    first = _state["signum"] is None
    if not first and now - _state["at"] < REPEAT_S:
        return  # the same request, delivered twice
    forward = _state["forward"]
    if forward is not None:
        forward(signum)
    if first:
        _state["signum"], _state["at"] = signum, now
        return
    raise StoppedAtOnce(f"stopped at once by a second {signal_name(signum)}; nothing more was saved", signum)


def _install(forward=None, signals=SIGNALS) -> bool:
    """Take over ``signals`` (first use) or join the holder (nested); False where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if _state["depth"] == 0:
        _state.update(signum=None, at=0.0, forward=forward,
                      previous={s: signal.getsignal(s) for s in signals})
        for s in signals:
            signal.signal(s, _handler)
    _state["depth"] += 1
    return True


def _uninstall() -> None:
    _state["depth"] -= 1
    if _state["depth"] == 0:
        for s, previous in _state["previous"].items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        _state.update(signum=None, at=0.0, forward=None, previous={})


@contextmanager
def stop_requests(forward=None, signals=SIGNALS):
    """While inside, the first SIGINT / SIGTERM is recorded (read it with :func:`requested`) instead of raising
    KeyboardInterrupt or ending the process, and a second raises :class:`StoppedAtOnce`.  ``forward(signum)`` is
    called for each signal taken (a study runner passes it on to its workers).  The earlier handlers come back on
    leaving the outermost use."""
    installed = _install(forward, signals)
    try:
        yield
    finally:
        if installed:
            _uninstall()


def hold_for_process(signals=SIGNALS, ignore=()) -> None:
    """For a worker process: keep stop requests on for the process's life (runs inside read :func:`requested`);
    ``ignore``: signals the process leaves to its parent (a study worker ignores the terminal's Ctrl-C, which its
    parent passes on as SIGTERM)."""
    for s in ignore:
        signal.signal(s, signal.SIG_IGN)
    _install(None, signals)
