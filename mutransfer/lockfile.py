"""The frozen-hyperparameter lock file: what a sweep hands to the full-scale run.

It holds the *base* hyperparameters (values at the base shape, scaled by the muP table at any
other shape), the parametrization and base shape they belong to, the proxy they were tuned on,
provenance, and a content hash so an edited file is caught.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mutransfer.config import ConfigError, HParams, ModelConfig, ParamConfig, RunShape, from_mapping

FORMAT = "mutransfer.hparams.lock/1"


@dataclass(frozen=True)
class Lock:
    hparams: HParams
    param: ParamConfig
    proxy_model: ModelConfig
    tokenizer: str
    provenance: dict
    content_hash: str


def _canonical(body: dict) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def content_hash(body: dict) -> str:
    return "sha256:" + hashlib.sha256(_canonical(body).encode()).hexdigest()


def write_lock(path: str | Path, hparams: HParams, param: ParamConfig, proxy_model: ModelConfig,
               provenance: dict) -> dict:
    """Write atomically; returns the written object."""
    body = {
        "format": FORMAT,
        "hparams": dataclasses.asdict(hparams),
        "param": dataclasses.asdict(param),
        "proxy_model": dataclasses.asdict(proxy_model),
        "tokenizer": proxy_model.tokenizer,
        "provenance": provenance,
    }
    obj = {**body, "content_hash": content_hash(body)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return obj


def read_lock(path: str | Path) -> Lock:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hparams lock file {str(path)!r} does not exist")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    if obj.get("format") != FORMAT:
        raise ConfigError(f"{path}: format = {obj.get('format')!r}; expected {FORMAT!r}")
    body = {k: v for k, v in obj.items() if k != "content_hash"}
    if obj.get("content_hash") != content_hash(body):
        raise ConfigError(f"{path}: content_hash does not match the contents (the file was edited); "
                          "re-run `mutransfer freeze`")
    return Lock(
        hparams=from_mapping(HParams, obj["hparams"], "lock.hparams").validate(),
        param=from_mapping(ParamConfig, obj["param"], "lock.param").validate(),
        proxy_model=from_mapping(ModelConfig, obj["proxy_model"], "lock.proxy_model"),
        tokenizer=obj["tokenizer"],
        provenance=obj.get("provenance", {}),
        content_hash=obj["content_hash"],
    )


def check_lock_matches(lock: Lock, target: RunShape) -> None:
    """The transfer is only valid for the same parametrization, base shape and tokenizer."""
    problems = []
    for field in ("parametrization", "d_base", "depth_base", "depth_alpha"):
        a, b = getattr(lock.param, field), getattr(target.param, field)
        if a != b:
            problems.append(f"param.{field}: lock has {a!r}, target has {b!r}")
    if lock.tokenizer != target.model.tokenizer:
        problems.append(f"model.tokenizer: lock has {lock.tokenizer!r}, target has {target.model.tokenizer!r}")
    if lock.proxy_model.head_dim != target.model.head_dim:
        problems.append(f"model.head_dim: lock has {lock.proxy_model.head_dim}, target has {target.model.head_dim}")
    if problems:
        raise ConfigError("the hparams lock file does not match the model being built: " + "; ".join(problems))
