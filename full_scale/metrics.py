"""What a run writes besides checkpoints: metrics.jsonl, events.jsonl, and the chosen trackers.

``metrics.jsonl`` has one JSON object per optimizer step (``step`` is the 0-based index of the
update). On resume the rows from the checkpoint's step on are dropped before training continues,
so the file of a resumed run is the file of an uninterrupted one. ``events.jsonl`` is append-only:
every start, resume, switch, checkpoint and skipped (corrupt) checkpoint stays in it. Only rank 0
writes. (config.json and environment.json are written by the trainer with ``mutransfer.rundir``.)

The trackers of ``[tracking]`` (mutransfer.tracking) get every number of every row (``lr/<group>``
per optimizer group, ``mixture_rows/<source>``), every event of events.jsonl, and a ``stage``
event where a stage or phase begins. Their run ids are kept in ``tracking.json``, so a resumed run
continues the same tracker runs; a resume first sends them the rows and events before the
checkpoint again from the files (a killed run may not have flushed its last values to a tracker),
and each backend skips the steps it already holds.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mutransfer.rundir import JsonlWriter, read_json, read_jsonl, truncate_jsonl, write_json
from mutransfer.tracking import Tracking, TrackingSettings

TRACKING_FILE = "tracking.json"

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
    """metrics.jsonl and events.jsonl, and the same rows and events to the chosen trackers; rank 0 only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int, tracking: TrackingSettings | None = None,
                 run: tuple[str, str, dict] | None = None):
        """``run``: (tracker run name, group, config) when ``tracking`` names backends."""
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.events_path = Path(out) / "events.jsonl"
        self.tracking = Tracking(tracking if enabled else None, out)
        self._stage = None
        if not enabled:
            return
        truncate_jsonl(self.path, lambda r: r.get("step", 0) < resume_step)  # redone from the checkpoint
        self._file = JsonlWriter(self.path)
        self._events = JsonlWriter(self.events_path)
        if self.tracking.enabled:
            self._start_tracking(Path(out), resume_step, *run)

    def _start_tracking(self, out: Path, resume_step: int, name: str, group: str, config: dict) -> None:
        ids_path = out / TRACKING_FILE
        ids = read_json(ids_path, "tracker run ids") if resume_step and ids_path.is_file() else {}
        ids = {**ids, **self.tracking.start(name, group, config, resume=ids, resume_step=resume_step)}
        write_json(ids_path, ids)
        if resume_step:  # what the files hold before the checkpoint, again (see the module docstring)
            events = [e for e in read_jsonl(self.events_path) if e["step"] < resume_step]
            for row in read_rows(self.path):
                while events and events[0]["step"] <= row["step"]:
                    self._track_event(events.pop(0))
                self._track_row(row)
            for e in events:
                self._track_event(e)

    def _track_row(self, row: dict) -> None:
        where = (row["stage"], row.get("phase"))
        if where != self._stage:
            self._stage = where
            self.tracking.event("stage", {k: row.get(k) for k in ("stage", "stage_index", "phase", "optimizer",
                                                                   "seq_len", "global_batch")}, row["step"])
        self.tracking.log({k: v for k, v in row.items() if k != "step"}, row["step"])

    def _track_event(self, event: dict) -> None:
        self.tracking.event(event["event"], {k: v for k, v in event.items() if k not in ("step", "event")},
                            event["step"])

    def row(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(row)
        if self.tracking.enabled:
            self._track_row(row)

    def event(self, step: int, kind: str, **info) -> None:
        if not self.enabled:
            return
        record = {"step": step, "event": kind, "time": time.time(), **info}
        self._events.write(record)
        if self.tracking.enabled:
            self._track_event(record)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._events.close()
        self.tracking.finish()
