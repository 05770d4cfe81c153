"""Several LoRA adapters served at once, each row of a batch with its own or none.

Every adapter's A and B matrices are stacked per module they tune and kept on that module as
non-persistent buffers (the checkpoint, the state_dict and fused weights stay as they were); a
step takes each row's adapter index (`LayerOps.adapter_ids`, -1: none) and adds that adapter's
delta to the row's projection (model/row_deltas.py). Rows with different adapters share one
decode step: no merge, no reload.
"""

from __future__ import annotations

from pathlib import Path

import torch

from g3n.errors import G3nError
from g3n.model.row_deltas import A_BUF, B_BUF


class RowAdapters:
    """The adapters stacked on one model's decoder, by name (`add` returns an adapter's index)."""

    def __init__(self, model):
        from g3n.model.quant import is_4bit

        if is_4bit(model):
            raise G3nError("per-row adapters need 16- or 32-bit weights (this model is 4-bit)")
        self.model = model
        self.names: list[str] = []
        self._pairs: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []  # module -> (A, scale * B)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise G3nError(f"no adapter named {name!r} (loaded: {', '.join(self.names) or 'none'})")
        return self.names.index(name)

    def add(self, name: str, adapter_dir: str | Path) -> int:
        """Load a PEFT LoRA adapter of the decoder (the rules of every merge: adapters/merge.py)."""
        from g3n.adapters.merge import AdapterDeltas

        if name in self.names:
            raise G3nError(f"an adapter named {name!r} is loaded already")
        deltas = AdapterDeltas(adapter_dir)
        deltas.check({n: tuple(p.shape) for n, p in self.model.named_parameters()}, "this model")
        pairs = {key.removesuffix(".weight"): (pair["A"].float(), pair["B"].float() * deltas.scale)
                 for key, pair in deltas.pairs.items()}  # fmt: skip
        self.names.append(name)
        self._pairs.append(pairs)
        self._stack()
        return len(self.names) - 1

    def _stack(self) -> None:
        modules = dict(self.model.named_modules())
        n = len(self._pairs)
        for key in set().union(*self._pairs):
            module = modules[key]
            out_features, in_features = module.weight.shape
            rank = max(p[key][0].shape[0] for p in self._pairs if key in p)
            a, b = torch.zeros(n, rank, in_features), torch.zeros(n, out_features, rank)
            for i, pairs in enumerate(self._pairs):
                if key in pairs:
                    low, high = pairs[key]
                    a[i, : low.shape[0]], b[i, :, : low.shape[0]] = low, high
            module.register_buffer(A_BUF, a.to(module.weight.device), persistent=False)
            module.register_buffer(B_BUF, b.to(module.weight.device), persistent=False)
