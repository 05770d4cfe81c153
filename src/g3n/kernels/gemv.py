"""Matrix-vector products for batch-1 decoding: y = x @ W.T with one token row, as a Triton kernel.

At batch 1 a decode step's products are matrix-vector products bound by reading the weights.
cuBLAS picks tiles made for matrices (64 output rows a program), so a 2048 x 2048 projection runs
as a few dozen programs on a GPU with over a hundred SMs, leaving most of the bandwidth unused.
Here each program takes BLOCK_N rows (hundreds of programs), so every SM streams weights; the
first weight tile is loaded before the programmatic-dependent-launch wait, while the previous
kernel finishes. Sums run in float32 and round once to bfloat16, as cuBLAS's do.

`model/text.py` and the engine send every batch-1 bfloat16 product on CUDA here (`project`,
`product`), compiled or not. Whether the kernel runs (and launches with PDL) is the choice of
whoever runs the model: `product` takes it as arguments, and `project`, called inside the model's
forward, reads the choice an engine leaves on the model's nn.Linear modules for the duration of
its calls (`routed`), so two engines over one model each keep their own; outside any, the kernel
with PDL.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from g3n.kernels.common import pdl_options, runs_on

try:
    import triton
    import triton.language as tl

    from g3n.kernels.common import pdl_wait, round_bf16
except ImportError:
    triton = None

ROUTE = "_g3n_gemv"  # on a plain nn.Linear while an engine runs its model (`routed`): (kernel, pdl)
_DEFAULT_ROUTE = (True, True)


def usable(x: Tensor, w: Tensor) -> bool:
    """One row of bfloat16 x against a contiguous bfloat16 weight, on CUDA (or the CPU under
    Triton's interpreter), with no gradient to track."""
    return (
        runs_on(x)
        and x.dtype == w.dtype == torch.bfloat16
        and x.numel() == x.shape[-1] == w.shape[1]
        and w.shape[1] % config(*w.shape)[1] == 0
        and w.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        inside = rows[:, None] < N
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0.0)  # weights: never written
        pdl_wait(PDL)  # only now read x, which the kernel before writes
        acc = w.to(tl.float32) * tl.load(x_ptr + cols).to(tl.float32)[None, :]
        for k in tl.static_range(BLOCK_K, K, BLOCK_K):
            w = tl.load(w_ptr + rows[:, None] * K + (k + cols)[None, :], mask=inside, other=0.0)
            acc += w.to(tl.float32) * tl.load(x_ptr + k + cols).to(tl.float32)[None, :]
        tl.store(out_ptr + rows, round_bf16(tl.sum(acc, 1)).to(tl.bfloat16), mask=rows < N)


def config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an n x k weight: the fastest of 12 per shape of E2B/E4B
    on an H200 (bench/generate_gpu.py's gemv task), as a rule: a few rows per program, so that
    even 2048 rows make hundreds of programs."""
    block_n = 4 if n <= 4096 else 8 if n <= 16384 else 16
    return block_n, min(k, 1024), 8 if k <= 2048 else 4


def gemv(
    x: Tensor, w: Tensor, block_n: int | None = None, block_k: int | None = None, warps: int | None = None,
    pdl: bool = True,
):  # fmt: skip
    """x (..., K) with one row, w (N, K): x @ w.T as (..., N); the configuration by default `config`'s;
    `pdl`: launched with programmatic dependent launch where the GPU has it."""
    n, k = w.shape
    bn, bk, nw = config(n, k)
    bn, bk, nw = block_n or bn, block_k or bk, warps or nw
    out = x.new_empty((*x.shape[:-1], n))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _gemv_kernel[(triton.cdiv(n, bn),)](
            x.contiguous(), w, out, n, K=k, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, **pdl_options(x.device, pdl)
        )
    return out


# A custom op: torch.compile keeps it as a call (as it keeps cuBLAS's) instead of tracing Triton.
@torch.library.custom_op("g3n::gemv", mutates_args=())
def _gemv_op(x: Tensor, w: Tensor, pdl: bool) -> Tensor:
    return gemv(x, w, pdl=pdl)


@_gemv_op.register_fake
def _(x, w, pdl):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def product(x: Tensor, w: Tensor, kernel: bool = True, pdl: bool = True) -> Tensor:
    """F.linear(x, w) without bias: the kernel for one token row (unless `kernel` is False), cuBLAS
    otherwise; `pdl`: the kernel launches with programmatic dependent launch."""
    return _gemv_op(x, w, pdl) if kernel and usable(x, w) else F.linear(x, w)


def project(module: nn.Module, x: Tensor) -> Tensor:
    """module(x), through `product` for a plain bias-free nn.Linear (not LoRA-wrapped, not 4-bit),
    with the choice of the engine running the model (`routed`)."""
    if type(module) is nn.Linear and module.bias is None:
        kernel, pdl = getattr(module, ROUTE, _DEFAULT_ROUTE)
        return product(x, module.weight, kernel, pdl)
    return module(x)


@contextlib.contextmanager
def routed(model: nn.Module, kernel: bool = True, pdl: bool = True):
    """While inside, `project` runs `model`'s plain nn.Linear modules with this choice (the kernel
    or cuBLAS; PDL or not). An engine enters it around each of its calls into the model, so the
    choice stays its own: another engine over the same model enters its own, and compiled code,
    which reads the choice as a module attribute, is guarded on it. A no-op for the default
    choice, unless an enclosing call chose otherwise."""
    route = (kernel, pdl)
    outer = model.__dict__.get(ROUTE, _DEFAULT_ROUTE)
    if route == outer:
        yield
        return
    modules = [model, *(m for m in model.modules() if type(m) is nn.Linear)]
    before = [m.__dict__.get(ROUTE) for m in modules]
    for m in modules:
        m.__dict__[ROUTE] = route
    try:
        yield
    finally:
        for m, value in zip(modules, before, strict=True):
            if value is None:
                m.__dict__.pop(ROUTE, None)
            else:
                m.__dict__[ROUTE] = value
