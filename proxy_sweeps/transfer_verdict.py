"""The transfer-check verdict, with confidence intervals, from a run directory (the command exits on it).

Per variant and axis value: the held-out losses as a table [seed, evaluation batch, LR], the
optimum log2 LR (parabola vertex) and its bootstrap interval (``optimum_stats``). Then, by axis:

- ``width`` / ``depth``: the drift of the optimum (largest value minus smallest, in octaves) with
  its interval must lie within +-goal for the parametrization under test (``mup``; with several
  depth exponents, the one that drifts least, the others reported beside it); the shift (max - min)
  and the per-doubling slope are reported too. The ``sp`` control must drift visibly (its interval
  outside the goal), or the check could not tell muP from SP and is inconclusive. A span below
  ``min_span`` fails: the claim needs the span.
- ``steps`` (token horizon) and ``batch_size``: a power law log2 LR* = a - beta log2 value is fitted
  to the optima of all but the largest value and predicts the largest; the residual (measured -
  predicted) with its interval must lie within +-goal. "Keep the proxy's LR" (the smallest value's
  optimum) is reported beside it. For the batch axis, the first value where a law fitted to the
  smaller ones stops predicting (residual outside the goal) is reported as the critical batch.
  The law is straight least squares unless ``law_form = "weighted"``; every form (straight,
  weighted, curved) is judged by the same held-out value beside it (``mutransfer.law_forms``).

Tuning weight decay instead (``transfer.tune = "weight_decay"``, at a fixed LR), the steps and
batch axes are decided by the timescale rule (lambda eta T constant: log2 lambda* = c - log2 T,
T the steps of the run, only c fitted) predicting the largest value; the free law beside it. With
``transfer.widths`` (widths x steps) the Power Lines law decides instead (``proxy_sweeps.wd_powerlines``).

The seeds are crossed with the axis: seed s is the same initialisation seed and data order at
every value, and every run is scored on the same held-out batches. So one variant's values share
one set of bootstrap draws (the same seeds and batches drawn for every value), and the drift,
slope and law intervals keep what the values have in common -- a seed whose optimum lies high at
every value moves the level, not the shift.

Three outcomes: pass (interval inside the goal), fail (outside), inconclusive (straddles, or the
data cannot give an interval: one seed, an optimum at the edge of the LR grid, too few points),
with the number of extra seeds that would likely decide it. Exit status 0 / 1 / 3.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np

from mutransfer import optimum_stats as stats
from mutransfer.law_forms import compare_forms, form_weights, format_forms
from mutransfer.laws import rounded
from mutransfer.rundir import read_jsonl, write_json

CONTROL = "sp"


def losses_table(runs: list[dict], xs: list[float], grid_key: str = "lr_log2") -> np.ndarray:
    """[seed, evaluation batch, grid point] held-out losses (NaN where a run diverged or is missing)."""
    seeds = sorted({int(r["seed"]) for r in runs})
    widths = {len(r.get("val_batches") or []) for r in runs if r["status"] == "ok"}
    n_batches = widths.pop() if len(widths) == 1 and 0 not in widths else 1
    table = np.full((len(seeds), n_batches, len(xs)), np.nan)
    col = {float(x): i for i, x in enumerate(xs)}
    for r in runs:
        j = col.get(float(r[grid_key])) if grid_key in r else None
        if j is None or r["status"] != "ok" or r.get("loss") is None:
            continue
        values = r.get("val_batches") if n_batches > 1 else [r["loss"]]
        table[seeds.index(int(r["seed"])), :, j] = values
    return table


def _clean(obj):
    """JSON-safe: no numpy arrays (bootstrap samples are dropped), no NaN."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k not in ("samples", "raw_samples")}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _mean_curve(table: np.ndarray, n: int) -> np.ndarray:
    """Seed- and batch-mean loss per LR; NaN where any run diverged (as the bootstrap treats it)."""
    if not table.shape[0]:
        return np.full(n, np.nan)
    return table.mean(axis=(0, 1))


def _optimum(xs, table: np.ndarray, settings: dict, key: str) -> dict:
    """The optimum and its bootstrap; ``key`` seeds the draws: one key per variant, so that values
    with the same seeds and batches are resampled alike (module docstring)."""
    rng = zlib.crc32(key.encode())
    if settings["bootstrap"] == 0 or table.shape[0] < 2:
        fit = stats.fit_optimum(np.asarray(xs), _mean_curve(table, len(xs)))
        reason = "bootstrap = 0: no interval" if settings["bootstrap"] == 0 else \
            f"{table.shape[0]} seed: a bootstrap interval needs at least 2 seeds (--seeds 2 or more)"
        return {"estimate": fit["lr_log2"], "ci": None, "fit": fit, "status": "inconclusive", "reason": reason,
                "n_seeds": table.shape[0], "n_eval_batches": table.shape[1] if table.ndim == 3 else 0,
                "samples": None}
    return stats.bootstrap_optimum(xs, table, n_boot=settings["bootstrap"], rng=rng, level=settings["confidence"])


def _variant_report(runs: list[dict], xs: list[float], values: list[int], settings: dict, variant: str) -> dict:
    per_value, boots, key = {}, [], settings["grid_key"]
    for v in values:
        rs = [r for r in runs if int(r["value"]) == v]
        table = losses_table(rs, xs, key) if rs else np.full((0, 1, len(xs)), np.nan)
        boot = _optimum(xs, table, settings, variant)
        boots.append(boot)
        fit = boot.get("fit") or {}
        per_value[str(v)] = {
            key: boot.get("estimate"), "ci": boot.get("ci"), "status": boot.get("status"),
            "reason": boot.get("reason"), "method": fit.get("method"), "at_edge": fit.get("at_edge"),
            "loss": fit.get("loss"), "runs": len(rs), "diverged": sum(r["status"] == "diverged" for r in rs),
            "seeds": int(table.shape[0]), "eval_batches": int(table.shape[1]),
            "curve": _mean_curve(table, len(xs)).tolist(),
        }
    shift = stats.bootstrap_shift(boots, values, level=settings["confidence"])
    reasons = sorted({b.get("reason") for b in boots if b.get("status") == "inconclusive" and b.get("reason")})
    reason = "; ".join(reasons) or shift.get("reason")
    if shift.get("drift") is None:  # no interval (one seed, no bootstrap): the point estimates alone
        shift = _points([per_value[str(v)][key] for v in values], values, reason)
    return {"values": per_value, "boots": boots, "shift": shift.get("shift"), "drift": shift.get("drift"),
            "slope": shift.get("slope"), "shift_status": shift.get("status"), "shift_reason": reason}


def _points(est: list[float | None], values: list[int], reason: str | None) -> dict:
    if any(e is None for e in est):
        return {"shift": None, "drift": None, "slope": None, "status": "inconclusive"}
    x = np.log2(np.asarray(values, dtype=float))
    slope = float(np.polyfit(x, np.asarray(est), 1)[0])
    none = {"ci": None, "status": "inconclusive", "reason": reason}
    return {"shift": {"estimate": max(est) - min(est), **none}, "drift": {"estimate": est[-1] - est[0], **none},
            "slope": {"estimate": slope, **none}, "status": "inconclusive"}


def _width_like(report: dict, settings: dict, values: list[int]) -> dict:
    goal, axis = settings["goal"], settings["axis"]
    tested = [v for v in report if v != CONTROL] or list(report)
    decided = {v: stats.verdict({"ci": None, **(report[v]["drift"] or {}), "reason": report[v]["shift_reason"]}
                                if not (report[v]["drift"] or {}).get("ci") else report[v]["drift"], goal, "within")
               for v in tested}
    primary = min(tested, key=lambda v: (abs((report[v]["drift"] or {}).get("estimate") or math.inf)
                                         if report[v]["drift"] else math.inf))
    result = dict(decided[primary])
    reasons = [f"{primary}: drift of the optimum over the {axis} span: {result['reason']}"]
    span = values[-1] / values[0]
    control = None
    if CONTROL in report and CONTROL != primary:
        control = stats.verdict(report[CONTROL]["drift"] or {"ci": None}, goal, "within")
        if result["outcome"] == "pass" and control["outcome"] != "fail":
            result = {**result, "outcome": "inconclusive", "exit_status": stats.EXIT_INCONCLUSIVE}
            reasons.append(f"the {CONTROL} control does not drift visibly ({control['outcome']}: "
                           f"{control['reason']}); the check cannot tell {primary} from {CONTROL} here")
    if span < settings["min_span"]:
        result = {**result, "outcome": "fail", "exit_status": stats.EXIT_FAIL}
        reasons.append(f"{axis} span {span:g}x is below the {settings['min_span']:g}x the claim needs")
    return {**result, "primary": primary, "reasons": reasons, "by_variant": decided, "control": control}


def _law(report: dict, values: list[int], settings: dict) -> dict:
    """Fit on all but the largest value, predict the largest; the naive 'keep the proxy's value' beside
    it. Tuning weight decay, the timescale rule is judged too, and decides: lambda eta T constant at
    the fixed LR, so log2 lambda* = c - log2 T with T the steps of the run (only c is fitted)."""
    boots = report["boots"]
    form = settings["law_form"]
    law = stats.fit_power_law(values[:-1], boots[:-1], holdout=values[-1], holdout_samples=boots[-1],
                              level=settings["confidence"], weights=form_weights(values[:-1], form))
    law.update(draws=_draws(law), form=form)
    decided = _decide(law, settings)
    knob = "LR" if settings["grid_key"] == "lr_log2" else "weight decay"
    out = {"law": law, "decision": decided, "naive_error": report["drift"],
           "naive_note": f"error of keeping the smallest value's optimum (the proxy's {knob})"}
    if settings["grid_key"] == "wd_log2":
        steps = settings["steps_per_run"]
        rule = stats.fit_power_law(steps[:-1], boots[:-1], holdout=steps[-1], holdout_samples=boots[-1],
                                   level=settings["confidence"], beta=1.0)
        out.update(timescale=rule, decision=_decide(rule, settings),
                   timescale_note="lambda x eta x T constant: lambda* proportional to 1 / steps at the fixed LR")
    if settings["axis"] == "batch_size":
        out["critical"] = _critical(values, boots, settings)
    if settings["grid_key"] == "lr_log2":
        out["forms"] = compare_forms(values[:-1], boots[:-1], values[-1], boots[-1], configured=form,
                                     level=settings["confidence"])
    return out


# Bootstrap draws of the law's (a, beta) kept in verdict.json, so that `freeze --law` can carry them
# into the lock and `plan` can give an interval at any target: 400 pairs place a 5th/95th percentile
# to about 1 % of the interval's width, in about 7 kB at 4 significant digits (mutransfer.laws.rounded).
LAW_DRAWS = 400


def _draws(law: dict) -> dict | None:
    """The first LAW_DRAWS (independent) bootstrap pairs of (a, beta) with both finite, rounded; None
    when the fit has no draws."""
    a, beta = ((law.get(k) or {}).get("samples") for k in ("a", "beta"))
    if a is None or beta is None:
        return None
    a, beta = np.asarray(a, dtype=float), np.asarray(beta, dtype=float)
    ok = np.isfinite(a) & np.isfinite(beta)
    a, beta = a[ok][:LAW_DRAWS], beta[ok][:LAW_DRAWS]
    return {"a": [rounded(x) for x in a], "beta": [rounded(x) for x in beta]} if len(a) else None


def _decide(law: dict, settings: dict) -> dict:
    residual = law.get("residual") or {"ci": None, "reason": law.get("reason")}
    return stats.verdict(residual, settings["goal"], "within")


def _critical(values: list[int], boots: list[dict], settings: dict) -> dict:
    """The first value a law fitted to the smaller ones no longer predicts (residual outside the goal)."""
    steps = []
    for k in range(2, len(values)):
        law = stats.fit_power_law(values[:k], boots[:k], holdout=values[k], holdout_samples=boots[k],
                                  weights=form_weights(values[:k], settings["law_form"]),
                                  level=settings["confidence"])
        res = law.get("residual") or {}
        v = stats.verdict(res if res.get("ci") else {"ci": None, "reason": law.get("reason")}, settings["goal"],
                          "within")
        steps.append({"value": values[k], "residual": res.get("estimate"), "ci": res.get("ci"),
                      "outcome": v["outcome"]})
    breaks = [s["value"] for s in steps if s["outcome"] == "fail"]
    return {"residuals": steps, "critical_value": breaks[0] if breaks else None,
            "note": "the power law held over the whole range" if not breaks else
            f"the law fitted below {breaks[0]} fails to predict {breaks[0]}: the critical batch is near it"}


def judge(out_dir: str | Path, spec) -> dict:
    """verdict.json from runs.jsonl for the check ``spec`` (a proxy_sweeps.transfer.TransferSpec); returns it."""
    out = Path(out_dir)
    s = spec.settings
    settings = {"axis": s.axis, "goal": s.goal, "min_span": s.min_span, "confidence": s.confidence,
                "bootstrap": s.bootstrap, "grid_key": s.grid_key, "law_form": s.law_form,
                "steps_per_run": [spec.train_at(v).steps for v in s.values]}
    runs = read_jsonl(out / "runs.jsonl")
    xs = [float(x) for x in spec.grid]
    values = list(s.values)
    report = {}
    for variant in spec.variants:
        rs = [r for r in runs if r["variant"] == variant.name]
        report[variant.name] = _variant_report(rs, xs, values, settings, getattr(variant, "family", variant.name))
    verdict = {"axis": s.axis, "values": values, "span": values[-1] / values[0], "goal_octaves": settings["goal"],
               "confidence": s.confidence, "bootstrap": s.bootstrap, "tune": s.tune, "grid_key": s.grid_key,
               "knob": "LR" if s.tune == "lr" else "weight decay", "grid": xs, "variants": {}}
    if getattr(s, "widths", None):  # a Power Lines check: widths x steps (proxy_sweeps.wd_powerlines)
        from proxy_sweeps.wd_powerlines import judge_powerlines

        verdict["powerlines"] = judge_powerlines(spec, report)
        decision = {**verdict["powerlines"]["decision"], "outcome": verdict["powerlines"]["outcome"],
                    "exit_status": verdict["powerlines"]["exit_status"], "primary": spec.variants[-1].name,
                    "reasons": [f"the Power Lines law fitted below the largest (width, steps) predicts its weight "
                                f"decay: {verdict['powerlines']['reason']}"]}
    elif s.axis in ("width", "depth"):
        decision = _width_like(report, settings, values)
    else:
        tested = next((v for v in report if v != CONTROL), next(iter(report)))
        laws = _law(report[tested], values, settings)
        what = "the timescale rule (lambda eta T constant)" if "timescale" in laws else "the power law"
        decision = {**laws["decision"], "primary": tested,
                    "reasons": [f"{tested}: {what} fitted below {values[-1]} predicts the optimum at "
                                f"{values[-1]}: {laws['decision']['reason']}"]}
        verdict["law"] = laws
    for name, rep in report.items():
        verdict["variants"][name] = {k: v for k, v in rep.items() if k != "boots"}
    verdict.update(outcome=decision["outcome"], exit_status=decision["exit_status"],
                   extra_seeds_needed=decision.get("extra_seeds_needed"), primary=decision["primary"],
                   reasons=decision["reasons"], decision=decision)
    verdict["pass"] = verdict["outcome"] == "pass"
    verdict = _clean(verdict)
    write_json(out / "verdict.json", verdict)
    return verdict


def _octaves(o: dict | None) -> str:
    if not o or o.get("estimate") is None:
        return "-"
    ci = o.get("ci")
    return f"{o['estimate']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def format_verdict(verdict: dict) -> str:
    level = int(round(100 * verdict["confidence"]))
    key, knob = verdict.get("grid_key", "lr_log2"), verdict.get("knob", "LR")
    lines = [f"optimum log2 {knob} by {verdict['axis']} (parabola vertex, {level} % bootstrap interval):"]
    for name, info in verdict["variants"].items():
        cells = []
        for v, o in info["values"].items():
            x, ci = o[key], o["ci"]
            cell = "-" if x is None else f"{x:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
            cells.append(f"{v}: {cell}" + (" (edge)" if o.get("at_edge") else ""))
        lines.append(f"{name:>10}: " + "; ".join(cells))
        lines.append(f"{'':>10}  drift {_octaves(info['drift'])}, shift {_octaves(info['shift'])}, "
                     f"slope/doubling {_octaves(info['slope'])}")
    law = verdict.get("law")
    if law:
        fit = law["law"]
        shape = "" if fit.get("form", "straight") == "straight" else f" ({fit['form']} least squares)"
        lines.append(f"power law{shape} fitted below {verdict['values'][-1]}: beta {_octaves(fit.get('beta'))}, "
                     f"prediction at {verdict['values'][-1]} {_octaves(fit.get('prediction'))}, "
                     f"residual {_octaves(fit.get('residual'))}; keep-the-proxy's-{knob} error "
                     f"{_octaves(law.get('naive_error'))}")
        rule = law.get("timescale")
        if rule:
            lines.append(f"timescale rule (lambda eta T constant) fitted below {verdict['values'][-1]}: prediction "
                         f"{_octaves(rule.get('prediction'))}, residual {_octaves(rule.get('residual'))}")
        if law.get("critical"):
            lines.append(f"critical batch: {law['critical']['note']}")
        if law.get("forms"):
            lines += format_forms(law["forms"])
    if verdict.get("powerlines"):
        from proxy_sweeps.wd_powerlines import format_powerlines

        lines += format_powerlines(verdict["powerlines"])
    extra = verdict.get("extra_seeds_needed")
    more = f" (about {extra} more seeds would likely decide it: --seeds)" if extra else ""
    lines.append(f"verdict: {verdict['outcome'].upper()}{more}: " + "; ".join(verdict["reasons"]))
    return "\n".join(lines)
