"""HuggingFace ``LlamaForCausalLM`` through its spec (mutransfer.hf_llama), against microsoft's mup.

The oracle is the same Llama set up as a mup user would: ``lm_head`` replaced by ``mup.MuReadout``
(forward ``output_mult * x / width_mult``), ``set_base_shapes`` with base and delta models at widths
64 and 128 (built on the meta device), ``mup.init.normal_(std=sigma)`` on every matrix and
``mup.MuAdamW``. Per parameter, the LR mup's optimizer holds and the init std mup's initialiser uses
must equal ours (to 1e-6 relative: both are products of the same few floats), and the logits of
the two models from the same weights must agree. Weight decay and Adam eps differ on purpose for
the norm gains and eps (tests/test_mup_oracle.py says why), so only LR and init are compared.
"""

from __future__ import annotations

import pytest
import torch

import mutransfer as mt
from mutransfer.config import HParams

transformers = pytest.importorskip("transformers", reason='HuggingFace transformers: pip install "mutransfer[hf]"')
mup = pytest.importorskip("mup", reason="microsoft mup: the test extra")

from mutransfer.hf_llama import llama_config  # noqa: E402
from mutransfer.hf_llama import spec as llama_spec  # noqa: E402

HP = HParams(lr=3e-3, init_std=0.05, weight_decay=0.1, alpha_out=2.5)
BASE, DELTA = 64, 128

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mup_llama(width: int, depth: int = 4, device: str = "cpu"):
    """The reference: LlamaForCausalLM with MuReadout, shaped by set_base_shapes, initialised by mup."""

    def unshaped(w: int, dev: str):
        with torch.device(dev):
            model = transformers.LlamaForCausalLM(llama_config(w, depth))
            model.lm_head = mup.MuReadout(w, 256, bias=False, output_mult=HP.alpha_out)
        return model

    model = unshaped(width, device)
    mup.set_base_shapes(model, unshaped(BASE, "meta"), delta=unshaped(DELTA, "meta"))
    return model


def mup_init_std(p: torch.Tensor) -> float:
    """The std ``mup.init.normal_(std=sigma)`` draws for ``p``: sigma / sqrt(width_mult) for matrix-like."""
    return HP.init_std * (p.infshape.width_mult() ** -0.5 if p.infshape.ninf() == 2 else 1.0)


@pytest.mark.numerical
@pytest.mark.parametrize("width", [64, 128, 256, 512])
def test_llama_lr_and_init_per_parameter_equal_mups(width):
    spec = llama_spec()
    ours = mt.make_model(spec, width=width, hparams=HP, seed=0)
    lr = {n: g["lr"] for g in mt.param_groups(spec, ours, HP) for n in g["names"]}
    ref = mup_llama(width)
    opt = mup.MuAdamW(ref.parameters(), lr=HP.lr, weight_decay=HP.weight_decay)
    ref_name = {id(p): n for n, p in ref.named_parameters()}
    ref_lr = {ref_name[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert set(lr) == set(ref_lr) == {n for n, _ in ours.named_parameters()}
    from mutransfer.parametrization import resolve

    param = mt.ParamConfig(d_base=BASE, depth_base=4)
    for name, p in ref.named_parameters():
        assert lr[name] == pytest.approx(ref_lr[name], rel=1e-6), name
        ours_std = resolve(name, spec.shape(width, 4), param, HP, "adamw", roles=spec.roles).init_std
        if p.ndim == 2:
            assert ours_std == pytest.approx(mup_init_std(p), rel=1e-6), name
        else:
            assert ours_std is None  # norm gains: ones in both
    hidden = [n for n in lr if "proj" in n]
    assert all(lr[n] == pytest.approx(HP.lr * BASE / width) for n in hidden)  # eta/m, m = width / 64


@pytest.mark.numerical
def test_llama_logits_equal_mup_readouts_from_the_same_weights():
    width = 256
    spec = llama_spec()
    ours = mt.make_model(spec, width=width, hparams=HParams(alpha_in=1.0, alpha_res=2.0, alpha_out=HP.alpha_out),
                         seed=0)
    ref = mup_llama(width)
    ref.load_state_dict(ours.state_dict())
    for layer in ref.model.layers:  # the constants a mup user writes into the model: softmax scale 1/d_head
        layer.self_attn.scaling = 1 / 16
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    # Our residual branch multiplier at the base depth is alpha_res / sqrt(L0) = 1: the same model.
    torch.testing.assert_close(spec.logits(ours, x), spec.logits(ref, x), rtol=1e-5, atol=1e-6)


def test_llama_fused_sets_for_muon():
    from mutransfer.hf_llama import fuse_key

    assert fuse_key("model.layers.3.self_attn.k_proj.weight") == "model.layers.3.qkv"
    assert fuse_key("model.layers.3.mlp.up_proj.weight") == "model.layers.3.gate_up"
    assert fuse_key("model.layers.3.mlp.down_proj.weight") == "model.layers.3.mlp.down_proj.weight"
    groups = mt.param_groups(llama_spec(), mt.make_model(llama_spec(), width=64), optimizer="muon")
    assert {g["role"] for g in groups["muon"]} == {"attn_qkv", "attn_out", "ffn_in", "ffn_out"}
    assert {g["role"] for g in groups["adamw"]} == {"embedding", "readout", "norm_gain", "final_norm"}


@pytest.mark.slow
def test_llama_coordinate_check_passes_under_mup_and_fails_under_sp():
    """Widths 64..512, 10 steps, 2 seeds, LR 0.02 (the check's Muon default): mup's largest |slope|
    from step 2 on was 0.095 -- a thin margin under 0.1, set by the output logits. The untied readout
    starts at sigma, so the logits shrink like m^-1/2 at init (muP's, and mup's MuReadout's) and need
    a few steps of updates to dominate: at LR 0.01 they still shrank by 0.13 at step 2."""
    settings = dict(widths=[64, 128, 256, 512], seeds=2, lr=0.02)
    mup_result = mt.coord_check(llama_spec(), parametrization="mup", **settings)
    assert mup_result.passed, mup_result.summary()
    sp_result = mt.coord_check(llama_spec(), parametrization="sp", **settings)
    assert not sp_result.passed
    assert {"output_logits", "dWx.attn_out", "dWx.ffn_out", "residual"} <= set(sp_result.verdict["failing_modules"])


def mup_written_build(width: int, depth: int):
    """A user's build for a model already written for mup: MuReadout, and set_base_shapes inside."""
    with torch.device("meta"):
        base, delta = mup_llama_unshaped(BASE, depth), mup_llama_unshaped(DELTA, depth)
    model = mup_llama_unshaped(width, depth)
    mup.set_base_shapes(model, base, delta=delta)
    return model


def mup_llama_unshaped(width: int, depth: int):
    model = transformers.LlamaForCausalLM(llama_config(width, depth))
    model.lm_head = mup.MuReadout(width, 256, bias=False, output_mult=HP.alpha_out)
    return model


@pytest.mark.numerical
def test_a_model_written_for_mup_is_used_as_it_is():
    """Roles read from its shapes (mup's base and delta widths), no logit hook (MuReadout divides by
    width_mult itself): per-parameter LR equal to MuAdamW's on the same model, and its logits are
    MuReadout's own."""
    from mutransfer.hf_llama import MULTIPLIERS, logits, loss
    spec = mt.mup_spec(mup_written_build, width=BASE, depth=4, head_dim=16, name="mup-llama",
                    multipliers=mt.Multipliers(attn_scale=MULTIPLIERS.attn_scale), loss=loss, logits=logits,
                    blocks=r"^model\.layers\.\d+$", taps={"output_logits": r"^lm_head$"}, vocab_size=256)
    roles = {n: spec.roles.role_of(n).value for n, _ in mup_written_build(64, 4).named_parameters()}
    assert roles["lm_head.weight"] == "readout" and roles["model.embed_tokens.weight"] == "embedding"
    assert roles["model.layers.0.mlp.down_proj.weight"] == "hidden" and roles["model.norm.weight"] == "norm_gain"
    model = mt.make_model(spec, width=256, hparams=HP, seed=0)
    ours = {n: g["lr"] for g in mt.param_groups(spec, model, HP, width=256, depth=4) for n in g["names"]}
    opt = mup.MuAdamW(model.parameters(), lr=HP.lr)
    name = {id(p): n for n, p in model.named_parameters()}
    theirs = {name[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert ours.keys() == theirs.keys()
    assert all(ours[n] == pytest.approx(theirs[n], rel=1e-6) for n in ours), {n: (ours[n], theirs[n]) for n in ours}
    x = torch.randint(0, 256, (2, 8))
    h = model.model(input_ids=x).last_hidden_state
    torch.testing.assert_close(logits(model, x), HP.alpha_out / 4 * h @ model.lm_head.weight.T, rtol=1e-5, atol=1e-6)
