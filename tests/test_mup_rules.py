"""Measured checks behind the ``mup`` table's width and depth rules (docs/mup_table.md, "Measured").

Real numbers on the ``tiny`` preset under ``mup`` with real text (the built-in corpus), from the
functions of ``benchmarks/mup_rules.py``, which prints the same figures over wider ranges:

1. Adam eps. Gradient RMS per role shrinks like 1/m for every role -- embedding, block and final
   norm gains, hidden matrices -- so each AdamW group's eps must too: eps / RMS(grad) is
   width-flat for every AdamW group (a width-free eps would have slope about +1). Against depth,
   gradients inside the residual branches (hidden matrices, block norm gains) shrink like
   (L0/L)^a and those outside (embedding, final norm) do not; eps / RMS(grad) is depth-flat too.
2. Norm gains' depth rule. One AdamW step that moves only the block norm gains lowers the loss by
   the same amount at every depth with their LR x (L/L0)^(a-1); at the base LR (the rule before)
   the decrease grows with depth. The final norm is the other way round: the base LR is flat.
3. Weight-decay timescale. tau = 1/(lr * wd) steps, per block, measured from the decay of the
   init component: depth-flat under the table's m (L/L0)^(1-a); CompleteP's reference lambda * m
   lets it grow like (L/L0)^(1-a) (x2 from L = 4 to 16 at a = 1/2; the same rule at a = 1).
"""

from __future__ import annotations

import math

import pytest

from benchmarks import mup_rules as M
from mutransfer.parametrization import HIDDEN_MATRIX_ROLES, Role

FLAT = 0.25  # |log2 slope| below this is flat; a slope within this of the prediction matches it
WIDTHS = (64, 128, 256, 512)
DEPTHS = (4, 8, 16, 32)  # at a = 1 the final gain's gradient still creeps up from L = 4 to 8, then settles
BLOCK = (*(r.value for r in HIDDEN_MATRIX_ROLES if r is not Role.HIDDEN), Role.NORM_GAIN.value)  # inside the branches
OUTSIDE = (Role.EMBEDDING.value, Role.FINAL_NORM.value)
TINY_ROLES = {*BLOCK, *OUTSIDE}  # the roles the built-in Transformer has
ADAMW_ROLES = {"adamw": TINY_ROLES, "muon": {*OUTSIDE, Role.NORM_GAIN.value}}


pytestmark = [pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
              pytest.mark.numerical]  # compares kernel outputs: CI runs it twice (pyproject.toml)


@pytest.fixture(scope="module")
def width_scan():
    shapes = M.width_shapes(WIDTHS)
    return shapes, M.grad_scan(shapes)


@pytest.fixture(scope="module", params=[0.5, 1.0], ids=["a=0.5", "a=1"])
def depth_scan(request):
    shapes = M.depth_shapes(request.param, DEPTHS)
    return request.param, shapes, M.grad_scan(shapes)


def test_gradients_shrink_like_one_over_width_for_every_role(width_scan):
    _, scan = width_scan
    assert set(scan["grad_slope"]) == TINY_ROLES
    for role, slope in scan["grad_slope"].items():
        assert abs(slope + 1.0) <= FLAT, (role, slope, scan["grad_rms"][role])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_adam_eps_over_gradient_is_width_flat_for_every_adamw_group(width_scan, optimizer):
    shapes, scan = width_scan
    eps = M.eps_scan(scan, shapes, optimizer=optimizer)
    assert set(eps["eps_over_grad_slope"]) == ADAMW_ROLES[optimizer]
    for role, slope in eps["eps_over_grad_slope"].items():
        assert abs(slope) <= FLAT, (role, slope, eps["eps"][role], scan["grad_rms"][role])
        # a width-free eps (what the embedding and the norm gains had before) is not flat
        assert eps["const_eps_slope"][role] >= 1.0 - FLAT, role


def test_gradients_against_depth_follow_the_branch_multiplier(depth_scan):
    alpha, _, scan = depth_scan
    for role in BLOCK:
        assert abs(scan["grad_slope"][role] + alpha) <= FLAT, (role, scan["grad_slope"][role])
    for role in OUTSIDE:
        assert abs(scan["grad_slope"][role]) <= FLAT, (role, scan["grad_slope"][role])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_adam_eps_over_gradient_is_depth_flat_for_every_adamw_group(depth_scan, optimizer):
    alpha, shapes, scan = depth_scan
    eps = M.eps_scan(scan, shapes, optimizer=optimizer)
    assert set(eps["eps_over_grad_slope"]) == ADAMW_ROLES[optimizer]
    for role, slope in eps["eps_over_grad_slope"].items():
        assert abs(slope) <= FLAT, (role, slope)
        if role in BLOCK:  # a depth-free eps inside the branches would not be flat
            assert eps["const_eps_slope"][role] >= alpha - FLAT, role


def test_block_norm_gains_take_the_depth_factor_and_the_final_norm_does_not():
    """a = 1/2: one AdamW step moving only the block gains (only the final gain) lowers the loss by a
    depth-flat amount under the table's LR; the other rule's decrease grows (shrinks) with depth."""
    eff = M.step_effects(0.5, DEPTHS, moved=(Role.NORM_GAIN.value, Role.FINAL_NORM.value))
    gains, final = eff[Role.NORM_GAIN.value], eff[Role.FINAL_NORM.value]
    assert all(d > 0 for v in (*gains.values(), *final.values()) for d in v["loss_drop"])
    assert abs(gains["table: (L/L0)^(a-1)"]["slope"]) <= FLAT, gains
    assert gains["base LR (before)"]["slope"] >= FLAT, gains
    assert abs(final["table: base LR"]["slope"]) <= FLAT, final
    assert final["block factor (L/L0)^(a-1)"]["slope"] <= -FLAT, final


def test_norm_gain_rules_are_depth_flat_at_a_equal_one():
    eff = M.step_effects(1.0, DEPTHS, moved=(Role.NORM_GAIN.value, Role.FINAL_NORM.value))
    assert abs(eff[Role.NORM_GAIN.value]["table: (L/L0)^(a-1)"]["slope"]) <= FLAT, eff
    assert abs(eff[Role.FINAL_NORM.value]["table: base LR"]["slope"]) <= FLAT, eff


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_weight_decay_timescale_is_depth_flat_per_block_with_zero_gradients(alpha):
    """Pure decoupled decay in real AdamW steps: every block's init component shrinks with
    tau = 1/(eta * lambda) steps at L = 4 and 16 under the table; lambda * m alone: tau x (L/L0)^(1-a)."""
    steps = 10
    hp = M.HP
    expected = -1.0 / math.log1p(-hp.lr * hp.weight_decay)  # 999.5 steps
    for depth in (4, 16):
        shape = M.tiny_shape(depth=depth, alpha=alpha)
        tau = M.decay_timescale(shape, 1.0, steps, real_gradients=False)
        assert sorted(tau) == list(range(depth))
        for block, t in tau.items():
            assert t == pytest.approx(expected, rel=1e-3), (depth, block)
        completep = M.decay_timescale(shape, M.depth_factor(shape), steps, real_gradients=False)
        ratio = (depth / 4) ** (1.0 - alpha)  # 2 at a = 1/2 and L = 16; 1 at a = 1
        for block, t in completep.items():
            assert t == pytest.approx(expected * ratio, rel=1e-3), (depth, block)


@pytest.mark.slow
def test_weight_decay_timescale_is_depth_flat_in_real_training():
    """30 AdamW steps on real text, a = 1/2, base weight decay 1 (tau = 100 steps): per block, the
    init component's timescale is depth-flat under the table and doubles from L = 4 to 16 under
    lambda * m (measured 0.95 and 1.94 over 40 steps)."""
    rows = M.decay_timescales(depths=(4, 16), alphas=(0.5,), steps=30, real_gradients=True,
                              hp=M.HP.model_copy(update={"weight_decay": 1.0}))
    by = {(r["rule"], r["depth"]): r for r in rows}
    table, ref = "table: m (L/L0)^(1-a)", "CompleteP ref: m"
    for row in rows:
        assert 0.8 <= row["tau_min"] / row["tau_predicted"] and row["tau_max"] / row["tau_predicted"] <= 1.25, row
    assert by[(table, 16)]["tau_ratio_to_L0"] == pytest.approx(1.0, abs=0.15)
    assert by[(ref, 16)]["tau_ratio_to_L0"] >= 1.6
