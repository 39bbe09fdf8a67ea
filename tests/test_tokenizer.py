"""Tokenizers: byte, DeepSeek-V3 from the installed package (offline), and tokenizer.json files."""

from __future__ import annotations

import hashlib
import json
import socket

import pytest

from mutransfer import tokenizer as tokmod
from mutransfer.config import ConfigError
from mutransfer.presets import DEEPSEEK_V3_MODEL_VOCAB
from mutransfer.tokenizer import load_tokenizer, round_up, tokenizer_fingerprint

TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "naïve café — 日本語のテキスト, 中文, emoji 🚀🙂 and ünïcödé",
    "line one\n\nline two\ttabbed\r\nwindows",
    "numbers 1234567 and code: def f(x): return x ** 2",
    "",
]


def test_byte_round_trip_and_facts():
    tok = load_tokenizer("byte")
    assert (tok.spec, tok.vocab_size, tok.model_vocab_size, tok.eos_id) == ("byte", 256, 256, None)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.fingerprint == tokenizer_fingerprint("byte") == tokmod.BYTE_FINGERPRINT
    assert load_tokenizer(" BYTE ").spec == "byte"
    with pytest.raises(ValueError):
        tok.decode([256])


@pytest.fixture(scope="module")
def deepseek():
    return load_tokenizer("deepseek-v3")


def test_deepseek_v3_vocabulary_facts(deepseek):
    data = json.loads(tokmod.deepseek_v3_file().read_text(encoding="utf-8"))
    assert len(data["model"]["vocab"]) == 128_000  # the BPE vocabulary
    added = sorted(t["id"] for t in data["added_tokens"])
    assert added[:3] == [0, 1, 2]  # BOS, EOS, pad reuse BPE ids
    assert added[3:] == list(range(128_000, 128_815))  # 815 more ids beyond the BPE
    assert deepseek.vocab_size == 128_815
    assert deepseek.model_vocab_size == 129_280 == DEEPSEEK_V3_MODEL_VOCAB == tokmod.DEEPSEEK_V3_MODEL_VOCAB
    assert deepseek.model_vocab_size >= deepseek.vocab_size and deepseek.model_vocab_size % 128 == 0
    assert deepseek.eos_id == 1
    assert deepseek.decode([deepseek.eos_id]) == "<｜end▁of▁sentence｜>"
    assert deepseek.fingerprint == hashlib.sha256(tokmod.deepseek_v3_file().read_bytes()).hexdigest()
    assert deepseek.fingerprint == tokenizer_fingerprint("deepseek-v3")
    # Pins the V3 vocabulary itself (later package releases ship V4, which numbers tokens differently).
    assert deepseek.encode("Hello world") == [19923, 2058]


def test_deepseek_v3_round_trips(deepseek):
    for text in TEXTS:
        ids = deepseek.encode(text)
        assert all(0 <= i < deepseek.vocab_size for i in ids)
        assert deepseek.decode(ids) == text
    assert deepseek.encode_batch(TEXTS) == [deepseek.encode(t) for t in TEXTS]
    assert len(deepseek.encode("the quick brown fox")) < len("the quick brown fox")  # real BPE merges


def test_deepseek_v3_literal_special_token_text_stays_text(deepseek):
    text = "before <｜end▁of▁sentence｜> after"
    ids = deepseek.encode(text)
    assert deepseek.eos_id not in ids
    assert deepseek.decode(ids) == text


def test_deepseek_v3_loads_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tokenizer loading tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    tok = tokmod._load.__wrapped__("deepseek-v3")  # bypass the cache: really load the file now
    assert tok.vocab_size == 128_815 and tok.decode(tok.encode("offline ✓")) == "offline ✓"


def test_tokenizer_json_path_and_directory(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "!": 4}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["</s>", "<extra>"])
    path = tmp_path / "tiny" / "tokenizer.json"
    path.parent.mkdir()
    hf.save(str(path))

    tok = load_tokenizer(str(path))
    assert tok.spec == str(path.resolve())
    assert tok.name == "tiny"
    assert tok.vocab_size == 6 and tok.model_vocab_size == 128
    assert tok.eos_id == 1
    assert tok.encode("hello world !") == [2, 3, 4]
    assert tok.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_tokenizer(str(path.parent)).spec == tok.spec  # a directory holding tokenizer.json


def test_deepseek_file_by_path_has_same_fingerprint(deepseek):
    tok = load_tokenizer(str(tokmod.deepseek_v3_file()))
    assert tok.fingerprint == deepseek.fingerprint
    assert tok.vocab_size == 128_815 and tok.model_vocab_size == round_up(128_815) == 128_896
    assert tok.eos_id == 1  # from the package's tokenizer_config.json


@pytest.mark.parametrize("spec", ["gpt2", "deepseek-v4", "/no/such/tokenizer.json", ""])
def test_unknown_spec_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="tokenizer") as info:
        load_tokenizer(spec)
    assert "byte" in str(info.value) and "deepseek-v3" in str(info.value)


def test_bad_tokenizer_file_is_a_config_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer"):
        load_tokenizer(str(path))
