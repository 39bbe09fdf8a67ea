"""Sub-commands ``sweep``, ``freeze`` and ``transfer-check`` (registered through entry points)."""

from __future__ import annotations

import sys

from mutransfer.tracking.settings import TRACK_HELP, track_override


def _overrides(args) -> list[str]:
    """``--set`` assignments, with ``--track`` as the last (it wins over the file and ``--set``)."""
    return [*args.overrides, *([track_override(args.track)] if args.track is not None else [])]


def register_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="run (or continue) an Optuna sweep of a proxy's base hyperparameters")
    p.add_argument("file", help="sweep definition (TOML), e.g. proxy_sweeps/quickstart.toml")
    p.add_argument("--out", required=True, help="results directory (also holds the default journal storage)")
    p.add_argument("--storage", help="journal file path, or an Optuna RDB URL (postgresql://... to share one "
                                     "study between machines); default: DIR/optuna-journal.log")
    p.add_argument("--workers", type=int, default=1, help="trial processes on this machine (default 1)")
    p.add_argument("--trials", type=int, help="total trials of the study (default: the file's sweep.trials)")
    p.add_argument("--study", help="study name (default: the file's sweep.name, else its file name)")
    p.add_argument("--gpus-per-trial", type=int, default=0,
                   help="GPUs per worker, assigned through CUDA_VISIBLE_DEVICES (train.device cuda/auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads per worker (default: cores / workers)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the sweep file, e.g. train.steps=60 or sampler.kind=random (repeatable)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="continue a study although its data changed since its trials ran (recorded in the study)")
    p.add_argument("--track", metavar="BACKENDS", help=TRACK_HELP + " (a tracker run per trial)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    from proxy_sweeps.processes import Stopped, stops_raised

    try:
        with stops_raised():  # while the sweep's modules load a stop is an exit status too, not a kill
            from proxy_sweeps.sweep import run_sweep

            return run_sweep(args.file, args.out, storage=args.storage, workers=args.workers, trials=args.trials,
                             study_name=args.study, gpus_per_trial=args.gpus_per_trial, quiet=args.quiet,
                             threads=args.threads, overrides=_overrides(args),
                             allow_data_change=args.allow_data_change)
    except Stopped as e:  # before run_sweep caught stops itself (or after it returned): nothing to export
        print(f"stopped by signal {e.signum} outside the sweep's run; nothing exported", file=sys.stderr)
        return 128 + e.signum


def register_freeze(sub) -> None:
    p = sub.add_parser("freeze", help="write the best trial's base hyperparameters to a lock file")
    p.add_argument("dir", help="a directory written by `mutransfer sweep`")
    p.add_argument("--out", required=True, help="lock file to write, e.g. hparams.lock.json")
    p.add_argument("--storage", help="storage URL, when config.json's has no password")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="hparams.KEY=VALUE",
                   help="set a frozen value by hand, e.g. hparams.weight_decay=0.05 (recorded in the provenance)")
    p.add_argument("--law", dest="laws", action="append", default=[], metavar="TRANSFER_DIR",
                   help="attach the horizon (axis steps) or batch (axis batch_size) law a transfer check fitted; "
                        "a full-scale config applies it with [transfer] horizon/batch = 'fitted'")
    p.add_argument("--strict", action="store_true",
                   help="a warning (a value at its search range's edge, a law whose check did not pass) is an "
                        "error: exit 1, no lock written")
    p.set_defaults(func=_run_freeze)


def _run_freeze(args) -> int:
    from proxy_sweeps.freeze import StrictRefusal, freeze

    try:
        lock = freeze(args.dir, args.out, storage=args.storage, overrides=args.overrides, law_dirs=args.laws,
                      strict=args.strict)
    except StrictRefusal as e:
        for w in e.warnings:
            print(f"warning: {w['message']}", file=sys.stderr)
        print(f"freeze --strict: {len(e.warnings)} warning(s); no lock written to {args.out}", file=sys.stderr)
        return 1
    prov = lock["provenance"]
    print(f"froze trial {prov['trial_number']} of study {prov['study']!r} "
          f"(objective {prov['objective']['value']:.4f}) -> {args.out}", file=sys.stderr)
    for name in prov["searched"]:
        value = lock["hparams"].get(name, prov["schedule_params"].get(name))
        print(f"  {name} = {value:.6g}", file=sys.stderr)
    for kind, law in lock.get("laws", {}).items():
        print(f"  {kind} law: log2 LR* = {law['a']:.3f} - {law['beta']:.3f} log2 {law['unit']} (from {law['source']})",
              file=sys.stderr)
    for w in lock["warnings"]:
        print(f"warning: {w['message']}", file=sys.stderr)
    return 0


def register_transfer_check(sub) -> None:
    p = sub.add_parser("transfer-check", help="LR-transfer evidence along width, depth, token horizon or batch size; "
                                              "with a [target] table, the joint check of all of them at once")
    p.add_argument("file", help="transfer-check definition (TOML), e.g. proxy_sweeps/lr_transfer_tiny.toml, or a "
                                "joint check, e.g. proxy_sweeps/joint_tiny.toml")
    p.add_argument("--out", required=True, help="results directory (runs.jsonl, verdict.json, transfer.png or "
                                                "joint.png)")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel on this machine (CPU threads split)")
    p.add_argument("--seeds", type=int, help="seeds per grid point (raise it on a re-run to add seeds to the "
                                             "directory without repeating the runs it has)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the file, e.g. train.steps=60 (repeatable)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="continue a directory although its data changed since its runs")
    p.add_argument("--track", metavar="BACKENDS", help=TRACK_HELP + " (a tracker run per grid point)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_run_transfer)


def _run_transfer(args) -> int:
    from mutransfer.config import load_toml
    from proxy_sweeps.joint_config import is_joint

    if is_joint(load_toml(args.file)):  # a [target] table: the joint check
        from proxy_sweeps.joint import run_joint_check

        return run_joint_check(args.file, args.out, workers=args.workers, quiet=args.quiet, overrides=args.overrides,
                               seeds=args.seeds, allow_data_change=args.allow_data_change)
    from proxy_sweeps.transfer import run_transfer_check

    return run_transfer_check(args.file, args.out, workers=args.workers, quiet=args.quiet, overrides=_overrides(args),
                              seeds=args.seeds, allow_data_change=args.allow_data_change)
