"""Decoder-only transformer of RECIPE section 1: Pre-RMSNorm, SwiGLU, RoPE, GQA, tied embeddings.

The model knows four plain numbers from the parametrization (ForwardMultipliers) and nothing
else about muP; initialisation and optimizer settings come from mutransfer.parametrization.
Parameter names are part of the contract: its model spec (``mutransfer.transformer_spec``) gives
roles by name.
A few parameter-free modules (``Multiply``, ``QKTap``, ``TiedLogits``) exist so that forward hooks
can observe the embedding output, attention logits and output logits (coordinate checks).

Memory (what lets the 1.3B train at long context; the arithmetic is in mutransfer.memory):
- ``model(tokens, targets)`` returns the loss, computed inside ``forward`` (under FSDP2 the tied
  embedding is unsharded only there) ``loss_chunk_tokens`` tokens at a time, so the float32
  (tokens x vocab) logits are never all live, forward or backward.
- ``set_activation_checkpointing("none" | "full" | "selective")`` per block; a plain string on
  each ``Block``, read by its forward. Names and modules do not change (muP roles, FSDP2 units).
Forward hooks see every logit only on the ``targets=None`` path: the chunked loss calls ``output``
once per chunk, and a checkpointed module's hooks fire again when backward recomputes it.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from mutransfer.config import ModelConfig
from mutransfer.parametrization import ForwardMultipliers
from mutransfer.precision.fp8_emulated import activation_recompute

CHECKPOINT_POLICIES = ("none", "full", "selective")
DEFAULT_LOSS_CHUNK_TOKENS = 4096
IGNORE_INDEX = -100  # F.cross_entropy's: targets equal to it do not count


class Multiply(nn.Module):
    """x -> factor * x, with the factor a plain float."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:.6g}"


class QKTap(nn.Module):
    """Identity on (q, k); a hook here sees the attention-logit inputs without extra compute, and
    ``scale`` (the softmax scale) makes them logits."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


class TiedLogits(nn.Module):
    """logits = h E^T with the tied embedding matrix E (the logit multiplier scales h before: ``logit_scale``)."""

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(h, embedding)


class _CPURMSNorm(torch.autograd.Function):
    """``F.rms_norm`` with a hand-written backward, for eager CPU.

    On CPU torch's RMSNorm is a composite (pow, mean, add, rsqrt, mul, mul) and autograd
    differentiates it op by op: at d 256 forward + backward took 3-5x ``F.layer_norm``'s. The forward
    here is the composite's, op for op (bit-identical output); the backward is the closed form
    dx = rstd (g w - x_hat mean(g w x_hat)), dw = sum(g x_hat), equal to autograd's to float
    rounding. It keeps what the composite keeps -- the input, the normalized input and rstd -- so
    the CPU memory profile (``mutransfer.memory``, ``fused_norm=False``) is unchanged.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        x_hat = xf * rstd
        ctx.save_for_backward(x, x_hat, rstd, weight)
        return (x_hat * weight).type_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, x_hat, rstd, weight = ctx.saved_tensors
        g = grad.float()
        # Two (tokens x d) allocations: on CPU a fresh one can cost more than the arithmetic.
        gx_hat_x_hat = g * x_hat
        grad_weight = gx_hat_x_hat.flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dot = gx_hat_x_hat.mul_(weight).mean(-1, keepdim=True)  # mean(g w x_hat) per token
        grad_x = (g * weight).addcmul_(x_hat, dot, value=-1).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CUDA has a fused kernel and torch.compile fuses the composite: both keep F.rms_norm.
        if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _CPURMSNorm.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def gemm_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype, cast once: autocast would make (and save for backward) one copy per GEMM."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def rope_cos_sin(seq_len: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by angle i of each position; x is (batch, heads, seq, head_dim),
    cos and sin (seq, head_dim / 2).

    The pairing (interleaved, LLaMA's) is part of what a checkpoint means: wq and wk are trained
    for it. Eager, the rotation is one complex multiply -- (x[2i] + i x[2i+1]) (cos + i sin), the
    same products and sums, ~4x faster forward + backward than rotating the strided halves.
    Inductor does not generate code for complex numbers, so under torch.compile it gets the real
    form, which it fuses into one kernel.
    """
    if torch.compiler.is_compiling():
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        return out.type_as(x)
    pairs = x.float().unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # view_as_complex needs whole complex numbers in memory
    rotated = torch.view_as_complex(pairs) * torch.complex(cos, sin)
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_scale: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.attn_scale = float(attn_scale)
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.qk_tap = QKTap(attn_scale)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        x = gemm_input(x)  # shared by wq, wk, wv
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.qk_tap(apply_rope(q, cos, sin), apply_rope(k, cos, sin))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attn_scale,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gemm_input(x)  # shared by w1, w3
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def check_checkpointing(policy: str) -> str:
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"activation checkpointing policy {policy!r} is not allowed; "
                         f"choose one of {list(CHECKPOINT_POLICIES)}")
    return policy


# The selective rule: save the outputs of the ops that are costly to recompute -- the GEMMs
# (wq, wk, wv, wo, w1, w3, w2) and the attention kernel (its output and logsumexp) -- and
# recompute everything else: RMSNorm, RoPE, SiLU * gate, dtype casts, residual adds. Those are
# elementwise, memory-bound and cheap next to the GEMMs, while keeping them costs more than the
# GEMM outputs they derive from: the norms save float32 copies of the residual stream, SwiGLU
# saves four ffn-wide tensors where its two GEMM outputs suffice.
# At the 1.3B in bf16 this keeps 36 kB per token and layer instead of 61 kB (mutransfer.memory)
# and recomputes no GEMM. "full" keeps 6 kB (the float32 block input) but recomputes the whole
# block: one more forward of every block, about a third more block compute.
_ATEN = torch.ops.aten
_SAVED_OPS = frozenset(getattr(_ATEN, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
) if hasattr(_ATEN, name))


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """``create_selective_checkpoint_contexts`` policy: save GEMM and attention outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _recomputing(replay):
    with replay, activation_recompute():
        yield


def _full_contexts():
    """Recompute everything; the recomputation is marked so that FP8 delayed scaling does not count it."""
    return contextlib.nullcontext(), activation_recompute()


def _selective_contexts():
    cache, replay = create_selective_checkpoint_contexts(selective_policy)
    return cache, _recomputing(replay)


def _compiled_selective_contexts():
    """Under torch.compile the partitioner recomputes from these tags; no Python forward reruns."""
    return create_selective_checkpoint_contexts(selective_policy)


# Tensors that selective checkpointing keeps go through saved_tensors_hooks like any other saved
# tensor (offloading, memory accounting), where this torch has the switch.
_CHECKPOINT_KWARGS = ({"respect_saved_tensors_hooks": True}
                      if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters else {})


class Block(nn.Module):
    """Pre-norm attention and SwiGLU branches; ``checkpointing`` says what backward recomputes.

    "none": autograd saves every activation. "full": only the block input is kept; backward
    recomputes the block. "selective": the block input and the GEMM and attention outputs are
    kept, the elementwise ops recomputed (``selective_policy``). Recomputation is exact: same
    ops, same inputs, no randomness in a block (so the RNG state is not stashed).
    """

    def __init__(self, cfg: ModelConfig, mult: ForwardMultipliers):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg, mult.attn_scale)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.residual_attn = float(mult.residual_attn)
        self.residual_ffn = float(mult.residual_ffn)
        self.checkpointing = "none"
        self.recompute_backend = "torch"  # "te": Transformer Engine's checkpoint (its FP8 state needs it)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        policy = check_checkpointing(self.checkpointing)
        if policy == "none" or not torch.is_grad_enabled():
            return self.compute(h, cos, sin)
        if self.recompute_backend == "te":
            from mutransfer.precision.fp8_te import checkpoint as te_checkpoint

            if policy != "full":
                raise ValueError("Transformer Engine recomputes whole blocks only: use checkpointing 'full'")
            return te_checkpoint(self.compute, h, cos, sin)
        if torch.compiler.is_compiling():  # torch.compile accepts only SAC's contexts, or none for "full"
            context = {"context_fn": _compiled_selective_contexts} if policy == "selective" else {}
        else:
            context = {"context_fn": _selective_contexts if policy == "selective" else _full_contexts}
        return checkpoint(self.compute, h, cos, sin, use_reentrant=False, preserve_rng_state=False, **context,
                          **_CHECKPOINT_KWARGS)

    def compute(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # h + m * branch as one kernel (add's alpha): one pass and one allocation fewer than mul, add.
        h = torch.add(h, self.attention(self.attention_norm(h), cos, sin), alpha=self.residual_attn)
        return torch.add(h, self.feed_forward(self.ffn_norm(h)), alpha=self.residual_ffn)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, mult: ForwardMultipliers):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_scale = Multiply(mult.embedding)
        self.layers = nn.ModuleList(Block(cfg, mult) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Scale the (d-wide) readout input, not the (vocab-wide) logits: same numbers, one pass fewer.
        self.logit_scale = Multiply(mult.logits)
        self.output = TiedLogits()
        self.loss_chunk_tokens = DEFAULT_LOSS_CHUNK_TOKENS
        # RoPE's cos and sin for every position up to max_seq_len, float32, computed once (not per
        # forward: under torch.compile the pow/cos/sin were fused into the RoPE kernels and redone
        # per element, head and step). Not persistent: a function of the config, not state.
        half = cfg.head_dim // 2
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, half), persistent=False)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the RoPE tables on the buffers' device: after ``to_empty`` (done by this
        class's ``to_empty``) or anything else that leaves them uninitialised. A no-op on meta."""
        cos, sin = rope_cos_sin(self.cfg.max_seq_len, self.cfg.head_dim, self.cfg.rope_base, self.rope_cos.device)
        for name, value in (("rope_cos", cos), ("rope_sin", sin)):
            buffer = getattr(self, name)
            if buffer.dtype == value.dtype and buffer.shape == value.shape:
                buffer.copy_(value)  # in place: whoever holds the buffer sees the new values
            else:
                setattr(self, name, value)

    def to_empty(self, *, device, recurse: bool = True):
        """``nn.Module.to_empty`` (meta-device builds), then the RoPE tables recomputed on ``device``."""
        super().to_empty(device=device, recurse=recurse)
        self.init_buffers()
        return self

    def _apply(self, fn, recurse=True):
        """Module casts (``.to(bfloat16)``) move the RoPE tables but keep them float32, as computed."""
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32 or self.rope_sin.dtype != torch.float32:
            self.init_buffers()
        return self

    @property
    def loss_chunk_tokens(self) -> int:
        """Tokens per cross-entropy chunk: the loss holds at most this many rows of logits at once."""
        return self._loss_chunk_tokens

    @loss_chunk_tokens.setter
    def loss_chunk_tokens(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"loss_chunk_tokens = {n!r} must be a positive integer")
        self._loss_chunk_tokens = n

    def set_activation_checkpointing(self, policy: str, backend: str | None = None) -> None:
        """Every block to ``policy``: "none", "full" or "selective" (see ``Block``); ``backend``:
        whose checkpoint recomputes ("torch", or "te" for Transformer Engine's FP8 modules)."""
        check_checkpointing(policy)
        for block in self.layers:
            block.checkpointing = policy
            if backend is not None:
                block.recompute_backend = backend

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab) in float32; with ``targets``
        (batch, seq), the mean next-token cross entropy in nats instead (``chunked_cross_entropy``)."""
        seq_len = tokens.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len = {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        h = self.embed_scale(self.tok_embeddings(tokens))
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        if targets is None:
            return self.output(self.logit_scale(h), self.tok_embeddings.weight).float()
        return self.chunked_cross_entropy(h, targets)

    def chunked_cross_entropy(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``loss_fn(output(h), targets)`` without ever holding more than one chunk's logits.

        Every chunk but the last runs under checkpoint: the forward keeps only its rows of ``h`` (a
        view) and frees its logits, the backward recomputes them one chunk at a time. The last
        chunk keeps what its backward needs: that backward runs first, right after the forward,
        when those tensors would be live anyway. The price is one more head GEMM for every chunk
        but the last (2 d vocab FLOPs per token, ~4 % of the 1.3B's step; nothing for one chunk).
        """
        h, targets = h.flatten(0, 1), targets.flatten()
        weight = self.tok_embeddings.weight
        chunks = list(zip(h.split(self.loss_chunk_tokens), targets.split(self.loss_chunk_tokens), strict=True))
        total = torch.zeros((), device=h.device)
        for i, (h_chunk, t_chunk) in enumerate(chunks):
            if torch.is_grad_enabled() and i < len(chunks) - 1:
                total = total + checkpoint(self._summed_loss, h_chunk, weight, t_chunk, use_reentrant=False,
                                           preserve_rng_state=False)
            else:
                total = total + self._summed_loss(h_chunk, weight, t_chunk)
        return total / (targets != IGNORE_INDEX).sum()

    def _summed_loss(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Cast here, not via autocast's cache: each chunk's bf16 embedding gradient then turns float32
        # before the chunks are summed, and a chunk's graph does not reach into another's.
        logits = self.output(self.logit_scale(h), gemm_input(weight)).float()
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in nats."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
