"""The model's kernels: faster formulations that leave the numbers where they were.

- Training: ``tiny`` for 50 steps gives the losses the code gave before the kernel changes
  (reference values below, recorded from that code at one CPU thread) to 1e-5.
- RoPE: cos/sin are a non-persistent float32 buffer, rebuilt by ``to_empty`` / ``init_buffers``
  after a meta-device build; the complex-multiply rotation is the interleaved pairwise one.
- ``build_model`` writes each parameter once, from the table: torch's default init never runs.
- RMSNorm on CPU: a hand-written backward, equal to autograd through ``F.rms_norm``.
- AdamW: the fused kernel, equal to the default implementation, with per-group settings.
- The coordinate-check recorder: dW x from the kept outputs equals dW x from weight copies, on all
  tokens or on a sample of them (which estimates the all-token size to a few percent); the attention
  logits' statistics equal those of the gathered causal entries.
- torch.compile (slow): the compiled model computes what the eager one does.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import mutransfer.coord as coord
from mutransfer.build import build_model, configure_model
from mutransfer.config import HParams, ProxyTrain, RunShape
from mutransfer.coord import record_training
from mutransfer.data.builtin import builtin_dataset
from mutransfer.model import RMSNorm, apply_rope, rope_cos_sin
from mutransfer.optim import OptimizerSet, build_optimizers
from mutransfer.parametrization import init_weights
from mutransfer.presets import at_width, get_preset
from mutransfer.training import train_proxy
from mutransfer.transformer_spec import ROLE_MAP, transformer_spec

pytestmark = pytest.mark.numerical  # compares kernel outputs with tolerances: CI runs it twice

TINY = get_preset("tiny")
SPEC = transformer_spec(TINY.model)

# train_proxy(tiny, HParams(), REFERENCE_TRAIN) on builtin_dataset("byte"), one thread, recorded from the
# code before the kernel changes (per-forward RoPE tables, stack rotation, composite RMSNorm backward,
# foreach AdamW).
REFERENCE_TRAIN = {"steps": 50, "batch_size": 8, "seq_len": 64, "warmup": 10, "eval_every": 25, "eval_batches": 2,
                   "eval_batch_size": 8, "device": "cpu", "threads": 1}
REFERENCE_TRAIN_LOSSES = [
    6.227695465087891, 6.05474328994751, 5.474040985107422, 4.9243340492248535, 4.486547470092773,
    4.073187828063965, 3.8047585487365723, 3.543614625930786, 3.325371503829956, 3.2424442768096924,
    3.2555465698242188, 3.0971646308898926, 3.178030252456665, 3.0473389625549316, 3.007753610610962,
    3.0302109718322754, 2.960983991622925, 2.876692295074463, 2.7960424423217773, 2.624816656112671,
    2.776651382446289, 2.8774943351745605, 2.748230218887329, 2.6865718364715576, 2.7585582733154297,
    2.745327949523926, 2.7072300910949707, 2.7227885723114014, 2.646070718765259, 2.7774322032928467,
    2.625845193862915, 2.6072375774383545, 2.58957839012146, 2.6468541622161865, 2.668043613433838,
    2.704946279525757, 2.7084901332855225, 2.7326717376708984, 2.7415237426757812, 2.7043073177337646,
    2.5085339546203613, 2.601515054702759, 2.67928409576416, 2.6212589740753174, 2.5249204635620117,
    2.5451009273529053, 2.589313268661499, 2.514051914215088, 2.5818989276885986, 2.556313991546631,
]
REFERENCE_VAL_LOSSES = [(25, 2.8114757537841797), (50, 2.6783517599105835)]
REFERENCE_FIRST_GRAD_NORMS = [1.6664546728134155, 1.8026916980743408, 1.8579617738723755, 1.7984246015548706,
                              1.4227783679962158]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return builtin_dataset("byte", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_trains_to_the_reference_losses(dataset):
    result = train_proxy(TINY, HParams(), ProxyTrain(**REFERENCE_TRAIN), dataset)
    torch.testing.assert_close(torch.tensor(result.train_losses, dtype=torch.float64),
                               torch.tensor(REFERENCE_TRAIN_LOSSES, dtype=torch.float64), rtol=0, atol=1e-5)
    assert [s for s, _ in result.val_losses] == [s for s, _ in REFERENCE_VAL_LOSSES]
    torch.testing.assert_close(torch.tensor([v for _, v in result.val_losses], dtype=torch.float64),
                               torch.tensor([v for _, v in REFERENCE_VAL_LOSSES], dtype=torch.float64),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(result.grad_norms[:5], dtype=torch.float64),
                               torch.tensor(REFERENCE_FIRST_GRAD_NORMS, dtype=torch.float64), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- RoPE


def test_rope_buffer_is_rebuilt_after_a_meta_build_and_to_empty():
    hp = HParams()
    ref = build_model(TINY, hp, seed=0)
    cos, sin = rope_cos_sin(TINY.model.max_seq_len, TINY.model.head_dim, TINY.model.rope_base, "cpu")
    assert torch.equal(ref.rope_cos, cos) and torch.equal(ref.rope_sin, sin)
    assert ref.rope_cos.dtype == torch.float32 and ref.rope_cos.shape == (TINY.model.max_seq_len, 8)
    assert not any(k.startswith("rope_") for k in ref.state_dict())  # not persistent: not in checkpoints

    model = build_model(TINY, hp, device="meta")
    assert model.rope_cos.is_meta
    model.to_empty(device="cpu")  # the buffers' memory is fresh here; Transformer.to_empty recomputes them
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    init_weights(model, TINY.model, TINY.param, hp, generator=torch.Generator().manual_seed(0), roles=ROLE_MAP)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(tokens), ref(tokens))

    model.rope_cos.fill_(float("nan"))  # whatever left them uninitialised: init_buffers recomputes them
    model.rope_sin.zero_()
    model.init_buffers()
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)

    twin = copy.deepcopy(ref)
    assert torch.equal(twin.rope_cos, cos) and twin.rope_cos.data_ptr() != ref.rope_cos.data_ptr()
    half = copy.deepcopy(ref).to(torch.bfloat16)  # casts keep the tables float32, as computed
    assert half.rope_cos.dtype == torch.float32 and torch.equal(half.rope_cos, cos)
    assert half.tok_embeddings.weight.dtype == torch.bfloat16


def reference_rope(x, cos, sin):
    """The rotation as it was written before: pairs (x[2i], x[2i+1]) rotated by stacking halves."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def test_build_writes_each_parameter_once_from_the_table():
    """No default init (kaiming uniform, embedding normal) drawn and then overwritten: one normal_ or
    fill_ per parameter (writes to meta tensors write nothing), the weights the seed's draws give."""
    from torch.overrides import TorchFunctionMode

    class Writes(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.ops: list[tuple[str, int]] = []  # (in-place op, address written)

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            target = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if name.endswith("_") and not name.startswith("_") and target is not None and not target.is_meta:
                self.ops.append((name, target.data_ptr()))
            return func(*args, **kwargs)

    hp = HParams()
    with Writes() as writes:
        model = build_model(TINY, hp, seed=0)
    params = list(model.parameters())
    addresses = {p.data_ptr() for p in params}
    to_params = [op for op, ptr in writes.ops if ptr in addresses]
    assert sorted(to_params) == sorted(["fill_" if p.ndim == 1 else "normal_" for p in params])
    twin = build_model(TINY, hp, device="meta").to_empty(device="cpu")
    init_weights(twin, TINY.model, TINY.param, hp, generator=torch.Generator().manual_seed(0), roles=ROLE_MAP)
    assert all(torch.equal(a, b) for a, b in zip(params, twin.parameters(), strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_is_the_interleaved_pairwise_rotation(dtype):
    g = torch.Generator().manual_seed(0)
    cos, sin = rope_cos_sin(24, 16, 10_000.0, "cpu")
    base = torch.randn(2, 24, 3, 16, generator=g).to(dtype)  # (batch, seq, heads, head_dim), transposed below
    grad = torch.randn(2, 3, 24, 16, generator=g).to(dtype)
    outs, grads = [], []
    for rope in (apply_rope, reference_rope):
        x = base.clone().requires_grad_()
        y = rope(x.transpose(1, 2), cos, sin)
        y.backward(grad)
        outs.append(y)
        grads.append(x.grad)
    assert outs[0].dtype == dtype
    tol = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(outs[0], outs[1], **tol)
    torch.testing.assert_close(grads[0], grads[1], **tol)


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("shape", [(4, 7, 64), (3, 256)])
def test_cpu_rms_norm_equals_autograd_through_f_rms_norm(shape):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=g) + 0.5)
    x0 = torch.randn(*shape, generator=g) * 3
    grad = torch.randn(*shape, generator=g)
    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    wr = norm.weight.detach().clone().requires_grad_()
    y, yr = norm(x), F.rms_norm(xr, (shape[-1],), wr, 1e-5)
    assert y.grad_fn is not None and "RMSNorm" in type(y.grad_fn).__name__  # the hand-written backward
    assert torch.equal(y, yr)  # the forward is the composite's, op for op
    y.backward(grad)
    yr.backward(grad)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, wr.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(norm(x0), yr)


# ---------------------------------------------------------------- AdamW


def test_adamw_is_fused_on_cpu_and_equals_the_default_implementation():
    hp = HParams(weight_decay=0.1)
    shape = RunShape(model=at_width(TINY.model, 128), param=TINY.param)
    model = build_model(shape, hp, seed=0)
    twin = copy.deepcopy(model)
    fused = build_optimizers(model, SPEC, shape.model, shape.param, hp, "adamw")
    adamw = fused.optimizers["adamw"]
    assert adamw.defaults["fused"] is True and len(adamw.param_groups) > 3  # one group per role
    assert len({(g["lr"], g["weight_decay"], g["eps"]) for g in adamw.param_groups}) > 1
    by_name = dict(twin.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k not in ("params", "fused")},
               "params": [by_name[n] for n in g["names"]]} for g in adamw.param_groups]
    plain = OptimizerSet("adamw", {"adamw": torch.optim.AdamW(groups, lr=hp.lr)})  # torch's default: foreach
    assert not plain.optimizers["adamw"].defaults.get("fused")
    tokens = torch.randint(0, 256, (3, 2, 33), generator=torch.Generator().manual_seed(0))
    factors = [0.5 + step / 4 for step in range(3)]
    for step in range(3):
        for m, opt in ((model, fused), (twin, plain)):
            m(tokens[step, :, :-1], tokens[step, :, 1:]).backward()
            opt.set_lr_factor(factors[step])
            opt.step()
            opt.zero_grad()
    peak = {n: g["base_lr"] for g in adamw.param_groups for n in g["names"]}
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        diff = (p - q).abs()
        # Almost every entry agrees to an ulp or two of the weights. Adam's step m/(sqrt(v) + eps) is
        # ill-conditioned where sqrt(v) is near eps (an embedding row its batches hardly touch), and the
        # two kernels round it differently (seen: 1 entry of 32,768 off by 6.6e-6 on AVX-512); such an
        # entry still moves at most ~lr a step, so it may differ by a thousandth of the LR travelled --
        # a wrong group LR, eps or decay would be off by the whole of it.
        close = diff <= 1e-6 + 1e-5 * q.abs()
        assert close.float().mean() >= 0.999, (name, int((~close).sum()), diff.max().item())
        travelled = peak[name] * sum(factors)
        assert diff.max().item() <= 1e-3 * travelled, (name, diff.max().item(), travelled)


def test_adamw_falls_back_where_the_fused_kernel_cannot_take_the_parameters():
    model = build_model(TINY, HParams(), device="meta")
    opt = build_optimizers(model, SPEC, TINY.model, TINY.param, HParams(), "adamw").optimizers["adamw"]
    assert not opt.defaults.get("fused")


# ---------------------------------------------------------------- the coordinate-check recorder


def _recorded(dataset, update_tokens: int = 0, precision: str = "fp32") -> pd.DataFrame:
    """Records of 4 steps of tiny at widths 64 and 256 on one repeated batch of 4 x 64 tokens."""
    batches = [dataset.batch("train", 0, 0, 4, 64)] * 4
    hp = HParams()
    out = []
    for w in (64, 256):
        shape = RunShape(model=at_width(TINY.model, w), param=TINY.param)
        model = build_model(shape, hp, seed=0)
        out += record_training(model, build_optimizers(model, SPEC, shape.model, shape.param, hp, "adamw"), batches,
                               {"width": w}, precision=precision, update_tokens=update_tokens, spec=SPEC)
    return pd.DataFrame(out)


@pytest.mark.parametrize("update_tokens", [0, 64])
def test_recorder_update_effect_from_kept_outputs_equals_the_weight_copy_way(dataset, monkeypatch, update_tokens):
    """dW x = W_after x - y (no weight copies) against (W_after - W_before) x (copies), to float rounding,
    on every token (0) and on 64 of the batch's 256."""
    kept = []
    real = coord.weights_before
    monkeypatch.setattr(coord, "weights_before", lambda m, rec=None: kept.append(len(rec.outputs)) or real(m, rec))
    fast = _recorded(dataset, update_tokens)
    assert min(kept) == 4 * 7 + 1  # every linear layer and the readout: no weight copied
    monkeypatch.setattr(coord, "_exact_float32", lambda *args, **kwargs: False)
    slow = _recorded(dataset, update_tokens)
    assert fast[["width", "step", "module", "kind", "statistic"]].equals(slow[["width", "step", "module", "kind",
                                                                                 "statistic"]])
    is_update = fast["kind"].str.startswith("dWx")
    assert is_update.sum() == 2 * 4 * 2 * (4 * 7 + 1)  # widths x steps x statistics x layers
    assert fast.loc[~is_update, "value"].equals(slow.loc[~is_update, "value"])
    torch.testing.assert_close(torch.tensor(fast.loc[is_update, "value"].to_numpy()),
                               torch.tensor(slow.loc[is_update, "value"].to_numpy()), rtol=1e-5, atol=0)

    monkeypatch.undo()
    kept.clear()
    monkeypatch.setattr(coord, "weights_before", lambda m, rec=None: kept.append(len(rec.outputs)) or real(m, rec))
    _recorded(dataset, update_tokens, "bf16")  # bf16 outputs cannot be compared with float32 products: copies
    assert max(kept) == 0


def test_update_effect_on_a_token_sample_estimates_the_whole_batch(dataset):
    """64 evenly spaced tokens of 256: activations untouched, every dW x size within 10 % of the
    all-token one, and each layer's log2 slope over the two widths within 0.05 of it."""
    whole, sample = _recorded(dataset, 0), _recorded(dataset, 64)
    is_update = whole["kind"].str.startswith("dWx")
    assert sample.loc[~is_update, "value"].equals(whole.loc[~is_update, "value"])
    ratio = sample.loc[is_update, "value"].to_numpy() / whole.loc[is_update, "value"].to_numpy()
    assert 0.9 < ratio.min() and ratio.max() < 1.1, (ratio.min(), ratio.max())
    assert not (ratio == 1).all()  # a sample, not the whole batch again
    updates = whole.loc[is_update, ["step", "module", "statistic", "width"]].assign(log_ratio=np.log2(ratio))
    by_width = updates.pivot_table(index=["step", "module", "statistic"], columns="width", values="log_ratio")
    slope_change = (by_width[256] - by_width[64]) / 2  # log2(256 / 64) = 2
    assert slope_change.abs().max() < 0.05


def test_sample_tokens_takes_evenly_spaced_rows():
    rec = coord.Recorder(torch.nn.Identity(), {}, update_tokens=64)
    x = torch.arange(4 * 64 * 3, dtype=torch.float32).view(4, 64, 3)
    rows = rec.sample_tokens(x)
    assert rows.shape == (64, 3) and rows.is_contiguous()
    assert rows[:, 0].tolist() == [3.0 * i for i in range(0, 256, 4)]
    assert rec.sample_tokens(x[:1]).shape == (64, 3)  # no more tokens than asked for: all of them
    assert coord.Recorder(torch.nn.Identity(), {}).sample_tokens(x).shape == (256, 3)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_attention_logit_statistics_equal_those_of_the_gathered_causal_entries(heads, kv_heads):
    class Attention(torch.nn.Module):
        scale = 0.125

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, heads, 20, 16, generator=g), torch.randn(3, kv_heads, 20, 16, generator=g)
    logits = 0.125 * (q @ k.repeat_interleave(heads // kv_heads, dim=1).transpose(-2, -1))
    causal = logits[..., torch.ones(20, 20, dtype=torch.bool).tril()]
    stats = coord._stats(*coord.attention_logits(Attention(), q, k))
    assert stats["l1"] == pytest.approx(causal.abs().mean().item(), rel=1e-5)
    assert stats["rms"] == pytest.approx(causal.square().mean().sqrt().item(), rel=1e-5)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compiled_model_computes_what_the_eager_model_does():
    torch.set_num_threads(1)
    hp = HParams()
    eager = build_model(TINY, hp, seed=0)
    compiled = copy.deepcopy(eager)
    runner = torch.compile(compiled)
    g = torch.Generator().manual_seed(0)
    for seq in (64, 48):  # a second sequence length slices the RoPE tables differently
        tokens = torch.randint(0, 256, (2, seq + 1), generator=g)
        losses = []
        for model in (eager, runner):
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
            p.grad = q.grad = None


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(dataset):
    """configure_model(compile=True) compiles each block in place (the full-scale path) over the buffers."""
    tc = ProxyTrain(**{**REFERENCE_TRAIN, "steps": 10, "eval_every": 10})
    eager = train_proxy(TINY, HParams(), tc, dataset)
    compiled = train_proxy(TINY, HParams(), tc.model_copy(update={"compile": True}), dataset)
    torch.testing.assert_close(torch.tensor(compiled.train_losses), torch.tensor(eager.train_losses),
                               rtol=0, atol=1e-4)
    model = configure_model(build_model(TINY, HParams(), seed=0), tc.model_copy(update={"compile": True}), SPEC)
    assert not any(k.startswith("rope_") for k in model.state_dict())
