"""The recipe's choices are the config's, whatever the lock; `plan` and `train` validate alike.

- The recipe config writes every choice that is not a base hyperparameter: the optimizer-state
  restart at the AdamW -> Muon switch, Muon on the fused Q|K|V and gate|up matrices, the
  long-context LR floor, the attention and FFN residual multipliers. A ``mup`` lock (what
  ``mutransfer freeze`` writes for proxy_sweeps/xmodel25_proxy.toml) runs it with the same choices
  as the published ``xmodel`` lock; ``plan``, config.json and the trainer's events name each one.
- One validation: a config that ``plan`` accepts ``train`` accepts, and a refusal is the same
  one-line message from both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from full_scale.config import load_run_config
from full_scale.metrics import read_rows
from mutransfer.build import build
from mutransfer.cli import main
from mutransfer.config import HParams, ParamConfig
from mutransfer.lockfile import write_lock
from mutransfer.presets import get_preset
from mutransfer.specs import spec_of
from mutransfer.stages import SwitchSpec, describe_stages

ROOT = Path(__file__).resolve().parents[1]
XMODEL = str(ROOT / "full_scale" / "xmodel25_1p3b.toml")
SMOKE = str(ROOT / "full_scale" / "smoke.toml")
SMOKE_LOCK = ROOT / "full_scale" / "smoke.hparams.lock.json"
MUP_ALPHA_RES = 2.0  # a tuned value that differs from the recipe's 1.4, so a silent swap would show


@pytest.fixture(scope="module")
def mup_lock(tmp_path_factory) -> str:
    """A lock as `mutransfer freeze` writes it for the documented proxy sweep (proxy-20m, mup)."""
    path = tmp_path_factory.mktemp("lock") / "hparams.lock.json"
    proxy = get_preset("proxy-20m")
    write_lock(path, HParams(lr=2**-6, init_std=0.05, alpha_in=8.0, alpha_res=MUP_ALPHA_RES),
               ParamConfig(parametrization="mup", d_base=256, depth_base=48), proxy.model,
               provenance={"source": "test: a mup sweep's frozen values"})
    return str(path)


# ------------------------------------------------------------------ the recipe's choices, any lock


@pytest.mark.parametrize("lock", ["recipe", "mup"])
def test_the_recipe_config_keeps_its_switch_choices_under_any_lock(lock, mup_lock):
    cfg = load_run_config(XMODEL, hparams_path=None if lock == "recipe" else mup_lock)
    assert cfg.shape.param.parametrization == ("xmodel" if lock == "recipe" else "mup")
    switch = cfg.stages.switch
    # written in the config, not derived from the lock's parametrization
    assert (switch.restart, switch.muon_fuse, switch.carry_momentum) == ("all", True, False)
    resolved = cfg.to_json()["optimizer"]
    assert resolved["restart_resolved"] == "all" and resolved["muon_fuse_resolved"] is True


def test_a_config_may_choose_otherwise_and_an_unset_choice_names_its_default(mup_lock):
    """The other branch: the config's other value is kept; unset, the parametrization's default, named so."""
    cfg = load_run_config(XMODEL, ["optimizer.restart='hidden'", "optimizer.muon_fuse=false"], mup_lock)
    assert cfg.stages.switch.restart_for("mup") == "hidden" and not cfg.stages.switch.fuse_for("mup")
    choices = cfg.to_json()["recipe_choices"]
    assert choices["restart"] == {"value": "hidden", "from": "optimizer.restart"}
    unset = SwitchSpec()
    assert unset.restart_for("mup") == "hidden" and unset.restart_for("xmodel") == "all"
    assert unset.restart_source("mup") == "the 'mup' default (optimizer.restart unset)"


@pytest.mark.parametrize("lock", ["recipe", "mup"])
def test_the_long_context_floor_is_every_groups_last_lr_under_any_lock(lock, mup_lock):
    cfg = load_run_config(XMODEL, hparams_path=None if lock == "recipe" else mup_lock)
    plan = cfg.stages
    schedule = plan.schedule()
    last = plan.total_steps - 1
    groups = describe_stages(cfg.raw, cfg.shape, cfg.hp)[-1]["lr_by_group"]
    assert groups  # every group of the long-context stage, embedding included
    for name, lr in groups.items():
        assert lr["end"] == pytest.approx(1e-5, rel=1e-9), name
        assert lr["peak"] * schedule.factor(last, lr["peak"]) == pytest.approx(1e-5, rel=1e-9), name
    assert cfg.to_json()["recipe_choices"]["lr_floor"] == [
        {"stage": "long_context", "end_lr": 1e-5, "from": "stages[4] (long_context).lr.end_lr"}]


def test_the_residual_multipliers_come_from_the_lock_unless_the_config_sets_them(mup_lock):
    """The recipe config writes its choice ("lock": alpha_res is a tuned value, 1.4 in the recipe lock,
    the proxy's own in a mup lock); a number in [residual] replaces it, with the lock's value named."""
    recipe = load_run_config(XMODEL)
    mup = load_run_config(XMODEL, hparams_path=mup_lock)
    assert (recipe.hp.residual_attn, recipe.hp.residual_ffn) == (1.4, 1.4)
    assert (mup.hp.residual_attn, mup.hp.residual_ffn) == (MUP_ALPHA_RES, MUP_ALPHA_RES)
    assert mup.to_json()["recipe_choices"]["residual"]["ffn"]["from"] == "the lock (alpha_res)"
    # a number in the config replaces the lock's, and the lock's value is not silently dropped
    sets = ["residual.alpha_res_attn=1.4", "residual.alpha_res_ffn=1.4"]
    fixed = load_run_config(XMODEL, sets, mup_lock)
    assert (fixed.hp.residual_attn, fixed.hp.residual_ffn) == (1.4, 1.4)
    residual = fixed.to_json()["recipe_choices"]["residual"]
    assert residual["attn"]["alpha"] == 1.4 and residual["attn"]["from"] == "residual.alpha_res_attn"
    assert residual["attn"]["lock_alpha"] == MUP_ALPHA_RES
    assert residual["attn"]["multiplier"] == pytest.approx(1.4 / math.sqrt(48))


def branch_scales(cfg) -> tuple[float, float]:
    """Measured (residual stream change) / (branch output) of block 0's attention and FFN branches."""
    shape = cfg.shape.model
    model = build(spec_of(shape), shape.d_model, shape.n_layers, cfg.shape.param, cfg.hp, seed=0)
    block = model.layers[0]
    seen = {}
    block.attention.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o))
    block.feed_forward.register_forward_hook(lambda m, i, o: seen.__setitem__("ffn", o))
    block.register_forward_pre_hook(lambda m, args: seen.__setitem__("h0", args[0]))
    block.ffn_norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("h1", args[0]))
    block.register_forward_hook(lambda m, i, o: seen.__setitem__("h2", o))
    with torch.no_grad():
        model(torch.randint(0, shape.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)))
    ratio = lambda delta, out: float((delta * out).sum() / (out * out).sum())  # noqa: E731  least squares
    return ratio(seen["h1"] - seen["h0"], seen["attn"]), ratio(seen["h2"] - seen["h1"], seen["ffn"])


@pytest.mark.parametrize("lock", ["recipe", "mup"])
def test_attention_and_ffn_branches_are_scaled_by_their_own_alpha_over_sqrt_depth(lock, mup_lock):
    """RECIPE section 2: h += (alpha_res / sqrt(L)) branch, with separate attention and FFN alphas.

    The 48-layer recipe model at width 128 (same depth, parametrization and lock; CPU-sized)."""
    sets = ["model.width=128", "residual.alpha_res_attn=1.4", "residual.alpha_res_ffn=2.8"]
    cfg = load_run_config(XMODEL, sets, None if lock == "recipe" else mup_lock)
    attn, ffn = branch_scales(cfg)
    # float32 residual adds of numbers of size ~1: the measured ratio is exact to ~1e-6
    assert attn == pytest.approx(1.4 / math.sqrt(48), rel=1e-5)
    assert ffn == pytest.approx(2.8 / math.sqrt(48), rel=1e-5)
    same = load_run_config(XMODEL, ["model.width=128"], None if lock == "recipe" else mup_lock)
    alpha = 1.4 if lock == "recipe" else MUP_ALPHA_RES  # the recipe config keeps the lock's alpha_res
    assert branch_scales(same) == pytest.approx((alpha / math.sqrt(48),) * 2, rel=1e-5)


def test_plan_prints_the_recipe_choices(capsys, mup_lock):
    assert main(["plan", XMODEL, "--hparams", mup_lock, "--world-size", "48"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("recipe choices"):]
    assert "restart 'all'" in block and "optimizer.restart" in block
    assert "fused Q|K|V and gate|up" in block and "optimizer.muon_fuse" in block
    assert "1e-05" in block and "stages[4] (long_context).lr.end_lr" in block
    assert f"attention {MUP_ALPHA_RES:g}" in block and "[the lock (alpha_res)]" in block
    assert main(["plan", XMODEL, "--hparams", mup_lock, "--world-size", "48", "--json"]) == 0
    choices = json.loads(capsys.readouterr().out)["recipe_choices"]
    assert choices["restart"]["value"] == "all" and choices["muon_fuse"]["value"] is True


def test_the_switch_event_names_the_choices(tmp_path):
    """The smoke config (the recipe's shape) with its mup lock: the switch restarts every state and
    fuses, as its config says; the start event carries every choice."""
    short = [f"stages.{s}.steps=1" for s in ("warmup", "stable1", "stable2")] + [
        "stages.decay.steps=2", "stages.long_context.phases.0.steps=1", "stages.long_context.phases.1.steps=1",
        "checkpoint.at_stage_end=false", "train.eval_every=100"]
    out = tmp_path / "run"
    assert main(["train", SMOKE, "--out", str(out), "--quiet", *[a for s in short for a in ("--set", s)]]) == 0
    events = read_rows(out / "events.jsonl")
    switch = next(e for e in events if e["event"] == "switch")
    assert switch["step"] == 3 and switch["restart"] == "all" and switch["muon_fuse"] is True
    assert switch["restart_from"] == "optimizer.restart" and switch["muon_fuse_from"] == "optimizer.muon_fuse"
    start = next(e for e in events if e["event"] == "start")
    assert start["recipe_choices"]["restart"]["value"] == "all"
    assert json.loads((out / "config.json").read_text())["recipe_choices"]["muon_fuse"]["value"] is True
    # restart 'all' really restarted the embedding's AdamW: its step counts only the steps since the switch
    from torch.distributed.checkpoint import load

    state = {"optim.adamw.state.tok_embeddings.weight.step": torch.tensor(0.0)}
    load(state, checkpoint_id=str(out / "checkpoints" / "step_00000007"))
    assert float(state["optim.adamw.state.tok_embeddings.weight.step"]) == 4.0  # not 7


# -------------------------------------------------------------- one validation for plan and train


def plan_says(capsys, sets) -> tuple[int, str]:
    rc = main(["plan", XMODEL, "--world-size", "48", *[a for s in sets for a in ("--set", s)]])
    return rc, capsys.readouterr().err.strip()


def train_says(capsys, tmp_path, sets) -> tuple[int, str]:
    """`train` up to its first compute: the config checks, then the run (refused before any step)."""
    rc = main(["train", XMODEL, "--out", str(tmp_path / "run"), "--quiet",
               *[a for s in sets for a in ("--set", s)]])
    return rc, capsys.readouterr().err.strip()


REFUSED = [
    (["train.activation_checkpointing='selective'"],
     "train.activation_checkpointing = 'selective' is not supported with precision 'fp8-te'"),
    (["stages.long_context.activation_checkpointing='selective'"],
     "stages[4] (long_context).activation_checkpointing = 'selective' is not supported"),
    (["stages.long_context.phases.1.activation_checkpointing='selective'"],
     "stages[4] (long_context).phases[1].activation_checkpointing = 'selective' is not supported"),
    (["train.eval_seq_len=200000"], "train.eval_seq_len = 200000 exceeds model.max_seq_len = 131072"),
    (["train.checkpointing='none'"], "train.checkpointing"),
    (["parallel.mode='tp'"], "parallel.mode"),
    (["model.ffn_dim=3850"], "model.ffn_dim = 3850 not divisible by 16"),
    (["hparams.lr=0.1"], "unknown table 'hparams'"),
    (["residual.alpha_res_attn=-1.0"], "residual.alpha_res_attn"),
]


@pytest.mark.parametrize("sets, message", REFUSED, ids=[s[0] for s, _ in REFUSED])
def test_plan_and_train_refuse_alike(capsys, tmp_path, sets, message):
    plan_rc, plan_err = plan_says(capsys, sets)
    train_rc, train_err = train_says(capsys, tmp_path, sets)
    assert (plan_rc, train_rc) == (2, 2)
    assert message in plan_err and plan_err == train_err
    assert "\n" not in plan_err  # one line, no traceback
    assert not (tmp_path / "run").exists()


ACCEPTED = [
    [],
    ["train.precision='bf16'", "train.activation_checkpointing='selective'"],
    ["train.precision='fp8-torchao'", "stages.long_context.phases.1.activation_checkpointing='selective'"],
    ["stages.long_context.phases.0.activation_checkpointing='full'"],
    ["train.eval_seq_len=16384"],
]


@pytest.mark.parametrize("sets", ACCEPTED, ids=[" ".join(s) or "as shipped" for s in ACCEPTED])
def test_plan_and_train_accept_alike(capsys, sets):
    plan_rc, plan_err = plan_says(capsys, sets)
    assert plan_rc in (0, 1), plan_err  # 1: a stage does not fit, which is a verdict, not a refusal
    load_run_config(XMODEL, sets)  # everything `train` checks before it looks for a GPU


def test_train_says_when_the_configs_residual_multiplier_replaces_the_locks(tmp_path, capsys):
    """Both branches: a config value that differs from the lock's is said on stderr; an equal one is not."""
    short = ["stages.warmup.steps=1", "stages.stable1.steps=1", "stages.stable2.steps=1", "stages.decay.steps=1",
             "stages.long_context.phases.0.steps=1", "stages.long_context.phases.1.steps=1",
             "checkpoint.at_stage_end=false", "train.eval_batches=1"]
    args = [a for s in short for a in ("--set", s)]
    assert main(["train", SMOKE, "--out", str(tmp_path / "a"), "--quiet", *args,
                 "--set", "residual.alpha_res_ffn=2.5"]) == 0
    err = capsys.readouterr().err
    assert "note: residual.alpha_res_ffn = 2.5 (the config) is used; the lock has 1.4" in err
    assert "alpha_res_attn" not in err
    assert main(["train", SMOKE, "--out", str(tmp_path / "b"), "--quiet", *args,
                 "--set", "residual.alpha_res_ffn=1.4"]) == 0
    assert "note:" not in capsys.readouterr().err
