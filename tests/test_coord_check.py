"""``mutransfer coord-check``: μP passes (AdamW, Muon, FP8), SP fails naming the output logits, bad
input exits 2 before compute, the files are written, and the recorder agrees with microsoft mup.

Small grids keep this file fast: widths 64..512 (Muon: 64..256, its Newton-Schulz steps dominate
on CPU), 4 steps, 2 seeds, one CPU thread (two processes fighting over two cores are slower than one).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from mutransfer.build import build_model
from mutransfer.cli import main
from mutransfer.config import HParams
from mutransfer.coord import record_training
from mutransfer.coord_config import CoordConfig
from mutransfer.coord_verdict import fit_slope, slope_passes
from mutransfer.data.builtin import builtin_dataset
from mutransfer.transformer_spec import transformer_spec

SMALL = ["--widths", "64,128,256,512", "--steps", "4", "--seeds", "2", "--threads", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_cache(tmp_path_factory):
    """Prepare the built-in corpus once into a temporary cache; restore torch's thread count after."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MUTRANSFER_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    torch.set_num_threads(threads)


def coord_check(out, *args) -> tuple[int, dict]:
    rc = main(["coord-check", "tiny", "--out", str(out), *args])
    verdict = json.loads((out / "verdict.json").read_text()) if (out / "verdict.json").exists() else {}
    return rc, verdict


@pytest.mark.slow
def test_sp_fails_naming_the_output_logits_mup_passes_and_files_are_written(tmp_path):
    """One run, both parametrizations: --param sp exits 1 and names the growing output logits;
    its mup control (--compare) passes; every output file is written."""
    rc, v = coord_check(tmp_path, *SMALL, "--param", "sp", "--compare", "mup")
    assert rc == 1
    assert v["param"] == "sp" and not v["passed"] and "output_logits" in v["growing_modules"]
    assert min(v["modules"]["output_logits"]["slopes"].values()) > 0.3  # grows at every step
    assert v["modules"]["output_logits"]["per_block_slopes"].keys() == {"output"}
    mup = v["compare"]["mup"]
    assert mup["passed"] and not mup["failing_modules"], v["summary"]
    for name in ("coord.parquet", "verdict.json", "coord.png", "config.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    df = pd.read_parquet(tmp_path / "coord.parquet")
    assert set(df["param"]) == {"mup", "sp"} and set(df["statistic"]) >= {"l1", "rms"}
    assert sorted(df["width"].unique()) == [64, 128, 256, 512] and sorted(df["step"].unique()) == [0, 1, 2, 3]
    # per block: attention, MLP, residual, attention logits and 7 dW x; plus embedding, output, output dW x
    mup_l1 = df[(df["param"] == "mup") & (df["statistic"] == "l1") & (df["kind"] != "loss")]
    assert mup_l1.groupby(["width", "seed", "step"]).size().unique().tolist() == [4 * (4 + 7) + 3]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["widths"] == [64, 128, 256, 512] and config["compare"] == "mup" and config["lr"] == 0.01
    assert "--compare mup" in config["command"]


@pytest.mark.slow
def test_mup_muon_passes_and_the_recipes_muon_rule_shrinks_updates(tmp_path):
    """Muon with eta/sqrt(m) keeps dW x flat; the recipe's eta/m (xmodel) makes it shrink ~ 1/sqrt(width)."""
    rc, v = coord_check(tmp_path, "--widths", "64,128,256", "--steps", "4", "--seeds", "2", "--threads", "1",
                        "--optimizer", "muon", "--compare", "xmodel")
    assert rc == 0, v.get("summary")
    xm = v["compare"]["xmodel"]
    assert not xm["passed"]
    for kind in ("dWx.attn_qkv", "dWx.ffn_in", "dWx.ffn_out"):
        shrinking = list(xm["modules"][kind]["slopes"].values())
        assert max(shrinking) < -0.3, (kind, shrinking)
        assert kind in xm["shrinking_modules"]
        flat = list(v["modules"][kind]["slopes"].values())
        assert max(abs(s) for s in flat) < 0.1, (kind, flat)


@pytest.mark.slow
def test_mup_passes_with_emulated_fp8(tmp_path):
    rc, v = coord_check(tmp_path, *SMALL, "--precision", "fp8-emulated")
    assert rc == 0, v.get("summary")
    df = pd.read_parquet(tmp_path / "coord.parquet")
    assert set(df["precision"]) == {"fp8-emulated"}


@pytest.mark.parametrize("args, message", [
    (["--widths", "64"], "need at least two distinct values"),
    (["--widths", "64,72"], "not divisible by head_dim"),
    (["--steps", "0"], "coord-check.steps"),
    (["--seeds", "0"], "coord-check.seeds"),
    (["--lr", "-1"], "coord-check.lr"),
    (["--lr", "nan"], "coord-check.lr: input should be a finite number"),
    (["--precision", "fp16"], "coord-check.precision"),
    (["--precision", "fp8-te"], "cannot run here"),
    (["--seq-len", "100000"], "max_seq_len"),
    (["--compare", "mup"], "--compare"),
    (["--set", "seeds=x"], "coord-check.seeds"),
    (["--set", "nosuch=1"], "coord-check.nosuch: unknown field"),
])
def test_bad_input_exits_2_before_any_compute(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["coord-check", "tiny", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "coord.parquet").exists()


def test_unknown_preset_and_unparsable_widths_exit_2(tmp_path, capsys):
    assert main(["coord-check", "no-such-preset", "--out", str(tmp_path)]) == 2
    assert "no-such-preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["coord-check", "tiny", "--widths", "64,abc"])
    assert e.value.code == 2


def test_rule_lets_only_the_logits_shrink_after_the_first_update():
    assert slope_passes("residual", 0, -0.3, 0.1) and not slope_passes("residual", 0, 0.3, 0.1)
    assert slope_passes("output_logits", 1, -0.3, 0.1) and not slope_passes("output_logits", 1, 0.2, 0.1)
    assert not slope_passes("residual", 1, -0.3, 0.1) and not slope_passes("output_logits", 2, -0.3, 0.1)
    assert not slope_passes("attn_out", 3, float("nan"), 0.1)
    assert fit_slope(torch.tensor([64.0, 128, 256]).numpy(), torch.tensor([1.0, 2, 4]).numpy()) == pytest.approx(1.0)


@pytest.mark.numerical
def test_recorder_matches_mup_get_coord_data():
    """Same model, data, seed and optimizer: this tool's l1 per module and step equals mup's."""
    from mup.coord_check import get_coord_data

    cfg = CoordConfig(widths=[64, 128], steps=3, seeds=1, batch_size=2, seq_len=32)
    shapes = {s.model.d_model: s for s in cfg.shapes()}
    hp = HParams()
    dataset = builtin_dataset()
    batches = [dataset.batch("train", 0, step, cfg.batch_size, cfg.seq_len) for step in range(cfg.steps)]
    lr = 1e-3

    models = {w: (lambda s=s: build_model(s, hp, seed=0)) for w, s in shapes.items()}
    ref = get_coord_data(models, [(x, y.flatten()) for x, y in batches], optimizer="adam", lr=lr, mup=False,
                         nsteps=cfg.steps, flatten_output=True, fix_data=False, cuda=False, show_progress=False)

    ours = []
    for w, shape in shapes.items():
        model = build_model(shape, hp, seed=0)
        ours += record_training(model, torch.optim.Adam(model.parameters(), lr=lr), batches, {"width": w},
                               spec=transformer_spec(shape.model))
    ours = pd.DataFrame(ours)
    ours = ours[(ours["statistic"] == "l1") & ~ours["kind"].isin(["loss", "attn_logits"])
                & ~ours["kind"].str.startswith("dWx")]
    merged = ours.assign(t=ours["step"] + 1).merge(ref, on=["width", "module", "t"], how="left")
    assert len(merged) == len(ours) and set(ours["kind"]) == {"embedding", "attn_out", "ffn_out", "residual",
                                                              "output_logits"}
    assert merged["l1"].notna().all()
    torch.testing.assert_close(torch.tensor(merged["value"].to_numpy()), torch.tensor(merged["l1"].to_numpy()),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_depth_axis_fits_slopes_against_depth_with_seed_intervals(tmp_path):
    rc, v = coord_check(tmp_path, "--depths", "2,4,8", "--steps", "3", "--seeds", "2", "--threads", "1")
    assert rc in (0, 1) and v["axis"] == "depth" and v["axis_values"] == [2, 4, 8]
    df = pd.read_parquet(tmp_path / "coord.parquet")
    assert sorted(df["depth"].unique()) == [2, 4, 8] and set(df["width"]) == {64}
    residual = v["modules"]["residual"]
    lo, hi = residual["slopes_ci"]["2"]
    assert lo <= residual["slopes"]["2"] <= hi  # an interval over seeds around every slope
    assert (tmp_path / "coord.png").stat().st_size > 0
