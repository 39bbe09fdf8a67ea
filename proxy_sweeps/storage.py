"""Where a study lives, and the two pieces of coordination Optuna leaves to us.

Storage: a journal file (default: one machine, several processes) or any RDB URL (PostgreSQL to
spread one study over machines). Both get a heartbeat, so a trial whose worker died is failed
and retried up to ``max_retries`` times (RetryHeartbeatStaleTrialCallback). Optuna 5's
JournalStorage has no heartbeat, so ``optuna_adapter.HeartbeatJournalStorage`` adds one. A journal
file is checked whole before it is opened (a partial or foreign line: exit 2 naming it) and is
appended one whole line at a time (``proxy_sweeps.journal``).

Budget lock: "is the budget spent? if not, ask for a trial" must be one atomic step, or N
workers overshoot the trial count. A kernel file lock (flock) does it on one machine (released
by the kernel when a worker is SIGKILLed); PostgreSQL and MySQL use a named server lock.
"""

from __future__ import annotations

import contextlib
import re
import warnings
import zlib
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from mutransfer.config import ConfigError
from proxy_sweeps import journal
from proxy_sweeps.optuna_adapter import FlockLock, HeartbeatJournalStorage

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

JOURNAL_PREFIX = "journal:"


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


def open_storage(url: str, heartbeat_interval: int = 10, grace_period: int = 60, max_retries: int = 2
                 ) -> optuna.storages.BaseStorage:
    """The storage for ``url`` with heartbeat on and up to ``max_retries`` retries of a lost trial."""
    if "://" not in url:
        url = normalize(url, ".")
    with warnings.catch_warnings():  # experimental since 2.8, stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
    path = journal_path(url)
    if path is not None:
        return open_journal(path, heartbeat_interval, grace_period, retry)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                              heartbeat_stale_trial_callback=retry,
                              engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError) as e:
        raise ConfigError(f"--storage {redact(url)}: cannot open: {e}") from e


def open_journal(path: str, heartbeat_interval: int, grace_period: int, retry) -> HeartbeatJournalStorage:
    """The journal storage at ``path``, its file checked whole first (journal.check: exit 2 naming a
    partial or foreign line, never a repair)."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        journal.check(path, FlockLock(path + ".lock"))
    except OSError as e:
        raise ConfigError(f"--storage {path}: cannot open the journal: {e.strerror or e}") from e
    try:
        return HeartbeatJournalStorage(path, heartbeat_interval, grace_period, retry)
    except OSError as e:
        raise ConfigError(f"--storage {path}: cannot open the journal: {e.strerror or e}") from e
    except (KeyError, TypeError, ValueError, IndexError, AssertionError) as e:  # records that do not replay
        raise journal.JournalDamaged(f"journal {path}: its records do not replay ({type(e).__name__}: {e}). "
                                     "Nothing was changed. Restore the file from a backup") from e


@contextlib.contextmanager
def budget_lock(url: str, storage, study_name: str):
    """Serialise "check the budget, then ask" across every worker of a study."""
    key = zlib.crc32(f"mutransfer-sweep:{study_name}".encode())
    path = journal_path(url)
    if path is None and url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
    if path is not None:
        with journal.held(FlockLock(path + ".budget.lock")):
            yield
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
