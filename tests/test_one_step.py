"""One training step for every loop: a proxy trial and the full-scale trainer, given the same shape,
data, seeds and hyperparameters, produce the same losses -- so the proxy that tunes the LR trains
like the target it is tuned for."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from full_scale.metrics import read_rows
from mutransfer.cli import main
from mutransfer.config import ProxyTrain
from mutransfer.data.builtin import builtin_dataset
from mutransfer.lockfile import read_lock
from mutransfer.presets import get_preset
from mutransfer.step import Diverged, DivergenceGuard
from mutransfer.training import train_proxy

pytestmark = pytest.mark.numerical  # compares kernel outputs with tolerances: CI runs it twice

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "full_scale" / "smoke.hparams.lock.json"

CONFIG = """
[model]
preset = "tiny"

[train]
precision = "fp32"
device = "cpu"
threads = 1
eval_every = 1000
eval_batches = 1
eval_batch_size = 4
eval_seq_len = 64

[optimizer]
switch = false

[checkpoint]
every = 0
at_stage_end = false

[data]
mixture = [{{ name = "pretrain", data = "builtin" }}]

[[stages]]
name = "warmup"
steps = 5
global_batch = 8
micro_batch = {micro}
seq_len = 64
lr = {{ shape = "linear", start = 0.0, end = 1.0 }}

[[stages]]
name = "stable"
steps = 15
global_batch = 8
micro_batch = {micro}
seq_len = 64
lr = {{ shape = "constant" }}
"""


@pytest.mark.parametrize("micro", [8, 4])
def test_a_proxy_trial_and_the_full_scale_trainer_train_alike(tmp_path, micro):
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(micro=micro))
    assert main(["train", str(config), "--hparams", str(LOCK), "--out", str(tmp_path / "full"), "--quiet"]) == 0
    full = [r["loss"] for r in read_rows(tmp_path / "full" / "metrics.jsonl")]

    # The same run as a proxy trial: the trainer draws a source's rows with the seed of its name.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tc = ProxyTrain(steps=20, batch_size=8, micro_batch_size=micro, seq_len=64, warmup=5, decay=0,
                        eval_every=1000, eval_batches=1, eval_batch_size=4, device="cpu",
                        data_seed=zlib.crc32(b"0:pretrain"))
        proxy = train_proxy(get_preset("tiny"), read_lock(LOCK).hparams, tc, builtin_dataset("byte")).train_losses
    finally:
        torch.set_num_threads(threads)
    assert len(full) == len(proxy) == 20
    assert full == pytest.approx(proxy, rel=1e-6, abs=0)
    assert full[-1] < full[0] - 0.5  # and it is training


def test_the_one_divergence_rule():
    guard = DivergenceGuard(ratio=4.0)
    guard.check(0, 5.0)
    guard.check(1, 19.9)
    with pytest.raises(Diverged, match="exceeds 4.0x the first step's 5"):
        guard.check(2, 20.1)
    with pytest.raises(Diverged, match="training loss is nan at step 3"):
        DivergenceGuard(4.0).check(3, float("nan"))
    restored = DivergenceGuard(4.0)
    restored.load_state_dict(guard.state_dict())  # a resumed run keeps its first loss
    with pytest.raises(Diverged):
        restored.check(4, 25.0)
