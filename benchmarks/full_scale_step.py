"""Tokens/s and MFU of full-scale training steps, per precision backend.

Times forward + backward + clip + optimizer step of the Xmodel-2.5 1.3B model (or the same model
at a reduced width/depth where memory demands) in bf16 and in every FP8 backend this machine has,
one GPU, no data loading (random tokens). MFU = FLOPs/token (``mutransfer.plan``: 6 N_matmul +
attention) x tokens/s / the device's dense BF16 peak (RECIPE section 7), for every precision, so
FP8's gain shows as MFU above BF16's.

    python benchmarks/full_scale_step.py                    # GPU: 1.3B, seq 3712, micro-batch 2
    python benchmarks/full_scale_step.py --width 768 --layers 24
    python benchmarks/full_scale_step.py --smoke            # CPU: width 128, 2 layers, seq 256

Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from full_scale.metrics import environment, peak_flops
from mutransfer.build import build_model
from mutransfer.config import HParams
from mutransfer.model import loss_fn
from mutransfer.optim import build_optimizers
from mutransfer.plan import count_params, flops_per_token
from mutransfer.precision import PRECISIONS, autocast, available, check_dims, prepare_model
from mutransfer.presets import at_width, get_preset


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU smoke mode: small width, few steps")
    p.add_argument("--precisions", nargs="+", help=f"default: bf16 and every FP8 backend; from {PRECISIONS}")
    p.add_argument("--width", type=int, help="reduce d_model (head dim fixed, FFN 2.5 d)")
    p.add_argument("--layers", type=int, help="reduce the depth")
    p.add_argument("--seq-len", type=int, default=3712)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, FP8 history)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    p.add_argument("--peak-flops", type=float, help="device peak FLOP/s for MFU (default: table by GPU name)")
    p.add_argument("--json", default="full_scale_step.json", help="where to write the results")
    args = p.parse_args(argv)
    if args.smoke:
        args.width = args.width or 128
        args.layers = args.layers or 2
        args.seq_len = 256 if args.seq_len == 3712 else args.seq_len
        args.steps = min(args.steps, 3)
        args.warmup = min(args.warmup, 1)
        args.precisions = args.precisions or ["fp32", "bf16", "fp8-emulated", "fp8-te", "fp8-torchao"]
    args.precisions = args.precisions or ["bf16", "fp8-te", "fp8-torchao"]
    return args


def target_shape(width: int | None, layers: int | None):
    shape = get_preset("xmodel25-1.3b")
    model = shape.model
    if width:
        model = at_width(model, width)
    if layers:
        model = dataclasses.replace(model, n_layers=layers)
    return dataclasses.replace(shape, model=model.validate())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(shape, precision: str, device: torch.device, args) -> dict:
    ok, why = available(precision)
    if not ok:
        return {"precision": precision, "status": "skipped", "why": why}
    check_dims(shape.model, precision)
    hp = HParams()
    model = prepare_model(build_model(shape, hp, device=device, seed=0), precision)
    opts = build_optimizers(model, shape, hp, args.optimizer)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, shape.model.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with autocast(precision, device.type):
            loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        opts.step()
        opts.zero_grad()
        return loss

    try:
        for _ in range(args.warmup):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync(device)
        seconds = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError:
        return {"precision": precision, "status": "oom",
                "why": "out of memory: lower --micro-batch, or --width / --layers"}
    tokens_per_s = args.micro_batch * args.seq_len * args.steps / seconds
    flops = flops_per_token(shape, args.seq_len)
    peak = peak_flops(device, args.peak_flops)
    return {
        "precision": precision, "status": "ok", "loss": loss.item(),
        "step_ms": 1000 * seconds / args.steps, "tokens_per_s": tokens_per_s,
        "tflops_per_s": flops * tokens_per_s / 1e12, "mfu": flops * tokens_per_s / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def format_table(results: list[dict], header: str) -> str:
    base = next((r["tokens_per_s"] for r in results if r["precision"] == "bf16" and r["status"] == "ok"), None)
    lines = [header, f"{'precision':<13} {'tokens/s':>11} {'step ms':>9} {'TFLOP/s':>8} {'MFU':>7} "
                     f"{'vs bf16':>8} {'mem GiB':>8}  note"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"{r['precision']:<13} {'-':>11} {'-':>9} {'-':>8} {'-':>7} {'-':>8} {'-':>8}  "
                         f"{r['status']}: {r['why']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"{r['precision']:<13} {r['tokens_per_s']:>11.0f} {r['step_ms']:>9.1f} "
                     f"{r['tflops_per_s']:>8.2f} {mfu:>7} {ratio:>8} {mem:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: running the CPU smoke mode (--smoke)", file=sys.stderr)
        return main([*(argv if argv is not None else sys.argv[1:]), "--smoke"])
    shape = target_shape(args.width, args.layers)
    counts = count_params(shape)
    m = shape.model
    header = (f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}): "
              f"d={m.d_model} layers={m.n_layers} params={counts['params_total'] / 1e9:.3f}B "
              f"seq={args.seq_len} micro-batch={args.micro_batch} optimizer={args.optimizer} "
              f"steps={args.steps} (+{args.warmup} warmup)")
    results = []
    for precision in args.precisions:
        results.append(bench_one(shape, precision, device, args))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(format_table(results, header))
    out = {"mode": "smoke" if args.smoke else "full", "model": dataclasses.asdict(m), **counts,
           "flops_per_token": flops_per_token(shape, args.seq_len), "seq_len": args.seq_len,
           "micro_batch": args.micro_batch, "optimizer": args.optimizer, "steps": args.steps,
           "peak_flops": peak_flops(device, args.peak_flops), "results": results,
           "environment": environment(1, device)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
