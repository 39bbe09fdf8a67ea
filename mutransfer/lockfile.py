"""The frozen-hyperparameter lock file: what a sweep hands to the full-scale run.

It holds the *base* hyperparameters (values at the base shape, scaled by the muP table at any
other shape), the parametrization and base shape they belong to, the proxy they were tuned on,
provenance, and a content hash so an edited file is caught.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mutransfer.config import ConfigError, HParams, ModelConfig, ParamConfig, RunShape, SpecModel, parse
from mutransfer.rundir import write_json

FORMAT = "mutransfer.hparams.lock/1"


@dataclass(frozen=True)
class Lock:
    hparams: HParams
    param: ParamConfig
    proxy_model: ModelConfig | SpecModel
    tokenizer: str
    provenance: dict
    content_hash: str
    laws: dict  # fitted horizon / batch laws attached by freeze (empty when none)


def _canonical(body: dict) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def content_hash(body: dict) -> str:
    return "sha256:" + hashlib.sha256(_canonical(body).encode()).hexdigest()


def lock_body(hparams: HParams, param: ParamConfig, proxy_model: ModelConfig | SpecModel, provenance: dict,
              laws: dict | None = None) -> dict:
    body = {
        "format": FORMAT,
        "hparams": hparams.model_dump(),
        "param": param.model_dump(),
        "proxy_model": proxy_model.model_dump(),
        "tokenizer": proxy_model.tokenizer,
        "provenance": provenance,
    }
    if laws:
        body["laws"] = laws
    return body


def write_lock(path: str | Path, hparams: HParams, param: ParamConfig, proxy_model: ModelConfig | SpecModel,
               provenance: dict, laws: dict | None = None) -> dict:
    """Write atomically; returns the written object. ``laws``: fitted horizon/batch laws (optional)."""
    body = lock_body(hparams, param, proxy_model, provenance, laws)
    obj = {**body, "content_hash": content_hash(body)}
    write_json(path, obj)
    return obj


REQUIRED = ("format", "hparams", "param", "proxy_model", "tokenizer", "content_hash")


def read_lock(path: str | Path) -> Lock:
    """Read and check a lock: JSON object, format, content hash, and every value (finite, in range)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hparams lock file {str(path)!r} does not exist")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a valid JSON lock file: {e}") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: a lock file is a JSON object with {list(REQUIRED)}; got a "
                          f"{type(obj).__name__}")
    if obj.get("format") != FORMAT:
        raise ConfigError(f"{path}: format = {obj.get('format')!r}; expected {FORMAT!r}")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise ConfigError(f"{path}: missing field(s) {missing}")
    body = {k: v for k, v in obj.items() if k != "content_hash"}
    if obj.get("content_hash") != content_hash(body):
        raise ConfigError(f"{path}: content_hash does not match the contents (the file was edited); "
                          "re-run `mutransfer freeze`")
    if not isinstance(obj["tokenizer"], str) or not isinstance(obj.get("provenance", {}), dict):
        raise ConfigError(f"{path}: tokenizer must be a string and provenance an object")
    return Lock(
        hparams=parse(HParams, obj["hparams"], "lock.hparams"),
        param=parse(ParamConfig, obj["param"], "lock.param"),
        proxy_model=parse(SpecModel if isinstance(obj["proxy_model"], dict) and "spec" in obj["proxy_model"]
                          else ModelConfig, obj["proxy_model"], "lock.proxy_model"),
        tokenizer=obj["tokenizer"],
        provenance=obj.get("provenance", {}),
        content_hash=obj["content_hash"],
        laws=obj.get("laws") or {},
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
