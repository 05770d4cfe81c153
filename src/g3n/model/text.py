"""Gemma 3n text decoder in plain PyTorch.

One readable file, transformers' parameter names (so checkpoints load by name), and the same
arithmetic as transformers' `Gemma3nForCausalLM` (the reference our tests compare against):

- AltUp: the hidden state is `altup_num_inputs` parallel streams; each layer predicts all streams
  from a router, runs the real block on the active stream, then corrects the others.
- Laurel: a low-rank residual beside attention, output (attn + laurel) / sqrt(2).
- Per-layer embeddings (PLE): a second, per-layer token table mixed with a projection of the main
  embedding; each layer gates its slice into streams 1.. of AltUp. The table may live on another
  device (CPU) than the rest of the model: only the rows of the current tokens move.
- KV sharing: the last `num_kv_shared_layers` layers have no K/V of their own; they attend to the
  K/V of the last earlier layer of their own type (sliding or full).
- Activation sparsity: a Gaussian top-k on the gate activations of the sparse layers.
- Attention: q/k norms, weightless v norm, scaling 1.0, sliding window on sliding layers.
- Final logits soft-capped; lm_head tied to embed_tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from g3n.config import FULL, SLIDING, TextConfig
from g3n.errors import G3nError
from g3n.kernels.gemv import project
from g3n.model import ple_table, row_deltas

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32 (no +1 offset, unlike Gemma 3)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * self.weight.float()
        return h.type_as(x)


class Laurel(nn.Module):
    """Learned augmented residual: x + norm(right(left(x)))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.linear_left = nn.Linear(cfg.hidden_size, cfg.laurel_rank, bias=False)
        self.linear_right = nn.Linear(cfg.laurel_rank, cfg.hidden_size, bias=False)
        self.post_laurel_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x, project(self.linear_left, x))

    def finish(self, x: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """The output from x and its left projection (computed elsewhere: fused_weights)."""
        return x + self.post_laurel_norm(project(self.linear_right, left))


def std_multiplier(sparsity: float) -> float:
    """Phi^-1(sparsity) in float32, as transformers' Normal(0, 1).icdf computes it (CPU even under meta)."""
    target = torch.tensor(sparsity, dtype=torch.float32, device="cpu")
    return (torch.erfinv(2 * target - 1) * math.sqrt(2)).item()


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        width = cfg.intermediate_size[layer]
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=False)
        self.activation = cfg.hidden_activation
        self.act = ACTIVATIONS[cfg.hidden_activation]
        sparsity = cfg.activation_sparsity_pattern[layer]
        self.std_multiplier = std_multiplier(sparsity) if sparsity > 0.0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(project(self.gate_proj, x), project(self.up_proj, x))

    def finish(self, gate: torch.Tensor, up: torch.Tensor, linear=project) -> torch.Tensor:
        """The output from the gate and up projections (computed elsewhere: fused_weights);
        `linear(module, x)`: how the down projection runs (LayerOps.linear)."""
        return linear(self.down_proj, self.act(self.sparsify(gate)) * up)

    def sparsify(self, gate: torch.Tensor) -> torch.Tensor:
        """The layer's Gaussian top-k (identity on dense layers): keep what lies above
        mean + std * Phi^-1(sparsity) (biased std). float16 takes the statistics in float32: their
        backward sums `width` gradients per token, which overflows float16 under loss scaling."""
        if self.std_multiplier is None:
            return gate
        stats = _upcast_float16(gate)
        cutoff = stats.mean(-1, keepdim=True) + stats.std(-1, keepdim=True, unbiased=False) * self.multiplier(stats)
        return F.relu(stats - cutoff).to(gate.dtype)

    def multiplier(self, like: torch.Tensor) -> torch.Tensor:
        """Phi^-1(sparsity) as transformers rounds it: float32, then like's dtype."""
        return torch.tensor(self.std_multiplier, dtype=torch.float32).to(like.dtype)


class AltUp(nn.Module):
    """Alternating updates over `altup_num_inputs` streams (predict before, correct after a layer)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        n = cfg.altup_num_inputs
        self.cfg = cfg
        self.correct_output_scale = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(cfg.hidden_size, n, bias=False)
        self.router_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _modalities(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.cfg.hidden_size**-1.0).to(x.dtype)
        routed = small_linear(self.router_norm(x) * scale, self.modality_router.weight)
        return torch.tanh(routed.float()).type_as(x)

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        """streams: (n, batch, seq, hidden) -> predictions of the same shape."""
        n, clip = self.cfg.altup_num_inputs, self.cfg.altup_coef_clip
        x = _upcast_float16(streams)
        modalities = self._modalities(x[self.cfg.altup_active_idx])
        if self.training and clip is not None:
            self.prediction_coefs.weight.data.clamp_(-clip, clip)
        coefs = small_linear(modalities, self.prediction_coefs.weight).reshape(*modalities.shape[:-1], n, n)
        if torch.compiler.is_compiling():  # prediction j = sum_i streams[i] * coefs[j, i], fused
            mixed = (x.permute(1, 2, 0, 3)[:, :, None].float() * coefs[..., None].float()).sum(3)
            return (mixed.to(x.dtype).permute(2, 0, 1, 3) + x).contiguous().to(streams.dtype)
        predictions = torch.matmul(x.permute(1, 2, 3, 0), coefs.permute(0, 1, 3, 2)).permute(3, 0, 1, 2)
        return (predictions + x).contiguous().type_as(streams)

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        clip = self.cfg.altup_coef_clip
        p, a = _upcast_float16(predictions), _upcast_float16(activated)
        modalities = self._modalities(a)
        innovation = a - p[self.cfg.altup_active_idx]
        weight = self.correction_coefs.weight
        if self.training and clip is not None:
            weight = weight.clamp(-clip, clip)
        coefs = (small_linear(modalities, weight) + 1.0).permute(2, 0, 1).unsqueeze(-1)
        return (innovation.unsqueeze(0) * coefs + p).contiguous().type_as(activated)

    def scale_corrected_output(self, x: torch.Tensor) -> torch.Tensor:
        return (x.type_as(self.correct_output_scale) * self.correct_output_scale).type_as(x)


def small_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear for AltUp's 4-wide weights. Under torch.compile it is a float32 broadcast sum
    (products of low-precision numbers are exact in float32; only the summation order differs),
    which the compiler fuses into the neighbouring kernels instead of launching a GEMM for 4
    outputs; eagerly that would materialise the broadcast, so it stays a GEMM there."""
    if torch.compiler.is_compiling():
        return (x.float()[..., None, :] * weight.float()).sum(-1).to(x.dtype)
    return F.linear(x, weight.to(x.dtype))  # a float16 weight meets float32 (_upcast_float16)


def _upcast_float16(x: torch.Tensor) -> torch.Tensor:
    """float16 as float32; bfloat16 and float32 stay as they are (transformers' arithmetic).

    For sums whose backward overflows float16 under loss scaling (bench/train_gpu.py
    --fp16-probe finds them): AltUp's 4 x 4 coefficients, whose gradient sums hidden_size products
    of gradient and stream (or innovation) per token, although the router's
    weights and its 1/hidden_size scale bring it back into range on the way to the streams; and
    the MLP's top-k statistics."""
    return x.float() if x.dtype == torch.float16 else x


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, dim); cos/sin: (batch, seq, dim)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.head_dim = cfg.head_dim
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.kv_shared = layer >= cfg.first_kv_shared_layer
        self.window = cfg.sliding_window if cfg.layer_types[layer] == SLIDING else None
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        if not self.kv_shared:
            self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_scale=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """New keys and values for x, shaped (batch, kv_heads, seq, dim)."""
        return self.finish_kv(project(self.k_proj, x), project(self.v_proj, x), cos, sin)

    def finish_kv(self, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Keys and values from their projections (batch, seq, kv_heads * dim): norms, RoPE on keys."""
        shape = (*k.shape[:-1], -1, self.head_dim)
        k = apply_rope(self.k_norm(k.view(shape)), cos, sin).transpose(1, 2)
        v = self.v_norm(v.view(shape)).transpose(1, 2)
        return k, v

    def forward(self, x, cos, sin, k, v, mask):
        """Attend x's queries to k/v (already including cached and shared states). `mask`: a
        (batch, 1, q, k) bool tensor; or, for causal attention over the same positions (within the
        sliding window on sliding layers), None or the (batch, seq) segment ids of packed rows."""
        return self.attend(project(self.q_proj, x), cos, sin, k, v, mask)

    def attend(self, q, cos, sin, k, v, mask, linear=project):
        """forward from the query projection `q` (batch, seq, heads * dim) on; `linear(module, x)`:
        how the output projection runs (LayerOps.linear)."""
        lead, shape = q.shape[:-1], (*q.shape[:-1], -1, self.head_dim)
        q = apply_rope(self.q_norm(q.view(shape)), cos, sin).transpose(1, 2)
        if self.n_heads != self.n_kv_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None or mask.dtype != torch.bool:  # None or segment ids: no (q x k) mask given
            out = causal_attention(q, k, v, self.window, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return linear(self.o_proj, out.transpose(1, 2).reshape(*lead, -1))


def causal_attention(q, k, v, window: int | None, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of positions 0..T-1 to themselves without a (T x T) mask, so GPUs run
    their flash kernels and memory stays linear in T (long-context training).

    Full layers use SDPA's is_causal. A sliding layer's queries go in blocks of `window`: block b
    attends to keys [b*window - window, b*window + window) under one small (window x 2*window)
    mask, the same for every block (the keys before position 0 are padding, masked in block 0).
    With `segments` (packed rows) tokens attend only within their own segment: sliding layers
    add that to each block's mask (still linear in T); full layers build the (T x T) mask, or
    past DENSE_MASK_MAX tokens attend in checkpointed chunks of QUERY_CHUNK queries, each with its
    own (chunk x keys) mask, so only one chunk's mask exists at a time (32K tokens: 128 MB
    instead of 1 GB, and the float copy SDPA makes of it).
    """
    T = q.shape[2]
    if segments is not None and window is None and T > DENSE_MASK_MAX:
        return _segment_chunks(q, k, v, segments)
    if segments is not None and (window is None or T <= window):
        index, real = torch.arange(T, device=q.device), torch.ones_like(segments, dtype=torch.bool)
        mask = build_mask(index, index, real, None, segments)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    if window is None or T <= window:  # within one window, causal is the whole rule
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    W, B, H, D = window, q.shape[0], q.shape[1], q.shape[3]
    blocks = -(-T // W)
    pad = blocks * W - T
    q = F.pad(q, (0, 0, 0, pad)).reshape(B, H, blocks, W, D)
    k, v = (F.pad(t, (0, 0, W, pad)).unfold(2, 2 * W, W).transpose(-1, -2) for t in (k, v))  # (B,H,blocks,2W,D)
    i = torch.arange(W, device=q.device)[:, None]
    j = torch.arange(2 * W, device=q.device)[None, :]
    first = (torch.arange(blocks, device=q.device) == 0)[:, None, None]
    # key j of a block sees query i when 0 <= (i + W) - j < W; block 0 has no keys before position 0
    mask = ((j > i) & (j <= i + W) & (~first | (j >= W))).expand(B, blocks, W, 2 * W)
    if segments is not None:  # padded queries (-3) see padded keys (-3), never the ones before 0 (-2)
        seg_q = F.pad(segments, (0, pad), value=-3).reshape(B, blocks, W)
        seg_k = F.pad(F.pad(segments, (W, 0), value=-2), (0, pad), value=-3).unfold(1, 2 * W, W)
        mask = mask & (seg_q[..., :, None] == seg_k[..., None, :])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).reshape(B * blocks, H, W, D),
        k.transpose(1, 2).reshape(B * blocks, H, 2 * W, D),
        v.transpose(1, 2).reshape(B * blocks, H, 2 * W, D),
        attn_mask=mask.reshape(B * blocks, 1, W, 2 * W),
        scale=1.0,
    )
    return out.reshape(B, blocks, H, W, D).transpose(1, 2).reshape(B, H, blocks * W, D)[:, :, :T]


DENSE_MASK_MAX = 8192  # full layers of packed rows: longer rows attend in chunks of queries
QUERY_CHUNK = 4096


@torch.compiler.disable  # run eagerly: a compiled loop over the chunks would recompile for every length
def _segment_chunks(q, k, v, segments):
    """Full-layer attention of a long packed row, QUERY_CHUNK queries at a time, each chunk
    checkpointed (its mask is rebuilt in the backward pass instead of kept)."""
    chunks = [
        torch.utils.checkpoint.checkpoint(
            _segment_chunk, q[:, :, s : s + QUERY_CHUNK], k, v, segments, s, use_reentrant=False
        )
        for s in range(0, q.shape[2], QUERY_CHUNK)
    ]
    return torch.cat(chunks, dim=2)


def _segment_chunk(q, k, v, segments, start: int):
    """Causal attention of the queries at positions [start, start + len) to the keys before them
    that share their segment (a full layer's chunk of a packed row)."""
    end = start + q.shape[2]
    index = torch.arange(end, device=q.device)
    causal = index[None, :] <= index[start:, None]
    mask = causal[None] & (segments[:, start:end, None] == segments[:, None, :end])
    return F.scaled_dot_product_attention(q, k[:, :, :end], v[:, :, :end], attn_mask=mask[:, None], scale=1.0)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg, layer)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.altup = AltUp(cfg)
        self.laurel = Laurel(cfg)
        self.per_layer_input_gate = nn.Linear(h, cfg.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = nn.Linear(cfg.hidden_size_per_layer_input, h, bias=False)
        self.post_per_layer_input_norm = RMSNorm(h, eps)
        self.act = ACTIVATIONS[cfg.hidden_activation]

    def forward(self, streams, per_layer_input, cos, sin, kv_for, mask, body=None, ops=None):
        """streams: (n, batch, seq, hidden). `kv_for(attn, normed, new)` returns the K/V this layer
        attends to (`new`: the layer's own K/V projections when `ops` computed them, else None).
        `ops` (LayerOps): how the parts are computed (default: the modules' own calls; the decode
        step passes fused products and kernels). `body(layer, ...)`: runs the layer's work instead
        (training's compiled or tiled halves), still through the module's call, so wrappers' hooks
        run (FSDP gathers shards there)."""
        if body is not None:
            return body(self, streams, per_layer_input, cos, sin, kv_for, mask)
        ops = MODULE_OPS if ops is None else ops
        predictions, normed = ops.predict(self, streams)
        q, new_kv, left = ops.project(self, normed)
        k, v = kv_for(self.self_attn, normed, new_kv)
        attn = ops.attend(self.self_attn, q, cos, sin, k, v, mask)
        return self.end(predictions, attn, self.laurel.finish(normed, left), per_layer_input, ops)

    def begin(self, streams):
        """Before attention: AltUp's predictions, the normed active stream and Laurel's output."""
        predictions, normed = MODULE_OPS.predict(self, streams)
        return predictions, normed, self.laurel(normed)

    def feedforward(self, predictions, attn, laurel, ops=None):
        """The residual after attention and Laurel, and the MLP's output on it (not yet normed)."""
        h = (predictions[self.cfg.altup_active_idx] + self.post_attention_layernorm(attn) + laurel) / math.sqrt(2)
        normed = self.pre_feedforward_layernorm(h)
        return h, (MODULE_OPS if ops is None else ops).mlp(self.mlp, normed)

    def end(self, predictions, attn, laurel, per_layer_input, ops=None):
        """After attention: residuals, MLP, AltUp's correction and the per-layer input."""
        ops = MODULE_OPS if ops is None else ops
        corrected, first = ops.correct(self, predictions, *self.feedforward(predictions, attn, laurel, ops))
        gated = self.act(project(self.per_layer_input_gate, first)) * per_layer_input
        return ops.add_per_layer_input(self, corrected, project(self.per_layer_projection, gated))


class LayerOps:
    """The parts of a decoder layer as its modules compute them. DecoderLayer.forward is written
    once over these; the decode step (inference/decode.py) substitutes its own: fused products,
    Triton kernels, attention over the whole cache as broadcast sums. `adapter_ids` (rows,): each
    row's LoRA adapter among those stacked on the model (model/row_deltas.py; -1: none), added to
    the projections they tune; None: no per-row adapters."""

    def __init__(self, adapter_ids: torch.Tensor | None = None):
        self.adapter_ids = adapter_ids

    def linear(self, module, x):
        """module(x), plus the rows' adapters' deltas where they tune `module`."""
        y = project(module, x)
        return y if self.adapter_ids is None else row_deltas.add_deltas(module, x, y, self.adapter_ids)

    def predict(self, layer, streams):
        """AltUp's predictions (n, batch, seq, hidden) and the input-normed active stream."""
        predictions = layer.altup.predict(streams)
        return predictions, layer.input_layernorm(predictions[layer.cfg.altup_active_idx])

    def project(self, layer, normed):
        """(q projection, the layer's new (k, v) projections or None for kv_for to compute, Laurel's
        left projection) of the normed stream."""
        attn = layer.self_attn
        kv = None
        if self.adapter_ids is not None and not attn.kv_shared:  # their adapters' deltas too
            kv = self.linear(attn.k_proj, normed), self.linear(attn.v_proj, normed)
        return self.linear(attn.q_proj, normed), kv, project(layer.laurel.linear_left, normed)

    def attend(self, attn, q, cos, sin, k, v, mask):
        return attn.attend(q, cos, sin, k, v, mask, self.linear)

    def mlp(self, mlp, x):
        if self.adapter_ids is None:
            return mlp(x)
        return mlp.finish(self.linear(mlp.gate_proj, x), self.linear(mlp.up_proj, x), self.linear)

    def correct(self, layer, predictions, h, mlp_out):
        """AltUp's corrected streams after the block, and the first one (scaled where configured)."""
        corrected = layer.altup.correct(predictions, h + layer.post_feedforward_layernorm(mlp_out))
        first = corrected[layer.cfg.altup_active_idx]
        if layer.cfg.altup_correct_scale:
            first = layer.altup.scale_corrected_output(first)
        return corrected, first

    def add_per_layer_input(self, layer, corrected, projected):
        """The projected per-layer input, normed, added to every stream but the first."""
        return torch.cat([corrected[:1], corrected[1:] + layer.post_per_layer_input_norm(projected)], dim=0)


MODULE_OPS = LayerOps()


class KVCache:
    """K/V of earlier tokens for incremental decoding.

    Full-attention layers keep every position; sliding layers keep only the last
    `sliding_window` positions; KV-shared layers keep nothing (they read their source layer's).
    `valid` marks real tokens (False for left padding) for every position seen so far.
    """

    def __init__(self, cfg: TextConfig):
        self.cfg = cfg
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.valid: torch.Tensor | None = None  # (batch, seen) bool

    @property
    def seq_len(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def kept(self, kind: str) -> int:
        """How many past positions a layer of this kind keeps."""
        return self.seq_len if kind == FULL else min(self.seq_len, self.cfg.sliding_window)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append new K/V for a layer; return the K/V to attend to (cached + new)."""
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        keep = k.shape[2] if self.cfg.layer_types[layer] == FULL else self.cfg.sliding_window
        self.keys[layer], self.values[layer] = k[:, :, -keep:], v[:, :, -keep:]
        return k, v


def build_mask(q_index, k_index, k_valid, window, segments=None):
    """(batch, 1, q, k) bool: causal by cache index, within `window`, and only real keys; with
    the indices (q,) and (k,) shared by every row, or (batch, q) and (batch, k) per row; with
    `segments` (batch, seq) also only keys of the query's own segment (packed samples).

    Rows with no allowed key (queries that are themselves padding) may attend everywhere, so the
    softmax stays finite; their outputs are never used.
    """
    q_index, k_index = q_index.reshape(-1, q_index.shape[-1]), k_index.reshape(-1, k_index.shape[-1])
    diff = q_index[:, :, None] - k_index[:, None, :]
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    allowed = allowed[:, None] & k_valid[:, None, None, :]
    if segments is not None:
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    return allowed | ~allowed.any(-1, keepdim=True)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where the segment id changes (packed samples)."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(starts, index, 0).cummax(-1).values


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        dim = cfg.head_dim
        for kind, theta in ((FULL, cfg.rope_theta), (SLIDING, cfg.rope_local_base_freq)):
            inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.register_buffer(f"{kind}_inv_freq", inv, persistent=False)

    def forward(self, position_ids: torch.Tensor, kind: str, dtype: torch.dtype):
        inv = getattr(self, f"{kind}_inv_freq").to(position_ids.device)
        freqs = position_ids[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class TextModel(nn.Module):
    """The decoder body: everything but the (tied) output projection."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        h, L, P = cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h, padding_idx=cfg.pad_token_id)
        self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, L * P, padding_idx=cfg.pad_token_id)
        self.per_layer_model_projection = nn.Linear(h, L * P, bias=False)
        self.per_layer_projection_norm = RMSNorm(P, cfg.rms_norm_eps)
        self.altup_projections = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(cfg.altup_num_inputs - 1))
        self.altup_unembed_projections = nn.ModuleList(
            nn.Linear(h, h, bias=False) for _ in range(cfg.altup_num_inputs - 1)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(L))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)
        # How the layers run: None, one after another; training sets a runner of its own
        # (train/recompute.py: checkpointing, offloaded inputs, compiled layer halves).
        self.layer_runner = None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight
        return F.embedding(input_ids, w) * torch.tensor(self.cfg.hidden_size**0.5).to(w.dtype)

    def ple_rows(self, input_ids: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """The scaled per-layer-table rows of `input_ids` (ids past the table use row 0). A table
        kept in CPU memory is read from the ids' GPU through a page-locked view (ple_table.py:
        only these rows move, no host gather) unless it is being trained; else the rows are
        gathered where the table lives. `table`: a view to read instead."""
        cfg = self.cfg
        if table is None:
            table = self.embed_tokens_per_layer.weight
            if input_ids.device.type == "cuda" and table.device.type == "cpu" and not table.requires_grad:
                view = ple_table.device_view(self, input_ids.device)
                table = table if view is None else view
        ids = torch.where((input_ids >= 0) & (input_ids < cfg.vocab_size_per_layer_input), input_ids, 0)
        return F.embedding(ids.to(table.device), table) * torch.tensor(cfg.hidden_size_per_layer_input**0.5).to(
            table.dtype
        )

    def per_layer_inputs(self, input_ids: torch.Tensor, embeds: torch.Tensor, rows=None) -> torch.Tensor:
        """(batch, seq, layers, P): PLE rows mixed with the embedding (`rows`: ple_rows, if already
        gathered)."""
        cfg = self.cfg
        L, P = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        rows = self.ple_rows(input_ids) if rows is None else rows
        rows = rows.to(embeds.device, embeds.dtype).reshape(*input_ids.shape, L, P)
        proj = self.per_layer_model_projection(embeds) * torch.tensor(cfg.hidden_size**-0.5).to(embeds.dtype)
        proj = self.per_layer_projection_norm(proj.reshape(*input_ids.shape, L, P))
        return (proj + rows) * torch.rsqrt(torch.tensor(2.0)).to(embeds.dtype)

    @staticmethod
    def _match_magnitude(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mag = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
        return x * target / mag

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache: KVCache | None = None,
        segment_ids=None,
        inputs_embeds=None,
    ):
        """Final normed hidden states (batch, seq, hidden). Updates `cache` in place when given.

        `segment_ids` (batch, seq) packs several samples into one row: tokens attend only within
        their segment and positions restart at each segment's start. `inputs_embeds` replaces the
        token embeddings (images and audio merged in); the per-layer rows still come from the ids.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        device = self.embed_tokens.weight.device
        input_ids = input_ids.to(device)
        past = cache.seq_len if cache is not None else 0
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed samples) cannot be combined with a KV cache")
            segment_ids = segment_ids.to(device)
            if position_ids is None:
                position_ids = segment_positions(segment_ids)
        valid = (
            torch.ones(B, T, dtype=torch.bool, device=device)
            if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.bool)
        )
        all_valid = valid if cache is None or cache.valid is None else torch.cat([cache.valid, valid], dim=1)
        if position_ids is None:
            # Positions count real tokens only, so left-padded rows start at 0 like unpadded ones.
            position_ids = (all_valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        position_ids = position_ids.to(device)

        streams, per_layer = self.embed_streams(input_ids, embeds=inputs_embeds)

        rope = {kind: self.rotary_emb(position_ids, kind, streams.dtype) for kind in set(cfg.layer_types)}
        # Without a cache or padding mask attention is causal over the row: no (q x k) mask tensors
        # (causal_attention gets None, or packed rows' segment ids: flash kernels, memory linear in
        # the length on sliding layers).
        masks = {kind: segment_ids for kind in set(cfg.layer_types)}
        if cache is not None or attention_mask is not None:
            q_index = torch.arange(past, past + T, device=device)
            for kind in masks:
                kept = cache.kept(kind) if cache is not None else 0
                k_index = torch.arange(past - kept, past + T, device=device)
                window = cfg.sliding_window if kind == SLIDING else None
                k_valid = all_valid[:, all_valid.shape[1] - kept - T :]
                masks[kind] = build_mask(q_index, k_index, k_valid, window, segment_ids)

        produced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def kv_for(attn: Attention, normed: torch.Tensor, new=None):
            layer = attn.layer
            if attn.kv_shared:
                return produced[cfg.kv_source(layer)]
            cos, sin = rope[cfg.layer_types[layer]]
            runner = self.layer_runner
            if new is not None:
                k, v = attn.finish_kv(*new, cos, sin)
            elif runner is None:
                k, v = attn.project_kv(normed, cos, sin)
            else:
                k, v = runner.project_kv(attn, normed, cos, sin)
            if cache is not None:
                k, v = cache.update(layer, k, v)
            produced[layer] = (k, v)
            return k, v

        streams = self.run_layers(streams, per_layer, rope, kv_for, masks)
        if cache is not None:
            cache.valid = all_valid
        return self.final_hidden(streams)

    def embed_streams(self, input_ids: torch.Tensor, ple_rows: torch.Tensor | None = None, embeds=None):
        """The AltUp streams (n, batch, seq, hidden) and per-layer inputs of the tokens (`embeds`:
        precomputed input embeddings, e.g. with images merged in)."""
        embeds = self.embed(input_ids) if embeds is None else embeds
        per_layer = self.per_layer_inputs(input_ids, embeds, ple_rows)
        target = torch.mean(embeds**2, dim=-1, keepdim=True) ** 0.5
        streams = [embeds] + [self._match_magnitude(project(p, embeds), target) for p in self.altup_projections]
        return torch.stack(streams, dim=0), per_layer

    def run_layers(self, streams, per_layer, rope: dict, kv_for, masks: dict, ops: LayerOps | None = None):
        """Every decoder layer; `kv_for(attn, normed, new)` supplies the K/V each layer attends to;
        `ops`: DecoderLayer.forward's (not with a layer_runner: training runs the modules' own)."""
        if self.layer_runner is not None:
            return self.layer_runner.run(self, streams, per_layer, rope, kv_for, masks)
        for i, layer in enumerate(self.layers):
            kind = self.cfg.layer_types[i]
            streams = layer(streams, per_layer[:, :, i, :], *rope[kind], kv_for, masks[kind], ops=ops)
        return streams

    def final_hidden(self, streams: torch.Tensor) -> torch.Tensor:
        """Streams back to one hidden state (unembed projections, mean), normed."""
        target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
        outs = [streams[0]] + [
            self._match_magnitude(project(p, streams[i + 1]), target)
            for i, p in enumerate(self.altup_unembed_projections)
        ]
        return self.norm(torch.stack(outs).mean(dim=0))


class Gemma3nForCausalLM(nn.Module):
    """Text-only Gemma 3n. `model(input_ids)` returns logits (batch, seq, vocab)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        self.towers = None  # model/towers.py's Towers when images/audio were asked for

    def embed_inputs(self, input_ids: torch.Tensor, media: dict | None = None) -> torch.Tensor | None:
        """Input embeddings with images/audio merged in (None without towers: the decoder embeds)."""
        if self.towers is None:
            if media:
                raise G3nError("this model was loaded without vision/audio towers (load it with modalities=)")
            return None
        input_ids = input_ids.to(self.device)
        return self.towers.embed(input_ids, self.model.embed(input_ids), media)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_cache(self) -> KVCache:
        return KVCache(self.config)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output projection plus the final soft-cap."""
        logits = F.linear(hidden, self.model.embed_tokens.weight)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        segment_ids: torch.Tensor | None = None,
        media: dict | None = None,
    ) -> torch.Tensor:
        """Logits for every position, or for the last `logits_to_keep` positions when > 0.

        `segment_ids` marks packed samples (see TextModel.forward); `media` holds pixel_values
        and/or input_features + input_features_mask for the prompt's images and audio."""
        embeds = self.embed_inputs(input_ids, media)
        hidden = self.model(input_ids, attention_mask, position_ids, cache, segment_ids, embeds)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.logits(hidden)
