"""The ``mutransfer`` command.

Core sub-commands (plan, data) live here; the outer packages (proxy_sweeps, full_scale,
analysis) register theirs through the ``mutransfer.commands`` entry-point group, so the core
never imports them. Building the parser imports no torch, pandas or matplotlib (each command loads
what it needs when it runs), so ``--help``, ``plan``, ``schema`` and ``report`` start in a moment.
Exit status: 0 success, 1 a check that failed, 2 bad input, 74 a full disk during a checkpoint save
(``train``).
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points

from mutransfer.config import ConfigError


def _register_plan(sub) -> None:
    p = sub.add_parser("plan", help="parameters, FLOPs, memory per GPU and per-group muP settings of a model",
                       description="With a full-scale config: the stage table, every group's LR per stage, and "
                                   "the peak memory of every stage on one GPU with a fits / does-not-fit verdict "
                                   "(exit 1 when a stage does not fit).")
    p.add_argument("target", help="preset name (tiny, proxy-20m, xmodel25-1.3b) or a TOML config")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--param", choices=["xmodel", "mup", "sp"], help="parametrization (default: the preset's)")
    p.add_argument("--optimizer", default="adamw", help="optimizer of the hidden matrices: adamw | muon")
    p.add_argument("--width", type=int, help="the same model at another width (head dim fixed)")
    p.add_argument("--seq-len", type=int, help="sequence length for the attention FLOPs term "
                                               "(default: the config's first stage, else 4096)")
    p.add_argument("--hparams", help="a lock file (hparams.lock.json); default: the config's train.hparams")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel GPUs for the memory table (default 1)")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 141GiB (default 80GiB)")
    for name in ("lr", "init_std", "alpha_in", "alpha_out", "alpha_res", "weight_decay"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, help=f"base {name}")
    p.add_argument("--table", action="store_true", help="also print the whole muP rule table")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. model.width=128 or train.activation_checkpointing=none")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    from pathlib import Path

    from mutransfer.config import finite, hparams_from, parse, updated
    from mutransfer.parametrization import describe_table
    from mutransfer.plan import (
        format_memory,
        format_plan,
        make_plan,
        memory_plan,
        parse_bytes,
        resolve_target,
        shape_from_config,
    )
    from mutransfer.presets import at_width

    for name in ("lr", "init_std", "alpha_in", "alpha_out", "alpha_res", "weight_decay"):
        if getattr(args, name) is not None:
            finite(getattr(args, name), f"--{name.replace('_', '-')}")
    gpu_memory = parse_bytes(args.gpu_memory)
    shape, raw = resolve_target(args.target, args.overrides)
    base = hparams_from(raw.get("hparams", {}))
    lock_path = args.hparams
    train_table = raw.get("train", {}) if isinstance(raw.get("train", {}), dict) else {}
    if lock_path is None and train_table.get("hparams"):  # as `train` finds it: relative to the config file
        lock_path = str(Path(args.target).parent / train_table["hparams"])
    lock = None
    if lock_path:
        from mutransfer.lockfile import check_lock_matches, read_lock

        lock = read_lock(lock_path)
        if raw and "param" not in raw:  # a config without [param] takes it from the lock, as train does
            shape = shape_from_config(raw, args.target, param_default=lock.param)
        base = lock.hparams
    if args.width:
        shape = updated(shape, "plan", model=at_width(shape.model, args.width))
    if args.param:
        shape = updated(shape, "plan", param=updated(shape.param, "--param", parametrization=args.param))
    if lock is not None:
        check_lock_matches(lock, shape)  # the check `train` does, with the same message
    overrides = {k: getattr(args, k) for k in ("lr", "init_std", "alpha_in", "alpha_out", "alpha_res",
                                               "weight_decay")}
    hp = hparams_from(overrides, base)
    seq_len = args.seq_len
    if seq_len is None and raw.get("stages"):
        first = raw["stages"][0] if isinstance(raw["stages"][0], dict) else {}
        seq_len = first.get("seq_len") or (first.get("phases") or [{}])[0].get("seq_len")
    plan = make_plan(shape, hp, optimizer=args.optimizer, seq_len=seq_len)
    plan["hparams_lock"] = lock_path
    plan["lock_warnings"] = [w.message for w in lock.warnings] if lock is not None else []
    memory = None
    if raw.get("stages") and lock is not None:
        from mutransfer.laws import TransferCorrection, correction
        from mutransfer.plan import transfer_table
        from mutransfer.stages import parse_stages

        use = parse(TransferCorrection, raw.get("transfer", {}), "transfer")
        stage_plan = parse_stages(raw, shape, hp)
        batches = [p.global_batch for _, _, _, p in stage_plan.phases()]
        fix = correction(lock.laws, lock.proxy_train, stage_plan.total_tokens, max(set(batches), key=batches.count),
                         use)
        applied = use.horizon == "fitted" or use.batch == "fitted"
        plan["lr_transfer"] = {"correction": fix, "groups": transfer_table(lock, shape, fix["factor"] if applied
                                                                            else _would_be(fix), applied)}
        if applied:
            hp = hparams_from({"lr": hp.lr * fix["factor"]}, hp)
    if raw.get("stages"):
        from mutransfer.stages import describe_stages

        plan["schedule"] = describe_stages(raw, shape, hp)
        memory = memory_plan(raw, shape, hp, args.world_size, gpu_memory)
        plan.update(world_size=memory["world_size"], gpu_memory_bytes=gpu_memory, memory=memory,
                    stages=memory["stages"])
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(plan))
        for message in plan["lock_warnings"]:  # what freeze saw, shown wherever the lock is used
            print(f"lock warning: {message}")
        if "lr_transfer" in plan:
            from mutransfer.plan import format_transfer_table

            print()
            print(format_transfer_table(plan["lr_transfer"]["groups"], plan["lr_transfer"]["correction"]))
        if "schedule" in plan:
            from mutransfer.stages import format_stages

            print()
            print(format_stages(plan["schedule"]))
            print()
            print(format_memory(memory))
        if args.table:
            print()
            print(describe_table())
    return 0 if memory is None or memory["fits"] else 1


def _would_be(fix: dict) -> float:
    """The factor the lock's laws would apply (shown, not applied, when the config does not ask)."""
    factor = 1.0
    for term in fix["terms"].values():
        factor *= term.get("would_be") or 1.0
    return factor


def _register_schema(sub) -> None:
    p = sub.add_parser("schema", help="document every config table (Markdown) or print the JSON schemas")
    p.add_argument("--json", action="store_true", help="the JSON schemas instead of Markdown")
    p.set_defaults(func=_run_schema)


def _run_schema(args) -> int:
    from mutransfer.config_docs import run

    return run(args)


def _register_plugins(sub) -> None:
    for ep in sorted(entry_points(group="mutransfer.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as e:  # an outer package not installed or broken: say so when used
            p = sub.add_parser(ep.name, help=f"(unavailable: {e})")
            p.set_defaults(func=lambda args, e=e, name=ep.name: _unavailable(name, e))
            continue
        register(sub)


def _unavailable(name: str, error: Exception) -> int:
    print(f"mutransfer {name}: cannot load the command: {error}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    from mutransfer.data.cli import register as register_data

    parser = argparse.ArgumentParser(prog="mutransfer", description="muP hyperparameter transfer toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    _register_plan(sub)
    register_data(sub)
    _register_schema(sub)
    _register_plugins(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
