"""Where a study lives, and the two pieces of coordination Optuna leaves to us.

Storage: a journal file (default: one machine, several processes) or any RDB URL (PostgreSQL to
spread one study over machines). Both get a heartbeat, so a trial whose worker died is failed
and retried once (RetryHeartbeatStaleTrialCallback). Optuna 5's JournalStorage has no heartbeat,
so ``HeartbeatJournalStorage`` adds one: the last beat is a trial system attribute.

Budget lock: "is the budget spent? if not, ask for a trial" must be one atomic step, or N
workers overshoot the trial count. A kernel file lock (flock) does it on one machine (released
by the kernel when a worker is SIGKILLed); PostgreSQL and MySQL use a named server lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
import warnings
import zlib
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock  # public base class, private module
from optuna.trial import TrialState

from mutransfer.config import ConfigError

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

JOURNAL_PREFIX = "journal:"
HEARTBEAT_ATTR = "heartbeat"


def default_storage(out_dir: str | Path) -> str:
    return JOURNAL_PREFIX + str(Path(out_dir).resolve() / "optuna-journal.log")


def normalize(url: str | None, out_dir: str | Path) -> str:
    """``None`` -> the journal file in ``out_dir``; a bare path -> ``journal:PATH``; URLs unchanged."""
    if url is None:
        return default_storage(out_dir)
    if "://" in url:
        return url
    path = url[len(JOURNAL_PREFIX):] if url.startswith(JOURNAL_PREFIX) else url
    if not path:
        raise ConfigError("--storage: empty journal path")
    return JOURNAL_PREFIX + str(Path(path).expanduser().resolve())


def journal_path(url: str) -> str | None:
    return url[len(JOURNAL_PREFIX):] if url.startswith(JOURNAL_PREFIX) else None


def redact(url: str) -> str:
    """The URL without its password, for files and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


class FlockLock(BaseJournalFileLock):
    """Journal file lock by flock(2): the kernel drops it when the holder dies, so a SIGKILLed
    worker never leaves the others waiting (Optuna's symlink lock waits out a grace period)."""

    def __init__(self, path: str):
        self._path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """JournalStorage with Optuna's heartbeat protocol; the beat is the trial's ``heartbeat``
    system attribute (wall-clock seconds: the journal is one machine's file, one clock)."""

    def __init__(self, path: str, heartbeat_interval: int, grace_period: int, callback=None):
        super().__init__(JournalFileBackend(path, lock_obj=FlockLock(path + ".lock")))
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


def open_storage(url: str, heartbeat_interval: int = 10, grace_period: int = 60) -> optuna.storages.BaseStorage:
    """The storage for ``url`` with heartbeat on and one retry of a trial whose worker died."""
    if "://" not in url:
        url = normalize(url, ".")
    with warnings.catch_warnings():  # experimental since 2.8, stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=1)
    path = journal_path(url)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(path, heartbeat_interval, grace_period, retry)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                              heartbeat_stale_trial_callback=retry,
                              engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError) as e:
        raise ConfigError(f"--storage {redact(url)}: cannot open: {e}") from e


@contextlib.contextmanager
def budget_lock(url: str, storage, study_name: str):
    """Serialise "check the budget, then ask" across every worker of a study."""
    key = zlib.crc32(f"mutransfer-sweep:{study_name}".encode())
    path = journal_path(url)
    if path is None and url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
    if path is not None:
        lock = FlockLock(path + ".budget.lock")
        lock.acquire()
        try:
            yield
        finally:
            lock.release()
        return
    import sqlalchemy

    dialect = storage.engine.dialect.name
    if dialect == "postgresql":
        take, give = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"
    elif dialect == "mysql":
        take, give = "SELECT GET_LOCK(CAST(:k AS CHAR), 600)", "SELECT RELEASE_LOCK(CAST(:k AS CHAR))"
    else:
        raise ConfigError(f"--storage {redact(url)}: no cross-process lock for the {dialect!r} backend; "
                          "use a journal file, SQLite, PostgreSQL or MySQL")
    with storage.engine.connect() as conn:
        conn.execute(sqlalchemy.text(take), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text(give), {"k": key})
            conn.commit()
