"""What every run directory is made of: atomic JSON, append-only JSONL, the environment, the device.

Every command that writes a run directory (sweep, transfer check, coordinate check, training)
uses these, so the files mean the same thing everywhere:

- ``write_json``: written to a temporary sibling, fsynced, then renamed over the target; a reader
  (or a crash) sees the old file or the new one, never half of one.
- ``append_jsonl`` / ``read_jsonl``: one JSON object per line, appended under an exclusive lock
  (several processes may append); a reader skips only a torn *last* line (a writer killed
  mid-line) and reports anything else as corruption.
- ``environment()``: one provenance schema -- time, host, versions, devices, git commit, argv --
  written as ``environment.json`` by every command (``read_environment`` also reads the
  ``env.json`` of training runs made before the name was the same everywhere).
- ``pick_device()``: the one rule for ``device = auto | cpu | cuda | cuda:N``.
- ``check_output_dir()``: the one check of an output path (``--out``), made before any compute.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mutransfer.config import ConfigError

ENVIRONMENT_SCHEMA = "mutransfer.environment/1"
ENVIRONMENT_FILE = "environment.json"
LEGACY_ENVIRONMENT_FILES = ("env.json",)  # what `train` wrote before; still read


def fsync_path(path: Path) -> None:
    """fsync a file or directory, best effort (some filesystems refuse it on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # not serialisable, disk full, path a directory, a signal: no temp file left
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def check_output_dir(path: str | Path, what: str = "--out") -> Path:
    """``path`` as a directory a command may create or write into, else ConfigError naming it.

    An existing path must be a directory this process may write; a missing one needs its nearest
    existing ancestor to be such a directory. Nothing is created, so a start that fails a later
    check leaves no directory behind. (Run as root, permission bits do not stop writes, and
    ``os.access`` says so too.)
    """
    path = Path(path).expanduser()
    if os.path.lexists(path) and not path.exists():
        raise ConfigError(f"{what} {str(path)!r} is a broken symbolic link; remove it or choose another path")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file, not a directory; choose a directory (new or "
                          "existing) for the output")
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {str(path)!r} cannot be created: {str(existing)!r} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable" if existing == path else f"cannot be created: {str(existing)!r} is not writable"
        raise ConfigError(f"{what} {str(path)!r} {problem} for this user; choose another path or change its "
                          "permissions")
    return path


def read_json(path: str | Path, what: str = "file"):
    """A JSON file, or ConfigError naming it when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid JSON: {e}") from e


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one row under an exclusive lock, flushed to disk before returning."""
    line = json.dumps(row, default=str) + "\n"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class JsonlWriter:
    """An open JSONL file for a long run's rows (one process): append, flush after each row."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "a")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file ([] when absent). A torn last line (a killed writer) is skipped;
    a bad line anywhere else is corruption and raises ConfigError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue
            raise ConfigError(f"{path}: line {i + 1} is not JSON ({e}); the file is corrupt") from e
        if isinstance(row, dict):
            rows.append(row)
    return rows


def truncate_jsonl(path: str | Path, keep) -> None:
    """Rewrite ``path`` atomically with only the rows for which ``keep(row)`` is true."""
    path = Path(path)
    rows = [r for r in read_jsonl(path) if keep(r)]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    os.replace(tmp, path)


# ---------------------------------------------------------------- provenance


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def code_version() -> dict:
    """Package version, plus the git commit (and whether the tree had changes) when there is one."""
    info: dict = {"package": package_version("mutransfer"), "git_commit": None, "git_dirty": None}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def environment(world_size: int = 1, device: str | None = None) -> dict:
    """Versions, devices and source commit, so a run directory says what produced it."""
    import torch

    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "schema": ENVIRONMENT_SCHEMA,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "argv": sys.argv,
        "cpu_count": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cuda_devices": cuda,
        "device": device,
        "world_size": world_size,
        "versions": {name: package_version(name) for name in ("mutransfer", "torch", "optuna", "numpy", "pandas",
                                                                "pydantic")},
        "code": code_version(),
    }


def read_environment(run_dir: str | Path) -> dict | None:
    """The environment a run directory recorded (``environment.json``, else a legacy ``env.json``);
    None when it has neither. A file that is there but unreadable is a ConfigError naming it."""
    for name in (ENVIRONMENT_FILE, *LEGACY_ENVIRONMENT_FILES):
        path = Path(run_dir) / name
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{path}: not readable as JSON ({e})") from e
    return None


# ---------------------------------------------------------------- the device


def pick_device(setting: str = "auto", local_rank: int | None = None):
    """``auto``: the GPU (``cuda:local_rank``) when one is visible, else the CPU; ``cpu``; ``cuda``
    (the local rank's GPU); ``cuda:N``. A GPU that is asked for but absent is a ConfigError."""
    import torch

    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device = {setting!r} but no CUDA device is visible")
    if setting.startswith("cuda:"):
        index = int(setting.split(":", 1)[1])
    else:
        index = local_rank or 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device = {setting!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
