"""``mutransfer report RUN_DIR... --out report.html``: one page from the files runs wrote.

Reads what coord-check, sweep, freeze, transfer-check and train left in their directories (never
re-runs or re-fits anything, never opens a study's storage, imports no torch), so it works on a
copy of a run directory from another machine. Writes a self-contained HTML page and a Markdown
twin next to it (``report.md`` with its images in ``report_files/``).

The pieces, each in its own module:

- report_runs: which kinds of run each path holds, and a tolerant reader of their files;
- report_document: the blocks a page is made of, and the HTML and Markdown renderers;
- report_coord, report_transfer, report_sweep, report_hparams, report_training: one section each;
- this module: the sections in order, the files written, and the command.

A missing or corrupt file becomes a note in its section; a path that is no run directory (or
does not exist), or an unknown ``--set`` option, is exit status 2 with the culprit named.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable
from pathlib import Path

from analysis.report_coord import coord_blocks
from analysis.report_document import (
    Figure,
    Heading,
    Note,
    Para,
    Section,
    Table,
    image_names,
    render_html,
    render_markdown,
)
from analysis.report_hparams import lock_blocks, lock_files, training_lock_blocks
from analysis.report_joint import is_joint_dir, joint_blocks
from analysis.report_options import OPTIONS, OptionError, parse_options
from analysis.report_runs import KIND_NAMES, NotARunDir, Run, find_runs
from analysis.report_sweep import sweep_blocks
from analysis.report_training import comparison_blocks, training_blocks
from analysis.report_transfer import transfer_blocks

__all__ = ["KIND_NAMES", "OPTIONS", "SECTIONS", "NotARunDir", "OptionError", "parse_options", "run", "write_report"]

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
EMPTY_HINT = {
    "coord-check": "No coordinate-check directory among the inputs (`mutransfer coord-check PRESET --out DIR`).",
    "transfer-check": "No transfer-check directory among the inputs (`mutransfer transfer-check FILE --out DIR`).",
    "sweep": "No sweep directory among the inputs (`mutransfer sweep FILE --out DIR`).",
    "frozen-hparams": "No lock file among the inputs (`mutransfer freeze DIR --out hparams.lock.json`).",
    "training": "No training run among the inputs (`mutransfer train CONFIG --out DIR`).",
}


# ---------------------------------------------------------------- the sections


def guarded(build: Callable[[], list], label: str, kind: str) -> list:
    """A run whose files have an unexpected shape becomes a note, and the other runs still report."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 -- the report must not die on one odd file
        return [Heading(label), Note(f"{label}: could not read this {KIND_NAMES[kind]} ({type(e).__name__}: {e})")]


def build_sections(runs: list[Run], max_trial_rows: int = OPTIONS["max_trial_rows"]) -> list[Section]:
    sections = {sid: Section(sid, title) for sid, title in SECTIONS}
    sections["inputs"].blocks.append(Table(["input", "detected as"],
                                           [[r.label, ", ".join(KIND_NAMES[k] for k in r.kinds)] for r in runs]))
    frames: dict = {}  # training run label -> its metrics, for the comparison figure
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
            elif kind == "transfer" and is_joint_dir(run.path):
                build = lambda r=run: joint_blocks(r)
            elif kind == "transfer":
                build = lambda r=run: transfer_blocks(r)
            elif kind == "sweep":
                build = lambda r=run: sweep_blocks(r, max_trial_rows)
            else:
                build = lambda r=run: training_blocks(r, frames)
            sections[KIND_SECTION[kind]].blocks += guarded(build, run.label, kind)
            if kind == "training":
                sections["frozen-hparams"].blocks += guarded(lambda r=run: training_lock_blocks(r), run.label, kind)
    sections["training"].blocks += guarded(lambda: comparison_blocks(frames), "All training runs", "training")
    for sid, section in sections.items():
        if not section.blocks:
            section.blocks.append(Para(EMPTY_HINT[sid]))
    return list(sections.values())


# ---------------------------------------------------------------- the files


def write_report(paths: list[str], out: str | Path, md: str | Path | None = None,
                 title: str = OPTIONS["title"], max_trial_rows: int = OPTIONS["max_trial_rows"]) -> dict:
    """Both files from the run paths; raises NotARunDir before writing anything."""
    runs = find_runs(paths)
    sections = build_sections(runs, max_trial_rows)
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


# ---------------------------------------------------------------- the command


def run(args) -> int:
    """``mutransfer report`` (its arguments: analysis.cli)."""
    try:
        options = parse_options(args.overrides, {**OPTIONS, "title": args.title})
        result = write_report(args.paths, args.out, args.md, **options)
    except (NotARunDir, OptionError) as e:
        print(f"mutransfer report: {e}", file=sys.stderr)
        return 2
    for label, kinds in result["runs"]:
        print(f"  {label}: {', '.join(KIND_NAMES[k] for k in kinds)}", file=sys.stderr)
    for note in result["notes"]:
        print(f"  note: {note}", file=sys.stderr)
    print(f"wrote {result['html']} and {result['markdown']} ({result['images']} images)", file=sys.stderr)
    return 0
