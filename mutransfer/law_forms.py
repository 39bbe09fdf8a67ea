"""Which shape of horizon law extrapolates best: a straight power law against two alternatives.

The token-horizon law log2 LR*(T) = a - beta log2 T is a straight line in log T. Its held-out error
has stayed negative in every look (the optimum falls faster at longer horizons), so two alternatives
are fitted to the same optima and judged by the same held-out value:

- ``weighted``: the straight line, least squares weighted by T (a doubling of the horizon doubles a
  point's weight), so the slope is read mostly off the longest horizons;
- ``curved``: log2 LR* quadratic in log2 T (through three fitted horizons exactly), the curvature
  carried to the held-out horizon.

Each bootstrap draw of the optima (paired across horizons) gives a draw of every form's prediction,
so the held-out errors and their paired differences have intervals. The check fits the form it is
told (``[transfer] law_form``, straight by default) and judges it; beside it, another form is called
better only when its absolute held-out error is smaller with the paired difference's interval
entirely below 0 -- a shape is adopted on evidence, not on one lucky estimate. Only the straight-line
forms can be carried to a target (a lock holds a, beta); the curved one is reported, not carried.
"""

from __future__ import annotations

import math

import numpy as np

from mutransfer.optimum_stats import DEFAULT_LEVEL, _interval, _per_value, _residual, _summary, fit_power_law

FORMS = ("straight", "weighted", "curved")
LINE_FORMS = ("straight", "weighted")  # the forms a lock can carry: a straight line in log-log, (a, beta)
DEFAULT_FORM = "straight"


def form_weights(axis_values, form: str) -> np.ndarray | None:
    """The least-squares weights of a straight-line form: none, or proportional to the axis value."""
    axis = np.asarray(axis_values, dtype=float)
    return axis / axis.max() if form == "weighted" else None


def _curved_predictor(axis: np.ndarray, holdout: float) -> np.ndarray:
    """The row vector r with prediction = optima @ r for the quadratic in log2 T (linear in the optima)."""
    x = np.log2(axis)
    design = np.stack([np.ones_like(x), x, x * x], axis=1)
    coef_map = np.linalg.pinv(design)  # (3, V): least squares, exact through three values
    h = math.log2(holdout)
    return np.array([1.0, h, h * h]) @ coef_map


def fit_form(axis_values, per_value_samples, holdout: float, holdout_samples=None, form: str = DEFAULT_FORM,
             level: float = DEFAULT_LEVEL) -> dict:
    """One form's fit, its prediction at ``holdout`` and, with holdout_samples, its held-out residual
    (measured - predicted, draw by draw). The straight-line forms are ``fit_power_law`` (with a and
    beta); the curved one has a prediction and a residual only."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form in LINE_FORMS:
        fit = fit_power_law(axis_values, per_value_samples, holdout=holdout, holdout_samples=holdout_samples,
                            level=level, weights=form_weights(axis_values, form))
        return {**fit, "form": form}
    axis, est, samples, _, reason, plan = _per_value(axis_values, per_value_samples)
    out = {"form": form, "axis_values": axis.tolist(), "holdout": holdout, "prediction": None, "residual": None,
           "status": plan["status"], "reason": reason}
    if len(np.unique(axis)) < 3:
        return {**out, "status": "inconclusive", "reason": "the curved law needs optima at 3 distinct values"}
    if samples is None:
        return out
    r = _curved_predictor(axis, holdout)
    out["prediction"] = _summary(float(est @ r), samples @ r, level, plan)
    if holdout_samples is not None:
        out["residual"] = _residual(out["prediction"], holdout_samples, level)
    return out


def compare_forms(axis_values, per_value_samples, holdout: float, holdout_samples, configured: str = DEFAULT_FORM,
                  level: float = DEFAULT_LEVEL) -> dict:
    """Every form's held-out error beside the ``configured`` one's, and which to use: another form is
    better when its absolute error is smaller with the paired difference's interval below 0; the
    recommendation is the best straight-line form (a lock carries only those). Returns forms (name ->
    residual, ci, abs_error, vs_configured), configured, better, recommended and reason."""
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
    base = abs_draws.get(configured)
    better = []
    for name in FORMS:
        if name == configured or base is None or name not in abs_draws:
            continue
        n = min(len(base), len(abs_draws[name]))
        lo, hi = _interval(abs_draws[name][:n] - base[:n], level)
        rows[name]["vs_configured"] = {"estimate": rows[name]["abs_error"] - rows[configured]["abs_error"],
                                       "ci": [lo, hi]}
        if hi < 0:
            better.append(name)
    out = {"forms": rows, "configured": configured, "better": better, "holdout": holdout, "level": level}
    if base is None:
        return {**out, "recommended": configured,
                "reason": f"the {configured} law has no held-out error to compare; keep it"}
    carried = [f for f in better if f in LINE_FORMS]
    if not carried:
        note = "" if not better else (f"; the {better[0]} law is better here but is not carried to a target "
                                      "(a lock holds a straight line in log-log: a curvature extrapolated "
                                      "thousands of times past its data is not a prediction)")
        return {**out, "recommended": configured,
                "reason": f"no straight-line form has a smaller held-out error at {holdout:g} with its paired "
                          f"difference's {level:.0%} interval below 0: keep the {configured} law{note}"}
    best = min(carried, key=lambda f: rows[f]["abs_error"])
    diff = rows[best]["vs_configured"]
    return {**out, "recommended": best,
            "reason": f"the {best} law's held-out error at {holdout:g} is smaller than the {configured} law's "
                      f"(paired difference {diff['estimate']:+.3f} octave, {level:.0%} interval "
                      f"[{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}]): set [transfer] law_form = '{best}'"}


def format_forms(comparison: dict) -> list[str]:
    """Lines for the transfer check's report."""
    lines = [f"law shapes, held-out error at {comparison['holdout']:g} (measured - predicted, octave; "
             f"the check's law is {comparison['configured']}):"]
    for name in FORMS:  # in this order (a verdict read back from JSON has its keys sorted)
        row = comparison["forms"].get(name)
        if row is None:
            continue
        if row["residual"] is None:
            lines.append(f"  {name:<9} no prediction ({row['reason']})")
            continue
        ci = row["ci"] or [math.nan, math.nan]
        lines.append(f"  {name:<9} {row['residual']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]")
    lines.append(f"  recommended: {comparison['recommended']} ({comparison['reason']})")
    return lines
