"""The generation engine: a preallocated KV cache, chunked prefill and a fixed-shape decode step
that a CUDA graph can replay.

- Full-attention layers own `max_len` slots; sliding layers a ring of `sliding_window` slots;
  KV-shared layers nothing (they read their source layer's buffers). Which position each slot
  holds lives in a tensor (`slot_index`), so a decode step has the same shapes at every position.
- Prefill runs the prompt in chunks; a sliding layer attends to its ring plus the chunk, then keeps
  the chunk's last `sliding_window` positions.
- On CUDA the decode step is captured once as a CUDA graph (inputs copied into static buffers,
  then replayed): at batch 1 the model is bound by kernel launches, which the graph removes. The
  per-layer embedding rows of the new tokens are gathered inside the graph: from the table on the
  GPU, or from the table in CPU memory, page-locked in place and read by the GPU over the bus
  (`model/ple_table.py`: only the current tokens' rows move, with no host round trip per token; if the
  table cannot be page-locked, the rows are gathered on the host before each replay).
- What the engine does is set by its DecodeOptions (inference/options.py), passed to `Generator`
  and from it down to the kernels; two engines in one process may decode differently.
- Optionally (DecodeOptions.compile) the step is compiled with torch.compile before it is
  captured, through `decode_layer_cached` (inductor fuses the ~160 small kernels of a layer:
  norms, AltUp, casts, attention; q/k/v/Laurel-left and gate/up run as one product each,
  `inference/fused_weights.py`, unless fuse_weights is off; inductor's kernels use programmatic
  dependent launch where torch has it). "layers" compiles `decode_layer_cached` once per kind of
  layer (6 graphs for E2B and E4B), and the step's inputs (`step_inputs`) and logits
  (`step_logits`) once each; the graph runs them in turn. "step" compiles the whole step as one
  graph (the longest compile). Compiling pays off only after some thousands of tokens, so it is
  off by default (for servers and long runs). If compiling fails the uncompiled step is captured
  instead and a warning says why. A model with 4-bit weights (bitsandbytes) is not compiled.
- In a compiled bfloat16 step on CUDA, hand-written Triton kernels (`kernels/decode.py`, unless
  decode_kernels is off) run AltUp's chains of tiny reductions (3 kernels a layer instead of 11)
  and attention as flash decoding; if the step fails to compile with them, this engine compiles
  it without them (its options say so from then on), with a warning; the next engine tries them
  again. Every batch-1 bfloat16 product on CUDA, compiled or not, runs as `kernels/gemv.py`'s
  kernel (unless gemv is off: cuBLAS; the choice reaches the model's own layers through
  `gemv.routed`, entered around the engine's calls into the model), and top-k sampling as
  `kernels/sampling.py`'s (sample_kernels); g3n's Triton kernels launch with programmatic
  dependent launch (`kernels/common.py`, pdl). Inductor's coordinate-descent tuning of its own
  batch-1 products stays off: the gemv kernel beats what it finds, without its minutes of tuning.
- `sample` (inference/sampling.py's sampling) runs at the end of the captured step, so a token costs one
  graph replay and no sampling kernels launched from Python.
- Compiled code is specialised to the cache's shapes, so with compiling on the cache length is
  rounded up to a power of two (at least 1024, at most the context): one compile serves every
  request of that bucket and batch size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from functools import partial

import torch
import torch._inductor.config

from g3n.config import FULL, SLIDING, TextConfig
from g3n.inference import fused_weights
from g3n.inference.options import CompileMode, DecodeOptions
from g3n.kernels import decode as decode_kernels
from g3n.kernels import gemv
from g3n.model.ple_table import device_view
from g3n.model.quant import is_4bit
from g3n.model.text import apply_rope, build_mask

PREFILL_CHUNK = 512  # tokens a prefill pass: its activations set prefill's memory peak
DEFAULTS = DecodeOptions()


class StaticCache:
    def __init__(self, cfg: TextConfig, batch: int, max_len: int, device, dtype):
        self.cfg, self.batch, self.max_len = cfg, batch, max_len
        self.size = {FULL: max_len, SLIDING: min(cfg.sliding_window, max_len)}
        kv_shape = (batch, cfg.num_key_value_heads)
        self.keys, self.values = {}, {}
        for layer in range(cfg.first_kv_shared_layer):
            shape = (*kv_shape, self.size[cfg.layer_types[layer]], cfg.head_dim)
            self.keys[layer] = torch.zeros(shape, device=device, dtype=dtype)
            self.values[layer] = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_index = {k: torch.full((n,), -1, dtype=torch.long, device=device) for k, n in self.size.items()}
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pads = torch.zeros(batch, dtype=torch.long, device=device)  # left padding of each row

    def key_valid(self, kind: str, key_index: torch.Tensor) -> torch.Tensor:
        """(batch, keys) bool: the slot holds a position, and that position was a real token."""
        real = self.valid.gather(1, key_index.clamp(min=0)[None].expand(self.batch, -1))
        return real & (key_index >= 0)[None]


def _attend(attn, q, cos, sin, k, v, mask, kernel=False, pdl=True):
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
    return gemv.project(attn.o_proj, out.to(dtype).reshape(batch, 1, -1))


def decode_layer_cached(layer, streams, per_layer_input, cos, sin, kbuf, vbuf, slots, mask, options=DEFAULTS):
    """DecoderLayer.forward for one new token per row, reading and writing the cache's buffers
    directly: a K/V-computing layer writes its new K/V at `slots` of `kbuf`/`vbuf` and attends to
    them, a KV-shared layer attends to its source's. Its attention is float32 broadcast sums
    (`_attend`; AltUp's tiny matrices are such sums too under compile, `small_linear`) and the
    projections that read one input run as one product where fused (`fused_weights`): fewer,
    fusable kernels for a compiled decode step (tests compare it with the layer itself and with
    transformers). Eagerly the broadcasts would be materialised, so uncompiled decoding keeps the
    model's own layers. Nothing here depends on the layer's index, so one compiled function serves
    every layer of the same kind (the per-layer compile, CompileMode.LAYERS). `options`: the
    engine's DecodeOptions: the decode kernels, fused weights, and gemv/PDL for the fused products
    and the kernels (the layer's other products follow `gemv.routed`, which the engine enters
    around its calls); compiled code is guarded on them."""
    attn = layer.self_attn
    pdl, fuse, gemv_kernel = options.pdl, options.fuse_weights, options.gemv
    kernels = options.decode_kernels and decode_kernels.usable(streams, layer.cfg)
    if kernels:
        predictions, normed = decode_kernels.predict_and_norm(layer, streams, pdl)
    else:
        predictions = layer.altup.predict(streams)
        normed = layer.input_layernorm(predictions[layer.cfg.altup_active_idx])
    q, k, v, left = fused_weights.in_projections(layer, normed, fuse, gemv_kernel, pdl)
    if not attn.kv_shared:
        k, v = attn.finish_kv(k, v, cos, sin)
        kbuf.index_copy_(2, slots, k)
        vbuf.index_copy_(2, slots, v)
    attend_kernel = options.decode_kernels and decode_kernels.attention_usable(q, layer.cfg)
    out = _attend(attn, q, cos, sin, kbuf, vbuf, mask, attend_kernel, pdl)
    mlp = layer.mlp
    end = partial(decode_kernels.decode_end, layer, pdl=pdl) if kernels else layer.end
    return end(
        predictions, out, layer.laurel.finish(normed, left), per_layer_input,
        mlp=lambda x: mlp.finish(*fused_weights.gate_up(mlp, x, fuse, gemv_kernel, pdl)),
    )  # fmt: skip


def step_inputs(model, cache: StaticCache, ids: torch.Tensor, index: torch.Tensor, ple_rows=None, embeds=None):
    """What the layers of a step over `ids` (batch, T) at cache positions `index` (T,) read:
    (AltUp streams, per-layer inputs, RoPE and attention mask per kind of layer, cache slots of
    `index` per kind of layer), with the cache's bookkeeping (validity, slot positions) updated.

    T == 1 is the decode step (fixed shapes; `index` a device tensor); T > 1 a prefill chunk.
    `embeds`: the chunk's input embeddings when images/audio are merged in."""
    cfg, body = model.config, model.model
    decode = ids.shape[1] == 1
    if decode:  # generated tokens are real in every row (prefill sets validity from the mask)
        cache.valid.index_fill_(1, index, True)
    positions = (index[None, :] - cache.pads[:, None]).clamp(min=0)
    streams, per_layer = body.embed_streams(ids, ple_rows, embeds)
    rope = {kind: body.rotary_emb(positions, kind, streams.dtype) for kind in cache.size}
    masks, slots = {}, {}
    for kind, size in cache.size.items():
        window = cfg.sliding_window if kind == SLIDING else None
        slots[kind] = index % size
        if decode or kind == FULL:  # write first, then attend to the whole buffer
            cache.slot_index[kind].index_copy_(0, slots[kind], index)
            keys = cache.slot_index[kind]
        else:  # a prefill chunk on a ring: attend to the ring as it was plus the chunk
            keys = torch.cat([cache.slot_index[kind], index])
        masks[kind] = build_mask(index, keys, cache.key_valid(kind, keys), window)
    return streams, per_layer, rope, masks, slots


def forward_cached(model, cache: StaticCache, ids: torch.Tensor, index: torch.Tensor, ple_rows=None, embeds=None):
    """Hidden states of `ids` (batch, T) at cache positions `index` (T,), written into `cache`,
    through the model's own layers (a prefill chunk, or an uncompiled decode step; see step_inputs)."""
    cfg, body = model.config, model.model
    decode = ids.shape[1] == 1
    streams, per_layer, rope, masks, slots = step_inputs(model, cache, ids, index, ple_rows, embeds)
    produced = {}

    def kv_for(attn, normed):
        layer = attn.layer
        if attn.kv_shared:
            return produced[cfg.kv_source(layer)]
        kind = cfg.layer_types[layer]
        k, v = attn.project_kv(normed, *rope[kind])
        kbuf, vbuf = cache.keys[layer], cache.values[layer]
        if decode or kind == FULL:
            kbuf.index_copy_(2, slots[kind], k)
            vbuf.index_copy_(2, slots[kind], v)
            produced[layer] = (kbuf, vbuf)
        else:
            produced[layer] = (torch.cat([kbuf, k], dim=2), torch.cat([vbuf, v], dim=2))
            keep = min(cache.size[kind], k.shape[2])  # the chunk's last positions stay in the ring
            kbuf.index_copy_(2, slots[kind][-keep:], k[:, :, -keep:])
            vbuf.index_copy_(2, slots[kind][-keep:], v[:, :, -keep:])
        return produced[layer]

    streams = body.run_layers(streams, per_layer, rope, kv_for, masks)
    if not decode:
        keep = min(cache.size[SLIDING], len(index))
        cache.slot_index[SLIDING].index_copy_(0, slots[SLIDING][-keep:], index[-keep:])
    return body.final_hidden(streams)


def step_logits(model, streams: torch.Tensor) -> torch.Tensor:
    """The logits (batch, vocab) of a decode step's last streams."""
    return model.logits(model.model.final_hidden(streams)[:, -1])


def decode_logits(model, cache: StaticCache, tokens, ple_rows, index, fused=False, options=DEFAULTS) -> torch.Tensor:
    """One decode step's logits (batch, vocab): what the CUDA graph captures and torch.compile fuses.
    `fused`: through `decode_layer_cached` (True), or that compiled once per kind of layer and the
    step's inputs and logits compiled each (CompileMode.LAYERS); False: the model's own layers.
    `options`: the engine's DecodeOptions, for `decode_layer_cached`."""
    if not fused:
        return model.logits(forward_cached(model, cache, tokens, index, ple_rows)[:, -1])
    inputs, run_layer, logits = (
        _compiled_parts() if fused == CompileMode.LAYERS else (step_inputs, decode_layer_cached, step_logits)
    )
    streams, per_layer, rope, masks, slots = inputs(model, cache, tokens, index, ple_rows)
    cfg = model.config
    for i, layer in enumerate(model.model.layers):
        kind, source = cfg.layer_types[i], cfg.kv_source(i)
        kv = cache.keys[source], cache.values[source]
        streams = run_layer(layer, streams, per_layer[:, :, i, :], *rope[kind], *kv, slots[kind], masks[kind], options)
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


def _strict_dynamo():
    """Past its recompile limit (8 shapes: batch sizes x cache buckets) dynamo would quietly run
    the step uncompiled, here the fused layers, eagerly slower than the model's own: make it raise,
    so the step falls back like any failed compile."""
    if not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):  # older torch: its default
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)


def cache_bucket(max_len: int, limit: int) -> int:
    """max_len rounded up to a power of two (at least 1024), capped at the context `limit`."""
    return max(max_len, min(limit, max(1024, 1 << (max_len - 1).bit_length())))


class Generator:
    """Prefill + decode for one batch of prompts against a StaticCache.

    `options` (DecodeOptions; default DecodeOptions()): how it decodes. On CUDA `step` is captured
    as a CUDA graph at its first call (`cuda_graph=False`: eager steps), compiled first as
    `options.compile` says (`compile`: what is compiled after the 4-bit and CPU exceptions, a
    CompileMode). `fused`: decode through `decode_layer_cached` (True) or that compiled per kind
    of layer (CompileMode.LAYERS) instead of the model's own layers (False); default: as compiled.
    `sample(logits, uniform)`: the next tokens (batch,) from a step's logits and one uniform number
    per row; given, each step ends with it (in the graph: no sampling kernels launched per token)
    and returns tokens. `options` may change once: a compile that fails with the decode kernels
    leaves this engine's options without them.
    """

    def __init__(
        self,
        model,
        batch: int,
        max_len: int,
        options: DecodeOptions | None = None,
        cuda_graph: bool | None = None,
        fused: bool | CompileMode | None = None,
        sample=None,
    ):
        self.model = model
        self.options = DEFAULTS if options is None else options
        if not isinstance(self.options, DecodeOptions):
            raise TypeError(f"options must be a DecodeOptions, not {type(self.options).__name__}")
        self.sample = sample
        self.device = model.device
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        compile = self.options.compile
        if compile is not CompileMode.OFF and is_4bit(model):
            # bitsandbytes' 4-bit weights are tensor subclasses torch.compile does not trace in one graph
            warnings.warn("compile: 4-bit weights decode through the uncompiled CUDA graph")
            compile = CompileMode.OFF
        self.compile = compile if self.cuda_graph else CompileMode.OFF
        if fused is None:  # compiled steps decode through the fused layers, uncompiled ones the model's own
            fused = CompileMode.LAYERS if self.compile is CompileMode.LAYERS else self.compile is CompileMode.STEP
        self.fused = fused
        if self.fused and self.options.fuse_weights:
            fused_weights.fuse(model)
        if self.compile is not CompileMode.OFF:
            max_len = cache_bucket(max_len, model.config.max_position_embeddings)
        self.cache = StaticCache(model.config, batch, max_len, self.device, model.dtype)
        self.graph = None
        self.compiled = False  # whether the captured step is the compiled one
        # where decode steps read per-layer rows on the device (None: gathered on the host)
        self.ple_table = device_view(model.model, self.device) if self.device.type == "cuda" else None
        self._ple_holder = getattr(model.model, "_mapped_ple", None)  # keeps the mapping while in use

    def _routed(self):
        """This engine's batch-1 product choice for the model's own layers, while inside."""
        return gemv.routed(self.model, self.options.gemv, self.options.pdl)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the last prompt position (batch, vocab); `ids`/`mask` are left-padded;
        `embeds` (batch, T, hidden): input embeddings with images/audio merged in."""
        with self._routed():
            return self._prefill(ids, mask, embeds)

    def _prefill(self, ids, mask, embeds):
        cache = self.cache
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache.pads.copy_((~mask).sum(-1))
        cache.valid[:, : ids.shape[1]] = mask
        hidden = None
        for start in range(0, ids.shape[1], PREFILL_CHUNK):
            chunk = ids[:, start : start + PREFILL_CHUNK]
            index = torch.arange(start, start + chunk.shape[1], device=self.device)
            chunk_embeds = None if embeds is None else embeds[:, start : start + PREFILL_CHUNK]
            hidden = forward_cached(self.model, cache, chunk, index, embeds=chunk_embeds)
        return self.model.logits(hidden[:, -1])

    @property
    def captured(self) -> bool:
        """Whether `step` replays a captured graph (and so returns without waiting for the host)."""
        return self.graph is not None

    def _step(self, tokens, ple_rows, index):
        return decode_logits(self.model, self.cache, tokens, ple_rows, index, self.fused, self.options)

    def _host_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens' per-layer rows gathered where the table lives (a host sync when on the CPU)."""
        return self.model.model.ple_rows(tokens[:, None])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, position: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits (batch, vocab) after feeding `tokens` (batch,) at cache position `position`;
        with `sample`, the next tokens (batch,) drawn from them at uniform numbers from `generator`
        (torch.rand's, so a step draws what generate.next_tokens would).

        With the per-layer rows read on the device (`ple_table`), a graph step never waits for the
        host: the caller may read earlier tokens while it runs. Its result is the graph's output
        buffer, overwritten by the next step."""
        tokens = tokens.to(self.device)
        if not self.cuda_graph:
            index = torch.tensor([position], device=self.device)
            rows = self._host_rows(tokens) if self.ple_table is None else self._device_rows(tokens[:, None])
            with self._routed():
                logits = self._step(tokens[:, None], rows.to(self.device), index)
            if self.sample is None:
                return logits
            return self.sample(logits, uniform=torch.rand(len(tokens), generator=generator, device=self.device))
        if self.graph is None:
            with self._routed():
                self._capture(tokens, position)
        self.static_tokens.copy_(tokens[:, None])
        if self.ple_table is None:
            self.static_rows.copy_(self._host_rows(tokens), non_blocking=True)
        self.static_index.fill_(position)
        if self.sample is not None:
            self.static_uniform.uniform_(generator=generator)  # = torch.rand(batch, generator=generator)
        self.graph.replay()
        return self.static_logits if self.sample is None else self.static_next

    def _device_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.model.ple_rows(tokens, table=self.ple_table)

    def _capture(self, tokens, position: int):
        """Warm up (compiling, if on) on a side stream, then capture one decode step into a CUDA
        graph (with the gather of the per-layer rows, when they are read on the device). The
        warm-up runs the real first step (writing the same K/V and bookkeeping each time), so it
        leaves the cache as that step will, also after a failed compile."""
        # Fresh buffers with default strides: compiled code is guarded on strides too (a token
        # column sliced out of a wider tensor has stride 16 where argmax's has 1: a recompile).
        self.static_tokens = torch.empty((len(tokens), 1), dtype=tokens.dtype, device=self.device)
        self.static_tokens.copy_(tokens[:, None])
        rows = self._host_rows(tokens) if self.ple_table is None else self._device_rows(self.static_tokens)
        self.static_rows = torch.empty(rows.shape, dtype=rows.dtype, device=self.device)
        self.static_rows.copy_(rows)
        self.static_index = torch.full((1,), position, device=self.device, dtype=torch.long)
        inputs = (self.model, self.cache, self.static_tokens, self.static_rows, self.static_index)
        self.static_uniform = torch.zeros(len(tokens), device=self.device)

        def run(step, args):  # (logits, the tokens sampled from them or None)
            if self.ple_table is not None:
                self.static_rows.copy_(self._device_rows(self.static_tokens))
            logits = step(*args)
            return logits, None if self.sample is None else self.sample(logits, uniform=self.static_uniform)

        step = decode_logits
        if self.compile is CompileMode.LAYERS:  # the graph runs the step uncompiled, each layer compiled
            try:
                # one graph per kind of layer, batch size and cache bucket (dynamo's default limit: 8)
                with torch._dynamo.config.patch(recompile_limit=256):
                    self._warm_up_compiled(run, step, inputs, CompileMode.LAYERS)
                self.compiled, self.fused = True, CompileMode.LAYERS
            except Exception as e:  # noqa: BLE001 - any compiler failure: decode uncompiled
                warnings.warn(
                    f"torch.compile of the decode layers failed, decoding uncompiled: {type(e).__name__}: {e}"
                )
                self.fused = False
        elif self.compile is CompileMode.STEP:
            try:
                self._warm_up_compiled(run, compiled_decode(), inputs, self.fused)
                step, self.compiled = compiled_decode(), True
            except Exception as e:  # noqa: BLE001 - any compiler failure: decode uncompiled
                warnings.warn(f"torch.compile of the decode step failed, decoding uncompiled: {type(e).__name__}: {e}")
                self.fused = False  # uncompiled, the model's own layers are faster
        args = (*inputs, self.fused, self.options)
        if not self.compiled:
            self._warm_up(run, step, args)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_logits, self.static_next = run(step, args)

    def _warm_up_compiled(self, run, step, inputs, fused):
        """Warm up (so compile) a compiled step over `inputs` and `fused`; if it fails with the
        decode kernels in it, once more without them: this engine's options lose them (the error
        may be this torch's, or this model's), the next engine tries them again."""
        probe = torch.empty(0, dtype=self.model.dtype, device=self.device)  # what the kernels ran on
        with _strict_dynamo():
            try:
                self._warm_up(run, step, (*inputs, fused, self.options))
            except Exception as e:
                if not (self.options.decode_kernels and decode_kernels.usable(probe, self.model.config)):
                    raise  # not theirs
                warnings.warn(f"the decode kernels failed to compile, compiling without them: {type(e).__name__}: {e}")
                self.options = dataclasses.replace(self.options, decode_kernels=False)
                self._warm_up(run, step, (*inputs, fused, self.options))

    @staticmethod
    def _warm_up(run, step, args):
        """Two steps (compiling, if compiled) on a side stream, as capturing a CUDA graph wants."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run(step, args)
        torch.cuda.current_stream().wait_stream(stream)
