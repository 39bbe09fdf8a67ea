"""The memory model against a measurement: bytes autograd saves per token and layer, on CPU.

Two blocks at the 1.3B's width and head layout (d 1536, 24 heads / 8 KV heads of 64, FFN 3840;
small vocabulary), one forward at batch 1 and batch 2. A saved-tensors hook records the unique
storages (by data pointer) that are not parameters; the slope between the two batch sizes removes
whatever does not grow with tokens (autocast's bf16 weight copies, RoPE's cos/sin). CPU's SDPA is
the flash kernel (it saves q, k, v, output and logsumexp, like the GPU's); CPU's RMSNorm is the
composite one, which also saves the normalized input, hence ``fused_norm=False`` here.
"""

from __future__ import annotations

import pytest
import torch

from mutransfer.build import build_model
from mutransfer.config import HParams, ModelConfig, RunShape
from mutransfer.memory import (
    GIB,
    POLICIES,
    activation_bytes_per_token_per_layer,
    estimate,
    non_layer_bytes_per_token,
    param_counts,
)
from mutransfer.model import rope_cos_sin
from mutransfer.precision import autocast
from mutransfer.presets import get_preset

torch.set_num_threads(1)

SEQ = 64
TARGET = get_preset("xmodel25-1.3b")
TWO_LAYERS = ModelConfig(vocab_size=256, d_model=1536, n_layers=2, n_heads=24, n_kv_heads=8, head_dim=64,
                         ffn_dim=3840, max_seq_len=SEQ)


@pytest.fixture(scope="module")
def model():
    return build_model(RunShape(model=TWO_LAYERS, param=TARGET.param), HParams(), seed=0)


def saved_bytes(model, batch: int, precision: str) -> tuple[int, int]:
    """Bytes of the unique non-parameter storages saved for backward: (by the blocks, by the rest)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers, rest = {}, {}

    def recording(store):
        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                store[storage.data_ptr()] = storage.nbytes()
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    g = torch.Generator().manual_seed(batch)
    tokens, targets = torch.randint(0, 256, (2, batch, SEQ), generator=g)
    cos, sin = rope_cos_sin(SEQ, TWO_LAYERS.head_dim, TWO_LAYERS.rope_base, "cpu")
    model.loss_chunk_tokens = 16  # the last chunk, which keeps its logits for backward, is the same at both sizes
    with autocast(precision, "cpu"):
        with recording(rest):
            h = model.embed_scale(model.tok_embeddings(tokens))
        with recording(layers):
            for layer in model.layers:
                h = layer(h, cos, sin)
        with recording(rest):
            loss = model.chunked_cross_entropy(model.norm(h), targets)
    assert loss.requires_grad
    return sum(layers.values()), sum(rest.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("policy", POLICIES)
def test_saved_bytes_per_token_per_layer_match_the_model(model, policy, precision):
    model.set_activation_checkpointing(policy)
    layers1, rest1 = saved_bytes(model, 1, precision)
    layers2, rest2 = saved_bytes(model, 2, precision)
    measured = (layers2 - layers1) / SEQ / TWO_LAYERS.n_layers
    modelled = activation_bytes_per_token_per_layer(TWO_LAYERS, policy, precision, fused_norm=False)
    assert abs(measured - modelled) <= 0.05 * modelled, (measured, modelled)  # the bound: 15 %
    measured_rest = (rest2 - rest1) / SEQ
    modelled_rest = non_layer_bytes_per_token(TWO_LAYERS, fused_norm=False)
    assert abs(measured_rest - modelled_rest) <= 0.05 * modelled_rest, (measured_rest, modelled_rest)


def test_parameter_count_is_the_models():
    built = build_model(TARGET, HParams(), device="meta")
    counts = param_counts(TARGET.model)
    assert counts["total"] == sum(p.numel() for p in built.parameters())
    assert counts["embedding"] == built.tok_embeddings.weight.numel()


def test_estimate_orders_and_names():
    m = TARGET.model
    phase = {"seq_len": 3712, "micro_batch": 2, "world_size": 48, "precision": "bf16"}
    peaks = {p: estimate(m, checkpointing=p, **phase).peak for p in POLICIES}
    assert peaks["none"] > peaks["selective"] > peaks["full"]
    assert estimate(m, parallel="ddp", **phase).peak > estimate(m, **phase).peak
    assert estimate(m, loss_chunk_tokens=1024, **phase).loss_transient < estimate(m, **phase).loss_transient
    longer = estimate(m, **{**phase, "seq_len": 16384, "micro_batch": 1})
    assert longer.activations > estimate(m, **phase).activations
    full = estimate(m, checkpointing="full", **phase)
    assert full.fits() and full.peak < 40 * GIB
    for bad in ({"checkpointing": "some"}, {"parallel": "tp"}, {"optimizer": "sgd"}, {"precision": "fp16"}):
        with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
            estimate(m, **{**phase, **bad})
