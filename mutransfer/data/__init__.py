"""Token data: prepare text into shards, read them back with a deterministic sampler."""

from mutransfer.data.builtin import BUILTIN_NAME, builtin_dataset, open_dataset
from mutransfer.data.dataset import TokenDataset
from mutransfer.data.prepare import prepare_dataset

__all__ = ["BUILTIN_NAME", "TokenDataset", "builtin_dataset", "open_dataset", "prepare_dataset"]
