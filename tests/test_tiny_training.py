"""The tiny preset learns the built-in corpus on CPU: held-out loss falls well below unigram entropy."""

import math

import numpy as np
import pytest
import torch

from mutransfer.config import HParams, ProxyTrain
from mutransfer.data.builtin import builtin_dataset
from mutransfer.presets import get_preset
from mutransfer.training import train_proxy


def unigram_entropy_nats(dataset) -> float:
    tokens = np.concatenate([np.asarray(x.flatten()) for x, _ in dataset.eval_batches("val", 16, 128, 8)])
    counts = np.bincount(tokens, minlength=256).astype(float)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_tiny_learns_below_unigram_entropy(tmp_path):
    torch.manual_seed(0)
    dataset = builtin_dataset("byte", cache_dir=tmp_path)
    h_unigram = unigram_entropy_nats(dataset)
    assert 3.0 < h_unigram < 3.5  # English bytes: about 3.3 nats
    tc = ProxyTrain(steps=300, batch_size=16, seq_len=128, warmup=30, decay=60, eval_every=100)
    hp = HParams(lr=0.01, init_std=0.1, alpha_in=4.0, alpha_out=1.0, alpha_res=1.4)
    result = train_proxy(get_preset("tiny"), hp, tc, dataset)
    first, last = result.val_losses[0][1], result.val_losses[-1][1]
    assert math.isfinite(last) and last < first
    # "well below": at least 0.6 nats under the unigram entropy (a bigram model of English is ~2.5)
    assert last < h_unigram - 0.6, (last, h_unigram)
