"""The coordinate-check section: the verdict ``mutransfer coord-check`` wrote, and its figure.

Shows, per parametrization (the one under test, then its controls), the summary line and the
slope of every module at every step against the axis (width or depth), from verdict.json; the
shape of coord.parquet; and coord.png. Nothing is re-fitted here: the verdict is the command's.
"""

from __future__ import annotations

from analysis.report_document import Heading, Para, Table, fmt, kv_table, passed
from analysis.report_runs import Reader, Run

CONFIG_KEYS = ("preset", "axis", "widths", "depths", "steps", "seeds", "optimizer", "param", "compare", "precision",
               "lr", "threshold", "statistic", "batch_size", "seq_len")


def coord_blocks(run: Run) -> list:
    blocks: list = [Heading(run.label)]
    r = Reader(run, blocks)
    config = r.json("config.json") or {}
    if config:
        blocks.append(kv_table((k, config[k]) for k in CONFIG_KEYS if config.get(k) not in (None, [])))
    verdict = r.json("verdict.json")
    axis = config.get("axis") or "width"
    if verdict:
        axis = verdict.get("axis") or axis
        verdicts = [verdict, *(verdict.get("compare") or {}).values()]
        blocks += [Para(summary_line(v, i, verdict), status=passed(bool(v.get("passed"))))
                   for i, v in enumerate(verdicts)]
        if verdict.get("rule"):
            blocks.append(Para(f"Rule: {verdict['rule']}."))
        blocks += [slope_table(v) for v in verdicts]
    df = r.parquet("coord.parquet")
    if df is not None:
        column = axis if axis in df.columns else "width"
        values = sorted(df[column].unique().tolist()) if column in df.columns else []
        count = lambda c: df[c].nunique() if c in df.columns else "?"
        blocks.append(Para(f"coord.parquet: {len(df)} records, {column}s {fmt(values)}, {count('seed')} seed(s), "
                           f"{count('step')} step(s)."))
    fig = r.png("coord.png", f"size against {axis} per module (log2-log2), one panel per step; seed bands")
    if fig:
        blocks.append(fig)
    return blocks


def summary_line(v: dict, i: int, verdict: dict) -> str:
    """The command's own line for a verdict (newer files carry it in the verdict, older in a list)."""
    summaries = verdict.get("summary") or []
    line = v.get("summary_line") or (summaries[i] if i < len(summaries) else None)
    return line or f"{v.get('param')}: {'PASS' if v.get('passed') else 'FAIL'}"


def slope_table(v: dict) -> Table:
    modules = v.get("modules") or {}
    steps = [str(s) for s in v.get("steps") or sorted({int(t) for m in modules.values() for t in m.get("slopes", {})})]
    rows = []
    for name, m in modules.items():
        slopes = m.get("slopes", {})
        rows.append([name, *[fmt(slopes.get(s), 3) for s in steps], fmt(m.get("failed_steps") or None),
                     "PASS" if m.get("passed") else "FAIL"])
    axis = v.get("axis") or "width"
    return Table([f"{v.get('param', '?')}: module", *[f"slope vs {axis}, step {s}" for s in steps], "failed steps",
                  "verdict"], rows)
