"""The model's memory features: chunked cross entropy in forward, per-block activation checkpointing.

Both must be invisible in the numbers: the same loss and gradients as the plain path (fp32: to
rounding; bf16: within bf16's), with FP8 delayed scaling and with torch.compile.
"""

from __future__ import annotations

import pytest
import torch

from mutransfer.build import build_model
from mutransfer.config import HParams
from mutransfer.model import CHECKPOINT_POLICIES, DEFAULT_LOSS_CHUNK_TOKENS, Block, Transformer, loss_fn
from mutransfer.precision import autocast, prepare_model
from mutransfer.presets import get_preset

pytestmark = pytest.mark.numerical  # compares kernel outputs with tolerances: CI runs it twice

torch.set_num_threads(1)


def tiny_model(precision: str = "fp32") -> Transformer:
    return prepare_model(build_model(get_preset("tiny"), HParams(), seed=0), precision)


def batch(b: int = 3, t: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t), generator=g), torch.randint(0, 256, (b, t), generator=g)


def loss_and_grads(model, x, y, precision="fp32", chunked=True):
    model.zero_grad(set_to_none=True)
    with autocast(precision, "cpu"):
        loss = model(x, y) if chunked else loss_fn(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def max_rel(a: dict, b: dict) -> float:
    """The worst tensor's max |difference| relative to its max |value|."""
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


# --- chunked cross entropy --------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1000, 120, 40, 7])  # one chunk, exactly all tokens, divides 120, does not
def test_chunked_loss_equals_loss_fn_fp32(chunk):
    model = tiny_model()
    x, y = batch()
    y[0, :5] = -100  # ignored targets count as in F.cross_entropy
    want, want_grads = loss_and_grads(model, x, y, chunked=False)
    model.loss_chunk_tokens = chunk
    got, got_grads = loss_and_grads(model, x, y)
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    assert max_rel(got_grads, want_grads) < 1e-5


def test_chunked_loss_bf16_autocast():
    model = tiny_model()
    x, y = batch()
    want, want_grads = loss_and_grads(model, x, y, "bf16", chunked=False)
    model.loss_chunk_tokens = 7
    got, got_grads = loss_and_grads(model, x, y, "bf16")
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= 1e-4 * want.item()
    assert max_rel(got_grads, want_grads) < 2e-2  # the embedding's bf16 gradient is summed over chunks


def test_eval_loss_without_grad_and_logits_path_unchanged():
    model = tiny_model()
    model.loss_chunk_tokens = 16
    x, y = batch()
    seen = []
    handle = model.output.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        logits = model(x)
        loss = model(x, y)
    handle.remove()
    assert logits.dtype == torch.float32 and logits.shape == (3, 40, 256)
    assert seen[0] == (3, 40, 256)  # targets=None: one call of ``output`` sees every logit
    assert seen[1:] == [(16, 256)] * 7 + [(8, 256)]  # the loss: one call per chunk
    assert abs(loss.item() - loss_fn(logits, y).item()) <= 1e-6 * loss.item()


def test_backward_recomputes_every_chunk_but_the_last():
    model = tiny_model()
    model.loss_chunk_tokens = 50  # 120 tokens: chunks of 50, 50, 20
    calls = []
    handle = model.output.register_forward_hook(lambda mod, args, out: calls.append(out.shape[0]))
    x, y = batch()
    loss = model(x, y)
    assert calls == [50, 50, 20]
    loss.backward()
    handle.remove()
    assert sorted(calls[3:]) == [50, 50]  # the last chunk kept what its backward needs


def test_loss_chunk_tokens_setting():
    model = tiny_model()
    assert model.loss_chunk_tokens == DEFAULT_LOSS_CHUNK_TOKENS
    model.loss_chunk_tokens = 512
    assert model.loss_chunk_tokens == 512
    for bad in (0, -1, 2.5, True, "64"):
        with pytest.raises(ValueError, match="loss_chunk_tokens"):
            model.loss_chunk_tokens = bad


# --- activation checkpointing -----------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointing_same_loss_and_grads_fp32(policy):
    model = tiny_model()
    x, y = batch()
    want, want_grads = loss_and_grads(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    model.set_activation_checkpointing(policy)
    assert all(block.checkpointing == policy for block in model.layers)
    assert [n for n, _ in model.named_parameters()] == names  # muP roles and FSDP units see the same model
    got, got_grads = loss_and_grads(model, x, y)
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    assert max_rel(got_grads, want_grads) < 1e-6


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointing_bf16_autocast(policy):
    model = tiny_model()
    x, y = batch()
    want, want_grads = loss_and_grads(model, x, y, "bf16")
    model.set_activation_checkpointing(policy)
    got, got_grads = loss_and_grads(model, x, y, "bf16")
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    assert max_rel(got_grads, want_grads) < 1e-6  # the same ops on the same inputs


def test_unknown_policy_is_refused_by_name():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"'sometimes'.*\['none', 'full', 'selective'\]"):
        model.set_activation_checkpointing("sometimes")
    model.layers[0].checkpointing = "Full"  # set by hand: the forward checks it too
    with pytest.raises(ValueError, match="'Full'"):
        model(*batch())
    assert CHECKPOINT_POLICIES == ("none", "full", "selective")


def test_hooks_on_blocks_fire_once():
    model = tiny_model()
    model.set_activation_checkpointing("full")
    calls = []
    handle = model.layers[1].register_forward_hook(lambda mod, args, out: calls.append(type(mod)))
    x, y = batch()
    model(x, y).backward()
    handle.remove()
    assert len(calls) == 1 and issubclass(calls[0], Block)  # the block's own hook: forward only


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_fp8_emulated_history_advances_once_and_grads_match(policy):
    """The recomputation reuses its forward's scales and records no amax: identical to no checkpointing."""
    def train(p):
        model = tiny_model("fp8-emulated")
        model.set_activation_checkpointing(p)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(3):
            x, y = batch(2, 32, seed=step)
            loss, grads = loss_and_grads(model, x, y, "fp8-emulated")
            opt.step()
        hist = {n: b.clone() for n, b in model.named_buffers() if n.endswith("fp8_amax_history")}
        return loss, grads, hist

    want_loss, want_grads, want_hist = train("none")
    loss, grads, hist = train(policy)
    assert loss.item() == want_loss.item()
    assert max_rel(grads, want_grads) == 0.0
    assert all(torch.equal(hist[n], want_hist[n]) for n in want_hist)
    wq = hist["layers.0.attention.wq.fp8_amax_history"]
    assert (wq[:3] > 0).all() and wq[3:].abs().sum() == 0  # one row per step, not two


@pytest.mark.slow
def test_checkpointing_composes_with_compile():
    """Each block compiled in place (as the trainers do), "full" and "selective": the eager numbers."""
    x, y = batch(2, 32)
    model = tiny_model()
    want, want_grads = loss_and_grads(model, x, y)
    for policy in ("full", "selective"):
        model = tiny_model()
        model.set_activation_checkpointing(policy)
        for block in model.layers:
            block.compile()
        got, got_grads = loss_and_grads(model, x, y)
        assert abs(got.item() - want.item()) <= 1e-5 * want.item()
        assert max_rel(got_grads, want_grads) < 1e-4
