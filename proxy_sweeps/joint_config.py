"""The tables of a joint-check file: ``[joint]``, ``[proxy]`` and ``[target]`` (``proxy_sweeps.joint``).

A transfer-check file with a ``[target]`` table is a joint check: the target differs from the proxy
on every axis at once (width, depth, token horizon, batch), and the check asks whether the proxy's
base LR, carried by muP and corrected by the fitted laws, lands on the target's measured optimum.
Kept apart from ``proxy_sweeps.joint`` so that ``proxy_sweeps.transfer`` can list these tables for
``mutransfer schema`` without importing the check itself.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from mutransfer.config import Config, PosInt

DEFAULT_GOAL = 0.35  # octaves: the prediction error allowed, as for the horizon and batch laws


def is_joint(data) -> bool:
    """A transfer-check file is a joint check when it has a [target] (or [joint]) table."""
    return isinstance(data, dict) and ("target" in data or "joint" in data)


def grid_values(low: float, high: float, step: float) -> list[float]:
    """log2 grid from ``low`` to ``high`` in ``step``, ascending (rounded so two grids share points)."""
    n = int(round((high - low) / step)) + 1
    return [round(low + i * step, 9) for i in range(n)]


def check_grid(prefix: str, low: float, high: float, step: float) -> None:
    if not low < high:
        raise ValueError(f"{prefix}_log2_low = {low} must be below {prefix}_log2_high = {high}")
    steps = (high - low) / step
    if abs(steps - round(steps)) > 1e-9 or round(steps) < 2:
        raise ValueError(f"{prefix}_log2_high - {prefix}_log2_low must be a whole number (>= 2) of {prefix}_log2_step")


class JointSettings(Config):
    """``[joint]``: where the proxy's LR and the laws come from, the LR grids, seeds and the goal."""

    lock: str | None = None
    """hparams.lock.json: the proxy's base LR, budget and laws; else the proxy is measured"""
    laws: list[str] = Field(default_factory=list)
    """transfer-check directories (steps / batch_size), as freeze --law"""
    lr_log2_low: float = -8.0
    """the target's base-LR grid"""
    lr_log2_high: float = -5.0
    """largest base LR of the target's grid, log2"""
    lr_log2_step: Annotated[float, Field(gt=0)] = 0.5
    """the target grid's step, in octaves"""
    proxy_lr_log2_low: float | None = None
    """the proxy's grid (no lock); default: the target's"""
    proxy_lr_log2_high: float | None = None
    """largest base LR of the proxy's grid; default: the target's"""
    proxy_lr_log2_step: Annotated[float, Field(gt=0)] | None = None
    """the proxy grid's step; default: the target's"""
    seeds: PosInt = 3
    """runs per grid point on each side"""
    last_evals: PosInt = 1
    """held-out evaluations averaged at the end of each run"""
    goal_octaves: Annotated[float, Field(gt=0)] = DEFAULT_GOAL
    """|measured - predicted| allowed"""
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.9
    """of the bootstrap intervals"""
    bootstrap: Annotated[int, Field(ge=0)] = 1000
    """resamples; 0: point estimates only (no intervals)"""
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] | None = 0.1
    """of each run's steps; None: [train]'s"""
    decay_fraction: Annotated[float, Field(ge=0, lt=1)] | None = 0.2
    """of each run's steps; None: [train]'s"""

    @model_validator(mode="after")
    def _grids(self) -> JointSettings:
        check_grid("lr", self.lr_log2_low, self.lr_log2_high, self.lr_log2_step)
        check_grid("proxy_lr", *self.proxy_bounds)
        return self

    @property
    def proxy_bounds(self) -> tuple[float, float, float]:
        return (self.lr_log2_low if self.proxy_lr_log2_low is None else self.proxy_lr_log2_low,
                self.lr_log2_high if self.proxy_lr_log2_high is None else self.proxy_lr_log2_high,
                self.lr_log2_step if self.proxy_lr_log2_step is None else self.proxy_lr_log2_step)

    @property
    def target_grid(self) -> list[float]:
        return grid_values(self.lr_log2_low, self.lr_log2_high, self.lr_log2_step)

    @property
    def proxy_grid(self) -> list[float]:
        return grid_values(*self.proxy_bounds)

    # what the transfer-check workers read off a check's settings (``proxy_sweeps.transfer._chain``)
    @property
    def axis(self) -> str:
        return "joint"

    @property
    def tune(self) -> str:
        return "lr"

    @property
    def grid_key(self) -> str:
        return "lr_log2"


class RunPoint(Config):
    """``[proxy]`` / ``[target]``: the model and budget of one side (unset: the preset's, the [train] table's)."""

    width: PosInt | None = None
    """the side's width (the preset's family at that width)"""
    depth: PosInt | None = None
    """the side's depth (blocks)"""
    steps: PosInt | None = None
    """the side's optimizer steps"""
    batch_size: PosInt | None = None
    """global batch, sequences per step"""


CONFIG_TABLES = [("[joint]", JointSettings), ("[proxy]", RunPoint), ("[target]", RunPoint)]
