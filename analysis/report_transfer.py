"""The transfer section: does the optimal base LR (or weight decay) stay put along the axis, and how sure?

Shows what ``mutransfer transfer-check`` wrote: the check's settings (config.json); from
verdict.json each variant's optimum at every axis value with its confidence interval, the drift
and shift of the optimum with theirs, the outcome (pass / fail / inconclusive, and how many more
seeds would likely decide it), and for the token-horizon and batch axes the fitted power law and
its error against keeping the proxy's LR; the state of the runs (runs.jsonl); transfer.png.
The verdict is the command's (proxy_sweeps.transfer_verdict); nothing is re-fitted here.
"""

from __future__ import annotations

from analysis.report_document import Heading, Para, Table, fmt, kv_table
from analysis.report_runs import Reader, Run

CONTROL = "sp"  # the variant that must drift: it shows the check can tell muP from SP
LAW_AXES = ("steps", "batch_size")


def transfer_blocks(run: Run) -> list:
    blocks: list = [Heading(run.label)]
    r = Reader(run, blocks)
    config = r.json("config.json") or {}
    if config:
        blocks.append(settings_table(config))
    verdict = r.json("verdict.json")
    if verdict is not None and "variants" not in verdict:
        r.note("verdict.json has no per-variant optima (written by an older transfer-check); its verdict is not "
               "shown: rerun the check into a new directory")
    elif verdict is not None:
        blocks += verdict_blocks(verdict, seeds=((config.get("spec") or {}).get("transfer") or {}).get("seeds"))
    rows = r.jsonl("runs.jsonl")
    if rows is not None:
        blocks += runs_blocks(rows, r)
    axis = (verdict or {}).get("axis") or "axis"
    law = ", and the fitted power law" if (verdict or {}).get("law") else ""
    fig = r.png("transfer.png", f"held-out loss against log2 LR, a line per {axis} value, each optimum starred "
                                f"with its interval{law}")
    if fig:
        blocks.append(fig)
    return blocks


# ---------------------------------------------------------------- numbers with intervals


def _ci(d: dict) -> list | None:
    ci = d.get("ci")
    return ci if isinstance(ci, list) and len(ci) == 2 and None not in ci else None


def lr_cell(o: dict, key: str = "lr_log2") -> str:
    """An optimum as a power of two, its interval in log2: ``2^-5.92 [-6.20, -5.70]`` (``key``: the
    verdict's grid key, ``lr_log2`` or ``wd_log2``)."""
    if o.get(key) is None:
        return "-"
    ci = _ci(o)
    return f"2^{o[key]:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def est_cell(d: dict | None, sign: bool = True) -> str:
    """An estimate with its interval (octaves, or beta): ``-0.33 [-1.14, +0.17]``."""
    if not isinstance(d, dict) or d.get("estimate") is None:
        return "-"
    f = "+.2f" if sign else ".2f"
    ci = _ci(d)
    return f"{d['estimate']:{f}}" + (f" [{ci[0]:{f}}, {ci[1]:{f}}]" if ci else "")


# ---------------------------------------------------------------- the check's settings


def settings_table(config: dict) -> Table:
    spec = config.get("spec") or {}
    s, train = spec.get("transfer") or {}, spec.get("train") or {}
    grid = config.get("grid") or config.get("lr_log2") or []
    knob = "LR" if config.get("tune", "lr") == "lr" else "weight decay"
    variants = list(s.get("parametrizations") or [])
    if s.get("depth_alphas"):
        variants.append(f"mup depth exponents {fmt(s['depth_alphas'])}")
    pairs = [("axis", s.get("axis", "width")), ("values", s.get("values") or s.get("widths")),
             ("variants", variants or None),
             (f"log2 {knob} grid", f"{fmt(grid[0])} .. {fmt(grid[-1])} ({len(grid)} points)" if grid else None),
             ("fixed base LR", (spec.get("hparams") or {}).get("lr") if knob != "LR" else None),
             ("seeds", s.get("seeds")), ("model", (spec.get("model") or {}).get("preset")),
             ("steps per run", train.get("steps") if s.get("axis") not in LAW_AXES else "the axis"),
             ("batch x seq", f"{train.get('batch_size')} x {train.get('seq_len')}" if train else None),
             ("tokens per run", s.get("tokens")), ("evaluation batches", train.get("eval_batches"))]
    return kv_table((k, v) for k, v in pairs if v is not None)


# ---------------------------------------------------------------- the verdict


def verdict_blocks(v: dict, seeds: int | None = None) -> list:
    axis, values = v.get("axis") or "width", [str(x) for x in v.get("values") or []]
    outcome = str(v.get("outcome") or ("pass" if v.get("pass") else "fail")).lower()
    blocks: list = [Para(f"Transfer verdict ({axis}): {outcome.upper()}: " + "; ".join(v.get("reasons") or []),
                         status=outcome)]
    extra = v.get("extra_seeds_needed")
    if extra:
        total = f" (`--seeds {seeds + extra}`)" if isinstance(seeds, int) else " (`--seeds`)"
        blocks.append(Para(f"About {extra} more seed(s) would likely decide the interval of "
                           f"{v.get('primary', 'the tested variant')}{total}."))
    blocks.append(Para(goal_text(v, axis)))
    blocks.append(optima_table(v, axis, values))
    notes = [f"{name} at {axis} {x}: {o['reason']}" for name, info in (v.get("variants") or {}).items()
             for x in values if (o := (info.get("values") or {}).get(x) or {}).get("reason")]
    if notes:
        blocks.append(Para("No interval or an inconclusive optimum: " + "; ".join(notes) + "."))
    if v.get("law"):
        blocks += law_blocks(v, axis, values)
    return blocks


def goal_text(v: dict, axis: str) -> str:
    goal, level = fmt(v.get("goal_octaves")), f"{round(100 * float(v.get('confidence') or 0.9))} %"
    knob = v.get("knob", "LR")
    how = (f"Optimum: parabola vertex in log2 {knob}, with a {level} bootstrap interval over seeds and evaluation "
           f"batches; (edge): the best grid point is an end of the {knob} grid, so the optimum may lie outside it.")
    if axis in LAW_AXES and (v.get("law") or {}).get("timescale"):
        return (f"Goal: the weight-decay timescale rule (lambda x eta x T constant at the fixed LR: the optimum "
                f"falls as 1 / steps), fitted to the optima at all but the largest {axis}, predicts the optimum "
                f"there within +-{goal} octave ({level} interval of the residual); the free power law beside it. "
                + how)
    if axis in LAW_AXES:
        return (f"Goal: a power law log2 {knob}* = a - beta log2 {axis}, fitted to the optima at all but the "
                f"largest {axis}, predicts the optimum there within +-{goal} octave ({level} interval of the "
                "residual). " + how)
    return (f"Goal: the drift of the optimum (largest {axis} minus smallest, span {fmt(v.get('span'))}x) within "
            f"+-{goal} octave for the tested variant ({level} interval); the {CONTROL} control must drift outside "
            "it. " + how)


def optima_table(v: dict, axis: str, values: list[str]) -> Table:
    decision = v.get("decision") or {}
    decided = decision.get("by_variant") or {}
    control = decision.get("control")
    rows = []
    for name, info in (v.get("variants") or {}).items():
        per_value = info.get("values") or {}
        row = [name + (" (tested)" if name == v.get("primary") else " (control)" if name == CONTROL else "")]
        row += [optimum_cell(per_value.get(x) or {}, v.get("grid_key", "lr_log2")) for x in values]
        row += [est_cell(info.get("drift")), est_cell(info.get("shift")), est_cell(info.get("slope"))]
        if name in decided:
            row.append(str(decided[name].get("outcome", "-")).upper())
        elif name == CONTROL and control:
            row.append({"fail": "drifts visibly", "pass": "does not drift",
                        "inconclusive": "undecided"}.get(control.get("outcome"), "-"))
        else:
            row.append("-")
        rows.append(row)
    knob = v.get("knob", "LR")
    headers = ["variant", *[f"optimum {knob}, {axis} {x}" for x in values], "drift (octaves)",
               "shift (octaves)", "slope (octaves per doubling)", "drift within goal"]
    if not decided and not control:  # the law axes decide by the law, below
        headers, rows = headers[:-1], [row[:-1] for row in rows]
    return Table(headers, rows)


def optimum_cell(o: dict, key: str = "lr_log2") -> str:
    cell = lr_cell(o, key)
    if o.get("at_edge"):
        cell += " (edge)"
    if o.get("method") == "grid argmin":
        cell += " (grid point)"
    if o.get("diverged"):
        cell += f" ({o['diverged']} diverged)"
    return cell


def _shape_order(item: tuple) -> int:
    """The law shapes as the check lists them: straight, weighted, curved (others after)."""
    order = ("straight", "weighted", "curved")
    return order.index(item[0]) if item[0] in order else len(order)


def law_blocks(v: dict, axis: str, values: list[str]) -> list:
    """The power law fitted below the largest value, its prediction there, and the naive rule beside it."""
    laws = v.get("law") or {}
    fit, decision = laws.get("law") or {}, laws.get("decision") or {}
    hold = str(fit.get("holdout") or (values[-1] if values else "?"))
    primary = v.get("primary")
    measured = (((v.get("variants") or {}).get(primary) or {}).get("values") or {}).get(hold) or {}
    prediction = fit.get("prediction") or {}
    key, knob = v.get("grid_key", "lr_log2"), v.get("knob", "LR")
    rule = laws.get("timescale") or {}
    rows = [[f"beta (log2 {knob}* = a - beta log2 {axis})", est_cell(fit.get("beta"), sign=False)],
            ["a", est_cell(fit.get("a"), sign=False)],
            [f"predicted optimum at {axis} {hold}", lr_cell({key: prediction.get("estimate"),
                                                             "ci": prediction.get("ci")}, key)],
            [f"measured optimum at {axis} {hold} ({primary})", lr_cell(measured, key)],
            ["residual, measured - predicted (octaves)", est_cell(fit.get("residual"))]]
    if rule:
        rows += [[f"timescale rule's prediction at {axis} {hold}",
                  lr_cell({key: (rule.get("prediction") or {}).get("estimate"),
                           "ci": (rule.get("prediction") or {}).get("ci")}, key)],
                 ["timescale rule's residual (octaves)", est_cell(rule.get("residual"))]]
    rows += [[f"error of keeping the proxy's {knob} ({axis} {values[0] if values else '?'}) at {hold} (octaves)",
              est_cell(laws.get("naive_error"))],
             [f"{'timescale rule' if rule else 'residual'} within +-{fmt(v.get('goal_octaves'))} octave",
              str(decision.get("outcome", "-")).upper()]]
    blocks: list = [Table([f"power law fitted below {axis} {hold}", "estimate [interval]"], rows)]
    if fit.get("reason"):
        blocks.append(Para(f"Power law: {fit['reason']}."))
    critical = laws.get("critical")
    if critical:
        blocks.append(Table([f"{axis} predicted by the law fitted below it", "residual (octaves)", "verdict"],
                            [[fmt(s.get("value")), est_cell({"estimate": s.get("residual"), "ci": s.get("ci")}),
                              str(s.get("outcome", "-")).upper()] for s in critical.get("residuals") or []]))
        found = critical.get("critical_value")
        blocks.append(Para(f"Critical batch: {critical.get('note', '-')}"
                           + (f" (about {found})." if found is not None else ".")))
    forms = laws.get("forms")
    if forms:
        blocks.append(Table([f"law shape (the check's: {forms.get('configured', '-')})",
                             f"held-out error at {axis} {hold} (octaves)", "|error| minus the check's"],
                            [[name, est_cell({"estimate": row.get("residual"), "ci": row.get("ci")}),
                              est_cell(row.get("vs_configured"))]
                             for name, row in sorted((forms.get("forms") or {}).items(), key=_shape_order)]))
        blocks.append(Para(f"Recommended law shape: {forms.get('recommended', '-')} ({forms.get('reason', '-')})."))
    return blocks


# ---------------------------------------------------------------- the runs


def runs_blocks(rows: list[dict], r: Reader) -> list:
    statuses: dict[str, int] = {}
    variants: dict[str, int] = {}
    for row in rows:
        statuses[str(row.get("status"))] = statuses.get(str(row.get("status")), 0) + 1
        name = str(row.get("variant", row.get("parametrization")))
        variants[name] = variants.get(name, 0) + 1
    text = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "no complete record"
    by_variant = f" ({', '.join(f'{name} {n}' for name, n in variants.items())})" if len(variants) > 1 else ""
    errors = [row for row in rows if row.get("status") == "error"]
    if errors:
        r.note(f"{len(errors)} run(s) ended with an error (see runs.jsonl), e.g. {errors[0].get('reason')}")
    return [Para(f"runs.jsonl: {len(rows)} run(s){by_variant}: {text}.")]
