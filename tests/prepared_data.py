"""A byte-level data directory prepared from given text, for the tests that change data under a run."""

from pathlib import Path

from mutransfer.cli import main


def prepare_text(path: Path, text: str) -> None:
    src = path.with_suffix(".txt")
    src.write_text(text)
    assert main(["data", "prepare", str(src), "--tokenizer", "byte", "--out", str(path), "--quiet",
                 "--set", "val_fraction=0.1"]) == 0
