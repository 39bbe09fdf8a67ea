"""A finished (or stopped) study as files: trials.parquet, importances.json, summary.json, plots.

Importances need the study (Optuna's evaluators), so they are computed here, once, and saved;
the plots in ``analysis.sweep`` then work from the files alone.
"""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from mutransfer.rundir import write_json
from proxy_sweeps.budget import DUPLICATE_ATTR, OUTCOME_ATTR, RETRY_ATTR, account

TRIAL_COLUMNS = ("number", "state", "value", "reason", "outcome", "duplicate_of", "sampler_seed", "duration_s",
                 "tokens", "seed_values", "retry_of", "worker", "last_step", "intermediate_steps",
                 "intermediate_values", "datetime_start", "datetime_complete")


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = None
        if t.datetime_start and t.datetime_complete:
            duration = (t.datetime_complete - t.datetime_start).total_seconds()
        steps = sorted(t.intermediate_values)
        row = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value if t.state == TrialState.COMPLETE else math.nan,
            "reason": t.user_attrs.get("reason") or _lost_reason(t),
            "outcome": t.user_attrs.get(OUTCOME_ATTR),
            "duplicate_of": t.user_attrs.get(DUPLICATE_ATTR),
            "sampler_seed": t.user_attrs.get("sampler_seed"),
            "duration_s": duration,
            "tokens": t.user_attrs.get("tokens"),
            "seed_values": [float(v) for v in t.user_attrs.get("seed_values", [])],
            "retry_of": t.system_attrs.get(RETRY_ATTR),
            "worker": t.user_attrs.get("worker"),
            "last_step": steps[-1] if steps else None,
            "intermediate_steps": steps,
            "intermediate_values": [float(t.intermediate_values[s]) for s in steps],
            "datetime_start": t.datetime_start,
            "datetime_complete": t.datetime_complete,
        }
        for name, value in t.params.items():
            row[f"params_{name}"] = value
        rows.append(row)
    # A study stopped before its first trial has no rows: the columns are there all the same, so every
    # reader (plots, report, summary) sees an empty table, not a missing column.
    df = pd.DataFrame(rows) if rows else pd.DataFrame(
        {c: pd.Series(dtype=float if c in ("value", "duration_s") else object) for c in TRIAL_COLUMNS})
    for column in ("retry_of", "tokens", "last_step", "duplicate_of", "sampler_seed"):  # integers with gaps
        if column in df:
            df[column] = df[column].astype("Int64")
    return df


def importances(study: optuna.Study) -> dict:
    """Fanova and PED-ANOVA importances over the complete trials; the error text when there are too few."""
    out = {}
    for name, make in (("fanova", lambda: optuna.importance.FanovaImportanceEvaluator(seed=0)),
                       ("ped_anova", lambda: optuna.importance.PedAnovaImportanceEvaluator())):
        try:
            with warnings.catch_warnings():  # "too few trials": the values say so themselves (all equal)
                warnings.simplefilter("ignore", UserWarning)
                values = optuna.importance.get_param_importances(study, evaluator=make())
            out[name] = {k: float(v) for k, v in values.items()}
        except (ImportError, ValueError, RuntimeError, ZeroDivisionError) as e:  # too few trials, no sklearn
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return min(complete, key=lambda t: t.value, default=None)


def _lost_reason(t) -> str | None:
    if t.state == TrialState.FAIL:
        return "worker lost: no heartbeat within the grace period (killed or hung)"
    return None


def summarize(study: optuna.Study, cfg: dict, max_retries: int = 2) -> dict:
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    acc = account(trials, max_retries)
    best = best_trial(study)
    summary = {"study": cfg["study"], "storage": cfg["storage"], "trials_budget": cfg["trials"],
               "trials_total": len(trials), "states": counts, "best": None,
               "budget": {"logical_trials": acc.used, "done": acc.done, "complete": acc.complete,
                          "pruned": acc.pruned, "failed": acc.failed, "lost": acc.lost, "pending": acc.pending,
                          "retries": acc.retries, "duplicates_reasked": acc.duplicates,
                          "max_retries": max_retries}}
    if best is not None:
        seeds = best.user_attrs.get("seed_values", [])
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "seed_values": seeds,
                           "seed_std": statistics.stdev(seeds) if len(seeds) > 1 else 0.0}
    return summary


def export(study: optuna.Study, out_dir: str | Path, cfg: dict, max_retries: int = 2) -> dict:
    out = Path(out_dir)
    frame = trials_frame(study)
    tmp = out / ".trials.parquet.tmp"
    frame.to_parquet(tmp, index=False)
    tmp.replace(out / "trials.parquet")
    write_json(out / "importances.json", importances(study))
    summary = summarize(study, cfg, max_retries)
    write_json(out / "summary.json", summary)
    from analysis.sweep import plot_sweep

    plot_sweep(out)
    return summary
