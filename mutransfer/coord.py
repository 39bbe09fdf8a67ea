"""Coordinate-check recorder: train a few steps and record how big every module's output is.

μP promises that activations, logits and the effect of each update stay the same size as the
model gets wider; this module measures exactly that and returns plain records (dicts), one per
(width, seed, step, module, statistic), so the verdict and the plot can be remade from a file.

Step convention: step s is the forward pass after s optimizer steps, so step 0 sees the initial
weights (microsoft mup's ``get_coord_data`` calls the same pass t = s + 1). The update records
("dWx.*") at step s are for the update made from that forward's gradients, the (s+1)-th optimizer
step: (W_after - W_before) applied to the input that forward saw. Statistics: ``l1`` = mean |x|
(what mup records) and ``rms`` = sqrt(mean x^2), both computed in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mutransfer.config import ConfigError, HParams, RunShape
from mutransfer.model import loss_fn
from mutransfer.parametrization import OPTIMIZERS, PARAMETRIZATIONS, role_of
from mutransfer.presets import get_preset, width_family

STATISTICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "l1": lambda x: x.abs().mean(),
    "rms": lambda x: x.square().mean().sqrt(),
}
ACTIVATION_KINDS = ("embedding", "attn_out", "ffn_out", "residual", "attn_logits", "output_logits")
UPDATE_KINDS = ("dWx.attn_qkv", "dWx.attn_out", "dWx.ffn_in", "dWx.ffn_out", "dWx.output")
KINDS = ACTIVATION_KINDS + UPDATE_KINDS
LOGIT_KINDS = ("attn_logits", "output_logits")  # may shrink at step 1 (after the first update)

# Default base LR per optimizer, applied from step 0 with no warmup, so every step of the check
# moves the weights more than the same step of a training run, which warms up (RECIPE section 6:
# "LR above the training LR"). AdamW: the base eta of HParams. Higher constant AdamW LRs (0.015 and
# up) throw the narrowest width of the tiny family (64: 4 heads) into a loss-spike transient whose
# timing depends on width, which reads as slopes of 0.1 to 0.3 (docs/coord_check.md). Muon: its
# RMS-matched update (0.2 sqrt(max(A, B)) eta) is about 5x smaller than AdamW's first sign-like
# steps, so at 0.01 the initial output logits (which shrink with width) still dominate at step 2.
DEFAULT_LR = {"adamw": 0.01, "muon": 0.02}
WIDTH_DOUBLINGS = 4  # default grid: the preset's width times 1, 2, 4, 8, 16


@dataclass(frozen=True)
class CoordConfig:
    """What a coordinate check trains. Base hyperparameters other than the LR are HParams' defaults."""

    preset: str = "tiny"
    widths: tuple[int, ...] = ()  # empty: default_widths(preset)
    steps: int = 10
    seeds: int = 3
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    optimizer: str = "adamw"
    param: str = "mup"
    precision: str = "fp32"
    batch_size: int = 4
    seq_len: int = 64
    data_seed: int = 0
    fix_data: bool = True  # one batch at every step (mup's default); False: the batch of (data_seed, step)
    grad_clip: float = 0.0  # clipping by the global norm couples layers across widths; off by default
    device: str = "cpu"

    def resolved(self) -> CoordConfig:
        """The same config with the default width grid and LR filled in."""
        widths = self.widths or tuple(default_widths(self.preset))
        lr = self.lr if self.lr is not None else DEFAULT_LR.get(self.optimizer, DEFAULT_LR["adamw"])
        return dataclasses.replace(self, widths=widths, lr=lr)

    def validate(self) -> CoordConfig:
        """Every bad value fails here, naming the option, before any compute."""
        from mutransfer.precision import PRECISIONS

        shape = get_preset(self.preset)
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        _choice("--param", self.param, PARAMETRIZATIONS)
        _choice("--precision", self.precision, tuple(PRECISIONS))
        for name in ("steps", "seeds", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} = {getattr(self, name)} must be >= 1")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr = {self.lr} must be a positive number")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ConfigError(f"--device = {self.device!r} is not a torch device: {e}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device = {self.device!r}: CUDA is not available on this machine")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip = {self.grad_clip} must be >= 0")
        if self.seq_len > shape.model.max_seq_len:
            raise ConfigError(f"--seq-len = {self.seq_len} exceeds the preset's max_seq_len = "
                              f"{shape.model.max_seq_len}")
        widths = self.resolved().widths
        if len(set(widths)) < 2 or len(set(widths)) != len(widths):
            raise ConfigError(f"--widths = {list(widths)}: need at least two distinct widths, no repeats, "
                              "to fit a slope")
        if min(widths) < 1:
            raise ConfigError(f"--widths = {list(widths)}: widths must be positive")
        self.shapes()  # a width the preset cannot take (head dim, FFN ratio) fails by name here
        return self

    def shapes(self) -> list[RunShape]:
        """The preset at every width, in the chosen parametrization."""
        family = width_family(self.preset, sorted(self.resolved().widths))
        return [dataclasses.replace(s, param=dataclasses.replace(s.param, parametrization=self.param))
                for s in family]

    def hparams(self) -> HParams:
        return HParams(lr=self.resolved().lr, grad_clip=self.grad_clip)


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{option} = {value!r} is not allowed; choose one of {list(allowed)}")


def default_widths(preset: str) -> list[int]:
    """A x2 grid over 16x starting at the preset's own width (tiny: 64 ... 1024)."""
    d = get_preset(preset).model.d_model
    return [d * 2**k for k in range(WIDTH_DOUBLINGS + 1)]


def _stats(x: torch.Tensor) -> dict[str, float]:
    x = x.detach().float()
    return {name: f(x).item() for name, f in STATISTICS.items()}


def _layer_of(name: str) -> int:
    """Block index from a module name ``layers.<i>....``; -1 outside the blocks."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" and len(parts) > 1 else -1


def activation_taps(model: nn.Module) -> dict[str, str]:
    """Module name -> kind, for the modules whose output (or derived logits) the check records."""
    taps = {"embed_scale": "embedding", "output": "output_logits"}
    for name, _ in model.named_modules():
        if name.endswith(".attention.wo"):
            taps[name] = "attn_out"
        elif name.endswith(".feed_forward.w2"):
            taps[name] = "ffn_out"
        elif name.endswith(".attention.qk_tap"):
            taps[name] = "attn_logits"
        elif name.startswith("layers.") and name.count(".") == 1:
            taps[name] = "residual"
    return taps


def linear_modules(model: nn.Module) -> dict[str, str]:
    """Module name -> update kind for every hidden linear layer (any backend that keeps ``.weight``)."""
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.startswith("layers.") and isinstance(weight, torch.Tensor) and weight.ndim == 2:
            out[name] = "dWx." + role_of(name + ".weight").value
    return out


def attention_logits(attention: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """scale * q k^T on the causal entries (what the softmax sees), query heads sharing GQA keys."""
    q, k = q.detach().float(), k.detach().float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    with torch.autocast(q.device.type, enabled=False):  # the hook runs inside bf16 autocast: stay fp32
        logits = attention.attn_scale * (q @ k.transpose(-2, -1))
    t = q.shape[-2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return logits[..., causal]


class Recorder:
    """Forward hooks that record the size of each tapped output and keep linear inputs for dWx.

    Use as a context manager around one forward pass; ``records`` collects the rows.
    """

    def __init__(self, model: nn.Module, base: dict):
        self.model = model
        self.base = base  # columns shared by every row: width, seed, step
        self.records: list[dict] = []
        self.inputs: dict[str, torch.Tensor] = {}  # module name -> the input its forward saw
        self.handles = []

    def __enter__(self) -> Recorder:
        for name, kind in activation_taps(self.model).items():
            hook = self._logit_hook(name) if kind == "attn_logits" else self._output_hook(name, kind)
            self.handles.append(self.model.get_submodule(name).register_forward_hook(hook))
        for name in [*linear_modules(self.model), "output"]:
            self.handles.append(self.model.get_submodule(name).register_forward_hook(self._input_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def add(self, module: str, kind: str, x: torch.Tensor) -> None:
        for stat, value in _stats(x).items():
            self.records.append({**self.base, "module": module, "kind": kind, "layer": _layer_of(module),
                                 "statistic": stat, "value": value})

    def _output_hook(self, name: str, kind: str):
        def hook(module, args, output):
            self.add(name, kind, output)
        return hook

    def _logit_hook(self, name: str):
        attention = self.model.get_submodule(name.rsplit(".", 1)[0])

        def hook(module, args, output):
            q, k = args
            self.add(name, "attn_logits", attention_logits(attention, q, k))
        return hook

    def _input_hook(self, name: str):
        def hook(module, args, output):
            self.inputs[name] = args[0].detach()
        return hook


def weights_before(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every linear layer's weight (and the tied readout's) before the optimizer steps."""
    names = [*linear_modules(model)]
    out = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    out["output"] = model.tok_embeddings.weight.detach().clone()
    return out


@torch.no_grad()
def record_updates(model: nn.Module, recorder: Recorder, before: dict[str, torch.Tensor]) -> None:
    """dW x for every linear layer: the step's weight change applied to the input that step saw."""
    for name, kind in linear_modules(model).items():
        delta = model.get_submodule(name).weight.detach().float() - before[name].float()
        recorder.add(name, kind, F.linear(recorder.inputs[name].float(), delta))
    delta = model.tok_embeddings.weight.detach().float() - before["output"].float()
    recorder.add("output", "dWx.output", model.output.factor * F.linear(recorder.inputs["output"].float(), delta))


def record_training(model: nn.Module, optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    base: dict, precision: str = "fp32", grad_clip: float = 0.0,
                    device_type: str = "cpu") -> list[dict]:
    """Train ``model`` one step per batch and return the records of every step (0 = at init).

    ``optimizer`` needs ``zero_grad()`` and ``step()`` (a torch optimizer or an OptimizerSet); the
    order of operations matches mup's coord check: forward, zero_grad, backward, step.
    """
    from mutransfer.precision import autocast

    model.train()
    records: list[dict] = []
    for step, (x, y) in enumerate(batches):
        with Recorder(model, {**base, "step": step}) as rec:
            with autocast(precision, device_type):
                loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        before = weights_before(model)
        optimizer.step()
        record_updates(model, rec, before)
        rec.records.append({**base, "step": step, "module": "loss", "kind": "loss", "layer": -1,
                            "statistic": "loss", "value": loss.item()})
        records.extend(rec.records)
        rec.inputs.clear()
    return records


def fixed_batches(cfg: CoordConfig, dataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch of every step from one data seed: the same data for every width and seed."""
    return [dataset.batch("train", cfg.data_seed, 0 if cfg.fix_data else step, cfg.batch_size, cfg.seq_len)
            for step in range(cfg.steps)]


def run_coord_check(cfg: CoordConfig, dataset=None, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Train the preset at every width and seed for ``cfg.steps`` steps; all records, in order."""
    from mutransfer.build import build_model
    from mutransfer.optim import build_optimizers
    from mutransfer.precision import prepare_model

    cfg = cfg.resolved().validate()
    if dataset is None:
        from mutransfer.data.builtin import builtin_dataset

        dataset = builtin_dataset(tokenizer=get_preset(cfg.preset).model.tokenizer)
    dataset.check_tokenizer(get_preset(cfg.preset).model.tokenizer)
    batches = [(x.to(cfg.device), y.to(cfg.device)) for x, y in fixed_batches(cfg, dataset)]
    hp = cfg.hparams()
    records: list[dict] = []
    for shape in cfg.shapes():
        width = shape.model.d_model
        for seed in range(cfg.seeds):
            model = prepare_model(build_model(shape, hp, device=cfg.device, seed=seed), cfg.precision)
            opt = build_optimizers(model, shape, hp, cfg.optimizer)
            base = {"param": cfg.param, "optimizer": cfg.optimizer, "precision": cfg.precision,
                    "width": width, "seed": seed}
            rows = record_training(model, opt, batches, base, cfg.precision, cfg.grad_clip,
                                   torch.device(cfg.device).type)
            records.extend(rows)
            if progress is not None:
                losses = [r["value"] for r in rows if r["kind"] == "loss"]
                progress(f"{cfg.param} {cfg.optimizer} {cfg.precision} width {width} seed {seed + 1}/{cfg.seeds}: "
                         f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return records
