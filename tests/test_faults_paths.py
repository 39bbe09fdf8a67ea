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
