"""A multi-stage run as plain data: stages, their batch and sequence steps, LR shapes, data mixtures.

A full-scale config lists ``[[stages]]`` in order (RECIPE section 4: warmup, stable S1, stable S2,
decay, long context). Each stage (``StageTable``) has

- ``name``, and either ``steps``, ``global_batch``, ``micro_batch``, ``seq_len`` or a list of
  ``[[stages.phases]]`` (long context raises the sequence length in steps; a phase may also change
  the global and micro batch, e.g. to keep tokens per step fixed). Stage-level values are the
  phases' defaults.
- ``lr = {shape, start, end}`` with shape ``linear | constant | exp``, as factors on every parameter
  group's peak LR (``base_lr`` from the muP table at the target width). ``start`` defaults to the
  previous stage's end (0 for a first linear stage, 1 for another first stage), so a run is
  continuous unless it says otherwise. ``end_lr`` (and ``start_lr``) give the end (start) instead as
  an *absolute* LR that every group reaches -- the recipe's long-context floor, 1e-5 for the
  embedding and the hidden matrices alike, is ``end_lr = 1e-5``; the next stage then starts there.
- ``mixture = [{name, data, weight}, ...]``: data sources sampled in proportion to weight
  (normalised). Without one the stage uses ``[data].mixture``.
- ``activation_checkpointing``: this stage's policy (none | full | selective), which a phase may
  set for itself; without one, the run's ``[train].activation_checkpointing``. The recipe's
  16,384-token phase needs recomputation where its 8,192-token phase and the short stages do not
  (``mutransfer plan --world-size N`` shows it, and names the lightest policy that fits each phase).

The optimizer switch is ``[optimizer]`` (``SwitchSpec``): stages from ``switch_stage`` on put the
2-D hidden matrices on Muon, the others on AdamW.

Global batch = micro batch x accumulation x data-parallel size; ``accumulation`` checks that
it divides, naming the field. Nothing here touches tensors: ``plan`` and the trainer share it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, model_validator

from mutransfer.config import (
    Checkpointing,
    Config,
    ConfigError,
    HParams,
    NonNegFloat,
    PosFloat,
    PosInt,
    RunShape,
    hparams_from,
    parse,
)
from mutransfer.parametrization import Role, resolve_role
from mutransfer.schedule import Schedule, Segment


class SourceTable(Config):
    """One data source of a mixture: a dataset spec (``builtin`` or a prepared dir) and its weight."""

    data: Annotated[str, Field(min_length=1)]
    """builtin or a prepared data directory (mutransfer data prepare)"""
    weight: PosFloat = 1.0
    """relative share of the mixture's tokens"""
    name: str = ""
    """label in metrics; default: the data path"""


class PhaseTable(Config):
    steps: PosInt | None = None
    """optimizer steps of this phase (stage)"""
    seq_len: PosInt | None = None
    """tokens per sequence"""
    global_batch: PosInt | None = None
    """sequences per optimizer step, over every process"""
    micro_batch: PosInt | None = None
    """sequences per forward/backward on one process (accumulated to the global batch)"""
    activation_checkpointing: Checkpointing | None = None
    """this phase's (stage's) policy; default: [train]'s"""


class LRSpec(Config):
    """A stage's ``lr`` table: factors on each group's peak LR, or absolute LRs every group reaches."""

    shape: Literal["linear", "constant", "exp"]
    """linear | constant | exp (exponential) across the stage"""
    start: NonNegFloat | None = None
    """factor on each group's peak LR at the stage's first step"""
    end: NonNegFloat | None = None
    """factor on each group's peak LR at the stage's last step"""
    start_lr: PosFloat | None = None
    """absolute LR every group starts at (instead of a factor)"""
    end_lr: PosFloat | None = None
    """absolute LR every group ends at (the recipe's long-context floor: 1e-5)"""

    @model_validator(mode="after")
    def _one_end(self) -> LRSpec:
        if self.end is not None and self.end_lr is not None:
            raise ValueError("give end (a factor) or end_lr (an absolute LR), not both")
        if self.start is not None and self.start_lr is not None:
            raise ValueError("give start (a factor) or start_lr (an absolute LR), not both")
        return self


class StageTable(PhaseTable):
    name: Annotated[str, Field(min_length=1)]
    """the stage's name (warmup, stable1, decay, ...); --set stages.NAME.key=value finds it"""
    phases: list[PhaseTable] | None = None
    """consecutive phases within the stage (e.g. long context 8k then 16k); unset: one phase"""
    lr: LRSpec
    """the stage's LR shape ([[stages]].lr)"""
    mixture: list[SourceTable] | None = None
    """data sources and weights for this stage; unset: [data].mixture"""


class SwitchSpec(Config):
    """``[optimizer]``: whether and where the hidden matrices move from AdamW to Muon, and how.

    restart: ``all`` restarts every optimizer state at the switch (embedding and norm gains too),
    as the recipe's decay run did; ``hidden`` keeps AdamW's state for the embedding and norm gains.
    muon_fuse: Muon orthogonalises the fused Q|K|V and gate|up matrices, as the recipe's Megatron
    did. Unset, both follow the parametrization: the recipe's choice under ``xmodel``, the
    per-matrix, state-keeping variant under ``mup``/``sp``; so a config that must not change with
    its lock (the recipe's) writes them, and ``plan`` and the switch event say where each came from.
    """

    switch: bool = True
    """move the hidden matrices from AdamW to Muon at switch_stage"""
    switch_stage: str = "decay"
    """the stage whose first step runs Muon"""
    carry_momentum: bool = False
    """seed Muon's momentum with AdamW's first moment (default: fresh)"""
    restart: Literal["all", "hidden"] | None = None
    """unset: 'all' under xmodel, else 'hidden'"""
    muon_fuse: bool | None = None
    """unset: true under xmodel, else false"""

    def restart_for(self, parametrization: str) -> str:
        return self.restart or ("all" if parametrization == "xmodel" else "hidden")

    def fuse_for(self, parametrization: str) -> bool:
        return self.muon_fuse if self.muon_fuse is not None else parametrization == "xmodel"

    def restart_source(self, parametrization: str) -> str:
        return "optimizer.restart" if self.restart is not None else \
            f"the {parametrization!r} default (optimizer.restart unset)"

    def fuse_source(self, parametrization: str) -> str:
        return "optimizer.muon_fuse" if self.muon_fuse is not None else \
            f"the {parametrization!r} default (optimizer.muon_fuse unset)"


@dataclass(frozen=True)
class Source:
    data: str
    weight: float
    name: str


@dataclass(frozen=True)
class Phase:
    """A run of steps with one batch shape."""

    steps: int
    seq_len: int
    global_batch: int
    micro_batch: int
    checkpointing: str | None = None  # the phase's own activation checkpointing (None: its stage's)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def accumulation(self, dp_size: int, where: str = "stage") -> int:
        """Micro-batches per optimizer step on each rank; a clear error when it does not divide."""
        per_step = self.micro_batch * dp_size
        if self.global_batch % per_step:
            raise ConfigError(f"{where}.global_batch = {self.global_batch} is not divisible by micro_batch "
                              f"({self.micro_batch}) x data-parallel size ({dp_size}) = {per_step}; "
                              "global batch = micro_batch x accumulation x data-parallel size")
        return self.global_batch // per_step


@dataclass(frozen=True)
class Stage:
    name: str
    start_step: int
    phases: tuple[Phase, ...]
    lr_shape: str
    lr_start: float  # factor on the peak LR at the stage start (when lr_start_abs is None)
    lr_end: float  # factor at its last step (when lr_end_abs is None)
    mixture: tuple[Source, ...]
    optimizer: str  # "adamw" or "muon": the hidden matrices' optimizer in this stage
    lr_start_abs: float | None = None  # absolute LR of every group at the start
    lr_end_abs: float | None = None  # absolute LR of every group at the end
    checkpointing: str | None = None  # activation checkpointing of this stage (None: the run's default)

    @property
    def steps(self) -> int:
        return sum(p.steps for p in self.phases)

    @property
    def end_step(self) -> int:
        """One past the stage's last step."""
        return self.start_step + self.steps

    @property
    def tokens(self) -> int:
        return sum(p.steps * p.tokens_per_step for p in self.phases)

    def policy(self, phase: Phase, default: str) -> str:
        """The activation checkpointing of ``phase``: its own, else this stage's, else ``default`` (the run's)."""
        return phase.checkpointing or self.checkpointing or default

    def segment(self) -> Segment:
        return Segment(self.lr_shape, self.steps, self.lr_start, self.lr_end, self.lr_start_abs, self.lr_end_abs)

    def phase_at(self, step: int) -> tuple[int, Phase]:
        """(index, phase) of global step ``step`` inside this stage."""
        t = step - self.start_step
        for i, p in enumerate(self.phases):
            if t < p.steps:
                return i, p
            t -= p.steps
        raise IndexError(f"step {step} is not in stage {self.name!r}")


@dataclass(frozen=True)
class StagePlan:
    stages: tuple[Stage, ...]
    switch: SwitchSpec
    hidden_peak_lr: float  # the AdamW hidden-matrix LR at the target width (the logged LR factor's unit)

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end_step

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    @property
    def switch_step(self) -> int | None:
        """The first step on Muon, or None for an AdamW-only run."""
        for s in self.stages:
            if s.optimizer == "muon":
                return s.start_step
        return None

    def schedule(self) -> Schedule:
        return Schedule([s.segment() for s in self.stages])

    def stage_at(self, step: int) -> tuple[int, Stage]:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the run's {self.total_steps} steps")
        i = bisect.bisect_right([s.start_step for s in self.stages], step) - 1
        return i, self.stages[i]

    def phases(self):
        """(stage index, stage, phase index, phase) for every phase, in order."""
        for i, s in enumerate(self.stages):
            for j, p in enumerate(s.phases):
                yield i, s, j, p

    def validate_parallel(self, dp_size: int) -> None:
        """Every phase's global batch divides into micro-batches over ``dp_size`` ranks."""
        for i, s, j, p in self.phases():
            p.accumulation(dp_size, phase_where(i, s, j))


def phase_where(i: int, stage: Stage, j: int) -> str:
    return f"stages[{i}] ({stage.name})" + (f".phases[{j}]" if len(stage.phases) > 1 else "")


def hidden_peak_lr(shape: RunShape, hp: HParams) -> float:
    """The AdamW LR of a hidden matrix at this width (the unit of the logged LR factor)."""
    return resolve_role(Role.ATTN_QKV, shape.model, shape.param, hp, "adamw").lr


def parse_mixture(value, where: str) -> tuple[Source, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} = {value!r} must be a non-empty list of {{data, weight, name}} tables")
    tables = [parse(SourceTable, item, f"{where}[{k}]") for k, item in enumerate(value)]
    total = sum(t.weight for t in tables)
    return tuple(Source(data=t.data, weight=t.weight / total, name=t.name or f"source{k}")
                 for k, t in enumerate(tables))


def _phases(table: StageTable, where: str, max_seq_len: int) -> tuple[Phase, ...]:
    fields = ("steps", "seq_len", "global_batch", "micro_batch")
    defaults = {k: getattr(table, k) for k in fields if getattr(table, k) is not None}
    items = table.phases
    if items is not None:
        if not items:
            raise ConfigError(f"{where}.phases must be a non-empty list of tables")
        defaults.pop("steps", None)
    phases = []
    for j, item in enumerate(items or [PhaseTable()]):
        pw = f"{where}.phases[{j}]" if items is not None else where
        merged = {**defaults, **{k: getattr(item, k) for k in fields if getattr(item, k) is not None}}
        for k in fields:
            if k not in merged:
                raise ConfigError(f"{pw}.{k} is missing (set it on the stage or the phase)")
        own = item.activation_checkpointing if items is not None else None
        phase = Phase(**merged, checkpointing=own)
        if phase.seq_len > max_seq_len:
            raise ConfigError(f"{pw}.seq_len = {phase.seq_len} exceeds model.max_seq_len = {max_seq_len}")
        if phase.global_batch % phase.micro_batch:
            raise ConfigError(f"{pw}.global_batch = {phase.global_batch} is not divisible by "
                              f"micro_batch = {phase.micro_batch}")
        phases.append(phase)
    if items is not None and table.steps is not None and table.steps != sum(p.steps for p in phases):
        raise ConfigError(f"{where}.steps = {table.steps} != the sum of its phases' steps "
                          f"({sum(p.steps for p in phases)})")
    return tuple(phases)


def _lr(spec: LRSpec, where: str, prev: tuple[float, float | None] | None) -> tuple[float, float, float | None,
                                                                                   float | None]:
    """(start factor, end factor, start absolute, end absolute) of a stage."""
    start, start_abs = 0.0, spec.start_lr
    if spec.start is not None:
        start = spec.start
    elif start_abs is None:
        if prev is not None:
            start, start_abs = prev
        else:
            start = 0.0 if spec.shape == "linear" else 1.0
    end, end_abs = start, spec.end_lr
    if spec.end is not None:
        end = spec.end
    elif end_abs is None:
        if spec.shape == "constant":
            end, end_abs = start, start_abs
        else:
            raise ConfigError(f"{where}.lr.end is missing: a {spec.shape} stage needs end (a factor on the "
                              "peak LR) or end_lr (an absolute LR)")
    if spec.shape == "constant" and (end, end_abs) != (start, start_abs):
        raise ConfigError(f"{where}.lr: a constant stage has end = start, got start = "
                          f"{start_abs if start_abs is not None else start} and end = "
                          f"{end_abs if end_abs is not None else end}")
    return float(start), float(end), start_abs, end_abs


def parse_stages(raw: dict, shape: RunShape, hp: HParams | None = None) -> StagePlan:
    """The ``[[stages]]``, ``[optimizer]`` and ``[data]`` tables of a config as a checked StagePlan."""
    hp = hp or HParams()
    raw_stages = raw.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError("stages: the config needs a non-empty [[stages]] list")
    switch = parse(SwitchSpec, raw.get("optimizer"), "optimizer")
    data = raw.get("data", {})
    if not isinstance(data, dict):
        raise ConfigError("data must be a table")
    default_mixture = parse_mixture(data["mixture"], "data.mixture") if data.get("mixture") is not None else None
    names = [s.get("name") if isinstance(s, dict) else None for s in raw_stages]
    if switch.switch and switch.switch_stage not in names:
        raise ConfigError(f"optimizer.switch_stage = {switch.switch_stage!r} is not a stage name; "
                          f"stages are {names} (or set optimizer.switch = false)")
    stages: list[Stage] = []
    start_step = 0
    prev: tuple[float, float | None] | None = None
    optimizer = "adamw"
    for i, rs in enumerate(raw_stages):
        name = rs.get("name") if isinstance(rs, dict) else None
        where = f"stages[{i}]" + (f" ({name})" if isinstance(name, str) and name else "")
        table = parse(StageTable, rs, where)
        if names.count(table.name) > 1:
            raise ConfigError(f"{where}.name = {table.name!r} is used by more than one stage")
        phases = _phases(table, where, shape.model.max_seq_len)
        lr_start, lr_end, start_abs, end_abs = _lr(table.lr, where, prev)
        if table.mixture is not None:
            mixture = parse_mixture(rs["mixture"], f"{where}.mixture")
        elif default_mixture is not None:
            mixture = default_mixture
        else:
            raise ConfigError(f"{where}.mixture is missing and there is no [data].mixture default")
        if switch.switch and table.name == switch.switch_stage:
            optimizer = "muon"
        stage = Stage(name=table.name, start_step=start_step, phases=phases, lr_shape=table.lr.shape,
                      lr_start=lr_start, lr_end=lr_end, mixture=mixture, optimizer=optimizer,
                      lr_start_abs=start_abs, lr_end_abs=end_abs, checkpointing=table.activation_checkpointing)
        stages.append(stage)
        start_step = stage.end_step
        prev = (lr_end, end_abs)
    return StagePlan(stages=tuple(stages), switch=switch, hidden_peak_lr=hidden_peak_lr(shape, hp))


def describe_stages(raw: dict, shape: RunShape, hp: HParams | None = None) -> list[dict]:
    """One dict per stage: steps, batch and sequence phases, tokens, LR factors and per-group LRs."""
    from mutransfer.build import build_model
    from mutransfer.parametrization import param_groups
    from mutransfer.transformer_spec import transformer_spec

    if hp is None:
        hp = hparams_from(raw.get("hparams", {}))
    plan = parse_stages(raw, shape, hp)
    model = build_model(shape, hp, device="meta")
    peaks = {}
    for kind in ("adamw", "muon"):
        groups = param_groups(model, shape.model, shape.param, hp, kind, roles=transformer_spec(shape.model).roles)
        peaks[kind] = {f"{opt}/{g['role']}": g["base_lr"] for opt, gs in groups.items() for g in gs}
    out = []
    for s in plan.stages:
        seg = s.segment()
        out.append({
            "name": s.name,
            "start_step": s.start_step,
            "steps": s.steps,
            "phases": [{"steps": p.steps, "seq_len": p.seq_len, "global_batch": p.global_batch,
                        "micro_batch": p.micro_batch, "tokens_per_step": p.tokens_per_step} for p in s.phases],
            "tokens": s.tokens,
            "optimizer": s.optimizer,
            "lr_shape": s.lr_shape,
            "lr_start_factor": seg.start_factor(plan.hidden_peak_lr),
            "lr_end_factor": seg.end_factor(plan.hidden_peak_lr),
            "lr_by_group": {k: {"peak": v, "start": v * seg.start_factor(v), "end": v * seg.end_factor(v)}
                            for k, v in peaks[s.optimizer].items()},
            "mixture": [{"data": m.data, "weight": m.weight, "name": m.name} for m in s.mixture],
        })
    return out


def _tokens(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def format_stages(stages: list[dict]) -> str:
    """The stage table ``mutransfer plan`` prints, then each stage's per-group LRs (start -> end)."""
    lines = [f"{'stage':<14} {'steps':>9} {'start':>9} {'batch x seq (micro)':<28} {'tokens/step':>11} "
             f"{'tokens':>10} {'LR factor':<22} {'optim':<6} mixture"]
    total = 0
    for s in stages:
        for j, p in enumerate(s["phases"]):
            first = j == 0
            shape = f"{p['global_batch']} x {p['seq_len']} ({p['micro_batch']})"
            lr = f"{s['lr_shape']} {s['lr_start_factor']:.4g} -> {s['lr_end_factor']:.4g}" if first else ""
            mix = ", ".join(f"{m['name']} {100 * m['weight']:.1f}%" for m in s["mixture"]) if first else ""
            name, start = (s["name"], s["start_step"]) if first else ("", "")
            lines.append(f"{name:<14} {p['steps']:>9} {start:>9} "
                         f"{shape:<28} {_tokens(p['tokens_per_step']):>11} "
                         f"{_tokens(p['steps'] * p['tokens_per_step']):>10} {lr:<22} "
                         f"{s['optimizer'] if first else '':<6} {mix}")
        total += s["tokens"]
    steps = sum(s["steps"] for s in stages)
    binary = f" = {total / 2**40:.3f} x 2^40" if total > 1e11 else ""
    lines.append(f"{'total':<14} {steps:>9} {'':>9} {'':<28} {'':>11} {_tokens(total):>10} "
                 f"({total:.4g} tokens{binary})")
    lines += ["", "LR per parameter group at the target width, stage start -> end "
              "(peak from the muP table x the stage's factors; an absolute end_lr is every group's end):"]
    groups = sorted({k for s in stages for k in s["lr_by_group"]})
    lines.append(f"{'group':<18} " + " ".join(f"{s['name'][:19]:>19}" for s in stages))
    for g in groups:
        cells = []
        for s in stages:
            v = s["lr_by_group"].get(g)
            cells.append(f"{v['start']:.2e}->{v['end']:.2e}" if v else f"{'-':>19}")
        lines.append(f"{g:<18} " + " ".join(cells))
    if any(k.startswith("muon/") for k in groups):
        lines.append("(muon/*: the LR handed to Muon, which scales it by its adjust_lr_fn, "
                     "e.g. match_rms_adamw: 0.2 sqrt(max(fan_out, fan_in)))")
    return "\n".join(lines)
