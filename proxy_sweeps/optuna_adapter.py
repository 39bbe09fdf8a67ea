"""Every use of Optuna's private API, in one place, so an Optuna upgrade fails here and loudly.

Optuna leaves two things to its users that a sweep over many processes needs: a heartbeat for
the journal storage (only the RDB storage has one) and a lock object for the journal file that the
kernel releases when its holder dies. Both are built on Optuna base classes that live in private
modules, and the heartbeat protocol includes one private hook (``_get_stale_trial_ids``). The ids
of a study and a trial are also private attributes. ``tests/test_optuna_adapter.py`` exercises each
of these, so a renamed or changed private API breaks a test instead of a sweep.

Private names used (and nowhere else in the project):
- ``optuna.storages._heartbeat.BaseHeartbeat`` (base class of a storage with heartbeats)
- ``optuna.storages.journal._file.BaseJournalFileLock`` (base class of a journal lock)
- ``BaseHeartbeat._get_stale_trial_ids`` (the hook ``optuna.storages.fail_stale_trials`` calls)
- ``Study._study_id``, ``Trial._trial_id``
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

import optuna
from optuna.storages import JournalStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal._file import BaseJournalFileLock
from optuna.trial import TrialState

from proxy_sweeps.journal import AppendOnlyBackend

HEARTBEAT_ATTR = "heartbeat"


def study_id(study: optuna.Study) -> int:
    """The storage's id of a study (Optuna keeps it private)."""
    return study._study_id


def trial_id(trial: optuna.Trial) -> int:
    """The storage's id of a live trial (Optuna keeps it private)."""
    return trial._trial_id


class FlockLock(BaseJournalFileLock):
    """Journal file lock by flock(2): the kernel drops it when the holder dies, so a SIGKILLed
    worker never leaves the others waiting (Optuna's symlink lock waits out a grace period)."""

    def __init__(self, path: str):
        self._path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        # The descriptor is kept before it is locked: a stop signal between the lock and the return
        # leaves nothing that ``release`` (always called, see journal.held) does not undo.
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """JournalStorage with Optuna's heartbeat protocol; the beat is the trial's ``heartbeat``
    system attribute (wall-clock seconds: the journal is one machine's file, one clock). Its file is
    written by ``journal.AppendOnlyBackend`` (whole lines only, never after a partial one)."""

    def __init__(self, path: str, heartbeat_interval: int, grace_period: int, callback=None):
        super().__init__(AppendOnlyBackend(path, FlockLock(path + ".lock")))
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_callback = callback

    def record_heartbeat(self, trial_id: int) -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            # A retry inherits its original's system attrs, beat included: the start time counts too.
            last = max(t.system_attrs.get(HEARTBEAT_ATTR, 0.0), t.datetime_start.timestamp())
            if now - last > self._grace_period:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self._stale_callback
