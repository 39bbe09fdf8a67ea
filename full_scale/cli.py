"""``mutransfer train CONFIG --hparams LOCK [--set key=value ...] [--out DIR]``.

One process as is, many under ``torchrun --nproc-per-node N -m mutransfer.cli train ...`` (or
``torchrun --no-python mutransfer train ...``). The config and the lock file are checked before
any compute; a run directory that already holds checkpoints is resumed from the newest one.

Exit status: 0 done, 1 diverged, 2 bad input (before any compute), 74 (EX_IOERR) no space left
on device during a checkpoint save (the partial save removed, earlier checkpoints intact: free
space and rerun to resume).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mutransfer.tracking.settings import TRACK_HELP, track_override

HELP_SET = ("override a config value, e.g. optimizer.switch=false, train.precision=bf16, "
            "stages.decay.steps=10 (a list of tables is indexed by position or by name); repeatable")


def register(sub) -> None:
    p = sub.add_parser("train", help="multi-stage full-scale training from frozen hyperparameters",
                       description=__doc__.split("\n\n")[1].replace("``", ""))
    p.add_argument("config", help="TOML run config, e.g. full_scale/smoke.toml")
    p.add_argument("--hparams", help="hparams.lock.json from `mutransfer freeze` (default: train.hparams of "
                                     "the config, relative to the config file)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=HELP_SET)
    p.add_argument("--out", help="run directory (default: runs/<config name>); resumed when it holds "
                                 "checkpoints")
    p.add_argument("--from-checkpoint", metavar="CKPT_DIR",
                   help="start from another run's checkpoint (e.g. branch the AdamW-only control off the "
                        "pre-decay checkpoint with --set optimizer.switch=false); refused once --out has its own")
    p.add_argument("--allow-changed-inputs", action="store_true",
                   help="resume although the config, lock or data differ from the checkpoint's (recorded in "
                        "events.jsonl)")
    p.add_argument("--track", metavar="BACKENDS", help=TRACK_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def machine_share(mode: str) -> float:
    """How many copies of the weights this machine holds: under FSDP its ranks hold
    ``LOCAL_WORLD_SIZE / WORLD_SIZE`` of one (torchrun sets both), otherwise one per rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return local / world if mode == "fsdp" else float(local)


def run(args) -> int:
    from full_scale.checkpoint import NO_SPACE_EXIT, NoSpace
    from full_scale.config import load_run_config
    from full_scale.trainer import train
    from mutransfer.model_size import check_fits_machine
    from mutransfer.rundir import check_output_dir
    from mutransfer.step import Diverged

    out = check_output_dir(Path(args.out) if args.out else Path("runs") / Path(args.config).stem)
    overrides = [*args.overrides, *([track_override(args.track)] if args.track is not None else [])]
    cfg = load_run_config(args.config, overrides, args.hparams)
    check_fits_machine(cfg.shape, share=machine_share(cfg.parallel.mode))
    try:
        summary = train(cfg, out, quiet=args.quiet, from_checkpoint=args.from_checkpoint,
                        allow_changed_inputs=args.allow_changed_inputs)
    except Diverged as e:
        print(f"error: training diverged: {e.reason}", file=sys.stderr)
        return 1
    except NoSpace as e:
        print(f"error: {e.strerror}", file=sys.stderr)
        return NO_SPACE_EXIT
    if "final_val_loss" in summary:  # rank 0
        print(json.dumps(summary, indent=2))
    return 0
