"""Per-row LoRA deltas inside the decoder's projections (the adapters themselves are loaded and
stacked by adapters/row_lora.py): each adapter's A and scaled B stacked on the module they tune,
and each row of a batch taking its own adapter's delta, or none."""

from __future__ import annotations

import torch

A_BUF, B_BUF = "row_lora_a", "row_lora_b"  # (adapters, rank, in) and (adapters, out, rank), float32


def add_deltas(module, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """y (rows, T, out) = module(x) plus each row's adapter's delta (scale * B @ A @ x), where
    adapters tune `module`; ids (rows,): each row's adapter (-1: none). x @ A runs for every
    adapter (each adapter's weights read once, however many rows use it), masked to each row's
    own, then B sums them back: the cost grows with the adapters loaded, not with the rows."""
    a = getattr(module, A_BUF, None)
    if a is None:
        return y
    own = (ids[:, None] == torch.arange(a.shape[0], device=ids.device)).float()  # (rows, adapters)
    low = torch.einsum("bti,nri->btnr", x.float(), a) * own[:, None, :, None]
    return y + torch.einsum("btnr,nor->bto", low, getattr(module, B_BUF)).to(y.dtype)
