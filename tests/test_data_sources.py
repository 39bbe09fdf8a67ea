"""``data prepare`` from HuggingFace ``datasets`` (saved to disk, or in the local Hub cache), ``.json``
and ``.md``: each gives exactly the tokens of the same text prepared from a ``.txt``."""

from __future__ import annotations

import glob
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from mutransfer.cli import main
from mutransfer.config import ConfigError
from mutransfer.data.dataset import TokenDataset
from mutransfer.data.prepare import prepare_dataset

datasets = pytest.importorskip("datasets", reason="the hf-datasets extra is not installed")
datasets.disable_progress_bars()

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def make_docs(n: int = 120, seed: int = 1) -> list[str]:
    """Distinct multi-line documents without blank lines inside (so a .txt splits them back)."""
    rng = random.Random(seed)
    return [f"document {i} ✓\n" + "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
                                            for _ in range(rng.randint(1, 3))) for i in range(n)]


@pytest.fixture(scope="module")
def docs():
    return make_docs()


@pytest.fixture(scope="module")
def txt_dataset(tmp_path_factory, docs):
    """The reference: the documents as a .txt, prepared with the byte tokenizer."""
    root = tmp_path_factory.mktemp("txt")
    src = root / "docs.txt"
    src.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return TokenDataset(prepare_dataset([src], "byte", root / "out", val_fraction=0.1, progress=False))


def assert_same_tokens(a: TokenDataset, b: TokenDataset) -> None:
    for split in ("train", "val"):
        assert a.index["splits"][split]["num_tokens"] == b.index["splits"][split]["num_tokens"]
        assert np.array_equal(a.tokens(split), b.tokens(split))


def prepare(inputs, out, **kw) -> TokenDataset:
    return TokenDataset(prepare_dataset([str(i) for i in inputs], "byte", out, val_fraction=0.1, progress=False,
                                        **kw))


def test_saved_dataset_gives_the_tokens_of_the_same_text(tmp_path, docs, txt_dataset):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs}).save_to_disk(str(saved))
    ds = prepare([saved], tmp_path / "out")
    assert ds.index["splits"]["train"]["num_tokens"] > 0 and ds.index["splits"]["val"]["num_documents"] > 0
    assert_same_tokens(ds, txt_dataset)
    source = ds.index["sources"][0]
    assert source["kind"] == "hf-saved" and source["num_rows"] == len(docs) and source["split"] is None


def test_dataset_dict_split_and_column_through_the_command_line(tmp_path, docs, txt_dataset, capsys):
    saved = tmp_path / "dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": docs, "n": list(range(len(docs)))}),
        "test": datasets.Dataset.from_dict({"body": docs[:3], "n": [0, 1, 2]}),
    }).save_to_disk(str(saved))

    def prepare_cli(out, *options):
        return main(["data", "prepare", str(saved), "--tokenizer", "byte", "--out", str(out), "--quiet",
                     "--set", "val_fraction=0.1", *options])

    assert prepare_cli(tmp_path / "out", "--text-field", "body") == 0  # default split: train
    assert_same_tokens(TokenDataset(tmp_path / "out"), txt_dataset)

    assert prepare_cli(tmp_path / "bad", "--text-field", "body", "--split", "validation") == 2
    err = capsys.readouterr().err
    assert "no split 'validation'" in err and "['test', 'train']" in err
    assert prepare_cli(tmp_path / "bad") == 2  # default column 'text'
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "['body', 'n']" in err
    assert prepare_cli(tmp_path / "bad", "--text-field", "n") == 2
    err = capsys.readouterr().err
    assert "column 'n' is" in err and "not a string" in err
    assert not (tmp_path / "bad").exists()

    assert prepare_cli(tmp_path / "test-split", "--text-field", "body", "--set", "split='test'") == 0
    index = TokenDataset(tmp_path / "test-split").index
    assert index["sources"][0]["split"] == "test"
    assert index["splits"]["val"]["num_documents"] + index["splits"]["train"]["num_documents"] == 3


def test_split_options_are_refused_where_they_do_not_apply(tmp_path, docs):
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(single))
    with pytest.raises(ConfigError, match="single Dataset without splits"):
        prepare([single], tmp_path / "a", split="train")
    with pytest.raises(ConfigError, match="applies only to hf:NAME"):
        prepare([single], tmp_path / "b", hf_config="default")
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(docs), encoding="utf-8")
    with pytest.raises(ConfigError, match="split = 'train' applies only to HuggingFace dataset inputs"):
        prepare([txt], tmp_path / "c", split="train")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ConfigError, match="directory but not a saved HuggingFace dataset"):
        prepare([tmp_path / "plain_dir"], tmp_path / "d")


def hub_cache(root: Path, name: str, docs: list[str]) -> Path:
    """A datasets cache holding ``name`` as a Hub download leaves it: built by datasets' own JSON
    builder, then laid out under ``<namespace>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow``
    (the layout datasets' offline loader reads)."""
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    datasets.load_dataset("json", data_files={"train": str(src)}, cache_dir=str(root / "build"))
    built = Path(glob.glob(str(root / "build" / "json" / "*" / "*" / "*" / "dataset_info.json"))[0]).parent
    namespace, short = name.split("/")
    cache = root / "cache"
    target = cache / f"{namespace}___{short}" / "default" / built.parent.name / built.name
    shutil.copytree(built, target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(target / arrow.name.replace("json-", f"{short}-", 1))
    return cache


def test_cached_hub_dataset_is_read_offline_and_a_missing_one_is_a_clear_error(tmp_path, docs, txt_dataset):
    cache = hub_cache(tmp_path, "someone/tiny", docs)
    ds = prepare(["hf:someone/tiny"], tmp_path / "out", hf_cache_dir=str(cache))
    assert_same_tokens(ds, txt_dataset)
    assert ds.index["sources"][0]["kind"] == "hf-hub" and ds.index["sources"][0]["split"] == "train"

    with pytest.raises(ConfigError, match="'someone/absent' is not in the local cache.*nothing is downloaded"):
        prepare(["hf:someone/absent"], tmp_path / "absent", hf_cache_dir=str(cache))
    with pytest.raises(ConfigError, match=r"config 'other'.*Available configs in the cache: \['default'\]"):
        prepare(["hf:someone/tiny"], tmp_path / "other", hf_cache_dir=str(cache), hf_config="other")
    with pytest.raises(ConfigError, match=r"no split 'test'.*\['train'\]"):
        prepare(["hf:someone/tiny"], tmp_path / "test", hf_cache_dir=str(cache), split="test")
    assert not any((tmp_path / d).exists() for d in ("absent", "other", "test"))


def test_missing_datasets_package_says_what_to_install(tmp_path, docs, monkeypatch):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(saved))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'mutransfer\[hf-datasets\]'"):
        prepare([saved], tmp_path / "out")


def test_json_array_of_strings_or_records_and_markdown(tmp_path, docs, txt_dataset):
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(docs), encoding="utf-8")
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"id": i, "body": d} for i, d in enumerate(docs)]), encoding="utf-8")
    markdown = tmp_path / "docs.md"
    markdown.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    assert_same_tokens(prepare([strings], tmp_path / "s"), txt_dataset)
    assert_same_tokens(prepare([records], tmp_path / "r", text_field="body"), txt_dataset)
    assert_same_tokens(prepare([markdown], tmp_path / "m"), txt_dataset)


@pytest.mark.parametrize("content, message", [
    ('{"text": "one object"}', "top level is a JSON dict"),
    ('["fine", {"title": "no text"}]', "element 1: neither a string nor an object with the field 'text'"),
    ('[{"text": 3}]', "element 0: field 'text' is int"),
    ('["unterminated', "not valid JSON"),
])
def test_bad_json_is_refused_by_name(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        prepare([bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()
