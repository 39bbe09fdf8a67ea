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

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mutransfer.coord_config import CoordConfig
from mutransfer.model import loss_fn
from mutransfer.parametrization import HIDDEN_MATRIX_ROLES
from mutransfer.spec import ModelSpec
from mutransfer.step import train_step

ACTIVATION_KINDS = ("embedding", "attn_out", "ffn_out", "residual", "attn_logits", "output_logits")
UPDATE_KINDS = ("dWx.attn_qkv", "dWx.attn_out", "dWx.ffn_in", "dWx.ffn_out", "dWx.hidden", "dWx.output")
KINDS = ACTIVATION_KINDS + UPDATE_KINDS
LOGIT_KINDS = ("attn_logits", "output_logits")  # may shrink at step 1 (after the first update)

def _stats(x: torch.Tensor, count: int | None = None) -> dict[str, float]:
    """l1 and rms of ``x`` in float32, each one pass with no temporary; ``count`` (default: all
    entries) is how many entries are averaged -- the rest of ``x`` is zeros that do not count."""
    x = x.detach().float()
    n = x.numel() if count is None else count
    return {"l1": (torch.linalg.vector_norm(x, 1) / n).item(),
            "rms": (torch.linalg.vector_norm(x, 2) / n ** 0.5).item()}


def linear_modules(model: nn.Module, spec: ModelSpec) -> dict[str, str]:
    """Module name -> update kind for every hidden linear layer: a module whose 2-D ``weight`` has a
    hidden-matrix role in ``spec`` (any precision backend that keeps ``.weight``)."""
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and isinstance(weight, torch.Tensor) and weight.ndim == 2:
            role = spec.roles.matches(name + ".weight")
            if len(role) == 1 and role[0][1] in HIDDEN_MATRIX_ROLES:
                out[name] = "dWx." + role[0][1].value
    return out


def attention_logits(tap: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """scale * q k^T with the masked (non-causal) entries zeroed, query heads sharing GQA keys, and
    the number of causal entries (what the softmax sees): ``_stats(*attention_logits(...))``.
    ``tap`` is the module called with (q, k); its ``scale`` is the softmax scale."""
    q, k = q.detach().float(), k.detach().float()
    b, h, t, d = q.shape
    group = h // k.shape[1]
    q = q.reshape(b, k.shape[1], group, t, d)  # each KV head with its group of query heads: no copy of k
    with torch.autocast(q.device.type, enabled=False):  # the hook runs inside bf16 autocast: stay fp32
        logits = (q @ k.unsqueeze(2).transpose(-2, -1)).mul_(tap.scale)
    return logits.tril_(), b * h * t * (t + 1) // 2


@dataclass(frozen=True)
class Layout:
    """What the recorder hooks in one model, read once from its spec: module name -> kind for the
    taps and the hidden linear layers, the readout's name, the blocks in order."""

    taps: dict[str, str] = field(default_factory=dict)
    linears: dict[str, str] = field(default_factory=dict)
    readout: str | None = None
    blocks: tuple[str, ...] = ()


def layout_of(model: nn.Module, spec: ModelSpec) -> Layout:
    taps = spec.tap_modules(model)
    readouts = [n for n, kind in taps.items() if kind == "output_logits"]
    return Layout(taps=taps, linears=linear_modules(model, spec), readout=readouts[0] if len(readouts) == 1 else None,
                  blocks=tuple(spec.block_names(model)))


class Recorder:
    """Forward hooks that record the size of each tapped output and keep linear inputs for dWx.

    Use as a context manager around one forward pass; ``records`` collects the rows. Which modules
    are tapped, which are hidden linear layers and which is the readout come from the model's spec.
    For a layer whose output is exactly its float32 rerun (plain ``nn.Linear`` without bias, the
    readout; no autocast) the output is kept too: the update's effect is then ``layer_after(x) - y``
    (``record_updates``), which needs no copy of the weights.
    """

    def __init__(self, model: nn.Module, base: dict, update_tokens: int = 0, layout: Layout | None = None):
        self.model = model
        self.base = base  # columns shared by every row: width, seed, step
        self.update_tokens = update_tokens  # tokens kept per linear layer for dW x; 0: all
        self.records: list[dict] = []
        self.inputs: dict[str, tuple] = {}  # module name -> the (sampled) inputs its forward saw
        self.outputs: dict[str, torch.Tensor] = {}  # module name -> its float32 output, where exact (above)
        self.handles = []
        layout = layout or Layout()  # nothing tapped: ``sample_tokens`` alone
        self.taps, self.linears, self.readout, self.blocks = layout.taps, layout.linears, layout.readout, layout.blocks

    def __enter__(self) -> Recorder:
        for name, kind in self.taps.items():
            hook = self._logit_hook(name) if kind == "attn_logits" else self._output_hook(name, kind)
            self.handles.append(self.model.get_submodule(name).register_forward_hook(hook))
        for name in [*self.linears, *([self.readout] if self.readout else [])]:
            self.handles.append(self.model.get_submodule(name).register_forward_hook(self._input_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def layer_of(self, module: str) -> int:
        """The index of the block ``module`` is in; -1 outside the blocks."""
        for i, block in enumerate(self.blocks):
            if module == block or module.startswith(block + "."):
                return i
        return -1

    def add(self, module: str, kind: str, x: torch.Tensor, count: int | None = None) -> None:
        for stat, value in _stats(x, count).items():
            self.records.append({**self.base, "module": module, "kind": kind, "layer": self.layer_of(module),
                                 "statistic": stat, "value": value})

    def clear(self) -> None:
        """Drop the kept inputs and outputs (after ``record_updates``)."""
        self.inputs.clear()
        self.outputs.clear()

    def _output_hook(self, name: str, kind: str):
        def hook(module, args, output):
            self.add(name, kind, output[0] if isinstance(output, tuple) else output)
        return hook

    def _logit_hook(self, name: str):
        def hook(module, args, output):
            q, k = args
            self.add(name, "attn_logits", *attention_logits(module, q, k))
        return hook

    def _input_hook(self, name: str):
        def hook(module, args, output):
            x = self.sample_tokens(args[0].detach())
            self.inputs[name] = (x, *(a for a in args[1:] if isinstance(a, torch.Tensor)))
            if _exact_float32(module, args, output, readout=name == self.readout):
                self.outputs[name] = self.sample_tokens(output.detach())
        return hook

    def sample_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., features) as (tokens, features): every token, or ``update_tokens`` evenly spaced ones."""
        x = x.flatten(0, -2)
        if self.update_tokens and x.shape[0] > self.update_tokens:
            stride = math.ceil(x.shape[0] / self.update_tokens)
            x = x[::stride].contiguous()
        return x


def _exact_float32(module: nn.Module, args: tuple, output: torch.Tensor, readout: bool) -> bool:
    """Whether ``module.forward(*args)`` reruns to an output comparable to ``output`` to float rounding
    with the updated weight, and measures only the weight's update: float32 throughout, no autocast,
    and a plain ``nn.Linear`` without bias -- or the readout, whose whole layer's change (a readout
    bias included) is its update."""
    x = args[0]
    if not isinstance(output, torch.Tensor) or torch.is_autocast_enabled(x.device.type):
        return False
    tensors = [x, output, *module.parameters(), *(a for a in args[1:] if isinstance(a, torch.Tensor))]
    if any(t.dtype != torch.float32 for t in tensors):
        return False
    if readout:
        return True
    return type(module) is nn.Linear and module.bias is None


def _readout_weight(module: nn.Module, kept: tuple) -> torch.Tensor:
    """The readout's weight: its own ``weight``, or (a tied readout called as ``(h, weight)``) that argument."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else kept[1]


def weights_before(model: nn.Module, recorder: Recorder) -> dict[str, torch.Tensor]:
    """Copies of the weights of every linear layer and the readout whose output the recorder did not
    keep (``Recorder``), taken before the optimizer steps."""
    weights = {n: model.get_submodule(n).weight for n in recorder.linears if n not in recorder.outputs}
    if recorder.readout and recorder.readout not in recorder.outputs and recorder.readout in recorder.inputs:
        weights[recorder.readout] = _readout_weight(model.get_submodule(recorder.readout),
                                                    recorder.inputs[recorder.readout])
    return {n: w.detach().clone() for n, w in weights.items()}


@torch.no_grad()
def record_updates(model: nn.Module, recorder: Recorder, before: dict[str, torch.Tensor]) -> None:
    """dW x for every linear layer and the readout: the step's weight change applied to the input that
    step saw.

    With a copy of the weight in ``before``: ``(W_after - W_before) x`` in float32. Otherwise the
    recorder kept the layer's float32 output y = W_before x: ``W_after x - y``, the layer rerun on
    the same input (same kernel, same rounding) -- no weight copy, no full-size weight difference.
    Its rounding error is that of the two products, about float32 epsilon x |W x| / |dW x| relative.
    """
    names = {**recorder.linears, **({recorder.readout: "dWx.output"} if recorder.readout else {})}
    for name, kind in names.items():
        if name not in recorder.inputs:
            continue
        module = model.get_submodule(name)
        kept = recorder.inputs[name]
        if name in before:
            weight = module.weight if name != recorder.readout else _readout_weight(module, kept)
            effect = F.linear(kept[0].float(), weight.detach().float() - before[name].float())
        else:
            effect = module.forward(*kept).sub_(recorder.outputs[name])
        recorder.add(name, kind, effect)


def record_training(model: nn.Module, optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    base: dict, precision: str = "fp32", grad_clip: float = 0.0,
                    device_type: str = "cpu", update_tokens: int = 0, *, spec: ModelSpec,
                    on_step: Callable[[int, float], None] | None = None) -> list[dict]:
    """Train ``model`` one step per batch with the shared step, recording every step (0 = at init).

    ``optimizer`` is an OptimizerSet (or anything with ``zero_grad()`` and ``step()``). The
    recorder's hooks observe the step's forward and keep the linear layers' inputs (and, where
    exact, outputs); weights whose output was not kept are copied between the gradient and the
    update (the step's ``before_optimizer_step`` hook) to measure the update's effect, on
    ``update_tokens`` evenly spaced tokens of the batch (0: all of them). ``on_step(step, loss)`` is
    called after every step (progress within a run).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    records: list[dict] = []

    def logits_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss through whole logits, so the recorder's hook on the readout sees every logit."""
        return loss_fn(spec.logits(model, x), y)

    layout = layout_of(model, spec)  # the same modules at every step
    for step, (x, y) in enumerate(batches):
        before: dict[str, torch.Tensor] = {}

        rec = Recorder(model, {**base, "step": step}, update_tokens, layout)

        def keep_weights(before=before, rec=rec) -> None:
            before.update(weights_before(model, rec))

        with rec:
            out = train_step(model, optimizer, [(x, y)], params=params, precision=precision,
                             device_type=device_type, grad_clip=grad_clip, loss_of=logits_loss,
                             before_optimizer_step=keep_weights)
        record_updates(model, rec, before)
        rec.records.append({**base, "step": step, "module": "loss", "kind": "loss", "layer": -1,
                            "statistic": "loss", "value": out.loss})
        records.extend(rec.records)
        rec.clear()
        if on_step is not None:
            on_step(step, out.loss)
    return records


def fixed_batches(cfg: CoordConfig, dataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch of every step from one data seed: the same data for every width and seed."""
    return [dataset.batch("train", cfg.data_seed, 0 if cfg.fix_data else step, cfg.batch_size, cfg.seq_len)
            for step in range(cfg.steps)]


PROGRESS_INTERVAL_S = 10.0  # the longest a coordinate check stays silent (between steps)


class InRunProgress:
    """Progress lines of a coordinate check: one per finished run (``line``), and, while a run trains,
    one with its steps done whenever ``interval`` seconds of ``clock`` passed without a line
    (``tick``, checked after every step). As a context manager a thread ticks too, so even a single
    step longer than the interval (a wide model) does not leave the command silent."""

    def __init__(self, emit: Callable[[str], None], steps: int, interval: float = PROGRESS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.emit, self.steps, self.interval, self.clock = emit, steps, interval, clock
        self.last = clock()
        self.run: str | None = None
        self.run_start = self.last
        self.steps_done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_run(self, label: str) -> None:
        with self._lock:
            self.run, self.run_start, self.steps_done = label, self.clock(), 0

    def step(self, step: int, loss: float) -> None:
        with self._lock:
            self.steps_done = step + 1
        self.tick()

    def line(self, text: str) -> None:
        with self._lock:
            self.run = None
            self._emit(text)

    def tick(self) -> None:
        """A line on the running run, if the last line is ``interval`` or more old."""
        with self._lock:
            now = self.clock()
            if self.run is not None and now - self.last >= self.interval:
                self._emit(f"{self.run}: {self.steps_done}/{self.steps} steps, {now - self.run_start:.0f}s in")

    def _emit(self, text: str) -> None:
        self.emit(text)
        self.last = self.clock()

    def _loop(self) -> None:
        while not self._stop.wait(max(0.05, self.interval - (self.clock() - self.last))):
            self.tick()

    def __enter__(self) -> InRunProgress:
        self._thread = threading.Thread(target=self._loop, name="coord-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def run_coord_check(cfg: CoordConfig, dataset=None, progress: Callable[[str], None] | None = None,
                    progress_interval: float = PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                    on_run: Callable[[dict, list[dict]], None] | None = None) -> list[dict]:
    """Train the preset at every width and seed for ``cfg.steps`` steps; all records, in order.
    ``on_run(base, rows)``: called after each (width, seed) run with its columns and its records."""
    from mutransfer.specs import spec_of

    cfg = cfg.resolved()
    cfg.check_device()
    shapes = cfg.shapes()
    tokenizer = shapes[0].model.tokenizer
    if dataset is None:
        from mutransfer.data.builtin import builtin_dataset

        dataset = builtin_dataset(tokenizer=tokenizer)
    dataset.check_tokenizer(tokenizer)
    batches = [(x.to(cfg.device), y.to(cfg.device)) for x, y in fixed_batches(cfg, dataset)]
    points = [(s.model.d_model, s.model.n_layers) for s in shapes]
    return spec_records(spec_of(shapes[0].model), points, shapes[0].param, cfg.hparams(), batches,
                        optimizer=cfg.optimizer, precision=cfg.precision, seeds=cfg.seeds, device=cfg.device,
                        grad_clip=cfg.grad_clip, update_tokens=cfg.update_tokens, axis=cfg.axis, progress=progress,
                        progress_interval=progress_interval, clock=clock, on_run=on_run)


def spec_records(spec: ModelSpec, points: list[tuple[int, int]], param, hp, batches, *, optimizer: str = "adamw",
                 precision: str = "fp32", seeds: int = 3, device: str = "cpu", grad_clip: float = 0.0,
                 update_tokens: int = 64, axis: str = "width",
                 progress: Callable[[str], None] | None = None, progress_interval: float = PROGRESS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic,
                 on_run: Callable[[dict, list[dict]], None] | None = None) -> list[dict]:
    """Train ``spec``'s model at every (width, depth) point and seed on ``batches`` (one step each,
    already on ``device``), recording every step; all records, in order.

    ``progress`` gets a line per finished run and, inside a run, one with the steps done whenever
    ``progress_interval`` seconds (of ``clock``) passed without a line: a wide model is never silent
    for long."""
    from mutransfer.build import build
    from mutransfer.optim import build_optimizers
    from mutransfer.precision import prepare_model

    records: list[dict] = []
    runs, done = len(points) * seeds, 0
    ticker = None if progress is None else InRunProgress(progress, len(batches), progress_interval, clock)
    with ticker or contextlib.nullcontext():
        for width, depth in points:
            shape = spec.shape(width, depth)
            for seed in range(seeds):
                run = (f"{param.parametrization} {optimizer} {precision} width {width} depth {depth} "
                       f"seed {seed + 1}/{seeds}")
                if ticker is not None:
                    ticker.start_run(f"{done}/{runs} runs; run {done + 1} ({run})")
                model = prepare_model(build(spec, width, depth, param, hp, device=device, seed=seed), precision)
                opt = build_optimizers(model, spec, shape, param, hp, optimizer)
                base = {"param": param.parametrization, "optimizer": optimizer, "precision": precision,
                        "axis": axis, "width": width, "depth": depth, "seed": seed}
                rows = record_training(model, opt, batches, base, precision, grad_clip, torch.device(device).type,
                                       update_tokens, spec=spec, on_step=None if ticker is None else ticker.step)
                records.extend(rows)
                if on_run is not None:
                    on_run(base, rows)
                done += 1
                if ticker is not None:
                    losses = [r["value"] for r in rows if r["kind"] == "loss"]
                    ticker.line(f"{done}/{runs} runs: {run}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return records
