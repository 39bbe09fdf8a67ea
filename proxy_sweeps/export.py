"""A finished (or stopped) study as files: trials.parquet, importances.json, summary.json, plots.

Importances need the study (Optuna's evaluators), so they are computed here, once, and saved;
the plots in ``analysis.sweep`` then work from the files alone.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

RETRY_ATTR = "failed_trial"


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
            "reason": t.user_attrs.get("reason"),
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
    df = pd.DataFrame(rows)
    for column in ("retry_of", "tokens", "last_step"):  # integers with gaps, not floats
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


def summarize(study: optuna.Study, cfg: dict) -> dict:
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    best = best_trial(study)
    summary = {"study": cfg["study"], "storage": cfg["storage"], "trials_budget": cfg["trials"],
               "trials_total": len(trials), "states": counts, "best": None}
    if best is not None:
        seeds = best.user_attrs.get("seed_values", [])
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "seed_values": seeds,
                           "seed_std": statistics.stdev(seeds) if len(seeds) > 1 else 0.0}
    return summary


def export(study: optuna.Study, out_dir: str | Path, cfg: dict) -> dict:
    out = Path(out_dir)
    trials_frame(study).to_parquet(out / "trials.parquet", index=False)
    (out / "importances.json").write_text(json.dumps(importances(study), indent=2) + "\n")
    summary = summarize(study, cfg)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    from analysis.sweep import plot_sweep

    plot_sweep(out)
    return summary
