"""Projections that read the same input, run as one matrix product (the compiled decode step).

At batch 1 a decode step is bound by how many small matrix-vector products it launches (each costs
a few microseconds however small the matrix, docs/benchmarks.md). In every decoder layer q,
k, v and Laurel's left projection read the same input-normed stream, and gate and up the same
MLP input. `fuse(model)` concatenates each group's weights into one matrix, kept as a
non-persistent buffer of the layer, and makes the modules' weights views of it: no second copy,
and the modules, their parameters and the state_dict keep their shapes and values.

A group stays unfused when its modules are not plain nn.Linear without bias of one dtype and
device (LoRA-wrapped, 4-bit). `fuse` runs before every decode through the fused layers
(engine.Generator, unless its DecodeOptions.fuse_weights is off) and first checks that the
modules' weights are still views of the group's matrix: moving the model or assigning new weights
breaks that, and the group is then built again (or dropped), so decoding never reads a stale copy.
`in_projections` and `gate_up` take the engine's choices: `fused` (an engine with fuse_weights off
runs one product per module even where another engine fused the weights) and the batch-1 kernel's
(`kernel`, `pdl`: kernels/gemv.py).
"""

from __future__ import annotations

import torch
from torch import nn

from g3n.kernels.gemv import product, project

IN_PROJ = "fused_in_proj"  # DecoderLayer: q, k, v (layers with K/V of their own), Laurel's left
GATE_UP = "fused_gate_up"  # MLP: gate, up


def in_proj_modules(layer) -> list[nn.Module]:
    attn = layer.self_attn
    kv = [] if attn.kv_shared else [attn.k_proj, attn.v_proj]
    return [attn.q_proj, *kv, layer.laurel.linear_left]


def gate_up_modules(mlp) -> list[nn.Module]:
    return [mlp.gate_proj, mlp.up_proj]


def _views_of(weight: torch.Tensor, modules: list[nn.Module]) -> bool:
    """Whether the modules' weights are, in order, the row blocks of `weight`."""
    offset = 0
    for m in modules:
        w = m.weight
        if w.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr() or w.shape[1:] != weight.shape[1:]:
            return False
        if w.storage_offset() != weight.storage_offset() + offset * weight.stride(0):
            return False
        offset += w.shape[0]
    return offset == weight.shape[0]


def _fusable(modules: list[nn.Module]) -> bool:
    if not all(type(m) is nn.Linear and m.bias is None for m in modules):
        return False
    return len({(m.weight.dtype, m.weight.device, m.weight.shape[1]) for m in modules}) == 1


@torch.no_grad()
def _fuse_group(owner: nn.Module, name: str, modules: list[nn.Module]) -> bool:
    current = getattr(owner, name, None)
    if not _fusable(modules):
        if current is not None:
            delattr(owner, name)
        return False
    if current is not None and _views_of(current, modules):
        return True
    with torch.inference_mode(False):  # a normal tensor, trainable later, even if fused under inference mode
        weight = torch.cat([m.weight for m in modules])  # one group at a time: a small transient
    for m, block in zip(modules, weight.split([m.weight.shape[0] for m in modules]), strict=True):
        m.weight.data = block
    owner.register_buffer(name, weight, persistent=False)
    return True


def fuse(model) -> int:
    """Fuse every layer's groups that can be (idempotent); returns how many groups are fused."""
    count = 0
    for layer in model.model.layers:
        count += _fuse_group(layer, IN_PROJ, in_proj_modules(layer))
        count += _fuse_group(layer.mlp, GATE_UP, gate_up_modules(layer.mlp))
    return count


def in_projections(layer, x: torch.Tensor, fused: bool = True, kernel: bool = True, pdl: bool = True):
    """(q, k, v, Laurel's left) of the input-normed stream `x`; k and v are None on KV-shared layers."""
    weight = getattr(layer, IN_PROJ, None) if fused else None  # as `fuse` last left it (None: unfused)
    modules = in_proj_modules(layer)
    if weight is None:
        outs = [project(m, x) for m in modules]
    else:
        outs = list(product(x, weight, kernel, pdl).split([m.weight.shape[0] for m in modules], dim=-1))
    if layer.self_attn.kv_shared:
        return outs[0], None, None, outs[1]
    return tuple(outs)


def gate_up(mlp, x: torch.Tensor, fused: bool = True, kernel: bool = True, pdl: bool = True):
    """(gate, up) projections of the MLP input `x` (the choices as in_projections')."""
    weight = getattr(mlp, GATE_UP, None) if fused else None
    if weight is None:
        return project(mlp.gate_proj, x), project(mlp.up_proj, x)
    return product(x, weight, kernel, pdl).split(mlp.gate_proj.weight.shape[0], dim=-1)
