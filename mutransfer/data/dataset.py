"""A prepared token dataset, memory-mapped, with a sampler that is a pure function of (seed, step).

Each split's shards are read as one concatenated token stream, so batches do not depend on how the
stream was cut into files. Training batch ``step`` draws its window starts from
``np.random.default_rng([seed, step, split code])`` and nothing else: a resumed run sees exactly
the data it would have seen, and data-parallel ranks that each take a slice of rows together
materialise the one-process batch.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from mutransfer.config import ConfigError
from mutransfer.data.prepare import FORMAT, FORMAT_VERSION, read_index
from mutransfer.tokenizer import normalize_spec, tokenizer_fingerprint


class _Split:
    """One split's shards as a virtual concatenated array."""

    def __init__(self, directory: Path, info: dict, dtype: np.dtype):
        self.arrays: list[np.memmap] = []
        for shard in info["shards"]:
            path = directory / shard["file"]
            expected = shard["num_tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise ConfigError(f"data: shard {str(path)!r} is missing or has the wrong size "
                                  f"(expected {expected} bytes); prepare the dataset again")
            if shard["num_tokens"]:
                self.arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["num_tokens"],)))
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.num_tokens = int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, crossing shard boundaries where needed."""
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            offset = start + filled - int(self.starts[shard])
            piece = self.arrays[shard][offset:offset + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out


def _split_code(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ConfigError(f"{name} = {value!r} must be a positive integer")


class TokenDataset:
    """Read-only view of a directory written by ``prepare_dataset``."""

    def __init__(self, directory):
        self.directory = Path(directory).expanduser().resolve()
        index = read_index(self.directory)
        if index is None:
            raise ConfigError(f"data = {str(directory)!r} is not a prepared dataset (no readable "
                              "index.json); make one with `mutransfer data prepare FILES --tokenizer T "
                              "--out DIR`")
        if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
            raise ConfigError(f"data = {str(directory)!r} has format {index.get('format')!r} version "
                              f"{index.get('version')!r}; this toolkit reads {FORMAT!r} version "
                              f"{FORMAT_VERSION}")
        self.index = index
        self.tokenizer: str = index["tokenizer"]
        self.tokenizer_fingerprint: str = index["tokenizer_fingerprint"]
        self.vocab_size: int = index["vocab_size"]
        self.model_vocab_size: int = index["model_vocab_size"]
        # The largest id in the shards (recorded since it was added; before, the tokenizer's bound).
        self.max_token_id: int = index.get("max_token_id", self.vocab_size - 1)
        self.eos_id: int | None = index.get("eos_id")
        self.fingerprint: str = index["fingerprint"]
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self._splits = {name: _Split(self.directory, info, self.dtype)
                        for name, info in index["splits"].items()}

    @classmethod
    def open(cls, directory) -> TokenDataset:
        return cls(directory)

    @property
    def splits(self) -> list[str]:
        return list(self._splits)

    def _split(self, split: str) -> _Split:
        if split not in self._splits:
            raise ConfigError(f"split = {split!r} is not in dataset {str(self.directory)!r}; "
                              f"choose one of {self.splits}")
        return self._splits[split]

    def num_tokens(self, split: str = "train") -> int:
        return self._split(split).num_tokens

    def tokens(self, split: str, start: int = 0, length: int | None = None) -> np.ndarray:
        """A stretch of a split's token stream as int64 (the whole split by default)."""
        data = self._split(split)
        if length is None:
            length = data.num_tokens - start
        if start < 0 or length < 0 or start + length > data.num_tokens:
            raise ConfigError(f"tokens [{start}, {start + length}) lie outside the {split!r} split "
                              f"({data.num_tokens} tokens)")
        return data.window(start, length) if length else np.empty(0, dtype=np.int64)

    def check_tokenizer(self, spec: str) -> None:
        """ConfigError unless ``spec`` is the tokenizer (by content fingerprint) the data was made with."""
        if tokenizer_fingerprint(spec) != self.tokenizer_fingerprint:
            raise ConfigError(f"tokenizer = {normalize_spec(spec)!r} does not match dataset "
                              f"{str(self.directory)!r}, which was prepared with tokenizer "
                              f"{self.tokenizer!r}; prepare the data again with --tokenizer {spec} or use "
                              f"tokenizer = {self.tokenizer!r}")

    def check_vocab(self, vocab_size: int, where: str = "model.vocab_size") -> None:
        """ConfigError unless every token id of the dataset is below the model's ``vocab_size``."""
        if self.max_token_id >= vocab_size:
            raise ConfigError(f"data {str(self.directory)!r} holds token ids up to {self.max_token_id} but {where} = "
                              f"{vocab_size}; the model needs vocab_size > every id (at least "
                              f"{self.max_token_id + 1})")

    def _check_window(self, split: str, seq_len: int) -> _Split:
        data = self._split(split)
        if seq_len + 1 > data.num_tokens:
            raise ConfigError(f"seq_len = {seq_len} needs {seq_len + 1} tokens per window but the {split!r} "
                              f"split of {str(self.directory)!r} has only {data.num_tokens}; use a shorter "
                              "seq_len or more data")
        return data

    @staticmethod
    def _pack(windows: list[np.ndarray], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = np.stack(windows) if windows else np.empty((0, seq_len + 1), dtype=np.int64)
        return torch.from_numpy(block[:, :-1].copy()), torch.from_numpy(block[:, 1:].copy())

    def batch_starts(self, split: str, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        """Window start offsets of the global batch for (seed, step, split)."""
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        if seed < 0 or step < 0:
            raise ConfigError(f"seed = {seed} and step = {step} must be >= 0")
        data = self._check_window(split, seq_len)
        rng = np.random.default_rng([int(seed), int(step), _split_code(split)])
        return rng.integers(0, data.num_tokens - seq_len, size=batch_size)

    def batch(self, split: str, seed: int, step: int, batch_size: int, seq_len: int,
              rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: int64 (inputs, targets) of shape (rows, seq_len), targets shifted by one.

        ``rows`` picks rows of the global batch (a data-parallel rank's share); the random draws
        are always made for the whole batch so every rank agrees on it.
        """
        starts = self.batch_starts(split, seed, step, batch_size, seq_len)
        if rows is not None:
            starts = starts[rows]
        data = self._split(split)
        return self._pack([data.window(int(s), seq_len + 1) for s in starts], seq_len)

    def eval_batches(self, split: str = "val", batch_size: int | None = None, seq_len: int | None = None,
                     max_batches: int | None = None,
                     rows: slice | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed held-out windows: consecutive from the start of ``split``, stride ``seq_len``, so each
        token is predicted once. Full batches only, unless the split holds less than one batch.
        ``batch_size`` and ``seq_len`` are required (defaults only so that ``split`` can have one).
        """
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        if max_batches is not None:
            _check_positive(max_batches=max_batches)
        data = self._check_window(split, seq_len)
        num_windows = (data.num_tokens - 1) // seq_len
        num_batches = max(1, num_windows // batch_size)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        batches = []
        for b in range(num_batches):
            starts = np.arange(b * batch_size, min((b + 1) * batch_size, num_windows)) * seq_len
            if rows is not None:
                starts = starts[rows]
            batches.append(self._pack([data.window(int(s), seq_len + 1) for s in starts], seq_len))
        return batches

    def short_eval_warning(self, batches: int, batch_size: int, seq_len: int, split: str = "val") -> str | None:
        """A warning with both numbers when ``split`` holds less than one evaluation of ``batches`` x
        ``batch_size`` x ``seq_len`` tokens (``eval_batches`` would quietly evaluate on less); else None."""
        from mutransfer.data.heldout import short_heldout_warning, suggested_val_fraction

        wanted = batches * batch_size * seq_len
        total = sum(self.num_tokens(s) for s in self.splits)
        now = self.index.get("settings", {}).get("val_fraction")
        fix = (f"prepare {str(self.directory)!r} again with --val-fraction "
               f"{suggested_val_fraction(total, wanted):.2g}" + (f" (now {now:g})" if now else "") +
               ", or lower train.eval_batches / train.eval_batch_size / train.eval_seq_len")
        return short_heldout_warning(self.num_tokens(split), batches, batch_size, seq_len, "this run's settings",
                                     fix)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.num_tokens(s):,}" for s in self.splits)
        return f"TokenDataset({str(self.directory)!r}, tokenizer={self.tokenizer!r}, {sizes})"
