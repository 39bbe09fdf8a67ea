"""transfer-check on a reduced grid (seconds), the parabola fit, and the file's validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mutransfer.cli import main
from mutransfer.config import ConfigError
from proxy_sweeps.transfer import load_transfer_spec, read_runs

ROOT = Path(__file__).resolve().parent.parent

REDUCED = """
[transfer]
axis = "width"
values = {widths}
parametrizations = ["mup", "sp"]
lr_log2_low = -9
lr_log2_high = 3
lr_log2_step = 2
seeds = 1
[model]
preset = "tiny"
[train]
steps = 16
batch_size = 4
seq_len = 32
warmup = 2
eval_every = 8
eval_batches = 1
eval_batch_size = 4
"""


def test_shipped_transfer_files_parse():
    tiny = load_transfer_spec(ROOT / "proxy_sweeps" / "lr_transfer_tiny.toml")
    assert tiny.settings.values[-1] / tiny.settings.values[0] >= 8
    assert set(tiny.settings.parametrizations) == {"mup", "sp"}
    proxy = load_transfer_spec(ROOT / "proxy_sweeps" / "lr_transfer_proxy.toml")
    assert proxy.settings.values[-1] / proxy.settings.values[0] >= 8
    shipped = {p.stem: load_transfer_spec(p) for p in (ROOT / "proxy_sweeps").glob("*.toml")
               if "[transfer]" in p.read_text()}
    axes = {name: (s.settings.axis, s.settings.tune) for name, s in shipped.items()}
    assert {("width", "lr"), ("depth", "lr"), ("steps", "lr"), ("batch_size", "lr"),
            ("steps", "weight_decay")} <= set(axes.values()), axes
    # a Power Lines check (widths) spans its law's axis, tokens per parameter: tests/test_wd_law.py checks it
    assert all(s.settings.values[-1] / s.settings.values[0] >= 8 for s in shipped.values() if not s.settings.widths)


def test_the_progress_line_names_the_best_run_of_a_finished_chain():
    from proxy_sweeps.transfer import _best_of_chain

    chain = [{"status": "ok", "lr_log2": -7.0, "loss": 2.31}, {"status": "ok", "lr_log2": -6.0, "loss": 2.2049},
             {"status": "diverged", "lr_log2": -2.0, "loss": float("nan")}]
    assert _best_of_chain(chain, "lr_log2") == ": best lr_log2 -6 (loss 2.2049)"
    assert _best_of_chain(chain[2:], "lr_log2") == ": no run finished ok"


@pytest.mark.slow
def test_reduced_transfer_check_writes_verdict_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("proxy_sweeps.transfer.PROGRESS_EVERY_S", 0.05)  # a line even while no run finishes
    path = tmp_path / "t.toml"
    path.write_text(REDUCED.format(widths="[16, 32]"))
    out = tmp_path / "out"
    rc = main(["transfer-check", str(path), "--out", str(out), "--workers", "2"])
    assert rc == 1  # a 2x span cannot pass the 8x-span goal; everything else must be there
    runs = read_runs(out)
    assert len(runs) == 2 * 2 * 7 and {r["status"] for r in runs} <= {"ok", "diverged"}
    assert any(r["status"] == "diverged" for r in runs)  # lr 2^3 diverges, and is recorded as such
    verdict = json.loads((out / "verdict.json").read_text())
    for p in ("mup", "sp"):
        info = verdict["variants"][p]
        assert set(info["values"]) == {"16", "32"}
        assert all(o["lr_log2"] is not None for o in info["values"].values())
        assert info["drift"]["estimate"] is not None
    assert verdict["outcome"] == "fail" and any("span" in r for r in verdict["reasons"])
    assert (out / "transfer.png").stat().st_size > 0
    err = capsys.readouterr().err
    assert "verdict:" in err and "runs (2 running)" in err
    assert re.search(r"; finished (mup|sp) width (16|32) seed \d: best lr_log2 -?[\d.]+ \(loss \d\.\d{4}\)", err)
    # Re-running continues: nothing is trained again.
    assert main(["transfer-check", str(path), "--out", str(out), "--quiet"]) == 1
    assert len(read_runs(out)) == len(runs)


@pytest.mark.parametrize("widths, field", [("[16, 40]", "width = 40 is not divisible"), ("[16]", "transfer: values"),
                                           ("[32, 16]", "ascending"), ("[16, 32, 64, 128, 256, 512, 1000]", "1000")])
def test_bad_transfer_file_names_the_field(tmp_path, widths, field):
    path = tmp_path / "t.toml"
    path.write_text(REDUCED.format(widths=widths))
    with pytest.raises(ConfigError, match=field):
        load_transfer_spec(path)
    assert main(["transfer-check", str(path), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


AXIS_GRIDS = {  # [transfer] lines per axis: a real grid small enough for seconds
    "depth": ('axis = "depth"\nvalues = [1, 2]\nparametrizations = ["mup", "sp"]\ndepth_alphas = [0.5, 1.0]\n'
              'min_span = 2.0',
              lambda r: r["depth"] == r["value"] and r["width"] == 64),
    "steps": ('axis = "steps"\nvalues = [8, 16, 32]\nparametrizations = ["mup"]\nwarmup_fraction = 0.25\n'
              'decay_fraction = 0.25', lambda r: r["steps"] == r["value"]),
    "batch_size": ('axis = "batch_size"\nvalues = [4, 8, 16]\ntokens = 4096\nparametrizations = ["mup"]',
                   lambda r: r["batch_size"] == r["value"] and r["steps"] == 4096 // (r["value"] * 32)),
}


@pytest.mark.slow
@pytest.mark.parametrize("axis", list(AXIS_GRIDS))
def test_reduced_grid_trains_every_axis(tmp_path, axis):
    """Every axis trains for real: the model, the horizon or the batch (accumulated in micro-batches
    of 4) that the axis value says, and a verdict file (one seed: inconclusive, exit 3)."""
    head, right_run = AXIS_GRIDS[axis]
    text = REDUCED.replace('axis = "width"\nvalues = {widths}\nparametrizations = ["mup", "sp"]', head)
    text = text.replace("lr_log2_low = -9", "lr_log2_low = -11").replace("lr_log2_step = 2", "lr_log2_step = 7")
    if axis == "batch_size":
        text = text.replace("\nbatch_size = 4\n", "\nbatch_size = 4\nmicro_batch_size = 4\n")
    path = tmp_path / "t.toml"
    path.write_text(text)
    out = tmp_path / "out"
    assert main(["transfer-check", str(path), "--out", str(out), "--workers", "2", "--quiet"]) == 3
    spec = load_transfer_spec(path)
    runs = read_runs(out)
    assert len(runs) == len(spec.variants) * len(spec.settings.values) * 3
    trained = [r for r in runs if r["status"] == "ok"]
    assert trained and all(right_run(r) for r in trained)
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["axis"] == axis and verdict["outcome"] == "inconclusive"
    assert (out / "transfer.png").stat().st_size > 0


@pytest.mark.slow
def test_a_weight_decay_grid_trains_at_the_fixed_lr_and_resumes(tmp_path):
    path = tmp_path / "wd.toml"
    path.write_text(REDUCED.format(widths="[8, 16, 32]").replace('axis = "width"', 'axis = "steps"')
                    .replace('parametrizations = ["mup", "sp"]',
                             'parametrizations = ["mup"]\ntune = "weight_decay"\nwd_log2_low = -2\n'
                             'wd_log2_high = 4\nwd_log2_step = 3\nwarmup_fraction = 0.25\nbootstrap = 0')
                    + "[hparams]\nlr = 0.01\n")
    out = tmp_path / "out"
    assert main(["transfer-check", str(path), "--out", str(out), "--quiet"]) in (0, 1, 3)
    runs = read_runs(out)
    assert len(runs) == 3 * 3 and {r["status"] for r in runs} == {"ok"}
    assert {r["lr"] for r in runs} == {0.01} and {r["weight_decay"] for r in runs} == {0.25, 2.0, 16.0}
    assert sorted({r["steps"] for r in runs}) == [8, 16, 32]
    at_32 = sorted((r["weight_decay"], r["loss"]) for r in runs if r["value"] == 32)
    assert at_32[-1][1] > at_32[0][1] + 0.01  # lambda eta = 0.16 per step is felt: the decay is applied
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["tune"] == "weight_decay" and "timescale" in verdict["law"]
    assert main(["transfer-check", str(path), "--out", str(out), "--quiet"]) in (0, 1, 3)
    assert len(read_runs(out)) == len(runs)  # a rerun trains nothing again
