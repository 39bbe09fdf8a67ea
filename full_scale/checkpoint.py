"""Checkpoints with torch.distributed.checkpoint: atomic, the newest k kept, resumed automatically.

Layout: ``DIR/checkpoints/step_00001234/`` holds the DCP files (model and both optimizers, sharded
as trained: FSDP2 DTensors or full tensors), ``trainer.json`` (stage, step, optimizer kind, switch
step, tokens seen, data position) and ``rng/rank_<r>.pt`` (each rank's RNG states). Every rank
writes into ``.tmp-step_...``; after a barrier rank 0 renames it to ``step_...``. A rename is atomic,
so a directory named ``step_*`` is complete by construction and a crash mid-save leaves only a
``.tmp-*`` that the next start deletes: a partial save never replaces a good one.

Optimizer states go through ``get/set_optimizer_state_dict``, which key them by parameter name,
so a checkpoint loads into a fresh model and into another data-parallel size.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from full_scale.distributed import DistEnv, barrier
from mutransfer.optim import OptimizerSet

NAME = re.compile(r"^step_(\d{8})$")
TRAINER_FILE = "trainer.json"


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when there is no process group; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state(model: nn.Module, opts: OptimizerSet) -> dict:
    return {"model": get_model_state_dict(model),
            "optim": {name: get_optimizer_state_dict(model, opt) for name, opt in opts.optimizers.items()}}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = NAME.match(d.name)
        if m and (d / ".metadata").is_file() and (d / TRAINER_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest(out: Path) -> Path | None:
    ckpts = list_checkpoints(out)
    return ckpts[-1][1] if ckpts else None


def clean_partial(out: Path, env: DistEnv) -> None:
    """Delete ``.tmp-*`` left by a save that died (rank 0), before anything new is written."""
    root = checkpoint_root(out)
    if env.is_main and root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)
    barrier(env)


def save(out: Path, env: DistEnv, model: nn.Module, opts: OptimizerSet, trainer: dict, keep: int,
         keep_stage_ends: bool = False) -> Path:
    """Write the checkpoint for ``trainer["step"]`` (the next step to run) atomically, then prune
    all but the newest ``keep`` (and, with ``keep_stage_ends``, those saved at a stage's end)."""
    step = trainer["step"]
    root = checkpoint_root(out)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    with _quiet_single_process():
        dcp.save(_state(model, opts), checkpoint_id=str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{env.rank}.pt")
    if env.is_main:
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer, indent=2, sort_keys=True) + "\n")
    barrier(env)
    if env.is_main:
        _fsync_dir(tmp)
        if final.exists():  # the same step saved before (a resumed run repeating a save): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(out)[:-keep]:
            if not (keep_stage_ends and read_trainer(old).get("stage_end")):
                shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def _fsync_dir(path: Path) -> None:
    for f in sorted(path.rglob("*")) + [path]:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def read_trainer(path: Path) -> dict:
    return json.loads((Path(path) / TRAINER_FILE).read_text())


def load(path: Path, env: DistEnv, model: nn.Module, opts: OptimizerSet) -> None:
    """Load model, optimizer and this rank's RNG states in place; ``opts`` must be the saved kind."""
    state = _state(model, opts)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    for name, opt in opts.optimizers.items():
        set_optimizer_state_dict(model, opt, state["optim"][name])
    rng = Path(path) / "rng" / f"rank_{env.rank}.pt"
    if rng.is_file():  # absent when resuming on more ranks than saved; the loop draws no randomness
        set_rng_state(torch.load(rng, weights_only=False))
