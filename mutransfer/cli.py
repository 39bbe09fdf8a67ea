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

HP_FLAGS = ("lr", "init_std", "alpha_in", "alpha_out", "alpha_res", "weight_decay")  # plan's what-if flags

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
    for name in HP_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, help=f"base {name}")
    p.add_argument("--table", action="store_true", help="also print the whole muP rule table")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. model.width=128 or train.activation_checkpointing=none")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    from pathlib import Path

    from mutransfer.config import finite, hparams_from, load_toml, updated
    from mutransfer.parametrization import describe_table
    from mutransfer.plan import format_plan, make_plan, parse_bytes, resolve_target, shape_from_config
    from mutransfer.presets import at_width
    from mutransfer.run_config import is_staged

    for name in HP_FLAGS:
        if getattr(args, name) is not None:
            finite(getattr(args, name), f"--{name.replace('_', '-')}")
    gpu_memory = parse_bytes(args.gpu_memory)
    if Path(args.target).is_file() and is_staged(load_toml(args.target)):
        return _run_plan_staged(args, gpu_memory)
    shape, raw = resolve_target(args.target, args.overrides)
    base = hparams_from(raw.get("hparams", {}))
    lock_path = args.hparams
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
    hp = hparams_from({k: getattr(args, k) for k in HP_FLAGS}, base)
    plan = make_plan(shape, hp, optimizer=args.optimizer, seq_len=args.seq_len)
    plan["hparams_lock"] = lock_path
    plan["lock_warnings"] = [w.message for w in lock.warnings] if lock is not None else []
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    if not args.json:
        print_lock_warnings(plan["lock_warnings"])
    if args.table and not args.json:
        print()
        print(describe_table())
    return 0


def _run_plan_staged(args, gpu_memory: int) -> int:
    """A full-scale config: the checks `train` makes (``mutransfer.run_config.check_run``), then the
    stage table, every group's LR per stage, the recipe's choices and the memory of every phase."""
    from pathlib import Path

    from mutransfer.choices import format_choices, recipe_choices
    from mutransfer.config import hparams_from, updated
    from mutransfer.lockfile import check_lock_matches, read_lock
    from mutransfer.parametrization import describe_table
    from mutransfer.plan import (
        format_memory,
        format_plan,
        format_transfer_table,
        make_plan,
        memory_plan,
        shape_from_config,
        transfer_table,
        weight_decay_transfer,
    )
    from mutransfer.presets import at_width
    from mutransfer.run_config import FullTrain, check_run, lock_path_of, read_config, section
    from mutransfer.stages import describe_stages, format_stages

    raw = read_config(args.target, args.overrides)
    lock_path = lock_path_of(args.target, section(FullTrain, raw, "train"), args.hparams)
    lock = read_lock(lock_path)
    shape = shape_from_config(raw, Path(args.target).name, param_default=lock.param)
    if args.width:
        shape = updated(shape, "plan", model=at_width(shape.model, args.width))
    if args.param:
        shape = updated(shape, "plan", param=updated(shape.param, "--param", parametrization=args.param))
    check_lock_matches(lock, shape)
    run = check_run(raw, shape, lock, hparams_from({k: getattr(args, k) for k in HP_FLAGS}, lock.hparams))
    first = run.stages.stages[0].phases[0].seq_len
    plan = make_plan(shape, run.hparams, optimizer=args.optimizer, seq_len=args.seq_len or first)
    plan["hparams_lock"] = lock_path
    plan["lock_warnings"] = [w.message for w in lock.warnings]
    fix = with_tokens_per_parameter(run.lr_correction, lock.laws, run.stages.total_tokens, plan["params_total"])
    applied = run.transfer.horizon == "fitted" or run.transfer.batch == "fitted"
    wd_applied = run.wd_correction["weight_decay"] if run.wd_correction and run.wd_correction["applied"] else None
    plan["lr_transfer"] = {"correction": fix, "groups": transfer_table(lock, shape, fix["factor"] if applied
                                                                        else _would_be(fix), applied,
                                                                        fix["interval_90"], wd_applied),
                           "weight_decay": weight_decay_transfer(run.wd_correction)}
    plan["warnings"] = fix["warnings"]
    plan["recipe_choices"] = recipe_choices(shape, run.stages, run.residual, lock.hparams, run.hparams)
    plan["schedule"] = describe_stages(raw, shape, run.hparams)
    memory = memory_plan(run, shape, args.world_size, gpu_memory)
    plan.update(world_size=memory["world_size"], gpu_memory_bytes=gpu_memory, memory=memory,
                stages=memory["stages"])
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(plan))
        print_lock_warnings(plan["lock_warnings"])
        print()
        for block in (format_transfer_table(plan["lr_transfer"]["groups"], fix, plan["warnings"],
                                            run.wd_correction),
                      format_stages(plan["schedule"]), format_choices(plan["recipe_choices"]), format_memory(memory)):
            print(block)
            print()
        if args.table:
            print(describe_table())
    return 0 if memory["fits"] else 1


def print_lock_warnings(messages: list[str]) -> None:
    """What freeze saw (a value at its search range's edge, a law that did not pass), shown wherever
    the lock is used."""
    for message in messages:
        print(f"lock warning: {message}")


def with_tokens_per_parameter(fix: dict, laws, tokens: float, params: int) -> dict:
    """``fix`` with each law's tokens per parameter: the target's against the range the law was fitted at."""
    from mutransfer.laws import tokens_per_parameter

    terms = {kind: {**t, "tokens_per_parameter": tokens_per_parameter(getattr(laws, kind), tokens, params)}
             for kind, t in fix["terms"].items()}
    return {**fix, "terms": terms}


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
