"""Data preparation, the memory-mapped dataset, its deterministic sampler, and the built-in corpus."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mutransfer.config import ConfigError
from mutransfer.data import cli as data_cli
from mutransfer.data.builtin import BUILTIN_NAME, CORPUS_FILE, builtin_dataset, open_dataset
from mutransfer.data.dataset import TokenDataset
from mutransfer.data.prepare import prepare_dataset
from mutransfer.tokenizer import load_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def make_docs(n: int = 300, seed: int = 0) -> list[str]:
    """Distinct documents (each carries its number), several lines, no blank lines inside."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                 for _ in range(rng.randint(1, 4))]
        docs.append(f"document {i} ünïcode ✓\n" + "\n".join(lines))
    return docs


def write_txt(path, docs):
    path.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")  # runs of blank lines separate documents
    return path


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}) + "\n")
    return path


def write_parquet(path, docs, field="text"):
    table = pa.table({"id": list(range(len(docs))), field: docs})
    pq.write_table(table, path, row_group_size=64)
    return path


def split_docs(ds: TokenDataset, split: str) -> list[str]:
    """The documents of a split, recovered from its token stream."""
    tok = load_tokenizer(ds.tokenizer)
    tokens = ds.tokens(split).tolist()
    if tok.eos_id is None:
        text = tok.decode(tokens)
        assert text.endswith("\n\n")
        return text[:-2].split("\n\n")
    assert tokens[-1] == tok.eos_id
    docs, start = [], 0
    for i, t in enumerate(tokens):
        if t == tok.eos_id:
            docs.append(tok.decode(tokens[start:i]))
            start = i + 1
    return docs


@pytest.fixture(scope="module")
def docs():
    return make_docs()


@pytest.fixture(scope="module")
def byte_ds(tmp_path_factory, docs):
    root = tmp_path_factory.mktemp("byte")
    out = prepare_dataset([write_txt(root / "docs.txt", docs)], "byte", root / "ds", val_fraction=0.1,
                          progress=False)
    return TokenDataset.open(out)


# ---- preparation -------------------------------------------------------------------------------

def test_index_contents(byte_ds, docs):
    index = json.loads((byte_ds.directory / "index.json").read_text())
    assert index["format"] == "mutransfer-tokens" and index["version"] == 1
    assert index["tokenizer"] == "byte"
    assert index["tokenizer_fingerprint"] == load_tokenizer("byte").fingerprint
    assert (index["vocab_size"], index["model_vocab_size"], index["dtype"]) == (256, 256, "uint16")
    assert len(index["fingerprint"]) == 64 and index["created"]
    source = index["sources"][0]
    path = byte_ds.directory.parent / "docs.txt"
    assert source["name"] == "docs.txt" and source["kind"] == "txt"
    assert source["size"] == path.stat().st_size
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert index["settings"]["val_fraction"] == 0.1
    for split in ("train", "val"):
        info = index["splits"][split]
        assert info["num_tokens"] == sum(s["num_tokens"] for s in info["shards"]) == byte_ds.num_tokens(split)
        for shard in info["shards"]:
            assert (byte_ds.directory / shard["file"]).stat().st_size == 2 * shard["num_tokens"]
    assert index["splits"]["train"]["num_documents"] + index["splits"]["val"]["num_documents"] == len(docs)
    assert byte_ds.vocab_size == 256 and byte_ds.fingerprint == index["fingerprint"]


def test_txt_documents_split_on_blank_lines_and_val_never_overlaps_train(byte_ds, docs):
    train, val = split_docs(byte_ds, "train"), split_docs(byte_ds, "val")
    assert sorted(train + val) == sorted(docs)  # every document kept whole, exactly once
    assert not set(train) & set(val)
    assert 0.03 * len(docs) < len(val) < 0.2 * len(docs)  # about val_fraction = 0.1
    train_text = "\n\n".join(train)
    for doc in val:
        assert doc.split("\n")[0] + "\n" not in train_text  # each document's unique first line


def test_jsonl_parquet_txt_give_the_same_tokens(tmp_path, docs):
    inputs = {"txt": write_txt(tmp_path / "d.txt", docs), "jsonl": write_jsonl(tmp_path / "d.jsonl", docs),
              "parquet": write_parquet(tmp_path / "d.parquet", docs)}
    sets = {k: TokenDataset(prepare_dataset([p], "deepseek-v3", tmp_path / f"out-{k}", val_fraction=0.1,
                                            progress=False)) for k, p in inputs.items()}
    ref = sets["jsonl"]
    assert ref.dtype.name == "uint32" and ref.model_vocab_size == 129_280 and ref.eos_id == 1
    assert sorted(split_docs(ref, "train") + split_docs(ref, "val")) == sorted(docs)
    assert not set(split_docs(ref, "train")) & set(split_docs(ref, "val"))
    for ds in sets.values():
        for split in ("train", "val"):
            assert np.array_equal(ds.tokens(split), ref.tokens(split))
    assert len({ds.fingerprint for ds in sets.values()}) == 3  # the input kind is part of the identity


def test_text_field_and_several_files(tmp_path, docs):
    a = write_jsonl(tmp_path / "a.jsonl", docs[:150], field="content")
    b = write_parquet(tmp_path / "b.parquet", docs[150:], field="content")
    gz = tmp_path / "c.txt.gz"
    gz.write_bytes(gzip.compress(b"gzipped document one\n\ngzipped document two\n"))
    ds = TokenDataset(prepare_dataset([a, b, gz], "byte", tmp_path / "out", val_fraction=0.2,
                                      text_field="content", progress=False))
    got = split_docs(ds, "train") + split_docs(ds, "val")
    assert sorted(got) == sorted(docs + ["gzipped document one", "gzipped document two"])
    assert [s["kind"] for s in ds.index["sources"]] == ["jsonl", "parquet", "txt"]


def test_shards_do_not_change_the_data(tmp_path, byte_ds):
    source = byte_ds.directory.parent / "docs.txt"
    small = TokenDataset(prepare_dataset([source], "byte", tmp_path / "small", val_fraction=0.1,
                                         shard_tokens=1000, progress=False))
    assert len(small.index["splits"]["train"]["shards"]) > 5
    assert small.fingerprint == byte_ds.fingerprint  # shard size is layout, not content
    assert np.array_equal(small.tokens("train", 950, 2100), byte_ds.tokens("train", 950, 2100))  # 3 shards
    assert np.array_equal(small.tokens("train"), byte_ds.tokens("train"))
    with pytest.raises(ConfigError, match="outside"):
        small.tokens("train", small.num_tokens("train") - 5, 6)
    for seed, step in [(0, 0), (1, 7), (3, 1000)]:
        got, want = small.batch("train", seed, step, 16, 200), byte_ds.batch("train", seed, step, 16, 200)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for (xa, ya), (xb, yb) in zip(small.eval_batches(batch_size=4, seq_len=100),
                                  byte_ds.eval_batches(batch_size=4, seq_len=100), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_val_gets_at_least_one_document(tmp_path):
    src = write_txt(tmp_path / "d.txt", ["first document", "second document", "third document"])
    ds = TokenDataset(prepare_dataset([src], "byte", tmp_path / "out", val_fraction=1e-12, progress=False))
    assert ds.index["splits"]["val"]["num_documents"] == 1
    assert ds.index["splits"]["train"]["num_documents"] == 2


def test_single_document_is_too_little(tmp_path):
    src = tmp_path / "one.txt"
    src.write_text("just one document without blank lines\nsecond line\n")
    with pytest.raises(ConfigError, match="empty"):
        prepare_dataset([src], "byte", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_input_errors_name_the_problem(tmp_path, docs):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match="nope.jsonl"):
        prepare_dataset([missing], "byte", tmp_path / "out", progress=False)
    odd = tmp_path / "data.csv"
    odd.write_text("text\nhello\n")
    with pytest.raises(ConfigError, match="unsupported"):
        prepare_dataset([odd], "byte", tmp_path / "out", progress=False)
    jsonl = write_jsonl(tmp_path / "d.jsonl", docs[:5], field="body")
    with pytest.raises(ConfigError, match="'text'"):
        prepare_dataset([jsonl], "byte", tmp_path / "out", progress=False)
    parquet = write_parquet(tmp_path / "d.parquet", docs[:5], field="body")
    with pytest.raises(ConfigError, match="no column 'text'"):
        prepare_dataset([parquet], "byte", tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="tokenizer"):
        prepare_dataset([jsonl], "gpt-17", tmp_path / "out", text_field="body", progress=False)


def test_failed_prepare_leaves_nothing_behind(tmp_path, docs):
    src = tmp_path / "d.jsonl"
    write_jsonl(src, docs)
    with open(src, "a") as f:
        f.write("{broken json\n")
    out = tmp_path / "sets" / "out"
    with pytest.raises(ConfigError, match="line 301"):
        prepare_dataset([src], "byte", out, progress=False)
    assert list((tmp_path / "sets").iterdir()) == []  # neither the output nor a temporary directory


def test_existing_output(tmp_path, docs):
    src = write_txt(tmp_path / "d.txt", docs[:50])
    out = prepare_dataset([src], "byte", tmp_path / "out", val_fraction=0.1, progress=False)
    stamp = (out / "index.json").stat().st_mtime_ns
    with pytest.raises(ConfigError, match="already exists"):
        prepare_dataset([src], "byte", out, val_fraction=0.1, progress=False)
    assert prepare_dataset([src], "byte", out, val_fraction=0.1, progress=False, exist_ok=True) == out
    assert (out / "index.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(ConfigError, match="already exists"):  # different settings: never silently reused
        prepare_dataset([src], "byte", out, val_fraction=0.2, progress=False, exist_ok=True)


def test_concurrent_prepare_of_the_same_dataset(tmp_path, docs):
    src = write_txt(tmp_path / "d.txt", docs)
    out = tmp_path / "sets" / "shared"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: prepare_dataset([src], "byte", out, progress=False, exist_ok=True),
                                range(4)))
    assert all(r == out for r in results)
    assert [p.name for p in (tmp_path / "sets").iterdir()] == ["shared"]
    assert TokenDataset(out).num_tokens("train") > 0


# ---- sampling ----------------------------------------------------------------------------------

def test_batch_is_a_function_of_seed_and_step(byte_ds):
    x, y = byte_ds.batch("train", seed=3, step=11, batch_size=8, seq_len=64)
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    byte_ds.batch("train", seed=3, step=10, batch_size=8, seq_len=64)  # history must not matter
    x2, y2 = byte_ds.batch("train", seed=3, step=11, batch_size=8, seq_len=64)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x, TokenDataset(byte_ds.directory).batch("train", 3, 11, 8, 64)[0])  # a fresh process
    assert not torch.equal(x, byte_ds.batch("train", 3, 12, 8, 64)[0])
    assert not torch.equal(x, byte_ds.batch("train", 4, 11, 8, 64)[0])
    assert not torch.equal(x[:, :32], byte_ds.batch("val", 3, 11, 8, 32)[0])
    assert int(x.max()) < 256 and int(x.min()) >= 0


def test_batch_windows_are_real_text(byte_ds):
    stream = byte_ds.tokens("train")
    starts = byte_ds.batch_starts("train", 0, 5, 6, 50)
    x, y = byte_ds.batch("train", 0, 5, 6, 50)
    for row, s in enumerate(starts):
        assert x[row].tolist() == stream[s:s + 50].tolist()
        assert y[row].tolist() == stream[s + 1:s + 51].tolist()


def test_row_slices_union_is_the_full_batch(byte_ds):
    full_x, full_y = byte_ds.batch("train", 1, 42, 10, 32)
    parts = [byte_ds.batch("train", 1, 42, 10, 32, rows=slice(a, b)) for a, b in [(0, 3), (3, 7), (7, 10)]]
    assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_y)
    ranks = [byte_ds.batch("train", 1, 42, 10, 32, rows=slice(r, None, 2))[0] for r in range(2)]
    assert torch.equal(ranks[0], full_x[0::2]) and torch.equal(ranks[1], full_x[1::2])


def test_eval_batches_are_fixed_consecutive_windows(byte_ds):
    val = byte_ds.tokens("val")
    batches = byte_ds.eval_batches("val", batch_size=4, seq_len=50, max_batches=3)
    assert len(batches) == 3
    again = byte_ds.eval_batches(batch_size=4, seq_len=50, max_batches=3)
    for a, b in zip(batches, again, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x = torch.cat([b[0] for b in batches]).reshape(-1)
    y = torch.cat([b[1] for b in batches]).reshape(-1)
    assert x.tolist() == val[:600].tolist() and y.tolist() == val[1:601].tolist()
    positional = byte_ds.eval_batches("val", 4, 50, 3)  # (split, batch_size, seq_len, max_batches)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, positional, strict=True))
    everything = byte_ds.eval_batches(batch_size=4, seq_len=50)
    assert len(everything) == (len(val) - 1) // 50 // 4


def test_window_longer_than_the_split_is_a_clear_error(byte_ds):
    n = byte_ds.num_tokens("val")
    with pytest.raises(ConfigError, match="seq_len"):
        byte_ds.batch("val", 0, 0, 2, n)
    with pytest.raises(ConfigError, match="seq_len"):
        byte_ds.eval_batches(batch_size=2, seq_len=n)
    x, _ = byte_ds.batch("val", 0, 0, 2, n - 1)  # exactly fits
    assert x.shape == (2, n - 1)
    with pytest.raises(ConfigError, match="split"):
        byte_ds.batch("test", 0, 0, 2, 8)
    with pytest.raises(ConfigError, match="batch_size"):
        byte_ds.eval_batches("val", seq_len=8)


def test_wrong_tokenizer_is_refused(byte_ds, tmp_path):
    byte_ds.check_tokenizer("byte")
    with pytest.raises(ConfigError, match="tokenizer") as info:
        byte_ds.check_tokenizer("deepseek-v3")
    assert "'byte'" in str(info.value)
    with pytest.raises(ConfigError, match="tokenizer"):
        open_dataset(str(byte_ds.directory), "deepseek-v3")
    assert open_dataset(str(byte_ds.directory), "byte").fingerprint == byte_ds.fingerprint


def test_open_dataset_errors(tmp_path):
    with pytest.raises(ConfigError, match="data = .*mutransfer data prepare"):
        open_dataset(str(tmp_path / "missing"), "byte")
    with pytest.raises(ConfigError, match="data = "):
        open_dataset(str(tmp_path), "byte")  # exists but holds no index.json
    with pytest.raises(ConfigError, match="builtin"):
        open_dataset("builtin:wikipedia", "byte", cache_dir=tmp_path)


# ---- built-in corpus ---------------------------------------------------------------------------

def test_builtin_corpus_is_bundled_and_small():
    assert CORPUS_FILE.is_file()
    assert CORPUS_FILE.stat().st_size < 500_000
    text = gzip.decompress(CORPUS_FILE.read_bytes()).decode("utf-8")
    assert len(text) > 1_000_000 and text.startswith("First Citizen:")


def test_builtin_dataset_prepares_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("MUTRANSFER_CACHE", str(tmp_path / "cache"))
    ds = builtin_dataset()
    assert ds.directory.parent == tmp_path / "cache" / "data"
    assert ds.tokenizer == "byte" and ds.vocab_size == 256
    assert ds.num_tokens("train") > 1_000_000 and ds.num_tokens("val") >= 30_000
    stamp = (ds.directory / "index.json").stat().st_mtime_ns
    again = open_dataset("builtin", "byte")
    assert again.directory == ds.directory and (ds.directory / "index.json").stat().st_mtime_ns == stamp
    assert open_dataset(BUILTIN_NAME, "byte").fingerprint == ds.fingerprint
    x, _ = ds.batch("train", 0, 0, 2, 128)
    assert x.shape == (2, 128)
    assert len(ds.eval_batches(batch_size=16, seq_len=256, max_batches=4)) == 4
    other = builtin_dataset(cache_dir=tmp_path / "elsewhere")  # the argument wins over the variable
    assert other.directory.parent == tmp_path / "elsewhere" / "data" and other.fingerprint == ds.fingerprint


# ---- command line ------------------------------------------------------------------------------

def make_parser():
    parser = argparse.ArgumentParser(prog="mutransfer")
    data_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_prepare_and_info(tmp_path, docs, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", docs[:100], field="body")
    b = write_jsonl(tmp_path / "b.jsonl", docs[100:], field="body")
    out = tmp_path / "out"
    args = make_parser().parse_args(["data", "prepare", str(a), str(b), "--tokenizer", "byte", "--out",
                                     str(out), "--val-fraction", "0.05", "--text-field", "body", "--quiet"])
    assert args.func(args) == 0
    ds = TokenDataset(out)
    assert ds.index["settings"]["val_fraction"] == 0.05 and len(ds.index["sources"]) == 2
    args = make_parser().parse_args(["data", "info", str(out)])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["fingerprint"] == ds.fingerprint
    args = make_parser().parse_args(["data", "prepare", str(tmp_path / "missing.txt"), "--tokenizer", "byte",
                                     "--out", str(tmp_path / "out2"), "--quiet"])
    assert args.func(args) == 2
    assert "missing.txt" in capsys.readouterr().err
