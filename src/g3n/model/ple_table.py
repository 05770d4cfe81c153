"""The per-layer embedding table (PLE) read from the GPU while it stays in CPU memory.

E2B's table is 4 GB of bfloat16 (E4B's 5.4 GB), more than a third of the model, and each token
needs only its own row of it (30-35 layers x 256 values). The table is page-locked in place
(cudaHostRegister, no copy) and a CUDA tensor is made over the same memory: with unified
addressing a GPU gather reads just the rows of the current tokens over the bus. No host gather,
no host sync, and it can run inside a CUDA graph (the engine's decode step). Where page-locking
fails the rows are gathered on the host instead, with a warning.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch


class _MappedTable:
    """A CPU tensor page-locked in place (cudaHostRegister) and a CUDA tensor over the same memory:
    with unified addressing a GPU kernel reads host memory through the host's own pointer, so a
    gather from `view` moves only the rows it reads, and can run inside a CUDA graph."""

    def __init__(self, table: torch.Tensor, device: torch.device):
        self.table, self.ptr = table, table.data_ptr()
        nbytes = table.numel() * table.element_size()
        err = int(torch.cuda.cudart().cudaHostRegister(self.ptr, nbytes, 0))
        if err != 0:
            # The runtime keeps the failure as its last error, which torch's check after the next
            # kernel launch would report: one launch here takes (and clears) it.
            with contextlib.suppress(Exception):
                torch.ones(1, device=device).add_(1)
            raise RuntimeError(f"cudaHostRegister failed (cudaError {err})")
        storage = torch._C._construct_storage_from_data_pointer(self.ptr, device, nbytes)
        self.view = torch.empty(0, dtype=table.dtype, device=device).set_(storage, 0, table.shape, table.stride())

    def __deepcopy__(self, memo):  # a copied model maps its own table when it first needs it
        return None

    def __del__(self):
        with contextlib.suppress(Exception):
            torch.cuda.cudart().cudaHostUnregister(self.ptr)


def device_view(body, device: torch.device):
    """A tensor on `device` that reads the per-layer table of `body` (a TextModel) where it lives:
    the table itself when it is there; for a table in CPU memory and a CUDA device, a view of that
    memory page-locked in place (made once per table and device; kept on the model); None where
    that fails (a warning says why) or is not possible."""
    table = body.embed_tokens_per_layer.weight
    if table.device == device:
        return table
    if device.type != "cuda" or table.device.type != "cpu" or not table.is_contiguous():
        return None
    held = getattr(body, "_mapped_ple", None)
    if held is not None and (held.table is not table or held.ptr != table.data_ptr()):
        held = None  # the table was replaced: map the new one
    if held is None:
        key = (table.data_ptr(), str(device))
        held = _MAPPED.get(key)  # another model on this device sharing this table mapped it
        if held is None or held.table is not table:
            try:
                held = _MappedTable(table, device)
            except Exception as e:  # noqa: BLE001 - any failure: gather on the host instead
                warnings.warn(
                    f"the per-layer table could not be mapped for the GPU, gathering its rows on the host: {e}"
                )
                held = _Unmapped(table)
            _MAPPED[key] = held
        body._mapped_ple = held
    return held.view


_MAPPED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # (data_ptr, device) -> mapping, while held


class _Unmapped:
    """A table that could not be mapped (not tried again)."""

    def __init__(self, table):
        self.table, self.ptr, self.view = table, table.data_ptr(), None

    def __deepcopy__(self, memo):
        return None
