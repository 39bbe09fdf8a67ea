"""Training-step throughput on CPU: the muP model against a plain PyTorch model of identical shapes
and a GPT-2-style model of the same width and depth (a benchmark, not a test).

Models, all trained by the same step (forward, cross entropy over the whole logits, backward, clip
to norm 1, LR set, AdamW step) on the same fixed random batch:

- ``mup``: what a sweep trial trains (``build_model`` + ``build_optimizers``): forward multipliers,
  hook-able identity modules, one AdamW group per role.
- ``plain``: the same layers and parameter shapes (Pre-RMSNorm, SwiGLU, RoPE, GQA, tied
  embedding) written in plain PyTorch with stock modules: no multipliers, N(0, 0.02) init,
  nanoGPT's two AdamW groups (decay / no decay) with torch's default AdamW. ``mup / plain`` (tokens/s)
  is what the muP model costs next to the obvious plain-PyTorch model of the same function.
- ``gpt2``: GPT-2-style, plain PyTorch: Pre-LayerNorm, GELU (tanh) MLP of 4 d, learned positions,
  biases, tied embedding, head dim 64 (``--gpt2-head-dim``), same d, L, vocabulary, batch and
  sequence as the muP model; same optimizer as ``plain``. Different architecture, so it is compared
  by achieved model FLOP/s, not tokens/s.
- ``gpt2-same-heads`` (with ``--models``): the same GPT-2-style model with the muP model's head dim
  (16 in the tiny family) instead of 64, so that both sides do the same attention work per FLOP.
- ``mup-hd64`` (with ``--models``): the muP model with head dim 64 instead of the tiny family's 16
  (fewer, wider heads; same d): separates the attention kernel's head-dim efficiency from the rest.
  The ``/same hd`` column compares every model with the GPT-2 baseline of its own head dim (``mup``
  with ``gpt2-same-heads``, ``mup-hd64`` with ``gpt2``), where either is in the run.

Model FLOPs per token, counted the same way for every model: 6 N_matmul + 6 L d T, N_matmul the
weights of the matrix multiplies (the tied embedding once, as the output layer; no positions, norms
or biases), T the sequence length.

Shapes (``--configs``): ``tiny`` (the preset, d 64, batch 16 x seq 128: the quickstart trial),
``d256`` and ``d512`` (the tiny family widened -- L 4, head dim 16, vocabulary 256 -- at batch 8 x
seq 256), and ``proxy-20m`` (48 layers, 129k vocabulary, batch 4 x seq 128; not in the default set).

Measurement: one process per (config, mode) holds all the models and interleaves them step by step:
each of ``--repeats`` rounds runs ``--steps`` steps of every model, one step of each in turn (the
order rotating every step), and a model's tokens/s and FLOP/s are its best round's (the median step time within the
round). The ratios in the table are paired: the median, over all interleaved cycles, of the ratio
of two models' step times in that cycle, so background load that drifts hits both sides alike
(the best rounds' ratios are in the JSON too). The first step is timed separately (under
``torch.compile``: the compile). The forward + backward and the optimizer part (clip, LR, step,
zero) of each step are timed apart too (JSON). A config that fails or runs past its timeout shows
as ``failed`` / ``timeout``, with the error in the JSON.

    python benchmarks/proxy_step.py --threads 1               # tiny, d256, d512; eager and compiled
    python benchmarks/proxy_step.py --no-compile --configs tiny
    python benchmarks/proxy_step.py --configs tiny d256 --models mup plain gpt2 mup-hd64 --json out.json
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

# shape per config: preset, width (None: the preset's), batch, sequence, timed steps per round
CONFIGS = {
    "tiny": {"preset": "tiny", "width": None, "batch_size": 16, "seq_len": 128, "steps": 20},
    "d256": {"preset": "tiny", "width": 256, "batch_size": 8, "seq_len": 256, "steps": 6},
    "d512": {"preset": "tiny", "width": 512, "batch_size": 8, "seq_len": 256, "steps": 3},
    "proxy-20m": {"preset": "proxy-20m", "width": None, "batch_size": 4, "seq_len": 128, "steps": 3},
}
DEFAULT_CONFIGS = ("tiny", "d256", "d512")
WARMUP_STEPS = 2
MODELS = ("mup", "plain", "gpt2", "mup-hd64", "gpt2-same-heads")
GPT2_KINDS = ("gpt2", "gpt2-same-heads")
DEFAULT_MODELS = ("mup", "plain", "gpt2")
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


# ---------------------------------------------------------------- the GPT-2-style model


class GPT2Attention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for z in self.c_attn(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class GPT2Block(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = GPT2Attention(d, n_heads)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, h):
        h = h + self.attn(self.ln_1(h))
        return h + self.c_proj(F.gelu(self.c_fc(self.ln_2(h)), approximate="tanh"))


class GPT2(nn.Module):
    """GPT-2 as nanoGPT writes it: learned positions, Pre-LayerNorm, GELU MLP 4 d, biases, tied
    embedding, N(0, 0.02) init (residual projections 0.02 / sqrt(2 L))."""

    def __init__(self, vocab_size: int, d: int, n_layers: int, n_heads: int, max_seq_len: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(vocab_size, d)
        self.wpe = nn.Embedding(max_seq_len, d)
        self.h = nn.ModuleList(GPT2Block(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias") and "ln_" not in name:
                nn.init.zeros_(p)

    def forward(self, tokens):
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.wte(tokens) + self.wpe(pos)
        for block in self.h:
            h = block(h)
        return F.linear(self.ln_f(h), self.wte.weight).float()


def plain_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


# ---------------------------------------------------------------- FLOPs


def matmul_params(model: nn.Module) -> int:
    """Weights of the matrix multiplies: every linear layer's, and the tied embedding once (the
    output layer; the embedding lookup itself is no matmul). Positions, norms, biases: none."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    embedding = model.wte if isinstance(model, GPT2) else model.tok_embeddings
    return n + embedding.weight.numel()


def flops_per_token(model: nn.Module, n_layers: int, d: int, seq_len: int) -> int:
    """6 N_matmul + 6 L d T: forward and backward of the matmuls and of attention's two products."""
    return 6 * matmul_params(model) + 6 * n_layers * d * seq_len


# ---------------------------------------------------------------- the models of one config


def model_config(config: str, model_kind: str = "mup"):
    """The ModelConfig a config trains (``mup-hd64``: head dim 64, heads and KV heads to match)."""
    from mutransfer.config import updated
    from mutransfer.presets import at_width, get_preset

    spec = CONFIGS[config]
    cfg = get_preset(spec["preset"]).model
    if spec["width"]:
        cfg = at_width(cfg, spec["width"])
    if model_kind == "mup-hd64":
        n_heads = max(1, cfg.d_model // 64)
        cfg = updated(cfg, "head dim 64", head_dim=cfg.d_model // n_heads, n_heads=n_heads,
                      n_kv_heads=max(1, n_heads // cfg.gqa_ratio))
    return cfg


def build(config: str, model_kind: str, gpt2_head_dim: int):
    """(model, step function, FLOPs per token, description) for one config and model kind."""
    from mutransfer.build import build_model
    from mutransfer.config import HParams, RunShape
    from mutransfer.model import loss_fn
    from mutransfer.optim import build_optimizers
    from mutransfer.presets import get_preset
    from mutransfer.transformer_spec import transformer_spec

    spec = CONFIGS[config]
    hp = HParams()
    cfg = model_config(config, model_kind)
    torch.manual_seed(0)
    if model_kind in ("mup", "mup-hd64"):
        shape = RunShape(model=cfg, param=get_preset(spec["preset"]).param)
        model = build_model(shape, hp, seed=0)
        opt = build_optimizers(model, transformer_spec(cfg), shape.model, shape.param, hp, "adamw")
        desc = f"d {cfg.d_model}, L {cfg.n_layers}, {cfg.n_heads}x{cfg.head_dim} heads ({cfg.n_kv_heads} KV)"

        def set_lr(factor):
            opt.set_lr_factor(factor)
    else:
        if model_kind == "plain":
            model = PlainTransformer(cfg)
            desc = f"d {cfg.d_model}, L {cfg.n_layers}, {cfg.n_heads}x{cfg.head_dim} heads ({cfg.n_kv_heads} KV)"
        else:
            n_heads = max(1, cfg.d_model // (cfg.head_dim if model_kind == "gpt2-same-heads" else gpt2_head_dim))
            model = GPT2(cfg.vocab_size, cfg.d_model, cfg.n_layers, n_heads, spec["seq_len"])
            desc = f"d {cfg.d_model}, L {cfg.n_layers}, {n_heads}x{cfg.d_model // n_heads} heads, MLP 4d"
        opt = plain_optimizer(model, hp.lr, hp.weight_decay)

        def set_lr(factor):
            for g in opt.param_groups:
                g["lr"] = hp.lr * factor

    params = list(model.parameters())

    def step(fwd, x, y) -> tuple[float, float, float]:
        """One training step; (loss, forward + backward seconds, optimizer seconds)."""
        t0 = time.perf_counter()
        loss = loss_fn(fwd(x), y)
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
        set_lr(1.0)
        opt.step()
        opt.zero_grad()
        value = loss.item()
        return value, t1 - t0, time.perf_counter() - t1

    return model, step, flops_per_token(model, cfg.n_layers, cfg.d_model, spec["seq_len"]), desc


def head_dim(model: nn.Module) -> int:
    if isinstance(model, GPT2):
        attention = model.h[0].attn
        return attention.c_proj.in_features // attention.n_heads
    return model.cfg.head_dim


def shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in model.parameters())


# ---------------------------------------------------------------- one config and mode (child process)


def measure(config: str, mode: str, models: list[str], batch_size: int, seq_len: int, steps: int,
            repeats: int, gpt2_head_dim: int) -> dict:
    """Every model of ``config``, interleaved in this process; one result per model."""
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for kind in models:
        model, step, flops, desc = build(config, kind, gpt2_head_dim)
        tokens = torch.randint(0, model_config(config).vocab_size, (batch_size, seq_len + 1), generator=gen)
        fwd = torch.compile(model) if mode == "compile" else model
        runs[kind] = {"model": model, "step": step, "fwd": fwd, "x": tokens[:, :-1], "y": tokens[:, 1:],
                      "result": {"model": kind, "describe": desc, "status": "ok",
                                 "params": sum(p.numel() for p in model.parameters()),
                                 "matmul_params": matmul_params(model), "flops_per_token": flops,
                                 "head_dim": head_dim(model),
                                 "param_shapes": shapes(model), "rounds": []}}
    for run in runs.values():  # first steps: compile (under torch.compile) and warm-up
        try:
            start = time.perf_counter()
            run["step"](run["fwd"], run["x"], run["y"])
            run["result"]["first_step_s"] = time.perf_counter() - start
            for _ in range(WARMUP_STEPS - 1):
                run["step"](run["fwd"], run["x"], run["y"])
        except Exception as e:  # noqa: BLE001 -- a compile failure is a result to report
            run["result"].update(status="failed", error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    live = [k for k in models if runs[k]["result"]["status"] == "ok"]
    for i in range(repeats):  # a round: `steps` steps of every model, interleaved step by step
        times = {k: {"step": [], "fb": [], "opt": []} for k in live}
        for j in range(steps):
            shift = (i * steps + j) % len(live)
            for kind in live[shift:] + live[:shift]:
                run = runs[kind]
                t0 = time.perf_counter()
                loss, t_fb, t_opt = run["step"](run["fwd"], run["x"], run["y"])
                times[kind]["step"].append(time.perf_counter() - t0)
                times[kind]["fb"].append(t_fb)
                times[kind]["opt"].append(t_opt)
                run["result"]["final_loss"] = loss
        load = os.getloadavg()[0]
        for kind, t in times.items():
            runs[kind]["result"]["rounds"].append({"step_s_median": statistics.median(t["step"]), "step_s": t["step"],
                                                   "fwd_bwd_s_median": statistics.median(t["fb"]),
                                                   "optimizer_s_median": statistics.median(t["opt"]),
                                                   "load_average": load})
    out = []
    for kind in models:
        r = runs[kind]["result"]
        if r["status"] == "ok":
            best = min(r["rounds"], key=lambda rd: rd["step_s_median"])
            med = best["step_s_median"]
            r.update(steps=steps, step_s_median=med, fwd_bwd_s=best["fwd_bwd_s_median"],
                     optimizer_s=best["optimizer_s_median"], tokens_per_s=batch_size * seq_len / med,
                     flops_per_s=batch_size * seq_len * r["flops_per_token"] / med,
                     rounds_tokens_per_s=[round(batch_size * seq_len / rd["step_s_median"]) for rd in r["rounds"]])
        out.append(r)
    return {"results": out}


def child(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = measure(args.config, args.mode, args.models, args.batch_size, args.seq_len, args.steps,
                         args.repeats, args.gpt2_head_dim)
    except Exception as e:  # noqa: BLE001 -- reported in the table
        result = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
    print("RESULT " + json.dumps(result))
    return 0


# ---------------------------------------------------------------- the table (parent process)


def run_config(config: str, mode: str, args) -> list[dict]:
    spec = CONFIGS[config]
    batch = args.batch_size or spec["batch_size"]
    seq = args.seq_len or spec["seq_len"]
    steps = args.steps or spec["steps"]
    base = {"config": config, "mode": mode, "batch_size": batch, "seq_len": seq}
    cmd = [sys.executable, __file__, "--child", "--config", config, "--mode", mode, "--models", *args.models,
           "--batch-size", str(batch), "--seq-len", str(seq), "--steps", str(steps), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--gpt2-head-dim", str(args.gpt2_head_dim)]
    timeout = args.compile_timeout if mode == "compile" else args.timeout
    start = time.perf_counter()
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{**base, "model": m, "status": "timeout", "error": f"no result within {timeout} s"}
                for m in args.models]
    wall = round(time.perf_counter() - start, 1)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    payload = json.loads(lines[-1][len("RESULT "):]) if lines else {}
    if "results" not in payload:
        tail = payload.get("error") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [{**base, "model": m, "status": "failed", "error": f"exit {proc.returncode}: {tail[:300]}"}
                for m in args.models]
    return [{**base, "wall_s": wall, "load_average_before": round(load, 2), **r} for r in payload["results"]]


def paired_ratio(r: dict, ref: dict, per_token: bool) -> float:
    """Median over interleaved cycles of ref's step time / r's (x FLOPs per token r / ref when
    ``per_token``): each cycle runs one step of every model back to back, so load drift cancels."""
    ratios = [t_ref / t for rd, rd_ref in zip(r["rounds"], ref["rounds"], strict=True)
              for t, t_ref in zip(rd["step_s"], rd_ref["step_s"], strict=True)]
    scale = r["flops_per_token"] / ref["flops_per_token"] if per_token else 1.0
    return statistics.median(ratios) * scale


def add_ratios(rows: list[dict]) -> None:
    """mup / plain in tokens/s (same FLOPs), every model / gpt2 in FLOP/s: the paired ratio (median
    over interleaved cycles; the table's) and the ratio of the best rounds."""
    by = {r["model"]: r for r in rows if r.get("status") == "ok"}
    for r in rows:
        for key in ("over_plain_tokens", "over_plain_tokens_best", "over_gpt2_flops", "over_gpt2_flops_best",
                    "over_same_heads_gpt2_flops"):
            r[key] = None
        if r.get("status") != "ok":
            continue
        if "plain" in by and r["model"] in ("mup", "plain"):
            r["over_plain_tokens"] = round(paired_ratio(r, by["plain"], per_token=False), 4)
            r["over_plain_tokens_best"] = round(r["tokens_per_s"] / by["plain"]["tokens_per_s"], 4)
            if r["model"] == "mup" and r.get("param_shapes") != by["plain"].get("param_shapes"):
                r["warning"] = "parameter shapes differ between mup and plain"
        if "gpt2" in by:
            r["over_gpt2_flops"] = round(paired_ratio(r, by["gpt2"], per_token=True), 4)
            r["over_gpt2_flops_best"] = round(r["flops_per_s"] / by["gpt2"]["flops_per_s"], 4)
        same = [by[k] for k in GPT2_KINDS if k in by and by[k]["head_dim"] == r["head_dim"]]
        if same and r["model"] not in GPT2_KINDS:
            r["over_same_heads_gpt2_flops"] = round(paired_ratio(r, same[0], per_token=True), 4)
    for r in rows:
        r.pop("param_shapes", None)


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


HEADER = (f"{'config':<9} {'model':<15} {'mode':<7} {'batch':>7} {'tokens/s':>9} {'GFLOP/s':>8} {'step ms':>8} "
          f"{'opt ms':>7} {'/plain':>6} {'/gpt2':>6} {'/same hd':>8} {'1st s':>6}  status")


def fmt_row(r: dict) -> str:
    shape = f"{r['batch_size']}x{r['seq_len']}"
    lead = f"{r['config']:<9} {r['model']:<15} {r['mode']:<7} {shape:>7}"
    if r.get("status") != "ok":
        return f"{lead} {'-':>9} {'-':>8} {'-':>8} {'-':>7} {'-':>6} {'-':>6} {'-':>8} {'-':>6}  {r['status']}: " \
               f"{r.get('error', '')[:70]}"

    def ratio(v):
        return "-" if v is None else f"{v:.3f}"
    return (f"{lead} {r['tokens_per_s']:>9,.0f} {r['flops_per_s'] / 1e9:>8.2f} {1000 * r['step_s_median']:>8.1f} "
            f"{1000 * r['optimizer_s']:>7.1f} {ratio(r['over_plain_tokens']):>6} {ratio(r['over_gpt2_flops']):>6} "
            f"{ratio(r['over_same_heads_gpt2_flops']):>8} {r['first_step_s']:>6.1f}  ok")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--no-compile", action="store_true", help="eager only (torch.compile is slow on CPU)")
    parser.add_argument("--batch-size", type=int, help="override every config's batch size")
    parser.add_argument("--seq-len", type=int, help="override every config's sequence length")
    parser.add_argument("--steps", type=int, help="timed steps per model and round (default: per config)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, models interleaved; the best round counts")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--gpt2-head-dim", type=int, default=64, help="the GPT-2 baseline's head dimension")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per eager config")
    parser.add_argument("--compile-timeout", type=int, default=2400, help="seconds per compiled config")
    parser.add_argument("--json", "--out", dest="out", default="runs/benchmarks/proxy_step.json",
                        help="JSON results file: every figure, every round")
    # one (config, mode) in this process (used by the parent for isolation)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    modes = ["eager"] if args.no_compile else args.modes
    info = machine()
    print(f"machine: {info['cpu']}, {info['nproc']} cores, torch {info['torch']}, "
          f"threads {args.threads or info['torch_threads_default']}, load average {info['load_average_start']}",
          flush=True)
    print(HEADER, flush=True)
    rows = []
    for config in args.configs:
        for mode in modes:
            group = run_config(config, mode, args)
            add_ratios(group)
            for r in group:
                print(fmt_row(r), flush=True)
            rows.extend(group)
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "proxy_step", "machine": info, "threads": args.threads or None,
                               "repeats": args.repeats, "warmup_steps": WARMUP_STEPS,
                               "flops_per_token": "6 N_matmul + 6 L d T", "rows": rows}, indent=2) + "\n")
    print(f"wrote {out} (load average at the end: {info['load_average_end']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
