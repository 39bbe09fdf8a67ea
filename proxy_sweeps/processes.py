"""Stopping the processes a sweep or a transfer check starts, so that none outlives its parent.

The main process turns SIGTERM/SIGINT into ``Stopped`` (not the default instant exit), so its
clean-up runs: it stops its workers and says how to continue. A sweep's main process
(``MainStops``) holds a stop back while it sets up (so config.json and the study it names are
whole), and only records one that comes while it exports. A sweep worker turns them into
KeyboardInterrupt (``StopSignals``), held back while a trial is handed to it. A worker watches its
parent and stops itself when the parent is gone (killed with SIGKILL, say): an orphan would keep
training and writing results beside a re-run of the same command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def raise_stopped(signum, frame):
    """A signal handler: raise ``Stopped`` in the main thread."""
    raise Stopped(signum)


@contextlib.contextmanager
def stops_raised():
    """SIGTERM/SIGINT raise ``Stopped`` inside the block; the previous handlers come back after it."""
    old = {s: signal.signal(s, raise_stopped) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def watch_parent(parent: int) -> None:
    """Stop this process (as SIGTERM would) once the process that started it is gone."""
    def loop():
        while os.getppid() == parent:
            time.sleep(2.0)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=loop, daemon=True).start()


class StopSignals:
    """SIGTERM and SIGINT raise KeyboardInterrupt, except inside ``held()``, which keeps a stop until
    it ends: between Optuna's ask and the worker holding the trial a stop would leave it RUNNING."""

    def __init__(self):
        self.holding, self.pending = False, None

    def install(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.holding:
            self.pending = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        signum, self.pending = self.pending, None
        if signum is not None:
            raise KeyboardInterrupt(f"signal {signum}")


class MainStops:
    """SIGTERM/SIGINT in a sweep's main process: the first stop raises ``Stopped``, at once or, inside
    ``held()``, at its end; after ``finish()`` a stop is only recorded (the export runs to its end).
    ``signum`` is the first stop received (None: none)."""

    def __init__(self):
        self.signum: int | None = None
        self.holding = self.finishing = False
        self.old: dict = {}

    def install(self) -> None:
        self.old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def restore(self) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame):
        if self.signum is not None:
            return  # a second stop must not cut the clean-up short
        self.signum = signum
        if not (self.holding or self.finishing):
            raise Stopped(signum)

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.signum is not None and not self.finishing:
            raise Stopped(self.signum)

    def finish(self) -> None:
        self.finishing = True
