"""The GPU check of the full-scale step: tokens/s, MFU and peak memory next to the plan's prediction.

Runs the real training step (``mutransfer.step.train_step``: forward with the chunked loss,
backward, clip, optimizer step) of the Xmodel-2.5 1.3B model at the recipe's shapes on one GPU,
for each precision backend this machine has (bf16, fp8-torchao, fp8-te) and each activation
checkpointing policy asked for, with random tokens (no data loading). Per case it prints tokens/s,
achieved TFLOP/s, MFU (FLOPs/token from ``mutransfer.plan`` x tokens/s / the device's dense BF16
peak, RECIPE section 7, for every precision, so FP8's gain shows as MFU above bf16's), the FP8 /
bf16 speed-up, and the measured peak memory beside ``mutransfer.memory``'s prediction for the same
phase on one GPU, and writes everything to JSON.

    python benchmarks/full_scale_step.py                                  # GPU: 1.3B, 3712 x 2
    python benchmarks/full_scale_step.py --seq-len 16384 --micro-batch 1  # the long-context phase
    python benchmarks/full_scale_step.py --compile --checkpointing none full selective
    python benchmarks/full_scale_step.py --smoke                          # CPU: width 128, 2 layers
    python benchmarks/full_scale_step.py --dry-run                        # CPU, seconds: width 64, 1 layer

Beyond torch it needs pydantic and this repository on the path, nothing installed:
``benchmarks/gpu_check.sh`` runs it on a machine that has torch only (benchmarks/README.md, "GPU
check"). Never part of the tests, which run its dry-run mode through that launcher.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from full_scale.metrics import peak_flops
from mutransfer.build import build_model, configure_model
from mutransfer.config import HParams, TrainSettings, updated
from mutransfer.memory import estimate
from mutransfer.optim import build_optimizers
from mutransfer.plan import count_params, flops_per_token
from mutransfer.precision import PRECISIONS, available, check_checkpointing, check_dims, prepare_model
from mutransfer.presets import at_width, get_preset
from mutransfer.rundir import environment, write_json
from mutransfer.step import train_step
from mutransfer.transformer_spec import transformer_spec

GIB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU smoke mode: small width, few steps")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, seconds: width 64, 1 layer, 64 tokens, 2 steps, no recomputation -- the whole path "
                        "(imports, build, steps, JSON) on this machine, every backend's availability in the JSON")
    p.add_argument("--precisions", nargs="+", help=f"default: bf16 and every FP8 backend; from {PRECISIONS}")
    p.add_argument("--checkpointing", nargs="+", help="none | full | selective (default: none full; --dry-run: none)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (as [train] compile)")
    p.add_argument("--width", type=int, help="reduce d_model (head dim fixed, FFN 2.5 d)")
    p.add_argument("--layers", type=int, help="reduce the depth")
    p.add_argument("--seq-len", type=int, default=3712)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--loss-chunk", type=int, default=4096, help="tokens per cross-entropy chunk")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, compile, FP8 history)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    p.add_argument("--peak-flops", type=float, help="device peak FLOP/s for MFU (default: table by GPU name)")
    p.add_argument("--json", default="full_scale_step.json", help="where to write the results")
    args = p.parse_args(argv)
    args.checkpointing = args.checkpointing or (["none"] if args.dry_run else ["none", "full"])
    if args.dry_run:  # the smoke mode, smaller still
        args.smoke = True
        args.width = args.width or 64
        args.layers = args.layers or 1
        args.seq_len = 64 if args.seq_len == 3712 else args.seq_len
        args.steps = min(args.steps, 2)
    if args.smoke:
        args.width = args.width or 128
        args.layers = args.layers or 2
        args.seq_len = 256 if args.seq_len == 3712 else args.seq_len
        args.steps = min(args.steps, 3)
        args.warmup = min(args.warmup, 1)
        args.precisions = args.precisions or ["fp32", "bf16", "fp8-emulated", "fp8-te", "fp8-torchao"]
    args.precisions = args.precisions or ["bf16", "fp8-torchao", "fp8-te"]
    return args


def target_shape(width: int | None, layers: int | None):
    shape = get_preset("xmodel25-1.3b")
    model = shape.model
    if width:
        model = at_width(model, width)
    if layers:
        model = updated(model, "--layers", n_layers=layers)
    return updated(shape, "shape", model=model)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predicted_peak(shape, precision: str, policy: str, args) -> float:
    """The memory model's training peak for this phase on one GPU (no sharding), in GiB."""
    est = estimate(shape.model, seq_len=args.seq_len, micro_batch=args.micro_batch, world_size=1, parallel="none",
                   optimizer=args.optimizer, precision=precision if precision != "fp32" else "fp32",
                   checkpointing=policy, loss_chunk_tokens=args.loss_chunk)
    return est.peak / GIB


def bench_one(shape, precision: str, policy: str, device: torch.device, args) -> dict:
    case = {"precision": precision, "checkpointing": policy, "compile": args.compile}
    ok, why = available(precision)
    if not ok:
        return {**case, "status": "skipped", "why": why}
    try:
        check_checkpointing(precision, policy)
    except ValueError as e:
        return {**case, "status": "skipped", "why": str(e)}
    check_dims(shape.model, precision)
    hp = HParams()
    settings = TrainSettings(precision=precision, activation_checkpointing=policy, loss_chunk_tokens=args.loss_chunk,
                             compile=args.compile)
    spec = transformer_spec(shape.model)
    model = configure_model(prepare_model(build_model(shape, hp, device=device, seed=0), precision), settings, spec)
    opts = build_optimizers(model, spec, shape.model, shape.param, hp, args.optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, shape.model.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():  # the training step every loop shares
        return train_step(model, opts, [(x, y)], params=params, precision=precision, device_type=device.type,
                          grad_clip=hp.grad_clip).loss

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
        return {**case, "status": "oom", "why": "out of memory: lower --micro-batch, or --width / --layers",
                "predicted_peak_gib": predicted_peak(shape, precision, policy, args)}
    tokens_per_s = args.micro_batch * args.seq_len * args.steps / seconds
    flops = flops_per_token(shape, args.seq_len)
    peak = peak_flops(device, args.peak_flops)
    return {
        **case, "status": "ok", "loss": loss,
        "step_ms": 1000 * seconds / args.steps, "tokens_per_s": tokens_per_s,
        "tflops_per_s": flops * tokens_per_s / 1e12, "mfu": flops * tokens_per_s / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
        "predicted_peak_gib": predicted_peak(shape, precision, policy, args),
    }


def format_table(results: list[dict], header: str) -> str:
    def bf16_rate(policy):
        return next((r["tokens_per_s"] for r in results if r["precision"] == "bf16" and r["status"] == "ok"
                     and r["checkpointing"] == policy), None)

    lines = [header, f"{'precision':<13} {'recompute':<10} {'tokens/s':>10} {'step ms':>9} {'TFLOP/s':>8} "
                     f"{'MFU':>7} {'vs bf16':>8} {'mem GiB':>8} {'plan GiB':>9}  note"]
    for r in results:
        plan = f"{r['predicted_peak_gib']:.1f}" if r.get("predicted_peak_gib") is not None else "-"
        if r["status"] != "ok":
            lines.append(f"{r['precision']:<13} {r['checkpointing']:<10} {'-':>10} {'-':>9} {'-':>8} {'-':>7} "
                         f"{'-':>8} {'-':>8} {plan:>9}  {r['status']}: {r['why']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        base = bf16_rate(r["checkpointing"])
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"{r['precision']:<13} {r['checkpointing']:<10} {r['tokens_per_s']:>10.0f} {r['step_ms']:>9.1f} "
                     f"{r['tflops_per_s']:>8.2f} {mfu:>7} {ratio:>8} {mem:>8} {plan:>9}")
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
    header = (f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch "
              f"{torch.__version__}: d={m.d_model} layers={m.n_layers} params={counts['params_total'] / 1e9:.3f}B "
              f"seq={args.seq_len} micro-batch={args.micro_batch} optimizer={args.optimizer} "
              f"compile={args.compile} steps={args.steps} (+{args.warmup} warmup)")
    results = []
    for precision in args.precisions:
        for policy in args.checkpointing:
            print(f"  {precision} / {policy} ...", file=sys.stderr, flush=True)
            results.append(bench_one(shape, precision, policy, device, args))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(format_table(results, header))
    out = {"mode": "dry-run" if args.dry_run else "smoke" if args.smoke else "full", "model": m.model_dump(), **counts,
           "flops_per_token": flops_per_token(shape, args.seq_len), "seq_len": args.seq_len,
           "micro_batch": args.micro_batch, "optimizer": args.optimizer, "compile": args.compile,
           "steps": args.steps, "peak_flops": peak_flops(device, args.peak_flops), "results": results,
           "environment": environment(1, str(device))}
    write_json(args.json, out)  # atomic: a killed run leaves the old file or none
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
