"""A user's own model through its spec: roles by pattern, the Python API, and the nanoGPT example.

The nanoGPT-style GPT (examples/nanogpt.py) is a model mutransfer does not know: its parameters get
their roles from the spec's patterns, its multipliers from forward hooks. Its LR and init per
parameter must be the table's, and its coordinate check must pass under mup and fail under sp.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import mutransfer as mt
from examples.nanogpt import ROLES
from examples.nanogpt import spec as nanogpt_spec
from mutransfer.config import ConfigError, HParams
from mutransfer.parametrization import RoleMap
from mutransfer.spec import ModelSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
HP = HParams(lr=3e-3, init_std=0.05, weight_decay=0.1, alpha_out=2.5)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.numerical
def test_every_nanogpt_parameter_gets_the_tables_lr_and_init():
    spec = nanogpt_spec(width=64)
    model = mt.make_model(spec, width=256, hparams=HP, seed=0)  # m = 4
    groups = mt.param_groups(spec, model, HP)
    lr = {n: g["lr"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    params = dict(model.named_parameters())
    assert set(lr) == set(params)  # every parameter, once (the tied readout is the embedding's)
    m = 4
    for name, p in params.items():
        role = spec.roles.role_of(name).value
        if role in ("attn_qkv", "attn_out", "ffn_in", "ffn_out"):
            assert lr[name] == pytest.approx(HP.lr / m) and wd[name] == pytest.approx(HP.weight_decay * m)
            assert p.std().item() == pytest.approx(HP.init_std / math.sqrt(m), rel=0.05)  # >= 65k draws
        elif role in ("embedding", "pos_embedding"):
            assert lr[name] == pytest.approx(HP.lr) and wd[name] == pytest.approx(HP.weight_decay)
            assert p.std().item() == pytest.approx(HP.init_std, rel=0.05)
        elif role == "bias":
            assert lr[name] == pytest.approx(HP.lr) and wd[name] == 0 and torch.all(p == 0)
        else:  # norm gains
            assert role in ("norm_gain", "final_norm") and wd[name] == 0 and torch.all(p == 1)


@pytest.mark.numerical
def test_nanogpt_multipliers_are_hooks_with_the_tables_numbers():
    spec = nanogpt_spec(width=64)
    model = mt.make_model(spec, width=128, hparams=HP, seed=0)  # m = 2, depth 4 = base depth
    attn = model.transformer.h[0].attn
    assert attn.scale == pytest.approx(1 / 16)  # 1/d_head
    x = torch.randint(0, 256, (2, 16))
    logits, _ = model(x)
    h = model.transformer.ln_f
    seen = {}
    handle = h.register_forward_hook(lambda mod, args, out: seen.setdefault("h", out))
    model(x)
    handle.remove()
    expected = (HP.alpha_out / 2) * seen["h"] @ model.lm_head.weight.T  # the readout's input x alpha_out/m
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    emb = model.transformer.wte(x)
    torch.testing.assert_close(emb, HP.alpha_in * torch.nn.functional.embedding(x, model.transformer.wte.weight))
    # the model still deep-copies, and the copy computes the same (hooks are plain objects on modules)
    import copy

    torch.testing.assert_close(copy.deepcopy(model)(x)[0], logits)


def test_unmatched_and_twice_matched_names_are_listed_before_any_compute():
    partial = {k: v for k, v in ROLES.items() if "bias" not in k and "wpe" not in k}
    with pytest.raises(ConfigError) as e:
        mt.make_model(ModelSpec(**{**_fields(nanogpt_spec()), "roles": partial}), width=64)
    message = str(e.value)
    assert "match no pattern" in message and "transformer.wpe.weight" in message
    assert "transformer.h.3.mlp.c_proj.bias" in message and "transformer.ln_f.bias" in message
    twice = {**ROLES, r"\.weight$": "keep"}
    with pytest.raises(ConfigError, match=r"more than one pattern.*transformer\.wte\.weight"):
        mt.make_model(ModelSpec(**{**_fields(nanogpt_spec()), "roles": twice}), width=64)


def test_a_role_map_refuses_unknown_roles_and_bad_patterns():
    with pytest.raises(ConfigError, match=r"'matrix' is not a role; choose one of \[.*'readout'.*'keep'"):
        RoleMap({r"\.weight$": "matrix"})
    with pytest.raises(ConfigError, match="not a regular expression"):
        RoleMap({r"(": "bias"})
    assert RoleMap(ROLES).role_of("_orig_mod.transformer.h.0.attn.c_attn.weight").value == "attn_qkv"


def test_a_factory_whose_width_does_not_change_the_model_is_refused():
    fixed = nanogpt_spec()
    frozen = ModelSpec(**{**_fields(fixed), "build": lambda width, depth: fixed.build(64, depth)})
    with pytest.raises(ConfigError, match="same parameter shapes at widths"):
        mt.coord_check(frozen, widths=[64, 128])


def test_the_spec_loader_names_the_field_for_every_failure():
    assert load_spec("examples.nanogpt:spec", {"width": 32}).width == 32
    cases = [("examples.nanogpt", "expected 'package.module:factory'"),
             ("examples.no_such_module:spec", "does not import"),
             ("examples.nanogpt:no_such_factory", "has no 'no_such_factory'"),
             ("examples.nanogpt:GPTConfig", "returned GPTConfig, not a mutransfer ModelSpec")]
    for target, why in cases:
        with pytest.raises(ConfigError, match=re.escape(why)) as e:
            load_spec(target)
        assert str(e.value).startswith("model.spec = ")
    with pytest.raises(ConfigError, match="the factory raised TypeError"):
        load_spec("examples.nanogpt:spec", {"colour": "red"})


def test_a_multiplier_pattern_that_matches_nothing_is_an_error_naming_it():
    bad = ModelSpec(**{**_fields(nanogpt_spec()),
                       "multipliers": mt.Multipliers(embedding=r"^transformer\.wte$", readout=r"^head$")})
    with pytest.raises(ConfigError, match=r"multipliers\.readout = '\^head\$' matches no module"):
        mt.make_model(bad, width=64)


@pytest.mark.slow
def test_nanogpt_coordinate_check_passes_under_mup_and_fails_under_sp(tmp_path):
    """Widths 64..512 (m = 1..8), 10 steps, 2 seeds: mup's largest |slope| was 0.074 (threshold 0.1);
    sp fails on the logits, the residual stream and every update effect (slopes up to +2.4)."""
    spec = nanogpt_spec()
    mup = mt.coord_check(spec, widths=[64, 128, 256, 512], parametrization="mup", seeds=2, out=tmp_path / "mup")
    assert mup.passed and mup.exit_status == 0, mup.verdict["failing_modules"]
    assert (tmp_path / "mup" / "verdict.json").is_file() and (tmp_path / "mup" / "coord.parquet").is_file()
    sp = mt.coord_check(spec, widths=[64, 128, 256, 512], parametrization="sp", seeds=2)
    assert not sp.passed and sp.exit_status == 1
    assert {"output_logits", "dWx.attn_out", "dWx.ffn_out"} <= set(sp.verdict["failing_modules"])


@pytest.mark.slow
def test_the_any_model_doc_example_runs(tmp_path, monkeypatch):
    """The python block of docs/any_model.md, as a user would paste it (run in a scratch directory)."""
    doc = (ROOT / "docs" / "any_model.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/any_model.md", "exec"), {})
    assert (tmp_path / "runs" / "coord-nanogpt" / "verdict.json").is_file()


def _fields(spec: ModelSpec) -> dict:
    return {f: getattr(spec, f) for f in spec.__dataclass_fields__}


@pytest.mark.numerical
def test_a_lock_frozen_on_a_spec_model_drives_the_users_own_loop(tmp_path):
    from mutransfer.lockfile import write_lock
    from mutransfer.plan import shape_from_config

    proxy = shape_from_config({"model": {"spec": "examples.nanogpt:spec"}}, "sweep")  # width 64, depth 4
    frozen = HParams(lr=2e-3, init_std=0.03, weight_decay=0.05)
    write_lock(tmp_path / "lock.json", frozen, proxy.param, proxy.model, provenance={"study": "test"})
    model, groups = mt.apply_lock(nanogpt_spec(), tmp_path / "lock.json", width=256)
    lr = {g["role"]: g["base_lr"] for g in groups}
    assert lr["attn_qkv"] == pytest.approx(2e-3 / 4) and lr["embedding"] == pytest.approx(2e-3)  # m = 4
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.03 / 2, rel=0.05)
    schedule = mt.wsd(100, warmup=10, decay=20)
    optimizer = torch.optim.AdamW(groups)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * schedule.factor(5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(groups[0]["base_lr"] * 0.6)  # warmup: (5 + 1) / 10
    with pytest.raises(ConfigError, match="model.head_dim: lock has 16, this model has 8"):
        mt.apply_lock(nanogpt_spec(head_dim=8), tmp_path / "lock.json", width=256)
    builtin = ROOT / "full_scale" / "smoke.hparams.lock.json"
    with pytest.raises(ConfigError, match="frozen on the built-in Transformer"):
        mt.apply_lock(nanogpt_spec(), builtin)


@pytest.mark.numerical
def test_a_spec_models_checkpoint_round_trips(tmp_path):
    """Hooks live on modules, so a state dict holds only the weights and loads into a fresh build."""
    spec = nanogpt_spec()
    model = mt.make_model(spec, width=128, hparams=HP, seed=0)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = mt.make_model(spec, width=128, hparams=HP, seed=1)
    x = torch.randint(0, 256, (2, 16))
    assert not torch.equal(fresh(x)[0], model(x)[0])
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    torch.testing.assert_close(fresh(x)[0], model(x)[0], rtol=0, atol=0)


@pytest.mark.numerical
@pytest.mark.slow
def test_a_spec_model_compiles_block_by_block_like_eager():
    """configure_model(compile=True) compiles each of the spec's blocks in place: same names, same loss
    (to 1e-5: inductor fuses the elementwise ops and rounds differently), the hooks still applied."""
    from mutransfer.build import configure_model
    from mutransfer.config import TrainSettings

    spec = nanogpt_spec()
    eager = mt.make_model(spec, width=64, hparams=HP, seed=0)
    compiled = configure_model(mt.make_model(spec, width=64, hparams=HP, seed=0), TrainSettings(compile=True), spec)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    a, b = spec.loss(eager, x[:, :-1], x[:, 1:]), spec.loss(compiled, x[:, :-1], x[:, 1:])
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    b.backward()
    assert all(p.grad is not None for p in compiled.parameters())
