"""Named model shapes, and the width family that muP transfer moves along."""

from __future__ import annotations

from mutransfer.config import ConfigError, ModelConfig, ParamConfig, RunShape, updated

DEEPSEEK_V3_MODEL_VOCAB = 129_280  # 128,000 BPE + added tokens, padded (RECIPE section 1)

PRESETS: dict[str, RunShape] = {
    # CPU seconds: byte-level vocabulary, four blocks. Its own base shape (d_base 64, L0 4).
    "tiny": RunShape(
        model=ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                          ffn_dim=160, rope_base=10_000.0, max_seq_len=512, tokenizer="byte"),
        param=ParamConfig(parametrization="mup", d_base=64, depth_base=4),
    ),
    # The paper's proxy rules: target tokenizer and depth, head dim 64, FFN 2.5 d, GQA 3:1 as in
    # the target; d = 192 gives 18.0M non-embedding parameters (dims divisible by 16).
    "proxy-20m": RunShape(
        model=ModelConfig(vocab_size=DEEPSEEK_V3_MODEL_VOCAB, d_model=192, n_layers=48, n_heads=3,
                          n_kv_heads=1, head_dim=64, ffn_dim=480, rope_base=500_000.0, max_seq_len=4096,
                          tokenizer="deepseek-v3"),
        param=ParamConfig(parametrization="mup", d_base=256, depth_base=48),
    ),
    # RECIPE section 1 exactly; the recipe's own parametrization by default.
    "xmodel25-1.3b": RunShape(
        model=ModelConfig(vocab_size=DEEPSEEK_V3_MODEL_VOCAB, d_model=1536, n_layers=48, n_heads=24,
                          n_kv_heads=8, head_dim=64, ffn_dim=3840, rope_base=500_000.0, max_seq_len=131_072,
                          tokenizer="deepseek-v3"),
        param=ParamConfig(parametrization="xmodel", d_base=256, depth_base=48),
    ),
}


def get_preset(name: str) -> RunShape:
    if name not in PRESETS:
        raise ConfigError(f"preset = {name!r} is not known; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def at_width(model: ModelConfig, width: int) -> ModelConfig:
    """The same model at another width: head dim fixed, heads, KV heads and FFN scaled with it."""
    if width % model.head_dim:
        raise ConfigError(f"width = {width} is not divisible by head_dim = {model.head_dim} "
                          f"(allowed widths: multiples of {model.head_dim})")
    n_heads = width // model.head_dim
    n_kv = max(1, n_heads // model.gqa_ratio)
    while n_heads % n_kv:
        n_kv -= 1
    ffn = width * model.ffn_dim / model.d_model
    if ffn != int(ffn):
        raise ConfigError(f"width = {width}: FFN width {ffn} (ratio {model.ffn_dim}/{model.d_model}) "
                          "is not a whole number")
    return updated(model, f"width {width}", d_model=width, n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=int(ffn))


def at_depth(model: ModelConfig, depth: int) -> ModelConfig:
    """The same model with ``depth`` blocks (everything else kept)."""
    if not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"depth = {depth!r} must be a positive integer number of blocks")
    return updated(model, f"depth {depth}", n_layers=depth)


def width_family(name: str, widths: list[int]) -> list[RunShape]:
    base = get_preset(name)
    return [RunShape(model=at_width(base.model, w), param=base.param) for w in widths]
