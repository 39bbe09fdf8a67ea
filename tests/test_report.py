"""``mutransfer report`` end to end: real tiny runs of every kind, the report on a moved copy of
them, and the page loaded in a real headless browser (Debian's chromium).

The runs are the real commands with tiny budgets (a 2-width coordinate check with its SP control,
a 4-trial sweep and its freeze, a 2-width transfer check with 2 seeds, the smoke training run),
started side by side so the fixture costs about as long as the slowest of them. A batch-size
transfer check (the axis with a fitted law and a critical batch) is the real command judging a
runs.jsonl written here: it finds every run done and trains nothing.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from analysis.report import SECTIONS, write_report
from analysis.report_hparams import content_hash
from analysis.training import read_events, read_metrics, stage_spans, switch_step
from mutransfer.cli import main
from mutransfer.lockfile import content_hash as lockfile_content_hash

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SECTION_IDS = [sid for sid, _ in SECTIONS]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

SWEEP_TOML = """
[sweep]
name = "report-test"
trials = 4

[model]
preset = "tiny"

[data]
spec = "builtin"

[train]
steps = 8
batch_size = 4
seq_len = 32
warmup = 2
eval_every = 4
eval_batches = 1
eval_batch_size = 4

[objective]
last_evals = 1
seeds = 1

[sampler]
kind = "random"
seed = 0

[pruner]
kind = "none"

[search.lr]
low = 1e-3
high = 1e-1
log = true

[search.init_std]
low = 0.02
high = 0.5
log = true
"""

TRANSFER_TOML = """
[transfer]
axis = "width"
values = [32, 64]
parametrizations = ["mup", "sp"]
lr_log2_low = -8
lr_log2_high = -4
lr_log2_step = 2.0
seeds = 2
last_evals = 1

[model]
preset = "tiny"

[data]
spec = "builtin"

[train]
steps = 4
batch_size = 4
seq_len = 32
warmup = 1
eval_every = 2
eval_batches = 1
eval_batch_size = 4
"""


BATCH_TOML = """
[transfer]
axis = "batch_size"
values = [8, 16, 32, 64]
tokens = 8192
parametrizations = ["mup"]
lr_log2_low = -10
lr_log2_high = -2
seeds = 3
warmup_fraction = 0.1

[model]
preset = "tiny"

[data]
spec = "builtin"

[train]
batch_size = 8
seq_len = 32
eval_batches = 2
"""


def write_batch_runs(out: Path) -> None:
    """Every run of BATCH_TOML, as transfer-check records them: a parabola in log2 LR whose vertex
    rises half an octave per batch doubling up to 32 and then stops (64 is past the critical batch),
    plus seed and evaluation-batch noise."""
    rng = random.Random(0)
    out.mkdir()
    with (out / "runs.jsonl").open("w") as f:
        for value in (8, 16, 32, 64):
            best = -7 + 0.5 * math.log2(min(value, 32) / 8)
            for seed in range(3):
                offset = rng.gauss(0, 0.01)
                for lr_log2 in range(-10, -1):
                    val = [3 + 0.05 * (lr_log2 - best) ** 2 + offset + rng.gauss(0, 0.003) for _ in range(2)]
                    f.write(json.dumps({"variant": "mup", "parametrization": "mup", "axis": "batch_size",
                                        "value": value, "lr_log2": float(lr_log2), "lr": 2.0**lr_log2, "seed": seed,
                                        "status": "ok", "loss": sum(val) / len(val), "val_batches": val}) + "\n")


def _mutransfer(*args: str) -> list[str]:
    return [sys.executable, "-m", "mutransfer.cli", *args]


def _start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _finish(name: str, proc: subprocess.Popen, log: Path, ok: tuple[int, ...] = (0,)) -> None:
    proc.wait(timeout=300)
    assert proc.returncode in ok, f"{name} exited {proc.returncode}:\n{log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One run directory of every kind, built by the real commands and then moved (as a copy from
    another machine would arrive): nothing may point back at where they were made."""
    build = tmp_path_factory.mktemp("build")
    (build / "sweep.toml").write_text(textwrap.dedent(SWEEP_TOML))
    (build / "transfer.toml").write_text(textwrap.dedent(TRANSFER_TOML))
    (build / "batch.toml").write_text(textwrap.dedent(BATCH_TOML))
    write_batch_runs(build / "batch")
    jobs = {
        # a check that fails (SP) is exit status 1; at 2 widths and 2 steps muP may fail too
        "coord": (_mutransfer("coord-check", "tiny", "--widths", "64,128", "--steps", "2", "--seeds", "1",
                              "--compare", "sp", "--threads", "1", "--out", "coord"), (0, 1)),
        "sweep": (_mutransfer("sweep", "sweep.toml", "--out", "sweep", "--quiet"), (0,)),
        # a 2x width span fails the transfer verdict's 8x minimum: exit status 1
        # (2 workers: one thread each, which oversubscribes a busy 2-core machine less than one with two)
        "transfer": (_mutransfer("transfer-check", "transfer.toml", "--out", "transfer", "--quiet", "--workers", "2"),
                     (1,)),
        # the law fitted below 64 misses the optimum at 64 by half an octave: exit status 1
        "batch": (_mutransfer("transfer-check", "batch.toml", "--out", "batch", "--quiet"), (1,)),
        # a peak FLOP/s for the CPU so that MFU is logged and drawn
        "train": (_mutransfer("train", str(ROOT / "full_scale" / "smoke.toml"), "--out", "train", "--quiet",
                              "--set", "metrics.peak_flops=1e11"), (0,)),
    }
    procs = {name: (_start(cmd, build, build / f"{name}.log"), ok) for name, (cmd, ok) in jobs.items()}
    _finish("sweep", procs["sweep"][0], build / "sweep.log")
    freeze = _start(_mutransfer("freeze", "sweep", "--out", "sweep/hparams.lock.json"), build, build / "freeze.log")
    _finish("freeze", freeze, build / "freeze.log")
    for name, (proc, ok) in procs.items():
        _finish(name, proc, build / f"{name}.log", ok)
    moved = tmp_path_factory.mktemp("elsewhere") / "runs"
    moved.mkdir()
    for name in jobs:
        shutil.move(str(build / name), str(moved / name))
    shutil.rmtree(build)
    return moved


class Page(HTMLParser):
    """Section ids, the images (with their attributes) in each section, and the body's attributes."""

    def __init__(self):
        super().__init__()
        self.sections: dict[str, list[dict]] = {}
        self.section_text: dict[str, str] = {}
        self.current: str | None = None
        self.body: dict = {}
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.current = a.get("id")
            self.sections[self.current] = []
            self.section_text[self.current] = ""
        elif tag == "img":
            self.sections.setdefault(self.current, []).append(a)
        elif tag == "body":
            self.body = a
        for key in ("src", "href"):
            value = a.get(key) or ""
            if tag == "link" or value.startswith(("http:", "https:", "//", "file:")):
                self.external.append(f"<{tag} {key}={value[:80]}>")

    def handle_endtag(self, tag):
        if tag == "section":
            self.current = None

    def handle_data(self, data):
        if self.current:
            self.section_text[self.current] += data


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def decode_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    data = base64.b64decode(src[len(prefix):], validate=True)
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.format == "PNG" and im.width > 100 and im.height > 100
    return im


@pytest.fixture(scope="module")
def report(runs) -> Path:
    """The real command, run from the moved copy with relative paths."""
    out = subprocess.run(_mutransfer("report", "coord", "sweep", "sweep/hparams.lock.json", "transfer", "batch",
                                     "train", "--out", "out/report.html"),
                         cwd=runs, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return runs / "out" / "report.html"


def test_report_writes_html_and_markdown_with_every_section_and_image(report):
    html_text = report.read_text()
    page = parse(html_text)
    assert list(page.sections) == SECTION_IDS
    assert page.external == []  # self-contained: nothing fetched
    images = [img for imgs in page.sections.values() for img in imgs]
    # coord.png, two transfer.png, three sweep plots, the training figure
    assert len(images) == 7
    for img in images:
        decode_png(img["src"])
    for sid in ("coord-check", "transfer-check", "sweep", "training"):
        assert page.sections[sid], f"no image in section {sid}"
        assert "among the inputs" not in page.section_text[sid]
    text = page.section_text
    assert "FAIL" in text["coord-check"] and "dWx.output" in text["coord-check"]  # the SP control fails
    transfer = text["transfer-check"]
    # each optimum with its interval (2 seeds), drift and shift with theirs; the 2x span fails the 8x minimum
    assert re.search(r"2\^-\d+\.\d\d \[-\d+\.\d\d, -\d+\.\d\d\]", transfer), transfer
    assert "drift (octaves)" in transfer and "shift (octaves)" in transfer and "sp (control)" in transfer
    assert re.search(r"\+\d+\.\d\d \[[+-]\d+\.\d\d, \+\d+\.\d\d\]", transfer)  # a shift, in octaves
    assert "Transfer verdict (width): FAIL" in transfer and "below the 8x" in transfer
    # the batch axis: the law, its prediction and residual, the naive rule and the critical batch
    assert "Transfer verdict (batch_size): FAIL" in transfer
    for row in ("beta (log2 LR* = a - beta log2 batch_size)", "predicted optimum at batch_size 64",
                "residual, measured - predicted", "error of keeping the proxy's LR (batch_size 8) at 64",
                "Critical batch: the law fitted below 64 fails to predict 64",
                "law shape (the check's: straight)", "Recommended law shape:"):
        assert row in transfer, row
    assert "importance" in text["sweep"] and "Best: trial" in text["sweep"]
    assert "matches the contents" in text["frozen-hparams"] and "trial_number" in text["frozen-hparams"]
    assert "AdamW -> Muon at step 32" in text["training"]
    for stage in ("warmup", "stable1", "stable2", "decay", "long_context"):
        assert stage in text["training"]
    assert 'class="note"' not in html_text  # every file of every run was readable

    md = report.with_suffix(".md")
    md_text = md.read_text()
    for sid in SECTION_IDS:
        assert f'<a id="{sid}"></a>' in md_text
    links = [line.split("](", 1)[1].rstrip(")") for line in md_text.splitlines() if line.startswith("![")]
    assert len(links) == len(images)
    for link in links:
        assert not Path(link).is_absolute() and link.startswith("report_files/")
        with Image.open(md.parent / link) as im:
            assert im.format == "PNG"


def test_training_metrics_read_back(runs):
    df = read_metrics(runs / "train")
    spans = stage_spans(df)
    assert [s["stage"] for s in spans] == ["warmup", "stable1", "stable2", "decay", "long_context"]
    decay = spans[3]
    assert switch_step(df, read_events(runs / "train")) == decay["first_step"]
    assert switch_step(df, []) == decay["first_step"]  # from the rows alone too
    assert spans[2]["optimizer"] == ["adamw"] and decay["optimizer"] == ["muon"]
    assert df["mfu"].notna().all()
    assert any(c.startswith("lr/muon/") for c in df.columns) and any(c.startswith("lr/adamw/") for c in df.columns)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = find_chromium()
    if browser is None:
        if os.environ.get("MUTRANSFER_REQUIRE_CHROMIUM"):
            pytest.fail("MUTRANSFER_REQUIRE_CHROMIUM is set but no chromium is on PATH "
                        "(apt-get install -y chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium); set MUTRANSFER_REQUIRE_CHROMIUM=1 "
                    "to make this a failure")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
           "--dump-dom", report.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    page = parse(out.stdout)
    assert list(page.sections) == SECTION_IDS, out.stderr[-3000:]
    images = [img for imgs in page.sections.values() for img in imgs]
    assert len(images) == int(page.body["data-images"]) == 7
    # set by each image's onload handler from naturalWidth, and by the page's load handler
    assert [img.get("data-loaded") for img in images] == ["yes"] * len(images)
    assert page.body.get("data-images-loaded") == f"{len(images)}/{len(images)}"


def _corrupt_copy(runs: Path, dest: Path) -> Path:
    shutil.copytree(runs, dest, ignore=shutil.ignore_patterns("checkpoints", "out", "optuna-journal.log*"))
    (dest / "coord" / "verdict.json").write_text("{broken")
    png = dest / "coord" / "coord.png"
    png.write_bytes(png.read_bytes()[:300])  # a truncated image
    (dest / "sweep" / "trials.parquet").unlink()
    (dest / "sweep" / "importances.json").write_text("garbage")
    (dest / "transfer" / "verdict.json").write_text("[]")
    (dest / "batch" / "verdict.json").write_text('{"widths": [32, 64], "parametrizations": {}, "pass": false}')
    (dest / "train" / "summary.json").unlink()
    with (dest / "train" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 999, "loss": ')  # a writer killed mid-line
    (dest / "bad.lock.json").write_text('{"format": ')
    return dest


def test_missing_and_corrupt_files_become_notes_in_their_sections(runs, tmp_path, monkeypatch):
    root = _corrupt_copy(runs, tmp_path / "copy")
    monkeypatch.chdir(root)
    result = write_report(["coord", "sweep", "transfer", "batch", "train", "bad.lock.json"], "r.html")
    page = parse(Path("r.html").read_text())
    assert list(page.sections) == SECTION_IDS
    text = page.section_text
    assert "coord: verdict.json is not readable JSON" in text["coord-check"]
    assert "coord: coord.png is not a readable PNG image" in text["coord-check"]
    assert "sweep: trials.parquet is missing" in text["sweep"]
    assert "sweep: importances.json is not readable JSON" in text["sweep"]
    assert "transfer: verdict.json does not hold a JSON object" in text["transfer-check"]
    assert "batch: verdict.json has no per-variant optima (written by an older" in text["transfer-check"]
    assert "train: no summary.json" in text["training"]
    assert "bad.lock.json: not readable JSON" in text["frozen-hparams"]
    assert len(result["notes"]) == 8
    images = [img for imgs in page.sections.values() for img in imgs]
    assert len(images) == 6  # everything but the truncated coord.png
    for img in images:
        decode_png(img["src"])
    assert Path("r.md").is_file()


def test_not_a_run_directory_is_exit_2_naming_the_path(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    stray = tmp_path / "notes.txt"
    stray.write_text("hello")
    out = tmp_path / "r.html"
    for bad in (empty, stray, tmp_path / "missing"):
        assert main(["report", str(runs / "train"), str(bad), "--out", str(out)]) == 2
        assert str(bad) in capsys.readouterr().err
        assert not out.exists() and not out.with_suffix(".md").exists()


def test_a_parent_directory_stands_for_its_run_directories(runs, tmp_path):
    result = write_report([str(runs)], tmp_path / "r.html")
    kinds = {Path(label).name: k for label, k in result["runs"]}
    assert kinds == {"coord": ["coord"], "sweep": ["sweep", "lock"], "transfer": ["transfer"], "batch": ["transfer"],
                     "train": ["training"]}


def test_set_changes_report_options_and_names_an_unknown_key(runs, tmp_path, capsys):
    lock = str(runs / "sweep" / "hparams.lock.json")
    out = tmp_path / "r.html"
    assert main(["report", lock, "--out", str(out), "--set", 'title="Frozen values"', "--set", "max_trial_rows=3"]) == 0
    assert "<title>Frozen values</title>" in out.read_text()
    assert out.with_suffix(".md").read_text().startswith("# Frozen values\n")
    capsys.readouterr()
    for bad, named in (("colour=red", "unknown report option 'colour'; allowed: title, max_trial_rows"),
                       ("max_trial_rows=many", "--set max_trial_rows=many: expected a positive whole number")):
        assert main(["report", lock, "--out", str(tmp_path / "x.html"), "--set", bad]) == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_lock_hash_is_checked_without_mutransfer(runs, tmp_path):
    obj = json.loads((runs / "sweep" / "hparams.lock.json").read_text())
    body = {k: v for k, v in obj.items() if k != "content_hash"}
    assert content_hash(body) == lockfile_content_hash(body) == obj["content_hash"]
    edited = tmp_path / "edited.lock.json"
    edited.write_text(json.dumps({**obj, "hparams": {**obj["hparams"], "lr": 1.0}}))
    write_report([str(edited)], tmp_path / "r.html")
    text = parse((tmp_path / "r.html").read_text()).section_text["frozen-hparams"]
    assert "DOES NOT match the contents" in text
