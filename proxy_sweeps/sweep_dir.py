"""The directory of a sweep (``--out``): checked before any compute, held by one live sweep, and
refused when what it holds belongs to another study or its storage lost the study.

- ``check_writable``: --out is a directory this process can write (created when missing); a
  regular file, a path under one, or a read-only directory is exit 2 naming it.
- ``SweepDirLock``: one live ``mutransfer sweep`` per directory. The main process holds a flock
  on DIR/sweep.lock (its pid and host written in it) for its whole run; a second sweep on the
  directory exits 2 naming that pid. The kernel drops the lock when the holder ends, however it
  ends. (The alternative, distinct invocation numbers for concurrent sweeps on one directory, was
  not taken: config.json, trials.parquet and the plots are one per directory.) Sweeps that share a
  storage -- one PostgreSQL study over several machines, or one journal file -- each with their own
  --out run side by side: the lock is on the directory, not on the study.
- ``check_outputs``: config.json, trials.parquet and summary.json left by an earlier run must be of
  this study and this definition, and the storage must still hold the study with at least the
  trials the last export counted; otherwise a re-run would start over (an emptied journal), mix
  studies, or overwrite the exported trials with fewer.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path

from mutransfer.config import ConfigError
from mutransfer.rundir import read_json
from proxy_sweeps.spec import definition_hash

LOCK_FILE = "sweep.lock"
OUTPUTS = ("config.json", "trials.parquet", "summary.json")


def check_writable(out: Path) -> None:
    """``out`` is a directory this process can write; created (with its parents) when missing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the directory ({e.strerror or e})") from e
    probe = None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=out)
        os.close(fd)
    except OSError as e:
        raise ConfigError(f"--out {out}: the directory is not writable ({e.strerror or e})") from e
    finally:
        if probe is not None:
            os.unlink(probe)


class SweepDirLock:
    """One live sweep per directory: a non-blocking flock on DIR/sweep.lock, held until ``release``."""

    def __init__(self, out: str | Path):
        self.out, self.path, self.fd = Path(out), Path(out) / LOCK_FILE, None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "pid unknown"
            raise ConfigError(f"--out {self.out}: another `mutransfer sweep` is running on this directory "
                              f"({who}); wait for it to end (or stop it), or use another --out") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def check_outputs(out: Path, name: str, spec_hash: str, storage: str, n_trials: int | None) -> None:
    """Refuse a directory whose earlier outputs are not this study's. ``n_trials``: the trials the
    storage holds for study ``name``, None when it has no such study; ``storage`` names it (redacted)."""
    out = Path(out)
    present = [f for f in OUTPUTS if (out / f).exists()]
    if not present:
        return
    config = out / "config.json"
    if config.is_file():
        old = read_json(config, "sweep config")
        if old.get("study") != name:
            raise ConfigError(f"--out {out} holds the outputs of study {old.get('study')!r} (config.json), not "
                              f"{name!r}: pass --study {old.get('study')} to continue it, or use another --out")
        if isinstance(old.get("spec"), dict) and definition_hash(old["spec"]) != spec_hash:
            raise ConfigError(f"--out {out} holds the outputs of a different sweep definition of study {name!r} "
                              "(config.json): use another --out (or --study) for this one")
    if n_trials is None:
        raise ConfigError(f"--out {out} holds {', '.join(present)} of study {name!r}, but the storage {storage} "
                          f"has no study {name!r} (emptied, deleted or another storage?): restore it (e.g. "
                          "optuna-journal.log from a backup), or use another --out")
    summary = out / "summary.json"
    if summary.is_file():
        counted = read_json(summary, "sweep summary").get("trials_total")
        if isinstance(counted, int) and n_trials < counted:
            raise ConfigError(f"--out {out}: summary.json (the last export) counted {counted} trials of study "
                              f"{name!r}, but the storage {storage} holds {n_trials}: trials were lost from it "
                              "(a cut or older journal?). Restore the newer storage; to go on from this one, "
                              "remove trials.parquet and summary.json from --out first")
