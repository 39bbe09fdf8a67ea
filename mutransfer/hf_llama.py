"""HuggingFace ``transformers`` ``LlamaForCausalLM`` as a model spec (optional extra ``hf``).

A tiny ``LlamaConfig`` is built offline (nothing is downloaded): the family keeps the head dim and
the FFN ratio fixed and scales heads, KV heads and FFN width with the hidden size, as the built-in
Transformer's does. The readout (``lm_head``) is untied by default, as Llama's config has it: the
``readout`` role, mup's ``MuReadout`` (input x alpha_out/m). The attention reads its softmax scale
from ``self_attn.scaling``, which the spec sets to 1/head_dim under muP. Nothing in the model's
code is changed.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from mutransfer.config import ConfigError
from mutransfer.spec import ModelSpec, Multipliers

INSTALL = 'install HuggingFace transformers with pip install "mutransfer[hf]"'

ROLES = {
    r"^model\.embed_tokens\.weight$": "embedding",
    r"^lm_head\.weight$": "readout",
    r"\.self_attn\.[qkv]_proj\.weight$": "attn_qkv",
    r"\.self_attn\.o_proj\.weight$": "attn_out",
    r"\.mlp\.(gate|up)_proj\.weight$": "ffn_in",
    r"\.mlp\.down_proj\.weight$": "ffn_out",
    r"\.(input_layernorm|post_attention_layernorm)\.weight$": "norm_gain",
    r"^model\.norm\.weight$": "final_norm",
    r"\.bias$": "bias",
}

MULTIPLIERS = Multipliers(
    embedding=r"^model\.embed_tokens$",
    readout=r"^lm_head$",
    residual_attn=r"\.self_attn\.o_proj$",
    residual_ffn=r"\.mlp\.down_proj$",
    attn_scale=(r"\.self_attn$", "scaling"),
)

_FUSED = re.compile(r"^(model\.layers\.\d+)\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.weight$")


def fuse_key(name: str) -> str:
    """Q|K|V of a layer are one fused matrix, and so are gate|up (as Megatron stores them)."""
    m = _FUSED.match(name)
    if not m:
        return name
    return f"{m.group(1)}.{'qkv' if m.group(2).startswith('self_attn') else 'gate_up'}"


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(f"model spec 'hf-llama' needs transformers: {INSTALL} ({e})") from None
    return transformers


def llama_config(width: int, depth: int, head_dim: int = 16, ffn_ratio: float = 2.5, gqa: int = 2,
                 vocab_size: int = 256, max_seq_len: int = 512, tie_embeddings: bool = False):
    """A ``LlamaConfig`` at ``width`` and ``depth`` blocks, made offline."""
    transformers = _transformers()
    if width % head_dim or (width * ffn_ratio) != int(width * ffn_ratio):
        raise ConfigError(f"hf-llama: width {width} needs to be a multiple of head_dim {head_dim} with a whole "
                          f"FFN width (ratio {ffn_ratio})")
    heads = width // head_dim
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=int(width * ffn_ratio), num_hidden_layers=depth,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // gqa), head_dim=head_dim,
        max_position_embeddings=max_seq_len, rms_norm_eps=1e-5, tie_word_embeddings=tie_embeddings,
        attention_bias=False, mlp_bias=False)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, use_cache=False).logits


def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; ``y`` is already shifted (HF's ``labels`` would shift again)."""
    return F.cross_entropy(logits(model, x).float().flatten(0, 1), y.flatten())


def spec(width: int = 64, depth: int = 4, head_dim: int = 16, ffn_ratio: float = 2.5, gqa: int = 2,
         vocab_size: int = 256, max_seq_len: int = 512, tie_embeddings: bool = False) -> ModelSpec:
    """The Llama family of ``LlamaForCausalLM`` around ``width`` x ``depth`` (the proxy shape)."""
    transformers = _transformers()
    roles = dict(ROLES)
    if tie_embeddings:
        del roles[r"^lm_head\.weight$"]  # tied: the readout is the embedding's parameter

    def build(w: int, d: int) -> nn.Module:
        cfg = llama_config(w, d, head_dim, ffn_ratio, gqa, vocab_size, max_seq_len, tie_embeddings)
        return transformers.LlamaForCausalLM(cfg)

    return ModelSpec(name="hf-llama", build=build, roles=roles, width=width, depth=depth, head_dim=head_dim,
                     multipliers=MULTIPLIERS, loss=loss, logits=logits, blocks=r"^model\.layers\.\d+$",
                     fuse_key=fuse_key, vocab_size=vocab_size)
