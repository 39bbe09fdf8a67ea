"""Precision backends: FP8 formats, delayed scaling, gradients, model preparation, guards."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from mutransfer.build import build_model
from mutransfer.config import HParams, ModelConfig
from mutransfer.model import TiedLogits, loss_fn
from mutransfer.precision import (
    PRECISIONS,
    DelayedScalingConfig,
    Fp8EmulatedLinear,
    autocast,
    available,
    check_dims,
    prepare_model,
)
from mutransfer.precision.fp8_emulated import E4M3, E5M2, GRAD_OUTPUT, INPUT, WEIGHT, delayed_scale, quantize
from mutransfer.presets import get_preset

pytestmark = pytest.mark.numerical  # compares kernel outputs with tolerances: CI runs it twice

LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny_model() -> nn.Module:
    return build_model(get_preset("tiny"), HParams(), seed=0)


def tiny_batch(batch: int = 4, seq: int = 32):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (batch, seq), generator=g), torch.randint(0, 256, (batch, seq), generator=g)


# --- the FP8 formats -------------------------------------------------------------------------------


def test_exact_values_and_round_to_nearest_even():
    exact = torch.tensor([0.0, 1.0, 0.5, -2.0, 448.0, -448.0, 2.0**-6, 2.0**-9])
    assert torch.equal(quantize(exact, E4M3), exact)
    exact5 = torch.tensor([0.0, 1.0, 0.5, 57344.0, -57344.0, 2.0**-14, 2.0**-16])
    assert torch.equal(quantize(exact5, E5M2), exact5)
    # E4M3 steps by 1/8 in [1, 2): ties go to the even mantissa.
    assert quantize(torch.tensor([1.0625, 1.1875, 1.07]), E4M3).tolist() == [1.0, 1.25, 1.125]
    # E5M2 steps by 1/4 in [1, 2).
    assert quantize(torch.tensor([1.125, 1.375, 1.2]), E5M2).tolist() == [1.0, 1.5, 1.25]


def test_saturation():
    x = torch.tensor([500.0, -1e6, float("inf"), 1e30])
    assert quantize(x, E4M3).tolist() == [448.0, -448.0, 448.0, 448.0]
    assert quantize(x * 1e3, E5M2).tolist() == [57344.0, -57344.0, 57344.0, 57344.0]
    # With a scale, saturation happens at fp8_max / scale.
    assert quantize(torch.tensor([10.0]), E4M3, scale=448.0 / 2).item() == 2.0


@pytest.mark.parametrize("dtype, lo, hi, bound", [(E4M3, 2.0**-6, 448.0, 2.0**-4),
                                                  (E5M2, 2.0**-14, 57344.0, 2.0**-3)])
def test_relative_error_in_normal_range(dtype, lo, hi, bound):
    g = torch.Generator().manual_seed(0)
    x = torch.exp(torch.empty(20_000).uniform_(float(torch.log(torch.tensor(lo))),
                                                float(torch.log(torch.tensor(hi))), generator=g))
    x = x * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
    err = ((quantize(x, dtype) - x).abs() / x.abs()).max().item()
    assert err <= bound
    assert err > bound / 2  # the bound is tight: half an ulp at the bottom of a binade
    # A scale moves tiny values into the normal range with the same relative error.
    small = x * 1e-6
    scale = torch.tensor(1e6)
    assert ((quantize(small, dtype, scale) - small).abs() / small.abs()).max().item() <= bound


# --- delayed scaling --------------------------------------------------------------------------------


def diagonal_linear(n: int = 16, history: int = 128, d: float = 1.75) -> Fp8EmulatedLinear:
    """y = d * x. With amaxes of the form fp8_max / 2**k every scale is a power of two, so the
    emulated results are exact and a test can compare with ``torch.equal``."""
    lin = Fp8EmulatedLinear(n, n, bias=False, recipe=DelayedScalingConfig(amax_history_len=history))
    with torch.no_grad():
        lin.weight.copy_(d * torch.eye(n))
    return lin


def step(lin: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = lin(x)
    y.backward(g)
    return y.detach(), x.grad


def test_scale_comes_from_earlier_steps():
    lin = diagonal_linear()  # weight amax 1.75 = 448 / 256
    hist = lin.fp8_amax_history
    x1 = torch.full((4, 16), 0.25)
    x1[0, 0] = 1.75  # input scale 256
    g1 = torch.full((4, 16), 2.0**-12)
    g1[1, 1] = 7 * 2.0**-14  # grad scale 57344 / (7 * 2**-14) = 2**27
    # Step 1, empty history: scales from the current amax, so everything is exact.
    y1, gx1 = step(lin, x1, g1)
    assert torch.equal(y1, 1.75 * x1) and torch.equal(gx1, 1.75 * g1)
    assert hist[0].tolist() == [1.75, 1.75, 7 * 2.0**-14] and hist[1:].abs().sum() == 0
    # Step 2: amaxes grow 4x / 8x but the scales are still step 1's, so the large values saturate.
    x2, g2 = x1 * 4, g1 * 8
    assert delayed_scale(hist[:, INPUT], torch.tensor(7.0), 448.0).item() == 256.0
    y2, gx2 = step(lin, x2, g2)
    assert torch.equal(y2, 1.75 * x2.clamp(max=1.75))
    assert torch.equal(gx2, 1.75 * g2.clamp(max=7 * 2.0**-14))
    assert hist[:2, INPUT].tolist() == [7.0, 1.75]
    assert hist[:2, GRAD_OUTPUT].tolist() == [7 * 2.0**-11, 7 * 2.0**-14]
    # Step 3: the history now holds the larger amaxes, so the same tensors pass exactly.
    y3, gx3 = step(lin, x2, g2)
    assert torch.equal(y3, 1.75 * x2) and torch.equal(gx3, 1.75 * g2)
    assert hist[:3, WEIGHT].tolist() == [1.75, 1.75, 1.75]


def test_scale_formula_exact_and_history_rolls_at_128():
    lin = diagonal_linear(history=128)
    hist = lin.fp8_amax_history
    base = torch.linspace(-1, 1, 64).reshape(4, 16)
    g = torch.ones(4, 16) * 1e-3
    amaxes = [0.37 * (1 + (7 * i) % 11) for i in range(130)]
    for t, a in enumerate(amaxes):
        if t > 0:
            before = hist[:, INPUT].clone()
            expected = torch.tensor(448.0) / torch.tensor(max(amaxes[max(0, t - 128):t]))
            assert delayed_scale(before, torch.tensor(a), 448.0).item() == expected.item()
        step(lin, base * a, g)
    assert hist.shape == (128, 3)
    want = torch.tensor(amaxes[::-1][:128], dtype=torch.float32)
    assert torch.equal(hist[:, INPUT], want)  # newest first, the two oldest rolled out
    # A large amax leaves the window after 128 steps.
    lin = diagonal_linear(history=128)
    step(lin, base * 100.0, g)
    for _ in range(128):
        step(lin, base, g)
    assert lin.fp8_amax_history[:, INPUT].max().item() == 1.0


def test_margin_and_most_recent():
    hist = torch.tensor([2.0, 8.0, 0.0])
    assert delayed_scale(hist, torch.tensor(1.0), 448.0, margin=1).item() == 448.0 / 8 / 2
    assert delayed_scale(hist, torch.tensor(1.0), 448.0, algo="most_recent").item() == 448.0 / 2
    assert delayed_scale(torch.zeros(3), torch.tensor(0.0), 448.0).item() == 1.0


def test_eval_and_no_grad_do_not_record():
    lin = diagonal_linear()
    x = torch.randn(4, 16)
    with torch.no_grad():
        lin(x)
    lin.eval()
    step(lin, x, torch.ones(4, 16))
    assert lin.fp8_amax_history.abs().sum() == 0


# --- gradients --------------------------------------------------------------------------------------


def test_gradients_close_to_fp32():
    torch.manual_seed(0)
    ref = nn.Linear(64, 96, bias=False)
    fp8 = Fp8EmulatedLinear.from_linear(copy.deepcopy(ref))
    x = torch.randn(2, 32, 64)
    g = torch.randn(2, 32, 96) * 1e-4
    for _ in range(2):  # the second step uses delayed scales
        grads = []
        for lin in (ref, fp8):
            lin.zero_grad()
            xi = x.clone().requires_grad_(True)
            y = lin(xi)
            y.backward(g)
            grads.append((y.detach(), xi.grad, lin.weight.grad))
        for a, b in zip(grads[1], grads[0], strict=True):
            assert torch.isfinite(a).all() and a.abs().sum() > 0
            assert rel_err(a, b) < 0.06
    assert fp8.weight.grad.dtype == torch.float32


def test_bias_and_bf16_autocast_dtypes():
    torch.manual_seed(0)
    ref = nn.Linear(32, 16)
    fp8 = Fp8EmulatedLinear.from_linear(copy.deepcopy(ref))
    x = torch.randn(8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and fp8.weight.grad.dtype == torch.float32
    assert torch.allclose(fp8.bias.grad, torch.full((16,), 8.0))
    assert rel_err(y, ref(x)) < 0.06


# --- the model --------------------------------------------------------------------------------------


def test_prepare_model_keeps_names_tensors_and_high_precision_parts():
    model = tiny_model()
    before = dict(model.named_parameters())
    keys = set(model.state_dict())
    out = prepare_model(model, "fp8-emulated")
    assert out is model
    after = dict(model.named_parameters())
    assert list(after) == list(before)
    assert all(after[n] is before[n] for n in before)
    assert all(not p.__dict__ for p in model.parameters())  # nothing hung on the tensors
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8EmulatedLinear)}
    assert len(fp8) == 7 * model.cfg.n_layers
    assert {n.rsplit(".", 1)[1] for n in fp8} == set(LINEAR_NAMES)
    assert type(model.tok_embeddings) is nn.Embedding and type(model.output) is TiedLogits
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert set(model.state_dict()) == keys | {f"{n}.fp8_amax_history" for n in fp8}
    # Idempotent, and fp32 / bf16 change nothing.
    prepare_model(model, "fp8-emulated")
    assert dict(model.named_parameters()).keys() == before.keys()
    plain = tiny_model()
    assert prepare_model(plain, "bf16") is plain and any(type(m) is nn.Linear for m in plain.modules())


def test_model_logits_close_and_training_decreases_loss():
    ref = tiny_model()
    model = prepare_model(copy.deepcopy(ref), "fp8-emulated")
    x, y = tiny_batch()
    with torch.no_grad():
        want = ref(x)
        with autocast("fp8-emulated", "cpu"):
            got = model(x)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 0.08
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(5):
        with autocast("fp8-emulated", "cpu"):
            loss = loss_fn(model(x), y)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    hist = model.layers[0].attention.wq.fp8_amax_history
    assert (hist[:5] > 0).all() and hist[5:].abs().sum() == 0  # one row per training step


def test_deepcopy_and_state_dict_round_trip():
    model = prepare_model(tiny_model(), "fp8-emulated")
    x, y = tiny_batch(2, 16)
    for _ in range(2):
        loss_fn(model(x), y).backward()
    twin = copy.deepcopy(model)
    assert torch.equal(twin.layers[1].feed_forward.w2.fp8_amax_history,
                       model.layers[1].feed_forward.w2.fp8_amax_history)
    fresh = prepare_model(tiny_model(), "fp8-emulated")
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.layers[0].attention.wk.fp8_amax_history,
                       model.layers[0].attention.wk.fp8_amax_history)
    # A checkpoint from before FP8 was switched on loads strictly, with an empty history.
    fresh.load_state_dict(tiny_model().state_dict())
    assert fresh.layers[0].attention.wk.fp8_amax_history.abs().sum() == 0
    # Casting the module keeps the history float32 and its values.
    lin = model.layers[0].attention.wq
    saved = lin.fp8_amax_history.clone()
    lin.to(torch.bfloat16)
    assert lin.weight.dtype == torch.bfloat16 and torch.equal(lin.fp8_amax_history, saved)


# --- API: precisions, dims, autocast, unavailable backends ------------------------------------------


def test_unknown_precision():
    for call in (lambda: prepare_model(tiny_model(), "fp16"), lambda: autocast("fp16", "cpu"),
                 lambda: available("fp16"), lambda: check_dims(get_preset("tiny").model, "fp16")):
        with pytest.raises(ValueError, match=r"precision = 'fp16'.*fp8-emulated"):
            call()


def test_check_dims_names_the_dimension():
    tiny = get_preset("tiny").model
    for p in PRECISIONS:
        check_dims(tiny, p)
    cases = {
        "d_model": ModelConfig(vocab_size=256, d_model=72, n_layers=1, n_heads=9, n_kv_heads=3, head_dim=8,
                               ffn_dim=160),
        "ffn_dim": ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16,
                               ffn_dim=168),
        "n_kv_heads * head_dim": ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=8, n_kv_heads=1,
                                             head_dim=8, ffn_dim=160),
    }
    for dim, cfg in cases.items():
        check_dims(cfg, "fp32")
        check_dims(cfg, "bf16")
        for p in ("fp8-emulated", "fp8-te", "fp8-torchao"):
            with pytest.raises(ValueError, match=re.escape(f"model.{dim} = ") + r"\d+.*not divisible by 16"):
                check_dims(cfg, p)


def test_autocast_contexts():
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    for p in ("bf16", "fp8-emulated"):
        with autocast(p, "cpu"):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert available("fp32") == (True, "") and available("fp8-emulated") == (True, "")


@pytest.mark.parametrize("precision, extra", [("fp8-te", "mutransfer[fp8]"),
                                              ("fp8-torchao", "mutransfer[torchao]")])
def test_gpu_backends_unavailable_here_say_what_to_install(precision, extra):
    ok, why = available(precision)
    if ok:
        pytest.skip(f"{precision} is available on this machine")
    assert why and "compute capability" in why
    if "cannot be imported" in why:
        assert extra in why
    with pytest.raises((ImportError, RuntimeError)) as err:
        prepare_model(tiny_model(), precision)
    assert str(err.value) == why
    if precision == "fp8-te":
        with pytest.raises((ImportError, RuntimeError)):
            with autocast(precision, "cpu"):
                pass
