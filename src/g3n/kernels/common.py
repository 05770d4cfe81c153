"""What g3n's Triton kernels share: where they run (`runs_on`), programmatic dependent launch
(PDL), and rounding to bfloat16.

In a decode step's CUDA graph at batch 1 each kernel is a few microseconds, and the GPU idles
between one kernel's end and the next one's start. With PDL (Hopper and later) a kernel may be
launched while its predecessor still runs; it waits (`griddepcontrol.wait`) before touching
memory, so only the launch overlaps. Inductor's kernels do this (triton.enable_pdl, set by the
engine); a kernel of ours launched without it would break the chain. A kernel taking part calls `pdl_wait`
first thing (before its first load or store: every load after it sees the previous kernels'
writes) and is launched with `**pdl_options(device, pdl)`, where `pdl` is the caller's choice
(the engine's DecodeOptions.pdl), passed down through each kernel's Python wrapper; it is read at
launch, so a captured graph keeps the choice it was captured with.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (the tests)


def runs_on(t: torch.Tensor) -> bool:
    """Whether Triton kernels can run on t's device: CUDA, or the CPU under Triton's interpreter."""
    return triton is not None and (t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu"))


@functools.cache
def _supported(index: int) -> bool:
    """Compute capability 9 or later, and a Triton that launches with PDL."""
    if triton is None or INTERPRET:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and torch.cuda.get_device_capability(index)[0] >= 9


def pdl_options(device: torch.device, enabled: bool = True) -> dict:
    """Launch keywords for a kernel with a `PDL` constexpr that starts with `pdl_wait(PDL)`: PDL
    where `enabled` and the device and Triton support it, plain launches otherwise."""
    if enabled and device.type == "cuda" and _supported(device.index or torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


if triton is not None:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        # wait for the kernels before (their writes are visible after this), then let the next
        # kernel launch: it waits in turn before its own first access
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def round_bf16(x):
        # x rounded to the nearest bfloat16 (ties to even), kept in float32. By bits, because
        # Triton's CPU interpreter truncates in .to(tl.bfloat16) where GPUs round.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return ((bits >> 16) << 16).to(tl.float32, bitcast=True)
