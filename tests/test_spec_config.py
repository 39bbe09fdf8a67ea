"""``[model] spec = "package.module:factory"``: a user's model in config files, sweeps and transfer checks.

The spec is imported by whichever process builds the model (sweep and transfer-check workers re-parse
the file), so it travels as plain data: the target, its keyword arguments, width and depth.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mutransfer.cli import main
from mutransfer.config import ConfigError, HParams, ProxyTrain, SpecModel
from mutransfer.data.builtin import builtin_dataset
from mutransfer.plan import shape_from_config
from mutransfer.specs import at_width, spec_of
from mutransfer.training import train_proxy

ROOT = Path(__file__).resolve().parents[1]
NANOGPT = {"model": {"spec": "examples.nanogpt:spec", "args": {"width": 32, "head_dim": 8}}}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_a_spec_model_reads_its_shape_from_the_spec():
    shape = shape_from_config(NANOGPT, "sweep")
    assert isinstance(shape.model, SpecModel)
    assert (shape.model.d_model, shape.model.n_layers, shape.model.head_dim, shape.model.vocab_size) == (32, 4, 8, 256)
    assert (shape.param.d_base, shape.param.depth_base, shape.param.parametrization) == (32, 4, "mup")
    wide = shape_from_config({"model": {**NANOGPT["model"], "width": 128, "depth": 2}, "param": {"depth_alpha": 1.0}},
                             "sweep")
    assert (wide.model.d_model, wide.model.n_layers, wide.param.d_base, wide.param.depth_alpha) == (128, 2, 32, 1.0)
    assert at_width(shape.model, 64).d_model == 64 and spec_of(shape.model).name == "nanogpt"


@pytest.mark.parametrize("table, why", [
    ({"spec": "examples.nope:spec"}, "sweep.model.spec = 'examples.nope:spec': module 'examples.nope' does not import"),
    ({"spec": "examples.nanogpt:nope"}, "has no 'nope'"),
    ({"spec": "examples.nanogpt"}, "expected 'package.module:factory'"),
    ({"spec": "examples.nanogpt:spec", "args": {"colour": 1}}, "the factory raised TypeError"),
    ({"spec": "examples.nanogpt:spec", "width": 0}, "sweep.model.width = 0 must be a positive integer"),
    ({"spec": "examples.nanogpt:spec", "n_heads": 4}, "['n_heads'] not allowed with model.spec"),
])
def test_bad_spec_tables_name_the_field(table, why):
    with pytest.raises(ConfigError) as e:
        shape_from_config({"model": table}, "sweep")
    assert why in str(e.value)


def test_an_unimportable_factory_is_exit_2_from_the_command_line(tmp_path, capsys):
    rc = main(["transfer-check", str(ROOT / "proxy_sweeps" / "lr_transfer_hf_llama.toml"), "--out",
               str(tmp_path / "t"), "--set", "model.spec=examples.nope:spec"])
    assert rc == 2
    assert "model.spec = 'examples.nope:spec'" in capsys.readouterr().err
    assert not (tmp_path / "t" / "runs.jsonl").exists()


def test_plan_refuses_a_spec_model_by_name(tmp_path, capsys):
    config = tmp_path / "gpt.toml"
    config.write_text('[model]\nspec = "examples.nanogpt:spec"\n')
    assert main(["plan", str(config)]) == 2
    assert "plan supports the built-in Transformer only" in capsys.readouterr().err


def test_the_proxy_loop_trains_a_spec_model():
    """What a sweep trial or transfer-check run does, on the nanoGPT GPT: 30 steps, held-out loss falls."""
    shape = shape_from_config(NANOGPT, "sweep")
    tc = ProxyTrain(steps=30, batch_size=4, seq_len=32, warmup=3, eval_every=10, eval_batches=2, eval_batch_size=4)
    result = train_proxy(shape, HParams(lr=0.01), tc, builtin_dataset())
    (_, first), (_, last) = result.val_losses[0], result.val_losses[-1]
    assert last < first < 5.6  # ln 256 = 5.55: it starts near uniform and learns
    assert len(result.train_losses) == 30


@pytest.mark.slow
def test_a_reduced_transfer_check_on_a_spec_model(tmp_path, capsys):
    """The transfer-check workers import the spec themselves: 2 widths x 3 LRs x 2 seeds of nanoGPT."""
    config = tmp_path / "gpt.toml"
    config.write_text("""
[transfer]
axis = "width"
values = [32, 64]
parametrizations = ["mup"]
lr_log2_low = -8
lr_log2_high = -4
lr_log2_step = 2
seeds = 2
last_evals = 1

[model]
spec = "examples.nanogpt:spec"
args = { width = 32, head_dim = 8 }

[train]
steps = 20
batch_size = 4
seq_len = 32
warmup = 2
eval_every = 10
eval_batches = 2
eval_batch_size = 4
""")
    rc = main(["transfer-check", str(config), "--out", str(tmp_path / "t"), "--workers", "2"])
    assert rc in (0, 1, 3)  # a verdict was reached on 2x (too small a span to pass: any verdict is fine)
    rows = (tmp_path / "t" / "runs.jsonl").read_text().splitlines()
    assert len(rows) == 12 and (tmp_path / "t" / "verdict.json").is_file()


def test_coord_check_command_takes_a_spec(tmp_path, capsys):
    """``mutransfer coord-check --spec``: the recorder, verdict and plot on a user's model (a reduced grid)."""
    out = tmp_path / "c"
    rc = main(["coord-check", "--spec", "examples.nanogpt:spec", "--set", "spec_args.head_dim=8", "--widths", "32,64",
               "--steps", "3", "--seeds", "1", "--out", str(out), "--threads", "1"])
    assert rc in (0, 1)  # a verdict on a 2x span: pass or fail, either is a verdict
    assert {p.name for p in out.iterdir()} >= {"coord.parquet", "verdict.json", "coord.png", "config.json"}
    config = (out / "config.json").read_text()
    assert '"spec": "examples.nanogpt:spec"' in config and "--spec examples.nanogpt:spec" in config
    assert main(["coord-check", "--spec", "examples.nanogpt:nope", "--out", str(tmp_path / "d")]) == 2
    assert "has no 'nope'" in capsys.readouterr().err


def test_model_roles_replace_the_specs_and_every_bad_name_is_listed(tmp_path, capsys):
    from examples.nanogpt import ROLES

    roles = {**ROLES, r"^transformer\.wpe\.weight$": "keep"}  # learned positions left alone
    shape = shape_from_config({"model": {**NANOGPT["model"], "roles": roles}}, "sweep")
    assert spec_of(shape.model).roles.role_of("transformer.wpe.weight").value == "keep"
    without_biases = {k: v for k, v in ROLES.items() if v != "bias"}
    with pytest.raises(ConfigError) as e:
        shape_from_config({"model": {**NANOGPT["model"], "roles": without_biases}}, "sweep")
    assert str(e.value).startswith("sweep.model.roles: 25 parameter(s) match no pattern")  # 4 blocks x 6 + ln_f
    assert "transformer.h.0.attn.c_attn.bias" in str(e.value) and "transformer.ln_f.bias" in str(e.value)
    # from the command line: exit 2, the names in the message, nothing run
    rc = main(["transfer-check", str(ROOT / "proxy_sweeps" / "lr_transfer_hf_llama.toml"), "--out", str(tmp_path / "t"),
               "--set", 'model.roles={"embed_tokens" = "embedding", "proj" = "hidden", "norm" = "norm_gain", '
                        '"layernorm" = "norm_gain"}'])
    err = capsys.readouterr().err
    assert rc == 2 and "match no pattern: ['lm_head.weight']" in err and "more than one pattern" in err


def test_a_factory_whose_width_changes_nothing_is_refused(tmp_path, monkeypatch):
    (tmp_path / "fixed_width.py").write_text(
        "from dataclasses import replace\n"
        "from examples.nanogpt import spec as nanogpt\n"
        "def spec():\n"
        "    s = nanogpt()\n"
        "    return replace(s, build=lambda width, depth: s.build(64, depth))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="no parameter changes shape between widths 64 and 128"):
        shape_from_config({"model": {"spec": "fixed_width:spec"}}, "sweep")


@pytest.mark.slow
def test_sweep_freeze_and_the_lock_in_a_users_loop_from_python(tmp_path):
    """docs/any_model.md's path on a reduced quick start: sweep the nanoGPT GPT, freeze, apply the lock."""
    import torch

    import mutransfer as mt
    from examples.nanogpt import spec as nanogpt_spec
    from proxy_sweeps.freeze import freeze
    from proxy_sweeps.sweep import run_sweep

    sweep_file = ROOT / "proxy_sweeps" / "quickstart_nanogpt.toml"
    small = ["sweep.trials=3", "train.steps=20", "train.eval_every=10", "train.batch_size=4", "train.seq_len=32",
             "search.warmup.high=10", "search.warmup.step=5", "sampler.n_startup_trials=3", "pruner.kind=none"]
    assert run_sweep(sweep_file, tmp_path / "gpt", workers=1, quiet=True, overrides=small) == 0
    lock = freeze(tmp_path / "gpt", tmp_path / "gpt.lock.json")
    assert lock["proxy_model"]["spec"] == "examples.nanogpt:spec"
    model, groups = mt.apply_lock(nanogpt_spec(), tmp_path / "gpt.lock.json", width=128)
    lr = lock["hparams"]["lr"]
    assert {g["role"]: g["base_lr"] for g in groups}["ffn_out"] == pytest.approx(lr / 2)
    optimizer = torch.optim.AdamW(groups)
    x = torch.randint(0, 256, (2, 33))
    nanogpt_spec().loss(model, x[:, :-1], x[:, 1:]).backward()
    optimizer.step()


@pytest.mark.slow
def test_the_full_scale_pipeline_trains_a_spec_model(tmp_path, capsys):
    """full_scale/smoke.toml's stages (batch and sequence steps, the switch to Muon, long context) on the
    nanoGPT GPT at twice its proxy width, from a lock frozen on that GPT."""
    from full_scale.metrics import read_rows
    from mutransfer.lockfile import write_lock

    proxy = shape_from_config({"model": {"spec": "examples.nanogpt:spec", "args": {"block_size": 512}}}, "t")
    write_lock(tmp_path / "gpt.lock.json", HParams(lr=3e-3), proxy.param, proxy.model, provenance={"study": "t"})
    smoke = (ROOT / "full_scale" / "smoke.toml").read_text()
    config = tmp_path / "gpt.toml"
    config.write_text(smoke.replace('preset = "tiny"', 'spec = "examples.nanogpt:spec"\nargs = { block_size = 512 }\n'
                                    'width = 128').replace("smoke.hparams.lock.json", "gpt.lock.json"))
    short = ["--set", "stages.warmup.steps=2", "--set", "stages.stable1.steps=2", "--set", "stages.stable2.steps=2",
             "--set", "stages.decay.steps=2", "--set", "stages.long_context.phases.0.steps=1",
             "--set", "stages.long_context.phases.1.steps=1", "--quiet"]
    # the smoke config's recipe Muon fuses Q|K|V and gate|up; this GPT names no fused sets (its c_attn is
    # one matrix already): refused before any compute, and per-matrix Muon runs
    assert main(["train", str(config), "--out", str(tmp_path / "fused"), *short]) == 2
    assert "optimizer.muon_fuse = true (optimizer.muon_fuse): the model spec of examples.nanogpt:spec names no " \
        "fused sets" in capsys.readouterr().err
    assert not (tmp_path / "fused").exists()
    short += ["--set", "optimizer.muon_fuse=false"]
    assert main(["train", str(config), "--out", str(tmp_path / "run"), *short]) == 0
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["optimizer"] for r in rows] == ["adamw"] * 6 + ["muon"] * 4
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["seq_len"] == 512
    bad = config.read_text().replace('name = "decay"', 'name = "decay"\nactivation_checkpointing = "full"')
    config.write_text(bad)
    assert main(["train", str(config), "--out", str(tmp_path / "bad"), *short]) == 2
    assert "stages[3] (decay).activation_checkpointing = 'full': a model spec's model" in capsys.readouterr().err
