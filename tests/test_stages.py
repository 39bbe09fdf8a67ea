"""Stage schema: parsing, defaults, tokens per stage, batch validation, and the plan's stage table."""

import copy
from pathlib import Path

import pytest

from full_scale.config import TOP_LEVEL, load_run_config
from mutransfer.config import ConfigError, HParams, apply_override, load_toml
from mutransfer.plan import resolve_target
from mutransfer.stages import describe_stages, format_stages, parse_stages

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "full_scale" / "smoke.toml"
XMODEL = ROOT / "full_scale" / "xmodel25_1p3b.toml"


def smoke():
    shape, raw = resolve_target(str(SMOKE))
    return shape, raw


def test_smoke_stages_parse():
    shape, raw = smoke()
    plan = parse_stages(raw, shape, HParams())
    assert [s.name for s in plan.stages] == ["warmup", "stable1", "stable2", "decay", "long_context"]
    assert [s.optimizer for s in plan.stages] == ["adamw", "adamw", "adamw", "muon", "muon"]
    assert plan.switch_step == plan.stages[3].start_step == 32
    assert plan.total_steps == 52
    long = plan.stages[4]
    assert [(p.seq_len, p.steps, p.global_batch) for p in long.phases] == [(256, 4, 8), (512, 4, 4)]
    assert long.phase_at(long.start_step + 4)[0] == 1
    # the long-context start continues from the decay's end; end_lr is absolute on the hidden peak
    assert long.lr_start == plan.stages[3].lr_end == 0.0625
    assert long.lr_end_abs == 1e-5  # absolute: every group (embedding included) ends at 1e-5
    assert long.segment().end_factor(plan.hidden_peak_lr) == pytest.approx(1e-5 / plan.hidden_peak_lr)
    assert [round(m.weight, 3) for m in plan.stages[3].mixture] == [0.331, 0.669]
    assert plan.stages[0].phases[0].accumulation(2) == 1 and plan.stages[2].phases[0].accumulation(1) == 4


def test_switch_off_is_adamw_everywhere():
    shape, raw = smoke()
    raw["optimizer"]["switch"] = False
    plan = parse_stages(raw, shape)
    assert {s.optimizer for s in plan.stages} == {"adamw"} and plan.switch_step is None


@pytest.mark.parametrize("edit, match", [
    (lambda r: r["stages"][2].update(global_batch=18), r"stages\[2\] \(stable2\).*global_batch = 18.*micro_batch = 4"),
    (lambda r: r["stages"][0].update(seq_len=4096), r"stages\[0\] \(warmup\).seq_len = 4096 exceeds"),
    (lambda r: r["stages"][3]["lr"].update(end_lr=1e-4), r"stages\[3\] \(decay\).lr: give end .* not both"),
    (lambda r: r["stages"][1].update(batch=3), r"stages\[1\] \(stable1\).batch: unknown field"),
    (lambda r: r["stages"][1].update(steps=float("nan")), r"stages\[1\] \(stable1\).steps: input should be"),
    (lambda r: r["stages"][3]["lr"].update(end=float("inf")), r"\(decay\).lr.end: input should be a finite"),
    (lambda r: r["stages"][3]["lr"].update(end=-1.0), r"stages\[3\] \(decay\).lr.end: input should be greater"),
    (lambda r: r["optimizer"].update(switch_stage="cooldown"), r"optimizer.switch_stage = 'cooldown'"),
    (lambda r: r["stages"][4]["phases"][1].pop("steps"), r"long_context\).phases\[1\].steps is missing"),
    (lambda r: r["stages"][3]["mixture"][1].update(weight=0), r"mixture\[1\].weight: input should be greater than 0"),
])
def test_bad_stages_name_the_field(edit, match):
    shape, raw = smoke()
    raw = copy.deepcopy(raw)
    edit(raw)
    with pytest.raises(ConfigError, match=match):
        parse_stages(raw, shape)


def test_global_batch_must_divide_over_ranks():
    shape, raw = smoke()
    plan = parse_stages(raw, shape)
    plan.validate_parallel(2)
    with pytest.raises(ConfigError, match=r"global_batch = 8 is not divisible by micro_batch \(4\) x "
                                          r"data-parallel size \(3\) = 12"):
        plan.validate_parallel(3)


def test_overrides_address_stages_by_name_or_index():
    raw = load_toml(SMOKE)
    apply_override(raw, "stages.decay.steps=5")
    apply_override(raw, "stages.long_context.phases.1.seq_len=384")
    apply_override(raw, "optimizer.switch=false")
    apply_override(raw, "train.precision=bf16")
    assert raw["stages"][3]["steps"] == 5 and raw["stages"][4]["phases"][1]["seq_len"] == 384
    assert raw["optimizer"]["switch"] is False and raw["train"]["precision"] == "bf16"
    with pytest.raises(ConfigError, match="names no entry"):
        apply_override(raw, "stages.cooldown.steps=5")
    with pytest.raises(ConfigError, match="unknown table"):
        apply_override(raw, "optimiser.switch=false", TOP_LEVEL)


def test_run_config_checks_the_lock(tmp_path):
    from mutransfer.lockfile import write_lock
    from mutransfer.presets import get_preset

    cfg = load_run_config(str(SMOKE))
    assert cfg.hp.alpha_in == 4.0 and cfg.lock.param.d_base == 64
    proxy = get_preset("proxy-20m")
    lock = tmp_path / "wrong.lock.json"
    write_lock(lock, HParams(), proxy.param, proxy.model, {"source": "test"})
    with pytest.raises(ConfigError, match="does not match the model being built"):
        load_run_config(str(SMOKE), hparams_path=str(lock))
    # hyperparameters come from the lock only
    path = tmp_path / "with_hparams.toml"
    path.write_text(SMOKE.read_text().replace("[model]", "[hparams]\nlr = 0.1\n\n[model]", 1))
    with pytest.raises(ConfigError, match=r"\[hparams\] is not allowed"):
        load_run_config(str(path))
    path = tmp_path / "no_lock.toml"
    path.write_text(SMOKE.read_text().replace('hparams = "smoke.hparams.lock.json"', ""))
    with pytest.raises(ConfigError, match="no hyperparameters: pass --hparams"):
        load_run_config(str(path))


def test_xmodel25_plan_stage_table():
    shape, raw = resolve_target(str(XMODEL))
    stages = describe_stages(raw, shape)
    tokens = [s["tokens"] for s in stages]
    assert [s["name"] for s in stages] == ["warmup", "stable1", "stable2", "decay", "long_context"]
    assert tokens[1] == 270_000 * 480 * 3712 and tokens[2] == 260_000 * 960 * 3712
    total = sum(tokens)
    assert 1.3e12 < total < 1.6e12 and 1.35 < total / 2**40 < 1.42  # the report's "1.4T"
    # per-group LRs at the target width from the muP table (xmodel, eta = 0.01, m = 6)
    s1, decay, long = stages[1], stages[3], stages[4]
    assert s1["lr_by_group"]["adamw/attn_qkv"]["peak"] == pytest.approx(0.01 / 6)
    assert s1["lr_by_group"]["adamw/embedding"]["peak"] == pytest.approx(0.01)
    assert decay["optimizer"] == "muon" and "muon/ffn_in" in decay["lr_by_group"]
    assert decay["lr_by_group"]["muon/ffn_in"]["end"] == pytest.approx(0.01 / 6 / 16)
    assert long["lr_by_group"]["muon/attn_out"]["end"] == pytest.approx(1e-5)
    assert [p["tokens_per_step"] for p in long["phases"]] == [480 * 8192, 240 * 16384]
    text = format_stages(stages)
    assert "long_context" in text and "1.522T" in text and "muon/ffn_in" in text


def test_plan_command_prints_stages(capsys):
    from mutransfer.cli import main

    assert main(["plan", str(SMOKE)]) == 0
    out = capsys.readouterr().out
    assert "stable2" in out and "16 x 128 (4)" in out and "pretrain 33.1%, sft 66.9%" in out
