"""FP8 on any device by fake quantization: Transformer Engine's HYBRID delayed scaling, emulated.

What it imitates (RECIPE section 5): in the forward pass a linear's input and weight are cast to
E4M3, in the backward pass the output gradient is cast to E5M2; each of the three tensors has a
per-tensor scale from delayed scaling -- the scale used at a step comes from the amax history of
*earlier* steps, ``scale = fp8_max / max(history) / 2**margin`` -- and values beyond the format's
range saturate. The GEMMs run in float32 on the FP8 values and the product is multiplied by the
two inverse scales, as an FP8 GEMM with float32 accumulation does. So the rounding, the range and
the staleness of the scales are those of FP8 training; only the speed is not.

Decisions, where TE leaves room or the emulation has to choose:
- First step. TE starts from scale 1. Here a tensor whose history is still empty (all zero) is
  scaled from its own current amax (just-in-time). With scale 1 the output gradients of the first
  step (~1e-6) would flush to zero in E5M2 (smallest subnormal 2**-16), and a fresh model
  evaluated before any training step would compute with badly scaled weights; neither says
  anything about FP8 training in steady state. From the second step on the scaling is TE's.
- A zero or non-finite amax in the history gives scale 1 (TE keeps the previous scale instead;
  a run with an inf in its history has diverged anyway).
- Only training steps record: the history is updated when the module is in training mode and
  grad mode is on, once per forward (input, weight) and once per backward (grad_output).
  Evaluation (``model.eval()`` or ``torch.no_grad()``) uses the current scales and leaves the
  history alone, so interleaved evaluation does not change training. Each micro-batch counts
  as a step (TE reduces amaxes per ``fp8_autocast`` region; the difference is a shorter
  effective window under gradient accumulation).
- Activation checkpointing. The forward that backward recomputes is not a step: inside
  ``activation_recompute()`` (entered by the model's checkpointing around each recomputation) a
  training-mode linear reuses the two scales its original forward used -- kept in the
  non-persistent buffer ``fp8_forward_scales`` -- and records nothing. Its recomputed FP8
  operands are then bit-identical to the saved ones of a run without checkpointing, and the
  history advances once per step, as TE's own checkpoint keeps it. (Computing the scales afresh
  would use a history that already holds this step's amax.) This assumes no other training
  forward of the same linear runs between a forward and its recomputation, which holds for
  forward-then-backward per micro-batch. Under ``torch.compile`` the recomputation is part of
  the compiled backward graph and this Python code does not run again.
- State. The history is one float32 buffer ``fp8_amax_history`` of shape (history_len, 3),
  newest row first, columns (input, weight, grad_output), like TE's (length, tensors) history.
  It is persistent, so a checkpoint resumes with the same scales (TE saves its FP8 meta in
  ``_extra_state`` for the same reason); a state dict without it (e.g. saved before
  ``prepare_model``) loads as an empty history. The buffer stays float32 when the module is cast
  (``.to(torch.bfloat16)``). The scales are not stored: they are a function of the history.
  After ``to_empty`` (meta-device init) call ``reset_amax_history()``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}  # 448, 57344

INPUT, WEIGHT, GRAD_OUTPUT = 0, 1, 2  # columns of the amax history
FP8_FORMATS = ("HYBRID", "E4M3")

_recompute_depth = 0  # > 0 inside activation_recompute()


@contextlib.contextmanager
def activation_recompute():
    """Marks forwards that repeat an earlier one (activation checkpointing): same scales, no amax recorded."""
    global _recompute_depth
    _recompute_depth += 1
    try:
        yield
    finally:
        _recompute_depth -= 1


@dataclass(frozen=True)
class DelayedScalingConfig:
    """TE's ``DelayedScaling`` recipe fields that the emulation honours (RECIPE section 5 values)."""

    fp8_format: str = "HYBRID"  # HYBRID: E4M3 forward, E5M2 backward; E4M3: E4M3 everywhere
    amax_history_len: int = 128
    amax_compute_algo: str = "max"  # "max" over the history, or "most_recent"
    margin: int = 0

    def __post_init__(self):
        if self.fp8_format not in FP8_FORMATS:
            raise ValueError(f"fp8_format = {self.fp8_format!r} is not allowed; "
                             f"choose one of {list(FP8_FORMATS)}")
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len = {self.amax_history_len} must be >= 1")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"amax_compute_algo = {self.amax_compute_algo!r} is not allowed; "
                             "choose one of ['max', 'most_recent']")

    @property
    def forward_dtype(self) -> torch.dtype:
        return E4M3

    @property
    def backward_dtype(self) -> torch.dtype:
        return E5M2 if self.fp8_format == "HYBRID" else E4M3


def to_fp8(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | float) -> torch.Tensor:
    """``x * scale`` cast to ``dtype`` with saturation (a plain cast would give NaN or inf)."""
    fmax = FP8_MAX[dtype]
    return (x.float() * scale).clamp(-fmax, fmax).to(dtype)


def quantize(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Fake quantization: ``x`` through ``dtype`` at ``scale`` and back, as float32."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return to_fp8(x, dtype, scale).float() * scale.reciprocal()


def delayed_scale(history: torch.Tensor, current_amax: torch.Tensor, fp8_max: float, margin: int = 0,
                  algo: str = "max") -> torch.Tensor:
    """The scale for this step from the amax ``history`` of earlier steps (newest first).

    ``fp8_max / amax / 2**margin``; an empty (all zero) history falls back to ``current_amax``
    (see the module docstring), and a zero or non-finite amax gives 1.
    """
    amax = history.max() if algo == "max" else history[0]
    amax = torch.where(amax > 0, amax, current_amax.float())
    scale = fp8_max / amax / 2.0**margin
    ok = (amax > 0) & torch.isfinite(amax) & torch.isfinite(scale)
    return torch.where(ok, scale, torch.ones_like(scale))


@torch.no_grad()
def _record(history: torch.Tensor, column: int, amax: torch.Tensor) -> None:
    """Roll one column of the history by a step and put ``amax`` in front."""
    history[:, column] = history[:, column].roll(1, 0)
    history[0, column] = amax


class _Fp8Matmul(torch.autograd.Function):
    """y = x W^T (+ b) with x, W in the forward format and dy in the backward format.

    ``record``: a training forward -- keep the scales in ``scales`` and advance the history.
    ``replay``: the recomputation of such a forward -- use ``scales``, record nothing.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, history, scales, cfg: DelayedScalingConfig, record: bool, replay: bool,
                out_dtype):
        x2 = x.reshape(-1, x.shape[-1])
        fwd = cfg.forward_dtype
        if replay:
            x_scale, w_scale = scales[INPUT], scales[WEIGHT]
        else:
            x_amax, w_amax = x2.abs().amax().float(), weight.abs().amax().float()
            x_scale = delayed_scale(history[:, INPUT], x_amax, FP8_MAX[fwd], cfg.margin, cfg.amax_compute_algo)
            w_scale = delayed_scale(history[:, WEIGHT], w_amax, FP8_MAX[fwd], cfg.margin, cfg.amax_compute_algo)
        x_q, w_q = to_fp8(x2, fwd, x_scale), to_fp8(weight, fwd, w_scale)
        if record:
            scales.copy_(torch.stack((x_scale, w_scale)))
            _record(history, INPUT, x_amax)
            _record(history, WEIGHT, w_amax)
        x_inv, w_inv = x_scale.reciprocal(), w_scale.reciprocal()
        out = (x_q.float() @ w_q.float().t()) * (x_inv * w_inv)
        if bias is not None:
            out = out + bias.float()
        ctx.save_for_backward(x_q, w_q, x_inv, w_inv)
        ctx.history, ctx.cfg, ctx.record = history, cfg, record
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        ctx.b_dtype = bias.dtype if bias is not None else None
        return out.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x_q, w_q, x_inv, w_inv = ctx.saved_tensors
        cfg, history = ctx.cfg, ctx.history
        bwd = cfg.backward_dtype
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        g_amax = g2.abs().amax().float()
        g_scale = delayed_scale(history[:, GRAD_OUTPUT], g_amax, FP8_MAX[bwd], cfg.margin,
                                cfg.amax_compute_algo)
        g_q = to_fp8(g2, bwd, g_scale).float()
        if ctx.record:
            _record(history, GRAD_OUTPUT, g_amax)
        g_inv = g_scale.reciprocal()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ((g_q @ w_q.float()) * (g_inv * w_inv)).to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = ((g_q.t() @ x_q.float()) * (g_inv * x_inv)).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.float().sum(0).to(ctx.b_dtype)  # TE takes dbias from the unquantized gradient
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class Fp8EmulatedLinear(nn.Linear):
    """``nn.Linear`` whose GEMMs see FP8-rounded operands (delayed scaling, saturating casts).

    A subclass so that ``isinstance(m, nn.Linear)``, the parameter names and the state dict keys
    of the weight stay as they were. Output dtype: the autocast dtype when autocast is on
    (TE returns bf16 under bf16 autocast), else the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 recipe: DelayedScalingConfig | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe or DelayedScalingConfig()
        self.register_buffer("fp8_amax_history",
                             torch.zeros(self.recipe.amax_history_len, 3, device=device, dtype=torch.float32),
                             persistent=True)
        # The (input, weight) scales of the latest training forward, for its recomputation.
        self.register_buffer("fp8_forward_scales", torch.ones(2, device=device, dtype=torch.float32),
                             persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: DelayedScalingConfig | None = None) -> Fp8EmulatedLinear:
        """A replacement for ``linear`` that holds the very same parameter tensors."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  recipe=recipe)
        new.weight = linear.weight
        new.bias = linear.bias
        new.fp8_amax_history = torch.zeros_like(new.fp8_amax_history, device=linear.weight.device)
        new.fp8_forward_scales = torch.ones_like(new.fp8_forward_scales, device=linear.weight.device)
        new.train(linear.training)
        return new

    def reset_amax_history(self) -> None:
        self.fp8_amax_history.zero_()
        self.fp8_forward_scales.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        recomputing = _recompute_depth > 0
        record = self.training and torch.is_grad_enabled() and not recomputing
        replay = self.training and recomputing
        with torch.autocast(dev, enabled=False):  # the emulated GEMM accumulates in float32
            return _Fp8Matmul.apply(x, self.weight, self.bias, self.fp8_amax_history, self.fp8_forward_scales,
                                    self.recipe, record, replay, out_dtype)

    def _apply(self, fn, recurse=True):
        """Module casts (``.to(bfloat16)``) move the history and scales but keep them float32, like TE's meta."""
        history, scales = self.fp8_amax_history, self.fp8_forward_scales
        super()._apply(fn, recurse)
        if self.fp8_amax_history.dtype != torch.float32:
            self.fp8_amax_history = history.to(self.fp8_amax_history.device)
        if self.fp8_forward_scales.dtype != torch.float32:
            self.fp8_forward_scales = scales.to(self.fp8_forward_scales.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """A state dict without the history (saved before FP8 was switched on) loads as a fresh one."""
        key = prefix + "fp8_amax_history"
        had = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not had:
            self.reset_amax_history()
            if key in missing_keys:
                missing_keys.remove(key)

    def extra_repr(self) -> str:
        r = self.recipe
        return (f"{super().extra_repr()}, fp8_format={r.fp8_format}, amax_history_len={r.amax_history_len}, "
                f"amax_compute_algo={r.amax_compute_algo}, margin={r.margin}")


def swap_linears(model: nn.Module, recipe: DelayedScalingConfig | None = None) -> nn.Module:
    """Replace every plain ``nn.Linear`` in ``model`` by ``Fp8EmulatedLinear``, names and tensors kept."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Fp8EmulatedLinear.from_linear(child, recipe))
    return model
