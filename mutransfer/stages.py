"""A multi-stage run as plain data: stages, their batch and sequence steps, LR shapes, data mixtures.

A full-scale config lists ``[[stages]]`` in order (RECIPE section 4: warmup, stable S1, stable S2,
decay, long context). Each stage has

- ``name``, and either ``steps``, ``global_batch``, ``micro_batch``, ``seq_len`` or a list of
  ``[[stages.phases]]`` (long context raises the sequence length in steps; a phase may also change
  the global and micro batch, e.g. to keep tokens per step fixed). Stage-level values are the
  phases' defaults.
- ``lr = {shape, start, end}`` with shape ``linear | constant | exp``, as factors on every parameter
  group's peak LR (``base_lr`` from the muP table at the target width). ``start`` defaults to the
  previous stage's end (0 for a first linear stage, 1 for another first stage), so a run is
  continuous unless it says otherwise. ``end_lr`` gives the end instead as an *absolute* LR of the
  hidden matrices: the factor is ``end_lr / peak``, where ``peak`` is the AdamW hidden-matrix LR
  at the target width (the recipe's "1.667e-3 hidden"). The recipe's long-context floor 1e-5 is
  written that way; every group (embedding included) gets the same factor.
- ``mixture = [{name, data, weight}, ...]``: data sources sampled in proportion to weight
  (normalised). Without one the stage uses ``[data].mixture``.

The optimizer switch is ``[optimizer] switch`` (default true) at ``switch_stage`` (default
"decay"): stages from there on put the 2-D hidden matrices on Muon, the others on AdamW.

Global batch = micro batch x accumulation x data-parallel size; ``accumulation`` checks that
it divides, naming the field. Nothing here touches tensors: ``plan`` and the trainer share it.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

from mutransfer.config import ConfigError, HParams, RunShape, from_mapping
from mutransfer.parametrization import resolve
from mutransfer.schedule import SHAPES, Schedule, Segment


@dataclass(frozen=True)
class Source:
    """One data source of a mixture: a dataset spec (``builtin`` or a prepared dir) and its weight."""

    data: str
    weight: float = 1.0
    name: str = ""


@dataclass(frozen=True)
class Phase:
    """A run of steps with one batch shape."""

    steps: int
    seq_len: int
    global_batch: int
    micro_batch: int

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
class LRSpec:
    """The raw ``lr`` table of a stage (factors on the peak LR, or an absolute hidden-matrix end)."""

    shape: str
    start: float | None = None
    end: float | None = None
    end_lr: float | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    start_step: int
    phases: tuple[Phase, ...]
    lr_shape: str
    lr_start: float  # factor on the peak LR at the stage start
    lr_end: float  # factor at its last step
    mixture: tuple[Source, ...]
    optimizer: str  # "adamw" or "muon": the hidden matrices' optimizer in this stage

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

    def segment(self) -> Segment:
        return Segment(self.lr_shape, self.steps, self.lr_start, self.lr_end)

    def phase_at(self, step: int) -> tuple[int, Phase]:
        """(index, phase) of global step ``step`` inside this stage."""
        t = step - self.start_step
        for i, p in enumerate(self.phases):
            if t < p.steps:
                return i, p
            t -= p.steps
        raise IndexError(f"step {step} is not in stage {self.name!r}")


@dataclass(frozen=True)
class SwitchSpec:
    """``[optimizer]``: whether and where the hidden matrices move from AdamW to Muon."""

    switch: bool = True
    switch_stage: str = "decay"
    carry_momentum: bool = False  # seed Muon's momentum with AdamW's first moment (default: fresh)


@dataclass(frozen=True)
class StagePlan:
    stages: tuple[Stage, ...]
    switch: SwitchSpec
    hidden_peak_lr: float  # the AdamW hidden-matrix LR at the target width; ``end_lr`` divides by it

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

    def validate_parallel(self, dp_size: int) -> None:
        """Every phase's global batch divides into micro-batches over ``dp_size`` ranks."""
        for i, s in enumerate(self.stages):
            for j, p in enumerate(s.phases):
                where = f"stages[{i}] ({s.name})" + (f".phases[{j}]" if len(s.phases) > 1 else "")
                p.accumulation(dp_size, where)


_STAGE_KEYS = ("name", "steps", "global_batch", "micro_batch", "seq_len", "phases", "lr", "mixture")
_PHASE_FIELDS = ("steps", "seq_len", "global_batch", "micro_batch")


def hidden_peak_lr(shape: RunShape, hp: HParams) -> float:
    """The AdamW LR of a hidden matrix at this width: what an absolute ``end_lr`` is relative to."""
    return resolve("layers.0.attention.wq.weight", shape.model, shape.param, hp, "adamw").lr


def _positive_int(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where} = {value!r} must be a positive integer")
    return value


def parse_mixture(value, where: str) -> tuple[Source, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} = {value!r} must be a non-empty list of {{data, weight, name}} tables")
    sources = []
    for k, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}[{k}] = {item!r} must be a table {{data = ..., weight = ...}}")
        src = from_mapping(Source, item, f"{where}[{k}]")
        if not src.weight > 0:
            raise ConfigError(f"{where}[{k}].weight = {src.weight} must be > 0")
        sources.append(dataclasses.replace(src, name=src.name or f"source{k}"))
    total = sum(s.weight for s in sources)
    return tuple(dataclasses.replace(s, weight=s.weight / total) for s in sources)


def _parse_phases(raw: dict, where: str, max_seq_len: int) -> tuple[Phase, ...]:
    defaults = {k: raw[k] for k in _PHASE_FIELDS if k in raw}
    raw_phases = raw.get("phases")
    if raw_phases is None:
        raw_phases = [{}]
        steps_total = None
    else:
        if not isinstance(raw_phases, list) or not raw_phases:
            raise ConfigError(f"{where}.phases must be a non-empty list of tables")
        defaults.pop("steps", None)
        steps_total = raw.get("steps")
    phases = []
    for j, item in enumerate(raw_phases):
        pw = f"{where}.phases[{j}]" if raw.get("phases") is not None else where
        if not isinstance(item, dict):
            raise ConfigError(f"{pw} = {item!r} must be a table")
        unknown = sorted(set(item) - set(_PHASE_FIELDS))
        if unknown:
            raise ConfigError(f"{pw}: unknown field(s) {unknown}; allowed: {list(_PHASE_FIELDS)}")
        merged = {**defaults, **item}
        for k in _PHASE_FIELDS:
            if k not in merged:
                raise ConfigError(f"{pw}.{k} is missing (set it on the stage or the phase)")
            _positive_int(merged[k], f"{pw}.{k}")
        phase = Phase(**{k: merged[k] for k in _PHASE_FIELDS})
        if phase.seq_len > max_seq_len:
            raise ConfigError(f"{pw}.seq_len = {phase.seq_len} exceeds model.max_seq_len = {max_seq_len}")
        if phase.global_batch % phase.micro_batch:
            raise ConfigError(f"{pw}.global_batch = {phase.global_batch} is not divisible by "
                              f"micro_batch = {phase.micro_batch}")
        phases.append(phase)
    if steps_total is not None and steps_total != sum(p.steps for p in phases):
        raise ConfigError(f"{where}.steps = {steps_total} != the sum of its phases' steps "
                          f"({sum(p.steps for p in phases)})")
    return tuple(phases)


def _lr_factors(spec: LRSpec, where: str, prev_end: float | None, peak: float
                ) -> tuple[float, float]:
    if spec.shape not in SHAPES:
        raise ConfigError(f"{where}.lr.shape = {spec.shape!r} is not allowed; choose one of {list(SHAPES)}")
    if spec.start is not None:
        start = spec.start
    elif prev_end is not None:
        start = prev_end
    else:
        start = 0.0 if spec.shape == "linear" else 1.0
    if spec.end is not None and spec.end_lr is not None:
        raise ConfigError(f"{where}.lr: give end (a factor) or end_lr (an absolute hidden-matrix LR), "
                          "not both")
    if spec.end_lr is not None:
        if not spec.end_lr > 0:
            raise ConfigError(f"{where}.lr.end_lr = {spec.end_lr} must be > 0")
        end = spec.end_lr / peak
    elif spec.end is not None:
        end = spec.end
    elif spec.shape == "constant":
        end = start
    else:
        raise ConfigError(f"{where}.lr.end is missing: a {spec.shape} stage needs end (a factor on the "
                          "peak LR) or end_lr (an absolute hidden-matrix LR)")
    if spec.shape == "constant" and end != start:
        raise ConfigError(f"{where}.lr: a constant stage has end = start ({start}), got end = {end}")
    if start < 0 or end < 0:
        raise ConfigError(f"{where}.lr: start = {start} and end = {end} must be >= 0")
    return float(start), float(end)


def parse_stages(raw: dict, shape: RunShape, hp: HParams | None = None) -> StagePlan:
    """The ``[[stages]]``, ``[optimizer]`` and ``[data]`` tables of a config as a checked StagePlan."""
    hp = hp or HParams()
    raw_stages = raw.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError("stages: the config needs a non-empty [[stages]] list")
    switch = from_mapping(SwitchSpec, raw.get("optimizer", {}), "optimizer")
    data = raw.get("data", {})
    if not isinstance(data, dict):
        raise ConfigError("data must be a table")
    default_mixture = parse_mixture(data["mixture"], "data.mixture") if "mixture" in data else None
    names = [s.get("name") if isinstance(s, dict) else None for s in raw_stages]
    if switch.switch and switch.switch_stage not in names:
        raise ConfigError(f"optimizer.switch_stage = {switch.switch_stage!r} is not a stage name; "
                          f"stages are {names} (or set optimizer.switch = false)")
    peak = hidden_peak_lr(shape, hp)
    stages: list[Stage] = []
    start_step = 0
    prev_end: float | None = None
    optimizer = "adamw"
    for i, rs in enumerate(raw_stages):
        where = f"stages[{i}]"
        if not isinstance(rs, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = sorted(set(rs) - set(_STAGE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {list(_STAGE_KEYS)}")
        name = rs.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name is missing or not a string")
        if names.count(name) > 1:
            raise ConfigError(f"{where}.name = {name!r} is used by more than one stage")
        where = f"stages[{i}] ({name})"
        phases = _parse_phases(rs, where, shape.model.max_seq_len)
        if not isinstance(rs.get("lr"), dict):
            raise ConfigError(f"{where}.lr must be a table {{shape = 'linear' | 'constant' | 'exp', ...}}")
        lr = from_mapping(LRSpec, rs["lr"], f"{where}.lr")
        lr_start, lr_end = _lr_factors(lr, where, prev_end, peak)
        if "mixture" in rs:
            mixture = parse_mixture(rs["mixture"], f"{where}.mixture")
        elif default_mixture is not None:
            mixture = default_mixture
        else:
            raise ConfigError(f"{where}.mixture is missing and there is no [data].mixture default")
        if switch.switch and name == switch.switch_stage:
            optimizer = "muon"
        stage = Stage(name=name, start_step=start_step, phases=phases, lr_shape=lr.shape, lr_start=lr_start,
                      lr_end=lr_end, mixture=mixture, optimizer=optimizer)
        stages.append(stage)
        start_step = stage.end_step
        prev_end = lr_end
    return StagePlan(stages=tuple(stages), switch=switch, hidden_peak_lr=peak)


def describe_stages(raw: dict, shape: RunShape, hp: HParams | None = None) -> list[dict]:
    """One dict per stage: steps, batch and sequence phases, tokens, LR factors and per-group LRs."""
    from mutransfer.build import build_model
    from mutransfer.parametrization import param_groups

    if hp is None:
        from mutransfer.plan import hparams_from

        hp = hparams_from(raw.get("hparams", {}))
    plan = parse_stages(raw, shape, hp)
    model = build_model(shape, hp, device="meta")
    peaks = {}
    for kind in ("adamw", "muon"):
        groups = param_groups(model, shape.model, shape.param, hp, kind)
        peaks[kind] = {f"{opt}/{g['role']}": g["base_lr"] for opt, gs in groups.items() for g in gs}
    out = []
    for s in plan.stages:
        out.append({
            "name": s.name,
            "start_step": s.start_step,
            "steps": s.steps,
            "phases": [dataclasses.asdict(p) | {"tokens_per_step": p.tokens_per_step} for p in s.phases],
            "tokens": s.tokens,
            "optimizer": s.optimizer,
            "lr_shape": s.lr_shape,
            "lr_start_factor": s.lr_start,
            "lr_end_factor": s.lr_end,
            "lr_by_group": {k: {"peak": v, "start": v * s.lr_start, "end": v * s.lr_end}
                            for k, v in peaks[s.optimizer].items()},
            "mixture": [dataclasses.asdict(m) for m in s.mixture],
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
              "(peak from the muP table x the stage's factors):"]
    groups = sorted({k for s in stages for k in s["lr_by_group"]})
    lines.append(f"{'group':<18} " + " ".join(f"{s['name'][:19]:>19}" for s in stages))
    for g in groups:
        cells = []
        for s in stages:
            v = s["lr_by_group"].get(g)
            cells.append(f"{v['start']:.2e}->{v['end']:.2e}" if v else f"{'-':>19}")
        lines.append(f"{g:<18} " + " ".join(cells))
    if any(k.startswith("muon/") for k in groups):
        lines.append("(muon/*: the LR handed to torch.optim.Muon, which scales it by its adjust_lr_fn, "
                     "e.g. match_rms_adamw: 0.2 sqrt(max(fan_out, fan_in)))")
    return "\n".join(lines)
