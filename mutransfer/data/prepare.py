"""Turn text files into memory-mappable token shards plus an ``index.json`` that describes them.

Inputs, by suffix (a trailing ``.gz`` is decompressed on the fly):

- ``.txt`` and ``.md`` (plain text): documents are separated by blank (whitespace-only) lines, so a
  book splits into paragraphs and a file of articles into articles; a file without blank lines is
  one document.
- ``.jsonl``: one JSON object per line; the document is the string in ``text_field``.
- ``.json``: one JSON array, of strings (each a document) or of objects (the string in ``text_field``).
- ``.parquet``: the string column ``text_field``, read one record batch at a time.
- a HuggingFace ``datasets`` directory (``save_to_disk``) or ``hf:NAME`` from the local Hub cache:
  the string column ``text_field`` of one split (see ``mutransfer.data.hf_datasets``).

Each document is followed by the tokenizer's EOS id; a tokenizer without EOS (bytes) gets a
blank line instead, the plain-text way of ending a document. A document goes to the held-out
``val`` split when a hash of its text falls below ``val_fraction``: the choice depends on the text
alone (not on file order or sharding), identical documents always land on the same side, and val
never shares a document with train. At least one document always goes to val.

Shards are raw little-endian arrays (``uint16`` when every id fits, else ``uint32``) named
``<split>-NNNNN.bin``. The whole dataset is written into a temporary sibling directory and renamed
into place at the end, so a directory that has an ``index.json`` is always complete.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mutransfer.config import ConfigError
from mutransfer.rundir import check_output_dir
from mutransfer.tokenizer import Tokenizer, load_tokenizer

FORMAT = "mutransfer-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
SPLIT_RULE = "blake2b-64(utf-8 document text) / 2**64 < val_fraction; >= 1 document in val"
INPUT_KINDS = {".txt": "txt", ".md": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
DEFAULT_SHARD_TOKENS = 2**24
_BATCH_CHARS = 4_000_000  # documents are tokenized in batches of about this much text
_BLANK_LINE = re.compile(r"\s*")


def input_kind(path: Path) -> str:
    """'txt' (.txt, .md), 'jsonl', 'json' or 'parquet' from the file name; ConfigError for anything else."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            suffixes = []  # parquet compresses itself; a gzipped parquet file is not readable
    kind = INPUT_KINDS.get(suffixes[-1] if suffixes else "")
    if kind is None:
        raise ConfigError(f"data file {str(path)!r} has an unsupported type; allowed: .txt, .md, .jsonl, .json, "
                          ".parquet (all but .parquet may be gzipped, e.g. .jsonl.gz), a saved HuggingFace dataset "
                          "directory, or hf:NAME from the local HuggingFace cache")
    return kind


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def describe_sources(files, text_field: str = "text", split: str | None = None, hf_config: str | None = None,
                     hf_cache_dir: str | None = None) -> list[dict]:
    """Name, kind, size and sha256 of every input; ConfigError naming a file that is missing.

    ``split``, ``hf_config`` and ``hf_cache_dir`` choose what to read of HuggingFace dataset inputs
    (a saved dataset directory or ``hf:NAME``) and are refused when there is none.
    """
    from mutransfer.data import hf_datasets

    sources = []
    for f in files:
        path = Path(f).expanduser()
        if str(f).startswith(hf_datasets.HUB_PREFIX) or hf_datasets.is_saved_dataset(path):
            sources.append(hf_datasets.describe(str(f), text_field, split, hf_config, hf_cache_dir))
            continue
        if path.is_dir():
            raise ConfigError(f"data input {str(f)!r} is a directory but not a saved HuggingFace dataset "
                              "(no dataset_info.json + state.json, nor dataset_dict.json)")
        if not path.is_file():
            raise ConfigError(f"data file {str(f)!r} does not exist (or is not a file)")
        kind = input_kind(path)
        check_readable(path, kind)
        sources.append({"path": str(path.resolve()), "name": path.name, "kind": kind,
                        "size": path.stat().st_size, "sha256": sha256_file(path)})
    if not sources:
        raise ConfigError("data: no input files given")
    if not any(s["kind"].startswith("hf-") for s in sources):
        for name, value in (("split", split), ("hf_config", hf_config), ("hf_cache_dir", hf_cache_dir)):
            if value is not None:
                raise ConfigError(f"data: {name} = {value!r} applies only to HuggingFace dataset inputs "
                                  "(a save_to_disk directory or hf:NAME), and there is none")
    return sources


SAMPLE_BYTES = 1 << 20  # how much of each input is checked before any tokenizing
MAX_REPLACEMENT_FRACTION = 0.01  # undecodable bytes tolerated in a text file's sample


def check_readable(path: Path, kind: str) -> None:
    """Fail before any compute when an input is not what its name says: a gzip that is not, a
    Parquet file that pyarrow cannot open, or a "text" file that is binary (NUL bytes, or more
    than 1 % of its sample not UTF-8)."""
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise ConfigError(f"data file {str(path)!r} is not a readable Parquet file: {e}") from e
        return
    try:
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.suffix.lower() == ".gz" else raw
            sample = stream.read(SAMPLE_BYTES)
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise ConfigError(f"data file {str(path)!r} cannot be read as {'gzip' if path.suffix == '.gz' else kind}: "
                          f"{e}") from e
    if b"\x00" in sample:
        raise ConfigError(f"data file {str(path)!r} contains NUL bytes: it is binary, not {kind} text")
    text = sample.decode("utf-8", errors="replace")
    if len(sample) == SAMPLE_BYTES:  # a cut may split the last character
        text = text[:-1]
    bad = text.count("\ufffd")
    if text and bad / len(text) > MAX_REPLACEMENT_FRACTION:
        raise ConfigError(f"data file {str(path)!r} is not UTF-8 text ({bad} of the first {len(text)} characters "
                          "do not decode)")


def dataset_fingerprint(sources: list[dict], tokenizer_fingerprint: str, settings: dict) -> str:
    """Hash of what determines the token stream: source contents and kinds, tokenizer, split settings.

    File names, locations and shard sizes are left out: they do not change a single token.
    """
    content = {
        "format": [FORMAT, FORMAT_VERSION],
        "sources": [[s["kind"], s["sha256"]] for s in sources],
        "tokenizer": tokenizer_fingerprint,
        "val_fraction": float(settings["val_fraction"]),
        "text_field": settings["text_field"],
        "split_rule": SPLIT_RULE,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def is_val(text: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


# ---- reading documents -------------------------------------------------------------------------

def _open_text(raw, path: Path):
    stream = gzip.GzipFile(fileobj=raw) if path.suffix.lower() == ".gz" else raw
    # Universal newlines; undecodable bytes become U+FFFD rather than stopping a long job.
    return io.TextIOWrapper(stream, encoding="utf-8", errors="replace")


def _txt_documents(text, path: Path) -> Iterator[str]:
    lines: list[str] = []
    for line in text:
        if "\x00" in line:
            raise ConfigError(f"data file {str(path)!r} contains NUL bytes: it is binary, not text")
        if _BLANK_LINE.fullmatch(line):
            if lines:
                yield "".join(lines).rstrip("\n")
                lines = []
        else:
            lines.append(line)
    if lines:
        yield "".join(lines).rstrip("\n")


def _jsonl_documents(text, path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"data file {str(path)!r} line {lineno}: not valid JSON ({e})") from e
        if not isinstance(record, dict) or text_field not in record:
            raise ConfigError(f"data file {str(path)!r} line {lineno}: no field {text_field!r} "
                              "(set text_field / --text-field)")
        value = record[text_field]
        if not isinstance(value, str):
            raise ConfigError(f"data file {str(path)!r} line {lineno}: field {text_field!r} is "
                              f"{type(value).__name__}, not a string")
        yield value


def _json_documents(text, path: Path, text_field: str) -> Iterator[str]:
    try:
        records = json.load(text)
    except ValueError as e:
        raise ConfigError(f"data file {str(path)!r}: not valid JSON ({e})") from e
    if not isinstance(records, list):
        raise ConfigError(f"data file {str(path)!r}: the top level is a JSON {type(records).__name__}; expected an "
                          "array of strings or of objects (or use .jsonl for one object per line)")
    for i, record in enumerate(records):
        if isinstance(record, str):
            yield record
            continue
        if not isinstance(record, dict) or text_field not in record:
            raise ConfigError(f"data file {str(path)!r} element {i}: neither a string nor an object with the field "
                              f"{text_field!r} (set text_field / --text-field)")
        value = record[text_field]
        if not isinstance(value, str):
            raise ConfigError(f"data file {str(path)!r} element {i}: field {text_field!r} is "
                              f"{type(value).__name__}, not a string")
        yield value


def _parquet_documents(source: dict, text_field: str, bar) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(source["path"])
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise ConfigError(f"data file {str(path)!r} has no column {text_field!r} (set text_field / "
                          f"--text-field); columns: {schema.names}")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ConfigError(f"data file {str(path)!r}: column {text_field!r} is {column_type}, not a string")
    done, groups = 0, pf.num_row_groups
    for group in range(groups):
        for batch in pf.iter_batches(batch_size=8192, row_groups=[group], columns=[text_field]):
            for value in batch.column(0).to_pylist():
                if value is not None:
                    yield value
        position = source["size"] * (group + 1) // groups
        bar.update(position - done)
        done = position


def _file_documents(source: dict, text_field: str, bar) -> Iterator[str]:
    """Documents of one file; advances ``bar`` by the bytes of the file read so far."""
    if source["kind"] == "parquet":
        yield from _parquet_documents(source, text_field, bar)
        return
    if source["kind"].startswith("hf-"):
        from mutransfer.data import hf_datasets

        yield from hf_datasets.documents(source, text_field, bar)
        return
    path = Path(source["path"])
    readers = {"txt": lambda text: _txt_documents(text, path),
               "jsonl": lambda text: _jsonl_documents(text, path, text_field),
               "json": lambda text: _json_documents(text, path, text_field)}
    with open(path, "rb") as raw:
        text = _open_text(raw, path)
        docs = readers[source["kind"]](text)
        done = 0
        for doc in docs:
            yield doc
            position = raw.tell()
            if position != done:
                bar.update(position - done)
                done = position


def _batches(sources: list[dict], text_field: str, bar) -> Iterator[list[str]]:
    batch, chars = [], 0
    for source in sources:
        bar.set_description(source["name"], refresh=False)
        for doc in _file_documents(source, text_field, bar):
            if not doc or doc.isspace():
                continue  # empty documents carry nothing but a separator
            batch.append(doc)
            chars += len(doc)
            if chars >= _BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


# ---- writing shards ----------------------------------------------------------------------------

class _ShardWriter:
    """Appends tokens to ``<split>-NNNNN.bin`` files of at most ``shard_tokens`` tokens each.

    Documents are buffered and written in large blocks: one write per document would be one system
    call per document.
    """

    _FLUSH_TOKENS = 1 << 22

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shards: list[dict] = []
        self.num_documents = 0
        self.num_tokens = 0
        self.max_token_id = -1  # the largest id written (-1: none yet)
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        self.num_tokens += len(tokens)
        if self._pending_tokens >= self._FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        tokens = np.concatenate(self._pending).astype(self.dtype)
        self._pending, self._pending_tokens = [], 0
        self.max_token_id = max(self.max_token_id, int(tokens.max()))
        while len(tokens):
            if self._file is None or self.shards[-1]["num_tokens"] == self.shard_tokens:
                self._open_next()
            take = min(len(tokens), self.shard_tokens - self.shards[-1]["num_tokens"])
            tokens[:take].tofile(self._file)
            self.shards[-1]["num_tokens"] += take
            tokens = tokens[take:]

    def _open_next(self) -> None:
        self._close_file()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self.shards.append({"file": name, "num_tokens": 0})

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._flush()
        self._close_file()


class _Router:
    """Sends each tokenized document to train or val; holds the latest train document back so that
    it can go to val instead if, at the end, val would otherwise be empty."""

    def __init__(self, writers: dict[str, _ShardWriter], separator: np.ndarray):
        self.writers, self.separator = writers, separator
        self._held: np.ndarray | None = None

    def add(self, ids: list[int], val: bool) -> None:
        tokens = np.concatenate([np.asarray(ids, dtype=np.int64), self.separator])
        if val:
            self._put("val", tokens)
            return
        if self._held is not None:
            self._put("train", self._held)
        self._held = tokens

    def finish(self) -> None:
        if self._held is not None:
            self._put("val" if self.writers["val"].num_documents == 0 else "train", self._held)
            self._held = None

    def _put(self, split: str, tokens: np.ndarray) -> None:
        self.writers[split].write(tokens)
        self.writers[split].num_documents += 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _separator(tok: Tokenizer) -> np.ndarray:
    ids = [tok.eos_id] if tok.eos_id is not None else tok.encode("\n\n")
    return np.asarray(ids, dtype=np.int64)


def _write_tokens(tmp: Path, tok: Tokenizer, sources: list[dict], text_field: str, val_fraction: float,
                  shard_tokens: int, progress: bool) -> dict[str, _ShardWriter]:
    from tqdm import tqdm

    dtype = token_dtype(tok.vocab_size)
    writers = {split: _ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
    router = _Router(writers, _separator(tok))
    total = sum(s["size"] for s in sources)
    with tqdm(total=total, desc=sources[0]["name"], unit="B", unit_scale=True, file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for batch in _batches(sources, text_field, bar):
            for doc, ids in zip(batch, tok.encode_batch(batch), strict=True):
                router.add(ids, is_val(doc, val_fraction))
    router.finish()
    for w in writers.values():
        w.close()
    return writers


def _index(tok: Tokenizer, sources: list[dict], settings: dict, fingerprint: str,
           writers: dict[str, _ShardWriter]) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tokenizer": tok.spec,
        "tokenizer_name": tok.name,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "model_vocab_size": tok.model_vocab_size,
        "max_token_id": max(w.max_token_id for w in writers.values()),  # a model needs vocab_size above it
        "eos_id": tok.eos_id,
        "document_separator": _separator(tok).tolist(),
        "dtype": token_dtype(tok.vocab_size).name,
        "byteorder": "little",
        "splits": {name: {"num_tokens": w.num_tokens, "num_documents": w.num_documents, "shards": w.shards}
                   for name, w in writers.items()},
        "sources": sources,
        "settings": {**settings, "split_rule": SPLIT_RULE},
    }


def read_index(directory: Path) -> dict | None:
    """The index.json of a directory, or None when there is none (an incomplete dataset never has one)."""
    try:
        return json.loads((Path(directory) / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, out: Path, fingerprint: str) -> None:
    """Rename the finished temporary directory into place; if another process got there first with
    the same data, keep theirs."""
    try:
        os.rename(tmp, out)
        return
    except OSError:
        existing = read_index(out)
        shutil.rmtree(tmp, ignore_errors=True)
        if existing is not None and existing.get("fingerprint") == fingerprint:
            return
        raise ConfigError(f"data: output directory {str(out)!r} already exists and is not empty") from None


def prepare_dataset(files, tokenizer: str, out_dir, val_fraction: float = 0.005, text_field: str = "text",
                    shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = True,
                    exist_ok: bool = False, split: str | None = None, hf_config: str | None = None,
                    hf_cache_dir: str | None = None) -> Path:
    """Tokenize ``files`` into ``out_dir`` (created; must not exist or be empty) and return its path.

    ``files`` are paths (by suffix, see the module doc), saved HuggingFace dataset directories or
    ``hf:NAME`` cached Hub datasets; ``split`` / ``hf_config`` / ``hf_cache_dir`` choose what of the
    latter is read.

    With ``exist_ok``, an ``out_dir`` that already holds this exact dataset (same fingerprint) is
    reused as it is; anything else already there is an error either way.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction = {val_fraction} must lie in (0, 1)")
    if shard_tokens <= 0:
        raise ConfigError(f"shard_tokens = {shard_tokens} must be positive")
    out = check_output_dir(Path(out_dir).expanduser().resolve(), "data: output directory")
    sources = describe_sources(files, text_field, split, hf_config, hf_cache_dir)
    tok = load_tokenizer(tokenizer)
    settings = {"val_fraction": float(val_fraction), "text_field": text_field, "shard_tokens": shard_tokens}
    fingerprint = dataset_fingerprint(sources, tok.fingerprint, settings)
    if out.exists():
        existing = read_index(out)
        if exist_ok and existing is not None and existing.get("fingerprint") == fingerprint:
            return out
        if not out.is_dir() or any(out.iterdir()):
            raise ConfigError(f"data: output directory {str(out)!r} already exists and is not empty; "
                              "remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writers = _write_tokens(tmp, tok, sources, text_field, val_fraction, shard_tokens, progress)
        for split, w in writers.items():
            if w.num_tokens == 0:
                raise ConfigError(f"data: the {split} split came out empty; the inputs need at least two "
                                  "non-empty documents (txt: separate them by blank lines)")
        _write_json(tmp / "index.json", _index(tok, sources, settings, fingerprint, writers))
        _publish(tmp, out, fingerprint)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        splits = ", ".join(f"{s} {w.num_tokens:,} tokens / {w.num_documents:,} docs"
                           for s, w in writers.items())
        print(f"prepared {out}: {splits} ({tok.spec})", file=sys.stderr)
    warning = default_eval_warning(writers["val"].num_tokens, sum(w.num_tokens for w in writers.values()),
                                   val_fraction)
    if warning:
        print(warning, file=sys.stderr)
    return out


def default_eval_warning(val_tokens: int, total_tokens: int, val_fraction: float) -> str | None:
    """The held-out warning against what one evaluation of the default proxy ``[train]`` settings
    draws (the quick start's: 4 x 16 x 128 tokens); the run itself checks its own settings at start."""
    from mutransfer.config import ProxyTrain
    from mutransfer.data.heldout import short_heldout_warning, suggested_val_fraction

    d = ProxyTrain()
    seq_len = d.eval_seq_len or d.seq_len
    wanted = d.eval_batches * d.eval_batch_size * seq_len
    fix = (f"prepare with --val-fraction {suggested_val_fraction(total_tokens, wanted):.2g} (now {val_fraction:g}), "
           "or evaluate less (train.eval_batches, train.eval_batch_size, train.eval_seq_len)")
    return short_heldout_warning(val_tokens, d.eval_batches, d.eval_batch_size, seq_len,
                                 "the default proxy [train] settings", fix)
