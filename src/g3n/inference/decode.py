"""The decode math: a preallocated KV cache with a position per row, chunked prefill of one row,
and a fixed-shape decode step over every row that a CUDA graph can replay (inference/engine.py
owns the cache, the graphs and the rows; this module is what they run).

- Full-attention layers own `max_len` slots a row (slot = position); sliding layers a ring of
  `sliding_window` slots; KV-shared layers nothing (they read their source layer's buffers).
  Which position each slot of each row holds lives in a tensor (`slot_index`, -1: empty), so a
  decode step has the same shapes at every position, and each row is at its own position.
- Prefill runs one row's prompt in chunks on a one-row view of the cache; a sliding layer attends
  to its ring plus the chunk, then keeps the chunk's last `sliding_window` positions.
- A decode step feeds one token per row at that row's position; rows that are not decoding
  (free, or still prefilling) run along with their cache left as it was (`StaticCache.live`).
- The per-layer embedding rows of the new tokens are gathered inside the step: from the table on
  the GPU, or from the table in CPU memory, page-locked in place and read by the GPU over the bus
  (`model/ple_table.py`).
- Every path runs the model's own layers (DecoderLayer.forward): a prefill chunk and an uncompiled
  decode step with the modules' ops, a fused decode step (`decode_layer_cached`) with `DecodeOps`.
- Compiled steps (DecodeOptions.compile) run `decode_layer_cached`: inductor fuses the ~160 small
  kernels of a layer (norms, AltUp, casts, attention); q/k/v/Laurel-left and gate/up run as one
  product each (`inference/fused_weights.py`, unless fuse_weights is off). "layers" compiles
  `decode_layer_cached` once per kind of layer (6 graphs for E2B and E4B), and the step's inputs
  (`step_inputs`) and logits (`step_logits`) once each; "step" compiles the whole step as one
  graph (the longest compile).
- In a compiled bfloat16 step on CUDA, hand-written Triton kernels (`kernels/decode.py`, unless
  decode_kernels is off) run AltUp's chains of tiny reductions (3 kernels a layer instead of 11)
  and attention as flash decoding. Every batch-1 bfloat16 product on CUDA, compiled or not, runs
  as `kernels/gemv.py`'s kernel (unless gemv is off: cuBLAS; the choice reaches the model's own
  layers through `gemv.routed`, entered around the engine's calls into the model). Inductor's
  coordinate-descent tuning of its own batch-1 products stays off: the gemv kernel beats what it
  finds, without its minutes of tuning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch._inductor.config

from g3n.config import FULL, SLIDING, TextConfig
from g3n.inference import fused_weights
from g3n.inference.options import CompileMode, DecodeOptions
from g3n.kernels import decode as decode_kernels
from g3n.kernels import gemv
from g3n.model import row_deltas
from g3n.model.text import LayerOps, apply_rope, build_mask

PREFILL_CHUNK = 512  # tokens a prefill pass while other rows decode (their next token waits for it)
LONE_PREFILL_CHUNK = 2048  # while no row decodes: fewer, larger passes (its activations set the memory peak)
DEFAULTS = DecodeOptions()


@dataclass(eq=False)
class PrefixState:
    """A row's cache after the prompt ids `ids` (StaticCache.snapshot): another row restored from
    it goes on from position len(ids) as if it had prefilled them."""

    ids: tuple[int, ...]
    keys: dict[int, torch.Tensor]  # per K/V layer: (kv heads, positions or ring slots, head dim)
    values: dict[int, torch.Tensor]
    ring_index: torch.Tensor  # the position each sliding-ring slot holds (-1: empty)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys.values(), *self.values.values()))


class StaticCache:
    """K/V buffers (rows, kv heads, slots, head dim) per K/V-computing layer and, per kind of layer,
    the position each slot of each row holds (`slot_index`, -1: empty). `live` (rows,) bool, when
    set: the rows a decode step writes (the others' caches stay as they were)."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, device, dtype):
        self.cfg, self.batch, self.max_len = cfg, batch, max_len
        self.size = {FULL: max_len, SLIDING: min(cfg.sliding_window, max_len)}
        kv_shape = (batch, cfg.num_key_value_heads)
        self.keys, self.values = {}, {}
        for layer in range(cfg.first_kv_shared_layer):
            shape = (*kv_shape, self.size[cfg.layer_types[layer]], cfg.head_dim)
            self.keys[layer] = torch.zeros(shape, device=device, dtype=dtype)
            self.values[layer] = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_index = {k: torch.full((batch, n), -1, dtype=torch.long, device=device) for k, n in self.size.items()}
        self.live = None

    def view(self, rows: slice) -> StaticCache:
        """The same buffers for `rows` only (a row's prefill; a step over the first rows)."""
        out = object.__new__(StaticCache)
        out.__dict__.update(self.__dict__)
        out.keys = {i: t[rows] for i, t in self.keys.items()}
        out.values = {i: t[rows] for i, t in self.values.items()}
        out.slot_index = {k: t[rows] for k, t in self.slot_index.items()}
        out.batch, out.live = out.slot_index[FULL].shape[0], None
        return out

    def snapshot(self, row: int, ids) -> PrefixState:
        """A copy of what `row` holds after the prompt ids `ids` (its positions 0..len(ids)-1, taken
        before anything else is written): full layers' K/V of those positions, sliding layers'
        rings as they are."""
        n, keys, values = len(ids), {}, {}
        for layer in self.keys:
            part = slice(0, n) if self.cfg.layer_types[layer] == FULL else slice(None)
            keys[layer] = self.keys[layer][row, :, part].clone()
            values[layer] = self.values[layer][row, :, part].clone()
        ring = self.slot_index[SLIDING][row].clone()
        return PrefixState(tuple(ids), keys, values, ring)

    def restore(self, row: int, state: PrefixState) -> bool:
        """Make `row` hold what `state` holds (False, nothing changed: a ring of another size)."""
        if state.ring_index.shape[0] != self.size[SLIDING] or len(state.ids) > self.max_len:
            return False
        n = len(state.ids)
        for layer, k in state.keys.items():
            self.keys[layer][row, :, : k.shape[1]] = k
            self.values[layer][row, :, : k.shape[1]] = state.values[layer]
        full = torch.arange(self.size[FULL], device=state.ring_index.device)
        self.slot_index[FULL][row] = torch.where(full < n, full, -1)
        self.slot_index[SLIDING][row] = state.ring_index
        return True

    def keep_prefix(self, row: int, length: int) -> None:
        """Forget what `row` holds from position `length` on (0: everything)."""
        for index in self.slot_index.values():
            index[row].masked_fill_(index[row] >= length, -1)

    def write(self, buf: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> None:
        write_slots(buf, slots, new, self.live)

    def record(self, kind: str, slots: torch.Tensor, index: torch.Tensor) -> None:
        """slot_index[kind][r, slots[r, t]] = index[r, t], for the live rows."""
        held = self.slot_index[kind]
        if self.live is not None:
            index = torch.where(self.live[:, None], index, held.gather(1, slots))
        held.scatter_(1, slots, index)


def _attend(attn, q, cos, sin, k, v, mask, kernel=False, pdl=True, linear=gemv.project):
    """Attention.forward for one query position, from its q projection, as float32 broadcast sums:
    the query heads that share a K/V head are grouped (no K/V copy per head), and a compiler turns
    scores, softmax and the weighted sum into a few reductions that read the cache once (cuDNN's
    attention kernel, made for many queries, is a large share of a compiled step's GPU time).
    `kernel`: the same in float32 as flash decoding (kernels/decode.py), each split of the keys
    one program, instead of reductions over all keys at once; `pdl`: its launches'."""
    batch, group, dtype = q.shape[0], attn.n_heads // attn.n_kv_heads, q.dtype
    q = apply_rope(attn.q_norm(q.view(batch, 1, -1, attn.head_dim)), cos, sin)
    q = q.reshape(batch, attn.n_kv_heads, group, 1, attn.head_dim)
    if kernel:
        out = decode_kernels.attend(q.squeeze(3), k, v, mask.reshape(batch, -1), pdl)  # in q's dtype
    else:
        scores = (q.float() * k[:, :, None].float()).sum(-1)  # (batch, kv_heads, group, keys); scaling 1.0
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out = (probs[..., None] * v[:, :, None].float()).sum(-2)
    return linear(attn.o_proj, out.to(dtype).reshape(batch, 1, -1))


def write_slots(buf: torch.Tensor, slots: torch.Tensor, new: torch.Tensor, live=None) -> None:
    """buf[r, :, slots[r, t]] = new[r, :, t] (buf: rows, heads, slots, dim) for the `live` rows
    (rows,) bool, or every row when None."""
    at = slots[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
    if live is not None:
        new = torch.where(live[:, None, None, None], new, buf.gather(2, at))
    buf.scatter_(2, at, new)


class DecodeOps(LayerOps):
    """A decode step's ways of computing a layer's parts (DecoderLayer.forward's `ops`): the
    projections that read one input as one product where fused (`fused_weights`), attention over
    the whole cache as float32 broadcast sums (`_attend`; AltUp's tiny matrices are such sums too
    under compile, `small_linear`), and in a compiled bfloat16 step on CUDA the decode kernels
    (`options.decode_kernels`). Eagerly the broadcasts would be materialised, so uncompiled
    decoding keeps the modules' own ops. `options`: the engine's DecodeOptions (compiled code is
    guarded on them); the layer's other products follow `gemv.routed`, which the engine enters
    around its calls."""

    def __init__(self, options: DecodeOptions, adapter_ids: torch.Tensor | None = None):
        super().__init__(adapter_ids)
        self.options = options

    def _kernels(self, like: torch.Tensor, cfg) -> bool:
        return self.options.decode_kernels and decode_kernels.usable(like, cfg)

    def predict(self, layer, streams):
        if self._kernels(streams, layer.cfg):
            return decode_kernels.predict_and_norm(layer, streams, self.options.pdl)
        return super().predict(layer, streams)

    def _deltas(self, modules, x, outs):
        if self.adapter_ids is None:
            return outs
        return [row_deltas.add_deltas(m, x, y, self.adapter_ids) for m, y in zip(modules, outs, strict=True)]

    def project(self, layer, normed):
        o, attn = self.options, layer.self_attn
        q, k, v, left = fused_weights.in_projections(layer, normed, o.fuse_weights, o.gemv, o.pdl)
        if k is None:
            return self._deltas([attn.q_proj], normed, [q])[0], None, left
        q, k, v = self._deltas([attn.q_proj, attn.k_proj, attn.v_proj], normed, [q, k, v])
        return q, (k, v), left

    def attend(self, attn, q, cos, sin, k, v, mask):
        kernel = self.options.decode_kernels and decode_kernels.attention_usable(q, attn.cfg)
        return _attend(attn, q, cos, sin, k, v, mask, kernel, self.options.pdl, self.linear)

    def mlp(self, mlp, x):
        o = self.options
        gate_up = fused_weights.gate_up(mlp, x, o.fuse_weights, o.gemv, o.pdl)
        return mlp.finish(*self._deltas([mlp.gate_proj, mlp.up_proj], x, gate_up), self.linear)

    def correct(self, layer, predictions, h, mlp_out):
        if self._kernels(predictions, layer.cfg):
            return decode_kernels.correct(layer, predictions, h, mlp_out, self.options.pdl)
        return super().correct(layer, predictions, h, mlp_out)

    def add_per_layer_input(self, layer, corrected, projected):
        if self._kernels(corrected, layer.cfg):
            return decode_kernels.add_per_layer_input(layer, corrected, projected, self.options.pdl)
        return super().add_per_layer_input(layer, corrected, projected)


def decode_layer_cached(layer, streams, per_layer_input, cos, sin, kbuf, vbuf, slots, live, mask, options=DEFAULTS,
                        adapter_ids=None):  # fmt: skip
    """The layer's own forward (DecoderLayer.forward) for one new token per row, with DecodeOps,
    reading and writing the cache's buffers directly: a K/V-computing layer writes its new K/V at
    `slots` (rows, 1) of `kbuf`/`vbuf` (for the `live` rows) and attends to them, a KV-shared layer
    attends to its source's. Nothing here depends on the layer's index, so one compiled function
    serves every layer of the same kind (the per-layer compile, CompileMode.LAYERS). `adapter_ids`
    (rows,): each row's LoRA adapter (adapters/row_lora.py), None without per-row adapters."""

    def kv_for(attn, normed, new):
        if new is not None:
            k, v = attn.finish_kv(*new, cos, sin)
            write_slots(kbuf, slots, k, live)
            write_slots(vbuf, slots, v, live)
        return kbuf, vbuf

    return layer(streams, per_layer_input, cos, sin, kv_for, mask, ops=DecodeOps(options, adapter_ids))


def step_inputs(model, cache: StaticCache, ids: torch.Tensor, index: torch.Tensor, ple_rows=None, embeds=None):
    """What the layers of a step over `ids` (rows, T) at positions `index` (rows, T) read: (AltUp
    streams, per-layer inputs, RoPE and attention mask per kind of layer, cache slots of `index`
    per kind of layer), with the slots' positions recorded in the cache.

    T == 1 is the decode step (fixed shapes; `index` a device tensor); T > 1 a prefill chunk of one
    row. `embeds`: the chunk's input embeddings when images/audio are merged in."""
    cfg, body = model.config, model.model
    decode = ids.shape[1] == 1
    streams, per_layer = body.embed_streams(ids, ple_rows, embeds)
    rope = {kind: body.rotary_emb(index, kind, streams.dtype) for kind in cache.size}
    masks, slots = {}, {}
    for kind, size in cache.size.items():
        window = cfg.sliding_window if kind == SLIDING else None
        slots[kind] = index % size
        if decode or kind == FULL:  # write first, then attend to the whole buffer
            cache.record(kind, slots[kind], index)
            keys = cache.slot_index[kind]
        else:  # a prefill chunk on a ring: attend to the ring as it was plus the chunk
            keys = torch.cat([cache.slot_index[kind], index], dim=1)
        masks[kind] = build_mask(index, keys, keys >= 0, window)
    return streams, per_layer, rope, masks, slots


def forward_cached(model, cache: StaticCache, ids: torch.Tensor, index: torch.Tensor, ple_rows=None, embeds=None,
                   adapter_ids=None):  # fmt: skip
    """Hidden states of `ids` (rows, T) at positions `index` (rows, T), written into `cache`,
    through the model's own layers (a prefill chunk, or an uncompiled decode step; see step_inputs);
    `adapter_ids` (rows,): each row's LoRA adapter (None: no per-row adapters)."""
    cfg, body = model.config, model.model
    decode = ids.shape[1] == 1
    streams, per_layer, rope, masks, slots = step_inputs(model, cache, ids, index, ple_rows, embeds)
    produced = {}

    def kv_for(attn, normed, new=None):
        layer = attn.layer
        if attn.kv_shared:
            return produced[cfg.kv_source(layer)]
        kind = cfg.layer_types[layer]
        k, v = attn.project_kv(normed, *rope[kind]) if new is None else attn.finish_kv(*new, *rope[kind])
        kbuf, vbuf = cache.keys[layer], cache.values[layer]
        if decode or kind == FULL:
            cache.write(kbuf, slots[kind], k)
            cache.write(vbuf, slots[kind], v)
            produced[layer] = (kbuf, vbuf)
        else:
            produced[layer] = (torch.cat([kbuf, k], dim=2), torch.cat([vbuf, v], dim=2))
            keep = min(cache.size[kind], k.shape[2])  # the chunk's last positions stay in the ring
            cache.write(kbuf, slots[kind][:, -keep:], k[:, :, -keep:])
            cache.write(vbuf, slots[kind][:, -keep:], v[:, :, -keep:])
        return produced[layer]

    ops = None if adapter_ids is None else LayerOps(adapter_ids)
    streams = body.run_layers(streams, per_layer, rope, kv_for, masks, ops)
    if not decode:
        keep = min(cache.size[SLIDING], index.shape[1])
        cache.record(SLIDING, slots[SLIDING][:, -keep:], index[:, -keep:])
    return body.final_hidden(streams)


def step_logits(model, streams: torch.Tensor) -> torch.Tensor:
    """The logits (batch, vocab) of a decode step's last streams."""
    return model.logits(model.model.final_hidden(streams)[:, -1])


def decode_logits(model, cache: StaticCache, tokens, ple_rows, index, fused=False, options=DEFAULTS,
                  adapter_ids=None) -> torch.Tensor:  # fmt: skip
    """One decode step's logits (rows, vocab) for `tokens` (rows, 1) at positions `index` (rows, 1):
    what the CUDA graph captures and torch.compile fuses. `fused`: through `decode_layer_cached`
    (True), or that compiled once per kind of layer and the step's inputs and logits compiled each
    (CompileMode.LAYERS); False: the model's own layers. `options`: the engine's DecodeOptions,
    for `decode_layer_cached`; `adapter_ids` (rows,): each row's LoRA adapter (None: none loaded)."""
    if not fused:
        return model.logits(forward_cached(model, cache, tokens, index, ple_rows, adapter_ids=adapter_ids)[:, -1])
    inputs, run_layer, logits = (
        _compiled_parts() if fused == CompileMode.LAYERS else (step_inputs, decode_layer_cached, step_logits)
    )
    streams, per_layer, rope, masks, slots = inputs(model, cache, tokens, index, ple_rows)
    cfg = model.config
    for i, layer in enumerate(model.model.layers):
        kind, source = cfg.layer_types[i], cfg.kv_source(i)
        kv = cache.keys[source], cache.values[source]
        streams = run_layer(layer, streams, per_layer[:, :, i, :], *rope[kind], *kv, slots[kind], cache.live,
                            masks[kind], options, adapter_ids)  # fmt: skip
    return logits(model, streams)


_compiled: dict = {}


def _inductor_options() -> dict:
    """Programmatic dependent launch where this torch has it (Hopper and later GPUs; inductor leaves
    it out elsewhere): each kernel is launched while its predecessor finishes."""
    if hasattr(torch._inductor.config.triton, "enable_pdl"):
        return {"triton.enable_pdl": True}
    return {}


def _compile(fn):
    """fn under torch.compile, once per process (compiled code is cached per shape and guarded on
    its arguments, the engine's DecodeOptions among them)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=False, options=_inductor_options())
    return _compiled[fn]


def compiled_decode():
    """decode_logits under torch.compile: the whole step as one graph."""
    return _compile(decode_logits)


def _compiled_parts():
    """The per-layer compile's parts: step_inputs, decode_layer_cached and step_logits under
    torch.compile. The layer is compiled once per kind of layer (sliding or full, K/V computed or
    shared, sparse or dense MLP, width), not once for the whole step; the step's inputs (embedding,
    per-layer inputs, RoPE, masks: about 80 small kernels uncompiled) and its logits each once."""
    return _compile(step_inputs), _compile(decode_layer_cached), _compile(step_logits)


def strict_dynamo():
    """Past its recompile limit (8 shapes: batch sizes x cache buckets) dynamo would quietly run
    the step uncompiled, here the fused layers, eagerly slower than the model's own: make it raise,
    so the step falls back like any failed compile."""
    if not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):  # older torch: its default
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)


def cache_bucket(max_len: int, limit: int) -> int:
    """max_len rounded up to a power of two (at least 1024), capped at the context `limit`."""
    return max(max_len, min(limit, max(1024, 1 << (max_len - 1).bit_length())))
