"""The generation engine: a preallocated KV cache, chunked prefill and a fixed-shape decode step
that a CUDA graph can replay.

- Full-attention layers own `max_len` slots; sliding layers a ring of `sliding_window` slots;
  KV-shared layers nothing (they read their source layer's buffers). Which position each slot
  holds lives in a tensor (`slot_index`), so a decode step has the same shapes at every position.
- Prefill runs the prompt in chunks; a sliding layer attends to its ring plus the chunk, then keeps
  the chunk's last `sliding_window` positions.
- On CUDA the decode step is captured once as a CUDA graph (inputs copied into static buffers,
  then replayed): at batch 1 the model is bound by kernel launches, which the graph removes. The
  per-layer embedding rows of the new tokens are gathered outside the graph, wherever the table
  lives (it can stay in CPU memory).
"""

from __future__ import annotations

import torch

from .config import FULL, SLIDING, TextConfig
from .model.text import build_mask

PREFILL_CHUNK = 1024


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


def forward_cached(model, cache: StaticCache, ids: torch.Tensor, index: torch.Tensor, ple_rows=None, embeds=None):
    """Hidden states of `ids` (batch, T) at cache positions `index` (T,), written into `cache`.

    T == 1 is the decode step (fixed shapes; `index` a device tensor); T > 1 a prefill chunk.
    `embeds`: the chunk's input embeddings when images/audio are merged in.
    """
    cfg, body = model.config, model.model
    decode = ids.shape[1] == 1
    if decode:  # generated tokens are real in every row (prefill sets validity from the mask)
        cache.valid.index_fill_(1, index, True)
    positions = (index[None, :] - cache.pads[:, None]).clamp(min=0)
    streams, per_layer = body.embed_streams(ids, ple_rows, embeds)
    rope = {kind: body.rotary_emb(positions, kind, streams.dtype) for kind in cache.size}
    masks, keys_of = {}, {}
    for kind, size in cache.size.items():
        window = cfg.sliding_window if kind == SLIDING else None
        slots = index % size
        if decode or kind == FULL:  # write first, then attend to the whole buffer
            cache.slot_index[kind].index_copy_(0, slots, index)
            keys_of[kind] = cache.slot_index[kind]
        else:  # a prefill chunk on a ring: attend to the ring as it was plus the chunk
            keys_of[kind] = torch.cat([cache.slot_index[kind], index])
        masks[kind] = build_mask(index, keys_of[kind], cache.key_valid(kind, keys_of[kind]), window)

    produced = {}

    def kv_for(attn, normed):
        layer = attn.layer
        if attn.kv_shared:
            return produced[cfg.kv_source(layer)]
        kind = cfg.layer_types[layer]
        cos, sin = rope[kind]
        k, v = attn.project_kv(normed, cos, sin)
        kbuf, vbuf = cache.keys[layer], cache.values[layer]
        size = cache.size[kind]
        if decode or kind == FULL:
            kbuf.index_copy_(2, index % size, k)
            vbuf.index_copy_(2, index % size, v)
            produced[layer] = (kbuf, vbuf)
        else:
            produced[layer] = (torch.cat([kbuf, k], dim=2), torch.cat([vbuf, v], dim=2))
            keep = min(size, k.shape[2])  # the chunk's last positions stay in the ring
            kbuf.index_copy_(2, index[-keep:] % size, k[:, :, -keep:])
            vbuf.index_copy_(2, index[-keep:] % size, v[:, :, -keep:])
        return produced[layer]

    streams = body.run_layers(streams, per_layer, rope, kv_for, masks)
    if not decode:
        size = cache.size[SLIDING]
        keep = index[-min(size, len(index)) :]
        cache.slot_index[SLIDING].index_copy_(0, keep % size, keep)
    return body.final_hidden(streams)


class Generator:
    """Prefill + decode for one batch of prompts against a StaticCache; `step` is graph-captured
    on CUDA after its first call (set `cuda_graph=False` to run eagerly)."""

    def __init__(self, model, batch: int, max_len: int, cuda_graph: bool | None = None):
        self.model = model
        self.device = model.device
        self.cache = StaticCache(model.config, batch, max_len, self.device, model.dtype)
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        self.graph = None

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the last prompt position (batch, vocab); `ids`/`mask` are left-padded;
        `embeds` (batch, T, hidden): input embeddings with images/audio merged in."""
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

    def _step(self, tokens, ple_rows, index):
        return self.model.logits(forward_cached(self.model, self.cache, tokens, index, ple_rows)[:, -1])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (batch, vocab) after feeding `tokens` (batch,) at cache position `position`."""
        body = self.model.model
        tokens = tokens.to(self.device)
        ple_rows = body.ple_rows(tokens[:, None].cpu() if self._ple_on_cpu else tokens[:, None])
        if not self.cuda_graph:
            index = torch.tensor([position], device=self.device)
            return self._step(tokens[:, None], ple_rows.to(self.device), index)
        if self.graph is None:
            self._capture(tokens, ple_rows, position)
        self.static_tokens.copy_(tokens[:, None])
        self.static_rows.copy_(ple_rows, non_blocking=True)
        self.static_index.fill_(position)
        self.graph.replay()
        return self.static_logits

    @property
    def _ple_on_cpu(self) -> bool:
        return self.model.model.embed_tokens_per_layer.weight.device.type == "cpu"

    def _capture(self, tokens, ple_rows, position: int):
        """Warm up on a side stream, then capture one decode step into a CUDA graph. The warm-up
        runs the real first step (writing the same K/V and bookkeeping each time), so it leaves the
        cache as that step will."""
        self.static_tokens = tokens[:, None].clone()
        self.static_rows = ple_rows.to(self.device).clone()
        self.static_index = torch.full((1,), position, device=self.device, dtype=torch.long)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(self.static_tokens, self.static_rows, self.static_index)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_logits = self._step(self.static_tokens, self.static_rows, self.static_index)
