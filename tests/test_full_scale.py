"""`mutransfer train full_scale/smoke.toml` end to end on CPU (real training on the tiny preset).

One uninterrupted smoke run (module fixture) is the reference for: the stage/optimizer/batch/
sequence transitions in metrics.jsonl, the LR of every group at every step against the closed-form
WSD schedule, the Muon parameter set, the AdamW-only control, and SIGKILL + resume.
"""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from full_scale.checkpoint import list_checkpoints, read_trainer
from full_scale.metrics import read_rows
from mutransfer.build import build_model
from mutransfer.cli import main
from mutransfer.lockfile import read_lock
from mutransfer.model import loss_fn
from mutransfer.muon import Muon
from mutransfer.optim import build_optimizers, switch_to_muon
from mutransfer.parametrization import param_groups
from mutransfer.plan import flops_per_token
from mutransfer.precision import available
from mutransfer.presets import get_preset
from mutransfer.transformer_spec import ROLE_MAP, transformer_spec

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "full_scale" / "smoke.toml"
PEAK = 1e12  # a made-up device peak, so MFU is computed on CPU
HIDDEN = {f"layers.{i}.{m}.weight" for i in range(4)
          for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
SHORT_TAIL = ["--set", "stages.decay.steps=3", "--set", "stages.long_context.phases.0.steps=1",
              "--set", "stages.long_context.phases.1.steps=1"]


def train(out, *args):
    assert main(["train", str(SMOKE), "--out", str(out), "--quiet", *args]) == 0
    return read_rows(Path(out) / "metrics.jsonl")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    t0 = time.perf_counter()
    rows = train(out, "--set", f"metrics.peak_flops={PEAK}")
    print(f"smoke run: {time.perf_counter() - t0:.1f} s")
    return out, rows


@pytest.mark.slow
def test_smoke_transitions(smoke):
    out, rows = smoke
    assert [r["step"] for r in rows] == list(range(52))
    stages = [r["stage"] for r in rows]
    assert list(dict.fromkeys(stages)) == ["warmup", "stable1", "stable2", "decay", "long_context"]
    decay_start = stages.index("decay")
    assert decay_start == 32
    # AdamW until the decay's first step, Muon from exactly there, flagged once
    assert [r["optimizer"] for r in rows] == ["adamw"] * decay_start + ["muon"] * (52 - decay_start)
    assert [r["step"] for r in rows if r["switch"]] == [decay_start]
    # S2 doubles the global batch; long context raises the sequence length in steps
    batch = {r["stage"]: r["global_batch"] for r in rows if r["stage"] != "long_context"}
    assert batch == {"warmup": 8, "stable1": 8, "stable2": 16, "decay": 16}
    assert [(r["seq_len"], r["global_batch"]) for r in rows[44:]] == [(256, 8)] * 4 + [(512, 4)] * 4
    assert {r["seq_len"] for r in rows[:44]} == {128}
    # the decay's mixture: 66.9 % "sft" rows (within one row per step), before it pretrain only
    for r in rows:
        n = r["global_batch"]
        sft = r["mixture_rows"].get("sft", 0)
        assert (abs(sft - 0.669 * n) <= 1) if r["stage"] in ("decay", "long_context") else sft == 0
    # bookkeeping: tokens, accumulation, MFU from plan's FLOPs, held-out loss at intervals and stage ends
    assert rows[-1]["tokens"] == sum(r["global_batch"] * r["seq_len"] for r in rows)
    assert all(r["global_batch"] == r["micro_batch"] * r["accumulation"] for r in rows)
    shape = get_preset("tiny")
    r = rows[50]
    assert r["mfu"] == pytest.approx(flops_per_token(shape, 512) * r["tokens_per_s"] / PEAK)
    assert [r["step"] for r in rows if "val_loss" in r] == [7, 9, 19, 29, 31, 39, 43, 49, 51]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[-1]["val_loss"] < rows[0]["loss"] - 1.5  # it learns (starts near ln 256 = 5.5)
    # a self-describing directory
    config = json.loads((out / "config.json").read_text())
    env = json.loads((out / "environment.json").read_text())
    assert config["hparams"]["alpha_in"] == 4.0 and config["config"]["stages"][3]["name"] == "decay"
    assert env["schema"] == "mutransfer.environment/1" and env["versions"]["torch"] and env["world_size"] == 1
    assert "git_commit" in env["code"]


def closed_form_factor(step: int, hidden_peak: float) -> float:
    """The smoke schedule written out: W linear 8, S1 12 + S2 12 constant, D exp 12 to 1/16,
    long context exp 8 from 1/16 to 1e-5 / hidden peak; step t of a stage uses u = (t + 1) / T."""
    exp = lambda start, end, u: end + (start - end) * (2 * 0.5**u - 1)  # noqa: E731
    if step < 8:
        return (step + 1) / 8
    if step < 32:
        return 1.0
    if step < 44:
        return exp(1.0, 1 / 16, (step - 32 + 1) / 12)
    return exp(1 / 16, 1e-5 / hidden_peak, (step - 44 + 1) / 8)


@pytest.mark.slow
def test_lr_curve_is_closed_form_wsd(smoke):
    _, rows = smoke
    lock = read_lock(ROOT / "full_scale" / "smoke.hparams.lock.json")
    shape = get_preset("tiny")
    model = build_model(shape, lock.hparams, device="meta")
    peak = {kind: {f"{opt}/{g['role']}": g["base_lr"]
                   for opt, gs in param_groups(model, shape.model, shape.param, lock.hparams, kind,
                                               roles=ROLE_MAP).items()
                   for g in gs} for kind in ("adamw", "muon")}
    hidden_peak = peak["adamw"]["adamw/ffn_in"]
    for r in rows:
        f = closed_form_factor(r["step"], hidden_peak)
        assert r["lr_factor"] == pytest.approx(f, rel=1e-12, abs=1e-15), r["step"]
        assert set(r["lr"]) == set(peak[r["optimizer"]])
        for group, lr in r["lr"].items():
            assert lr == pytest.approx(peak[r["optimizer"]][group] * f, rel=1e-12, abs=1e-15), (r["step"], group)
    assert rows[-1]["lr"]["muon/ffn_in"] == pytest.approx(1e-5)  # the long-context floor


@pytest.mark.slow
def test_muon_gets_exactly_the_hidden_matrices(smoke):
    out, _ = smoke
    events = read_rows(out / "events.jsonl")
    switch = [e for e in events if e["event"] == "switch"]
    assert len(switch) == 1 and switch[0]["step"] == 32
    assert set(switch[0]["muon_params"]) == HIDDEN and len(switch[0]["muon_params"]) == 28
    # the checkpoint records the switch and holds Muon state for those names only
    step, path = list_checkpoints(out)[-1]
    assert read_trainer(path)["optimizer"] == "muon" and read_trainer(path)["switched_at"] == 32
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    muon = {k.split("optim.muon.state.")[1].rsplit(".", 1)[0] for k in keys if k.startswith("optim.muon.state.")}
    adamw = {k.split("optim.adamw.state.")[1].rsplit(".", 1)[0] for k in keys
             if k.startswith("optim.adamw.state.")}
    assert muon == HIDDEN
    assert adamw == {"tok_embeddings.weight", "norm.weight"} | {f"layers.{i}.{n}.weight" for i in range(4)
                                                                 for n in ("attention_norm", "ffn_norm")}


@pytest.mark.slow
def test_adamw_only_control(smoke, tmp_path):
    out, ref = smoke
    rows = train(tmp_path / "control", "--set", "optimizer.switch=false", *SHORT_TAIL)
    assert {r["optimizer"] for r in rows} == {"adamw"} and not any(r["switch"] for r in rows)
    assert [r["loss"] for r in rows[:32]] == [r["loss"] for r in ref[:32]]  # identical up to the switch
    assert rows[32]["stage"] == "decay" and "adamw/ffn_in" in rows[32]["lr"]
    # at scale the control branches off the switched run's pre-decay checkpoint (kept: a stage end)
    branch = train(tmp_path / "branch", "--set", "optimizer.switch=false", *SHORT_TAIL,
                   "--from-checkpoint", str(out / "checkpoints" / "step_00000032"))
    assert [r["step"] for r in branch] == list(range(32, 37))
    assert [r["loss"] for r in branch] == [r["loss"] for r in rows[32:]]
    start = [e for e in read_rows(tmp_path / "branch" / "events.jsonl") if e["event"] == "resume"]
    assert start[0]["branched"] and start[0]["step"] == 32
    # a branch point must hold the optimizer this config has there
    assert main(["train", str(SMOKE), "--out", str(tmp_path / "bad"), "--quiet", "--set", "optimizer.switch=false",
                 "--from-checkpoint", str(out / "checkpoints" / "step_00000044")]) == 2


def test_missing_precision_backend_says_what_to_install(tmp_path, capsys):
    if available("fp8-te")[0]:
        pytest.skip("Transformer Engine is installed here")
    assert main(["train", str(SMOKE), "--out", str(tmp_path / "te"), "--set", "train.precision=fp8-te"]) == 2
    err = capsys.readouterr().err
    assert "fp8-te" in err and "install" in err
    assert not (tmp_path / "te" / "checkpoints").exists()


def test_switch_keeps_state_and_can_carry_momentum():
    """The trainer's switch (restart = hidden): Muon for the hidden matrices, AdamW state kept for the rest."""
    shape, hp = get_preset("tiny"), read_lock(ROOT / "full_scale" / "smoke.hparams.lock.json").hparams
    model = build_model(shape, hp)
    spec = transformer_spec(shape.model)
    opts = build_optimizers(model, spec, shape.model, shape.param, hp, "adamw")
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    loss_fn(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    opts.step()
    exp_avg = {n: opts.optimizers["adamw"].state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    new = switch_to_muon(model, spec, shape.model, shape.param, hp, opts, carry_momentum=True)
    muon = new.optimizers["muon"]
    assert isinstance(muon, Muon) and new.kind == "muon"
    names = {n for g in muon.param_groups for n in g["names"]}
    assert names == HIDDEN
    params = dict(model.named_parameters())
    for n in names:
        assert torch.equal(muon.state[params[n]]["momentum_buffer"], exp_avg[n])
    emb = params["tok_embeddings.weight"]
    assert torch.equal(new.optimizers["adamw"].state[emb]["exp_avg"], exp_avg["tok_embeddings.weight"])
    # the recipe's restart: every state fresh, the embedding and norm gains included
    fresh = switch_to_muon(model, spec, shape.model, shape.param, hp, opts, restart="all")
    assert len(fresh.optimizers["adamw"].state) == 0 and len(fresh.optimizers["muon"].state) == 0


@pytest.mark.slow
def test_refuses_to_resume_with_another_config(smoke, tmp_path):
    out = tmp_path / "r"
    short = ["--set", "stages.warmup.steps=1", "--set", "stages.stable1.steps=1", "--set", "stages.stable2.steps=1"]
    train(out, *short, *SHORT_TAIL)
    assert main(["train", str(SMOKE), "--out", str(out), "--quiet", *short, *SHORT_TAIL, "--set", "train.seed=1"]) == 2
    # the same config resumes a finished run and does nothing more
    assert main(["train", str(SMOKE), "--out", str(out), "--quiet", *short, *SHORT_TAIL]) == 0


# --- SIGKILL and resume -----------------------------------------------------------------------------
def _run_until(out: Path, at_step: int) -> int:
    """Start `mutransfer train` in a subprocess and SIGKILL it once metrics.jsonl has step ``at_step``."""
    cmd = [sys.executable, "-m", "mutransfer.cli", "train", str(SMOKE), "--out", str(out), "--quiet",
           "--set", "checkpoint.every=4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None:
            if any(r["step"] >= at_step for r in read_rows(out / "metrics.jsonl")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    return max(r["step"] for r in read_rows(out / "metrics.jsonl"))


@pytest.mark.slow
def test_sigkill_and_resume_reproduce_the_run(smoke, tmp_path):
    _, ref = smoke
    out = tmp_path / "killed"
    killed_at = _run_until(out, 14)  # AdamW stage
    newest = list_checkpoints(out)[-1][0]
    assert 4 <= newest <= killed_at  # the rows after the newest checkpoint will be redone
    killed_at = _run_until(out, 38)  # after the switch at 32
    newest, path = list_checkpoints(out)[-1]
    assert 32 < newest <= killed_at and read_trainer(path)["optimizer"] == "muon"
    # debris of a save that died: must be ignored and cleaned, never loaded
    (out / "checkpoints" / f".tmp-step_{newest + 4:08d}").mkdir()
    (out / "checkpoints" / f"step_{newest + 8:08d}").mkdir()  # no .metadata: not complete
    rows = train(out)
    assert [r["step"] for r in rows] == list(range(52))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]  # bit-exact, fp32 on CPU
    assert [r.get("val_loss") for r in rows] == [r.get("val_loss") for r in ref]
    resumes = [e["step"] for e in read_rows(out / "events.jsonl") if e["event"] == "resume"]
    assert len(resumes) == 2 and resumes[-1] == newest
    assert not list((out / "checkpoints").glob(".tmp-*"))
    kept = {step: read_trainer(path)["stage_end"] for step, path in list_checkpoints(out)}
    assert {s for s, end in kept.items() if end} == {8, 20, 32, 44, 52}  # stage ends are kept
    assert len([s for s, end in kept.items() if not end]) <= 3  # keep = 3


@pytest.mark.slow
def test_fp8_emulated_tracks_fp32(smoke, tmp_path):
    """FP8 (emulated HYBRID delayed scaling) through every stage, Muon included; the loss stays
    within a few percent of fp32 (the smoke reference, identical up to step 20)."""
    _, ref = smoke
    rows = train(tmp_path / "fp8", "--set", "train.precision=fp8-emulated", "--set", "stages.stable2.steps=2",
                 "--set", "checkpoint.every=0", *SHORT_TAIL)
    assert [r["stage"] for r in rows][-3:] == ["decay", "long_context", "long_context"]
    assert all(math.isfinite(r["loss"]) for r in rows)
    for a, b in zip(rows[:20], ref[:20], strict=True):
        assert abs(a["loss"] - b["loss"]) < 0.03 * b["loss"], (a["step"], a["loss"], b["loss"])
    assert rows[19]["val_loss"] == pytest.approx(ref[19]["val_loss"], rel=0.02)
    assert rows[19]["loss"] != ref[19]["loss"]  # it did run in (emulated) FP8


@pytest.mark.numerical
def test_benchmark_smoke_mode(tmp_path):
    """benchmarks/full_scale_step.py runs on CPU and writes its JSON (unavailable backends: skipped)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import full_scale_step
    finally:
        sys.path.pop(0)
    out = tmp_path / "bench.json"
    args = ["--smoke", "--width", "64", "--layers", "1", "--seq-len", "32", "--steps", "1", "--warmup", "0",
            "--precisions", "fp32", "fp8-te", "--checkpointing", "none", "full", "--json", str(out)]
    assert full_scale_step.main(args) == 0
    result = json.loads(out.read_text())
    fp32, fp32_full, te, _ = result["results"]
    assert fp32["status"] == "ok" and fp32["tokens_per_s"] > 0 and result["flops_per_token"] > 0
    assert fp32_full["status"] == "ok" and fp32_full["loss"] == pytest.approx(fp32["loss"], rel=1e-6)
    assert fp32["predicted_peak_gib"] > fp32_full["predicted_peak_gib"] > 0  # the plan's figure beside it
    assert te["status"] == "ok" or ("install" in te["why"])
