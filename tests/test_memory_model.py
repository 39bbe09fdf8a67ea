"""The memory model against a measurement: bytes autograd saves per token and layer, on CPU.

Two blocks at the 1.3B's width and head layout (d 1536, 24 heads / 8 KV heads of 64, FFN 3840;
small vocabulary), one forward at batch 1 and batch 2. A saved-tensors hook records the unique
storages (by data pointer) that are not parameters; the slope between the two batch sizes is what
grows with tokens, the intercept what does not (RoPE's complex tables, autocast's bf16 weight
copies), each checked against the model. CPU's SDPA is
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
    block_params,
    estimate,
    fsdp_gather_bytes,
    non_layer_bytes_per_token,
    param_counts,
    rope_saved_bytes_per_layer,
    saved_constant_bytes,
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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("policy", POLICIES)
def test_what_does_not_grow_with_the_batch_matches_the_model(model, policy, precision):
    """The intercept of saved bytes against the batch: per layer, the two complex64 (seq x head_dim/2)
    RoPE tables (q's and k's) under "none", nothing under "full" and "selective" (recomputed); under
    bf16 autocast with float32 weights (one process, DDP) also the weights' bf16 copies."""
    model.set_activation_checkpointing(policy)
    layers1, _ = saved_bytes(model, 1, precision)
    layers2, _ = saved_bytes(model, 2, precision)
    constant = 2 * layers1 - layers2
    # the test's own cos and sin (float32, seq x head_dim/2 each), which a checkpointed block saves as its
    # inputs; in the model they are slices of its RoPE buffers, resident anyway
    inputs = 0 if policy == "none" else 2 * SEQ * TWO_LAYERS.head_dim // 2 * 4
    modelled = saved_constant_bytes(TWO_LAYERS, SEQ, policy, precision, parallel="none")
    assert constant - inputs == modelled  # exact: whole tensors, no estimate involved
    rope = TWO_LAYERS.n_layers * rope_saved_bytes_per_layer(TWO_LAYERS, SEQ, policy)
    assert rope == (TWO_LAYERS.n_layers * 2 * SEQ * (TWO_LAYERS.head_dim // 2) * 8 if policy == "none" else 0)
    # FSDP2 hands the blocks bf16 weights: autocast copies nothing, only the RoPE tables remain
    assert saved_constant_bytes(TWO_LAYERS, SEQ, policy, precision, parallel="fsdp") == rope


def test_the_rope_tables_at_16k_are_in_the_estimate():
    m = TARGET.model
    phase = {"seq_len": 16384, "micro_batch": 1, "world_size": 48, "precision": "fp8-te"}
    none, full = estimate(m, checkpointing="none", **phase), estimate(m, checkpointing="full", **phase)
    per_token = m.n_layers * activation_bytes_per_token_per_layer(m, "none", "fp8-te") + non_layer_bytes_per_token(m)
    assert none.activations - 16384 * per_token == 0.375 * GIB  # 48 layers x 2 tables x 16384 x 32 x 8 bytes
    full_per_token = m.n_layers * activation_bytes_per_token_per_layer(m, "full", "fp8-te") + \
        non_layer_bytes_per_token(m)
    assert full.activations == 16384 * full_per_token  # recomputed, not saved
    # and per sequence, not per token: a second sequence in the micro-batch adds none
    two = estimate(m, checkpointing="none", **{**phase, "seq_len": 8192, "micro_batch": 2})
    assert none.activations - two.activations == 48 * 2 * (16384 - 8192) * 32 * 8


def test_fsdp_gathers_in_the_trainers_param_dtype():
    """FSDP2's MixedPrecisionPolicy of the trainer decides the in-flight bytes: bf16 under autocast."""
    from full_scale.distributed import fsdp_mixed_precision

    for precision in ("fp32", "bf16", "fp8-te", "fp8-torchao", "fp8-emulated"):
        dtype = fsdp_mixed_precision(precision).param_dtype or torch.float32
        assert fsdp_gather_bytes(precision) == dtype.itemsize, precision
    m, counts = TARGET.model, param_counts(TARGET.model)
    root = counts["embedding"] + m.d_model
    phase = {"seq_len": 3712, "micro_batch": 2, "world_size": 48}
    bf16, fp32 = estimate(m, precision="bf16", **phase), estimate(m, precision="fp32", **phase)
    assert bf16.params == int(4 * counts["total"] / 48 + 2 * root + 2 * 2 * block_params(m))
    assert fp32.params == int(4 * counts["total"] / 48 + 4 * root + 2 * 4 * block_params(m))
    # gradients: the root's and the computing block's in the gather dtype, the block being
    # reduce-scattered in float32 (its reduce-scatter input)
    assert bf16.grads == int(4 * counts["total"] / 48 + 2 * root + (2 + 4) * block_params(m))
    assert fp32.grads == int(4 * counts["total"] / 48 + 4 * root + (4 + 4) * block_params(m))
