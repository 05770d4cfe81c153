"""Fused projection weights (inference/fused_weights.py): one product for q/k/v/Laurel-left and one
for gate/up in the compiled decode step, as views, so nothing is copied and nothing goes stale."""

import copy

import torch
from torch import nn

from g3n.inference import fused_weights
from g3n.inference.fused_weights import GATE_UP, IN_PROJ


def _projections(layer, x):
    return [t for t in (*fused_weights.in_projections(layer, x), *fused_weights.gate_up(layer.mlp, x)) if t is not None]


def _module_outputs(layer, x):
    return [m(x) for m in (*fused_weights.in_proj_modules(layer), *fused_weights.gate_up_modules(layer.mlp))]


def test_fused_groups_are_views_of_the_same_weights(tiny):
    """Every layer's two groups fuse; the modules' weights become row blocks of the group's matrix
    (no second copy); the state_dict keeps its names and values; outputs equal the modules'."""
    model = copy.deepcopy(tiny[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fused_weights.fuse(model) == 2 * len(model.model.layers)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    x = torch.randn(2, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in model.model.layers:
        fused = getattr(layer, IN_PROJ)
        for m in fused_weights.in_proj_modules(layer):
            assert m.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        assert layer.mlp.gate_proj.weight.untyped_storage().data_ptr() == getattr(layer.mlp, GATE_UP).data_ptr()
        for got, want in zip(_projections(layer, x), _module_outputs(layer, x), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    first = getattr(model.model.layers[0], IN_PROJ)
    assert fused_weights.fuse(model) == 2 * len(model.model.layers)  # idempotent: same buffers
    assert getattr(model.model.layers[0], IN_PROJ) is first


def test_new_weights_are_fused_again_and_unfusable_groups_dropped(tiny):
    """A weight assigned after fusing (a load, a merge, MatFormer slicing) is picked up by the next
    `fuse` instead of the stale matrix; a group whose module is no longer a plain Linear (LoRA)
    is unfused and its projections come from the modules."""
    model = copy.deepcopy(tiny[0])
    fused_weights.fuse(model)
    layer = model.model.layers[3]
    q = layer.self_attn.q_proj
    q.weight = nn.Parameter(torch.randn_like(q.weight))
    wrapped = nn.Sequential(layer.mlp.up_proj)  # stands in for a LoRA-wrapped module
    layer.mlp.up_proj = wrapped
    fused_weights.fuse(model)
    assert getattr(layer.mlp, GATE_UP, None) is None
    x = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for got, want in zip(_projections(layer, x), _module_outputs(layer, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert fused_weights.in_proj_modules(layer)[0].weight.data_ptr() == getattr(layer, IN_PROJ).data_ptr()
