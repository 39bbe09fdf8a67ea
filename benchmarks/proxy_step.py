"""Training-step throughput of the proxy presets on CPU: the muP model against a plain PyTorch
model of identical shapes (a benchmark, not a test).

The muP model is what a sweep trial trains (``build_model`` + ``build_optimizers``: forward
multipliers, hook-able identity modules, one AdamW group per role). The plain model has the same
layers and parameter shapes -- Pre-RMSNorm, SwiGLU, RoPE, GQA, tied embeddings -- with no
multipliers, the usual N(0, 0.02) init and nanoGPT's two AdamW groups (decay / no decay). Both run
the same step (forward, cross entropy, backward, clip to norm 1, LR set, AdamW step) on the same
fixed random batch, so tokens/s differ only by what muP adds: the ratio muP / plain is its cost
(the goal is 1.0). On a shared machine the load drifts, so each model runs ``--repeats`` times,
alternating, and the faster run counts. Each (preset, model, mode) runs in a fresh process, eager and under
``torch.compile`` (the model; first step timed separately as the compile time); a compile that
fails or runs past ``--compile-timeout`` is reported in the table, not raised.

    python benchmarks/proxy_step.py                       # tiny and proxy-20m, eager and compiled
    python benchmarks/proxy_step.py --no-compile --presets tiny
    python benchmarks/proxy_step.py --out runs/benchmarks/proxy_step.json --threads 2

proxy-20m has a 129k-token vocabulary and 48 layers: it runs at batch 4 x seq 128 by default so
that a 2-core CPU does a step in about a second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# batch, sequence length and measured steps per preset (after WARMUP_STEPS untimed ones)
DEFAULTS = {
    "tiny": {"batch_size": 16, "seq_len": 128, "steps": 30},  # the quickstart sweep's trial shape
    "proxy-20m": {"batch_size": 4, "seq_len": 128, "steps": 5},
}
WARMUP_STEPS = 2
MODELS = ("mup", "plain")
MODES = ("eager", "compile")


# ---------------------------------------------------------------- the plain model


class PlainAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(d, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(d, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(d, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


def rope(x, cos, sin):
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class PlainBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = PlainAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, h, cos, sin):
        h = h + self.attention(self.attention_norm(h), cos, sin)
        x = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(x)) * self.w3(x))


class PlainTransformer(nn.Module):
    """nanoGPT-style: no multipliers, N(0, 0.02) init, tied embedding."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens):
        angles = torch.outer(torch.arange(tokens.shape[1], dtype=torch.float32), self.inv_freq)
        cos, sin = angles.cos(), angles.sin()
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return F.linear(self.norm(h), self.tok_embeddings.weight).float()


def plain_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


# ---------------------------------------------------------------- one measurement (child process)


def build(preset: str, model_kind: str):
    """(model, step function) for one preset and model kind."""
    from mutransfer.build import build_model
    from mutransfer.config import HParams
    from mutransfer.model import loss_fn
    from mutransfer.optim import build_optimizers
    from mutransfer.presets import get_preset

    shape, hp = get_preset(preset), HParams()
    torch.manual_seed(0)
    if model_kind == "mup":
        model = build_model(shape, hp, seed=0)
        opt = build_optimizers(model, shape, hp, "adamw")

        def set_lr(factor):
            opt.set_lr_factor(factor)
    else:
        model = PlainTransformer(shape.model)
        opt = plain_optimizer(model, hp.lr, hp.weight_decay)

        def set_lr(factor):
            for g in opt.param_groups:
                g["lr"] = hp.lr * factor

    params = list(model.parameters())

    def step(fwd, x, y):
        loss = loss_fn(fwd(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
        set_lr(1.0)
        opt.step()
        opt.zero_grad()
        return loss.item()

    return model, step


def shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in model.parameters())


def measure(preset: str, model_kind: str, mode: str, batch_size: int, seq_len: int, steps: int) -> dict:
    model, step = build(preset, model_kind)
    vocab = model.cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    fwd = model
    result = {"params": sum(p.numel() for p in model.parameters()), "param_shapes": shapes(model)}
    if mode == "compile":
        fwd = torch.compile(model)
    start = time.perf_counter()
    step(fwd, x, y)  # compiles under torch.compile
    result["first_step_s"] = time.perf_counter() - start
    for _ in range(WARMUP_STEPS - 1):
        step(fwd, x, y)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step(fwd, x, y)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    result.update(status="ok", steps=steps, step_s_median=med, step_s_mean=statistics.fmean(times),
                  tokens_per_s=batch_size * seq_len / med, final_loss=loss)
    return result


def child(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = measure(args.preset, args.model, args.mode, args.batch_size, args.seq_len, args.steps)
    except Exception as e:  # noqa: BLE001 -- a compile failure is a result to report
        result = {"status": "failed", "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
    print("RESULT " + json.dumps(result))
    return 0


# ---------------------------------------------------------------- the table (parent process)


def run_one(preset: str, model_kind: str, mode: str, args) -> dict:
    d = DEFAULTS[preset]
    batch = args.batch_size or d["batch_size"]
    seq = args.seq_len or d["seq_len"]
    steps = args.steps or d["steps"]
    row = {"preset": preset, "model": model_kind, "mode": mode, "batch_size": batch, "seq_len": seq}
    cmd = [sys.executable, __file__, "--child", "--preset", preset, "--model", model_kind, "--mode", mode,
           "--batch-size", str(batch), "--seq-len", str(seq), "--steps", str(steps), "--threads", str(args.threads)]
    timeout = args.compile_timeout if mode == "compile" else args.timeout
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "error": f"no result within {timeout} s"}
    row["wall_s"] = round(time.perf_counter() - start, 1)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**row, "status": "failed", "error": f"exit {proc.returncode}: {tail[:300]}"}
    return {**row, **json.loads(lines[-1][len("RESULT "):])}


def best_of(preset: str, mode: str, args) -> tuple[dict, dict]:
    """The faster of ``--repeats`` runs per model, alternating mup and plain (mup, plain, plain, mup, ...)
    so that a change in background load does not favour one side."""
    runs: dict[str, list[dict]] = {m: [] for m in MODELS}
    for i in range(args.repeats):
        for model_kind in (MODELS if i % 2 == 0 else MODELS[::-1]):
            runs[model_kind].append(run_one(preset, model_kind, mode, args))
    best = {}
    for model_kind, rs in runs.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        best[model_kind] = max(ok, key=lambda r: r["tokens_per_s"]) if ok else rs[-1]
        best[model_kind]["repeats_tokens_per_s"] = [round(r["tokens_per_s"]) for r in ok]
        best[model_kind]["repeats_first_step_s"] = [round(r["first_step_s"], 1) for r in ok]
    return best["mup"], best["plain"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "nproc": cores, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "torch_threads_default": torch.get_num_threads(),
            "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def fmt_row(r: dict, ratio: str) -> str:
    shape = f"{r['batch_size']}x{r['seq_len']}"
    if r.get("status") != "ok":
        return f"{r['preset']:<10} {r['model']:<6} {r['mode']:<8} {shape:>7} {'-':>10} {'-':>9} {ratio:>7} " \
               f"{'-':>9}  {r['status']}: {r.get('error', '')[:70]}"
    return (f"{r['preset']:<10} {r['model']:<6} {r['mode']:<8} {shape:>7} {r['tokens_per_s']:>10,.0f} "
            f"{1000 * r['step_s_median']:>9.1f} {ratio:>7} {r['first_step_s']:>9.1f}  ok")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(DEFAULTS), choices=sorted(DEFAULTS))
    parser.add_argument("--no-compile", action="store_true", help="eager only (torch.compile is slow on CPU)")
    parser.add_argument("--batch-size", type=int, help="override every preset's batch size")
    parser.add_argument("--seq-len", type=int, help="override every preset's sequence length")
    parser.add_argument("--steps", type=int, help="measured steps (default: per preset)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per model, alternating; the best counts")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per eager measurement")
    parser.add_argument("--compile-timeout", type=int, default=1200, help="seconds per compiled measurement")
    parser.add_argument("--out", default="runs/benchmarks/proxy_step.json", help="JSON results file")
    # one measurement in this process (used by the parent for isolation)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    modes = ["eager"] if args.no_compile else list(MODES)
    info = machine()
    print(f"machine: {info['cpu']}, {info['nproc']} cores, torch {info['torch']}, "
          f"threads {args.threads or info['torch_threads_default']}", flush=True)
    print(f"{'preset':<10} {'model':<6} {'mode':<8} {'batch':>7} {'tokens/s':>10} {'step ms':>9} "
          f"{'mup/pl':>7} {'1st s':>9}  status", flush=True)
    rows = []
    for preset in args.presets:
        for mode in modes:
            mup, plain = best_of(preset, mode, args)
            ratio = math.nan
            if mup.get("status") == plain.get("status") == "ok":
                ratio = mup["tokens_per_s"] / plain["tokens_per_s"]
                if mup["param_shapes"] != plain["param_shapes"]:
                    mup["warning"] = plain["warning"] = "parameter shapes differ between the models"
            for r in (mup, plain):
                r["mup_over_plain"] = None if math.isnan(ratio) else round(ratio, 4)
                r.pop("param_shapes", None)
                rows.append(r)
                print(fmt_row(r, "-" if math.isnan(ratio) or r is plain else f"{ratio:.3f}"), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "proxy_step", "machine": info, "threads": args.threads or None,
                               "warmup_steps": WARMUP_STEPS, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
