"""Sub-commands ``sweep``, ``freeze`` and ``transfer-check`` (registered through entry points)."""

from __future__ import annotations

import sys


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
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    from proxy_sweeps.engine import run_sweep

    return run_sweep(args.file, args.out, storage=args.storage, workers=args.workers, trials=args.trials,
                     study_name=args.study, gpus_per_trial=args.gpus_per_trial, quiet=args.quiet,
                     threads=args.threads)


def register_freeze(sub) -> None:
    p = sub.add_parser("freeze", help="write the best trial's base hyperparameters to a lock file")
    p.add_argument("dir", help="a directory written by `mutransfer sweep`")
    p.add_argument("--out", required=True, help="lock file to write, e.g. hparams.lock.json")
    p.add_argument("--storage", help="storage URL, when config.json's has no password")
    p.set_defaults(func=_run_freeze)


def _run_freeze(args) -> int:
    from proxy_sweeps.freeze import freeze

    lock = freeze(args.dir, args.out, storage=args.storage)
    prov = lock["provenance"]
    print(f"froze trial {prov['trial_number']} of study {prov['study']!r} "
          f"(objective {prov['objective']['value']:.4f}) -> {args.out}", file=sys.stderr)
    for name in prov["searched"]:
        value = lock["hparams"].get(name, prov["schedule_params"].get(name))
        print(f"  {name} = {value:.6g}", file=sys.stderr)
    return 0


def register_transfer_check(sub) -> None:
    p = sub.add_parser("transfer-check", help="LR-transfer evidence: loss vs LR across widths, mup vs sp")
    p.add_argument("file", help="transfer-check definition (TOML), e.g. proxy_sweeps/lr_transfer_tiny.toml")
    p.add_argument("--out", required=True, help="results directory (runs.jsonl, verdict.json, transfer.png)")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel on this machine (CPU threads split)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_run_transfer)


def _run_transfer(args) -> int:
    from proxy_sweeps.transfer import run_transfer_check

    return run_transfer_check(args.file, args.out, workers=args.workers, quiet=args.quiet)
