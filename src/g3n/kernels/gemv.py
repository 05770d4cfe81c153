"""Matrix-vector products of a decode step (1-8 rows against a bf16/fp16 weight) as a Triton kernel.

At batch 1 a decode step is 11 such products a layer (q/k/v/o, gate/up/down, Laurel, the per-layer
input). cuBLAS runs them as GEMM kernels: in an E2B step on an H200 they read 3.7 GB in 2.0 ms
(1.8 TB/s, under half the bandwidth), most of the step's GPU time. Here each program reads
`BLOCK_N` weight rows in `BLOCK_K` slices and keeps the float32 dot products with every input row
(the input is tiny and stays in cache), so the weight streams through once; the tile sizes are
tuned per shape at the first call (Triton's autotuner, outside any CUDA graph capture: the
engine warms up first).

`gemv(x, w)` is a torch custom op (`torch.library.triton_op`), so torch.compile traces it into
compiled decode steps and CUDA graphs capture it. Only used where `usable` says so: CUDA, no
gradient, at most `MAX_ROWS` rows; everything else (CPU, training, prefill) stays F.linear.
G3N_GEMV=0 turns it off.
"""

from __future__ import annotations

import os

import torch

MAX_WEIGHT = 2048 * 2048  # larger matrices (the MLP's, E4B's 2048 x 16384) stream as fast or faster in cuBLAS
ENABLED = os.environ.get("G3N_GEMV", "1") != "0"

try:  # Triton comes with CUDA builds of PyTorch; torch.library.triton_op since torch 2.6
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs: F.linear everywhere
    triton = None


def _configs():
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n in (4, 8, 16, 32)
        for k in (256, 512, 1024)
        for w in (4, 8)
        for s in (2, 4)
    ]


def _prune(configs, named_args, **kwargs):
    """Drop tiles whose float32 products would not fit in registers (rows x BLOCK_N x BLOCK_K
    values over the program's threads), and tiles wider than the matrix."""
    rows, n, k = named_args["M"], named_args["N"], named_args["K"]
    block_m = max(1, 1 << (rows - 1).bit_length())
    kept = [
        c
        for c in configs
        if block_m * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps
        and c.kwargs["BLOCK_K"] <= max(256, k)
        and c.kwargs["BLOCK_N"] <= max(4, n)
    ]
    return kept or configs[:1]


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, y_ptr, M, N, K,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):  # fmt: skip
        """y[m, n] = sum_k x[m, k] * w[n, k] for BLOCK_N outputs n and all M (<= BLOCK_M) rows."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        n_ok, m_ok = rn < N, rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            w_at, x_at = w_ptr + rn[:, None] * K + rk[None, :], x_ptr + rm[:, None] * K + rk[None, :]
            if EVEN_K:  # no mask along K: the loads stay vectorised
                w = tl.load(w_at, mask=n_ok[:, None], other=0.0)
                x = tl.load(x_at, mask=m_ok[:, None], other=0.0)
            else:
                k_ok = rk < K
                w = tl.load(w_at, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(x_at, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        out = y_ptr + rm[:, None] * N + rn[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    _tuned_kernel = triton.autotune(configs=_configs(), key=["M", "N", "K"], prune_configs_by={"early_config_prune": _prune})(
        _gemv_kernel
    )


def launch(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, kernel=None, **config) -> None:
    """Run the kernel on contiguous x (M, K), w (N, K) into y (M, N): tuned, or with `config`
    (BLOCK_N, BLOCK_K) given (the tests, under Triton's CPU interpreter)."""
    (rows, k), n = x.shape, w.shape[0]
    block_m = max(1, 1 << (rows - 1).bit_length())
    if config:
        grid = (triton.cdiv(n, config["BLOCK_N"]),)
        (kernel or _gemv_kernel)[grid](x, w, y, rows, n, k, BLOCK_M=block_m, EVEN_K=k % config["BLOCK_K"] == 0, **config)
        return

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    # EVEN_K from the largest tile: every tuned BLOCK_K divides K when 1024 does
    (kernel or _tuned_kernel)[grid](x, w, y, rows, n, k, BLOCK_M=block_m, EVEN_K=k % 1024 == 0)


if triton is not None and hasattr(torch.library, "triton_op"):

    @triton_op("g3n::gemv", mutates_args={})
    def _gemv_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = torch.empty((x.shape[0], w.shape[0]), device=x.device, dtype=x.dtype)
        launch(x, w, y, kernel=wrap_triton(_tuned_kernel))
        return y

else:
    _gemv_op = None


def usable(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """Whether F.linear(x, weight, bias) goes through the kernel: a decode step's product."""
    return (
        ENABLED
        and _gemv_op is not None
        and bias is None
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.is_contiguous()
        and x.numel() == x.shape[-1]
        and weight.numel() <= MAX_WEIGHT
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for the few rows of a decode step (check `usable` first)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return _gemv_op(rows, weight).reshape(*x.shape[:-1], weight.shape[0])
