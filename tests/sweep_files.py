"""The tiny-model trial budget the sweep tests share: seconds per trial on CPU."""

TINY_TRIAL = """
[model]
preset = "tiny"

[data]
spec = "builtin"

[train]
steps = {steps}
batch_size = 4
seq_len = 32
warmup = 0
eval_every = 6
eval_batches = 1
eval_batch_size = 4
"""
