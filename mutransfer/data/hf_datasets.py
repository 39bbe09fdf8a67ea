"""HuggingFace ``datasets`` as an input of ``data prepare``: the one module that imports ``datasets``.

Two kinds of source, both read without any network access:

- a directory written by ``Dataset.save_to_disk`` (``dataset_info.json`` + ``state.json``) or
  ``DatasetDict.save_to_disk`` (``dataset_dict.json`` and one such directory per split);
- ``hf:NAME``: a Hub dataset already in the local ``datasets`` cache (``load_dataset(NAME)`` run once
  on a machine with network). It is loaded with the Hub switched off and the cache reused; a dataset
  that is not cached is a ConfigError, never a download.

A source is recorded like a file (see ``prepare.describe_sources``): its ``sha256`` hashes the
split's Arrow files, so the dataset fingerprint changes exactly when the tokens can.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

from mutransfer.config import ConfigError

HUB_PREFIX = "hf:"
DEFAULT_SPLIT = "train"
_BATCH_ROWS = 8192
INSTALL_HINT = "pip install 'mutransfer[hf-datasets]' (or pip install datasets)"


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file())


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"reading a HuggingFace dataset needs the 'datasets' package: {INSTALL_HINT}") from e
    return datasets


@contextlib.contextmanager
def _offline(datasets):
    """The Hub switched off for ``datasets`` and ``huggingface_hub`` while loading: both read the
    ``HF_*_OFFLINE`` variables once, at import, so setting them now would be too late."""
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _verbosity(datasets, level: int | None):
    """``datasets``' log level set to ``level`` (None: left as it is) while loading."""
    saved = datasets.logging.get_verbosity()
    if level is not None:
        datasets.logging.set_verbosity(level)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(saved)


def _pick_split(what: str, splits: list[str], split: str | None) -> str:
    chosen = split or DEFAULT_SPLIT
    if chosen not in splits:
        raise ConfigError(f"{what} has no split {chosen!r} (set split / --split); available splits: {sorted(splits)}")
    return chosen


def _load_saved(path: Path, split: str | None):
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable directory is one input error
        raise ConfigError(f"data: {str(path)!r} is not a readable saved HuggingFace dataset: {e}") from e
    what = f"HuggingFace dataset {str(path)!r}"
    if isinstance(loaded, datasets.DatasetDict):
        chosen = _pick_split(what, list(loaded), split)
        return loaded[chosen], chosen
    recorded = loaded.split
    if split is not None and recorded is not None and str(recorded) != split:
        raise ConfigError(f"{what} is the single split {str(recorded)!r}, not {split!r} (drop --split)")
    if split is not None and recorded is None:
        raise ConfigError(f"{what} is a single Dataset without splits; drop split / --split {split!r}")
    return loaded, None if recorded is None else str(recorded)


def _load_hub(name: str, config: str | None, split: str | None, cache_dir: str | None, quiet: bool = False):
    datasets = _datasets()
    where = cache_dir or datasets.config.HF_DATASETS_CACHE
    what = f"HuggingFace dataset {name!r}" + (f" (config {config!r})" if config else "")
    try:
        with _offline(datasets), _verbosity(datasets, datasets.logging.ERROR if quiet else None):
            loaded = datasets.load_dataset(name, config, cache_dir=cache_dir,
                                           download_mode="reuse_cache_if_exists")
    except Exception as e:  # noqa: BLE001 - whatever the cause, the dataset is not usable offline
        detail = " ".join(str(e).split())
        raise ConfigError(f"{what} is not in the local cache {str(where)!r} and nothing is downloaded here; "
                          f"run datasets.load_dataset({name!r}) where there is network (same cache), or "
                          f"save_to_disk and pass the directory ({type(e).__name__}: {detail})") from e
    if isinstance(loaded, datasets.DatasetDict):
        chosen = _pick_split(what, list(loaded), split)
        return loaded[chosen], chosen
    return loaded, split


def _check_column(what: str, dataset, column: str) -> None:
    datasets = _datasets()
    features = dataset.features
    if column not in features:
        raise ConfigError(f"{what} has no column {column!r} (set text_field / --text-field); "
                          f"columns: {list(features)}")
    feature = features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ConfigError(f"{what}: column {column!r} is {feature}, not a string")


def _files_sha256(files: list[str]) -> str:
    h = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _load(spec: str, split: str | None, config: str | None, cache_dir: str | None, quiet: bool = False):
    """(dataset, split chosen, source record without the file facts) of one input."""
    if spec.startswith(HUB_PREFIX):
        name = spec[len(HUB_PREFIX):]
        if not name:
            raise ConfigError(f"data input {spec!r}: name the dataset after 'hf:', e.g. hf:roneneldan/TinyStories")
        dataset, chosen = _load_hub(name, config, split, cache_dir, quiet)
        return dataset, chosen, {"path": spec, "name": spec, "kind": "hf-hub", "config": config,
                                 "cache_dir": cache_dir}
    path = Path(spec).expanduser().resolve()
    if config is not None:
        raise ConfigError(f"data input {spec!r} is a saved dataset; hf_config / --hf-config applies only "
                          "to hf:NAME inputs")
    dataset, chosen = _load_saved(path, split)
    return dataset, chosen, {"path": str(path), "name": path.name, "kind": "hf-saved"}


def describe(spec: str, text_field: str, split: str | None = None, config: str | None = None,
             cache_dir: str | None = None) -> dict:
    """The source record of a saved dataset directory or an ``hf:NAME`` cached Hub dataset, after
    checking that the split and the text column exist (ConfigError naming the ones there are)."""
    dataset, chosen, record = _load(spec, split, config, cache_dir)
    what = f"HuggingFace dataset {record['name']!r}" + (f" split {chosen!r}" if chosen else "")
    _check_column(what, dataset, text_field)
    files = [f["filename"] for f in dataset.cache_files]
    if not files:
        raise ConfigError(f"{what} is held in memory only (no Arrow files to fingerprint); save_to_disk it first")
    return {**record, "split": chosen, "num_rows": dataset.num_rows, "files": files,
            "size": sum(Path(f).stat().st_size for f in files), "sha256": _files_sha256(files)}


def documents(source: dict, text_field: str, bar) -> Iterator[str]:
    """The strings of the text column, in row order; advances ``bar`` by the source's bytes as rows are read."""
    # Loaded a second time (describe loaded it first), so datasets' notes on the cache are not repeated.
    dataset, _, _ = _load(source["path"], source["split"], source.get("config"), source.get("cache_dir"), quiet=True)
    rows, done, read = max(dataset.num_rows, 1), 0, 0
    for batch in dataset.select_columns([text_field]).iter(batch_size=_BATCH_ROWS):
        values = batch[text_field]
        for value in values:
            if value is not None:
                yield value
        read += len(values)
        position = source["size"] * read // rows
        bar.update(position - done)
        done = position
