"""What a run writes besides checkpoints: metrics.jsonl, events.jsonl, env.json, TensorBoard.

``metrics.jsonl`` has one JSON object per optimizer step (``step`` is the 0-based index of the
update). On resume the rows from the checkpoint's step on are dropped before training continues,
so the file of a resumed run is the file of an uninterrupted one. Only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

# Dense BF16 peak FLOP/s per device (RECIPE section 7 for H100); MFU is quoted against it for
# every precision, so FP8's gain shows as a higher MFU. Matched by substring of the device name.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("B200", 2250e12),
)


def peak_flops(device: torch.device, given: float | None) -> float | None:
    """Per-device peak for MFU: the configured value, else the table by CUDA device name, else None."""
    if given:
        return float(given)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def git_commit(where: Path) -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=where, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head or None, "dirty": bool(dirty) if head else None}


def environment(world_size: int, device: torch.device) -> dict:
    """Versions, devices and source commit, so a run directory says what produced it."""
    from mutransfer.precision import PRECISIONS, available

    devices = []
    if torch.cuda.is_available():
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "cuda_devices": devices,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": world_size,
        "precision_backends": {p: available(p)[0] for p in PRECISIONS},
        "git": git_commit(Path(__file__).resolve().parent),
        "argv": sys.argv,
    }


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict]:
    """The rows of a jsonl file; a torn last line (a killed writer) is skipped."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsWriter:
    """metrics.jsonl and events.jsonl (and TensorBoard scalars when available); rank 0 only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int, tensorboard: bool):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.events_path = Path(out) / "events.jsonl"
        self.tb = None
        if not enabled:
            return
        for path in (self.path, self.events_path):  # drop what the checkpoint does not cover
            kept = [r for r in read_rows(path) if r.get("step", 0) < resume_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)
        self._file = self.path.open("a")
        self._events = self.events_path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(log_dir=str(Path(out) / "tensorboard"), purge_step=resume_step)

    def row(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.tb is not None:
            step = row["step"]
            for key in ("loss", "val_loss", "grad_norm", "tokens_per_s", "mfu", "seq_len", "global_batch"):
                if row.get(key) is not None:
                    self.tb.add_scalar(key, row[key], step)
            for group, lr in row.get("lr", {}).items():
                self.tb.add_scalar(f"lr/{group}", lr, step)

    def event(self, step: int, kind: str, **info) -> None:
        if not self.enabled:
            return
        self._events.write(json.dumps({"step": step, "event": kind, "time": time.time(), **info},
                                      default=str) + "\n")
        self._events.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._events.close()
        if self.tb is not None:
            self.tb.close()
