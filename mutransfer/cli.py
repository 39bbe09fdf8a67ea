"""The ``mutransfer`` command.

Core sub-commands (plan, data) live here; the outer packages (proxy_sweeps, full_scale,
analysis) register theirs through the ``mutransfer.commands`` entry-point group, so the core
never imports them. Exit status: 0 success, 1 a check that failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points

from mutransfer.config import ConfigError


def _register_plan(sub) -> None:
    p = sub.add_parser("plan", help="parameters, FLOPs, memory and per-group muP settings of a model")
    p.add_argument("target", help="preset name (tiny, proxy-20m, xmodel25-1.3b) or a TOML config")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--param", choices=["xmodel", "mup", "sp"], help="parametrization (default: the preset's)")
    p.add_argument("--optimizer", default="adamw", help="optimizer of the hidden matrices: adamw | muon")
    p.add_argument("--width", type=int, help="the same model at another width (head dim fixed)")
    p.add_argument("--seq-len", type=int, help="sequence length for the attention FLOPs term")
    p.add_argument("--hparams", help="a lock file (hparams.lock.json) with the frozen base hyperparameters")
    for name in ("lr", "init_std", "alpha_in", "alpha_out", "alpha_res", "weight_decay"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, help=f"base {name}")
    p.add_argument("--table", action="store_true", help="also print the whole muP rule table")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    import dataclasses

    from mutransfer.parametrization import describe_table
    from mutransfer.plan import format_plan, hparams_from, make_plan, resolve_target
    from mutransfer.presets import at_width

    shape, raw = resolve_target(args.target)
    if args.width:
        shape = dataclasses.replace(shape, model=at_width(shape.model, args.width))
    if args.param:
        shape = dataclasses.replace(shape, param=dataclasses.replace(shape.param, parametrization=args.param))
    base = hparams_from(raw.get("hparams", {}))
    if args.hparams:
        from mutransfer.lockfile import read_lock

        base = read_lock(args.hparams).hparams
    overrides = {k: getattr(args, k) for k in ("lr", "init_std", "alpha_in", "alpha_out", "alpha_res",
                                               "weight_decay")}
    hp = hparams_from(overrides, base)
    plan = make_plan(shape, hp, optimizer=args.optimizer, seq_len=args.seq_len)
    if raw.get("stages"):
        from mutransfer.stages import describe_stages

        plan["stages"] = describe_stages(raw, shape, hp)
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(plan))
        if "stages" in plan:
            from mutransfer.stages import format_stages

            print()
            print(format_stages(plan["stages"]))
        if args.table:
            print()
            print(describe_table())
    return 0


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
