"""Fault injection: bad numbers in every field, bad inputs, kills and corruption at every phase of a
checkpoint, resumes with other inputs, and runs that must never be rewritten (sweeps and transfer
checks: test_faults_sweep.py).

Each failure was reproduced here first, then fixed; the numeric-field tests discover the fields from
the typed schema (every table of every file kind), so a new field is covered without a new test.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from full_scale.checkpoint import FAILPOINT_ENV, list_checkpoints, read_trainer
from mutransfer.cli import main
from mutransfer.config import ConfigError, base_type, parse
from mutransfer.config_docs import all_tables
from mutransfer.rundir import read_jsonl
from tests.prepared_data import prepare_text

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "full_scale" / "smoke.toml"
# The smoke run's five stages in 11 steps, a checkpoint every 2: seconds on CPU.
SHORT = ["--set", "stages.warmup.steps=2", "--set", "stages.stable1.steps=2", "--set", "stages.stable2.steps=2",
         "--set", "stages.decay.steps=3", "--set", "stages.long_context.phases.0.steps=1",
         "--set", "stages.long_context.phases.1.steps=1", "--set", "checkpoint.every=2",
         "--set", "train.eval_every=4"]
TOTAL = 11


# ---------------------------------------------------------------- numbers, from the schema

# A valid input for the tables that have required fields; every other table validates from {}.
VALID = {
    "ModelConfig": {"vocab_size": 256, "d_model": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
                    "ffn_dim": 160},
    "StageTable": {"name": "s", "lr": {"shape": "constant"}},
    "SourceTable": {"data": "builtin"},
    "LRSpec": {"shape": "constant"},
    "SearchParam": {"low": 0.1, "high": 0.2},
}
BAD_NUMBERS = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf, "negative": -1, "zero": 0}


def numeric_fields():
    seen = set()
    for _, tables in all_tables():
        for _, cls in tables:
            if cls in seen:
                continue
            seen.add(cls)
            for name, field in cls.model_fields.items():
                kind = base_type(field.annotation)
                if kind in (int, float):
                    yield pytest.param(cls, name, kind, id=f"{cls.__name__}.{name}")


def allowed(cls: type[BaseModel], name: str, kind: type, value) -> bool:
    """What the field's declared range says about ``value`` (cross-field rules may still refuse it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    metadata = list(cls.model_fields[name].metadata)
    for arg in getattr(cls.model_fields[name].annotation, "__args__", ()):  # Optional[Annotated[...]]
        metadata += list(getattr(arg, "__metadata__", ()))
    for m in metadata:
        for attr, ok in (("gt", lambda v, b: v > b), ("ge", lambda v, b: v >= b), ("lt", lambda v, b: v < b),
                         ("le", lambda v, b: v <= b)):
            bound = getattr(m, attr, None)
            if bound is not None and not ok(value, bound):
                return False
    return True


def test_the_schema_has_numeric_fields_to_check():
    fields = list(numeric_fields())
    assert len(fields) > 60  # every table of every file kind, not a handful
    names = {p.id for p in fields}
    assert {"HParams.lr", "HParams.muon_ns_steps", "HParams.muon_eps", "TrainSettings.diverge_ratio",
            "SweepSettings.max_retries", "LRSpec.end_lr", "TransferSettings.lr_log2_step"} <= names


@pytest.mark.parametrize("cls, name, kind", list(numeric_fields()))
def test_every_numeric_field_refuses_bad_numbers_naming_it(cls, name, kind):
    base = VALID.get(cls.__name__, {})
    for label, value in BAD_NUMBERS.items():
        value = kind(value) if kind is int and math.isfinite(value) else float(value)
        if allowed(cls, name, kind, value):
            try:  # allowed by its range: it parses, or a cross-field rule refuses it by name
                parse(cls, {**base, name: value}, "t")
            except ConfigError as e:
                assert "t" in str(e)
            continue
        with pytest.raises(ConfigError, match=rf"t\.{name}\b") as e:
            parse(cls, {**base, name: value}, "t")
        assert label and "got" in str(e.value)


@pytest.mark.parametrize("text, field", [
    ("grad_clip = nan", "grad_clip"), ("muon_ns_steps = -3", "muon_ns_steps"), ("muon_eps = -1.0", "muon_eps"),
    ("lr = inf", "lr"), ("weight_decay = -0.1", "weight_decay")])
def test_a_lock_with_a_bad_number_is_refused(tmp_path, capsys, text, field):
    from mutransfer.config import HParams
    from mutransfer.lockfile import content_hash, lock_body
    from mutransfer.presets import get_preset

    key, value = (s.strip() for s in text.split("="))
    body = lock_body(HParams(), get_preset("tiny").param, get_preset("tiny").model, {"source": "test"})
    body["hparams"][key] = float(value) if key != "muon_ns_steps" else int(value)
    path = tmp_path / "bad.lock.json"
    path.write_text(json.dumps({**body, "content_hash": content_hash(body)}))
    assert main(["plan", "tiny", "--hparams", str(path)]) == 2
    assert f"lock.hparams.{field}" in capsys.readouterr().err


def test_training_refuses_nan_before_compute(tmp_path, capsys):
    out = tmp_path / "run"
    for setting, field in (("train.diverge_ratio=nan", "train.diverge_ratio"),
                           ("stages.long_context.lr.end_lr=nan", "lr.end_lr"),
                           ("train.eval_every=0", "train.eval_every")):
        assert main(["train", str(SMOKE), "--out", str(out), "--quiet", "--set", setting]) == 2
        assert field in capsys.readouterr().err
    assert not out.exists()  # nothing written by a start that failed its checks


def test_command_line_numbers_are_checked(capsys):
    assert main(["plan", "tiny", "--lr", "nan"]) == 2
    assert "--lr" in capsys.readouterr().err


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize("name, content, message", [
    ("binary.txt", bytes(range(256)) * 64, "NUL bytes"),
    ("latin.txt", "caf\xe9 ".encode("latin-1") * 4000, "not UTF-8"),
    ("fake.parquet", b"this is not parquet at all", "not a readable Parquet file"),
    ("plain.txt.gz", b"hello world, not gzip\n" * 10, "cannot be read as gzip"),
])
def test_data_prepare_refuses_what_is_not_text(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["data", "prepare", str(path), "--tokenizer", "byte", "--out", str(tmp_path / "d"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and name in err
    assert not (tmp_path / "d").exists()


def test_gzipped_text_is_still_read(tmp_path):
    path = tmp_path / "ok.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("First paragraph of English text.\n\nSecond one, a little longer than the first.\n\n" * 50)
    assert main(["data", "prepare", str(path), "--tokenizer", "byte", "--out", str(tmp_path / "d"), "--quiet",
                 "--set", "val_fraction=0.2"]) == 0


@pytest.mark.parametrize("content, message", [("[1, 2, 3]", "a lock file is a JSON object"),
                                              ("{not json", "not a valid JSON lock file"),
                                              ('{"format": "mutransfer.hparams.lock/1"}', "missing field")])
def test_malformed_lock_files_are_clear_errors(tmp_path, capsys, content, message):
    path = tmp_path / "lock.json"
    path.write_text(content)
    assert main(["train", str(SMOKE), "--hparams", str(path), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- training: kills, corruption, resume


def train(out: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mutransfer.cli", "train", str(SMOKE), "--out", str(out), "--quiet", *SHORT, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=600)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert train(out).returncode == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(TOTAL))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["shards", "manifest", "renamed"])
def test_a_kill_at_each_phase_of_a_save_resumes_bit_exact(reference, tmp_path, phase):
    out = tmp_path / "run"
    killed = train(out, env={FAILPOINT_ENV: f"{phase}@3"})  # the third save: step 6, before the switch at 6
    assert killed.returncode == -signal.SIGKILL
    good = [step for step, _ in list_checkpoints(out)]
    assert good == ([2, 4, 6] if phase == "renamed" else [2, 4])  # a save that died left no step_*
    resumed = train(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == losses(reference)
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_resume_with_activation_checkpointing_is_bit_exact(reference, tmp_path):
    """Recomputing blocks changes no number: the same losses as the reference, and a resume of a
    checkpointed run is bit-exact (fp32, CPU)."""
    ckpt = ["--set", "train.activation_checkpointing=full", "--set", "stages.decay.activation_checkpointing=selective"]
    out = tmp_path / "run"
    assert train(out, *ckpt, env={FAILPOINT_ENV: "renamed@3"}).returncode == -signal.SIGKILL
    assert train(out, *ckpt).returncode == 0
    assert losses(out) == pytest.approx(losses(reference), rel=1e-6)
    straight = tmp_path / "straight"
    assert train(straight, *ckpt).returncode == 0
    assert losses(out) == losses(straight)


def corrupt_shard(ckpt: Path) -> None:
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def empty_trainer_state(ckpt: Path) -> None:
    (ckpt / "trainer.json").write_text("")


def truncate_rng(ckpt: Path) -> None:
    rng = ckpt / "rng" / "rank_0.pt"
    rng.write_bytes(rng.read_bytes()[:10])


def drop_manifest(ckpt: Path) -> None:
    (ckpt / "manifest.json").write_text('{"format": "x"}')


@pytest.mark.slow
@pytest.mark.parametrize("damage", [corrupt_shard, empty_trainer_state, truncate_rng, drop_manifest])
def test_a_corrupt_newest_checkpoint_is_named_and_skipped(reference, tmp_path, damage):
    out = tmp_path / "run"
    assert train(out, env={FAILPOINT_ENV: "renamed@4"}).returncode == -signal.SIGKILL  # died after step 8's save
    newest = list_checkpoints(out)[-1][1]
    assert newest.name == "step_00000008"
    damage(newest)
    resumed = train(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step_00000008" in resumed.stderr and "corrupt" in resumed.stderr
    skipped = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "checkpoint_skipped"]
    assert len(skipped) == 1 and skipped[0]["path"].endswith("step_00000008")
    assert [e["checkpoint"] for e in read_jsonl(out / "events.jsonl") if e["event"] == "resume"][-1].endswith(
        "step_00000006")
    assert losses(out) == losses(reference)


@pytest.mark.slow
def test_resume_refuses_other_data_and_another_lock(tmp_path):
    data = tmp_path / "data"
    prepare_text(data, "".join(f"{i}. Now is the winter of our discontent made glorious summer by this sun "
                               "of York.\n\n" for i in range(400)))
    use = ["--set", f"data.mixture=[{{name = 'pretrain', data = '{data}'}}]", "--set", f"data.val='{data}'",
           "--set", "stages.decay.mixture=[{name = 'pretrain', data = '" + str(data) + "'}]",
           "--set", "stages.long_context.mixture=[{name = 'pretrain', data = '" + str(data) + "'}]"]
    out = tmp_path / "run"
    assert train(out, *use, env={FAILPOINT_ENV: "renamed@2"}).returncode == -signal.SIGKILL
    # the same directory re-prepared with other text: refused, naming the data
    import shutil

    shutil.rmtree(data)
    prepare_text(data, "".join(f"{i}. Some other text entirely, about a ship and the sea and the wind.\n\n"
                               for i in range(400)))
    refused = train(out, *use)
    assert refused.returncode == 2 and "data" in refused.stderr and "fingerprint" in refused.stderr
    # an explicit override proceeds, and is recorded
    allowed_run = train(out, *use, "--allow-changed-inputs")
    assert allowed_run.returncode == 0, allowed_run.stderr[-2000:]
    resume = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "resume"][-1]
    assert any("data" in c for c in resume["changed_inputs"])
    # config.json removed, another lock: still refused (the checkpoint records the lock)
    out2 = tmp_path / "run2"
    assert train(out2, env={FAILPOINT_ENV: "renamed@2"}).returncode == -signal.SIGKILL
    (out2 / "config.json").unlink()
    other = tmp_path / "other.lock.json"
    body = json.loads((ROOT / "full_scale" / "smoke.hparams.lock.json").read_text())
    from mutransfer.lockfile import content_hash

    body.pop("content_hash")
    body["hparams"]["lr"] = 0.02
    other.write_text(json.dumps({**body, "content_hash": content_hash(body)}))
    refused = train(out2, "--hparams", str(other))
    assert refused.returncode == 2 and "lock" in refused.stderr


@pytest.mark.slow
def test_finished_runs_are_not_rewritten_and_events_only_grow(reference, tmp_path):
    summary = json.loads((reference / "summary.json").read_text())
    events = read_jsonl(reference / "events.jsonl")
    again = train(reference)
    assert again.returncode == 0 and "already finished" in again.stderr
    assert json.loads((reference / "summary.json").read_text()) == summary
    assert summary["final_loss"] is not None
    assert read_jsonl(reference / "events.jsonl")[:len(events)] == events
    # a resumed run keeps its earlier events: start, both resumes, every checkpoint
    out = tmp_path / "run"
    assert train(out, env={FAILPOINT_ENV: "renamed@2"}).returncode == -signal.SIGKILL
    assert train(out, env={FAILPOINT_ENV: "renamed@4"}).returncode == -signal.SIGKILL
    assert train(out).returncode == 0
    kinds = [e["event"] for e in read_jsonl(out / "events.jsonl")]
    assert kinds.count("start") == 1 and kinds.count("resume") == 2


def test_a_failed_start_leaves_nothing_a_later_run_trusts(tmp_path, capsys):
    out = tmp_path / "run"
    bad = ["--set", "data.val='/no/such/dataset'"]
    assert main(["train", str(SMOKE), "--out", str(out), "--quiet", *bad]) == 2
    assert "/no/such/dataset" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_from_checkpoint_is_refused_once_the_run_has_its_own(reference, tmp_path, capsys):
    ckpt = list_checkpoints(reference)[0][1]
    assert main(["train", str(SMOKE), "--out", str(reference), "--quiet", *SHORT, "--from-checkpoint",
                 str(ckpt)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert read_trainer(ckpt)["step"] == 2
