"""The sweep section: what was searched, the best trial, the trials table, importances and plots.

Reads the files ``mutransfer sweep`` exported (config.json, summary.json, trials.parquet,
importances.json, plots/*.png) and never opens the study's storage, so it works on a copy of the
directory without the journal file or database.
"""

from __future__ import annotations

from analysis.report_document import Heading, Para, Table, fmt, kv_table
from analysis.report_runs import Reader, Run

PLOTS = (("optimization_history.png", "each trial's objective and the best so far"),
         ("params.png", "each searched hyperparameter against the objective"),
         ("importances.png", "parameter importances"))


def sweep_blocks(run: Run, max_trial_rows: int = 10) -> list:
    blocks: list = [Heading(run.label)]
    r = Reader(run, blocks)
    config = r.json("config.json") or {}
    if config:
        blocks += settings_blocks(config)
    summary = r.json("summary.json")
    if summary:
        blocks += summary_blocks(summary, r)
    df = r.parquet("trials.parquet")
    if df is not None:
        blocks += trials_blocks(df, max_trial_rows)
    imp = r.json("importances.json")
    usable = {}
    if imp:
        usable = {k: v for k, v in imp.items() if isinstance(v, dict) and "error" not in v}
        blocks += importance_blocks(imp, usable)
    for name, caption in PLOTS:
        fig = r.png(f"plots/{name}", caption, required=name != "importances.png" or bool(usable))
        if fig:
            blocks.append(fig)
    return blocks


def settings_blocks(config: dict) -> list:
    resolved = config.get("resolved") or {}
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
    blocks: list = [kv_table(pairs)]
    search = resolved.get("search") or {}
    if search:
        blocks.append(Table(["searched", "low", "high", "log", "step / choices"],
                            [[name, fmt(s.get("low")), fmt(s.get("high")), fmt(s.get("log", False)),
                              fmt(s.get("step", s.get("choices")))] for name, s in search.items()]))
    return blocks


def summary_blocks(summary: dict, r: Reader) -> list:
    states = summary.get("states") or {}
    blocks: list = [Para(f"{summary.get('trials_total', '?')} trial(s) of {summary.get('trials_budget', '?')}: "
                         + (", ".join(f"{n} {s.lower()}" for s, n in states.items()) or "none") + ".")]
    best = summary.get("best")
    if best:
        spread = f" (seed std {fmt(best.get('seed_std'))})" if best.get("seed_values") else ""
        blocks.append(Para(f"Best: trial {best.get('number')}, held-out loss {fmt(best.get('value'))}{spread}: "
                           + ", ".join(f"{k} = {fmt(v)}" for k, v in (best.get("params") or {}).items()),
                           status="pass"))
    else:
        r.note("the study has no complete trial")
    return blocks


def trials_blocks(df, max_rows: int) -> list:
    """The best complete trials, then the failed and pruned ones with their reasons."""
    blocks: list = []
    params = [c for c in df.columns if c.startswith("params_")]
    if "state" not in df.columns or "value" not in df.columns:
        return blocks
    complete = df[df["state"] == "COMPLETE"]
    done = complete.sort_values("value").head(max_rows)
    if len(done):
        cols = [c for c in ["number", "value", *params, "duration_s"] if c in df.columns]
        blocks.append(Table([c.removeprefix("params_") for c in cols],
                            [[fmt(row[c]) for c in cols] for _, row in done.iterrows()]))
        if len(complete) > max_rows:
            blocks.append(Para(f"(best {max_rows} complete trials of {len(complete)}; all in trials.parquet)"))
    bad = df[df["state"].isin(["FAIL", "PRUNED"])]
    if len(bad):
        blocks.append(Table(["trial", "state", "reason"],
                            [[int(row["number"]), row["state"], fmt(row.get("reason"))]
                             for _, row in bad.head(max_rows).iterrows()]))
    return blocks


def importance_blocks(imp: dict, usable: dict) -> list:
    blocks: list = [Para(f"Importance {name}: not computed ({v['error']})")
                    for name, v in imp.items() if isinstance(v, dict) and "error" in v]
    if usable:
        params = sorted({p for v in usable.values() for p in v},
                        key=lambda p: -max(v.get(p, 0) for v in usable.values()))
        blocks.append(Table(["hyperparameter", *[f"importance ({k})" for k in usable]],
                            [[p, *[fmt(v.get(p), 3) for v in usable.values()]] for p in params]))
    return blocks
