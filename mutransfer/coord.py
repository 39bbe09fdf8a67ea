"""Coordinate-check recorder: train a few steps and record how big every module's output is.

μP promises that activations, logits and the effect of each update stay the same size as the
model gets wider; this module measures exactly that and returns plain records (dicts), one per
(width, seed, step, module, statistic), so the verdict and the plot can be remade from a file.

Step convention: step s is the forward pass after s optimizer steps, so step 0 sees the initial
weights (microsoft mup's ``get_coord_data`` calls the same pass t = s + 1). The update records
("dWx.*") at step s are for the update made from that forward's gradients, the (s+1)-th optimizer
step: (W_after - W_before) applied to the input that forward saw, on at most ``update_tokens`` of the
batch's tokens (evenly spaced; 0: all): the update's effect costs one more product per linear
layer, a third of the step's matmul work over the whole batch, while its mean size is estimated to
a few percent from 64 tokens. Statistics: ``l1`` = mean |x| (what mup records) and ``rms`` =
sqrt(mean x^2), both computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mutransfer.coord_config import CoordConfig
from mutransfer.model import TiedLogits, loss_fn
from mutransfer.parametrization import role_of
from mutransfer.presets import get_preset
from mutransfer.step import train_step

ACTIVATION_KINDS = ("embedding", "attn_out", "ffn_out", "residual", "attn_logits", "output_logits")
UPDATE_KINDS = ("dWx.attn_qkv", "dWx.attn_out", "dWx.ffn_in", "dWx.ffn_out", "dWx.output")
KINDS = ACTIVATION_KINDS + UPDATE_KINDS
LOGIT_KINDS = ("attn_logits", "output_logits")  # may shrink at step 1 (after the first update)

def _stats(x: torch.Tensor, count: int | None = None) -> dict[str, float]:
    """l1 and rms of ``x`` in float32, each one pass with no temporary; ``count`` (default: all
    entries) is how many entries are averaged -- the rest of ``x`` is zeros that do not count."""
    x = x.detach().float()
    n = x.numel() if count is None else count
    return {"l1": (torch.linalg.vector_norm(x, 1) / n).item(),
            "rms": (torch.linalg.vector_norm(x, 2) / n ** 0.5).item()}


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


def attention_logits(attention: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """scale * q k^T with the masked (non-causal) entries zeroed, query heads sharing GQA keys, and
    the number of causal entries (what the softmax sees): ``_stats(*attention_logits(...))``."""
    q, k = q.detach().float(), k.detach().float()
    b, h, t, d = q.shape
    group = h // k.shape[1]
    q = q.reshape(b, k.shape[1], group, t, d)  # each KV head with its group of query heads: no copy of k
    with torch.autocast(q.device.type, enabled=False):  # the hook runs inside bf16 autocast: stay fp32
        logits = (q @ k.unsqueeze(2).transpose(-2, -1)).mul_(attention.attn_scale)
    return logits.tril_(), b * h * t * (t + 1) // 2


class Recorder:
    """Forward hooks that record the size of each tapped output and keep linear inputs for dWx.

    Use as a context manager around one forward pass; ``records`` collects the rows. For a linear
    layer whose output is exactly ``F.linear(input, weight)`` in float32 (plain ``nn.Linear``
    without bias, the tied readout; no autocast) the output is kept too: the update's effect is
    then ``W_after x - y`` (``record_updates``), which needs no copy of the weights.
    """

    def __init__(self, model: nn.Module, base: dict, update_tokens: int = 0):
        self.model = model
        self.base = base  # columns shared by every row: width, seed, step
        self.update_tokens = update_tokens  # tokens kept per linear layer for dW x; 0: all
        self.records: list[dict] = []
        self.inputs: dict[str, torch.Tensor] = {}  # module name -> the input its forward saw
        self.outputs: dict[str, torch.Tensor] = {}  # module name -> its float32 output, where exact (above)
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

    def add(self, module: str, kind: str, x: torch.Tensor, count: int | None = None) -> None:
        for stat, value in _stats(x, count).items():
            self.records.append({**self.base, "module": module, "kind": kind, "layer": _layer_of(module),
                                 "statistic": stat, "value": value})

    def clear(self) -> None:
        """Drop the kept inputs and outputs (after ``record_updates``)."""
        self.inputs.clear()
        self.outputs.clear()

    def _output_hook(self, name: str, kind: str):
        def hook(module, args, output):
            self.add(name, kind, output)
        return hook

    def _logit_hook(self, name: str):
        attention = self.model.get_submodule(name.rsplit(".", 1)[0])

        def hook(module, args, output):
            q, k = args
            self.add(name, "attn_logits", *attention_logits(attention, q, k))
        return hook

    def _input_hook(self, name: str):
        def hook(module, args, output):
            self.inputs[name] = self.sample_tokens(args[0].detach())
            if _exact_float32_linear(module, args, output):
                self.outputs[name] = self.sample_tokens(output.detach())
        return hook

    def sample_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., features) as (tokens, features): every token, or ``update_tokens`` evenly spaced ones."""
        x = x.flatten(0, -2)
        if self.update_tokens and x.shape[0] > self.update_tokens:
            stride = math.ceil(x.shape[0] / self.update_tokens)
            x = x[::stride].contiguous()
        return x


def _exact_float32_linear(module: nn.Module, args: tuple, output: torch.Tensor) -> bool:
    """Whether ``module.forward(*args)`` is one float32 ``F.linear`` of its weight (and so can be
    rerun with the updated weight for an output comparable to ``output`` to float rounding)."""
    x = args[0]
    if torch.is_autocast_enabled(x.device.type) or x.dtype != torch.float32 or output.dtype != torch.float32:
        return False
    if type(module) is nn.Linear:
        return module.bias is None and module.weight.dtype == torch.float32
    return type(module) is TiedLogits and len(args) == 2 and args[1].dtype == torch.float32


def weights_before(model: nn.Module, recorder: Recorder | None = None) -> dict[str, torch.Tensor]:
    """Copies of every linear layer's weight (and the tied readout's) before the optimizer steps;
    with ``recorder``, only of those whose output it did not keep (``Recorder``)."""
    kept = recorder.outputs if recorder is not None else {}
    weights = {n: model.get_submodule(n).weight for n in linear_modules(model)}
    weights["output"] = model.tok_embeddings.weight
    return {n: w.detach().clone() for n, w in weights.items() if n not in kept}


@torch.no_grad()
def record_updates(model: nn.Module, recorder: Recorder, before: dict[str, torch.Tensor]) -> None:
    """dW x for every linear layer: the step's weight change applied to the input that step saw.

    With a copy of the weight in ``before``: ``(W_after - W_before) x`` in float32. Otherwise the
    recorder kept the layer's float32 output y = W_before x: ``W_after x - y``, the layer rerun on
    the same input (same kernel, same rounding) -- no weight copy, no full-size weight difference.
    Its rounding error is that of the two products, about float32 epsilon x |W x| / |dW x| relative.
    """
    for name, kind in linear_modules(model).items():
        module = model.get_submodule(name)
        x = recorder.inputs[name]
        if name in before:
            effect = F.linear(x.float(), module.weight.detach().float() - before[name].float())
        else:
            effect = module.forward(x).sub_(recorder.outputs[name])
        recorder.add(name, kind, effect)
    h, embedding = recorder.inputs["output"], model.tok_embeddings.weight.detach()
    if "output" in before:
        effect = model.output.factor * F.linear(h.float(), embedding.float() - before["output"].float())
    else:
        effect = model.output.forward(h, embedding).sub_(recorder.outputs["output"])
    recorder.add("output", "dWx.output", effect)


def _logits_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss through whole logits, so the recorder's hook on ``output`` sees every logit."""
    return loss_fn(model(x), y)


def record_training(model: nn.Module, optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    base: dict, precision: str = "fp32", grad_clip: float = 0.0,
                    device_type: str = "cpu", update_tokens: int = 0) -> list[dict]:
    """Train ``model`` one step per batch with the shared step, recording every step (0 = at init).

    ``optimizer`` is an OptimizerSet (or anything with ``zero_grad()`` and ``step()``). The
    recorder's hooks observe the step's forward and keep the linear layers' inputs (and, where
    exact, outputs); weights whose output was not kept are copied between the gradient and the
    update (the step's ``before_optimizer_step`` hook) to measure the update's effect, on
    ``update_tokens`` evenly spaced tokens of the batch (0: all of them).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    records: list[dict] = []
    for step, (x, y) in enumerate(batches):
        before: dict[str, torch.Tensor] = {}

        rec = Recorder(model, {**base, "step": step}, update_tokens)

        def keep_weights(before=before, rec=rec) -> None:
            before.update(weights_before(model, rec))

        with rec:
            out = train_step(model, optimizer, [(x, y)], params=params, precision=precision,
                             device_type=device_type, grad_clip=grad_clip, loss_of=_logits_loss,
                             before_optimizer_step=keep_weights)
        record_updates(model, rec, before)
        rec.records.append({**base, "step": step, "module": "loss", "kind": "loss", "layer": -1,
                            "statistic": "loss", "value": out.loss})
        records.extend(rec.records)
        rec.clear()
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

    cfg = cfg.resolved()
    cfg.check_device()
    if dataset is None:
        from mutransfer.data.builtin import builtin_dataset

        dataset = builtin_dataset(tokenizer=get_preset(cfg.preset).model.tokenizer)
    dataset.check_tokenizer(get_preset(cfg.preset).model.tokenizer)
    batches = [(x.to(cfg.device), y.to(cfg.device)) for x, y in fixed_batches(cfg, dataset)]
    hp = cfg.hparams()
    records: list[dict] = []
    for shape in cfg.shapes():
        width = shape.model.d_model
        depth = shape.model.n_layers
        for seed in range(cfg.seeds):
            model = prepare_model(build_model(shape, hp, device=cfg.device, seed=seed), cfg.precision)
            opt = build_optimizers(model, shape, hp, cfg.optimizer)
            base = {"param": cfg.param, "optimizer": cfg.optimizer, "precision": cfg.precision,
                    "axis": cfg.axis, "width": width, "depth": depth, "seed": seed}
            rows = record_training(model, opt, batches, base, cfg.precision, cfg.grad_clip,
                                   torch.device(cfg.device).type, cfg.update_tokens)
            records.extend(rows)
            if progress is not None:
                losses = [r["value"] for r in rows if r["kind"] == "loss"]
                progress(f"{cfg.param} {cfg.optimizer} {cfg.precision} width {width} depth {depth} "
                         f"seed {seed + 1}/{cfg.seeds}: "
                         f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return records
