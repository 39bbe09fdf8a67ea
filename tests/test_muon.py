"""The one Muon: bit-identical to torch.optim.Muon on plain tensors with torch's bfloat16 iteration
(float32 on CPU, for speed, equal to it to bf16 rounding); fused Q|K|V and gate|up sets are
orthogonalised as one matrix and scaled by the fused shape (the recipe's Megatron)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

import mutransfer.muon as muon
from mutransfer.build import build_model
from mutransfer.config import HParams
from mutransfer.optim import build_optimizers
from mutransfer.presets import get_preset
from mutransfer.transformer_spec import transformer_spec

pytestmark = pytest.mark.numerical  # compares kernel outputs with tolerances: CI runs it twice


def one_step(fuse: bool, seed: int = 0):
    shape = get_preset("tiny")
    hp = HParams()
    model = build_model(shape, hp, seed=seed)
    opts = build_optimizers(model, transformer_spec(shape.model), shape.model, shape.param, hp, "muon", fuse=fuse)
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(seed))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opts.step()
    return model, opts, grads, before


@pytest.fixture
def bf16_iteration(monkeypatch):
    """Newton-Schulz in bfloat16 on CPU too, as torch (and our GPU path) runs it."""
    monkeypatch.setattr(muon, "ns_dtype", lambda device: torch.bfloat16)


def test_newton_schulz_is_torchs_iteration():
    g = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    for x in (g, g.T):
        ref = _zeropower_via_newtonschulz(x, (3.4445, -4.775, 2.0315), 5, 1e-7)
        assert torch.equal(muon.newton_schulz(x, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.bfloat16), ref)
        fp32 = muon.newton_schulz(x, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)
        assert fp32.dtype == torch.float32 and fp32.shape == x.shape
        torch.testing.assert_close(fp32, ref.float(), rtol=0, atol=0.05)  # bf16's rounding, nothing more
    assert muon.ns_dtype(torch.device("cpu")) == torch.float32
    assert muon.ns_dtype(torch.device("meta")) == torch.bfloat16


def test_unfused_matches_torch_muon_bit_for_bit(bf16_iteration):
    model, opts, grads, before = one_step(fuse=False)
    ref_params = {n: torch.nn.Parameter(before[n].clone()) for n in before}
    groups = []
    for g in opts.optimizers["muon"].param_groups:
        ps = [ref_params[n] for n in g["names"]]
        for p, n in zip(ps, g["names"], strict=True):
            p.grad = grads[n].clone()
        groups.append({k: v for k, v in g.items() if k not in ("params", "names", "fuse", "role", "base_lr")}
                      | {"params": ps})
    torch.optim.Muon(groups).step()
    for g in opts.optimizers["muon"].param_groups:
        for n in g["names"]:
            assert torch.equal(dict(model.named_parameters())[n], ref_params[n]), n


def test_fused_sets_are_orthogonalised_together_and_scaled_by_the_fused_shape(bf16_iteration):
    model, opts, grads, before = one_step(fuse=True)
    group = next(g for g in opts.optimizers["muon"].param_groups if g["role"] == "attn_qkv")
    hp = HParams()
    names = [f"layers.0.attention.w{x}.weight" for x in "qkv"]
    # momentum starts at zero (torch's own ops, so the bf16 Newton-Schulz sees the same input)
    updates = []
    for n in names:
        buf = torch.zeros_like(grads[n]).lerp_(grads[n], 1 - hp.muon_momentum)
        updates.append(grads[n].lerp(buf, hp.muon_momentum))
    stacked = torch.cat(updates, dim=0)
    ortho = _zeropower_via_newtonschulz(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"]).float()
    scale = group["lr"] * 0.2 * math.sqrt(max(stacked.shape))
    params = dict(model.named_parameters())
    start = 0
    for n, u in zip(names, updates, strict=True):
        rows = u.shape[0]
        expected = before[n] * (1 - group["lr"] * group["weight_decay"]) - scale * ortho[start:start + rows]
        torch.testing.assert_close(params[n].detach(), expected, rtol=0, atol=1e-7)
        start += rows
    # a different direction from per-matrix Muon: fusing is not a no-op
    unfused, _, _, _ = one_step(fuse=False)
    assert not torch.allclose(dict(unfused.named_parameters())[names[1]], params[names[1]])
