"""Two gloo processes (DDP, then FSDP2) match one process with the same global batch, in the AdamW
stages and in the Muon stages (FSDP2: Muon gathers each matrix before Newton-Schulz).

The one-process run accumulates twice as many micro-batches; the rows of every micro-batch are
the same, so the runs differ only in the order of float reductions.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from full_scale.metrics import read_rows
from mutransfer.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "full_scale" / "smoke.toml"
ARGS = ["--quiet", "--set", "stages.warmup.steps=2", "--set", "stages.stable1.steps=2",
        "--set", "stages.stable2.steps=2", "--set", "stages.decay.steps=3",
        "--set", "stages.long_context.phases.0.steps=1", "--set", "stages.long_context.phases.1.steps=1",
        "--set", "checkpoint.every=0"]
MODES = ("ddp", "fsdp")
REL = 1e-5


def test_two_processes_match_one(tmp_path):
    assert main(["train", str(SMOKE), "--out", str(tmp_path / "single"), *ARGS]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           str(tmp_path), *MODES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    single = read_rows(tmp_path / "single" / "metrics.jsonl")
    assert {r["optimizer"] for r in single} == {"adamw", "muon"}
    for mode in MODES:
        rows = read_rows(tmp_path / mode / "metrics.jsonl")
        assert len(rows) == len(single) == 11
        for a, b in zip(single, rows, strict=True):
            assert (b["dp_size"], b["accumulation"] * 2) == (2, a["accumulation"])
            assert (b["stage"], b["optimizer"], b["global_batch"], b["seq_len"]) == \
                (a["stage"], a["optimizer"], a["global_batch"], a["seq_len"])
            assert b["loss"] == pytest.approx(a["loss"], rel=REL), (mode, a["step"], a["optimizer"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (mode, a["step"])
        assert rows[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=REL)
    # FSDP2 really sharded: its checkpoint holds every matrix in one chunk per rank
    from torch.distributed.checkpoint import FileSystemReader

    def chunks(mode):
        ckpt = sorted((tmp_path / mode / "checkpoints").glob("step_*"))[-1]
        md = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        return len(md["model.layers.0.feed_forward.w1.weight"].chunks), \
            len(md["optim.muon.state.layers.0.feed_forward.w1.weight.momentum_buffer"].chunks)

    assert chunks("fsdp") == (2, 2) and chunks("ddp") == (1, 1)


if __name__ == "__main__":  # one torchrun launch runs every mode in turn, in one process group
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out = Path(sys.argv[1])
    for mode in sys.argv[2:]:
        rc = main(["train", str(SMOKE), "--out", str(out / mode), "--set", f"parallel.mode={mode}", *ARGS])
        if rc:
            sys.exit(rc)
    dist.destroy_process_group()
