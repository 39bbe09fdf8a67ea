"""Oracle: our ``mup`` parametrization against microsoft's ``mup`` package (1.0.0), role by role.

The same small transformer (tiny preset family, widths 64..512 so m = 1..8, base width d_base = 64,
depth = base depth 4 so every depth factor is 1; at depth 8 in "Depth" below) is built twice: by
``mutransfer.build.build_model`` with our table, and as a mup user would (tests/mup_reference.py:
``set_base_shapes`` with base width 64 and delta width 128, ``mup.init``, ``MuSharedReadout``,
``MuAdamW``). m = d / 64 is our width multiplier; mup infers the same number as
``p.infshape.width_mult()`` (the fan-in ratio; for the FFN's w2 that is ffn / 160).

What agrees (exactly, rel 1e-12, and in real optimizer steps):
- Classification: mup sees the hidden matrices (wq, wk, wv, wo, w1, w3, w2) as matrix-like (two
  infinite dims, width_mult = m) and the embedding (vocab finite x d infinite) and norm gains as
  vector-like; these are our HIDDEN_MATRIX_ROLES and the rest.
- LR: hidden matrices eta/m, embedding (= tied readout) and norm gains (block and final) eta.
- Weight decay, hidden matrices and embedding: mup 1.0.0's MuAdamW always multiplies a matrix-like
  group's weight_decay by width_mult (this version has no ``decoupled_wd`` switch; later releases
  call this its default, decoupled_wd=False), which is our lambda*m, independent weight decay:
  with torch's AdamW the per-step shrink 1 - lr*wd = 1 - eta*lambda is width-free in both.
  Embedding: lambda in both.
- Init: ``mup.init.normal_(std=sigma)`` gives matrix-like tensors sigma/sqrt(m), the same as ours
  for every hidden role, the output-side ones (attn_out, ffn_out) included; embedding sigma, norm
  gains ones. Seeded alike, the two initialisations are the same tensors, and the measured stds
  match the table.
- Logits: MuSharedReadout computes (output_mult * h / width_mult) E^T; our TiedLogits multiplier is
  alpha_out/m, the same number, and the two models give the same logits from the same weights.
  The shared weight keeps the embedding's vector-like rules in both (LR eta, decay lambda, init sigma).
- Embedding and residual multipliers are width-free constants in both.
- Attention scale: the package leaves it to the model; muP's recommendation is attn_mult/d_head.
  Ours is 1/d_head (attn_mult = 1), i.e. 1/16 at every width of this family (head_dim is fixed);
  the ``sp`` control uses 1/sqrt(d_head) = 1/4, the one place the two differ at the base shape.

What differs on purpose (each tested as a difference):
1. Adam eps: ours scales every AdamW group's eps by 1/m -- embedding, norm gains and hidden
   matrices, whose gradients all shrink like 1/m (Everett et al. 2024, arXiv 2407.05872; measured in
   tests/test_mup_rules.py) -- mup keeps one eps for every group. Same at m = 1; with gradients of
   size eps the first Adam update of any parameter is 2m/(m+1) times mup's.
2. Norm gains (block and final): mup gives them (vector-like) the base weight decay lambda; ours
   gives them none.
3. Tied readout: mup's answer for the readout is MuReadout (forward / width_mult, weight
   vector-like, optionally zero-initialised). We tie it to the embedding, so it cannot be
   zero-initialised, and it takes the embedding's init sigma. ``set_base_shapes`` (rescale_params=True,
   its default) multiplies a MuReadout's weight by sqrt(width_mult), converting a torch-default
   fan-in readout init to muP; on a tied weight that would make the embedding's std grow like
   sqrt(m), so a mup user with tied weights must initialise after set_base_shapes (the reference
   does), and our init gives sigma directly.

Depth. mup has width rules only, so at a depth L != L0 (L = 8, L0 = 4, a = 1/2 and 1, the reference
built at the same depth) our settings divided by the documented depth factor must still be mup's
width rule, and the depth factor must be exactly the documented one (docs/mup_table.md): LR
(L/L0)^(a-1) inside the residual branches (hidden matrices, block norm gains), none for the embedding
and the final norm; weight decay (L/L0)^(1-a) on the hidden matrices, so lr * wd -- the per-step
decay, tested in a real step -- is mup's at every depth; eps (L0/L)^a inside the branches; init
none. At a = 1/2 our branch multiplier alpha_res/sqrt(L0) * (L0/L)^(1/2) is the alpha_res/sqrt(L) a
mup user writes, so the two models give the same logits; at a = 1 (CompleteP) ours is smaller by
(L0/L)^(1/2), on purpose.
"""

from __future__ import annotations

import math

import mup
import pytest
import torch

from mutransfer.build import build_model
from mutransfer.config import HParams, ParamConfig, RunShape
from mutransfer.parametrization import (
    HIDDEN_MATRIX_ROLES,
    Role,
    forward_multipliers,
    param_groups,
    resolve,
    role_of,
)
from mutransfer.presets import at_depth, get_preset
from mutransfer.transformer_spec import ROLE_MAP
from tests.mup_reference import (
    BASE_WIDTH,
    config_at,
    mup_init,
    mup_optimizer,
    reference_model,
    settings_by_name,
    shaped_model,
    unshaped_model,
)

WIDTHS = [64, 128, 192, 256, 512]  # m = 1, 2, 3, 4, 8
STEP_WIDTHS = [64, 128, 192, 256]  # tests that step or compare whole tensors skip the largest, for speed
PARAM = ParamConfig(parametrization="mup", d_base=BASE_WIDTH, depth_base=4)
# Base hyperparameters away from round numbers, so no factor can hide behind a 1.
HP = HParams(lr=3e-3, init_std=0.05, weight_decay=0.1, alpha_out=2.5, adam_eps=1e-8)
SEED = 1234
REL = 1e-12
NORM_ROLES = (Role.NORM_GAIN, Role.FINAL_NORM)


pytestmark = [pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
              pytest.mark.numerical]  # compares kernel outputs: CI runs it twice (pyproject.toml)


def width_mult(width: int) -> float:
    return width / BASE_WIDTH


def our_model(width: int, hp: HParams = HP) -> torch.nn.Module:
    return build_model(RunShape(model=config_at(width), param=PARAM), hp, seed=SEED)


def our_optimizer(model: torch.nn.Module, width: int, hp: HParams = HP) -> torch.optim.AdamW:
    groups = param_groups(model, config_at(width), PARAM, hp, "adamw", roles=ROLE_MAP)
    assert groups["muon"] == []
    return torch.optim.AdamW(groups["adamw"], lr=hp.lr, betas=(hp.adam_beta1, hp.adam_beta2))


def is_hidden(name: str) -> bool:
    return role_of(name, ROLE_MAP) in HIDDEN_MATRIX_ROLES


def is_norm(name: str) -> bool:
    return role_of(name, ROLE_MAP) in NORM_ROLES


def both_settings(width: int, hp: HParams = HP) -> tuple[dict, dict]:
    """(ours, mup's) per-parameter lr / weight_decay / eps, read back from the real optimizers."""
    ours = our_model(width, hp)
    ref = reference_model(width, hp, SEED)
    return (settings_by_name(our_optimizer(ours, width, hp), ours),
            settings_by_name(mup_optimizer(ref, hp), ref))


def test_setup_matches_the_tiny_preset():
    """Same parameter names both ways, and the preset's base shape is the one used here."""
    assert get_preset("tiny").param == PARAM
    for width in WIDTHS:
        shape = RunShape(model=config_at(width), param=PARAM)
        ours = [n for n, _ in build_model(shape, HP, device="meta").named_parameters()]
        ref = [n for n, _ in unshaped_model(config_at(width), HP, device="meta").named_parameters()]
        assert ours == ref


@pytest.mark.parametrize("width", WIDTHS)
def test_mup_classifies_parameters_like_our_roles(width):
    model = shaped_model(width, HP)
    for name, p in model.named_parameters():
        if is_hidden(name):
            assert p.infshape.ninf() == 2, name
            assert p.infshape.width_mult() == pytest.approx(width_mult(width), rel=REL), name
        else:
            assert p.infshape.ninf() == 1, name  # embedding (vocab finite x d infinite), norm gains
    emb = model.tok_embeddings.weight.infshape
    assert not emb[0].isinf() and emb[1].isinf()
    assert model.output.readout.weight is model.tok_embeddings.weight
    assert model.output.readout.width_mult() == pytest.approx(width_mult(width), rel=REL)


@pytest.mark.parametrize("width", WIDTHS)
def test_learning_rates_agree(width):
    ours, ref = both_settings(width)
    m = width_mult(width)
    for name in ours:
        expected = HP.lr / m if is_hidden(name) else HP.lr  # embedding and norm gains: eta
        assert ours[name]["lr"] == pytest.approx(expected, rel=REL), name
        assert ref[name]["lr"] == pytest.approx(expected, rel=REL), name


@pytest.mark.parametrize("width", WIDTHS)
def test_weight_decay_agrees_except_norm_gains(width):
    ours, ref = both_settings(width)
    m = width_mult(width)
    for name in ours:
        if is_norm(name):  # difference 2: mup decays them, we do not
            assert ref[name]["weight_decay"] == pytest.approx(HP.weight_decay, rel=REL), name
            assert ours[name]["weight_decay"] == 0.0, name
            continue
        expected = HP.weight_decay * m if is_hidden(name) else HP.weight_decay
        assert ours[name]["weight_decay"] == pytest.approx(expected, rel=REL), name
        assert ref[name]["weight_decay"] == pytest.approx(expected, rel=REL), name
        # independent weight decay: the per-step shrink lr * wd is width-free in both
        for settings in (ours, ref):
            shrink = settings[name]["lr"] * settings[name]["weight_decay"]
            assert shrink == pytest.approx(HP.lr * HP.weight_decay, rel=REL), name


@pytest.mark.parametrize("width", STEP_WIDTHS)
def test_zero_gradient_step_decays_alike_except_norm_gains(width):
    """One real AdamW step with zero gradients is pure decoupled decay: p <- p * (1 - lr * wd)."""
    ours, ref = our_model(width), reference_model(width, HP, SEED)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for model, opt in ((ours, our_optimizer(ours, width)), (ref, mup_optimizer(ref, HP))):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    shrink = 1.0 - HP.lr * HP.weight_decay  # width-free
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if is_norm(name):  # difference 2
            torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0)
            torch.testing.assert_close(ref_params[name].detach(), before[name] * shrink)
        else:
            torch.testing.assert_close(p.detach(), before[name] * shrink)
            torch.testing.assert_close(ref_params[name].detach(), p.detach())


@pytest.mark.parametrize("width", WIDTHS)
def test_adam_eps_differs_on_purpose(width):
    """Difference 1: our eps is eps/m for every AdamW group (embedding, norm gains, hidden matrices),
    mup's is eps everywhere."""
    ours, ref = both_settings(width)
    m = width_mult(width)
    for name in ours:
        assert ref[name]["eps"] == HP.adam_eps, name
        assert ours[name]["eps"] == pytest.approx(HP.adam_eps / m, rel=REL), name


@pytest.mark.parametrize("width", STEP_WIDTHS)
def test_adam_eps_difference_in_a_real_step(width):
    """With every gradient entry equal to eps, Adam's first update is lr * g / (|g| + eps_group):
    lr/2 for mup, lr * m/(m+1) for ours (ratio 2m/(m+1)), every role alike."""
    hp = HP.model_copy(update={"weight_decay": 0.0})
    ours, ref = our_model(width, hp), reference_model(width, hp, SEED)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for model, opt in ((ours, our_optimizer(ours, width, hp)), (ref, mup_optimizer(ref, hp))):
        for p in model.parameters():
            p.grad = torch.full_like(p, hp.adam_eps)
        opt.step()
    m = width_mult(width)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        step_ours = (before[name] - p.detach()).double()
        step_ref = (before[name] - ref_params[name].detach()).double()
        ratio = 2 * m / (m + 1)
        lr = hp.lr / m if is_hidden(name) else hp.lr
        torch.testing.assert_close(step_ref, torch.full_like(step_ref, lr / 2), rtol=1e-4, atol=0)
        torch.testing.assert_close(step_ours, step_ref * ratio, rtol=1e-4, atol=0)


@pytest.mark.parametrize("width", STEP_WIDTHS)
def test_init_agrees(width):
    """mup.init and our init_weights: the table's stds, measured, and the same tensors when seeded alike."""
    cfg, m = config_at(width), width_mult(width)
    ours, ref = our_model(width), reference_model(width, HP, SEED)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        q = ref_params[name].detach()
        std = resolve(name, cfg, PARAM, HP, "adamw", roles=ROLE_MAP).init_std
        if is_norm(name):
            assert std is None
            assert torch.equal(p.detach(), torch.ones_like(p)) and torch.equal(q, torch.ones_like(q))
            continue
        expected = HP.init_std / math.sqrt(m) if is_hidden(name) else HP.init_std
        assert std == pytest.approx(expected, rel=REL), name
        # sample std of n normals: relative standard error ~ 1/sqrt(2n); allow 6 of those
        tol = 6.0 / math.sqrt(2 * q.numel())
        assert q.std().item() == pytest.approx(expected, rel=tol), name
        assert p.detach().std().item() == pytest.approx(expected, rel=tol), name
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=0)


@pytest.mark.parametrize("width", STEP_WIDTHS)
def test_tied_logits_multiplier_matches_mu_shared_readout(width):
    """Our logits multiplier alpha_out/m is MuSharedReadout's output_mult/width_mult; same logits."""
    cfg = config_at(width)
    mult = forward_multipliers(cfg, PARAM, HP)
    ours, ref = our_model(width), reference_model(width, HP, SEED)
    readout = ref.output.readout
    assert readout.output_mult == HP.alpha_out
    assert mult.logits == pytest.approx(readout.output_mult / readout.width_mult(), rel=REL)
    assert ours.logit_scale.factor == pytest.approx(mult.logits, rel=REL)
    # the width-free forward constants are the same numbers as the mup user's
    assert mult.embedding == ours.embed_scale.factor == ref.embed_scale.factor == HP.alpha_in
    assert mult.residual_attn == pytest.approx(ref.layers[0].residual_attn, rel=REL)
    assert mult.residual_ffn == pytest.approx(ref.layers[0].residual_ffn, rel=REL)
    # same weights in, same logits out
    with torch.no_grad():
        ref_params = dict(ref.named_parameters())
        for name, p in ours.named_parameters():
            ref_params[name].copy_(p)
        tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(ours(tokens), ref(tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [w for w in STEP_WIDTHS if w != BASE_WIDTH])
def test_readout_rescale_would_grow_the_tied_weight(width):
    """Difference 3: set_base_shapes's MuReadout rescale multiplies the tied weight by sqrt(m).

    A mup user with tied weights must initialise after set_base_shapes (the reference does); our
    init gives the embedding sigma at every width, with nothing to undo.
    """
    base = unshaped_model(config_at(BASE_WIDTH), HP, device="meta")
    delta = unshaped_model(config_at(2 * BASE_WIDTH), HP, device="meta")
    model = unshaped_model(config_at(width), HP)
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0.0, HP.init_std, generator=torch.Generator().manual_seed(SEED))
    before = model.tok_embeddings.weight.detach().clone()
    mup.set_base_shapes(model, base, delta=delta)  # rescale_params=True, the default
    torch.testing.assert_close(model.tok_embeddings.weight.detach(), before * math.sqrt(width_mult(width)))
    # initialised after set_base_shapes, as the reference does, the tied weight is back to sigma
    mup_init(model, HP.init_std, SEED)
    ours = our_model(width).tok_embeddings.weight.detach()
    torch.testing.assert_close(model.tok_embeddings.weight.detach(), ours, rtol=1e-6, atol=0)


@pytest.mark.parametrize("width", WIDTHS)
def test_attention_scale_is_one_over_head_dim(width):
    """muP's attn_mult/d_head with attn_mult = 1, i.e. 1/16 here; the sp control keeps 1/sqrt(d_head)."""
    cfg = config_at(width)
    assert cfg.head_dim == 16
    mult = forward_multipliers(cfg, PARAM, HP)
    assert mult.attn_scale == 1.0 / 16
    model = build_model(RunShape(model=cfg, param=PARAM), HP, device="meta")
    assert all(block.attention.attn_scale == 1.0 / 16 for block in model.layers)
    sp = forward_multipliers(cfg, ParamConfig(parametrization="sp", d_base=BASE_WIDTH, depth_base=4), HP)
    assert sp.attn_scale == 1.0 / 4


# --- Depth: L = 8 against L0 = 4, where mup (width rules only) has nothing to say about depth ----------

DEPTH = 8
DEPTH_WIDTHS = [64, 192]  # m = 1 (the depth factor alone) and m = 3
ALPHAS = [0.5, 1.0]  # Depth-muP, CompleteP


def depth_param(alpha: float) -> ParamConfig:
    return ParamConfig(parametrization="mup", d_base=BASE_WIDTH, depth_base=4, depth_alpha=alpha)


def documented_depth_factors(name: str, depth: int, alpha: float) -> dict[str, float]:
    """docs/mup_table.md: the factors depth adds on top of the width rule, r = L/L0."""
    role, r = role_of(name, ROLE_MAP), depth / 4
    inside = role in HIDDEN_MATRIX_ROLES or role == Role.NORM_GAIN  # inside a residual branch
    return {"lr": r ** (alpha - 1) if inside else 1.0,
            "weight_decay": r ** (1 - alpha) if role in HIDDEN_MATRIX_ROLES else 1.0,
            "eps": r**-alpha if inside else 1.0,
            "init_std": 1.0}


def our_deep_model(width: int, alpha: float, hp: HParams = HP) -> torch.nn.Module:
    return build_model(RunShape(model=config_at(width, DEPTH), param=depth_param(alpha)), hp, seed=SEED)


def our_deep_optimizer(model, width: int, alpha: float, hp: HParams = HP) -> torch.optim.AdamW:
    groups = param_groups(model, config_at(width, DEPTH), depth_param(alpha), hp, "adamw", roles=ROLE_MAP)
    return torch.optim.AdamW(groups["adamw"], lr=hp.lr, betas=(hp.adam_beta1, hp.adam_beta2))


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("width", DEPTH_WIDTHS)
def test_at_depth_our_width_part_is_mups_width_rule(width, alpha):
    """At L = 8: ours / documented depth factor = mup's (LR, weight decay), read from the real optimizers;
    eps keeps difference 1 (ours eps/m after the depth factor) and the norm gains difference 2."""
    ours_model, ref_model = our_deep_model(width, alpha), reference_model(width, HP, SEED, depth=DEPTH)
    ours = settings_by_name(our_deep_optimizer(ours_model, width, alpha), ours_model)
    ref = settings_by_name(mup_optimizer(ref_model, HP), ref_model)
    m = width_mult(width)
    assert len(ours) == len(ref) == 1 + 7 * DEPTH + 2 * DEPTH + 1
    for name in ours:
        f = documented_depth_factors(name, DEPTH, alpha)
        assert ours[name]["lr"] / f["lr"] == pytest.approx(ref[name]["lr"], rel=REL), name
        if is_norm(name):  # difference 2
            assert ours[name]["weight_decay"] == 0.0 and ref[name]["weight_decay"] == HP.weight_decay, name
        else:
            assert ours[name]["weight_decay"] / f["weight_decay"] == pytest.approx(ref[name]["weight_decay"],
                                                                                  rel=REL), name
            # lr * wd, the per-step decay 1/tau, is mup's at every depth: the depth factors cancel
            assert (ours[name]["lr"] * ours[name]["weight_decay"]
                    == pytest.approx(ref[name]["lr"] * ref[name]["weight_decay"], rel=REL)), name
        assert ref[name]["eps"] == HP.adam_eps, name  # difference 1: ours is eps/m after the depth factor
        assert ours[name]["eps"] / f["eps"] == pytest.approx(HP.adam_eps / m, rel=REL), name


@pytest.mark.parametrize("alpha", [*ALPHAS, 0.75])
@pytest.mark.parametrize("width", DEPTH_WIDTHS)
def test_depth_factor_is_exactly_the_documented_one(width, alpha):
    """Ours at L = 8 over ours at L = L0 = 4, same width: the documented factor, for every parameter."""
    shallow, deep, param = config_at(width), config_at(width, DEPTH), depth_param(alpha)
    names = [n for n, _ in build_model(RunShape(model=deep, param=param), HP, device="meta").named_parameters()]
    for optimizer in ("adamw", "muon"):
        for name in names:
            a = resolve(name, shallow, param, HP, optimizer, roles=ROLE_MAP)
            b = resolve(name, deep, param, HP, optimizer, roles=ROLE_MAP)
            f = documented_depth_factors(name, DEPTH, alpha)
            assert b.lr / a.lr == pytest.approx(f["lr"], rel=REL), (optimizer, name)
            if a.weight_decay:
                assert b.weight_decay / a.weight_decay == pytest.approx(f["weight_decay"], rel=REL), name
            else:
                assert b.weight_decay == 0.0, name
            if b.optimizer == "adamw":
                assert b.eps / a.eps == pytest.approx(f["eps"], rel=REL), (optimizer, name)
            assert b.init_std == a.init_std, name  # init has no depth factor (None for the gains)
    ratio = forward_multipliers(deep, param, HP).residual_attn / forward_multipliers(shallow, param, HP).residual_attn
    assert ratio == pytest.approx((4 / DEPTH) ** alpha, rel=REL)  # branch multiplier (L0/L)^a


@pytest.mark.parametrize("alpha", ALPHAS)
def test_at_depth_real_steps_differ_from_mup_by_the_depth_factor_only(alpha):
    """Width 128, L = 8, real AdamW steps. Zero gradients: every decayed parameter shrinks by
    1 - eta * lambda in both (norm gains: difference 2). A constant gradient far above eps: Adam's first
    step is about lr, so ours / mup's is the documented LR depth factor."""
    width = 128
    ours, ref = our_deep_model(width, alpha), reference_model(width, HP, SEED, depth=DEPTH)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for model, opt in ((ours, our_deep_optimizer(ours, width, alpha)), (ref, mup_optimizer(ref, HP))):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if is_norm(name):
            torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0)
        else:
            torch.testing.assert_close(p.detach(), before[name] * (1.0 - HP.lr * HP.weight_decay))
            torch.testing.assert_close(ref_params[name].detach(), p.detach())

    hp = HP.model_copy(update={"weight_decay": 0.0})
    ours, ref = our_deep_model(width, alpha, hp), reference_model(width, hp, SEED, depth=DEPTH)
    for model, opt in ((ours, our_deep_optimizer(ours, width, alpha, hp)), (ref, mup_optimizer(ref, hp))):
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)  # 1e5 x eps: the step is lr to 1e-5
        opt.step()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        step_ours = (before[name] - p.detach()).double()
        step_ref = (before[name] - ref_params[name].detach()).double()
        f = documented_depth_factors(name, DEPTH, alpha)["lr"]
        torch.testing.assert_close(step_ours, step_ref * f, rtol=1e-4, atol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_at_depth_init_agrees_and_at_a_half_so_do_the_logits(alpha):
    """Init has no depth factor: seeded alike, the same tensors at L = 8. At a = 1/2 our branch
    multiplier is the mup user's alpha_res/sqrt(L), and the same weights give the same logits; at
    a = 1 ours is (L0/L)^(1/2) = 1/sqrt(2) of it (CompleteP's 1/L scaling, on purpose)."""
    width = 128
    cfg = config_at(width, DEPTH)
    ours, ref = our_deep_model(width, alpha), reference_model(width, HP, SEED, depth=DEPTH)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[name].detach(), rtol=1e-6, atol=0)
    mult = forward_multipliers(cfg, depth_param(alpha), HP)
    user = ref.layers[0].residual_attn
    assert user == pytest.approx(HP.alpha_res / math.sqrt(DEPTH), rel=REL)
    assert mult.residual_attn == pytest.approx(user * (4 / DEPTH) ** (alpha - 0.5), rel=REL)
    assert all(block.residual_attn == mult.residual_attn for block in ours.layers)
    if alpha == 0.5:
        tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(ours(tokens), ref(tokens), rtol=1e-5, atol=1e-6)


def test_depth_config_is_the_tiny_preset_at_depth():
    assert config_at(128, DEPTH) == at_depth(config_at(128), DEPTH)
    assert config_at(128, DEPTH).n_layers == DEPTH and get_preset("tiny").param.depth_base == 4
