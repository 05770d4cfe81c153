"""How g3n's engine decodes: one options object, passed explicitly from the CLI or the Python API down
to the engine (`Generator`) and the kernels it launches, so two engines in one process can decode
differently and nothing is read from the environment.

The switches default to on, compiling included (`compile="layers"`: its one-off cost is paid once
per machine, inference/compile_cache.py); each exists to turn one part off, to compare against it
(bench/generate_gpu.py's variants) or to step around it where it fails. The defaults live here
only, `DecodeOptions()`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum

from g3n.errors import G3nError


class CompileMode(str, Enum):
    """What torch.compile compiles before the decode step is captured as a CUDA graph (the CLI's
    --compile takes the same words)."""

    OFF = "off"  # the model's own layers, uncompiled, in the graph
    LAYERS = "layers"  # each kind of decoder layer compiled once, the step's inputs and logits once each
    STEP = "step"  # the whole decode step as one graph (the longest compile)

    def __str__(self) -> str:
        return self.value


def compile_mode(value) -> CompileMode:
    """`value` ("off", "layers", "step" or a CompileMode) as a CompileMode; anything else is refused
    with an error naming the valid words."""
    if isinstance(value, CompileMode):
        return value
    if isinstance(value, str):
        try:
            return CompileMode(value)
        except ValueError:
            pass
    *first, last = (repr(m.value) for m in CompileMode)
    raise G3nError(f"compile must be {', '.join(first)} or {last}, not {value!r}")


@dataclass(frozen=True)
class DecodeOptions:
    """The decode path's switches; `DecodeOptions()` is what g3n runs unless told otherwise.

    compile: see CompileMode. Compiling costs seconds to minutes once per number of rows and cache
        length on a machine (later processes load it from the disk cache in seconds); on a CPU
        nothing is captured or compiled, and 4-bit weights are not compiled.
    fuse_weights: in a compiled step, projections that read one input (q/k/v/Laurel's left,
        gate/up) run as one product over concatenated weights (inference/fused_weights.py). Off:
        one product per projection.
    decode_kernels: in a compiled bfloat16 step, g3n's Triton kernels run AltUp's chains of tiny
        reductions and attention (flash decoding; kernels/decode.py). Off: the PyTorch code,
        fused by inductor. An engine whose compile fails with them retries without them.
    gemv: batch-1 bfloat16 products run as g3n's matrix-vector kernel (kernels/gemv.py). Off:
        cuBLAS.
    sample_kernels: top-k sampling (top_k <= 128) runs as g3n's Triton kernels
        (kernels/sampling.py). Off: torch.topk and PyTorch's sampling ops.
    pdl: g3n's Triton kernels launch with programmatic dependent launch (Hopper and later: a kernel
        launches while the one before it finishes; kernels/common.py). Off: plain launches.
    """

    compile: CompileMode = CompileMode.LAYERS
    fuse_weights: bool = True
    decode_kernels: bool = True
    gemv: bool = True
    sample_kernels: bool = True
    pdl: bool = True

    def __post_init__(self):
        object.__setattr__(self, "compile", compile_mode(self.compile))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "compile" and not isinstance(value, bool):
                raise G3nError(f"{f.name} must be True or False, not {value!r}")
