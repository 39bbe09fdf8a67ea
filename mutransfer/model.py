"""Decoder-only transformer of RECIPE section 1: Pre-RMSNorm, SwiGLU, RoPE, GQA, tied embeddings.

The model knows four plain numbers from the parametrization (ForwardMultipliers) and nothing
else about muP; initialisation and optimizer settings come from mutransfer.parametrization.
Parameter names are part of the contract: the muP table gives roles by name.
A few parameter-free modules (``Multiply``, ``QKTap``, ``TiedLogits``) exist so that forward hooks
can observe the embedding output, attention logits and output logits (coordinate checks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mutransfer.config import ModelConfig
from mutransfer.parametrization import ForwardMultipliers


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
    """Identity on (q, k); a hook here sees the attention-logit inputs without extra compute."""

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


class TiedLogits(nn.Module):
    """logits = factor * h E^T with the tied embedding matrix E."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        # Scale the (d-wide) input, not the (vocab-wide) output: same numbers, one pass fewer.
        return F.linear(h * self.factor, embedding)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cos_sin(seq_len: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]); x is (batch, heads, seq, head_dim)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_scale: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.attn_scale = float(attn_scale)
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.qk_tap = QKTap()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
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
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mult: ForwardMultipliers):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg, mult.attn_scale)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.residual = float(mult.residual)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.residual * self.attention(self.attention_norm(h), cos, sin)
        return h + self.residual * self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, mult: ForwardMultipliers):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_scale = Multiply(mult.embedding)
        self.layers = nn.ModuleList(Block(cfg, mult) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = TiedLogits(mult.logits)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab) in float32."""
        seq_len = tokens.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len = {self.cfg.max_seq_len}")
        cos, sin = rope_cos_sin(seq_len, self.cfg.head_dim, self.cfg.rope_base, tokens.device)
        h = self.embed_scale(self.tok_embeddings(tokens))
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h), self.tok_embeddings.weight).float()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in nats."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
