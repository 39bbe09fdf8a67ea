"""What a coordinate check trains (``CoordConfig``) and its defaults: plain data, no torch, so the
command line can describe its options without loading the recorder (``mutransfer.coord``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from mutransfer.config import (
    Config,
    ConfigError,
    HParams,
    NonNegFloat,
    NonNegInt,
    OptimizerName,
    Parametrization,
    PosFloat,
    PosInt,
    Precision,
    RunShape,
    SpecArg,
    updated,
)
from mutransfer.presets import get_preset
from mutransfer.tracking.settings import TrackingSettings

# Default base LR per optimizer, applied from step 0 with no warmup, so every step of the check
# moves the weights more than the same step of a training run, which warms up (RECIPE section 6:
# "LR above the training LR"). AdamW: the base eta of HParams. Higher constant AdamW LRs (0.015 and
# up) throw the narrowest width of the tiny family (64: 4 heads) into a loss-spike transient whose
# timing depends on width, which reads as slopes of 0.1 to 0.3 (docs/coord_check.md). Muon: its
# RMS-matched update (0.2 sqrt(max(A, B)) eta) is about 5x smaller than AdamW's first sign-like
# steps, so at 0.01 the initial output logits (which shrink with width) still dominate at step 2.
DEFAULT_LR = {"adamw": 0.01, "muon": 0.02}
WIDTH_DOUBLINGS = 4  # default grid: the preset's width times 1, 2, 4, 8, 16


class CoordConfig(Config):
    """What a coordinate check trains. Base hyperparameters other than the LR are HParams' defaults.

    The check moves along one axis: ``widths`` (at the preset's depth) or ``depths`` (at the
    preset's width); give one of them, or neither for the default width grid.
    """

    preset: str = "tiny"
    """the model family (tiny, proxy-20m, xmodel25-1.3b) whose widths or depths are checked"""
    spec: str | None = None
    """a user's model, "package.module:factory" (mutransfer.spec), instead of the preset"""
    spec_args: dict[str, SpecArg] = Field(default_factory=dict)
    """the factory's keyword arguments"""
    widths: list[PosInt] = Field(default_factory=list)
    """empty: default_widths(preset), unless depths"""
    depths: list[PosInt] = Field(default_factory=list)
    """the depth axis (slopes against log2 depth)"""
    steps: PosInt = 10
    """training steps recorded per run"""
    seeds: PosInt = 3
    """runs per width (depth); slopes get an interval across seeds"""
    lr: PosFloat | None = None
    """None: DEFAULT_LR[optimizer]"""
    optimizer: OptimizerName = "adamw"
    """adamw | muon"""
    param: Parametrization = "mup"
    """the parametrization checked (mup passes, sp fails)"""
    precision: Precision = "fp32"
    """fp32 | bf16 | fp8-emulated (the check runs on CPU)"""
    batch_size: PosInt = 4
    """sequences per step"""
    seq_len: PosInt = 64
    """tokens per sequence"""
    data_seed: NonNegInt = 0
    """which batches are drawn"""
    fix_data: bool = True
    """one batch at every step (mup's default); False: the batch of (data_seed, step)"""
    grad_clip: NonNegFloat = 0.0
    """clipping by the global norm couples layers across widths; off by default"""
    update_tokens: NonNegInt = 64
    """tokens of the batch on which dW x is measured (evenly spaced); 0: all"""
    threshold: Annotated[float, Field(gt=0, lt=10)] = 0.1
    """largest |slope| of log2 size against log2 width (depth) that passes"""
    device: str = "cpu"
    """cpu | cuda | cuda:N | auto"""
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    """a tracker run per width (depth) and seed"""

    @model_validator(mode="after")
    def _check(self) -> CoordConfig:
        if self.widths and self.depths:
            raise ValueError("give widths or depths (one axis at a time), not both")
        values = self.axis_values()
        if len(set(values)) < 2 or len(set(values)) != len(values):
            raise ValueError(f"{self.axis}s = {list(values)}: need at least two distinct values, no repeats, "
                             "to fit a slope")
        if self.spec is None and self.seq_len > get_preset(self.preset).model.max_seq_len:
            raise ValueError(f"seq_len = {self.seq_len} exceeds the preset's max_seq_len = "
                             f"{get_preset(self.preset).model.max_seq_len}")
        return self

    @property
    def name(self) -> str:
        """What is checked: the preset's name, or the spec's target."""
        return self.spec or self.preset

    def base_shape(self) -> RunShape:
        """The model at its own width and depth with its base shape: the preset, or the spec's
        (imported here: the model's package loads only when the check runs)."""
        if self.spec is None:
            return get_preset(self.preset)
        from mutransfer.plan import shape_from_config

        shape = shape_from_config({"model": {"spec": self.spec, "args": dict(self.spec_args)}}, "coord-check")
        if self.seq_len > shape.model.max_seq_len:
            raise ConfigError(f"coord-check.seq_len = {self.seq_len} exceeds the spec's max_seq_len = "
                              f"{shape.model.max_seq_len}")
        return shape

    @property
    def axis(self) -> str:
        return "depth" if self.depths else "width"

    def axis_values(self) -> list[int]:
        if self.depths:
            return list(self.depths)
        if self.widths:
            return list(self.widths)
        return default_widths(self.preset) if self.spec is None else \
            [self.base_shape().model.d_model * 2**k for k in range(WIDTH_DOUBLINGS + 1)]

    def resolved(self) -> CoordConfig:
        """The same config with the default width grid and LR filled in."""
        lr = self.lr if self.lr is not None else DEFAULT_LR.get(self.optimizer, DEFAULT_LR["adamw"])
        widths = [] if self.depths else self.axis_values()
        return updated(self, "coord-check", widths=widths, lr=lr)

    def check_device(self) -> None:
        import torch

        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ConfigError(f"device = {self.device!r} is not a torch device: {e}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device = {self.device!r}: CUDA is not available on this machine")

    def shapes(self) -> list[RunShape]:
        """The preset at every axis value, in the chosen parametrization, ascending."""
        from mutransfer.specs import at_depth, at_width

        base = self.base_shape()
        param = updated(base.param, "param", parametrization=self.param)
        out = []
        for value in sorted(self.axis_values()):
            model = at_depth(base.model, value) if self.axis == "depth" else at_width(base.model, value)
            out.append(RunShape(model=model, param=param))
        return out

    def hparams(self) -> HParams:
        return HParams(lr=self.resolved().lr, grad_clip=self.grad_clip)


def default_widths(preset: str) -> list[int]:
    """A x2 grid over 16x starting at the preset's own width (tiny: 64 ... 1024)."""
    d = get_preset(preset).model.d_model
    return [d * 2**k for k in range(WIDTH_DOUBLINGS + 1)]
