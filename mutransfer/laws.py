"""Fitted horizon and batch laws carried in the lock, and the LR they predict for the target run.

muP carries the optimum across width (and, with the depth rules, depth); it does not carry it
across the token horizon or the batch size, which the target changes by 10,000x and 20-40x. A
transfer check along those axes (``mutransfer transfer-check`` with ``axis = "steps"`` or
``"batch_size"``) fits a power law to the optimum base LR,

    log2 LR*(x) = a - beta * log2 x,

and ``mutransfer freeze --law DIR`` attaches it to the lock with its provenance (which runs, the
interval on beta, the held-out error). Here the laws are expressed in tokens (horizon: x = tokens
of the run, D = steps x batch x sequence) and in sequences per step (batch), so they apply to the
target's own token count and global batch. The correction of the base LR is the ratio the law
predicts between the target and the proxy the lock was tuned on:

    LR_target = LR_lock x 2^(-beta_D log2(D_target / D_proxy)) x 2^(-beta_B log2(B_target / B_proxy)).

It is applied only when the full-scale config asks for it (``[transfer] horizon = "fitted"``,
``batch = "fitted"``); the recipe's own run keeps the lock's values exactly. The two laws are
fitted separately (horizon at the proxy's batch, batch at a fixed token budget) and combined as a
product: an approximation, stated in the provenance.

How sure the correction is: the check keeps bootstrap draws of (a, beta) (``Law.draws``); for each
draw the factor is ``2^(-beta_d log2(target / proxy))`` (a cancels in the ratio), the draws of two
laws are combined as independent (every pair: the checks are separate runs), and the 5th and 95th
percentiles of the product give the 90 % interval of the corrected LR (``factor_interval``). A lock
without draws (frozen before they were kept) gets its interval from ``beta_ci`` alone, said so.
How far each law is carried past its data is reported too (``extrapolation``: the target's tokens or
batch over the largest value the law was fitted on), and warned about past ``EXTRAPOLATION_LIMIT``.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from mutransfer.config import (
    Config,
    ConfigError,
    HParams,
    PosFloat,
    PosInt,
    ProxyTrain,
    parse,
    updated,
)
from mutransfer.wd_law import WeightDecayLaw

LAW_KINDS = ("horizon", "batch")
OUTCOMES = ("pass", "fail", "inconclusive")  # a transfer check's verdict
Interval = Annotated[list[float], Field(min_length=2, max_length=2)]  # [low, high]
LEVEL = 0.9  # the interval plan gives on each transferred value
MIN_DRAWS = 20  # fewer bootstrap draws than this cannot place a 5th and a 95th percentile
SYNTHETIC_DRAWS = 1000  # beta draws made from beta_ci when a lock has no bootstrap draws
# How far past its largest fitted value a law may be carried before plan and train warn. 8x is the
# whole span over which a law of this project was checked (the horizon check: 120 -> 960 steps,
# fitted on 120-480, the 960-step optimum predicted within +-0.35 octave; README). Inside that span
# the optimum's fall per doubling already steepened from 0.20 to 0.52 octave, so past it the straight
# line in log-log is not established. The target's horizon is ~10,000x past any proxy: the warning
# is expected there, and says by how much.
EXTRAPOLATION_LIMIT = 8.0


class TransferCorrection(Config):
    """``[transfer]`` of a full-scale config: apply the lock's fitted laws to the base LR (and the Power
    Lines law to the base weight decay, ``mutransfer.wd_law``), or not."""

    horizon: Literal["fitted", "off"] = "off"
    """LR x (D_target / D_proxy)^-beta from the lock's horizon law"""
    batch: Literal["fitted", "off"] = "off"
    """LR x (B_target / B_proxy)^-beta from the lock's batch law"""
    weight_decay: Literal["fitted", "off"] = "off"
    """base lambda from the lock's Power Lines law at the target's N and D (mutransfer.wd_law)"""


class LawDraws(Config):
    """Bootstrap draws of the law's coefficients, pair by pair: ``a[i]`` goes with ``beta[i]`` (a in the
    law's ``unit``, as ``Law.a``). Kept so that an interval at any target is the draws' percentiles."""

    a: list[float] = Field(min_length=MIN_DRAWS)
    beta: list[float] = Field(min_length=MIN_DRAWS)

    @model_validator(mode="after")
    def _paired(self) -> LawDraws:
        if len(self.a) != len(self.beta):
            raise ValueError(f"a has {len(self.a)} draws and beta {len(self.beta)}; they are pairs")
        return self


class Law(Config):
    """One fitted law as the lock carries it: ``log2 LR* = a - beta log2 x``, x counted in ``unit``."""

    kind: Literal["horizon", "batch"]
    unit: Literal["tokens", "sequences"]  # horizon: tokens of the run; batch: sequences per step
    beta: float
    beta_ci: Interval | None = None
    a: float
    fitted_on: list[PosFloat] = Field(default_factory=list)  # axis values the law was fitted on
    held_out: list[PosFloat] = Field(default_factory=list)  # the value it predicted
    held_out_error_octaves: float | None = None
    held_out_error_ci: Interval | None = None
    outcome: Literal["pass", "fail", "inconclusive"]  # the transfer check's verdict on the prediction
    axis_values: list[PosFloat] = Field(default_factory=list)
    axis_unit: Literal["steps", "sequences per step"]
    tokens_per_step: PosInt | None = None  # horizon: the check's tokens per step (its steps -> tokens)
    source: str  # the transfer-check directory
    note: str = ""
    draws: LawDraws | None = None  # bootstrap draws of (a, beta); absent in locks frozen before they were kept
    model_params: PosInt | None = None  # parameters of the check's model (tokens per parameter of the fit)
    tokens_budget: PosInt | None = None  # batch: the check's fixed token budget per run
    form: Literal["straight", "weighted"] = "straight"  # the fit's least squares (mutransfer.law_forms)

    def fitted_max(self) -> float | None:
        """The largest value the law was fitted on, in ``unit`` (tokens or sequences per step)."""
        if not self.fitted_on:
            return None
        per = (self.tokens_per_step or 0) if self.kind == "horizon" else 1
        return max(self.fitted_on) * per if per else None

    def fitted_tokens(self) -> list[float]:
        """Tokens per run of the values the law was fitted on (empty where unknown)."""
        if self.kind == "horizon" and self.tokens_per_step:
            return [v * self.tokens_per_step for v in self.fitted_on]
        if self.kind == "batch" and self.tokens_budget:
            return [float(self.tokens_budget)]
        return []

    @model_validator(mode="after")
    def _units(self) -> Law:
        unit, axis_unit = {"horizon": ("tokens", "steps"), "batch": ("sequences", "sequences per step")}[self.kind]
        if (self.unit, self.axis_unit) != (unit, axis_unit):
            raise ValueError(f"a {self.kind} law has unit = {unit!r} and axis_unit = {axis_unit!r} "
                             f"(got {self.unit!r}, {self.axis_unit!r})")
        return self


class Laws(Config):
    """``laws`` of a lock: at most one law of each kind, under its own kind."""

    horizon: Law | None = None
    batch: Law | None = None
    weight_decay: WeightDecayLaw | None = None  # the Power Lines law of the base weight decay (mutransfer.wd_law)

    @field_validator("horizon", "batch")
    @classmethod
    def _kind(cls, law: Law | None, info: ValidationInfo) -> Law | None:
        if law is not None and law.kind != info.field_name:
            raise ValueError(f"a {law.kind} law (kind = {law.kind!r}) under {info.field_name!r}")
        return law

    def items(self) -> list[tuple[str, Law]]:
        """The LR laws present (horizon, batch); the weight-decay law is ``weight_decay``."""
        return [(kind, getattr(self, kind)) for kind in LAW_KINDS if getattr(self, kind) is not None]


def law_from_verdict(verdict: dict, config: dict, source: str) -> dict:
    """A lock entry from a transfer check's verdict.json and config.json (the steps or batch axis)."""
    axis = verdict.get("axis")
    if axis not in ("steps", "batch_size"):
        raise ConfigError(f"{source}: a law comes from a transfer check along steps or batch_size, not {axis!r}")
    if verdict.get("tune", "lr") != "lr":
        raise ConfigError(f"{source}: a check that tuned {verdict.get('knob', verdict.get('tune'))!r} carries no LR "
                          "law; attach a check that tuned the LR (transfer.tune = 'lr')")
    fit = (verdict.get("law") or {}).get("law") or {}
    beta, a = fit.get("beta") or {}, fit.get("a") or {}
    if beta.get("estimate") is None or a.get("estimate") is None:
        raise ConfigError(f"{source}: the check fitted no law (outcome {verdict.get('outcome')!r}: "
                          f"{'; '.join(verdict.get('reasons', []))})")
    train = config["spec"].get("train", {})
    seq, batch = int(train.get("seq_len", 128)), int(train.get("batch_size", 16))
    if axis == "steps":  # x = steps at this batch and sequence: in tokens, log2 x = log2 D - log2(B T)
        kind, unit, shift = "horizon", "tokens", math.log2(batch * seq)
    else:  # x = sequences per step at a fixed token budget
        kind, unit, shift = "batch", "sequences", 0.0
    beta_hat = float(beta["estimate"])
    residual = fit.get("residual") or {}

    def interval(ci):
        return None if ci is None else [float(x) for x in ci]

    entry = {
        "kind": kind,
        "unit": unit,
        "beta": beta_hat,
        "beta_ci": interval(beta.get("ci")),
        "a": float(a["estimate"]) + beta_hat * shift,  # log2 LR* = a - beta log2(x in `unit`)
        "fitted_on": verdict.get("values", [])[:-1],
        "held_out": verdict.get("values", [])[-1:],
        "held_out_error_octaves": residual.get("estimate"),
        "held_out_error_ci": interval(residual.get("ci")),
        "outcome": verdict.get("outcome"),
        "axis_values": verdict.get("values"),
        "axis_unit": "steps" if axis == "steps" else "sequences per step",
        "tokens_per_step": batch * seq if axis == "steps" else None,
        "source": source,
        "note": ("fitted separately from the other law; combined as a product (an approximation)"),
        "draws": _shifted_draws(fit.get("draws"), shift),
        "model_params": _model_params(config, source),
        "tokens_budget": _tokens_budget(config) if axis == "batch_size" else None,
        "form": fit.get("form", "straight"),
    }
    return parse(Law, entry, f"--law {source}: law").model_dump()  # what read_lock will accept, checked now


def rounded(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits: draws kept in files stay small (a draw of log2 LR to
    about 1e-3 octave, of beta to about 1e-4: far inside their bootstrap spread)."""
    return float(f"{x:.{digits}g}")


def _shifted_draws(draws: dict | None, shift: float) -> dict | None:
    """The check's draws of (a, beta) with a moved to the law's unit, as ``a`` itself is; None when the
    verdict kept none (written before draws were kept) or too few to place a 90 % interval."""
    if not draws or len(draws.get("a") or ()) < MIN_DRAWS:
        return None
    return {"a": [rounded(a + b * shift) for a, b in zip(draws["a"], draws["beta"], strict=True)],
            "beta": [rounded(b) for b in draws["beta"]]}


def _model_params(config: dict, source: str) -> int | None:
    """Parameters of the check's model when its config names one (for tokens per parameter), else None."""
    spec = config.get("spec") or {}
    if "model" not in spec:
        return None
    from mutransfer.plan import count_params, shape_from_config

    return count_params(shape_from_config(spec, f"{source}/config.json: spec"))["params_total"]


def _tokens_budget(config: dict) -> int | None:
    tokens = ((config.get("spec") or {}).get("transfer") or {}).get("tokens")
    return int(tokens) if tokens else None


def proxy_horizon_and_batch(proxy_train: ProxyTrain | None) -> tuple[float | None, float | None]:
    """(tokens, global batch in sequences) of the proxy run the lock's values were tuned with."""
    if proxy_train is None:
        return None, None
    return float(proxy_train.steps * proxy_train.tokens_per_step), float(proxy_train.batch_size)


def beta_draws(law: Law) -> tuple[np.ndarray | None, str]:
    """Draws of the law's beta and where they come from: the check's bootstrap when the lock kept it;
    else a split normal through ``beta_ci`` (its quantiles, evenly spaced: the 5th and 95th
    percentiles are the interval's ends, read as a 90 % interval); else none."""
    if law.draws is not None:
        return np.asarray(law.draws.beta, dtype=float), f"{len(law.draws.beta)} bootstrap draws of the check"
    if law.beta_ci is None:
        return None, "no interval: the law has neither bootstrap draws nor beta_ci"
    lo, hi = law.beta_ci
    z95 = NormalDist().inv_cdf(0.5 + LEVEL / 2)
    z = np.array([NormalDist().inv_cdf((i + 0.5) / SYNTHETIC_DRAWS) for i in range(SYNTHETIC_DRAWS)])
    draws = law.beta + z * np.where(z < 0, law.beta - lo, hi - law.beta) / z95
    return draws, "beta_ci alone (the lock has no bootstrap draws: a split normal through beta_ci)"


def factor_interval(laws: Laws, ratios: dict[str, float], level: float = LEVEL) -> dict:
    """The ``level`` interval of the product of the laws' factors ``(target / proxy)^-beta`` over
    ``ratios`` ({kind: target / proxy}). Each law's beta draws give its factor's draws; two laws are
    independent checks, so every pair of their draws is a draw of the product. Returns interval
    ([low, high] or None), level, n_draws and sources ({kind: where its draws come from})."""
    log_factor = np.zeros(1)
    sources = {}
    for kind, ratio in ratios.items():
        draws, sources[kind] = beta_draws(getattr(laws, kind))
        if draws is None:
            return {"interval": None, "level": level, "n_draws": 0, "sources": sources}
        log_factor = (log_factor[:, None] - draws[None, :] * math.log2(ratio)).ravel()
    if not ratios:
        return {"interval": None, "level": level, "n_draws": 0, "sources": sources}
    lo, hi = np.quantile(2.0**log_factor, [0.5 - level / 2, 0.5 + level / 2])
    return {"interval": [float(lo), float(hi)], "level": level, "n_draws": int(log_factor.size), "sources": sources}


def extrapolation(law: Law, target: float) -> dict:
    """How far the target lies past the law's data: ``extrapolation`` = target / ``largest_fitted`` (the
    largest value the law was fitted on, in its unit; None where the lock does not record it)."""
    fitted = law.fitted_max()
    factor = target / fitted if fitted else None
    return {"extrapolation": factor, "largest_fitted": fitted, "extrapolation_limit": EXTRAPOLATION_LIMIT,
            "beyond_limit": factor is not None and factor > EXTRAPOLATION_LIMIT}


def tokens_per_parameter(law: Law, target_tokens: float, target_params: int) -> dict:
    """TPP of the target against the TPP range the law was fitted at (None where the check's model or
    tokens are not recorded: a lock frozen before they were)."""
    tokens = law.fitted_tokens()
    fitted = [t / law.model_params for t in tokens] if tokens and law.model_params else None
    return {"target": target_tokens / target_params,
            "fitted_range": [min(fitted), max(fitted)] if fitted else None}


def law_warnings(laws: Laws, terms: dict) -> list[dict]:
    """A warning for each law the run applies that is carried past ``EXTRAPOLATION_LIMIT`` or whose
    check did not pass (``terms``: ``correction``'s). A law present but not applied warns nothing: the
    run keeps the lock's LR, and plan shows the would-be value marked as such."""
    out = []
    for kind, term in terms.items():
        if not term.get("applied"):
            continue
        law = getattr(laws, kind)
        if term["beyond_limit"]:
            out.append({"kind": "law_extrapolation", "law": kind, "message": (
                f"the {kind} law is carried {term['extrapolation']:.3g}x past its largest fitted value "
                f"({term['largest_fitted']:.4g} -> {term['target']:.4g} {term['unit']}; a law is trusted up to "
                f"{EXTRAPOLATION_LIMIT:g}x): the corrected LR and its interval assume the power law holds that far")})
        if law.outcome != "pass":
            out.append({"kind": "law_outcome", "law": kind, "message": (
                f"the {kind} law applied to the LR comes from a transfer check ({law.source}) whose verdict "
                f"was {law.outcome}, not pass: its prediction is not established")})
    return out


def correction(laws: Laws, proxy_train: ProxyTrain | None, target_tokens: float, target_batch: float,
               use: TransferCorrection) -> dict:
    """The factor on the base LR (and how it was reached) for the target's tokens and batch.

    Keys: factor (applied; 1.0 when no law is), terms ({kind: applied, factor or would_be, beta,
    target, proxy, unit, and ``extrapolation``'s keys}), interval_90 (``factor_interval`` of the applied laws, or
    of the present ones when none is applied: the would-be factor's), warnings (``law_warnings``).
    """
    proxy_tokens, proxy_batch = proxy_horizon_and_batch(proxy_train)
    out = {"factor": 1.0, "terms": {}}
    ratios = {}
    for kind, wanted, target, proxy in (("horizon", use.horizon, target_tokens, proxy_tokens),
                                        ("batch", use.batch, target_batch, proxy_batch)):
        law = getattr(laws, kind)
        if wanted == "off":
            if law:
                out["terms"][kind] = {"applied": False, "would_be": 2.0 ** (-law.beta * math.log2(target / proxy))
                                      if proxy else None, "beta": law.beta, "target": target, "proxy": proxy,
                                      "unit": law.unit, **extrapolation(law, target)}
                if proxy:
                    ratios[kind] = target / proxy
            continue
        if not law:
            raise ConfigError(f"transfer.{kind} = 'fitted' but the lock has no {kind} law; attach one with "
                              f"`mutransfer freeze SWEEP_DIR --law TRANSFER_DIR` or set transfer.{kind} = 'off'")
        if not proxy:
            raise ConfigError(f"transfer.{kind} = 'fitted': the lock's provenance does not record the proxy's "
                              "budget (proxy_train), so the law has nothing to scale from")
        factor = 2.0 ** (-law.beta * math.log2(target / proxy))
        out["terms"][kind] = {"applied": True, "factor": factor, "beta": law.beta, "target": target,
                              "proxy": proxy, "unit": law.unit, **extrapolation(law, target)}
        out["factor"] *= factor
    applied = {k: t["target"] / t["proxy"] for k, t in out["terms"].items() if t["applied"]}
    interval = factor_interval(laws, applied or ratios)
    out["interval_90"] = interval["interval"]
    out["interval"] = {k: v for k, v in interval.items() if k != "interval"} | {
        "of": "the applied correction" if applied else "the would-be correction (not applied)" if ratios else None}
    out["warnings"] = law_warnings(laws, out["terms"])
    return out


def corrected(hp: HParams, factor: float) -> HParams:
    return hp if factor == 1.0 else updated(hp, "transfer", lr=hp.lr * factor)
