"""The MLP of a LoRA-adapted decoder layer as one autograd Function whose backward pass reuses its
buffers (as Unsloth's fused LoRA MLP does).

Autograd (also compiled: inductor's partition of the layer's second half) keeps the gate, the up
projection and their product for the backward pass, and then makes the product's, the gate's and
the up projection's gradients as new tensors: eight tensors of (tokens x MLP width) alive at once
at E4B 1 x 2048 (64 MiB each in bfloat16), the peak of the whole training step (bench/train_gpu.py
--memory). Here only the gate and up are kept; the backward pass recomputes the product, uses it
for the down adapter's gradient and frees it before the product's gradient exists, computes the up
gradient where the product was and the gate gradient over the product's gradient: four such
tensors at a time (five on the sparse layers, which recompute their Gaussian top-k).

Used for the bfloat16 and float32 inputs of an MLP whose three projections are plain PEFT LoRA
Linears with one active adapter and no dropout, when gradients are on; anything else (float16,
4-bit base weights, dropout, full fine-tuning, inference) keeps the model's own MLP forward.

Opt-in (`fused_lora_mlp: true`): it runs eagerly between the compiled halves of a layer (a graph
break: a traced graph would not keep the in-place reuse), which costs tokens/s, more on long rows
cut into tiles, for a smaller memory peak (docs/benchmarks.md has the measurements).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from g3n.adapters.lora import is_variant

_GELU = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}  # hidden_activation -> F.gelu's `approximate`


def use_fused_mlp(model) -> None:
    """Give every decoder MLP of `model` whose projections carry LoRA adapters the fused forward
    (the training config's `fused_lora_mlp`; off by default, see the module's docstring)."""
    from peft.tuners.lora.layer import Linear

    from g3n.model.text import MLP

    for mlp in model.modules():
        projections = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        if isinstance(mlp, MLP) and mlp.activation in _GELU and all(type(p) is Linear for p in projections):
            mlp.forward = types.MethodType(_forward, mlp)


def _adapter(linear):
    """(base weight, A, B, scaling) of a PEFT Linear's one active adapter, or None when the fused
    path does not apply (several adapters, dropout, merged, disabled, a trainable base weight)."""
    names = linear.active_adapters
    if len(names) != 1 or linear.merged or linear.disable_adapters or linear.base_layer.weight.requires_grad:
        return None
    name = names[0]
    if name not in linear.lora_A or not isinstance(linear.lora_dropout[name], torch.nn.Identity):
        return None
    if is_variant(linear, name):
        return None
    return linear.base_layer.weight, linear.lora_A[name].weight, linear.lora_B[name].weight, linear.scaling[name]


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.dtype in (torch.bfloat16, torch.float32):
        parts = [_adapter(p) for p in (self.gate_proj, self.up_proj, self.down_proj)]
        if None not in parts:
            return _fused(self, x, parts)
    return type(self).forward(self, x)


@torch.compiler.disable  # its backward reuses buffers in place, which a traced graph would not keep
def _fused(mlp, x, parts):
    weights = [t for base, a, b, _ in parts for t in (base, a, b)]
    return _LoraMLP.apply(mlp, [s for *_, s in parts], x, *weights)


def _lora_linear(x, base, a, b, scale):
    """x @ base.T + scale * (x @ a.T) @ b.T, and x @ a.T (kept for b's gradient)."""
    xa = x @ a.t()
    return (x @ base.t()).addmm_(xa, b.t(), alpha=scale), xa


class _LoraMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp, scales, x, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b):
        ctx.mlp, ctx.scales, ctx.shape = mlp, scales, x.shape
        ctx.dtypes = [t.dtype for t in (gate_a, gate_b, up_a, up_b, down_a, down_b)]  # the gradients'
        dtype = x.dtype
        gate_a, gate_b, up_a, up_b, down_a, down_b = (t.to(dtype) for t in (gate_a, gate_b, up_a, up_b, down_a, down_b))
        x2 = x.reshape(-1, x.shape[-1])
        gate, x_gate = _lora_linear(x2, gate_w, gate_a, gate_b, scales[0])
        up, x_up = _lora_linear(x2, up_w, up_a, up_b, scales[1])
        h = _act(mlp, mlp.sparsify(gate)).mul_(up)
        out, h_down = _lora_linear(h, down_w, down_a, down_b, scales[2])
        ctx.save_for_backward(x2, gate, up, x_gate, x_up, h_down, gate_w, up_w, down_w,
                              gate_a, gate_b, up_a, up_b, down_a, down_b)  # fmt: skip
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x2, gate, up, x_gate, x_up, h_down, gate_w, up_w, down_w, gate_a, gate_b, up_a, up_b, down_a, down_b = (
            ctx.saved_tensors
        )
        mlp, (s_gate, s_up, s_down) = ctx.mlp, ctx.scales
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        # the down projection's adapter: its B needs h @ A.T (kept), its A the product h (recomputed)
        d_down_b = (dy.t() @ h_down).mul_(s_down)
        dy_b = dy @ down_b  # (tokens, r)
        sparse = mlp.sparsify(gate)
        h = _act(mlp, sparse).mul_(up)
        d_down_a = (dy_b.t() @ h).mul_(s_down)
        del h
        dh = (dy @ down_w).addmm_(dy_b, down_a, alpha=s_down)
        d_up = _act(mlp, sparse).mul_(dh)  # where h was
        dh.mul_(up)
        d_gate = torch.ops.aten.gelu_backward.grad_input(dh, sparse, approximate=_GELU[mlp.activation], grad_input=dh)
        if mlp.std_multiplier is not None:
            d_gate = _sparsify_backward(mlp, gate, sparse, d_gate)
        del sparse, dh
        # the gate and up projections: their adapters and the input's gradient
        dg_b, du_b = d_gate @ gate_b, d_up @ up_b  # (tokens, r)
        dx = (d_gate @ gate_w).addmm_(dg_b, gate_a, alpha=s_gate).add_(d_up @ up_w).addmm_(du_b, up_a, alpha=s_up)
        grads = ((dg_b.t() @ x2).mul_(s_gate), (d_gate.t() @ x_gate).mul_(s_gate), (du_b.t() @ x2).mul_(s_up),
                 (d_up.t() @ x_up).mul_(s_up), d_down_a, d_down_b)  # fmt: skip
        ga, gb, ua, ub, da, db = (g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True))
        return None, None, dx.view(ctx.shape), None, ga, gb, None, ua, ub, None, da, db


def _act(mlp, gate):
    return F.gelu(gate, approximate=_GELU[mlp.activation])


def _sparsify_backward(mlp, gate, sparse, grad):
    """The gradient through MLP.sparsify (relu(g - mean - k * std), biased std), in place in `grad`:
    dz = grad where the output is positive; dg = dz - S/N - k * S * (g - mean) / (N * std), S = sum dz
    (per token: autograd's formula, from the statistics as the forward pass rounded them)."""
    grad.masked_fill_(sparse <= 0, 0)
    n = gate.shape[-1]
    std, mean = (t.float() for t in torch.std_mean(gate, -1, keepdim=True, unbiased=False))
    total = grad.sum(-1, keepdim=True, dtype=torch.float32)
    k = float(mlp.multiplier(gate))
    beta = k * total / (n * std)
    alpha = total / n - beta * mean
    return grad.addcmul_(gate, (-beta).to(grad.dtype)).sub_(alpha.to(grad.dtype))
