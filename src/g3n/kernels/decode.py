"""Hand-written Triton kernels for the compiled decode step: AltUp's chains of tiny reductions and
attention over the cache (flash decoding).

At batch 1 a compiled decode layer is ~20 kernels of a few microseconds each, and AltUp's are
chains of reductions over one hidden vector that inductor cannot put in one kernel (each
reduction waits for the last): router norm -> router (4 outputs) -> tanh -> 16 coefficients ->
the 4 mixed streams -> the input norm before attention (5 kernels), and after the MLP its norm
and residual -> router norm -> router -> coefficients -> correction (4 kernels), then the
per-layer input's norm and residual (2). Here each chain is one program per token row, which
holds the row's 4 streams in registers: 3 kernels instead of 11. Attention (`attend`) scores
each split of the cache in its own program and combines the splits in a second kernel, so a long
cache is read by many programs at once, where inductor's reductions run over all keys at once.

The arithmetic rounds to bfloat16 where the PyTorch code does (model/text.py: AltUp, RMSNorm,
DecoderLayer.end; engine._attend), so the kernels are as close to float32 as eager bfloat16 is;
only the order of the float32 sums differs. The engine's compiled decode layers use them (unless
its DecodeOptions.decode_kernels is off) for bfloat16 CUDA tensors with Triton installed
(`usable`); otherwise the PyTorch code runs. They are custom ops, so torch.compile keeps them as
calls and Triton compiles them itself; on Hopper and later they launch while the kernel before
them finishes (programmatic dependent launch, kernels/common.py; each wrapper's `pdl`). Tests run
them on the CPU through Triton's interpreter.
"""

import contextlib

import torch
from torch import Tensor

from g3n.kernels.common import INTERPRET, pdl_options, runs_on

try:
    import triton
    import triton.language as tl

    from g3n.kernels.common import pdl_wait
    from g3n.kernels.common import round_bf16 as _bf16
except ImportError:  # no Triton (CPU-only installs): the PyTorch code runs
    triton = None


def usable(x: torch.Tensor, cfg) -> bool:
    """Whether the kernels can run on x: bfloat16 (their rounding), on CUDA (or the CPU under
    Triton's interpreter), a power-of-two number of streams."""
    n = cfg.altup_num_inputs
    return x.dtype == torch.bfloat16 and runs_on(x) and n & (n - 1) == 0


if triton is not None:

    @triton.jit
    def _rms_norm(x, w, H: tl.constexpr, eps):
        # RMSNorm in float32 with weight w, rounded to bfloat16
        return _bf16(x * (1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)) * w)

    @triton.jit
    def _tanh(x):
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _modalities(x, rn_w_ptr, router_ptr, offs, m, kk, H: tl.constexpr, eps):
        # AltUp._modalities: tanh(router(router_norm(x) / H)), (N,) rounded as bfloat16
        normed = _rms_norm(x, tl.load(rn_w_ptr + offs, mask=m, other=0.0).to(tl.float32), H, eps)
        t = _bf16(normed * _bf16(tl.full([], 1.0 / H, tl.float32)))
        w = tl.load(router_ptr + kk[:, None] * H + offs[None, :], mask=m[None, :], other=0.0).to(tl.float32)
        return _bf16(_tanh(_bf16(tl.sum(w * t[None, :], 1))))

    @triton.jit
    def _pick(vec, idx, k):
        return tl.sum(tl.where(idx == k, vec, 0.0), 0)

    @triton.jit
    def _predict_kernel(
        x_ptr, rn_w_ptr, router_ptr, coef_ptr, in_w_ptr, pred_ptr, normed_ptr, stream_stride, eps,
        H: tl.constexpr, BLOCK: tl.constexpr, N: tl.constexpr, ACTIVE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        pdl_wait(PDL)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < H
        kk = tl.arange(0, N)
        oo = tl.arange(0, N * N)
        base = row * H + offs
        xa = tl.load(x_ptr + ACTIVE * stream_stride + base, mask=m, other=0.0).to(tl.float32)
        modal = _modalities(xa, rn_w_ptr, router_ptr, offs, m, kk, H, eps)
        p = tl.load(coef_ptr + oo[:, None] * N + kk[None, :]).to(tl.float32)  # (N*N, N)
        coefs = _bf16(tl.sum(p * modal[None, :], 1))  # coefs[j * N + i]: stream i's weight in prediction j
        for j in tl.static_range(N):
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for i in tl.static_range(N):
                xi = tl.load(x_ptr + i * stream_stride + base, mask=m, other=0.0).to(tl.float32)
                acc += xi * _pick(coefs, oo, j * N + i)
            xj = tl.load(x_ptr + j * stream_stride + base, mask=m, other=0.0).to(tl.float32)
            pred = _bf16(_bf16(acc) + xj)
            tl.store(pred_ptr + j * stream_stride + base, pred.to(tl.bfloat16), mask=m)
            if j == ACTIVE:
                w = tl.load(in_w_ptr + offs, mask=m, other=0.0).to(tl.float32)
                tl.store(normed_ptr + base, _rms_norm(pred, w, H, eps).to(tl.bfloat16), mask=m)

    @triton.jit
    def _correct_kernel(
        pred_ptr, h_ptr, mlp_ptr, pf_w_ptr, rn_w_ptr, router_ptr, corr_ptr, scale_ptr, out_ptr, first_ptr,
        stream_stride, eps, H: tl.constexpr, BLOCK: tl.constexpr, N: tl.constexpr, ACTIVE: tl.constexpr,
        SCALE_FIRST: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        pdl_wait(PDL)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < H
        kk = tl.arange(0, N)
        base = row * H + offs
        mlp = tl.load(mlp_ptr + base, mask=m, other=0.0).to(tl.float32)
        pf_w = tl.load(pf_w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        h = _bf16(tl.load(h_ptr + base, mask=m, other=0.0).to(tl.float32) + _rms_norm(mlp, pf_w, H, eps))
        modal = _modalities(h, rn_w_ptr, router_ptr, offs, m, kk, H, eps)
        c = tl.load(corr_ptr + kk[:, None] * N + kk[None, :]).to(tl.float32)  # (N, N)
        coefs = _bf16(_bf16(tl.sum(c * modal[None, :], 1)) + 1.0)
        pa = tl.load(pred_ptr + ACTIVE * stream_stride + base, mask=m, other=0.0).to(tl.float32)
        innovation = _bf16(h - pa)
        for i in tl.static_range(N):
            pi = tl.load(pred_ptr + i * stream_stride + base, mask=m, other=0.0).to(tl.float32)
            out = _bf16(_bf16(innovation * _pick(coefs, kk, i)) + pi)
            tl.store(out_ptr + i * stream_stride + base, out.to(tl.bfloat16), mask=m)
            if i == ACTIVE:
                if SCALE_FIRST:
                    out = _bf16(out * tl.load(scale_ptr + offs, mask=m, other=0.0).to(tl.float32))
                tl.store(first_ptr + base, out.to(tl.bfloat16), mask=m)

    @triton.jit
    def _ple_residual_kernel(
        corr_ptr, ple_ptr, w_ptr, out_ptr, stream_stride, eps, H: tl.constexpr, BLOCK: tl.constexpr,
        N: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        pdl_wait(PDL)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < H
        base = row * H + offs
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        ple = _rms_norm(tl.load(ple_ptr + base, mask=m, other=0.0).to(tl.float32), w, H, eps)
        tl.store(out_ptr + base, tl.load(corr_ptr + base, mask=m, other=0.0), mask=m)
        for i in tl.static_range(1, N):
            ci = tl.load(corr_ptr + i * stream_stride + base, mask=m, other=0.0).to(tl.float32)
            tl.store(out_ptr + i * stream_stride + base, _bf16(ci + ple).to(tl.bfloat16), mask=m)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        # a @ b in float32: exact float32 FMAs (IEEE), else tensor cores on a's dtype
        if IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _attend_split_kernel(
        q_ptr, k_ptr, v_ptr, valid_ptr, acc_ptr, m_ptr, l_ptr, S, NSPLIT, KV_HEADS: tl.constexpr,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, ITERS: tl.constexpr,
        IEEE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        # One (row, K/V head) x one split of the keys: the split's float32 scores of the head's G
        # query heads (padded to GP rows for tl.dot), their running max m, sum of exp(score - m)
        # l and exp-weighted sum of values acc: flash-decoding's partial results. The bfloat16
        # inputs go through tensor cores: q.k exactly (bfloat16 products are exact in float32),
        # p.v with p split into two bfloat16 parts (hi + lo: p to 16 bits, as good as float32 for
        # a result rounded to bfloat16); under Triton's interpreter, whose dot misreads bfloat16,
        # through float32 FMAs (IEEE).
        pdl_wait(PDL)
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // KV_HEADS
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (bh * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0)
        m = tl.full([GP], -1e30, tl.float32)  # finite: a split whose keys are all masked gives 0s, not NaN
        l = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for i in tl.static_range(ITERS):
            s = (split * ITERS + i) * BLOCK_S + tl.arange(0, BLOCK_S)
            inside = s < S
            kv_offs = (bh * S + s[:, None]) * D + d[None, :]
            k = tl.load(k_ptr + kv_offs, mask=inside[:, None], other=0.0)
            v = tl.load(v_ptr + kv_offs, mask=inside[:, None], other=0.0)
            scores = _dot(q, tl.trans(k), IEEE)  # (GP, BLOCK_S) float32; scaling 1.0
            valid = tl.load(valid_ptr + b * S + s, mask=inside, other=0) != 0
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            scale = tl.exp(m - m_new)
            hi = p.to(tl.bfloat16)
            lo = (p - hi.to(tl.float32)).to(tl.bfloat16)
            acc = acc * scale[:, None] + _dot(hi, v, IEEE) + _dot(lo, v, IEEE)
            l = l * scale + tl.sum(p, 1)
            m = m_new
        part = (bh * G + g) * NSPLIT + split  # (row, K/V head, query head of the group, split)
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=g[:, None] < G)
        tl.store(m_ptr + part, m, mask=g < G)
        tl.store(l_ptr + part, l, mask=g < G)

    @triton.jit
    def _attend_combine_kernel(
        acc_ptr, m_ptr, l_ptr, out_ptr, NSPLIT, NS: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr
    ):
        # One query head: its splits' partial results combined (rescaled to the largest max),
        # then divided by the softmax's sum; rounded to bfloat16 as .to() would.
        pdl_wait(PDL)
        head = tl.program_id(0)
        i = tl.arange(0, NS)
        d = tl.arange(0, D)
        m = tl.load(m_ptr + head * NSPLIT + i, mask=i < NSPLIT, other=-float("inf"))
        w = tl.exp(m - tl.max(m, 0))
        l = tl.load(l_ptr + head * NSPLIT + i, mask=i < NSPLIT, other=0.0)
        acc = tl.load(acc_ptr + (head * NSPLIT + i[:, None]) * D + d[None, :], mask=i[:, None] < NSPLIT, other=0.0)
        out = _bf16(tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0))
        tl.store(out_ptr + head * D + d, out.to(tl.bfloat16))


ATTEND_BLOCK = 32  # keys per loop step of a split
ATTEND_SPLITS = 64  # at most this many splits of the keys per (row, K/V head)


def _new(like: Tensor) -> Tensor:
    """An output shaped like `like`, contiguous (the kernels' layout; the fake ops say the same)."""
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _launch(kernel, rows: int, x: torch.Tensor, pdl: bool, *args, **constants):
    """One program per token row (H, N from x: (N, ..., H)); on x's device."""
    H = x.shape[-1]
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[(rows,)](
            *args, H=H, BLOCK=triton.next_power_of_2(H), N=x.shape[0], num_warps=8, **constants,
            **pdl_options(x.device, pdl),
        )  # fmt: skip


# Custom ops: torch.compile keeps them opaque (an extern call inside the compiled layer, launched
# by the op itself), so no compiler has to trace the kernels.
@torch.library.custom_op("g3n::altup_predict", mutates_args=())
def _predict_op(
    streams: Tensor, rn_w: Tensor, router: Tensor, coefs: Tensor, in_w: Tensor, eps: float, active: int, pdl: bool
) -> tuple[Tensor, Tensor]:
    streams = streams.contiguous()
    predictions, normed = _new(streams), _new(streams[0])
    _launch(_predict_kernel, streams[0].numel() // streams.shape[-1], streams, pdl, streams, rn_w, router, coefs,
            in_w, predictions, normed, streams.stride(0), eps, ACTIVE=active)  # fmt: skip
    return predictions, normed


@_predict_op.register_fake
def _(streams, rn_w, router, coefs, in_w, eps, active, pdl):
    return _new(streams), _new(streams[0])


@torch.library.custom_op("g3n::altup_correct", mutates_args=())
def _correct_op(
    predictions: Tensor, h: Tensor, mlp_out: Tensor, pf_w: Tensor, rn_w: Tensor, router: Tensor, corr: Tensor,
    out_scale: Tensor, eps: float, active: int, scale_first: bool, pdl: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    predictions = predictions.contiguous()
    corrected, first = _new(predictions), _new(predictions[0])
    _launch(_correct_kernel, h.numel() // h.shape[-1], predictions, pdl, predictions, h.contiguous(),
            mlp_out.contiguous(), pf_w, rn_w, router, corr, out_scale, corrected, first, predictions.stride(0), eps,
            ACTIVE=active, SCALE_FIRST=scale_first)  # fmt: skip
    return corrected, first


@_correct_op.register_fake
def _(predictions, h, mlp_out, pf_w, rn_w, router, corr, out_scale, eps, active, scale_first, pdl):
    return _new(predictions), _new(predictions[0])


@torch.library.custom_op("g3n::add_per_layer_input", mutates_args=())
def _ple_op(corrected: Tensor, projected: Tensor, w: Tensor, eps: float, pdl: bool) -> Tensor:
    corrected = corrected.contiguous()
    out = _new(corrected)
    _launch(_ple_residual_kernel, projected.numel() // projected.shape[-1], corrected, pdl, corrected,
            projected.contiguous(), w, out, corrected.stride(0), eps)  # fmt: skip
    return out


@_ple_op.register_fake
def _(corrected, projected, w, eps, pdl):
    return _new(corrected)


@torch.library.custom_op("g3n::attend", mutates_args=())
def _attend_op(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, pdl: bool) -> Tensor:
    q = q.contiguous()
    (batch, kv_heads, group, dim), keys = q.shape, k.shape[2]
    iters, splits = _attend_splits(keys)
    acc = q.new_empty((batch, kv_heads, group, splits, dim), dtype=torch.float32)
    m, l = (q.new_empty((batch, kv_heads, group, splits), dtype=torch.float32) for _ in range(2))
    out = _new(q)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _attend_split_kernel[(batch * kv_heads, splits)](
            q, k.contiguous(), v.contiguous(), valid.contiguous(), acc, m, l, keys, splits, KV_HEADS=kv_heads,
            G=group, GP=max(16, triton.next_power_of_2(group)), D=dim, BLOCK_S=ATTEND_BLOCK, ITERS=iters,
            IEEE=INTERPRET, num_warps=4, **pdl_options(q.device, pdl),
        )  # fmt: skip
        _attend_combine_kernel[(batch * kv_heads * group,)](
            acc, m, l, out, splits, NS=triton.next_power_of_2(splits), D=dim, num_warps=4,
            **pdl_options(q.device, pdl),
        )  # fmt: skip
    return out


@_attend_op.register_fake
def _(q, k, v, valid, pdl):
    return _new(q)


def _attend_splits(keys: int) -> tuple[int, int]:
    """(loop steps per split, splits): at most ATTEND_SPLITS splits of ATTEND_BLOCK-key steps."""
    blocks = -(-keys // ATTEND_BLOCK)
    iters = -(-blocks // ATTEND_SPLITS)
    return iters, -(-blocks // iters)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, pdl: bool = True) -> torch.Tensor:
    """Softmax attention of one query position in float32, as flash decoding: one kernel scores
    each split of the keys (a program per split, so a long cache is read in parallel), a second
    combines the splits and rounds to bfloat16. q (batch, kv_heads, group, dim); k/v (batch,
    kv_heads, keys, dim), all bfloat16; valid (batch, keys) bool, at least one key per row;
    returns q's shape. `pdl` (here and below): launched with programmatic dependent launch."""
    return _attend_op(q, k, v, valid, pdl)


def attention_usable(q: torch.Tensor, cfg) -> bool:
    """Whether `attend` can run on q: `usable`, a power-of-two head size of at least 16 and at
    most 16 query heads per K/V head."""
    dim, group = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    return usable(q, cfg) and dim >= 16 and dim & (dim - 1) == 0 and group <= 16


def predict_and_norm(layer, streams: torch.Tensor, pdl: bool = True):
    """AltUp.predict(streams) and input_layernorm of the active prediction, as one kernel.
    streams: (n, batch, seq, hidden); returns (predictions like streams, normed)."""
    cfg, altup = layer.cfg, layer.altup
    return _predict_op(streams, altup.router_norm.weight, altup.modality_router.weight, altup.prediction_coefs.weight,
                       layer.input_layernorm.weight, cfg.rms_norm_eps, cfg.altup_active_idx, pdl)  # fmt: skip


def correct(layer, predictions: torch.Tensor, h: torch.Tensor, mlp_out: torch.Tensor, pdl: bool = True):
    """h + post_feedforward_layernorm(mlp_out), then AltUp.correct and the scaled first stream,
    as one kernel: returns (corrected streams, first)."""
    cfg, altup = layer.cfg, layer.altup
    return _correct_op(predictions, h, mlp_out, layer.post_feedforward_layernorm.weight, altup.router_norm.weight,
                       altup.modality_router.weight, altup.correction_coefs.weight, altup.correct_output_scale,
                       cfg.rms_norm_eps, cfg.altup_active_idx, bool(cfg.altup_correct_scale), pdl)  # fmt: skip


def add_per_layer_input(layer, corrected: torch.Tensor, projected: torch.Tensor, pdl: bool = True) -> torch.Tensor:
    """Streams 1.. plus post_per_layer_input_norm(projected), stream 0 as it is, as one kernel."""
    return _ple_op(corrected, projected, layer.post_per_layer_input_norm.weight, layer.cfg.rms_norm_eps, pdl)
