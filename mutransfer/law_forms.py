"""Which shape of horizon law extrapolates best: a straight power law against two alternatives.

The token-horizon law log2 LR*(T) = a - beta log2 T is a straight line in log T. Its held-out error
has stayed negative in every look (the optimum falls faster at longer horizons), so two alternatives
are fitted to the same optima and judged by the same held-out value:

- ``weighted``: the straight line, least squares weighted by T (a doubling of the horizon doubles a
  point's weight), so the slope is read mostly off the longest horizons;
- ``curved``: log2 LR* quadratic in log2 T (through three fitted horizons exactly), the curvature
  carried to the held-out horizon.

Each bootstrap draw of the optima (paired across horizons) gives a draw of every form's prediction,
so the held-out errors and their paired differences have intervals. The straight law stays the
default unless another form's absolute held-out error is smaller with the paired difference's
interval entirely below 0: a shape is adopted on evidence, not on one lucky estimate.
"""

from __future__ import annotations

import math

import numpy as np

from mutransfer.optimum_stats import DEFAULT_LEVEL, _interval, _per_value, _residual, _summary

FORMS = ("straight", "weighted", "curved")
DEFAULT_FORM = "straight"


def _design(log_axis: np.ndarray, form: str) -> np.ndarray:
    """Columns of the least-squares fit: 1, log2 T (and (log2 T)^2 for the curved form)."""
    cols = [np.ones_like(log_axis), log_axis] + ([log_axis ** 2] if form == "curved" else [])
    return np.stack(cols, axis=1)


def _weights(axis: np.ndarray, form: str) -> np.ndarray:
    return axis / axis.max() if form == "weighted" else np.ones_like(axis)


def _predictor(axis: np.ndarray, holdout: float, form: str) -> np.ndarray:
    """The row vector r with prediction = optima @ r: a weighted least-squares fit is linear in the optima."""
    x = np.log2(axis)
    design, w = _design(x, form), _weights(axis, form)
    coef_map = np.linalg.solve(design.T @ (w[:, None] * design), design.T * w)  # (k, V)
    return _design(np.array([math.log2(holdout)]), form)[0] @ coef_map


def fit_form(axis_values, per_value_samples, holdout: float, holdout_samples=None, form: str = DEFAULT_FORM,
             level: float = DEFAULT_LEVEL) -> dict:
    """One form's prediction at ``holdout`` and, with holdout_samples, its held-out residual
    (measured - predicted, draw by draw), as ``fit_power_law`` gives them for the straight law."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    axis, est, samples, _, reason, plan = _per_value(axis_values, per_value_samples)
    need = 3 if form == "curved" else 2
    out = {"form": form, "axis_values": axis.tolist(), "holdout": holdout, "prediction": None, "residual": None,
           "status": plan["status"], "reason": reason}
    if len(np.unique(axis)) < need:
        return {**out, "status": "inconclusive", "reason": f"the {form} law needs optima at {need} distinct values"}
    if samples is None:
        return out
    r = _predictor(axis, holdout, form)
    out["prediction"] = _summary(float(est @ r), samples @ r, level, plan)
    if holdout_samples is not None:
        out["residual"] = _residual(out["prediction"], holdout_samples, level)
    return out


def compare_forms(axis_values, per_value_samples, holdout: float, holdout_samples,
                  level: float = DEFAULT_LEVEL) -> dict:
    """Every form's held-out error and the choice: the straight law unless another beats it (see the
    module docstring). Returns forms (name -> estimate, interval, |error|), chosen and reason."""
    fits = {f: fit_form(axis_values, per_value_samples, holdout, holdout_samples, f, level) for f in FORMS}
    rows, abs_draws = {}, {}
    for name, fit in fits.items():
        res = fit.get("residual") or {}
        s = res.get("samples")
        rows[name] = {"residual": res.get("estimate"), "ci": res.get("ci"),
                      "abs_error": None if res.get("estimate") is None else abs(res["estimate"]),
                      "reason": fit.get("reason") if s is None else None}
        if s is not None:
            abs_draws[name] = np.abs(np.asarray(s, dtype=float))
    base = abs_draws.get(DEFAULT_FORM)
    winners = []
    for name in FORMS[1:]:
        if base is None or name not in abs_draws:
            continue
        n = min(len(base), len(abs_draws[name]))
        diff = abs_draws[name][:n] - base[:n]
        lo, hi = _interval(diff, level)
        rows[name]["vs_straight"] = {"estimate": rows[name]["abs_error"] - rows[DEFAULT_FORM]["abs_error"],
                                     "ci": [lo, hi]}
        if hi < 0:
            winners.append(name)
    if base is None:
        return {"forms": rows, "chosen": DEFAULT_FORM, "holdout": holdout, "level": level,
                "reason": "the straight law has no held-out error; it stays the default"}
    if not winners:
        return {"forms": rows, "chosen": DEFAULT_FORM, "holdout": holdout, "level": level,
                "reason": f"no other form has a smaller held-out error at {holdout:g} with its paired "
                          f"difference's {level:.0%} interval below 0; the straight law stays the default"}
    best = min(winners, key=lambda f: rows[f]["abs_error"])
    diff = rows[best]["vs_straight"]
    return {"forms": rows, "chosen": best, "holdout": holdout, "level": level,
            "reason": f"the {best} law's held-out error at {holdout:g} is smaller than the straight law's "
                      f"(paired difference {diff['estimate']:+.3f} octave, {level:.0%} interval "
                      f"[{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}])"}


def format_forms(comparison: dict) -> list[str]:
    """Lines for the transfer check's report."""
    lines = [f"horizon law shapes, held-out error at {comparison['holdout']:g} (measured - predicted, octave):"]
    for name, row in comparison["forms"].items():
        if row["residual"] is None:
            lines.append(f"  {name:<9} no prediction ({row['reason']})")
            continue
        ci = row["ci"] or [math.nan, math.nan]
        lines.append(f"  {name:<9} {row['residual']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]")
    lines.append(f"  chosen: {comparison['chosen']} ({comparison['reason']})")
    return lines
