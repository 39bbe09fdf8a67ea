"""The journal file of a study: checked whole before it is opened, appended one whole line at a time.

Optuna's journal is one JSON object a line. Its reader skips a last line without its end (a write
in progress, or a crash mid-write) and its writer appends after it, which glues the next record to
the torn one: from then on the study does not load (JSONDecodeError). So:

- ``check`` reads the file (once more under the journal lock when its end is partial, so a write
  in progress is not taken for a torn line) and raises ``JournalDamaged`` (a ConfigError: exit 2)
  naming the file and the first bad line: a last line without its end, a line that is not JSON, or
  a JSON value that is not a journal record. Nothing is repaired: the message says how to recover.
- ``AppendOnlyBackend.append_logs`` refuses to append after a partial line, and writes its records
  with one ``write`` call; a write cut short (disk full) is truncated back, so no partial line is
  left by it. A stop signal's Python handler runs before or after that call, never inside it (a
  write interrupted before its first byte raises, and the truncation covers any other error), so a
  stop cannot tear a line either; only a SIGKILL or a power cut can, and ``check`` catches that.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

from optuna.storages.journal import JournalFileBackend

from mutransfer.config import ConfigError


class JournalDamaged(ConfigError):
    """The journal file holds a partial or foreign line; the study it records cannot be read safely."""


FOREIGN_LINE = ("Nothing was changed. Restore the file from a backup, or delete that line (the records on it are "
                "lost) and run again")


def torn_message(path: str | Path, line: int) -> str:
    return (f"journal {path}: line {line} is partial (the last line has no end: a write was cut short, "
            "e.g. by a crash). Nothing was changed. Restore the file from a backup, or remove that partial "
            "last line (keep the lines before it) and run again")


def check(path: str | Path, lock=None) -> int:
    """Raise ``JournalDamaged`` naming the first bad line of the journal at ``path``; the number of
    records otherwise (0 for a missing or empty file). ``lock`` (acquire/release) is the journal's."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):  # perhaps a write in progress: read again once no writer is mid-line
        with held(lock):
            data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with its last line's end
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise JournalDamaged(f"journal {path}: line {number} is not JSON. {FOREIGN_LINE}") from e
        if not isinstance(record, dict) or not isinstance(record.get("op_code"), int):
            raise JournalDamaged(f"journal {path}: line {number} is not a journal record (an object with an "
                                 f"'op_code'). {FOREIGN_LINE}")
    if tail:
        raise JournalDamaged(torn_message(path, len(lines) + 1))
    return len(lines)


@contextlib.contextmanager
def held(lock):
    """Hold ``lock`` (None: no lock); released on every path, also when a stop cut ``acquire`` short."""
    if lock is None:
        yield
        return
    try:
        lock.acquire()
        yield
    finally:
        lock.release()


class AppendOnlyBackend(JournalFileBackend):
    """Optuna's journal file backend whose appends never leave or follow a partial line."""

    def __init__(self, path: str, lock):
        super().__init__(path, lock_obj=lock)
        self.path, self.lock = path, lock

    def append_logs(self, logs: list[dict]) -> None:
        data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
        with held(self.lock):
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            try:
                end = os.fstat(fd).st_size
                if end and os.pread(fd, 1, end - 1) != b"\n":
                    raise JournalDamaged(torn_message(self.path, Path(self.path).read_bytes().count(b"\n") + 1))
                try:
                    written = os.write(fd, data)
                except BaseException:
                    os.ftruncate(fd, end)
                    raise
                if written != len(data):  # short: the disk is full (or a size limit): take the part back
                    os.ftruncate(fd, end)
                    raise OSError(errno.ENOSPC, f"journal {self.path}: only {written} of {len(data)} bytes "
                                                "could be written (disk full?); nothing was recorded")
                os.fsync(fd)
            finally:
                os.close(fd)
