"""What the README's workflow promises across commands: a held-out split smaller than one evaluation
is a warning (at prepare and at run start); the sweep's study opens in optuna-dashboard; every command
writes environment.json; .gitignore covers the workflow's outputs; a stage's first step is timed like
the rest; long commands print progress at least every 10 s."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mutransfer.cli import main
from mutransfer.data.dataset import TokenDataset
from mutransfer.data.heldout import eval_draw

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "full_scale" / "smoke.toml"
# The smoke run cut to a handful of steps per stage (as in tests/test_faults.py).
SHORT = ["--set", "stages.warmup.steps=2", "--set", "stages.stable1.steps=2", "--set", "stages.stable2.steps=2",
         "--set", "stages.decay.steps=3", "--set", "stages.long_context.phases.0.steps=1",
         "--set", "stages.long_context.phases.1.steps=1", "--set", "checkpoint.every=2",
         "--set", "train.eval_every=4"]
WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()


def corpus(n_docs: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n\n".join(f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
                       for i in range(n_docs)) + "\n"


def prepare(tmp_path: Path, name: str, text: str, val_fraction: float, capsys) -> tuple[TokenDataset, str]:
    src = tmp_path / f"{name}.txt"
    src.write_text(text, encoding="utf-8")
    capsys.readouterr()
    assert main(["data", "prepare", str(src), "--tokenizer", "byte", "--out", str(tmp_path / name), "--quiet",
                 "--set", f"val_fraction={val_fraction}"]) == 0
    return TokenDataset(tmp_path / name), capsys.readouterr().err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smoke_train(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mutransfer.cli", "train", str(SMOKE), "--out", str(out), "--quiet", *SHORT, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ), timeout=600)


@pytest.fixture(scope="module")
def small_val(tmp_path_factory):
    """A byte dataset whose val split holds a few hundred tokens: fewer than any evaluation draws."""
    root = tmp_path_factory.mktemp("small")
    src = root / "small.txt"
    src.write_text(corpus(40), encoding="utf-8")
    assert main(["data", "prepare", str(src), "--tokenizer", "byte", "--out", str(root / "data"), "--quiet",
                 "--set", "val_fraction=0.1"]) == 0
    return TokenDataset(root / "data")


# ---------------------------------------------------------------- held-out split vs one evaluation


def test_eval_draw_counts_what_eval_batches_really_uses(small_val):
    val = small_val.num_tokens("val")
    for batches, batch_size, seq_len in [(4, 16, 128), (2, 8, 128), (1, 1, 64), (3, 2, 32)]:
        used = sum(x.numel() for x, _ in small_val.eval_batches("val", batch_size, seq_len, batches))
        assert eval_draw(val, batches, batch_size, seq_len) == (batches * batch_size * seq_len, used)
    # the numbers: 3,489 held-out tokens hold 27 windows of 128, one full batch of 16 is used
    assert eval_draw(3489, 4, 16, 128) == (8192, 2048)


def test_prepare_warns_when_val_is_smaller_than_one_default_evaluation(tmp_path, capsys):
    text = corpus(400)  # about 140 KB of bytes
    small, err = prepare(tmp_path, "small", text, 0.005, capsys)
    val = small.num_tokens("val")
    assert val < 8192
    assert "warning: the held-out (val) split has" in err and f"{val:,} tokens" in err
    assert "4 batches x 16 sequences x 128 tokens = 8,192" in err and "--val-fraction" in err

    large, err = prepare(tmp_path, "large", text, 0.2, capsys)
    assert large.num_tokens("val") > 8192
    assert "warning" not in err


@pytest.mark.slow
def test_run_start_warns_with_the_run_settings(tmp_path, small_val):
    """The warning branch (the other: test_smoke_run_on_the_builtin_corpus_does_not_warn)."""
    out = tmp_path / "run"
    result = smoke_train(out, "--set", f"data.val='{small_val.directory}'")
    assert result.returncode == 0, result.stderr
    val = small_val.num_tokens("val")
    # smoke.toml: eval_batches 2 x eval_batch_size 8 x eval_seq_len 128
    assert f"split has {val:,} tokens" in result.stderr and "2 batches x 8 sequences x 128 tokens = 2,048" \
        in result.stderr
    warnings = [e for e in read_jsonl(out / "events.jsonl") if e.get("event") == "warning"]
    assert len(warnings) == 1 and "2,048" in warnings[0]["message"]


def test_smoke_run_on_the_builtin_corpus_does_not_warn(smoke_run):
    assert "warning" not in smoke_run.stderr  # the built-in corpus's val split holds the evaluation
    assert not [e for e in read_jsonl(smoke_run.out / "events.jsonl") if e.get("event") == "warning"]


def test_sweep_start_warns_with_the_trial_settings(small_val, tmp_path, capsys):
    from proxy_sweeps.sweep import prepare

    quickstart = ROOT / "proxy_sweeps" / "quickstart.toml"
    prepare(quickstart, tmp_path / "small", overrides=[f"data.spec='{small_val.directory}'"])
    err = capsys.readouterr().err
    assert f"split has {small_val.num_tokens('val'):,} tokens" in err and "= 8,192" in err
    prepare(quickstart, tmp_path / "builtin")  # the built-in corpus: 5 % held out, enough
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------- the sweep's study in optuna-dashboard


def _get(app, path: str) -> dict:
    from wsgiref.util import setup_testing_defaults

    environ = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status == ["200 OK"], (path, status, body[:200])
    return json.loads(body)


def test_dashboard_serves_the_sweep_journal(tmp_path):
    """The README's `optuna-dashboard runs/NAME/optuna-journal.log`: the dashboard's WSGI app, given the
    journal the sweep writes (through the sweep's own storage opener), lists the study and its trials."""
    optuna = pytest.importorskip("optuna")
    dashboard = pytest.importorskip("optuna_dashboard", reason="the dashboard extra is not installed")
    from proxy_sweeps.storage import default_storage, journal_path, open_storage

    url = default_storage(tmp_path / "runs" / "demo")
    storage = open_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="demo-sweep", storage=storage)
    study.optimize(lambda t: (t.suggest_float("lr", 1e-3, 1e-1, log=True) - 0.01) ** 2, n_trials=2)
    assert journal_path(url).endswith("optuna-journal.log")

    # the storage object the sweep uses, and the file path as the command line gives it
    for source in (storage, journal_path(url)):
        app = dashboard.wsgi(source)
        summaries = _get(app, "/api/studies")["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["demo-sweep"]
        detail = _get(app, f"/api/studies/{summaries[0]['study_id']}")
        assert detail["name"] == "demo-sweep" and len(detail["trials"]) == 2
        assert sorted(t["values"][0] for t in detail["trials"]) == sorted(t.value for t in study.trials)


# ---------------------------------------------------------------- one environment file for every command


def test_train_writes_the_environment_file_every_command_writes(smoke_run):
    from mutransfer.rundir import ENVIRONMENT_FILE, ENVIRONMENT_SCHEMA, read_environment

    out = smoke_run.out
    assert ENVIRONMENT_FILE == "environment.json"
    assert (out / "environment.json").is_file() and not (out / "env.json").exists()
    env = read_environment(out)
    assert env["schema"] == ENVIRONMENT_SCHEMA and env["world_size"] == 1 and env["versions"]["torch"]


def test_environment_reader_accepts_the_old_name_and_prefers_the_new(tmp_path):
    from mutransfer.config import ConfigError
    from mutransfer.rundir import read_environment, write_json

    assert read_environment(tmp_path) is None
    write_json(tmp_path / "env.json", {"schema": "mutransfer.environment/1", "host": "old"})
    assert read_environment(tmp_path)["host"] == "old"  # a run directory made before the rename
    write_json(tmp_path / "environment.json", {"schema": "mutransfer.environment/1", "host": "new"})
    assert read_environment(tmp_path)["host"] == "new"
    (tmp_path / "environment.json").write_text("{torn")
    with pytest.raises(ConfigError, match="environment.json: not readable as JSON"):
        read_environment(tmp_path)


def test_no_command_writes_the_old_environment_file_name():
    """Every writer uses rundir.ENVIRONMENT_FILE (or its value); only the legacy reader names env.json."""
    writers = [p for p in ROOT.glob("*/**/*.py") if "tests" not in p.parts
               and ('"env.json"' in p.read_text(encoding="utf-8") or "'env.json'" in p.read_text(encoding="utf-8"))]
    assert [p.relative_to(ROOT).as_posix() for p in writers] == ["mutransfer/rundir.py"]


# ---------------------------------------------------------------- the workflow leaves the checkout clean


def workflow_outputs() -> list[str]:
    """Every `--out` of the README's Workflow table, with the report's Markdown twin and its images."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Workflow", 1)[1].split("\n## ", 1)[0]
    outputs = []
    for out in re.findall(r"--out ([^\s`\]]+)", section):
        outputs.append(out)
        if out.endswith(".html"):
            stem = out[: -len(".html")]
            outputs += [f"{stem}.md", f"{stem}_files/figure.png"]
    return outputs


def check_ignore(path: str) -> bool:
    """Whether .gitignore's patterns ignore ``path`` (--no-index: the patterns alone, tracked or not)."""
    result = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, capture_output=True)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def test_gitignore_covers_what_the_workflow_writes():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True)
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        pytest.skip("not a git checkout")
    outputs = workflow_outputs()
    assert {"data/mix", "hparams.lock.json", "report.html", "report.md", "runs/quickstart"} <= set(outputs)
    for out in outputs:
        assert check_ignore(out), out
        if "." not in out.rsplit("/", 1)[-1]:  # a directory: what the command writes inside it
            assert check_ignore(f"{out}/index.json"), out
    # the anchored patterns leave the package's own files alone
    for source in ("mutransfer/data/prepare.py", "mutransfer/data/corpus/tinyshakespeare.txt.gz",
                   "full_scale/smoke.hparams.lock.json", "analysis/report.py", "README.md"):
        assert not check_ignore(source), source


# ---------------------------------------------------------------- step timing at stage boundaries


class VirtualClock:
    """Time that moves only when the test says: each training step costs 1 s per 1,000 tokens it
    trains on, each evaluation, checkpoint and optimizer switch 100 s."""

    TOKENS_PER_S = 1000.0
    BOUNDARY_S = 100.0

    def __init__(self):
        self.now = 0.0
        self.boundaries: list[str] = []

    def charge(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke run (short stages), in this process, timed by a VirtualClock: its directory, the
    clock (with the boundary work it saw) and what the command wrote to stderr."""
    import full_scale.trainer as trainer

    clock = VirtualClock()
    real_step = trainer.train_step

    def timed_step(model, opt, micro, **kw):
        result = real_step(model, opt, micro, **kw)
        clock.charge(sum(x.numel() for x, _ in micro) / clock.TOKENS_PER_S)
        return result

    out, err = tmp_path_factory.mktemp("smoke") / "run", io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
        patch.setattr(trainer, "step_clock", lambda device: clock.now)
        patch.setattr(trainer, "train_step", timed_step)
        for name in ("_evaluate", "_save", "_switch"):
            real = getattr(trainer.Trainer, name)

            def boundary(self, *args, _real=real, _name=name, **kw):
                clock.boundaries.append(_name)
                clock.charge(clock.BOUNDARY_S)
                return _real(self, *args, **kw)

            patch.setattr(trainer.Trainer, name, boundary)
        code = main(["train", str(SMOKE), "--out", str(out), "--quiet", *SHORT])
    assert code == 0, err.getvalue()
    return SimpleNamespace(out=out, clock=clock, stderr=err.getvalue())


def test_stage_first_step_is_timed_like_the_rest_of_its_stage(smoke_run):
    """Eval, checkpoint and AdamW -> Muon switch at a stage boundary are charged to no step, and the
    timer is not reset by a stage change: with every step costing the same per token, tokens/s is the
    same at every step, so a stage's first step lies within its stage's [min, max] (here: equal to it).
    On the wall clock (CPU shared with other work) step times scatter by several x, which is why the
    timing itself is checked with a virtual clock and not with measured seconds."""
    clock = smoke_run.clock
    rows = read_jsonl(smoke_run.out / "metrics.jsonl")
    assert {"_evaluate", "_save", "_switch"} <= set(clock.boundaries)  # every kind of boundary work happened
    stages: dict[str, list[dict]] = {}
    for r in rows:
        stages.setdefault(r["stage"], []).append(r)
    assert list(stages) == ["warmup", "stable1", "stable2", "decay", "long_context"]
    for name, stage_rows in stages.items():
        first, rest = stage_rows[0], stage_rows[1:]
        assert first["step_time_s"] == pytest.approx(first["tokens_per_step"] / clock.TOKENS_PER_S, rel=1e-9)
        rates = [r["tokens_per_s"] for r in rest]
        # rel 1e-9: the rates are equal up to float rounding of tokens / seconds
        assert min(rates) * (1 - 1e-9) <= first["tokens_per_s"] <= max(rates) * (1 + 1e-9), name
        assert first["tokens_per_s"] == pytest.approx(clock.TOKENS_PER_S, rel=1e-9)


class FakeClock:
    def __init__(self, now: float = 0.0, step: float = 0.0):
        self.now, self.step = now, step

    def __call__(self) -> float:
        self.now += self.step  # step > 0: time passes at every reading
        return self.now


def test_sweep_status_line_has_a_heartbeat_without_a_tty(capsys):
    from proxy_sweeps.sweep import Progress

    clock = FakeClock()
    progress = Progress(interval=10.0, clock=clock)
    assert not progress.tty  # pytest captures stderr: the log-file case
    shown = []
    for now, line in [(0, "[0m00s] 0/4 done: 1 running"), (5, "[0m05s] 0/4 done: 1 running"),
                      (9.9, "[0m09s] 0/4 done: 1 running"), (10, "[0m10s] 0/4 done: 1 running"),
                      (12, "[0m12s] 1/4 done: 1 running"), (15, "[0m15s] 1/4 done: 1 running"),
                      (22, "[0m22s] 1/4 done: 1 running")]:
        clock.now = now
        progress.show(line)
        shown += [x for x in capsys.readouterr().err.splitlines() if x]
    # printed: the first line, the heartbeat 10 s after it, the change at 12 s, the heartbeat at 22 s
    assert shown == ["[0m00s] 0/4 done: 1 running", "[0m10s] 0/4 done: 1 running", "[0m12s] 1/4 done: 1 running",
                     "[0m22s] 1/4 done: 1 running"]
    quiet = Progress(quiet=True, interval=0.0, clock=clock)
    quiet.show("[0m30s] 1/4 done")
    assert capsys.readouterr().err == ""


def test_coordinate_check_reports_steps_inside_a_run():
    from mutransfer.coord import InRunProgress, run_coord_check
    from mutransfer.coord_config import CoordConfig

    lines: list[str] = []
    clock = FakeClock()
    ticker = InRunProgress(lines.append, steps=10, interval=10.0, clock=clock)
    ticker.start_run("0/2 runs; run 1 (width 1024)")
    clock.now = 9.0
    ticker.step(0, 5.5)
    assert lines == []  # 9 s since the start: not yet
    clock.now = 10.0
    ticker.step(1, 5.4)
    assert lines == ["0/2 runs; run 1 (width 1024): 2/10 steps, 10s in"]
    clock.now = 15.0
    ticker.tick()  # what the thread does during a long step: 5 s since the last line
    clock.now = 20.5
    ticker.tick()
    assert lines[-1] == "0/2 runs; run 1 (width 1024): 2/10 steps, 20s in" and len(lines) == 2
    ticker.line("1/2 runs: width 1024: loss 5.5 -> 4.0")
    clock.now = 99.0
    ticker.tick()  # between runs nothing is running: no step line
    assert len(lines) == 3

    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from more, and a shared CPU thrashes
    try:
        cfg = CoordConfig(widths=[32, 64], steps=2, seeds=1, batch_size=1, seq_len=16)
        every_step: list[str] = []  # the clock moves 100 s per reading: every step is past the interval
        run_coord_check(cfg, progress=every_step.append, progress_interval=10.0, clock=FakeClock(step=100.0))
        runs_only: list[str] = []
        run_coord_check(cfg, progress=runs_only.append, progress_interval=1e9, clock=FakeClock())
    finally:
        torch.set_num_threads(threads)
    for index, width in ((1, 32), (2, 64)):
        for k in (1, 2):
            assert any(line.startswith(f"{index - 1}/2 runs; run {index} (mup adamw fp32 width {width} ")
                       and f": {k}/2 steps" in line for line in every_step), (index, k, every_step)
    assert [line.split(":")[0] for line in runs_only] == ["1/2 runs", "2/2 runs"]
