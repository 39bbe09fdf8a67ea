"""Learning-rate schedules as a list of segments: Warmup-Stable-Decay and its relatives.

A schedule gives a factor on each group's peak LR (``base_lr``) at every step. Within a segment
of T steps, step t (0-based) uses the fraction u = (t + 1) / T, so a warmup's last step reaches
its peak and a decay's last step reaches its floor. A segment's start or end may instead be an
absolute LR that every group reaches (the recipe's long-context floor, 1e-5 for every group): its
factor then depends on the group's peak, ``factor(step, peak)``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

SHAPES = ("linear", "constant", "exp")


@dataclass(frozen=True)
class Segment:
    shape: str  # linear | constant | exp
    steps: int
    start: float  # factor at the segment's start
    end: float  # factor at the segment's end (ignored for constant)
    start_abs: float | None = None  # or: the absolute LR every group starts at
    end_abs: float | None = None  # or: the absolute LR every group ends at

    def start_factor(self, peak: float = 1.0) -> float:
        return self.start if self.start_abs is None else self.start_abs / peak

    def end_factor(self, peak: float = 1.0) -> float:
        return self.end if self.end_abs is None else self.end_abs / peak

    def factor(self, t: int, peak: float = 1.0) -> float:
        u = (t + 1) / self.steps
        start, end = self.start_factor(peak), self.end_factor(peak)
        if self.shape == "constant":
            return start
        if self.shape == "linear":
            return start + (end - start) * u
        if self.shape == "exp":
            # RECIPE section 4: lr = min + (peak - min) * (2 * 0.5**(t/T) - 1)
            return end + (start - end) * (2.0 * 0.5**u - 1.0)
        raise ValueError(f"schedule shape {self.shape!r}: allowed {list(SHAPES)}")


class Schedule:
    """Piecewise schedule; after the last segment the last factor holds."""

    def __init__(self, segments: list[Segment]):
        for i, s in enumerate(segments):
            if s.shape not in SHAPES:
                raise ValueError(f"schedule segment {i}: shape = {s.shape!r}; allowed {list(SHAPES)}")
            if s.steps <= 0:
                raise ValueError(f"schedule segment {i}: steps = {s.steps} must be positive")
        self.segments = list(segments)
        self.starts = []
        total = 0
        for s in self.segments:
            self.starts.append(total)
            total += s.steps
        self.total_steps = total

    def factor(self, step: int, peak: float = 1.0) -> float:
        """The factor on a group's peak LR ``peak`` at ``step`` (``peak`` matters only for absolute ends)."""
        if not self.segments:
            return 1.0
        if step >= self.total_steps:
            last = self.segments[-1]
            return last.factor(last.steps - 1, peak)
        i = bisect.bisect_right(self.starts, step) - 1
        return self.segments[i].factor(step - self.starts[i], peak)


def wsd(total_steps: int, warmup: int, decay: int, final_ratio: float = 1 / 16) -> Schedule:
    """Warmup (linear from 0) - Stable (constant 1) - Decay (exponential to ``final_ratio``)."""
    if warmup + decay > total_steps:
        raise ValueError(f"warmup ({warmup}) + decay ({decay}) exceed the run's {total_steps} steps")
    segs = []
    if warmup:
        segs.append(Segment("linear", warmup, 0.0, 1.0))
    if total_steps - warmup - decay:
        segs.append(Segment("constant", total_steps - warmup - decay, 1.0, 1.0))
    if decay:
        segs.append(Segment("exp", decay, 1.0, final_ratio))
    return Schedule(segs)
