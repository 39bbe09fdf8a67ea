"""The built-in default corpus: Tiny Shakespeare, shipped gzipped inside the package.

Why it is a fair default when nothing else is given: it is real English text (about 1.1 MB of
public-domain plays) with structure at every range -- spelling, metre, speaker turns, scenes -- so
a loss curve means something; a byte-level tiny model learns it visibly in a few hundred CPU
steps; and it is the corpus of nanoGPT's character-level example and many tutorials, so numbers
can be set beside well-known ones (ours holds out whole paragraphs by hash, not the last 10 %).
Nothing downloads: the first use tokenizes it into a cache directory, later uses reuse that.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mutransfer.config import ConfigError
from mutransfer.data.dataset import TokenDataset
from mutransfer.data.prepare import dataset_fingerprint, describe_sources, prepare_dataset, read_index
from mutransfer.tokenizer import load_tokenizer

BUILTIN_NAME = "builtin:tinyshakespeare"
CORPUS_FILE = Path(__file__).parent / "corpus" / "tinyshakespeare.txt.gz"
# 5 % of ~7,200 paragraphs: about 55k byte tokens held out, enough to evaluate a tiny model.
BUILTIN_VAL_FRACTION = 0.05


def cache_root(cache_dir=None) -> Path:
    """``cache_dir``, else ``$MUTRANSFER_CACHE``, else ``~/.cache/mutransfer``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("MUTRANSFER_CACHE") or "~/.cache/mutransfer").expanduser()


def builtin_dataset(tokenizer: str = "byte", cache_dir=None, progress: bool = False) -> TokenDataset:
    """Tiny Shakespeare tokenized with ``tokenizer``, prepared once under ``<cache root>/data/``.

    The directory name carries the dataset fingerprint, so a changed tokenizer or corpus gets a
    new directory; two processes preparing at once both end up with the one that was renamed
    into place first.
    """
    tok = load_tokenizer(tokenizer)
    sources = describe_sources([CORPUS_FILE])
    settings = {"val_fraction": BUILTIN_VAL_FRACTION, "text_field": "text"}
    fingerprint = dataset_fingerprint(sources, tok.fingerprint, settings)
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", tok.name)
    out = cache_root(cache_dir) / "data" / f"tinyshakespeare-{tag}-{fingerprint[:12]}"
    index = read_index(out)
    if index is None or index.get("fingerprint") != fingerprint:
        prepare_dataset([CORPUS_FILE], tok.spec, out, val_fraction=BUILTIN_VAL_FRACTION, progress=progress,
                        exist_ok=True)
    return TokenDataset(out)


def open_dataset(spec: str, tokenizer: str, cache_dir=None, vocab_size: int | None = None) -> TokenDataset:
    """``data = "builtin"`` / ``"builtin:tinyshakespeare"`` or a prepared directory, checked against
    the model's tokenizer and, given the model's ``vocab_size``, against its embedding rows."""
    dataset = _open(spec, tokenizer, cache_dir)
    if vocab_size is not None:
        dataset.check_vocab(vocab_size)
    return dataset


def _open(spec: str, tokenizer: str, cache_dir) -> TokenDataset:
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"data = {spec!r} must be 'builtin', {BUILTIN_NAME!r} or a prepared dataset "
                          "directory")
    spec = spec.strip()
    if spec == "builtin" or spec.startswith("builtin:"):
        if spec not in ("builtin", BUILTIN_NAME):
            raise ConfigError(f"data = {spec!r} is not a built-in corpus; allowed: 'builtin', "
                              f"{BUILTIN_NAME!r}, or a prepared dataset directory")
        return builtin_dataset(tokenizer, cache_dir=cache_dir)
    path = Path(spec).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"data = {spec!r} is a file, not a prepared dataset directory; data is 'builtin' or a "
                          "directory written by `mutransfer data prepare` (index.json and token shards); make "
                          f"one from this file with `mutransfer data prepare {spec} --tokenizer {tokenizer} "
                          "--out DIR`")
    if not path.is_dir():
        raise ConfigError(f"data = {spec!r} does not exist; prepare one with `mutransfer data prepare FILES "
                          f"--tokenizer {tokenizer} --out {spec}` or use data = 'builtin'")
    dataset = TokenDataset(spec)
    dataset.check_tokenizer(tokenizer)
    return dataset
