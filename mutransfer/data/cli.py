"""``mutransfer data prepare`` and ``mutransfer data info``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Annotated

from pydantic import Field

from mutransfer.config import Config, ConfigError, PosInt, apply_overrides, parse

DEFAULT_SHARD_TOKENS = 2**24  # as in mutransfer.data.prepare, which this module imports only when run


def register(subparsers) -> None:
    """Add the ``data`` command to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="prepare and inspect token datasets")
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    prepare = commands.add_parser(
        "prepare", help="tokenize text files or HuggingFace datasets into shards",
        description="Tokenize .txt and .md (documents separated by blank lines), .jsonl, .json (an array of "
                    "strings or records) and .parquet files (gzipped too, but for .parquet), HuggingFace "
                    "datasets saved with save_to_disk (a directory) and cached Hub datasets (hf:NAME, never "
                    "downloaded) into memory-mapped token shards with a held-out val split.")
    prepare.add_argument("files", nargs="+", metavar="FILES",
                         help="files, save_to_disk directories, or hf:NAME for a dataset in the local HF cache")
    prepare.add_argument("--tokenizer", required=True,
                         help="'byte', 'deepseek-v3', or a path to a tokenizer.json")
    prepare.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    prepare.add_argument("--val-fraction", type=float, default=0.005,
                         help="share of documents held out for validation (default 0.005; at least one)")
    prepare.add_argument("--text-field", default="text",
                         help="JSON(L) field / Parquet or HF dataset column (default 'text')")
    prepare.add_argument("--split", default=None,
                         help="split of a HuggingFace dataset input (default 'train')")
    prepare.add_argument("--hf-config", default=None, help="configuration name of an hf:NAME input")
    prepare.add_argument("--hf-cache-dir", default=None,
                         help="HuggingFace datasets cache to read hf:NAME from (default: datasets' own, "
                              "HF_DATASETS_CACHE)")
    prepare.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                         help="tokens per shard file (default 2**24)")
    prepare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="set an option by name, e.g. val_fraction=0.01 (repeatable)")
    prepare.add_argument("--quiet", action="store_true", help="no progress output")
    prepare.set_defaults(func=_prepare)

    info = commands.add_parser("info", help="print a prepared dataset's index")
    info.add_argument("dir", metavar="DIR")
    info.set_defaults(func=_info)


class PrepareOptions(Config):
    """``mutransfer data prepare`` options (flags, or ``--set``)."""

    tokenizer: str
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.005
    text_field: str = "text"
    shard_tokens: PosInt = DEFAULT_SHARD_TOKENS
    split: str | None = None
    hf_config: str | None = None
    hf_cache_dir: str | None = None


def _prepare(args: argparse.Namespace) -> int:
    from mutransfer.data.prepare import prepare_dataset

    try:
        raw = {"tokenizer": args.tokenizer, "val_fraction": args.val_fraction, "text_field": args.text_field,
               "shard_tokens": args.shard_tokens, "split": args.split, "hf_config": args.hf_config,
               "hf_cache_dir": args.hf_cache_dir}
        opts = parse(PrepareOptions, apply_overrides(raw, args.overrides), "data prepare")
        out = prepare_dataset(args.files, opts.tokenizer, args.out, val_fraction=opts.val_fraction,
                              text_field=opts.text_field, shard_tokens=opts.shard_tokens,
                              progress=not args.quiet, split=opts.split, hf_config=opts.hf_config,
                              hf_cache_dir=opts.hf_cache_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _info(args: argparse.Namespace) -> int:
    from mutransfer.data.dataset import TokenDataset

    try:
        dataset = TokenDataset(args.dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {key: dataset.index[key] for key in ("tokenizer", "vocab_size", "model_vocab_size", "dtype",
                                                      "fingerprint", "created")}
    summary["splits"] = {s: {"num_tokens": v["num_tokens"], "num_documents": v["num_documents"],
                             "shards": len(v["shards"])} for s, v in dataset.index["splits"].items()}
    summary["sources"] = [s["path"] for s in dataset.index["sources"]]
    print(json.dumps(summary, indent=1))
    return 0
