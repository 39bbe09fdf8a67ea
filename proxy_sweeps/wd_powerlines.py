"""The Power Lines check's verdict: weight decay over model widths x token horizons (``transfer.widths``).

A transfer check along ``steps`` tuning the weight decay at a fixed base LR, with ``transfer.widths``,
runs every width at every horizon (each width is a variant of the check: its runs, resume and progress
are the one-axis check's). Per (N, D) point the optimum log2 lambda and its bootstrap draws come from
``proxy_sweeps.transfer_verdict`` (the draws of one family resample the same seeds and batches at every
point, so they pair up draw by draw); ``mutransfer.wd_law`` fits tau_opt = c (D/N)^m on every point but
the largest (N, D) and predicts that one. The verdict is the prediction's error against the goal, beside
the timescale rule (lambda eta T constant from the smallest point) and keeping the smallest point's
lambda. ``mutransfer freeze --law DIR`` carries the fitted law into the lock.
"""

from __future__ import annotations

from mutransfer import optimum_stats as stats
from mutransfer.plan import count_params
from mutransfer.wd_law import Point, judge_held_out


def points_of(spec, report: dict) -> tuple[list[Point], list[str]]:
    """One point per (width, steps), widths then steps ascending (the held-out largest last), and the
    names of points whose optimum is not established (an optimum at the grid's edge, too few seeds)."""
    points, unsure = [], []
    for variant in spec.variants:
        boots = report[variant.name]["boots"]
        for value, boot in zip(spec.settings.values, boots, strict=True):
            train = spec.train_at(value)
            params = count_params(spec.shape_at(variant, value))["params_total"]
            points.append(Point(params=params, tokens=train.steps * train.tokens_per_step, steps=train.steps,
                                wd_log2=boot.get("estimate"), draws=boot.get("samples")))
            if boot.get("status") == "inconclusive" or (boot.get("fit") or {}).get("at_edge"):
                unsure.append(f"width {variant.width} x {value} steps")
    return points, unsure


def judge_powerlines(spec, report: dict) -> dict:
    """The ``powerlines`` part of verdict.json and its decision (outcome, exit_status, reason)."""
    s = spec.settings
    points, unsure = points_of(spec, report)
    held = points.pop()
    try:
        result = judge_held_out(points, held, spec.hparams.lr, s.goal, s.confidence)
    except ValueError as e:
        decision = stats.verdict(None, s.goal, "within") | {"reason": str(e)}
        return {"outcome": decision["outcome"], "exit_status": decision["exit_status"], "reason": str(e),
                "decision": decision, "unsure_points": unsure}
    if unsure:
        # a law fitted on (or judged against) an optimum that is only a bound, at the grid's edge: its
        # prediction is not established either way, as a one-axis check with an optimum at the edge
        would = "" if result["outcome"] == "inconclusive" else f"the law's prediction would {result['outcome']}: "
        result.update(outcome="inconclusive", exit_status=stats.EXIT_INCONCLUSIVE,
                      reason=f"{would}{result['reason']}; but the optimum is not established at {', '.join(unsure)} "
                             "(at the weight-decay grid's edge or too few seeds: widen the grid, or the loss does "
                             "not depend on lambda there)")
    result["unsure_points"] = unsure
    result["widths"] = list(s.widths)
    return result


def _octaves(o: dict | None) -> str:
    if not o or o.get("estimate") is None:
        return "-"
    ci = o.get("ci")
    return f"{o['estimate']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def format_powerlines(result: dict) -> list[str]:
    fit = result.get("fit")
    if not fit:
        return [f"Power Lines law: not fitted ({result.get('reason')})"]
    held = result["held_out"]
    errors = result["errors"]
    return [f"Power Lines law tau_opt = c (D/N)^m, tau = 1/(eta lambda steps): log2 c {_octaves(fit['log2_c'])}, "
            f"m {_octaves(fit['m'])}",
            f"held-out error at {held['tpp']:.3g} tokens/parameter ({held['steps']} steps), measured - predicted "
            f"log2 lambda: law {_octaves(errors['power_lines'])}; timescale rule {_octaves(errors['timescale'])}; "
            f"keep the proxy's lambda {_octaves(errors['keep_proxy'])}"]
