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
from typing import Literal

from mutransfer.config import Config, ConfigError, HParams, updated

LAW_KINDS = ("horizon", "batch")


class TransferCorrection(Config):
    """``[transfer]`` of a full-scale config: apply the lock's fitted laws to the base LR, or not."""

    horizon: Literal["fitted", "off"] = "off"  # LR x (D_target / D_proxy)^-beta from the lock's horizon law
    batch: Literal["fitted", "off"] = "off"  # LR x (B_target / B_proxy)^-beta from the lock's batch law


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
    return {
        "kind": kind,
        "unit": unit,
        "beta": beta_hat,
        "beta_ci": beta.get("ci"),
        "a": float(a["estimate"]) + beta_hat * shift,  # log2 LR* = a - beta log2(x in `unit`)
        "fitted_on": verdict.get("values", [])[:-1],
        "held_out": verdict.get("values", [])[-1:],
        "held_out_error_octaves": residual.get("estimate"),
        "held_out_error_ci": residual.get("ci"),
        "outcome": verdict.get("outcome"),
        "axis_values": verdict.get("values"),
        "axis_unit": "steps" if axis == "steps" else "sequences per step",
        "tokens_per_step": batch * seq if axis == "steps" else None,
        "source": source,
        "note": ("fitted separately from the other law; combined as a product (an approximation)"),
    }


def proxy_horizon_and_batch(provenance: dict) -> tuple[float | None, float | None]:
    """(tokens, global batch in sequences) of the proxy run the lock's values were tuned with."""
    train = provenance.get("proxy_train") or {}
    if not train:
        return None, None
    tokens = train.get("steps", 0) * train.get("batch_size", 0) * train.get("seq_len", 0)
    return (float(tokens) or None), (float(train.get("batch_size")) if train.get("batch_size") else None)


def correction(laws: dict, provenance: dict, target_tokens: float, target_batch: float,
               use: TransferCorrection) -> dict:
    """The factor on the base LR (and how it was reached) for the target's tokens and batch."""
    proxy_tokens, proxy_batch = proxy_horizon_and_batch(provenance)
    out = {"factor": 1.0, "terms": {}}
    for kind, wanted, target, proxy in (("horizon", use.horizon, target_tokens, proxy_tokens),
                                        ("batch", use.batch, target_batch, proxy_batch)):
        law = laws.get(kind)
        if wanted == "off":
            if law:
                out["terms"][kind] = {"applied": False, "would_be": 2.0 ** (-law["beta"] * math.log2(target / proxy))
                                      if proxy else None}
            continue
        if not law:
            raise ConfigError(f"transfer.{kind} = 'fitted' but the lock has no {kind} law; attach one with "
                              f"`mutransfer freeze SWEEP_DIR --law TRANSFER_DIR` or set transfer.{kind} = 'off'")
        if not proxy:
            raise ConfigError(f"transfer.{kind} = 'fitted': the lock's provenance does not record the proxy's "
                              "budget (proxy_train), so the law has nothing to scale from")
        factor = 2.0 ** (-law["beta"] * math.log2(target / proxy))
        out["terms"][kind] = {"applied": True, "factor": factor, "beta": law["beta"], "target": target,
                              "proxy": proxy, "unit": law["unit"]}
        out["factor"] *= factor
    return out


def corrected(hp: HParams, factor: float) -> HParams:
    return hp if factor == 1.0 else updated(hp, "transfer", lr=hp.lr * factor)
