"""Checkpoints with torch.distributed.checkpoint: atomic, verified on load, the newest k kept.

Layout: ``DIR/checkpoints/step_00001234/`` holds the DCP files (model and both optimizers, sharded
as trained: FSDP2 DTensors or full tensors), ``trainer.json`` (stage, step, optimizer kind, switch
step, tokens seen, data position, fingerprints), ``rng/rank_<r>.pt`` (each rank's RNG states) and,
written last, ``manifest.json``: the size and CRC-32 of every other file. Every rank writes into
``.tmp-step_...`` (and the checksums of the files it wrote); after a barrier rank 0 writes the
manifest and renames the directory to ``step_...``. A rename is atomic, so a crash mid-save leaves
only a ``.tmp-*`` that the next start deletes: a partial save never replaces a good one.

A save that fails (e.g. a full disk) removes its ``.tmp-*`` and leaves every earlier checkpoint as
it was; a full disk -- ENOSPC anywhere in the error, which the checkpoint writer wraps, or a write
error with almost no space left -- is raised as ``NoSpace``, naming the checkpoint and the one a
rerun resumes from (``mutransfer train`` exits with ``NO_SPACE_EXIT``).

On resume every ``step_*`` is checked against its manifest, newest first (rank 0 checks, every
rank gets the verdict): one with a missing, truncated or altered file is reported by name and
skipped, and the run resumes from the newest good one.

Optimizer states go through ``get/set_optimizer_state_dict``, which key them by parameter name,
so a checkpoint loads into a fresh model and into another data-parallel size.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
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
from mutransfer.rundir import fsync_path, write_json

NAME = re.compile(r"^step_(\d{8})$")
# Fault injection for the tests: "<phase>@<n-th save>" kills the process at that phase of that
# save; "enospc@<n-th save>" makes the kernel refuse that save's first data file (no space left).
FAILPOINT_ENV = "MUTRANSFER_FAILPOINT"
_saves = 0
TRAINER_FILE = "trainer.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "mutransfer.checkpoint.manifest/1"
NO_SPACE_EXIT = 74  # EX_IOERR of sysexits.h: the exit status of a run stopped by a full disk
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch's own file writer reports a full disk without an errno ("unexpected pos ..."): a write
# error with less than this left on the device counts as a full disk too.
LOW_SPACE_BYTES = 64 * 2**20


class NoSpace(OSError):
    """A checkpoint save stopped by a full disk; the message names the checkpoint and what is intact."""


def _causes(error: BaseException):
    """``error``, its causes and contexts, and each rank's failure a CheckpointException carries."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def no_space_reason(error: BaseException, free_bytes: int | None) -> str | None:
    """One line on why ``error`` (raised while saving) is a full disk, else None: an OSError with
    ENOSPC or EDQUOT anywhere in it, or a write error while under ``LOW_SPACE_BYTES`` were free."""
    causes = list(_causes(error))
    for e in causes:
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return f"{type(e).__name__}: {e}"
    if free_bytes is not None and free_bytes < LOW_SPACE_BYTES:
        for e in reversed(causes):  # the innermost failure says most
            if isinstance(e, (OSError, RuntimeError)):
                return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''} " \
                       f"({free_bytes:,} bytes left on the device)"
    return None


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


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
    """Directories named ``step_*`` that have a manifest, oldest first (not yet verified)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = NAME.match(d.name)
        if m and (d / MANIFEST_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _describe(files: list[Path], root: Path) -> dict:
    return {str(f.relative_to(root)): {"size": f.stat().st_size, "crc32": _crc32(f)} for f in files}


def verify(path: Path) -> str | None:
    """None when every file of the checkpoint matches its manifest, else what is wrong."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"unreadable {MANIFEST_FILE} ({e})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return f"{MANIFEST_FILE} has an unknown format"
    for name, expected in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != expected["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {expected['size']} (truncated?)"
        if _crc32(f) != expected["crc32"]:
            return f"{name} does not match its checksum (altered or corrupt)"
    for required in (".metadata", TRAINER_FILE):
        if required not in manifest["files"]:
            return f"{required} is not in the manifest"
    try:
        json.loads((path / TRAINER_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{TRAINER_FILE} is not valid JSON ({e})"
    return None


def latest_good(out: Path, env: DistEnv, report=None) -> Path | None:
    """The newest checkpoint that verifies; each bad newer one is reported by name (``report(path, why)``).

    Rank 0 checks the files and broadcasts its choice, so every rank resumes from the same one.
    """
    choice = [None]
    if env.is_main:
        for _, path in reversed(list_checkpoints(out)):
            problem = verify(path)
            if problem is None:
                choice[0] = str(path)
                break
            if report is not None:
                report(path, problem)
    if env.distributed:
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def clean_partial(out: Path, env: DistEnv) -> None:
    """Delete ``.tmp-*`` left by a save that died (rank 0), before anything new is written."""
    root = checkpoint_root(out)
    if env.is_main and root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)
    barrier(env)


def _failpoint(phase: str) -> None:
    """Die here (SIGKILL, as a crash would) when the environment asks for it: the fault-injection
    tests kill a save at each of its phases and check that the run resumes exactly."""
    wanted = os.environ.get(FAILPOINT_ENV)
    if wanted and wanted == f"{phase}@{_saves}":
        os.kill(os.getpid(), signal.SIGKILL)


def _full_disk_failpoint(tmp: Path, rank: int) -> None:
    """When the environment asks for it, the rank's first DCP data file is made a link to
    ``/dev/full``, so the checkpoint writer's own write fails with the kernel's ENOSPC, as on a
    full disk (without ``/dev/full``, the same OSError is raised here)."""
    if os.environ.get(FAILPOINT_ENV) != f"enospc@{_saves}":
        return
    target = tmp / f"__{rank}_0.distcp"
    if not Path("/dev/full").exists():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    os.symlink("/dev/full", target)


def save(out: Path, env: DistEnv, model: nn.Module, opts: OptimizerSet, trainer: dict, keep: int,
         keep_stage_ends: bool = False) -> Path:
    """Write the checkpoint for ``trainer["step"]`` (the next step to run) atomically, then prune
    all but the newest ``keep`` (and, with ``keep_stage_ends``, those saved at a stage's end)."""
    global _saves
    _saves += 1
    step = trainer["step"]
    root = checkpoint_root(out)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    previous = [path for _, path in list_checkpoints(out) if path != final]
    try:
        _save(root, final, tmp, env, model, opts, trainer, keep, keep_stage_ends)
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        reason = no_space_reason(e, _free_bytes(root))  # measured before the partial save is removed
        if env.is_main and not final.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:
            raise
        intact = f"the previous checkpoint {previous[-1]} is intact: free space and run the same command " \
                 "to resume from it" if previous else "no earlier checkpoint exists: free space and run the " \
                 "same command to start again"
        raise NoSpace(errno.ENOSPC, f"no space left on device while saving checkpoint {final} ({reason}); "
                      f"the partial save was removed and {intact}") from None
    return final


def _save(root: Path, final: Path, tmp: Path, env: DistEnv, model: nn.Module, opts: OptimizerSet, trainer: dict,
          keep: int, keep_stage_ends: bool) -> None:
    step = trainer["step"]
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    _full_disk_failpoint(tmp, env.rank)
    with _quiet_single_process():
        dcp.save(_state(model, opts), checkpoint_id=str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    with open(tmp / "rng" / f"rank_{env.rank}.pt", "wb") as f:  # a Python file: a full disk raises ENOSPC
        torch.save(rng_state(), f)
    _failpoint("shards")
    if env.is_main:
        write_json(tmp / TRAINER_FILE, trainer)
    barrier(env)
    # Each rank sums the files it wrote; rank 0 also the shared ones. Rank 0 writes the manifest last.
    mine = [f for f in tmp.rglob("*") if f.is_file() and _written_by(f.name, env.rank)]
    sums = _describe(mine, tmp)
    gathered = [None] * env.world_size
    if env.distributed:
        dist.all_gather_object(gathered, sums)
    else:
        gathered = [sums]
    if env.is_main:
        files = {k: v for part in gathered for k, v in part.items()}
        write_json(tmp / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "step": step, "files": files})
        _failpoint("manifest")
        _fsync_tree(tmp)
        if final.exists():  # the same step saved before (a resumed run repeating a save): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_tree(root, recursive=False)
        _failpoint("renamed")
        for _, old in list_checkpoints(root.parent)[:-keep]:
            if not (keep_stage_ends and _stage_end(old)):
                shutil.rmtree(old, ignore_errors=True)
    barrier(env)


def _written_by(name: str, rank: int) -> bool:
    """DCP names a rank's data files ``__<rank>_<n>.distcp``; the shared files are rank 0's."""
    m = re.match(r"^__(\d+)_\d+\.distcp$", name)
    if m:
        return int(m.group(1)) == rank
    m = re.match(r"^rank_(\d+)\.pt$", name)
    if m:
        return int(m.group(1)) == rank
    return rank == 0


def _stage_end(path: Path) -> bool:
    try:
        return bool(read_trainer(path).get("stage_end"))
    except (OSError, json.JSONDecodeError):
        return False


def _fsync_tree(path: Path, recursive: bool = True) -> None:
    for f in (sorted(path.rglob("*")) if recursive else []) + [path]:
        fsync_path(f)


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
