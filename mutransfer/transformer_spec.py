"""The built-in Transformer (``mutransfer.model``) as a model spec: the one place outside the model
file that knows its parameter and module names.

It takes the forward multipliers natively (plain floats on its modules, no hooks), builds on the
meta device (``Transformer.to_empty`` recomputes the RoPE tables), names the recipe's fused matrices
for Muon (Q|K|V and gate|up per block, RECIPE section 4), and taps the attention logits through its
``QKTap`` modules.
"""

from __future__ import annotations

import re

from mutransfer.config import ModelConfig
from mutransfer.model import Transformer
from mutransfer.parametrization import ForwardMultipliers, RoleMap
from mutransfer.presets import at_depth, at_width
from mutransfer.spec import ModelSpec

# Parameter name -> role. Names are those of mutransfer.model.Transformer (and of any precision
# backend's linear layer, which keeps the ``.weight`` name).
ROLES = {
    r"(^|\.)tok_embeddings\.weight$": "embedding",
    r"\.attention\.w[qkv]\.weight$": "attn_qkv",
    r"\.attention\.wo\.weight$": "attn_out",
    r"\.feed_forward\.w[13]\.weight$": "ffn_in",
    r"\.feed_forward\.w2\.weight$": "ffn_out",
    r"(^|\.)(attention_norm|ffn_norm)\.weight$": "norm_gain",
    r"(^|\.)norm\.weight$": "final_norm",
}

ROLE_MAP = RoleMap(ROLES)

# Matrices the recipe's Megatron stores fused, per block (RECIPE section 4): Muon with ``fuse`` on
# orthogonalises each set as one matrix, stacked in parameter order (wq, wk, wv; w1, w3).
FUSED_SETS = {"attention": ("wq", "wk", "wv"), "feed_forward": ("w1", "w3")}
_FUSED = re.compile(r"(^|\.)layers\.(\d+)\.(attention|feed_forward)\.(\w+)\.weight$")

NEUTRAL = ForwardMultipliers(embedding=1.0, residual_attn=1.0, residual_ffn=1.0, logits=1.0, attn_scale=1.0)


def fuse_key(name: str) -> str:
    """The fused matrix a parameter belongs to (``layers.<i>.attention``), or its own name."""
    m = _FUSED.search(name)
    if m and m.group(4) in FUSED_SETS[m.group(3)]:
        return f"layers.{m.group(2)}.{m.group(3)}"
    return name


def set_multipliers(model: Transformer, mult: ForwardMultipliers) -> None:
    """The table's forward multipliers as the plain floats the Transformer multiplies by."""
    model.embed_scale.factor = float(mult.embedding)
    model.logit_scale.factor = float(mult.logits)
    for block in model.layers:
        block.residual_attn = float(mult.residual_attn)
        block.residual_ffn = float(mult.residual_ffn)
        block.attention.attn_scale = float(mult.attn_scale)
        block.attention.qk_tap.scale = float(mult.attn_scale)


def transformer_spec(model: ModelConfig) -> ModelSpec:
    """The built-in Transformer family of ``model``'s config: ``at_width`` scales heads, KV heads and
    FFN with the width (head dim fixed), ``at_depth`` sets the number of blocks."""

    def build(width: int, depth: int) -> Transformer:
        cfg = model
        if width != cfg.d_model:
            cfg = at_width(cfg, width)
        if depth != cfg.n_layers:
            cfg = at_depth(cfg, depth)
        return Transformer(cfg, NEUTRAL)

    return ModelSpec(
        name="transformer",
        build=build,
        roles=ROLE_MAP,
        width=model.d_model,
        depth=model.n_layers,
        head_dim=model.head_dim,
        multipliers=set_multipliers,
        blocks=r"^layers\.\d+$",
        taps={"embedding": r"^embed_scale$", "attn_out": r"\.attention\.wo$", "ffn_out": r"\.feed_forward\.w2$",
              "attn_logits": r"\.attention\.qk_tap$", "output_logits": r"^output$"},
        fuse_key=fuse_key,
        vocab_size=model.vocab_size,
        meta_build=True,
    )
