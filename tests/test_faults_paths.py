"""Fault injection for what a command is pointed at: output paths, data paths, model sizes,
tokenizers, and a disk that fills up during a checkpoint save.

Each failure was reproduced here first, then fixed. Every check is tested in both branches: the
good input is accepted, the bad one refused with exit status 2 (before any compute) and a message
that names the field or the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mutransfer.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "full_scale" / "smoke.toml"
TRANSFER = ROOT / "proxy_sweeps" / "lr_transfer_tiny.toml"
# A coordinate check and a transfer check cut to a handful of tiny runs (seconds on CPU).
COORD_SHORT = ["--widths", "32,64", "--steps", "1", "--seeds", "1", "--batch-size", "2", "--seq-len", "16",
               "--threads", "1"]
TRANSFER_SHORT = ["--quiet", "--set", "transfer.values=[32, 64]", "--set", "transfer.parametrizations=['mup']",
                  "--set", "transfer.lr_log2_low=-8.0", "--set", "transfer.lr_log2_high=-6.0",
                  "--set", "transfer.seeds=1", "--set", "transfer.bootstrap=0", "--set", "train.steps=2",
                  "--set", "train.warmup=0", "--set", "train.decay=0", "--set", "train.eval_every=2",
                  "--set", "train.eval_batch_size=2", "--set", "train.eval_batches=1",
                  "--set", "train.batch_size=2", "--set", "train.seq_len=16", "--set", "train.threads=1"]


@pytest.fixture(autouse=True)
def _torch_threads():
    """The commands run here set torch's thread count (--threads, train.threads); restore it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- output paths


def data_prepare(out: Path, text_file: Path) -> list[str]:
    return ["data", "prepare", str(text_file), "--tokenizer", "byte", "--out", str(out), "--quiet",
            "--set", "val_fraction=0.2"]


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("".join(f"Paragraph {i}: a few words of plain English text.\n\n" for i in range(40)))
    return path


def commands(out: Path, text_file: Path) -> dict[str, list[str]]:
    """Every command that takes an output directory, set to write into ``out``: cut to seconds;
    ``train`` checks its path first and then stops at a bad setting, refused by name."""
    return {
        "train": ["train", str(SMOKE), "--out", str(out), "--quiet", "--set", "train.eval_every=0"],
        "coord-check": ["coord-check", "tiny", *COORD_SHORT, "--out", str(out)],
        "transfer-check": ["transfer-check", str(TRANSFER), "--out", str(out), *TRANSFER_SHORT],
        "data prepare": data_prepare(out, text_file),
    }


# What each command writes once it got past its output path.
WRITES = {"coord-check": "coord.parquet", "transfer-check": "runs.jsonl", "data prepare": "index.json"}


def bad_outputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    return {"a regular file": (a_file, "is a file, not a directory"),
            "under a regular file": (a_file / "run", "is a file, not a directory")}


@pytest.mark.parametrize("command", ["train", "coord-check", "transfer-check", "data prepare"])
def test_an_output_path_that_is_a_file_is_refused_naming_it(tmp_path, capsys, text_file, command):
    for label, (out, message) in bad_outputs(tmp_path).items():
        assert main(commands(out, text_file)[command]) == 2, label
        err = capsys.readouterr().err
        assert str(out) in err and message in err, (label, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "a_file").read_text() == "not a directory\n"


@pytest.mark.parametrize("command", ["train", "coord-check", "transfer-check", "data prepare"])
def test_a_good_output_path_is_accepted(tmp_path, capsys, text_file, command):
    out = tmp_path / "new" / "run"  # parents created as needed
    code = main(commands(out, text_file)[command])
    err = capsys.readouterr().err
    if command == "train":  # got past the path to the config's check, and wrote nothing yet
        assert code == 2 and "train.eval_every" in err and not out.exists()
    else:  # ran (a check's verdict may pass or fail: 0 or 1)
        assert code in (0, 1), err[-2000:]
        assert (out / WRITES[command]).is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="run as root: permission bits do not stop writes, so a read-only "
                                              "directory cannot be simulated with chmod")
@pytest.mark.parametrize("command", ["train", "coord-check", "transfer-check", "data prepare"])
def test_an_output_path_without_write_permission_is_refused(tmp_path, capsys, text_file, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for out in (locked, locked / "run"):
            assert main(commands(out, text_file)[command]) == 2
            err = capsys.readouterr().err
            assert str(out) in err and "not writable" in err and "Traceback" not in err
    finally:
        locked.chmod(0o755)


def test_the_output_check_creates_nothing(tmp_path):
    from mutransfer.config import ConfigError
    from mutransfer.rundir import check_output_dir

    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert check_output_dir(tmp_path) == tmp_path  # an existing directory is fine
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="broken symbolic link"):
        check_output_dir(tmp_path / "dangling", "--out")


# ---------------------------------------------------------------- data paths


def test_a_data_spec_that_is_a_file_says_so(tmp_path, capsys, text_file):
    out = tmp_path / "run"
    assert main(["train", str(SMOKE), "--out", str(out), "--quiet", "--set", f"data.val='{text_file}'"]) == 2
    err = capsys.readouterr().err
    assert str(text_file) in err and "is a file, not a prepared dataset directory" in err
    assert "does not exist" not in err
    assert f"mutransfer data prepare {text_file}" in err  # how to make one from it
    assert not out.exists()


def test_a_prepared_data_directory_is_accepted(tmp_path, text_file):
    from mutransfer.data.builtin import open_dataset

    data = tmp_path / "data"
    assert main(data_prepare(data, text_file)) == 0
    assert open_dataset(str(data), "byte").num_tokens("train") > 0


# ---------------------------------------------------------------- tokenizers and the model's vocabulary

TOKENIZER_SIZE = 320  # > the tiny preset's vocab_size 256, < 384 (the good branch's vocab_size)
SWEEP = ROOT / "proxy_sweeps" / "quickstart.toml"


@pytest.fixture(scope="module")
def big_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json of 320 tokens, trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["Now is the winter of our discontent made glorious summer by this sun of York."] * 20
                            + [f"The quick brown fox jumps over the lazy dog, time {i}." for i in range(100)], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    assert max(tok.get_vocab().values()) + 1 == TOKENIZER_SIZE
    return path


def lock_for(tmp_path: Path, tokenizer: Path) -> Path:
    """The smoke run's lock file, for a model with ``tokenizer`` (the lock records the tokenizer)."""
    import json

    from mutransfer.lockfile import content_hash

    body = json.loads((ROOT / "full_scale" / "smoke.hparams.lock.json").read_text())
    body.pop("content_hash")
    body["tokenizer"] = body["proxy_model"]["tokenizer"] = str(tokenizer)
    path = tmp_path / "tok.lock.json"
    path.write_text(json.dumps({**body, "content_hash": content_hash(body)}))
    return path


def vocab_commands(tmp_path: Path, tokenizer: Path, vocab_size: int) -> dict[str, tuple[list[str], str]]:
    """Each command that takes a model and a tokenizer, with ``vocab_size``; and the error each
    gives for a bad setting checked after the vocabulary (the witness that the check passed)."""
    model = ["--set", f"model.tokenizer='{tokenizer}'", "--set", f"model.vocab_size={vocab_size}"]
    return {
        "train": (["train", str(SMOKE), "--out", str(tmp_path / "t"), "--quiet", "--hparams",
                   str(lock_for(tmp_path, tokenizer)), *model, "--set", "train.eval_seq_len=100000"],
                  "train.eval_seq_len"),
        "sweep": (["sweep", str(SWEEP), "--out", str(tmp_path / "s"), "--quiet", *model,
                   "--set", "objective.last_evals=1000"], "objective.last_evals"),
        "transfer-check": (["transfer-check", str(TRANSFER), "--out", str(tmp_path / "x"), *model,
                            "--set", "data.extra=1"], "data: expected a table with only 'spec'"),
        "coord-check": (["coord-check", "--spec", "examples.nanogpt:spec", "--set",
                         f"spec_args.vocab_size={vocab_size - TOKENIZER_SIZE + 256}", *COORD_SHORT,
                         "--compare", "mup", "--out", str(tmp_path / "c")], "--compare mup"),
    }


@pytest.mark.parametrize("command", ["train", "sweep", "transfer-check", "coord-check"])
def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, capsys, big_tokenizer, command):
    argv, _ = vocab_commands(tmp_path, big_tokenizer, 256)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    size = 256 if command == "coord-check" else TOKENIZER_SIZE  # coord-check: byte tokens, a 192-row model
    vocab = 192 if command == "coord-check" else 256
    assert "model.tokenizer" in err and f"model.vocab_size = {vocab}" in err and f"{size} tokens" in err, err
    assert not any(tmp_path.glob("[tsxc]"))  # nothing written


@pytest.mark.parametrize("command", ["train", "sweep", "transfer-check", "coord-check"])
def test_a_tokenizer_that_fits_the_model_vocabulary_is_accepted(tmp_path, capsys, big_tokenizer, command):
    argv, witness = vocab_commands(tmp_path, big_tokenizer, 384)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert witness in err and "model.tokenizer" not in err, err


def test_a_dataset_with_ids_beyond_the_model_vocabulary_is_refused(tmp_path, big_tokenizer, text_file):
    from mutransfer.config import ConfigError
    from mutransfer.data.builtin import open_dataset
    from mutransfer.data.dataset import TokenDataset

    data = tmp_path / "data"
    assert main(["data", "prepare", str(text_file), "--tokenizer", str(big_tokenizer), "--out", str(data),
                 "--quiet", "--set", "val_fraction=0.2"]) == 0
    top = max(int(TokenDataset(data).tokens(split).max()) for split in ("train", "val"))
    assert 256 <= top < TOKENIZER_SIZE  # the text uses merged tokens past the byte range
    assert TokenDataset(data).max_token_id == top  # recorded when prepared
    with pytest.raises(ConfigError, match=rf"token ids up to {top}.*model.vocab_size = 256"):
        open_dataset(str(data), str(big_tokenizer), vocab_size=256)
    assert open_dataset(str(data), str(big_tokenizer), vocab_size=top + 1).max_token_id == top


# ---------------------------------------------------------------- model sizes

HUGE = 1_000_000_000  # width: a 2.5e9 x 1e9 FFN matrix, more bytes than int64 counts ("Storage size ... overflowed")
HUGE_FOR_A_MACHINE = 2**24  # width: 4 blocks of 3 x 2^24 x 2.5 * 2^24 = 8.4e15 fp32 bytes, no machine's memory


def size_commands(tmp_path: Path, width: int) -> dict[str, list[str]]:
    """Each command that builds a model, at ``width``."""
    return {
        "plan": ["plan", "tiny", "--set", f"model.width={width}"],
        "train": ["train", str(SMOKE), "--out", str(tmp_path / "t"), "--quiet", "--set", f"model.width={width}"],
        "sweep": ["sweep", str(SWEEP), "--out", str(tmp_path / "s"), "--quiet", "--set", f"model.width={width}"],
        "transfer-check": ["transfer-check", str(TRANSFER), "--out", str(tmp_path / "x"), *TRANSFER_SHORT,
                           "--set", f"transfer.values=[32, {width}]"],
        "coord-check": ["coord-check", "tiny", *COORD_SHORT[2:], "--widths", f"64,{width}",
                        "--out", str(tmp_path / "c")],
        "coord-check --spec": ["coord-check", "--spec", "examples.nanogpt:spec", *COORD_SHORT[2:],
                               "--widths", f"64,{width}", "--out", str(tmp_path / "c")],
    }


@pytest.mark.parametrize("command", ["plan", "train", "sweep", "transfer-check", "coord-check",
                                     "coord-check --spec"])
def test_a_model_too_large_for_any_tensor_is_refused_naming_the_width(tmp_path, capsys, command):
    assert main(size_commands(tmp_path, HUGE)[command]) == 2
    err = capsys.readouterr().err
    assert f"d_model = {HUGE}" in err and "int64" in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())  # nothing written, nothing run


@pytest.mark.parametrize("command", ["train", "sweep", "transfer-check", "coord-check", "coord-check --spec"])
def test_a_model_too_large_for_this_machine_is_refused_before_compute(tmp_path, capsys, command):
    assert main(size_commands(tmp_path, HUGE_FOR_A_MACHINE)[command]) == 2
    err = capsys.readouterr().err
    assert f"d_model = {HUGE_FOR_A_MACHINE}" in err and "memory" in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


def test_plan_shows_a_model_larger_than_this_machine(capsys):
    """Planning is not building: a model larger than this machine's memory is planned (the 1.3B
    target is planned on a laptop), only a shape no tensor can hold is refused."""
    assert main(["plan", "tiny", "--set", f"model.width={HUGE_FOR_A_MACHINE}", "--json"]) == 0
    assert '"params_total"' in capsys.readouterr().out


def test_parameter_counts_match_the_built_models():
    """The analytic count the size checks use is the count of the parameters torch builds."""
    from mutransfer.config import RunShape, updated
    from mutransfer.model_size import parameter_count
    from mutransfer.plan import count_params
    from mutransfer.presets import PRESETS

    for name, shape in PRESETS.items():
        assert parameter_count(shape) == count_params(shape)["params_total"], name
    tiny = PRESETS["tiny"]
    wide = RunShape(model=updated(tiny.model, "t", vocab_size=1000, max_seq_len=64), param=tiny.param)
    assert parameter_count(wide) == count_params(wide)["params_total"]


@pytest.mark.parametrize("argv", [["train", str(SMOKE), "--quiet", "--set", "model.depth=100000000"],
                                  ["coord-check", "tiny", *COORD_SHORT[2:], "--depths", "4,100000000"],
                                  ["coord-check", "--spec", "examples.nanogpt:spec", *COORD_SHORT[2:],
                                   "--depths", "4,100000000"]], ids=["train", "coord-check", "coord-check --spec"])
def test_a_depth_too_large_for_this_machine_is_refused(tmp_path, capsys, argv):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.n_layers = 100000000" in err and "memory" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- a full disk during a checkpoint save

# The smoke run's five stages in 11 steps, a checkpoint every 2 (as in test_faults.py): seconds on CPU.
SHORT = ["--set", "stages.warmup.steps=2", "--set", "stages.stable1.steps=2", "--set", "stages.stable2.steps=2",
         "--set", "stages.decay.steps=3", "--set", "stages.long_context.phases.0.steps=1",
         "--set", "stages.long_context.phases.1.steps=1", "--set", "checkpoint.every=2",
         "--set", "train.eval_every=4"]


def train(out: Path, env: dict | None = None):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "mutransfer.cli", "train", str(SMOKE), "--out", str(out), "--quiet", *SHORT]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=600)


def fill_the_disk_at_the_second_save(out: Path):
    """Train until the second save (step 4), whose data file the kernel refuses: ENOSPC inside the
    checkpoint writer (torch.distributed.checkpoint), as on a full disk."""
    from full_scale.checkpoint import FAILPOINT_ENV

    return train(out, env={FAILPOINT_ENV: "enospc@2"})


def test_a_full_disk_during_a_save_is_named_and_the_previous_checkpoint_resumes(tmp_path):
    from full_scale.checkpoint import NO_SPACE_EXIT, list_checkpoints, verify
    from mutransfer.rundir import read_jsonl

    out = tmp_path / "run"
    full = fill_the_disk_at_the_second_save(out)
    assert full.returncode == NO_SPACE_EXIT, full.stderr[-3000:]
    err = full.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "no space left on device" in err and str(out / "checkpoints" / "step_00000004") in err
    assert "step_00000002" in err  # the checkpoint a rerun resumes from
    # the partial save is gone; the previous checkpoint is whole
    assert [step for step, _ in list_checkpoints(out)] == [2]
    assert verify(out / "checkpoints" / "step_00000002") is None
    assert not list((out / "checkpoints").glob(".tmp-*"))
    resumed = train(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e["checkpoint"] for e in read_jsonl(out / "events.jsonl") if e["event"] == "resume"][-1].endswith(
        "step_00000002")
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(11))


@pytest.mark.slow
def test_a_run_resumed_after_a_full_disk_is_bit_exact(tmp_path):
    from mutransfer.rundir import read_jsonl

    reference, out = tmp_path / "reference", tmp_path / "run"
    assert train(reference).returncode == 0
    assert fill_the_disk_at_the_second_save(out).returncode != 0
    assert train(out).returncode == 0
    assert [r["loss"] for r in read_jsonl(out / "metrics.jsonl")] == \
        [r["loss"] for r in read_jsonl(reference / "metrics.jsonl")]


def test_what_counts_as_a_full_disk():
    """ENOSPC (or a quota's EDQUOT) anywhere in the error, also wrapped by the checkpoint writer;
    torch's own file writer reports a full disk without an errno ('unexpected pos ...'), so a write
    error with almost no space left counts too; anything else is not called a full disk."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from full_scale.checkpoint import no_space_reason

    plenty, none = 10 * 2**30, 0
    full = OSError(errno.ENOSPC, "No space left on device", "x/__0_0.distcp")
    wrapped = CheckpointException("write_data", {0: _wrap_exception(full)})
    assert "No space left on device" in no_space_reason(wrapped, plenty)
    assert no_space_reason(OSError(errno.EDQUOT, "Disk quota exceeded"), plenty)
    try:
        try:
            raise full
        except OSError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as chained:
        assert no_space_reason(chained, plenty)
    torn = CheckpointException("write_data", {0: _wrap_exception(RuntimeError("unexpected pos 704 vs 598"))})
    assert "unexpected pos 704 vs 598" in no_space_reason(torn, none)
    assert no_space_reason(torn, plenty) is None
    assert no_space_reason(OSError(errno.EACCES, "Permission denied"), plenty) is None
    assert no_space_reason(KeyboardInterrupt(), none) is None
