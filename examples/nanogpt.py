"""A nanoGPT-style GPT in one file, and its mutransfer model spec.

The model is GPT-2's architecture as nanoGPT writes it: learned position embeddings, LayerNorm with
biases, a fused query|key|value projection (``c_attn``), a GELU MLP and a readout tied to the token
embedding. It is written the way a user would write it, with one change for muP: the attention's
softmax scale is an attribute (``scale``; None is torch's 1/sqrt(head_dim)) that the spec sets to
1/head_dim. Everything else -- init, per-parameter learning rates, the embedding, logit and residual
multipliers -- reaches it through ``spec()``: roles by name, multipliers by forward hooks.

    import mutransfer as mt
    from examples.nanogpt import spec
    mt.coord_check(spec(), widths=[64, 128, 256, 512])

From a config file: ``[model] spec = "examples.nanogpt:spec"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mutransfer.spec import ModelSpec, Multipliers


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.scale: float | None = None  # softmax scale; None: 1/sqrt(head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """(logits (batch, seq, vocab), mean cross entropy or None)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


# Parameter name -> muP role. The readout is tied, so it is the embedding's parameter.
ROLES = {
    r"^transformer\.wte\.weight$": "embedding",
    r"^transformer\.wpe\.weight$": "pos_embedding",
    r"\.attn\.c_attn\.weight$": "attn_qkv",
    r"\.attn\.c_proj\.weight$": "attn_out",
    r"\.mlp\.c_fc\.weight$": "ffn_in",
    r"\.mlp\.c_proj\.weight$": "ffn_out",
    r"\.ln_[12]\.weight$": "norm_gain",
    r"^transformer\.ln_f\.weight$": "final_norm",
    r"\.bias$": "bias",
}

MULTIPLIERS = Multipliers(
    embedding=r"^transformer\.wte$",
    readout=r"^lm_head$",
    residual_attn=r"\.attn\.c_proj$",
    residual_ffn=r"\.mlp\.c_proj$",
    attn_scale=(r"\.attn$", "scale"),
)


def spec(width: int = 64, depth: int = 4, head_dim: int = 16, vocab_size: int = 256, block_size: int = 256,
         bias: bool = True) -> ModelSpec:
    """The GPT family at a fixed head dim: ``width // head_dim`` heads at every width."""

    def build(w: int, d: int) -> GPT:
        if w % head_dim:
            raise ValueError(f"width {w} is not a multiple of head_dim {head_dim}")
        return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=d, n_head=w // head_dim,
                             n_embd=w, bias=bias))

    return ModelSpec(
        name="nanogpt",
        build=build,
        roles=ROLES,
        width=width,
        depth=depth,
        head_dim=head_dim,
        multipliers=MULTIPLIERS,
        loss=lambda model, x, y: model(x, y)[1],
        logits=lambda model, x: model(x)[0],
        blocks=r"^transformer\.h\.\d+$",
        vocab_size=vocab_size,
    )
