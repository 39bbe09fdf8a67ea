"""Build a model at a shape: forward multipliers and initialisation from the muP table."""

from __future__ import annotations

import torch

from mutransfer.config import HParams, RunShape
from mutransfer.model import Transformer
from mutransfer.parametrization import forward_multipliers, init_weights


def build_model(shape: RunShape, hp: HParams, device: str | torch.device = "cpu", seed: int | None = 0
                ) -> Transformer:
    """A Transformer at ``shape`` initialised by the table; ``device="meta"`` allocates nothing."""
    shape.model.validate()
    shape.param.validate()
    hp.validate()
    mult = forward_multipliers(shape.model, shape.param, hp)
    with torch.device(device):
        model = Transformer(shape.model, mult)
    if torch.device(device).type != "meta":
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
        init_weights(model, shape.model, shape.param, hp, generator=gen)
    return model
