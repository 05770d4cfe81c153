"""Top-k sampling as three small Triton kernels, for a decode step's 262,400 logits a row.

inference/sampling.py samples with torch.topk, then softmax, top-p, min-p and an inverse-CDF draw over the
k candidates: at batch 1 about 47 small kernels a token, torch.topk's radix select over the whole
vocabulary the largest, together as long as a decoder layer or more. Here three kernels:

1. each program takes the top K of one block of the vocabulary (Triton's bitonic `topk` over
   keys that pack a logit and its token id into one int64, so ties keep the lowest id);
2. the same over the candidates of stage 1, until at most FINAL remain;
3. one program per row takes their top K and does what generate.sample_tokens does after
   torch.topk: top-k below K, top-p, min-p, softmax and `draw`, in the same order.

`sample_top_k` takes one top_k, top_p and min_p for every row; `sample_top_k_rows` reads them per
row from tensors (a batch of requests with their own settings, whose values a CUDA graph's replays
may change), with K from a bound `k_cap` on the rows' top_k. Only stage 3 tells them apart.

The result is a draw from the same distribution as inference/sampling.py's path (the CPU tests compare
tokens for the same uniform numbers); only the order of float32 sums differs. `usable` and
`usable_rows` say when they can run: CUDA tensors (or the CPU under Triton's interpreter, for tests),
1 <= top_k (or k_cap) <= MAX_K; whether they do is the caller's choice (inference/sampling.py's
`kernels`, from the engine's DecodeOptions.sample_kernels).
"""

from __future__ import annotations

import contextlib

import torch

from g3n.kernels.common import pdl_options, runs_on

try:
    import triton
    import triton.language as tl

    from g3n.kernels.common import pdl_wait
except ImportError:  # no Triton: inference/sampling.py's PyTorch path samples
    triton = None

MAX_K = 128  # larger top_k: inference/sampling.py's torch.topk path
BLOCK = 2048  # vocabulary entries (then candidates) per program of stages 1 and 2
FINAL = 2048  # at most this many candidates go to the sampling program


def usable(logits: torch.Tensor, top_k: int) -> bool:
    """Whether `sample_top_k` serves these logits (batch, vocab) and this top_k."""
    return usable_rows(logits, top_k)


def usable_rows(logits: torch.Tensor, k_cap: int) -> bool:
    """Whether `sample_top_k_rows` serves these logits (batch, vocab) for rows' top_k up to k_cap
    (below the vocabulary: a top_k as large turns top-k off in inference/sampling.py)."""
    return (
        runs_on(logits)
        and logits.dim() == 2
        and logits.dtype == torch.float32
        and 1 <= k_cap <= MAX_K
        and k_cap < logits.shape[-1]
    )


if triton is not None:
    _LOWEST = tl.constexpr(-(2**63))  # the key of padding: below every packed logit

    @triton.jit
    def _pack(x, ids):
        # float32 logits and their ids -> int64 keys in the same order (larger logit first; at
        # equal logits, lower id first): the logit's bits made order-preserving as a signed int32
        # above, the id's complement below
        bits = x.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - ids.to(tl.int64))

    @triton.jit
    def _unpack(keys):
        ordered = (keys >> 32).to(tl.int32)
        bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
        return bits.to(tl.float32, bitcast=True), 0xFFFFFFFF - (keys & 0xFFFFFFFF)

    @triton.jit
    def _top_logits_kernel(logits_ptr, out_ptr, n, row_stride, BLOCK: tl.constexpr, K: tl.constexpr, PDL: tl.constexpr):
        pdl_wait(PDL)
        row, block = tl.program_id(0), tl.program_id(1)
        ids = block * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * row_stride + ids, mask=ids < n, other=0.0)
        keys = tl.where(ids < n, _pack(x, ids), _LOWEST)
        out = (row * tl.num_programs(1) + block) * K + tl.arange(0, K)
        tl.store(out_ptr + out, tl.topk(keys, K))

    @triton.jit
    def _top_keys_kernel(keys_ptr, out_ptr, n, BLOCK: tl.constexpr, K: tl.constexpr, PDL: tl.constexpr):
        pdl_wait(PDL)
        row, block = tl.program_id(0), tl.program_id(1)
        offs = block * BLOCK + tl.arange(0, BLOCK)
        keys = tl.load(keys_ptr + row * n + offs, mask=offs < n, other=_LOWEST)
        out = (row * tl.num_programs(1) + block) * K + tl.arange(0, K)
        tl.store(out_ptr + out, tl.topk(keys, K))

    @triton.jit
    def _softmax(x):
        e = tl.exp(x - tl.max(x, 0))
        return e / tl.sum(e, 0)

    @triton.jit
    def _sample_kernel(
        keys_ptr, n, uniform_ptr, out_ptr, top_k, top_p, min_p, BLOCK: tl.constexpr, K: tl.constexpr,
        PER_ROW: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        # PER_ROW: top_k, top_p and min_p point to one value a row (sample_top_k_rows), else they are
        # the values (sample_top_k: no tensors to fill for them in a batch-1 decode step)
        pdl_wait(PDL)
        row = tl.program_id(0)
        if PER_ROW:
            top_k, top_p, min_p = tl.load(top_k + row), tl.load(top_p + row), tl.load(min_p + row)
        offs = tl.arange(0, BLOCK)
        keys = tl.load(keys_ptr + row * n + offs, mask=offs < n, other=_LOWEST)
        values, ids = _unpack(tl.topk(keys, K))  # largest first
        pos = tl.arange(0, K)
        logits = tl.where(pos < top_k, values, float("-inf"))
        if top_p < 1.0:  # generate._top_p_min_p: drop where the tail from here holds <= 1 - top_p
            probs = _softmax(logits)
            tail = tl.sum(probs, 0) - tl.cumsum(probs, 0) + probs
            logits = tl.where((tail <= 1.0 - top_p) & (pos > 0), float("-inf"), logits)
        if min_p > 0.0:
            probs = _softmax(logits)
            logits = tl.where(probs < min_p * tl.max(probs, 0), float("-inf"), logits)
        probs = _softmax(logits)  # generate.draw: inverse CDF, never a token of probability 0
        cdf = tl.cumsum(probs, 0)
        total = tl.sum(probs, 0)
        picked = tl.sum((cdf <= tl.load(uniform_ptr + row) * total).to(tl.int32), 0)
        picked = tl.minimum(picked, tl.max(tl.where(probs > 0, pos, 0), 0))
        tl.store(out_ptr + row, tl.sum(tl.where(pos == picked, ids, 0), 0))


def sample_top_k(
    logits: torch.Tensor, top_k: int, top_p: float, min_p: float, uniform: torch.Tensor, pdl: bool = True
) -> torch.Tensor:
    """One token id per row (batch,) of `logits` (batch, vocab; float32, after temperature and
    repetition penalty), drawn at `uniform` (batch,) from the top-k, top-p, min-p distribution;
    `pdl`: the kernels launch with programmatic dependent launch."""
    return _sample(logits, top_k, (top_k, float(top_p), float(min_p)), uniform, pdl, per_row=False)


def sample_top_k_rows(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniform: torch.Tensor,
    k_cap: int,
    pdl: bool = True,
) -> torch.Tensor:
    """`sample_top_k` with each row's own settings, for a batch of requests in one CUDA graph:
    top_k (batch,) integers in [1, k_cap], top_p (batch,) in (0, 1], min_p (batch,) in [0, 1].
    The kernels read them on the device (no host sync, so replays may change them); `k_cap` fixes
    the candidates kept (K, a compile-time size), so it stays a Python int. Row r draws what
    sample_top_k(logits[r:r+1], top_k[r], ...) draws; with a larger K than that call's the
    float32 sums run over more zeros, in an order the GPU may group differently."""
    settings = (top_k.contiguous(), top_p.float().contiguous(), min_p.float().contiguous())
    return _sample(logits, k_cap, settings, uniform, pdl, per_row=True)


def _sample(logits, k_cap: int, settings: tuple, uniform: torch.Tensor, pdl: bool, per_row: bool) -> torch.Tensor:
    """Both entry points' launches: stages 1 and 2 depend only on K, so only the last kernel
    learns where its settings come from."""
    rows, n = logits.shape
    k = max(16, triton.next_power_of_2(k_cap))
    logits, uniform = logits.contiguous(), uniform.float().contiguous()
    pdl = pdl_options(logits.device, pdl)
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        blocks = triton.cdiv(n, BLOCK)
        keys = logits.new_empty((rows, blocks * k), dtype=torch.int64)
        _top_logits_kernel[(rows, blocks)](logits, keys, n, n, BLOCK=BLOCK, K=k, num_warps=8, **pdl)
        while keys.shape[1] > FINAL:
            blocks = triton.cdiv(keys.shape[1], BLOCK)
            fewer = logits.new_empty((rows, blocks * k), dtype=torch.int64)
            _top_keys_kernel[(rows, blocks)](keys, fewer, keys.shape[1], BLOCK=BLOCK, K=k, num_warps=8, **pdl)
            keys = fewer
        out = logits.new_empty(rows, dtype=torch.int64)
        _sample_kernel[(rows,)](
            keys, keys.shape[1], uniform, out, *settings,
            BLOCK=max(k, triton.next_power_of_2(keys.shape[1])), K=k, PER_ROW=per_row, num_warps=8, **pdl,
        )  # fmt: skip
    return out
