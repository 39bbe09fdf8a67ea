"""Which run directories the report was given, and reading their files without ever crashing.

A directory's kind comes from the files in it, and one directory may be several kinds (a sweep
directory holding the lock file frozen from it):

- coordinate check: coord.parquet, coord.png, or a verdict.json with per-module slopes;
- transfer check: runs.jsonl, transfer.png, or a verdict.json with per-variant optima;
- sweep: trials.parquet, importances.json, optuna-journal.log or plots/optimization_history.png;
- training run: metrics.jsonl or events.jsonl;
- frozen hyperparameters: a lock file given directly or any *.lock.json in the directory (and the
  lock a training run recorded in its config.json).

A directory with none of these (or only a lock file) but run directories one level down stands
for those too. A path that is no run directory is an error naming it (``NotARunDir``); a file
missing or damaged inside a run directory is a note in its section (``Reader``), since a report on
a half-finished or half-copied run is still worth having.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from analysis.report_document import Figure, Note
from analysis.training import jsonl_rows

KIND_NAMES = {"coord": "coordinate check", "transfer": "LR-transfer check", "sweep": "sweep",
              "lock": "frozen hyperparameters", "training": "training run"}
LOCK_FORMAT_PREFIX = "mutransfer.hparams.lock/"
SWEEP_FILES = ("trials.parquet", "importances.json", "optuna-journal.log", "plots/optimization_history.png")


class NotARunDir(Exception):
    """A command-line path that holds nothing the report can read."""


@dataclass
class Run:
    path: Path
    label: str  # the path as the user wrote it (relative stays relative)
    kinds: list[str]


def load_json_quiet(path: Path):
    """The JSON in a file, or None when it is missing or unreadable (for detection, not reporting)."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def is_lock_file(path: Path) -> bool:
    if not path.is_file() or path.suffix != ".json":
        return False
    if path.name.endswith(".lock.json"):
        return True
    obj = load_json_quiet(path)
    return isinstance(obj, dict) and str(obj.get("format", "")).startswith(LOCK_FORMAT_PREFIX)


def detect(path: Path) -> list[str]:
    """The kinds of run a path holds, from file names (and a verdict.json's keys); [] when none."""
    if path.is_file():
        return ["lock"] if is_lock_file(path) else []
    if not path.is_dir():
        return []
    has = lambda name: (path / name).exists()
    verdict = load_json_quiet(path / "verdict.json") if has("verdict.json") else None
    verdict = verdict if isinstance(verdict, dict) else {}
    kinds = []
    if has("coord.parquet") or has("coord.png") or "modules" in verdict:
        kinds.append("coord")
    # "parametrizations": a verdict.json from before the transfer check had variants and intervals
    if has("runs.jsonl") or has("transfer.png") or "variants" in verdict or "parametrizations" in verdict:
        kinds.append("transfer")
    if any(has(name) for name in SWEEP_FILES):
        kinds.append("sweep")
    if has("metrics.jsonl") or has("events.jsonl"):
        kinds.append("training")
    if any(p.is_file() for p in path.glob("*.lock.json")):
        kinds.append("lock")
    return kinds


def find_runs(paths: list[str]) -> list[Run]:
    """Each path's runs; raises NotARunDir naming the first path that holds none."""
    runs = []
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise NotARunDir(f"{text}: no such file or directory")
        kinds = detect(path)
        if kinds:
            runs.append(Run(path, text, kinds))
        if kinds and kinds != ["lock"]:
            continue
        # a parent of run directories (e.g. runs/, perhaps holding the lock frozen into it) stands for them
        children = sorted(p for p in path.iterdir() if p.is_dir() and detect(p)) if path.is_dir() else []
        if not kinds and not children:
            what = "a file that is not a lock file" if path.is_file() else "a directory without run files"
            raise NotARunDir(f"{text}: not a run directory ({what}: expected coord.parquet, runs.jsonl, "
                             "trials.parquet, metrics.jsonl or a *.lock.json)")
        runs += [Run(c, str(Path(text) / c.name), detect(c)) for c in children]
    return runs


class Reader:
    """Reads one run's files; every failure becomes a Note in ``blocks`` and a None result."""

    def __init__(self, run: Run, blocks: list):
        self.run, self.blocks = run, blocks

    def note(self, text: str) -> None:
        self.blocks.append(Note(f"{self.run.label}: {text}"))

    def json(self, name: str, required: bool = True):
        path = self.run.path / name
        if not path.is_file():
            if required:
                self.note(f"{name} is missing")
            return None
        try:
            obj = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self.note(f"{name} is not readable JSON ({e})")
            return None
        if not isinstance(obj, dict):
            self.note(f"{name} does not hold a JSON object")
            return None
        return obj

    def jsonl(self, name: str) -> list[dict] | None:
        """The JSON-object lines of a file; a torn line (a writer killed mid-line) is skipped."""
        path = self.run.path / name
        if not path.is_file():
            self.note(f"{name} is missing")
            return None
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            self.note(f"{name} is not readable ({e})")
            return None
        return jsonl_rows(lines)

    def parquet(self, name: str):
        import pandas as pd

        path = self.run.path / name
        if not path.is_file():
            self.note(f"{name} is missing")
            return None
        try:
            return pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for a damaged file
            self.note(f"{name} is not a readable parquet file ({type(e).__name__}: {e})")
            return None

    def png(self, name: str, caption: str, required: bool = True) -> Figure | None:
        path = self.run.path / name
        if not path.is_file():
            if required:
                self.note(f"{name} is missing")
            return None
        data = path.read_bytes()
        problem = png_problem(data)
        if problem:
            self.note(f"{name} is not a readable PNG image ({problem})")
            return None
        return Figure(f"{self.run.label}/{name}", data, f"{self.run.label}/{name}: {caption}")


def png_problem(data: bytes) -> str | None:
    """None when ``data`` decodes as a PNG image, else what is wrong."""
    from PIL import Image

    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "no PNG signature"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 -- Pillow raises several types for a damaged image
        return f"{type(e).__name__}: {e}"
    return None
