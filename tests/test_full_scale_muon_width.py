"""Muon under muP: the ``mup`` rule keeps a Muon step's effect on a layer's output flat in width, the
recipe's ``xmodel`` rule (RMS matching on top of AdamW's eta/m) lets it shrink like 1/sqrt(width).

One real step of ``build_optimizers(..., "muon")`` on the tiny family (widths 64..1024, one layer),
measuring RMS(dW x) / RMS(x) on the inputs x the layer saw in that step (RECIPE section 4).
"""

import dataclasses

import numpy as np
import pytest
import torch

from mutransfer.build import build_model
from mutransfer.config import HParams, ParamConfig, RunShape
from mutransfer.model import loss_fn
from mutransfer.optim import build_optimizers
from mutransfer.presets import at_width, get_preset

WIDTHS = (64, 128, 256, 512, 1024)


def output_change(parametrization: str, width: int, module: str) -> float:
    tiny = get_preset("tiny")
    shape = RunShape(model=dataclasses.replace(at_width(tiny.model, width), n_layers=1),
                     param=ParamConfig(parametrization=parametrization, d_base=64, depth_base=1))
    hp = HParams(lr=0.01, alpha_in=4.0, weight_decay=0.0)  # no decay: the step is the Muon update only
    model = build_model(shape, hp, seed=0)
    opts = build_optimizers(model, shape, hp, "muon")
    layer = model.get_submodule(module)
    seen = {}
    hook = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach().clone()))
    tokens = torch.randint(0, 256, (4, 65), generator=torch.Generator().manual_seed(0))
    loss_fn(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    hook.remove()
    for p in model.parameters():  # step only the measured matrix (keeps the test fast)
        if p is not layer.weight:
            p.grad = None
    before = layer.weight.detach().clone()
    opts.step()
    assert any(p is layer.weight for g in opts.optimizers["muon"].param_groups for p in g["params"])
    x = seen["x"].flatten(0, 1)
    dw = layer.weight.detach() - before
    return ((x @ dw.T).pow(2).mean().sqrt() / x.pow(2).mean().sqrt()).item()


@pytest.fixture(autouse=True)
def one_thread():
    """Small GEMMs on a shared CPU: more threads only thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def slope(values) -> float:
    return float(np.polyfit(np.log2(WIDTHS), np.log2(values), 1)[0])


@pytest.mark.parametrize("module", ["layers.0.attention.wo", "layers.0.feed_forward.w1"])
def test_mup_muon_step_is_width_stable_and_recipe_shrinks(module):
    torch.manual_seed(0)
    mup = [output_change("mup", w, module) for w in WIDTHS]
    recipe = [output_change("xmodel", w, module) for w in WIDTHS]
    assert abs(slope(mup)) < 0.1, mup  # flat
    assert max(mup) / min(mup) < 1.3, mup
    assert slope(recipe) < -0.35, recipe  # ~ width^-1/2
    assert recipe[-1] / recipe[0] < 0.4, recipe
