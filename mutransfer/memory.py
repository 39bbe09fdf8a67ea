"""GPU memory of a training phase, by arithmetic on the model shape: does the 1.3B fit, and how?

Pure arithmetic on a ``ModelConfig``, no tensors, so it runs anywhere in microseconds. Every
per-token figure counts what autograd really keeps for ``mutransfer.model`` (checked against a
measurement of the saved tensors in ``tests/test_memory_model.py``):

- The residual stream is float32 in every precision (the embedding output is float32 and each
  branch is added to it), so the norms' saved inputs and the checkpointed block inputs are 4 bytes
  a number. GEMM inputs and outputs, attention tensors and SwiGLU intermediates are in the
  activation dtype: 4 bytes in fp32, 2 under bf16 autocast. FP8 backends are counted as bf16
  (torchao keeps the bf16 inputs it re-quantises), Transformer Engine with its own per-module
  copies (below). (The FP8 emulation is not a memory model of FP8: under "selective" it keeps its
  float32 GEMM outputs.)
- The attention kernel is flash-like (flash, cuDNN, or CPU's flash): it saves q, k, v, its output
  and a float32 logsumexp per head and token, never a (seq x seq) matrix. K and V are saved at
  KV-head width (GQA is not expanded).
- RMSNorm: CUDA's fused kernel saves its input and one float32 rstd per token; CPU's composite
  also saves the normalized input (``fused_norm=False``, what the CPU test measures).
- Transformer Engine (``fp8-te``): each TE Linear keeps its own FP8 copy of its input, row- and
  column-wise, so the inputs that bf16 shares (wq/wk/wv, w1/w3, and wo's with the attention
  output) cost 6 d + 2 q more bytes per token and layer (``te_extra_bytes``). TE supports "none"
  and "full" (its own checkpoint), not "selective".
- RoPE: eager, each of q and k is rotated by one complex multiply with a complex64 (seq x
  head_dim/2) table made from cos and sin, which autograd keeps: two tables per layer under "none",
  8 seq head_dim bytes, per sequence position and not per token (the batch broadcasts over them):
  0.375 GiB over 48 layers at 16,384 positions. Recomputed under "full" and "selective".
- Under bf16 autocast with float32 weights (one process, DDP) each GEMM saves its weight's bf16
  copy (``saved_constant_bytes``); FSDP2 gathers bf16 weights (the trainer's MixedPrecisionPolicy),
  which autocast does not copy.

Per layer and token (d, q = heads x head_dim, kv = KV heads x head_dim, f = FFN width, H heads,
a = activation bytes, r = 4 for the float32 residual stream):

- "none": 2 r d + 8 (two norms) + 2 a d (the normed input, cast once, shared by wq/wk/wv and
  by w1/w3) + a (q + 2 kv) (q, k after RoPE, v) + a q (the attention output; wo's input is a view
  of it: the kernels lay it out token-major, measured) + 4 H (logsumexp) + 4 a f (w1 out, SiLU
  out, w3 out, their product).
- "selective": r d (block input) + a (q + 2 kv + d) (wq, wk, wv, wo outputs) + a (2 f + d) (w1,
  w3, w2 outputs) + a q + 4 H (attention output, logsumexp).
- "full": r d (block input).

A phase's peak is what is resident (parameters, gradients, optimizer states, each as the parallel
mode shards them) plus the saved activations of all layers and the largest backward transient:
either the loss head's (one chunk's logits, softmax and gradient in float32, and the tied
embedding's bf16 copy and gradient) or one block's (its recomputed activations and the
gradients live in its backward), plus a reserve. Transient estimates are upper-bound style and
were not measured on a GPU here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mutransfer.config import ModelConfig

GIB = 2**30
# plan's default --gpu-memory (an "80 GB" H100 reports 79.6 GiB); the CUDA context etc. are in the reserve
GPU_80GIB = 80 * GIB
# Not tensors, but on the GPU: CUDA context and cuBLAS/cuDNN workspaces (~1 GiB), NCCL
# communicators and buffers (~1-2 GiB at 48 ranks); and the caching allocator's fragmentation,
# a fraction of what it holds (varying sequence lengths make it worse; expandable_segments better).
RESERVE_FIXED = 3 * GIB
RESERVE_FRACTION = 0.10

POLICIES = ("none", "full", "selective")
PARALLEL_MODES = ("fsdp", "ddp", "none")
OPTIMIZERS = ("adamw", "muon")
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp8-emulated": 2, "fp8-te": 2, "fp8-torchao": 2}
RESIDUAL_BYTES = 4  # the residual stream is float32 in every precision
FP32 = 4
INDEX_BYTES = 8  # int64 token ids and targets
FSDP_BLOCKS_IN_FLIGHT = 2  # the block being computed and the one prefetched (or reduce-scattered)
COMPLEX64 = 8


def _choice(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} = {value!r} is not allowed; choose one of {list(allowed)}")
    return value


def activation_bytes(precision: str) -> int:
    """Bytes of one number in a GEMM input or output: 4 in fp32, 2 under bf16 autocast (FP8: as bf16)."""
    return ACTIVATION_BYTES[_choice("precision", precision, ACTIVATION_BYTES)]


# ------------------------------------------------------------------------------------ parameters


def _widths(m: ModelConfig) -> tuple[int, int, int, int, int]:
    return m.d_model, m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim, m.ffn_dim, m.n_heads


def hidden_matrix_shapes(m: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of one block's GEMM weights: wq, wk, wv, wo, w1, w3, w2."""
    d, q, kv, f, _ = _widths(m)
    return [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]


def block_params(m: ModelConfig) -> int:
    return sum(a * b for a, b in hidden_matrix_shapes(m)) + 2 * m.d_model  # + two norm gains


def param_counts(m: ModelConfig) -> dict[str, int]:
    """Parameters by kind, as ``Transformer`` has them (tied embedding counted once)."""
    embedding = m.vocab_size * m.d_model
    hidden = m.n_layers * (block_params(m) - 2 * m.d_model)
    norms = (2 * m.n_layers + 1) * m.d_model
    return {"total": embedding + hidden + norms, "embedding": embedding, "hidden_matrices": hidden, "norms": norms}


# ----------------------------------------------------------------------------- activations


def activation_bytes_per_token_per_layer(m: ModelConfig, policy: str, precision: str, *,
                                         fused_norm: bool = True) -> int:
    """Bytes autograd keeps from a block's forward to its backward, per token (formulas: module doc)."""
    _choice("policy", policy, POLICIES)
    a, r = activation_bytes(precision), RESIDUAL_BYTES
    d, q, kv, f, heads = _widths(m)
    if policy == "full":
        return r * d
    if policy == "selective":
        return r * d + a * (q + 2 * kv + d) + a * (2 * f + d) + a * q + FP32 * heads
    norms = 2 * (r * d + FP32) + (0 if fused_norm else 2 * FP32 * d)
    return norms + 2 * a * d + a * (q + 2 * kv) + a * q + FP32 * heads + 4 * a * f + te_extra_bytes(m, precision)


def rope_saved_bytes_per_layer(m: ModelConfig, seq_len: int, policy: str) -> int:
    """The complex64 (seq x head_dim/2) RoPE tables autograd keeps per layer, one for q and one for
    k (``mutransfer.model.apply_rope``): per sequence position, shared by the micro-batch's rows;
    only under "none" (a checkpointed block recomputes them)."""
    _choice("policy", policy, POLICIES)
    return 2 * seq_len * (m.head_dim // 2) * COMPLEX64 if policy == "none" else 0


def autocast_weight_copy_bytes_per_layer(m: ModelConfig, policy: str, precision: str, parallel: str) -> int:
    """bf16 autocast saves a bf16 copy of each float32 GEMM weight (measured on CPU): one process
    and DDP keep float32 weights; FSDP2 gathers them in bf16 already. Only under "none"."""
    if policy != "none" or precision != "bf16" or parallel == "fsdp":
        return 0
    return activation_bytes(precision) * sum(a * b for a, b in hidden_matrix_shapes(m))


def saved_constant_bytes(m: ModelConfig, seq_len: int, policy: str, precision: str, parallel: str) -> int:
    """What the blocks save for backward that does not grow with the micro-batch: the RoPE tables
    and autocast's weight copies, all layers."""
    return m.n_layers * (rope_saved_bytes_per_layer(m, seq_len, policy)
                         + autocast_weight_copy_bytes_per_layer(m, policy, precision, parallel))


def te_extra_bytes(m: ModelConfig, precision: str) -> int:
    """Transformer Engine's FP8 Linear keeps its own FP8 copy of its input, row- and column-wise
    (2 bytes a number), per module: wq, wk and wv each keep one of the normed input (and w1, w3
    of theirs) where under bf16 they share one 2-byte copy, and wo keeps one beside the attention
    output it is a view of under bf16. 6 d + 2 q more bytes per token and layer."""
    return 6 * m.d_model + 2 * m.n_heads * m.head_dim if precision == "fp8-te" else 0


def recompute_bytes_per_token(m: ModelConfig, policy: str, precision: str, *, fused_norm: bool = True) -> int:
    """What backward recomputes for the block it is in, live until that block's backward ends.

    "full": the block's "none" activations but its input (kept anyway). "selective": those that
    are not kept: the mid-block residual, the norms' statistics, the casts, q and k after RoPE,
    wo's input, the SiLU output and the SwiGLU product.
    """
    _choice("policy", policy, POLICIES)
    a, r = activation_bytes(precision), RESIDUAL_BYTES
    d, q, kv, f, _ = _widths(m)
    none = activation_bytes_per_token_per_layer(m, "none", precision, fused_norm=fused_norm)
    if policy == "none":
        return 0
    if policy == "full":
        return none - r * d
    unfused = 0 if fused_norm else 2 * FP32 * d
    return r * d + 2 * FP32 + unfused + 2 * a * d + a * (q + kv) + a * q + 2 * a * f


def backward_transient_bytes_per_token(m: ModelConfig, precision: str) -> int:
    """Gradients live inside one block's backward: the residual gradient in and out (float32) and
    the larger branch's: SwiGLU's three ffn-wide gradients, or attention's dq, dk, dv and its output
    gradient with the kernel's float32 dq accumulator. An estimate, not a measurement."""
    a, r = activation_bytes(precision), RESIDUAL_BYTES
    d, q, kv, f, _ = _widths(m)
    return 2 * r * d + max(3 * a * f, a * (2 * q + 2 * kv) + FP32 * q)


def non_layer_bytes_per_token(m: ModelConfig, *, fused_norm: bool = True) -> int:
    """Saved outside the blocks, per token: the embedding's token ids, the final norm (input and
    rstd), its output (the loss chunks' checkpointed input) and the targets. No logits: only the
    last loss chunk keeps its log-softmax for backward, counted in ``loss_transient_bytes``.
    (RoPE's tables are per position, not per token: ``rope_saved_bytes_per_layer``.)"""
    d = m.d_model
    final_norm = RESIDUAL_BYTES * d + FP32 + (0 if fused_norm else FP32 * d)
    return INDEX_BYTES + final_norm + RESIDUAL_BYTES * d + INDEX_BYTES


def loss_transient_bytes(m: ModelConfig, tokens: int, loss_chunk_tokens: int, precision: str) -> int:
    """The loss head's backward, one chunk of c tokens at a time (the model's chunked cross entropy).

    Float32 (c x vocab): the log-softmax (recomputed, or kept by the last chunk), the NLL
    gradient and the log-softmax gradient (12 c V bytes at once); the chunk's hidden-state
    gradient; and the tied embedding's gradient from this chunk, float32 (and under bf16 first
    bf16: 6 V d bytes). Their sum is an upper bound: the embedding's share comes after the
    logits' gradients are freed. (The float32 embedding gradient summed over chunks, which lasts
    to the end of backward, is counted with the gradients.)
    """
    v, d = m.vocab_size, m.d_model
    c = min(loss_chunk_tokens, tokens)
    a = activation_bytes(precision)
    embedding = FP32 * v * d + (a * v * d if a != FP32 else 0)
    return 3 * FP32 * c * v + FP32 * c * d + embedding


def eval_transient_bytes(m: ModelConfig, tokens: int, loss_chunk_tokens: int, precision: str) -> int:
    """A no-grad forward of ``tokens`` tokens with the chunked loss: what is live at its largest.

    In a block: the residual stream, the norm's float32 output and its cast, then attention's q,
    k, v with RoPE's float32 temporaries (about 12 bytes per q number) or SwiGLU's three ffn-wide
    tensors. In the head: the final norm's output, one chunk's float32 logits and log-softmax,
    and under bf16 the embedding's bf16 copy.
    """
    a, r = activation_bytes(precision), RESIDUAL_BYTES
    d, q, kv, f, _ = _widths(m)
    v = m.vocab_size
    attention = a * (q + 2 * kv) + 3 * FP32 * q
    block = tokens * (2 * r * d + a * d + max(attention, 3 * a * f))
    c = min(loss_chunk_tokens, tokens)
    head = tokens * r * d + 2 * FP32 * c * v + (a * v * d if a != FP32 else 0)
    return max(block, head)


# ---------------------------------------------------------------------- parameters and states


def fsdp_gather_bytes(precision: str) -> int:
    """Bytes of a number FSDP2 all-gathers: the trainer's MixedPrecisionPolicy gathers bf16 under
    every autocast precision and float32 under fp32 (``full_scale.distributed.fsdp_mixed_precision``)."""
    return FP32 if _choice("precision", precision, ACTIVATION_BYTES) == "fp32" else 2


def _resident(m: ModelConfig, world_size: int, parallel: str, optimizer: str,
              precision: str = "bf16") -> tuple[int, int, int, int]:
    """(params, grads, optimizer states, optimizer step transient) in bytes on one GPU.

    Master weights, sharded gradients and optimizer states are float32. "fsdp": sharded over
    ``world_size``; FSDP2 gathers in the MixedPrecisionPolicy's dtype (g = ``fsdp_gather_bytes``:
    bf16 under autocast) and reduce-scatters in float32. The root's tied embedding and final norm
    stay gathered through forward and backward (FSDP2 does not reshard the root after forward),
    their unsharded gradient (g bytes) until the end of backward; two blocks' parameters in flight
    (the one computed and the one prefetched), and two blocks' gradients: the one computed (g
    bytes) and the one reduce-scattered (its float32 reduce-scatter input). "ddp": replicated, plus
    DDP's gradient buckets (a second copy of the gradients). "none": one process.
    AdamW: two states per parameter, and one float32 temporary per parameter in its step.
    Muon: one momentum for the hidden matrices (AdamW for embedding and norm gains) and a
    Newton-Schulz workspace for the largest matrix at full size (gathered under FSDP).
    """
    counts = param_counts(m)
    n, hidden = counts["total"], counts["hidden_matrices"]
    local = n / world_size if parallel == "fsdp" else n
    local_hidden = hidden / world_size if parallel == "fsdp" else hidden
    params = grads = FP32 * local
    if parallel == "fsdp":
        g = fsdp_gather_bytes(precision)
        root = g * (counts["embedding"] + m.d_model)
        params += root + FSDP_BLOCKS_IN_FLIGHT * g * block_params(m)
        grads += root + (g + FP32) * block_params(m)
    elif parallel == "ddp":
        grads += FP32 * local
    if optimizer == "adamw":
        states = 2 * FP32 * local
        step = FP32 * local
    else:
        states = FP32 * local_hidden + 2 * FP32 * (local - local_hidden)
        rows, cols = max(hidden_matrix_shapes(m), key=lambda s: s[0] * s[1])
        ns = 2 * FP32 * rows * cols + 4 * 2 * min(rows, cols) ** 2  # fp32 update, bf16 X twice, Gram terms
        step = FP32 * (local - local_hidden) + ns
    return int(params), int(grads), int(states), int(step)


# ------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU for one training phase; ``peak`` (training) and ``eval_peak`` must fit.

    peak = params + grads + optimizer_states
           + max(activations + max(loss_transient, recompute_transient + backward_transient),
                 optimizer_transient) + reserve
    """

    params: int
    grads: int
    optimizer_states: int
    activations: int  # saved by all layers and the head, at the start of backward
    loss_transient: int
    recompute_transient: int
    backward_transient: int
    optimizer_transient: int
    reserve: int
    peak: int
    eval_transient: int
    eval_peak: int

    def fits(self, capacity: int = GPU_80GIB, margin: float = 0.0) -> bool:
        """Both peaks at most ``(1 - margin) * capacity``."""
        return max(self.peak, self.eval_peak) <= (1.0 - margin) * capacity

    def gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in dataclasses.asdict(self).items()}


def _reserve(tensor_bytes: float) -> int:
    return int(RESERVE_FIXED + RESERVE_FRACTION * tensor_bytes)


def estimate(m: ModelConfig, *, seq_len: int, micro_batch: int, world_size: int = 1, parallel: str = "fsdp",
             optimizer: str = "adamw", precision: str = "bf16", checkpointing: str = "none",
             loss_chunk_tokens: int = 4096, eval_tokens: int | None = None, fused_norm: bool = True
             ) -> MemoryEstimate:
    """One training phase on one GPU (see ``MemoryEstimate`` for how the peak is put together).

    ``eval_tokens``: tokens of one evaluation micro-batch (eval batch size x eval sequence length);
    default: the training micro-batch's.
    """
    _choice("parallel", parallel, PARALLEL_MODES)
    _choice("optimizer", optimizer, OPTIMIZERS)
    _choice("checkpointing", checkpointing, POLICIES)
    _choice("precision", precision, ACTIVATION_BYTES)
    for name, value in (("seq_len", seq_len), ("micro_batch", micro_batch), ("world_size", world_size),
                        ("loss_chunk_tokens", loss_chunk_tokens)):
        if value < 1:
            raise ValueError(f"{name} = {value} must be >= 1")
    tokens = seq_len * micro_batch
    params, grads, states, step = _resident(m, world_size, parallel, optimizer, precision)
    per_layer = activation_bytes_per_token_per_layer(m, checkpointing, precision, fused_norm=fused_norm)
    activations = tokens * (m.n_layers * per_layer + non_layer_bytes_per_token(m, fused_norm=fused_norm)) \
        + saved_constant_bytes(m, seq_len, checkpointing, precision, parallel)
    loss = loss_transient_bytes(m, tokens, loss_chunk_tokens, precision)
    recompute = tokens * recompute_bytes_per_token(m, checkpointing, precision, fused_norm=fused_norm)
    if checkpointing != "none":  # the recomputed block's RoPE tables, live until its backward ends
        recompute += rope_saved_bytes_per_layer(m, seq_len, "none")
    backward = tokens * backward_transient_bytes_per_token(m, precision)
    tensors = params + grads + states + max(activations + max(loss, recompute + backward), step)
    reserve = _reserve(tensors)

    # Evaluation runs between steps: no activations saved, gradients only as their sharded copies.
    eval_transient = eval_transient_bytes(m, eval_tokens or tokens, loss_chunk_tokens, precision)
    sharded_grads = FP32 * param_counts(m)["total"] // (world_size if parallel == "fsdp" else 1)
    eval_tensors = params + sharded_grads + states + eval_transient
    return MemoryEstimate(params=params, grads=grads, optimizer_states=states, activations=activations,
                          loss_transient=loss, recompute_transient=recompute, backward_transient=backward,
                          optimizer_transient=step, reserve=reserve, peak=int(tensors + reserve),
                          eval_transient=eval_transient, eval_peak=int(eval_tensors + _reserve(eval_tensors)))
