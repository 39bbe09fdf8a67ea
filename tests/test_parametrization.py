"""The muP table: roles by name, per-group values at width, forward multipliers, plan numbers."""

import json
import math

import pytest
import torch

from mutransfer.build import build_model
from mutransfer.cli import main
from mutransfer.config import ConfigError, HParams, ParamConfig, parse
from mutransfer.parametrization import Role, forward_multipliers, param_groups, resolve, role_of
from mutransfer.plan import make_plan
from mutransfer.presets import at_width, get_preset
from mutransfer.transformer_spec import ROLE_MAP

pytestmark = pytest.mark.numerical  # compares kernel outputs with tolerances: CI runs it twice


def test_roles_by_name():
    assert role_of("tok_embeddings.weight", ROLE_MAP) is Role.EMBEDDING
    assert role_of("layers.3.attention.wk.weight", ROLE_MAP) is Role.ATTN_QKV
    assert role_of("layers.3.attention.wo.weight", ROLE_MAP) is Role.ATTN_OUT
    assert role_of("layers.0.feed_forward.w3.weight", ROLE_MAP) is Role.FFN_IN
    assert role_of("layers.0.feed_forward.w2.weight", ROLE_MAP) is Role.FFN_OUT
    assert role_of("layers.0.ffn_norm.weight", ROLE_MAP) is Role.NORM_GAIN  # block gains: inside the residual branches
    assert role_of("layers.11.attention_norm.weight", ROLE_MAP) is Role.NORM_GAIN
    assert role_of("norm.weight", ROLE_MAP) is Role.FINAL_NORM  # the final norm: outside every branch
    assert role_of("_orig_mod.norm.weight", ROLE_MAP) is Role.FINAL_NORM
    assert role_of("_orig_mod.layers.1.attention.wq.weight", ROLE_MAP) is Role.ATTN_QKV  # torch.compile prefix
    with pytest.raises(KeyError, match="matches no muP role"):
        role_of("layers.0.attention.bias", ROLE_MAP)


def test_every_parameter_of_every_preset_has_a_role():
    for name in ("tiny", "proxy-20m", "xmodel25-1.3b"):
        model = build_model(get_preset(name), HParams(), device="meta")
        roles = {role_of(n, ROLE_MAP) for n, _ in model.named_parameters()}
        # the roles the built-in Transformer has (no readout, position embedding, bias, keep or generic hidden)
        assert roles == set(Role) - {Role.READOUT, Role.POS_EMBEDDING, Role.BIAS, Role.KEEP, Role.HIDDEN}


def test_xmodel_plan_1p3b_matches_recipe():
    shape = get_preset("xmodel25-1.3b")
    plan = make_plan(shape, HParams(lr=0.01))
    assert 1.30e9 <= plan["params_total"] <= 1.40e9
    assert plan["width_multiplier"] == 6
    lrs = {g["role"]: g["lr"] for g in plan["param_groups"]}
    for role in ("attn_qkv", "attn_out", "ffn_in", "ffn_out", "norm_gain", "final_norm"):
        assert lrs[role] == pytest.approx(0.01 / 6, rel=1e-12)  # RECIPE: 1.667e-3 for every hidden param
    assert lrs["embedding"] == pytest.approx(0.01)
    inits = {g["role"]: g["init_std"] for g in plan["param_groups"]}
    assert inits["embedding"] == pytest.approx(0.1)
    assert inits["attn_qkv"] == pytest.approx(0.1 / math.sqrt(6))
    assert inits["ffn_out"] == pytest.approx(0.1 / math.sqrt(2 * 48))  # the recipe's unscaled output side
    mult = forward_multipliers(shape.model, shape.param, HParams())
    assert mult.embedding == 12 and mult.logits == pytest.approx(1 / 6)
    assert mult.residual_attn == mult.residual_ffn == pytest.approx(1.4 / math.sqrt(48))
    assert mult.attn_scale == pytest.approx(1 / 64)


def test_plan_cli_json_fast_on_meta(capsys):
    assert main(["plan", "xmodel25-1.3b", "--json", "--lr", "0.01"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"params_total", "params_non_embedding", "flops_per_token", "param_groups"} <= set(plan)
    assert 1.10e9 < plan["params_non_embedding"] < 1.20e9
    hidden = [g for g in plan["param_groups"] if g["role"] == "attn_qkv"][0]
    assert f"{hidden['lr']:.4g}" == "0.001667"
    assert {"role", "lr", "init_std", "weight_decay"} <= set(hidden)
    # FLOPs per token: 6 N_matmul + 6 L H d_head T with T = 4096
    m = get_preset("xmodel25-1.3b").model
    attn = 6 * m.n_layers * m.n_heads * m.head_dim * 4096
    assert plan["flops_per_token"] == 6 * plan["params_total"] - 6 * 97 * 1536 + attn  # norms are no matmul


@pytest.mark.parametrize("width", [64, 256, 1024])
def test_mup_hidden_scaling_with_width(width):
    base = get_preset("tiny")
    model_cfg = at_width(base.model, width)
    m = width / 64
    hp = HParams(lr=0.02, init_std=0.05, weight_decay=0.1, adam_eps=1e-8)
    param = ParamConfig(parametrization="mup", d_base=64, depth_base=4)
    s = resolve("layers.1.feed_forward.w2.weight", model_cfg, param, hp, "adamw", roles=ROLE_MAP)
    assert (s.lr, s.init_std, s.weight_decay, s.eps) == pytest.approx((0.02 / m, 0.05 / math.sqrt(m), 0.1 * m,
                                                                       1e-8 / m))
    assert s.lr * s.weight_decay == pytest.approx(0.002)  # independent weight decay: width-free product
    e = resolve("tok_embeddings.weight", model_cfg, param, hp, "adamw", roles=ROLE_MAP)
    assert (e.lr, e.init_std, e.weight_decay, e.eps) == pytest.approx((0.02, 0.05, 0.1, 1e-8 / m))
    for name in ("layers.0.attention_norm.weight", "norm.weight"):  # eps/m for every AdamW group
        n = resolve(name, model_cfg, param, hp, "adamw", roles=ROLE_MAP)
        assert n.lr == 0.02 and n.weight_decay == 0 and n.init_std is None
        assert n.eps == pytest.approx(1e-8 / m)
        assert resolve(name, model_cfg, param, hp, "muon", roles=ROLE_MAP).eps == pytest.approx(1e-8 / m)  # still AdamW
    mu = resolve("layers.0.attention.wq.weight", model_cfg, param, hp, "muon", roles=ROLE_MAP)
    assert mu.optimizer == "muon" and mu.lr == pytest.approx(0.02 / math.sqrt(m))
    assert mu.muon_adjust == "match_rms_adamw"


def test_depth_relative_to_base():
    base = get_preset("tiny")
    deep = base.model.__class__(**{**base.model.__dict__, "n_layers": 16})
    hp = HParams()
    p_half = ParamConfig(parametrization="mup", d_base=64, depth_base=4, depth_alpha=0.5)
    p_one = ParamConfig(parametrization="mup", d_base=64, depth_base=4, depth_alpha=1.0)
    assert forward_multipliers(base.model, p_half, hp).residual_attn == pytest.approx(1.4 / 2)
    assert forward_multipliers(deep, p_half, hp).residual_attn == pytest.approx(1.4 / 2 / 2)  # (4/16)^0.5
    assert forward_multipliers(deep, p_one, hp).residual_attn == pytest.approx(1.4 / 2 / 4)  # CompleteP
    s = resolve("layers.0.attention.wq.weight", deep, p_half, hp, "adamw", roles=ROLE_MAP)
    assert s.lr == pytest.approx(0.01 * 4**-0.5)  # (L/L0)^(a-1)
    assert s.weight_decay == pytest.approx(0.1 * 4**0.5)  # (L/L0)^(1-a): lr * wd depth-free
    assert s.eps == pytest.approx(1e-8 * 4**-0.5)  # (L0/L)^a
    assert resolve("layers.0.attention.wq.weight", deep, p_one, hp, "adamw", roles=ROLE_MAP).lr == pytest.approx(0.01)
    # block norm gains sit inside the branches: the hidden matrices' depth factors (CompleteP's reference)
    g = resolve("layers.7.ffn_norm.weight", deep, p_half, hp, "adamw", roles=ROLE_MAP)
    assert (g.lr, g.weight_decay, g.eps) == pytest.approx((0.01 * 4**-0.5, 0.0, 1e-8 * 4**-0.5))
    g = resolve("layers.7.ffn_norm.weight", deep, p_one, hp, "adamw", roles=ROLE_MAP)
    assert (g.lr, g.eps) == pytest.approx((0.01, 1e-8 / 4))
    # the embedding and the final norm sit outside: no depth factor
    for p in (p_half, p_one):
        for name in ("norm.weight", "tok_embeddings.weight"):
            s = resolve(name, deep, p, hp, "adamw", roles=ROLE_MAP)
            assert (s.lr, s.eps) == (0.01, 1e-8)


@pytest.mark.parametrize("alpha", [0.5, 0.75, 1.0])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_mup_numerics_at_the_base_shape_are_the_shipped_ones(optimizer, alpha):
    """m = 1, L = L0: every factor is 1, so each parameter gets the base values (what the smoke lock and
    the tiny tests were made with): embedding (eta, lambda, eps, sigma), hidden matrices (eta, lambda,
    eps or Muon's, sigma), norm gains (eta, 0, eps, ones)."""
    shape = get_preset("tiny")
    param = ParamConfig(parametrization="mup", d_base=64, depth_base=4, depth_alpha=alpha)
    hp = HParams(lr=0.02, init_std=0.05, weight_decay=0.1, adam_eps=1e-8, muon_eps=1e-7)
    model = build_model(shape, hp, device="meta")
    for name, _ in model.named_parameters():
        s = resolve(name, shape.model, param, hp, optimizer, roles=ROLE_MAP)
        hidden = s.role not in (Role.EMBEDDING, Role.NORM_GAIN, Role.FINAL_NORM)
        gain = s.role in (Role.NORM_GAIN, Role.FINAL_NORM)
        assert s.lr == 0.02, name
        assert s.weight_decay == (0.0 if gain else 0.1), name
        assert s.eps == (1e-7 if hidden and optimizer == "muon" else 1e-8), name
        assert s.init_std == (None if gain else 0.05), name


def test_every_role_has_a_row_and_the_split_norm_roles_keep_xmodel_and_sp():
    from mutransfer.parametrization import TABLE, describe_table

    for key, rows in TABLE.items():
        assert set(rows) == set(Role), key
    for p in ("xmodel", "sp"):  # one rule for every norm gain, as before the split
        assert TABLE[(p, "adamw")][Role.FINAL_NORM] == TABLE[(p, "adamw")][Role.NORM_GAIN]
    table = describe_table()
    for p in ("xmodel", "mup", "sp"):
        assert f"| {p} | adamw | final_norm |" in table and f"| {p} | adamw | norm_gain |" in table


def test_sp_is_the_control():
    shape = get_preset("tiny")
    wide = at_width(shape.model, 512)
    param = ParamConfig(parametrization="sp", d_base=64, depth_base=4)
    hp = HParams()
    lrs = {resolve(n, wide, param, hp, "adamw", roles=ROLE_MAP).lr for n in
           ("tok_embeddings.weight", "layers.0.attention.wq.weight", "norm.weight")}
    assert lrs == {hp.lr}
    mult = forward_multipliers(wide, param, hp)
    assert mult.logits == hp.alpha_out and mult.attn_scale == pytest.approx(1 / 4)


def test_param_groups_cover_every_parameter_once():
    shape = get_preset("tiny")
    model = build_model(shape, HParams())
    for kind in ("adamw", "muon"):
        groups = param_groups(model, shape.model, shape.param, HParams(), kind, roles=ROLE_MAP)
        seen = [id(p) for gs in groups.values() for g in gs for p in g["params"]]
        assert len(seen) == len(set(seen)) == len(list(model.parameters()))
        if kind == "muon":
            muon_names = sorted(n for g in groups["muon"] for n in g["names"])
            expected = sorted(n for n, p in model.named_parameters() if p.ndim == 2 and "tok_embeddings" not in n)
            assert muon_names == expected


def test_init_follows_table():
    shape = get_preset("tiny")
    shape = shape.__class__(model=at_width(shape.model, 512), param=shape.param)
    model = build_model(shape, HParams(init_std=0.2), seed=1)
    w = model.layers[0].feed_forward.w1.weight
    assert w.std().item() == pytest.approx(0.2 / math.sqrt(8), rel=0.02)
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    again = build_model(shape, HParams(init_std=0.2), seed=1)
    assert torch.equal(again.layers[0].feed_forward.w1.weight, w)


def test_bad_input_names_the_field(capsys):
    with pytest.raises(ConfigError, match="preset"):
        get_preset("gpt5")
    with pytest.raises(ConfigError, match="head_dim"):
        at_width(get_preset("tiny").model, 100)
    with pytest.raises(ConfigError, match=r"param.parametrization: input should be 'xmodel', 'mup' or 'sp'"):
        parse(ParamConfig, {"parametrization": "ntk"}, "param")
    assert main(["plan", "nope"]) == 2
    assert "preset" in capsys.readouterr().err
    assert main(["plan", "tiny", "--width", "72"]) == 2
    assert "head_dim" in capsys.readouterr().err


def test_docs_page_shows_the_table_in_the_code():
    from pathlib import Path

    from mutransfer.parametrization import describe_table

    doc = (Path(__file__).parent.parent / "docs" / "mup_table.md").read_text()
    between = doc.split("<!-- table:start -->\n")[1].split("\n<!-- table:end -->")[0]
    assert between == describe_table()
