"""Weight decay by the Power Lines law: the optimal AdamW timescale is a power law in tokens per parameter.

Definition (Bergsma et al. 2025, "Power Lines", arXiv 2505.13738, section 2): AdamW with decoupled
decay is an exponential moving average of the updates with smoothing eta * lambda, so its timescale
in iterations is ``tau_iter = 1 / (eta lambda)``; as a fraction of the run (S = D / B iterations, D
the run's sequences, B sequences per step) it is

    tau = tau_iter / S = B / (eta lambda D) = 1 / (eta lambda S).

The timescale rule (Wang & Aitchison, arXiv 2405.13698) holds tau constant. Power Lines measures
instead that the optimal tau is a power law in tokens per parameter,

    tau_opt = c (D / N)^m,   m < 0 in the paper,

D in tokens and N the model's parameters (``mutransfer.plan.count_params``' ``params_total``). Here
eta and lambda are the *base* LR and weight decay (``hparams.lr``, ``hparams.weight_decay``): under the
muP table lr x wd of every group is width- and depth-free (``mutransfer.parametrization``), so the
base product is every AdamW group's timescale. S is the run's total optimizer steps.

The fit (``fit_power_lines``): log2 tau_opt = log2 c + m log2(D / N) by least squares through the
measured optima at several (N, D) points at one fixed eta; each bootstrap draw (one optimum per point,
draw i of every point together: the checks' seeds are crossed with the points) gives one (c, m), and
their percentiles are the intervals. The prediction at a target (``predict_wd_log2``):

    log2 lambda = -log2 eta - log2 S - log2 tau_opt(D / N).

``judge_held_out`` predicts a held-out point and judges the error against a goal in octaves, beside
two baselines from the smallest point (the proxy): the timescale rule (lambda eta S constant) and
keeping the proxy's lambda. ``WeightDecayLaw`` is the lock's entry (``mutransfer freeze --law``) and
``weight_decay_at_target`` what ``[transfer] weight_decay = "fitted"`` applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from mutransfer import optimum_stats as stats
from mutransfer.config import Config, ConfigError, PosFloat, parse

LEVEL = 0.9  # the intervals' confidence
MIN_DRAWS = 20  # fewer paired draws cannot place a 5th and a 95th percentile
KEPT_DRAWS = 400  # draws of (log2 c, m) kept in verdict.json and the lock (as the LR laws keep theirs)
Interval = Annotated[list[float], Field(min_length=2, max_length=2)]
# How far past the largest tokens per parameter it was fitted at the law may be carried before plan warns:
# the LR laws' limit (mutransfer.laws.EXTRAPOLATION_LIMIT), for the same reason.
TPP_EXTRAPOLATION_LIMIT = 8.0


@dataclass(frozen=True)
class Point:
    """One (N, D) point of the check: the measured optimum log2 lambda and its bootstrap draws."""

    params: int  # N
    tokens: int  # D
    steps: int  # S, the run's optimizer steps
    wd_log2: float | None  # the optimum (None: not found)
    draws: np.ndarray | None = None  # bootstrap draws of the optimum, paired across points (draw i with draw i)

    @property
    def tpp(self) -> float:
        return self.tokens / self.params


def log2_tau(wd_log2, lr: float, steps: float):
    """log2 of tau = 1 / (eta lambda S) (works on arrays of log2 lambda)."""
    return -math.log2(lr) - np.asarray(wd_log2, dtype=float) - math.log2(steps)


def predict_wd_log2(log2_c, m, lr: float, params: float, tokens: float, steps: float):
    """log2 lambda the law gives at (N, D) with S steps at base LR eta (arrays of (log2 c, m) allowed)."""
    log2_tau_opt = np.asarray(log2_c, dtype=float) + np.asarray(m, dtype=float) * math.log2(tokens / params)
    return -math.log2(lr) - math.log2(steps) - log2_tau_opt


def _line(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (intercept, slope) of y on x, for each row of y."""
    xc = x - x.mean()
    slope = (y - y.mean(axis=-1, keepdims=True)) @ xc / (xc @ xc)
    return y.mean(axis=-1) - slope * x.mean(), slope


def _summary(estimate: float, draws: np.ndarray | None, level: float) -> dict:
    ci = None
    if draws is not None and np.isfinite(draws).sum() >= MIN_DRAWS:
        ci = [float(v) for v in np.quantile(draws[np.isfinite(draws)], [0.5 - level / 2, 0.5 + level / 2])]
    return {"estimate": float(estimate), "ci": ci}


def paired_draws(points: list[Point]) -> np.ndarray | None:
    """[draw, point] of the optima, or None when a point has no draws or their counts differ."""
    if any(p.draws is None for p in points) or len({len(p.draws) for p in points}) != 1:
        return None
    out = np.stack([np.asarray(p.draws, dtype=float) for p in points], axis=1)
    return out if out.shape[0] >= MIN_DRAWS else None


def fit_power_lines(points: list[Point], lr: float, level: float = LEVEL) -> dict:
    """log2 tau_opt = log2 c + m log2(D / N) through ``points``; intervals from their paired draws.

    Keys: log2_c and m ({estimate, ci}), c (2^log2_c), draws ({log2_c, m}: pairs, or None), points.
    Raises ValueError when fewer than two distinct tokens-per-parameter values have an optimum.
    """
    points = [p for p in points if p.wd_log2 is not None]
    x = np.log2([p.tpp for p in points])
    if len(np.unique(x)) < 2:
        raise ValueError("a power law in tokens per parameter needs optima at 2 distinct D/N values or more")
    y = np.array([log2_tau(p.wd_log2, lr, p.steps) for p in points])
    log2_c, m = (float(v) for v in _line(x, y))
    draws = paired_draws(points)
    draw_c = draw_m = None
    if draws is not None:
        ys = np.stack([log2_tau(draws[:, i], lr, p.steps) for i, p in enumerate(points)], axis=1)
        ok = np.isfinite(ys).all(axis=1)
        draw_c, draw_m = _line(x, ys[ok])
    return {"log2_c": _summary(log2_c, draw_c, level), "m": _summary(m, draw_m, level), "c": 2.0**log2_c,
            "level": level, "draws": None if draw_c is None else {"log2_c": draw_c, "m": draw_m},
            "points": [{"params": p.params, "tokens": p.tokens, "steps": p.steps, "tpp": p.tpp,
                        "wd_log2": p.wd_log2} for p in points]}


def _error(measured: Point, predicted: float, predicted_draws, level: float) -> dict:
    """measured - predicted log2 lambda (octaves), with its interval from the paired draws."""
    estimate = measured.wd_log2 - predicted
    draws = None
    if measured.draws is not None and predicted_draws is not None and len(measured.draws) == len(predicted_draws):
        draws = np.asarray(measured.draws, dtype=float) - predicted_draws
    return {"predicted_wd_log2": float(predicted), **_summary(estimate, draws, level)}


def judge_held_out(points: list[Point], held_out: Point, lr: float, goal: float, level: float = LEVEL) -> dict:
    """Fit on ``points``, predict ``held_out`` and judge the error (measured - predicted, octaves) against
    +-``goal``: pass when its interval lies inside, fail outside, inconclusive when it straddles (or there
    is no interval). Beside it, from the smallest point (the proxy: least N, then least D): the timescale
    rule (lambda eta S constant) and keeping the proxy's lambda, their errors the same way."""
    if held_out.wd_log2 is None:
        raise ValueError("the held-out point has no measured optimum")
    fit = fit_power_lines(points, lr, level)
    draws = paired_draws([*points, held_out])
    ok_points = [p for p in points if p.wd_log2 is not None]
    law = predict_wd_log2(fit["log2_c"]["estimate"], fit["m"]["estimate"], lr, held_out.params, held_out.tokens,
                          held_out.steps)
    law_draws = None
    if fit["draws"] is not None and draws is not None and len(fit["draws"]["m"]) == draws.shape[0]:
        law_draws = predict_wd_log2(fit["draws"]["log2_c"], fit["draws"]["m"], lr, held_out.params,
                                    held_out.tokens, held_out.steps)
    proxy = min(ok_points, key=lambda p: (p.params, p.tokens))
    shift = math.log2(proxy.steps / held_out.steps)  # the timescale rule: lambda proportional to 1 / S at fixed eta
    proxy_draws = None if proxy.draws is None else np.asarray(proxy.draws, dtype=float)
    errors = {
        "power_lines": _error(held_out, law, law_draws, level),
        "timescale": _error(held_out, proxy.wd_log2 + shift, None if proxy_draws is None else proxy_draws + shift,
                            level),
        "keep_proxy": _error(held_out, proxy.wd_log2, proxy_draws, level),
    }
    decision = stats.verdict({"estimate": errors["power_lines"]["estimate"], "ci": errors["power_lines"]["ci"],
                              "reason": "no interval on the held-out error (no paired bootstrap draws)"},
                             goal, "within",
                             # the error pools every point's optimum (the law's fit and the held-out one)
                             undecided_note="the interval pools the optima of every (N, D) point: seeds at each "
                                            "of them narrow it")
    return {"fit": fit, "held_out": {"params": held_out.params, "tokens": held_out.tokens, "steps": held_out.steps,
                                     "tpp": held_out.tpp, "wd_log2": held_out.wd_log2},
            "proxy": {"params": proxy.params, "tokens": proxy.tokens, "steps": proxy.steps, "wd_log2": proxy.wd_log2},
            "errors": errors, "goal_octaves": goal, "lr": lr, "outcome": decision["outcome"],
            "exit_status": decision["exit_status"], "reason": decision["reason"], "decision": decision}


# ---------------------------------------------------------------- the lock's entry and what it applies


class WeightDecayDraws(Config):
    """Bootstrap pairs of the law's coefficients: ``log2_c[i]`` goes with ``m[i]``."""

    log2_c: list[float] = Field(min_length=MIN_DRAWS)  # draws of log2 c, paired with m
    m: list[float] = Field(min_length=MIN_DRAWS)  # draws of the exponent m

    @model_validator(mode="after")
    def _paired(self) -> WeightDecayDraws:
        if len(self.log2_c) != len(self.m):
            raise ValueError(f"log2_c has {len(self.log2_c)} draws and m {len(self.m)}; they are pairs")
        return self


class WeightDecayLaw(Config):
    """``laws.weight_decay`` of a lock: tau_opt = c (D/N)^m, tau = 1 / (eta lambda S) (module docstring)."""

    kind: Literal["weight_decay"] = "weight_decay"
    log2_c: float  # log2 of c, tau_opt at one token per parameter
    m: float  # the exponent of tokens per parameter
    log2_c_ci: Interval | None = None
    m_ci: Interval | None = None
    lr: PosFloat  # the base LR the check held fixed
    fitted_tpp: list[PosFloat] = Field(default_factory=list)  # tokens per parameter of the fitted points
    held_out_tpp: PosFloat | None = None
    held_out_error_octaves: float | None = None  # measured - predicted log2 lambda at the held-out point
    held_out_error_ci: Interval | None = None
    timescale_error_octaves: float | None = None  # the timescale rule's error there (a baseline)
    keep_proxy_error_octaves: float | None = None  # keeping the proxy's lambda: its error there (a baseline)
    outcome: Literal["pass", "fail", "inconclusive"]
    source: str  # the transfer-check directory
    draws: WeightDecayDraws | None = None


def rounded(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def wd_law_from_verdict(verdict: dict, source: str) -> dict:
    """A lock entry from a Power Lines transfer check's verdict.json (its ``powerlines`` part)."""
    result = verdict.get("powerlines") or {}
    fit = result.get("fit") or {}
    if (fit.get("m") or {}).get("estimate") is None:
        raise ConfigError(f"{source}: the check fitted no weight-decay law (outcome {verdict.get('outcome')!r}: "
                          f"{'; '.join(verdict.get('reasons', []))})")
    errors = result.get("errors") or {}
    draws = fit.get("draws")
    if draws and len(draws.get("m") or ()) >= MIN_DRAWS:
        draws = {k: [rounded(v) for v in draws[k][:KEPT_DRAWS]] for k in ("log2_c", "m")}
    else:
        draws = None
    entry = {
        "log2_c": fit["log2_c"]["estimate"], "m": fit["m"]["estimate"],
        "log2_c_ci": fit["log2_c"].get("ci"), "m_ci": fit["m"].get("ci"), "lr": result["lr"],
        "fitted_tpp": [p["tpp"] for p in fit.get("points", [])],
        "held_out_tpp": (result.get("held_out") or {}).get("tpp"),
        "held_out_error_octaves": (errors.get("power_lines") or {}).get("estimate"),
        "held_out_error_ci": (errors.get("power_lines") or {}).get("ci"),
        "timescale_error_octaves": (errors.get("timescale") or {}).get("estimate"),
        "keep_proxy_error_octaves": (errors.get("keep_proxy") or {}).get("estimate"),
        "outcome": result.get("outcome", verdict.get("outcome")), "source": source, "draws": draws,
    }
    return parse(WeightDecayLaw, entry, f"--law {source}: law").model_dump()


def weight_decay_at_target(law: WeightDecayLaw | None, wanted: str, lock_wd: float, lr: float, params: int,
                           tokens: float, steps: int, level: float = LEVEL) -> dict:
    """The base weight decay the run uses and how it was reached.

    Keys: applied, weight_decay (what the run uses), lock_weight_decay, and with a law: law_weight_decay
    (the law's lambda, applied or would-be), tpp (the target's D/N), tau (the law's tau_opt there),
    interval_90 (the law's lambda at the 5th and 95th percentiles of its draws, None without draws),
    fitted_tpp_max, extrapolation (target TPP over it) and beyond_limit. ``wanted`` = "fitted" without a
    law is a ConfigError naming transfer.weight_decay.
    """
    out = {"applied": False, "weight_decay": lock_wd, "lock_weight_decay": lock_wd}
    if law is None:
        if wanted == "fitted":
            raise ConfigError("transfer.weight_decay = 'fitted' but the lock has no weight-decay law; attach one "
                              "with `mutransfer freeze SWEEP_DIR --law TRANSFER_DIR` (a Power Lines check: "
                              "transfer.widths) or set transfer.weight_decay = 'off'")
        return out
    tpp = tokens / params
    wd = 2.0 ** float(predict_wd_log2(law.log2_c, law.m, lr, params, tokens, steps))
    interval = None
    if law.draws is not None:
        draws = 2.0 ** predict_wd_log2(law.draws.log2_c, law.draws.m, lr, params, tokens, steps)
        interval = [float(v) for v in np.quantile(draws, [0.5 - level / 2, 0.5 + level / 2])]
    fitted_max = max(law.fitted_tpp) if law.fitted_tpp else None
    factor = tpp / fitted_max if fitted_max else None
    out.update(law_weight_decay=wd, tpp=tpp, tau=2.0 ** (law.log2_c + law.m * math.log2(tpp)),
               interval_90=interval, fitted_tpp_max=fitted_max, extrapolation=factor,
               beyond_limit=factor is not None and factor > TPP_EXTRAPOLATION_LIMIT, outcome=law.outcome,
               lr=lr, steps=steps, params=params, tokens=tokens)
    if wanted == "fitted":
        out.update(applied=True, weight_decay=wd)
    return out

