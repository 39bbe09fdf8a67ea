"""``mutransfer report RUN_DIR... --out report.html``: one page from the files runs wrote.

Reads what coord-check, sweep, freeze, transfer-check and train left in their directories (never
re-runs or re-fits anything, never opens a study's storage), so it works on a copy of a run
directory from another machine. Writes a self-contained HTML page (inline CSS, images as base64
PNG data URIs, nothing fetched) and a Markdown twin next to it (``report.md`` with its images in
``report_files/``).

A directory's kind comes from the files in it, and one directory may be several kinds (a sweep
directory holding the lock file frozen from it):

- coordinate check: coord.parquet, coord.png, or a verdict.json with per-module slopes;
- LR-transfer check: runs.jsonl, transfer.png, or a verdict.json with per-parametrization optima;
- sweep: trials.parquet, importances.json, optuna-journal.log or plots/optimization_history.png;
- training run: metrics.jsonl or events.jsonl;
- frozen hyperparameters: a lock file given directly or any *.lock.json in the directory (and the
  lock a training run recorded in its config.json).

A directory with none of these (or only a lock file) but run directories one level down stands for
those too. A missing or
corrupt file becomes a note in its section; a path that is no run directory (or does not exist)
is exit status 2 with the path named.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SECTIONS = (
    ("inputs", "Inputs"),
    ("coord-check", "Coordinate checks"),
    ("transfer-check", "LR transfer checks"),
    ("sweep", "Sweeps"),
    ("frozen-hparams", "Frozen hyperparameters"),
    ("training", "Training runs"),
)
KIND_SECTION = {"coord": "coord-check", "transfer": "transfer-check", "sweep": "sweep", "lock": "frozen-hparams",
                "training": "training"}
KIND_NAMES = {"coord": "coordinate check", "transfer": "LR-transfer check", "sweep": "sweep",
              "lock": "frozen hyperparameters", "training": "training run"}
EMPTY_HINT = {
    "coord-check": "No coordinate-check directory among the inputs (`mutransfer coord-check PRESET --out DIR`).",
    "transfer-check": "No transfer-check directory among the inputs (`mutransfer transfer-check FILE --out DIR`).",
    "sweep": "No sweep directory among the inputs (`mutransfer sweep FILE --out DIR`).",
    "frozen-hparams": "No lock file among the inputs (`mutransfer freeze DIR --out hparams.lock.json`).",
    "training": "No training run among the inputs (`mutransfer train CONFIG --out DIR`).",
}
LOCK_FORMAT_PREFIX = "mutransfer.hparams.lock/"
MAX_TRIAL_ROWS = 10


class NotARunDir(Exception):
    """A command-line path that holds nothing the report can read."""


# ---------------------------------------------------------------- the document (rendered twice)


@dataclass
class Heading:
    text: str


@dataclass
class Para:
    text: str
    status: bool | None = None  # True: a PASS line, False: a FAIL line (styled)


@dataclass
class Note:
    """Something the reader must know is missing or wrong: a file absent, unreadable, a run failed."""

    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list]


@dataclass
class Figure:
    name: str  # file name stem for the Markdown twin's image folder
    png: bytes
    caption: str


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


# ---------------------------------------------------------------- finding the runs


@dataclass
class Run:
    path: Path
    label: str  # the path as the user wrote it (relative stays relative)
    kinds: list[str]


def _load_json_quiet(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def is_lock_file(path: Path) -> bool:
    if not path.is_file() or path.suffix != ".json":
        return False
    if path.name.endswith(".lock.json"):
        return True
    obj = _load_json_quiet(path)
    return isinstance(obj, dict) and str(obj.get("format", "")).startswith(LOCK_FORMAT_PREFIX)


def detect(path: Path) -> list[str]:
    """The kinds of run a path holds, from file names (and a verdict.json's keys); [] when none."""
    if path.is_file():
        return ["lock"] if is_lock_file(path) else []
    if not path.is_dir():
        return []
    has = lambda name: (path / name).exists()
    verdict = _load_json_quiet(path / "verdict.json") if has("verdict.json") else None
    verdict = verdict if isinstance(verdict, dict) else {}
    kinds = []
    if has("coord.parquet") or has("coord.png") or "modules" in verdict:
        kinds.append("coord")
    if has("runs.jsonl") or has("transfer.png") or "parametrizations" in verdict:
        kinds.append("transfer")
    if any(has(n) for n in ("trials.parquet", "importances.json", "optuna-journal.log",
                            "plots/optimization_history.png")):
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


# ---------------------------------------------------------------- reading files, with notes


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


# ---------------------------------------------------------------- formatting helpers


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if 1e4 <= abs(x) < 1e15:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v, digits) for v in x)
    return str(x)


def flatten(obj: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts as (dotted key, value) rows, for provenance tables."""
    rows = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows += flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows


def kv_table(pairs) -> Table:
    return Table(["field", "value"], [[k, fmt(v)] for k, v in pairs])


def octave(x) -> str:
    return "-" if x is None else f"2^{x:.2f}"


# ---------------------------------------------------------------- coordinate check


def coord_blocks(run: Run) -> list:
    blocks: list = [Heading(f"{run.label}")]
    r = Reader(run, blocks)
    config = r.json("config.json") or {}
    if config:
        keys = ("preset", "widths", "steps", "seeds", "optimizer", "param", "compare", "precision", "lr",
                "threshold", "statistic", "batch_size", "seq_len")
        blocks.append(kv_table((k, config[k]) for k in keys if k in config))
    verdict = r.json("verdict.json")
    if verdict:
        verdicts = [verdict, *(verdict.get("compare") or {}).values()]
        summaries = verdict.get("summary") or []
        for i, v in enumerate(verdicts):
            line = summaries[i] if i < len(summaries) else f"{v.get('param')}: {'PASS' if v.get('passed') else 'FAIL'}"
            blocks.append(Para(line, status=bool(v.get("passed"))))
        if verdict.get("rule"):
            blocks.append(Para(f"Rule: {verdict['rule']}."))
        for v in verdicts:
            blocks.append(slope_table(v))
    df = r.parquet("coord.parquet")
    if df is not None:
        widths = sorted(df["width"].unique().tolist()) if "width" in df.columns else []
        blocks.append(Para(f"coord.parquet: {len(df)} records, widths {fmt(widths)}, "
                           f"{df['seed'].nunique() if 'seed' in df.columns else '?'} seed(s), "
                           f"{df['step'].nunique() if 'step' in df.columns else '?'} step(s)."))
    fig = r.png("coord.png", "size against width per module (log2-log2), one panel per step; seed bands")
    if fig:
        blocks.append(fig)
    return blocks


def slope_table(v: dict) -> Table:
    modules = v.get("modules") or {}
    steps = [str(s) for s in v.get("steps") or sorted({int(t) for m in modules.values() for t in m.get("slopes", {})})]
    rows = []
    for name, m in modules.items():
        slopes = m.get("slopes", {})
        rows.append([name, *[fmt(slopes.get(s), 3) for s in steps], fmt(m.get("failed_steps") or None),
                     "PASS" if m.get("passed") else "FAIL"])
    return Table([f"{v.get('param', '?')}: module", *[f"slope step {s}" for s in steps], "failed steps", "verdict"],
                 rows)


# ---------------------------------------------------------------- LR transfer check


def transfer_blocks(run: Run) -> list:
    blocks: list = [Heading(run.label)]
    r = Reader(run, blocks)
    config = r.json("config.json") or {}
    spec = config.get("spec") or {}
    settings, train = spec.get("transfer") or {}, spec.get("train") or {}
    if settings:
        grid = config.get("lr_log2") or []
        pairs = [("widths", settings.get("widths")), ("parametrizations", settings.get("parametrizations")),
                 ("log2 LR grid", f"{fmt(grid[0])} .. {fmt(grid[-1])} ({len(grid)} points)" if grid else None),
                 ("seeds", settings.get("seeds")), ("model", (spec.get("model") or {}).get("preset")),
                 ("steps per run", train.get("steps")),
                 ("batch x seq", f"{train.get('batch_size')} x {train.get('seq_len')}" if train else None)]
        blocks.append(kv_table(pairs))
    verdict = r.json("verdict.json")
    if verdict:
        passed = bool(verdict.get("pass"))
        reasons = verdict.get("reasons") or []
        blocks.append(Para("Transfer verdict: " + ("PASS" if passed else "FAIL: " + "; ".join(reasons)),
                           status=passed))
        blocks.append(shift_table(verdict))
        goal = verdict.get("goal") or {}
        if goal:
            blocks.append(Para(f"Goal: muP optimum shift <= {fmt(goal.get('mup_shift_octaves_max'))} octave over "
                               f">= {fmt(goal.get('min_span'))}x width; SP's shift at least "
                               f"{fmt(goal.get('sp_margin_octaves'))} octave more. Optimum: parabola vertex in "
                               "log2 LR (or the grid argmin); (edge): at the edge of the LR grid."))
    runs_path = run.path / "runs.jsonl"
    if runs_path.is_file():
        from analysis.training import read_jsonl

        statuses: dict[str, int] = {}
        for rec in read_jsonl(runs_path):
            statuses[str(rec.get("status"))] = statuses.get(str(rec.get("status")), 0) + 1
        blocks.append(Para("runs.jsonl: " + (", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
                                             or "no complete record") + "."))
        if statuses.get("error"):
            r.note(f"{statuses['error']} run(s) ended with an error (see runs.jsonl)")
    else:
        r.note("runs.jsonl is missing")
    fig = r.png("transfer.png", "held-out loss against log2 LR, a line per width, optimum starred")
    if fig:
        blocks.append(fig)
    return blocks


def shift_table(verdict: dict) -> Table:
    widths = [str(w) for w in verdict.get("widths") or []]
    rows = []
    for p, info in (verdict.get("parametrizations") or {}).items():
        cells = []
        for w in widths:
            o = (info.get("widths") or {}).get(w) or {}
            cell = octave(o.get("lr_log2"))
            if o.get("at_edge"):
                cell += " (edge)"
            if o.get("diverged"):
                cell += f" [{o['diverged']} diverged]"
            cells.append(cell)
        rows.append([p, *cells, fmt(info.get("shift_octaves"), 3), fmt(info.get("drift_octaves"), 3),
                     fmt(info.get("slope_octaves_per_doubling"), 3)])
    return Table(["parametrization", *[f"optimum LR, width {w}" for w in widths], "shift (octaves)",
                  "drift (octaves)", "octaves per width doubling"], rows)


# ---------------------------------------------------------------- sweep


def sweep_blocks(run: Run) -> list:
    blocks: list = [Heading(run.label)]
    r = Reader(run, blocks)
    config = r.json("config.json") or {}
    resolved = config.get("resolved") or {}
    if config:
        train = resolved.get("train") or {}
        pairs = [("study", config.get("study")), ("storage", config.get("storage")),
                 ("trials budget", config.get("trials")), ("proxy preset", resolved.get("preset")),
                 ("width", (resolved.get("model") or {}).get("d_model")),
                 ("parametrization", (resolved.get("param") or {}).get("parametrization")),
                 ("steps x batch x seq", f"{train.get('steps')} x {train.get('batch_size')} x {train.get('seq_len')}"
                  if train else None),
                 ("sampler", (resolved.get("sampler") or {}).get("kind")),
                 ("pruner", (resolved.get("pruner") or {}).get("kind")),
                 ("objective seeds", (resolved.get("objective") or {}).get("seeds")),
                 ("data fingerprint", config.get("data_fingerprint"))]
        blocks.append(kv_table(pairs))
        search = resolved.get("search") or {}
        if search:
            blocks.append(Table(["searched", "low", "high", "log", "step / choices"],
                                [[name, fmt(s.get("low")), fmt(s.get("high")), fmt(s.get("log", False)),
                                  fmt(s.get("step", s.get("choices")))] for name, s in search.items()]))
    summary = r.json("summary.json")
    if summary:
        states = summary.get("states") or {}
        blocks.append(Para(f"{summary.get('trials_total', '?')} trial(s) of {summary.get('trials_budget', '?')}: "
                           + (", ".join(f"{n} {s.lower()}" for s, n in states.items()) or "none") + "."))
        best = summary.get("best")
        if best:
            spread = f" (seed std {fmt(best.get('seed_std'))})" if best.get("seed_values") else ""
            blocks.append(Para(f"Best: trial {best.get('number')}, held-out loss {fmt(best.get('value'))}{spread}: "
                               + ", ".join(f"{k} = {fmt(v)}" for k, v in (best.get("params") or {}).items()),
                               status=True))
        else:
            r.note("the study has no complete trial")
    df = r.parquet("trials.parquet")
    if df is not None:
        blocks += trials_blocks(df)
    imp = r.json("importances.json")
    usable = {}
    if imp:
        usable = {k: v for k, v in imp.items() if isinstance(v, dict) and "error" not in v}
        for name, v in imp.items():
            if isinstance(v, dict) and "error" in v:
                blocks.append(Para(f"Importance {name}: not computed ({v['error']})"))
        if usable:
            params = sorted({p for v in usable.values() for p in v}, key=lambda p: -max(v.get(p, 0) for v in
                                                                                        usable.values()))
            blocks.append(Table(["hyperparameter", *[f"importance ({k})" for k in usable]],
                                [[p, *[fmt(v.get(p), 3) for v in usable.values()]] for p in params]))
    for name, caption in (("optimization_history.png", "each trial's objective and the best so far"),
                          ("params.png", "each searched hyperparameter against the objective"),
                          ("importances.png", "parameter importances")):
        fig = r.png(f"plots/{name}", caption, required=name != "importances.png" or bool(usable))
        if fig:
            blocks.append(fig)
    return blocks


def trials_blocks(df) -> list:
    blocks: list = []
    params = [c for c in df.columns if c.startswith("params_")]
    if "state" in df.columns and "value" in df.columns:
        done = df[df["state"] == "COMPLETE"].sort_values("value").head(MAX_TRIAL_ROWS)
        if len(done):
            cols = ["number", "value", *params, "duration_s"]
            cols = [c for c in cols if c in df.columns]
            blocks.append(Table([c.removeprefix("params_") for c in cols],
                                [[fmt(row[c]) for c in cols] for _, row in done.iterrows()]))
            if len(df[df["state"] == "COMPLETE"]) > MAX_TRIAL_ROWS:
                blocks.append(Para(f"(best {MAX_TRIAL_ROWS} complete trials of "
                                   f"{int((df['state'] == 'COMPLETE').sum())}; all in trials.parquet)"))
        bad = df[df["state"].isin(["FAIL", "PRUNED"])]
        if len(bad):
            blocks.append(Table(["trial", "state", "reason"],
                                [[int(row["number"]), row["state"], fmt(row.get("reason"))]
                                 for _, row in bad.head(MAX_TRIAL_ROWS).iterrows()]))
    return blocks


# ---------------------------------------------------------------- frozen hyperparameters


def lock_files(run: Run) -> list[tuple[Path, str]]:
    """(path, label) of the lock files a run stands for: itself, or the *.lock.json in its directory."""
    if run.path.is_file():
        return [(run.path, run.label)]
    return [(p, f"{run.label}/{p.name}") for p in sorted(run.path.glob("*.lock.json")) if p.is_file()]


def lock_blocks(files: list[tuple[Path, str]]) -> list:
    from mutransfer.lockfile import content_hash

    blocks: list = []
    for path, label in files:
        blocks.append(Heading(label))
        obj = _load_json_quiet(path)
        if not isinstance(obj, dict):
            blocks.append(Note(f"{label}: not readable JSON; no frozen hyperparameters shown"))
            continue
        if not str(obj.get("format", "")).startswith(LOCK_FORMAT_PREFIX):
            blocks.append(Note(f"{label}: format = {obj.get('format')!r}, not a mutransfer lock file"))
        body = {k: v for k, v in obj.items() if k != "content_hash"}
        ok = obj.get("content_hash") == content_hash(body)
        blocks.append(Para(f"content hash {obj.get('content_hash')}: "
                           + ("matches the contents" if ok else "DOES NOT match the contents (the file was edited)"),
                           status=ok))
        prov = obj.get("provenance") or {}
        if "trial_number" in prov:
            objective, proxy = prov.get("objective") or {}, prov.get("proxy") or {}
            blocks.append(Para(f"Trial {prov['trial_number']} of study {prov.get('study')!r}: held-out loss "
                               f"{fmt(objective.get('value'))} (seed std {fmt(objective.get('seed_std'))} over "
                               f"{fmt(objective.get('seeds'))} seed(s)); proxy {proxy.get('preset')} at width "
                               f"{proxy.get('width')}, depth {proxy.get('depth')}, {proxy.get('parametrization')}; "
                               f"frozen {prov.get('frozen_at', '?')}."))
        blocks += hparams_blocks(obj)
    return blocks


def hparams_blocks(obj: dict) -> list:
    """The base hyperparameters, the shape they belong to and the provenance of one lock file."""
    blocks: list = []
    hp = obj.get("hparams") or {}
    searched = set((obj.get("provenance") or {}).get("searched") or [])
    if hp and searched:
        blocks.append(Table(["base hyperparameter", "value", "origin"],
                            [[k, fmt(v, 6), "searched" if k in searched else "fixed"] for k, v in hp.items()]))
    elif hp:
        blocks.append(Table(["base hyperparameter", "value"], [[k, fmt(v, 6)] for k, v in hp.items()]))
    param, model = obj.get("param") or {}, obj.get("proxy_model") or {}
    shape = [*[(f"param.{k}", v) for k, v in param.items()],
             *[(f"proxy_model.{k}", model[k]) for k in ("d_model", "n_layers", "n_heads", "head_dim", "vocab_size")
               if k in model], ("tokenizer", obj.get("tokenizer"))]
    if any(v is not None for _, v in shape):
        blocks.append(kv_table(shape))
    prov = obj.get("provenance") or {}
    if prov:
        blocks.append(Table(["provenance", "value"], [[k, fmt(v, 6)] for k, v in flatten(prov)]))
    return blocks


def training_lock_blocks(run: Run) -> list:
    """The lock a training run recorded in its config.json: which frozen values it trained with."""
    config = _load_json_quiet(run.path / "config.json")
    if not isinstance(config, dict) or not config.get("hparams_lock"):
        return []
    lock = config["hparams_lock"]
    blocks: list = [Heading(f"{run.label} (used by this training run)"),
                    Para(f"lock file {lock.get('path', '?')}, content hash {lock.get('content_hash', '?')}")]
    blocks += hparams_blocks({"hparams": config.get("hparams") or {}, "provenance": lock.get("provenance") or {}})
    return blocks


# ---------------------------------------------------------------- training run


def training_blocks(run: Run, frames: dict) -> list:
    from analysis.training import plot_training, read_events, read_metrics, stage_spans, switch_step

    blocks: list = [Heading(run.label)]
    r = Reader(run, blocks)
    config = r.json("config.json") or {}
    try:
        df = read_metrics(run.path)
    except FileNotFoundError:
        r.note("metrics.jsonl is missing; no training curves")
        return blocks
    except (OSError, UnicodeDecodeError, ValueError) as e:
        r.note(f"metrics.jsonl is not readable ({e}); no training curves")
        return blocks
    frames[run.label] = df
    events = read_events(run.path)
    summary = r.json("summary.json", required=False)
    if summary is None:
        r.note("no summary.json: the run is unfinished or was interrupted; showing the steps logged so far")
    switch = switch_step(df, events)
    train, par = config.get("train") or {}, config.get("parallel") or {}
    opt = (config.get("config") or {}).get("optimizer") or {}

    def last(col):
        s = df[col].dropna() if col in df.columns else []
        return s.iloc[-1] if len(s) else None

    def median(col):
        s = df[col].dropna() if col in df.columns else []
        return float(s.median()) if len(s) else None

    mfu = median("mfu")
    mfu_text = f"{100 * mfu:.2f} %" if mfu is not None else "not recorded (no peak FLOP/s for the device)"
    world = int(df["dp_size"].max()) if "dp_size" in df.columns and df["dp_size"].notna().any() else None
    lock = config.get("hparams_lock") or {}
    pairs = [("model", ((config.get("config") or {}).get("model") or {}).get("preset")),
             ("precision", train.get("precision")),
             ("data-parallel", "1 process" if world == 1 else f"{par.get('mode', '?')} x {world or '?'} processes"),
             ("hyperparameters", f"{lock['path']} (see Frozen hyperparameters)" if lock.get("path") else None),
             ("steps logged", len(df)), ("tokens", last("tokens")),
             ("final loss", last("loss")), ("final held-out loss", last("val_loss")),
             ("optimizer switch", f"AdamW -> Muon at step {switch}" if switch is not None else
              "none" + (" (optimizer.switch = false: the AdamW-only control)" if opt.get("switch") is False else "")),
             ("median tokens/s", median("tokens_per_s")),
             ("median MFU", mfu_text)]
    blocks.append(kv_table(pairs))
    spans = stage_spans(df)
    if spans:
        blocks.append(Table(["stage", "steps", "optimizer", "global batch", "sequence length", "tokens at end",
                             "held-out loss at end"],
                            [[s["stage"], f"{s['first_step']}-{s['last_step']}", fmt(s.get("optimizer")),
                              fmt(s.get("global_batch")), fmt(s.get("seq_len")), fmt(s.get("tokens_end")),
                              fmt(s.get("val_loss_end"))] for s in spans]))
    png = plot_training(df, events, run.label)
    blocks.append(Figure(f"{run.label}/training", png,
                         f"{run.label}: loss and held-out loss, LR per group, grad norm, tokens/s, MFU, batch shape; "
                         "dotted: stage boundaries; red: the AdamW -> Muon switch"))
    return blocks


# ---------------------------------------------------------------- assembling


def guarded(build: Callable[[], list], label: str, kind: str) -> list:
    """A run whose files have an unexpected shape becomes a note, and the other runs still report."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 -- the report must not die on one odd file
        return [Heading(label), Note(f"{label}: could not read this {KIND_NAMES[kind]} ({type(e).__name__}: {e})")]


def build_sections(runs: list[Run]) -> list[Section]:
    sections = {sid: Section(sid, title) for sid, title in SECTIONS}
    sections["inputs"].blocks.append(Table(["input", "detected as"],
                                           [[r.label, ", ".join(KIND_NAMES[k] for k in r.kinds)] for r in runs]))
    frames: dict = {}
    seen_locks: set = set()  # a lock given directly and found in its sweep directory is shown once
    for run in runs:
        for kind in run.kinds:
            if kind == "lock":
                files = [(p, label) for p, label in lock_files(run) if p.resolve() not in seen_locks]
                seen_locks |= {p.resolve() for p, _ in files}
                if not files:
                    continue
                build = lambda f=files: lock_blocks(f)
            elif kind == "coord":
                build = lambda r=run: coord_blocks(r)
            elif kind == "transfer":
                build = lambda r=run: transfer_blocks(r)
            elif kind == "sweep":
                build = lambda r=run: sweep_blocks(r)
            else:
                build = lambda r=run: training_blocks(r, frames)
            sections[KIND_SECTION[kind]].blocks += guarded(build, run.label, kind)
            if kind == "training":
                sections["frozen-hparams"].blocks += guarded(lambda r=run: training_lock_blocks(r), run.label, kind)
    if len(frames) > 1:
        from analysis.training import plot_comparison

        sections["training"].blocks += [Heading("All training runs"),
                                         Figure("comparison", plot_comparison(frames),
                                                "train and held-out loss of every run (e.g. the switch against "
                                                "the AdamW-only control)")]
    for sid, section in sections.items():
        if not section.blocks:
            section.blocks.append(Para(EMPTY_HINT[sid]))
    return list(sections.values())


# ---------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 0 1.5em 3em; color: #1d1d1f; line-height: 1.45; }
header { border-bottom: 2px solid #ddd; margin-bottom: 1em; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-bottom: .4em; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 1em; }
nav ul { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: .4em 1.2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .2em .55em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td { font-variant-numeric: tabular-nums; max-width: 40em; overflow-wrap: anywhere; }
.note { background: #fff4e5; border-left: 4px solid #f0a020; padding: .35em .7em; margin: .5em 0; }
.pass { color: #17692a; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
.muted { color: #666; font-size: .85em; }
"""
IMG_ONLOAD = "this.dataset.loaded = this.naturalWidth > 0 ? 'yes' : 'no'"
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) { ok += 1; } });
  document.body.dataset.imagesLoaded = ok + '/' + imgs.length;
});
"""


def _cls(status: bool | None) -> str:
    return "" if status is None else (' class="pass"' if status else ' class="fail"')


def render_html(sections: list[Section], title: str, generated: str) -> str:
    e = html.escape
    n_images = sum(isinstance(b, Figure) for s in sections for b in s.blocks)
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{e(title)}</title>",
           f"<style>{CSS}</style>", "</head>", f'<body data-images="{n_images}">', "<header>",
           f"<h1>{e(title)}</h1>", f'<p class="muted">{e(generated)}</p>', "<nav><ul>",
           *[f'<li><a href="#{s.id}">{e(s.title)}</a></li>' for s in sections], "</ul></nav>", "</header>"]
    for s in sections:
        out.append(f'<section id="{s.id}">')
        out.append(f"<h2>{e(s.title)}</h2>")
        for b in s.blocks:
            if isinstance(b, Heading):
                out.append(f"<h3>{e(b.text)}</h3>")
            elif isinstance(b, Note):
                out.append(f'<p class="note">{e(b.text)}</p>')
            elif isinstance(b, Para):
                text = re.sub(r"`([^`]+)`", r"<code>\1</code>", e(b.text))
                out.append(f"<p{_cls(b.status)}>{text}</p>")
            elif isinstance(b, Table):
                out.append("<table><thead><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in b.headers)
                           + "</tr></thead><tbody>")
                for row in b.rows:
                    cells = "".join(f"<td{_cls(_verdict_cell(c))}>{e(str(c))}</td>" for c in row)
                    out.append(f"<tr>{cells}</tr>")
                out.append("</tbody></table>")
            elif isinstance(b, Figure):
                data = base64.b64encode(b.png).decode("ascii")
                out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(b.caption)}" '
                           f'onload="{IMG_ONLOAD}" onerror="this.dataset.loaded = \'error\'">'
                           f"<figcaption>{e(b.caption)}</figcaption></figure>")
        out.append("</section>")
    out += [f"<script>{SCRIPT}</script>", "</body>", "</html>"]
    return "\n".join(out) + "\n"


def _verdict_cell(cell) -> bool | None:
    return {"PASS": True, "FAIL": False}.get(cell) if isinstance(cell, str) else None


# ---------------------------------------------------------------- Markdown


def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def image_names(sections: list[Section]) -> dict[int, str]:
    """id(Figure) -> a unique, filesystem-safe file name, numbered in page order."""
    names = {}
    figures = [b for s in sections for b in s.blocks if isinstance(b, Figure)]
    for i, fig in enumerate(figures, 1):
        slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(fig.name).with_suffix("").as_posix()).strip("-")[:60] or "figure"
        names[id(fig)] = f"{i:02d}-{slug}.png"
    return names


def render_markdown(sections: list[Section], title: str, generated: str, image_dir: str,
                    names: dict[int, str]) -> str:
    out = [f"# {title}", "", f"_{generated}_", ""]
    out += [f"- [{s.title}](#{s.id})" for s in sections] + [""]
    for s in sections:
        out += [f'<a id="{s.id}"></a>', "", f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Heading):
                out += [f"### {b.text}", ""]
            elif isinstance(b, Note):
                out += [f"> **Note:** {b.text}", ""]
            elif isinstance(b, Para):
                out += [f"**{b.text}**" if b.status is not None else b.text, ""]
            elif isinstance(b, Table):
                out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
                out.append("|" + "---|" * len(b.headers))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
                out.append("")
            elif isinstance(b, Figure):
                out += [f"![{_md_cell(b.caption)}]({image_dir}/{names[id(b)]})", "", f"_{b.caption}_", ""]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- command


def write_report(paths: list[str], out: str | Path, md: str | Path | None = None,
                 title: str = "mutransfer report") -> dict:
    """Both files from the run paths; raises NotARunDir before writing anything."""
    runs = find_runs(paths)
    sections = build_sections(runs)
    out = Path(out)
    md = Path(md) if md else out.with_suffix(".md")
    generated = (f"Generated {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} by "
                 f"mutransfer report from {len(runs)} input(s): " + ", ".join(r.label for r in runs))
    out.parent.mkdir(parents=True, exist_ok=True)
    md.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(sections, title, generated))
    image_dir = md.parent / f"{md.stem}_files"
    names = image_names(sections)
    if names:
        image_dir.mkdir(exist_ok=True)
        for old in image_dir.glob("*.png"):  # a previous report's figures
            old.unlink()
        for s in sections:
            for b in s.blocks:
                if isinstance(b, Figure):
                    (image_dir / names[id(b)]).write_bytes(b.png)
    md.write_text(render_markdown(sections, title, generated, image_dir.name, names))
    notes = [b.text for s in sections for b in s.blocks if isinstance(b, Note)]
    return {"html": out, "markdown": md, "images": len(names), "notes": notes,
            "runs": [(r.label, r.kinds) for r in runs]}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="one self-contained HTML page (and a Markdown twin) from run directories",
        description="Detects each path's kind (coordinate check, sweep, transfer check, training run, lock "
                    "file) from its files and writes one page; never re-runs anything.")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run directories (or lock files) to report on")
    p.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    p.add_argument("--md", help="Markdown twin (default: the --out path with .md; images in <name>_files/)")
    p.add_argument("--title", default="mutransfer report", help="page title")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        result = write_report(args.paths, args.out, args.md, args.title)
    except NotARunDir as e:
        print(f"mutransfer report: {e}", file=sys.stderr)
        return 2
    for label, kinds in result["runs"]:
        print(f"  {label}: {', '.join(KIND_NAMES[k] for k in kinds)}", file=sys.stderr)
    for note in result["notes"]:
        print(f"  note: {note}", file=sys.stderr)
    print(f"wrote {result['html']} and {result['markdown']} ({result['images']} images)", file=sys.stderr)
    return 0
