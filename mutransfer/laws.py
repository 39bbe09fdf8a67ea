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
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

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

LAW_KINDS = ("horizon", "batch")
OUTCOMES = ("pass", "fail", "inconclusive")  # a transfer check's verdict
Interval = Annotated[list[float], Field(min_length=2, max_length=2)]  # [low, high]


class TransferCorrection(Config):
    """``[transfer]`` of a full-scale config: apply the lock's fitted laws to the base LR, or not."""

    horizon: Literal["fitted", "off"] = "off"  # LR x (D_target / D_proxy)^-beta from the lock's horizon law
    batch: Literal["fitted", "off"] = "off"  # LR x (B_target / B_proxy)^-beta from the lock's batch law


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

    @field_validator("horizon", "batch")
    @classmethod
    def _kind(cls, law: Law | None, info: ValidationInfo) -> Law | None:
        if law is not None and law.kind != info.field_name:
            raise ValueError(f"a {law.kind} law (kind = {law.kind!r}) under {info.field_name!r}")
        return law

    def items(self) -> list[tuple[str, Law]]:
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
    }
    return parse(Law, entry, f"--law {source}: law").model_dump()  # what read_lock will accept, checked now


def proxy_horizon_and_batch(proxy_train: ProxyTrain | None) -> tuple[float | None, float | None]:
    """(tokens, global batch in sequences) of the proxy run the lock's values were tuned with."""
    if proxy_train is None:
        return None, None
    return float(proxy_train.steps * proxy_train.tokens_per_step), float(proxy_train.batch_size)


def correction(laws: Laws, proxy_train: ProxyTrain | None, target_tokens: float, target_batch: float,
               use: TransferCorrection) -> dict:
    """The factor on the base LR (and how it was reached) for the target's tokens and batch."""
    proxy_tokens, proxy_batch = proxy_horizon_and_batch(proxy_train)
    out = {"factor": 1.0, "terms": {}}
    for kind, wanted, target, proxy in (("horizon", use.horizon, target_tokens, proxy_tokens),
                                        ("batch", use.batch, target_batch, proxy_batch)):
        law = getattr(laws, kind)
        if wanted == "off":
            if law:
                out["terms"][kind] = {"applied": False, "would_be": 2.0 ** (-law.beta * math.log2(target / proxy))
                                      if proxy else None}
            continue
        if not law:
            raise ConfigError(f"transfer.{kind} = 'fitted' but the lock has no {kind} law; attach one with "
                              f"`mutransfer freeze SWEEP_DIR --law TRANSFER_DIR` or set transfer.{kind} = 'off'")
        if not proxy:
            raise ConfigError(f"transfer.{kind} = 'fitted': the lock's provenance does not record the proxy's "
                              "budget (proxy_train), so the law has nothing to scale from")
        factor = 2.0 ** (-law.beta * math.log2(target / proxy))
        out["terms"][kind] = {"applied": True, "factor": factor, "beta": law.beta, "target": target,
                              "proxy": proxy, "unit": law.unit}
        out["factor"] *= factor
    return out


def corrected(hp: HParams, factor: float) -> HParams:
    return hp if factor == 1.0 else updated(hp, "transfer", lr=hp.lr * factor)
