"""What a run writes besides checkpoints: metrics.jsonl, events.jsonl, TensorBoard.

``metrics.jsonl`` has one JSON object per optimizer step (``step`` is the 0-based index of the
update). On resume the rows from the checkpoint's step on are dropped before training continues,
so the file of a resumed run is the file of an uninterrupted one. ``events.jsonl`` is append-only:
every start, resume, switch, checkpoint and skipped (corrupt) checkpoint stays in it. Only rank 0
writes. (config.json and environment.json are written by the trainer with ``mutransfer.rundir``.)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mutransfer.rundir import JsonlWriter, read_jsonl, truncate_jsonl

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


def read_rows(path: Path) -> list[dict]:
    """The rows of a jsonl file (a torn last line, from a killed writer, is skipped)."""
    return read_jsonl(path)


class MetricsWriter:
    """metrics.jsonl and events.jsonl (and TensorBoard scalars when available); rank 0 only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int, tensorboard: bool):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.events_path = Path(out) / "events.jsonl"
        self.tb = None
        if not enabled:
            return
        truncate_jsonl(self.path, lambda r: r.get("step", 0) < resume_step)  # redone from the checkpoint
        self._file = JsonlWriter(self.path)
        self._events = JsonlWriter(self.events_path)
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
        self._file.write(row)
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
        self._events.write({"step": step, "event": kind, "time": time.time(), **info})

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._events.close()
        if self.tb is not None:
            self.tb.close()
