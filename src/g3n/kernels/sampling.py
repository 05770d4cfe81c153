"""Top-k sampling as three small Triton kernels, for a decode step's 262,400 logits a row.

inference/sampling.py samples with torch.topk, then softmax, top-p, min-p and an inverse-CDF draw over the
k candidates: at batch 1 about 47 small kernels a token, torch.topk's radix select over the whole
vocabulary the largest, together as long as a decoder layer or more. Here three kernels:

1. each program takes the top K of one block of the vocabulary (Triton's bitonic `topk` over
   keys that pack a logit and its token id into one int64, so ties keep the lowest id);
2. the same over the candidates of stage 1, until at most FINAL remain;
3. one program per row takes their top K and does what generate.sample_tokens does after
   torch.topk: top-k below K, top-p, min-p, softmax and `draw`, in the same order.

The result is a draw from the same distribution as inference/sampling.py's path (the CPU test compares
tokens for the same uniform numbers); only the order of float32 sums differs. `usable` says when
it can run: CUDA tensors (or the CPU under Triton's interpreter, for tests), 1 <= top_k <= MAX_K;
whether it does is the caller's choice (inference/sampling.py's `kernels`, from the engine's
DecodeOptions.sample_kernels).
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
    return (
        runs_on(logits)
        and logits.dim() == 2
        and logits.dtype == torch.float32
        and 1 <= top_k <= MAX_K
        and top_k < logits.shape[-1]
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
        PDL: tl.constexpr,
    ):  # fmt: skip
        pdl_wait(PDL)
        row = tl.program_id(0)
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
    rows, n = logits.shape
    k = max(16, triton.next_power_of_2(top_k))
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
            keys, keys.shape[1], uniform, out, top_k, float(top_p), float(min_p),
            BLOCK=max(k, triton.next_power_of_2(keys.shape[1])), K=k, num_warps=8, **pdl,
        )  # fmt: skip
    return out
