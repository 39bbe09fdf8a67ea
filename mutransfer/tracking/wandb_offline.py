"""Read an offline W&B run back from its ``.wandb`` file, without a server.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0) and then
LevelDB-log records (32 KiB blocks; each chunk a 7-byte header: CRC32, length, type FULL / FIRST
/ MIDDLE / LAST) holding ``wandb_internal_pb2.Record`` protobufs. wandb no longer ships a Python
reader for it (``wandb sync`` and ``wandb beta leet`` read it in Go), so this module is the one
place that knows the format: a wandb release that changes it breaks only ``read_offline_run``.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_runs(root: str | Path) -> list[Path]:
    """The offline run directories W&B wrote under ``root`` (``root/wandb/offline-run-*``), oldest first."""
    return sorted(Path(root).glob("wandb/offline-run-*"))


def _records(data: bytes):
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"not a W&B transaction log (header {data[:HEADER]!r})")
    i, pending = HEADER, b""
    while i + HEADER <= len(data):
        left = BLOCK - i % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            i += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[i:i + HEADER])
        if kind == 0 and length == 0:  # zero fill: the end of what was written
            break
        chunk = data[i + HEADER:i + HEADER + length]
        i += HEADER + length
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"W&B transaction log: bad checksum at byte {i - length - HEADER}")
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: str | Path) -> dict:
    """``{"name", "group", "project", "config": {...}, "history": [{"_step": s, key: value, ...}],
    "summary": {...}}`` of one offline run directory (``offline-run-*``)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("*.wandb")
    out: dict = {"config": {}, "history": [], "summary": {}}
    for raw in _records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(name=run.display_name, group=run.run_group, project=run.project, id=run.run_id)
            out["config"].update({_key(u): json.loads(u.value_json) for u in run.config.update})
        elif kind == "config":
            out["config"].update({_key(u): json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            out["history"].append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            out["summary"].update({_key(u): json.loads(u.value_json) for u in record.summary.update})
    out["config"].pop("_wandb", None)
    return out
