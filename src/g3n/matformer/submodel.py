"""A MatFormer sub-model in memory, sharing its parent's weights (what slice search evaluates)."""

from __future__ import annotations

import torch

from g3n.matformer.plan import Plan, sub_config, tensor_source, validate_plan
from g3n.model.text import Gemma3nForCausalLM, RotaryEmbedding


def sub_model(model, plan: Plan):
    """The sub-model of an in-memory parent, sharing its weights (slices are views where possible)."""
    parent = model.config
    validate_plan(plan, parent)
    child_cfg = sub_config(parent, plan)
    params = dict(model.named_parameters())
    with torch.device("meta"):
        child = Gemma3nForCausalLM(child_cfg)
    state = {}
    for name in dict(child.named_parameters()):
        src = tensor_source(name.removeprefix("model."), parent, plan)
        full = params["model." + src.name]
        parts = [full[piece] for piece in src.pieces]
        state[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=src.dim)
    child.load_state_dict(state, assign=True, strict=True)
    child.model.rotary_emb = RotaryEmbedding(child_cfg).to(model.device)
    return child.eval()
