"""The generation engine: one long-lived object per model that owns the KV cache, the captured
decode graphs and the compiled code, and serves one request after another, continuously batched.

- `Engine` keeps `slots` rows. A request (`Request`) takes a free row (or waits for one); its
  prompt is prefilled in chunks, one chunk per `step()`, between the other rows' decode steps, so
  running streams do not stall for a long prompt (chunks of decode.PREFILL_CHUNK tokens while
  other rows decode, decode.LONE_PREFILL_CHUNK while none does); then it joins the next decode
  step. A row that finishes frees its slot at once.
- Every row samples with its own settings and seed inside the step (`sampling.RowSampling`,
  `sampling.sample_rows`): the uniform numbers are a hash of the seed and the position, so a
  seeded row draws the same tokens alone, batched, or joined mid-flight.
- Per-row hooks: `Request.logit_bias` (added to the logits in the step), `Request.logprobs` (the
  chosen token's log-probability and the most likely alternatives), `Request.processor` (a Python
  callable that rewrites the row's logits before its draw: grammar masks and the like; a step with
  one runs its draws outside the graph).
- Per-row LoRA adapters (`add_adapter`, `Request.adapter`): each row's adapter index goes into the
  step, and the layers add that adapter's deltas (adapters/row_lora.py): rows of different
  adapters share one step. Caches are reused only under the adapter that made them.
- Prefix reuse: a request whose prompt starts with what a free row holds (the next turn of a chat)
  prefills only the rest. Sliding-window layers keep the last `sliding_window` positions, so a row
  is reusable up to the whole of what it holds, or up to any point while it holds no more than one
  window; otherwise it is prefilled from the start.
- Shared prefixes across rows (a system prompt many requests start with): when a new prompt
  shares at least MIN_SHARED ids with another the engine has seen, its prefill stops at the end of
  the common part and keeps a copy of the row's cache there (`decode.PrefixState`: the full
  layers' K/V of those positions and the sliding rings as they were, which is what any row needs to
  go on from that point); later requests starting with it restore the copy into their own row
  and prefill only the rest. Copies live in a least-recently-used store of `prefix_cache_mb`.
- `Generator` is the fixed-shape machinery under it: the cache (decode.py), one CUDA graph per
  number of rows a step covers (a power of two: rows sit in the lowest free slots), compiled as
  DecodeOptions.compile says. With compiling on, the cache's length is a power of two (at least
  1024) and grows when a request needs more (the graphs are captured again).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from g3n.errors import G3nError
from g3n.inference import compile_cache, decode, fused_weights
from g3n.inference.decode import PrefixState, StaticCache, cache_bucket, decode_logits, forward_cached
from g3n.inference.options import CompileMode, DecodeOptions
from g3n.inference.sampling import RowSampling, SamplingParams, candidate_cap, sample_rows
from g3n.kernels import decode as decode_kernels
from g3n.kernels import gemv
from g3n.model.ple_table import device_view
from g3n.model.quant import is_4bit


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


TOP_LOGPROBS = 20  # the most likely alternatives a step reports per row (OpenAI's top_logprobs limit)
MIN_SHARED = 16  # prompt ids two requests must share before the engine keeps a copy of their common prefix
RECENT_PROMPTS = 64  # prompts remembered to find shared prefixes in


@dataclass
class StepOut:
    """A decode step's results (the graph's output buffers: overwritten by the next step)."""

    logits: torch.Tensor  # (rows, vocab)
    tokens: torch.Tensor | None  # (rows,) drawn in the step, when it samples
    logprobs: torch.Tensor | None = None  # (rows,) of the drawn tokens, when asked
    top_ids: torch.Tensor | None = None  # (rows, TOP_LOGPROBS)
    top_logprobs: torch.Tensor | None = None


def logprob_outputs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probability of `tokens`, the TOP_LOGPROBS most likely ids, their log-probabilities),
    under the model's own distribution (the raw logits, before any sampling setting)."""
    lp = logits.float().log_softmax(-1)
    top = lp.topk(min(TOP_LOGPROBS, lp.shape[-1]), dim=-1)
    return lp.gather(-1, tokens[:, None]).squeeze(-1), top.indices, top.values


class Generator:
    """The cache and the decode step of `batch` rows, `max_len` positions a row.

    `options` (DecodeOptions; default DecodeOptions()): how it decodes. On CUDA each step shape is
    captured as a CUDA graph at its first call (`cuda_graph=False`: eager steps), compiled first
    as `options.compile` says. `fused`: decode through `decode_layer_cached` (True) or that compiled
    per kind of layer (CompileMode.LAYERS) instead of the model's own layers (False); default: as
    compiled. `sampling` (RowSampling of `batch` rows): given, each step draws every row's next
    token in the step (in the graph: no sampling kernels launched per token). `options` may change
    once: a compile that fails with the decode kernels leaves this engine's options without them.
    """

    def __init__(self, model, batch: int, max_len: int, options: DecodeOptions | None = None,
                 cuda_graph: bool | None = None, fused: bool | CompileMode | None = None,
                 sampling: RowSampling | None = None):  # fmt: skip
        self.model = model
        self.options = DecodeOptions() if options is None else options
        if not isinstance(self.options, DecodeOptions):
            raise TypeError(f"options must be a DecodeOptions, not {type(self.options).__name__}")
        self.sampling = sampling
        self.device = model.device
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        compile = self.options.compile
        if compile is not CompileMode.OFF and is_4bit(model):
            # bitsandbytes' 4-bit weights are tensor subclasses torch.compile does not trace in one graph
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
        self.graphs: dict = {}  # (rows, k_cap, logprobs) -> (graph, its inputs, its StepOut)
        self._eager: dict = {}  # without graphs: the last inputs of each step shape (for `follow`)
        self.compiled = False  # whether the captured steps are the compiled ones
        # where decode steps read per-layer rows on the device (None: gathered on the host)
        self.ple_table = device_view(model.model, self.device) if self.device.type == "cuda" else None
        self._ple_holder = getattr(model.model, "_mapped_ple", None)  # keeps the mapping while in use
        self.row_adapters = False  # whether steps apply per-row LoRA adapters (adapters/row_lora.py)

    def use_row_adapters(self) -> None:
        """From now on each row's adapter (an index; -1: none) goes into every step (captured again)."""
        self.row_adapters, self.graphs, self._eager = True, {}, {}

    @property
    def batch(self) -> int:
        return self.cache.batch

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def _routed(self):
        """This engine's batch-1 product choice for the model's own layers, while inside."""
        return gemv.routed(self.model, self.options.gemv, self.options.pdl)

    def grow(self, max_len: int) -> None:
        """Room for `max_len` positions a row, keeping what every row holds (graphs are captured again)."""
        if max_len <= self.max_len:
            return
        self._eager = {}
        if self.compile is not CompileMode.OFF:
            max_len = cache_bucket(max_len, self.model.config.max_position_embeddings)
        old, self.graphs = self.cache, {}
        self.cache = StaticCache(self.model.config, old.batch, max_len, self.device, self.model.dtype)
        for kind, index in old.slot_index.items():
            self.cache.slot_index[kind][:, : index.shape[1]] = index
        for layer in old.keys:
            for new, held in ((self.cache.keys[layer], old.keys[layer]), (self.cache.values[layer], old.values[layer])):
                new[:, :, : held.shape[2]] = held

    @torch.inference_mode()
    def prefill(self, row: int, ids, start: int = 0, embeds: torch.Tensor | None = None,
                chunk: int | None = None, adapter: int = -1) -> torch.Tensor:  # fmt: skip
        """Feed `ids` (T,) to row `row` at positions start.. (the positions before `start` are what
        the row already holds), in chunks of `chunk` tokens (default decode.PREFILL_CHUNK): the
        logits of the last position (1, vocab). `embeds` (1, T, hidden): input embeddings with
        images/audio merged in; `adapter`: the row's LoRA adapter (with row adapters in use)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(self.device)
        adapters = torch.tensor([adapter], device=self.device) if self.row_adapters else None
        view, hidden, size = self.cache.view(slice(row, row + 1)), None, chunk or decode.PREFILL_CHUNK
        with self._routed():
            for at in range(0, ids.shape[1], size):
                chunk = ids[:, at : at + size]
                index = torch.arange(start + at, start + at + chunk.shape[1], device=self.device)[None]
                chunk_embeds = None if embeds is None else embeds[:, at : at + size]
                hidden = forward_cached(self.model, view, chunk, index, embeds=chunk_embeds, adapter_ids=adapters)
        return self.model.logits(hidden[:, -1])

    @torch.inference_mode()
    def step(self, tokens, positions, live=None, k_cap: int = 64, logprobs: bool = False, adapters=None) -> StepOut:
        """Feed `tokens` (rows,) at `positions` (rows,) to the first `rows` rows (a graph per number
        of rows); `live` (rows,) bool: the rows whose caches the step writes (default all). With
        `sampling`, the step also draws each row's next token (`k_cap`: sampling.candidate_cap of
        the rows' settings), and with `logprobs`, their log-probabilities (logprob_outputs).
        `adapters` (rows,): each row's LoRA adapter, -1 none (with row adapters in use)."""
        rows = len(tokens)
        tokens = torch.as_tensor(tokens, dtype=torch.long).to(self.device)
        positions = torch.as_tensor(positions, dtype=torch.long).to(self.device)
        live = torch.ones(rows, dtype=torch.bool, device=self.device) if live is None else live.to(self.device)
        adapters = torch.full((rows,), -1) if adapters is None else torch.as_tensor(adapters, dtype=torch.long)
        adapters = adapters.to(self.device)
        key = (rows, k_cap if self.sampling is not None else None, logprobs)
        if not self.cuda_graph:
            inputs = self._eager[key] = self._inputs(tokens, positions, live, adapters)
            with self._routed():
                return self._run(inputs, key, decode_logits, self.fused)
        if key not in self.graphs:
            with self._routed():
                self._capture(key, tokens, positions, live, adapters)
        graph, inputs, out = self.graphs[key]
        inputs["tokens"].copy_(tokens[:, None])
        inputs["index"].copy_(positions[:, None])
        inputs["live"].copy_(live)
        inputs["adapters"].copy_(adapters)
        if self.ple_table is None:
            inputs["rows"].copy_(self._host_rows(tokens), non_blocking=True)
        graph.replay()
        return out

    @torch.inference_mode()
    def follow(self, tokens: torch.Tensor, key) -> StepOut:
        """The step after the last one of `key`'s graph, for the same rows, fed with `tokens`
        (rows,) on the device (what that step drew): queued without the host reading them."""
        if not self.cuda_graph:
            inputs = self._eager[key]
        else:
            graph, inputs, out = self.graphs[key]
        inputs["tokens"].copy_(tokens[:, None])
        inputs["index"].add_(inputs["live"][:, None].long())
        if self.ple_table is None:
            inputs["rows"].copy_(self._host_rows(tokens), non_blocking=True)
        if not self.cuda_graph:
            with self._routed():
                return self._run(inputs, key, decode_logits, self.fused)
        graph.replay()
        return out

    def _host_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens' per-layer rows gathered where the table lives (a host sync when on the CPU)."""
        return self.model.model.ple_rows(tokens[:, None])

    def _inputs(self, tokens, positions, live, adapters) -> dict:
        """Fresh buffers with default strides (compiled code is guarded on strides too)."""
        inputs = {"tokens": tokens[:, None].clone(), "index": positions[:, None].clone(), "live": live.clone(),
                  "adapters": adapters.clone()}  # fmt: skip
        rows = self._host_rows(tokens) if self.ple_table is None else self._device_rows(inputs["tokens"])
        inputs["rows"] = torch.empty(rows.shape, dtype=rows.dtype, device=self.device)
        inputs["rows"].copy_(rows)
        return inputs

    def _device_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.model.ple_rows(tokens, table=self.ple_table)

    def _run(self, inputs: dict, key, step, fused) -> StepOut:
        """The step over `inputs` (what a graph captures): per-layer rows, logits, draws."""
        rows, k_cap, logprobs = key
        if self.ple_table is not None:
            inputs["rows"].copy_(self._device_rows(inputs["tokens"]))
        cache = self.cache.view(slice(0, rows))
        cache.live = inputs["live"]
        adapters = inputs["adapters"] if self.row_adapters else None
        logits = step(self.model, cache, inputs["tokens"], inputs["rows"], inputs["index"], fused, self.options,
                      adapters)  # fmt: skip
        out = StepOut(logits, None)
        if self.sampling is not None:
            sampling = self.sampling.view(slice(0, rows))
            sampling.mark(inputs["tokens"][:, 0], inputs["live"])
            options = self.options
            out.tokens = sample_rows(logits, sampling, inputs["index"][:, 0] + 1, k_cap, options.sample_kernels,
                                     options.pdl)  # fmt: skip
            if logprobs:
                out.logprobs, out.top_ids, out.top_logprobs = logprob_outputs(logits, out.tokens)
        return out

    def _capture(self, key, tokens, positions, live, adapters) -> None:
        """Warm up (compiling, if on) on a side stream, then capture the step into a CUDA graph. The
        warm-up runs the real step (writing the same K/V each time), so it leaves the cache as
        that step will, also after a failed compile."""
        inputs = self._inputs(tokens, positions, live, adapters)
        step = decode_logits
        if self.compile is not CompileMode.OFF:
            cache_dir = compile_cache.use()
            before, started = compile_cache.hits(), time.perf_counter()
            _say(f"[g3n] compiling the decode step ({self.compile} mode, {key[0]} row{'s' * (key[0] > 1)} x "
                 f"{self.max_len} positions; once per shape on this machine, cached in {cache_dir})")  # fmt: skip
        if self.compile is CompileMode.LAYERS and self.fused is not False:
            try:
                # one graph per kind of layer, number of rows and cache length (dynamo's default limit: 8)
                with torch._dynamo.config.patch(recompile_limit=256):
                    self._warm_up_compiled(inputs, key, step, CompileMode.LAYERS)
                self.compiled, self.fused = True, CompileMode.LAYERS
            except Exception as e:  # noqa: BLE001 - any compiler failure: decode uncompiled
                warnings.warn(
                    f"torch.compile of the decode layers failed, decoding uncompiled: {type(e).__name__}: {e}"
                )
                self.fused, self.compile, self.compiled = False, CompileMode.OFF, False
        elif self.compile is CompileMode.STEP:
            try:
                self._warm_up_compiled(inputs, key, decode.compiled_decode(), self.fused)
                step, self.compiled = decode.compiled_decode(), True
            except Exception as e:  # noqa: BLE001 - any compiler failure: decode uncompiled
                warnings.warn(f"torch.compile of the decode step failed, decoding uncompiled: {type(e).__name__}: {e}")
                self.fused, self.compile, self.compiled = False, CompileMode.OFF, False
        if self.compiled:
            hit, miss = (now - then for now, then in zip(compile_cache.hits(), before, strict=True))
            how = "from the cache" if hit and not miss else "compiled"
            _say(f"[g3n] decode step ready in {time.perf_counter() - started:.1f}s ({how})")
        else:
            self._warm_up(lambda: self._run(inputs, key, step, self.fused))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._run(inputs, key, step, self.fused)
        self.graphs[key] = (graph, inputs, out)

    def _warm_up_compiled(self, inputs, key, step, fused):
        """Warm up (so compile) a compiled step; if it fails with the decode kernels in it, once
        more without them: this engine's options lose them (the error may be this torch's, or this
        model's), the next engine tries them again."""
        probe = torch.empty(0, dtype=self.model.dtype, device=self.device)  # what the kernels ran on
        with decode.strict_dynamo():
            try:
                self._warm_up(lambda: self._run(inputs, key, step, fused))
            except Exception as e:
                if not (self.options.decode_kernels and decode_kernels.usable(probe, self.model.config)):
                    raise  # not theirs
                warnings.warn(f"the decode kernels failed to compile, compiling without them: {type(e).__name__}: {e}")
                self.options = dataclasses.replace(self.options, decode_kernels=False)
                self._warm_up(lambda: self._run(inputs, key, step, fused))

    @staticmethod
    def _warm_up(run):
        """Two steps (compiling, if compiled) on a side stream, as capturing a CUDA graph wants."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)


@dataclass
class Request:
    """One generation: a prompt and how to continue it.

    stop_ids: tokens that end it (produced, then reported with finish "stop"); media: its images
    and audio (media.py's tensors); logit_bias: token id -> value added to its logits;
    logprobs: None, or how many alternatives (0..TOP_LOGPROBS) to report with each token's own
    log-probability; processor(tokens so far, logits (vocab,)) -> logits: a per-row hook run on
    the host before each draw; adapter: the name of a LoRA adapter added to the engine
    (Engine.add_adapter) that this request runs with, None: the base model."""

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    media: dict | None = None
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None
    adapter: str | None = None


@dataclass
class Token:
    """One new token of request `handle`; `finish` ("stop": a stop token, which is `token`;
    "length": max_new_tokens or the context reached) on its last one."""

    handle: int
    token: int
    finish: str | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass(eq=False)
class _Row:
    handle: int
    request: Request
    max_new: int
    held: list[int] = field(default_factory=list)  # the ids whose K/V the row's cache holds
    prefilled: int = 0  # prompt ids fed so far
    embeds: torch.Tensor | None = None
    next: int | None = None  # the last drawn token, fed at the next step
    produced: int = 0
    seed: int = 0
    mark: int = 0  # a prefix shared with other prompts: its cache is kept once prefilled
    adapter: int = -1  # its LoRA adapter's index in the engine's RowAdapters (-1: none)


class Engine:
    """The persistent engine of one model: `slots` rows sharing one cache and its graphs.

    add(request) -> handle; step() -> the Tokens it produced (one prefill chunk of a waiting row
    and one decode step of the running rows); cancel(handle); `busy` while anything is queued or
    running. `generate(request)` runs one request to its end. `max_len`: positions a row (default:
    grown as requests need, up to the model's context). `prefix_cache_mb`: memory for copies of
    shared prefixes' caches (0: none kept)."""

    def __init__(self, model, slots: int = 1, options: DecodeOptions | None = None, max_len: int | None = None,
                 cuda_graph: bool | None = None, prefix_cache_mb: float = 256):  # fmt: skip
        self.model, self.slots = model, slots
        self.fixed_len = max_len
        self.sampling = RowSampling(slots, model.config.vocab_size, model.device)
        start = max_len or min(self.context, 1024)
        self.gen = Generator(model, slots, start, options, cuda_graph, sampling=self.sampling)
        self.rows: list[_Row | None] = [None] * slots
        self.held: list[list[int]] = [[] for _ in range(slots)]  # what each free row's cache still holds
        self.held_adapter = [-1] * slots  # the adapter that cache was made with
        self.adapters = None  # RowAdapters, once an adapter is added
        self.waiting: collections.deque[_Row] = collections.deque()
        self._handles = itertools.count()
        self._flight: _InFlight | None = None  # a decode step queued, its tokens not read yet
        # (adapter, prefix ids) -> the cache after them, in least-recently-used order
        self.prefixes: collections.OrderedDict[tuple, PrefixState] = collections.OrderedDict()
        self.prefix_budget = int(prefix_cache_mb * 2**20)
        self.recent: collections.deque[tuple[int, list[int]]] = collections.deque(maxlen=RECENT_PROMPTS)
        self.reused_tokens = 0  # prompt ids not prefilled thanks to reuse (a row's own or a shared prefix)

    @property
    def options(self) -> DecodeOptions:
        return self.gen.options

    def add_adapter(self, name: str, adapter_dir) -> None:
        """Serve a PEFT LoRA adapter of the decoder beside the base model: requests naming it
        (`Request.adapter`) run with it, batched with rows of other adapters or none."""
        from g3n.adapters.row_lora import RowAdapters

        if self.adapters is None:
            self.adapters = RowAdapters(self.model)
        self.adapters.add(name, adapter_dir)
        self.gen.use_row_adapters()

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)  # a queued step has running rows

    def add(self, request: Request) -> int:
        """Queue `request`; a prompt that cannot fit the context is refused (naming both lengths)."""
        prompt = list(request.prompt)
        if not prompt:
            raise G3nError("every prompt needs at least one token")
        limit = self.fixed_len or self.context
        if len(prompt) >= limit:
            what = "this engine's cache" if self.fixed_len else "the model's context"
            raise G3nError(f"prompt of {len(prompt)} tokens does not fit {what} of {limit} tokens "
                           f"(at most {limit - 1} leave room for one new token)")  # fmt: skip
        if request.logprobs is not None and not 0 <= request.logprobs <= TOP_LOGPROBS:
            raise G3nError(f"logprobs must be between 0 and {TOP_LOGPROBS}, not {request.logprobs}")
        vocab = self.model.config.vocab_size
        bad = [t for t in (request.logit_bias or {}) if not 0 <= t < vocab]
        if bad:
            raise G3nError(f"logit_bias names token {bad[0]}, outside the vocabulary (0..{vocab - 1})")
        adapter = -1
        if request.adapter is not None:
            if self.adapters is None:
                raise G3nError(f"no adapter named {request.adapter!r} (none loaded)")
            adapter = self.adapters.index(request.adapter)
        p = request.params
        row = _Row(next(self._handles), request, min(p.max_new_tokens, limit - len(prompt)), adapter=adapter)
        row.seed = random.getrandbits(63) if p.seed is None else p.seed
        if row.max_new > 0:  # else it has ended already
            self.waiting.append(row)
        return row.handle

    def cancel(self, handle: int) -> None:
        """Drop a request, queued or running (its slot is free for the next step)."""
        self.waiting = collections.deque(r for r in self.waiting if r.handle != handle)
        for slot, row in enumerate(self.rows):
            if row is not None and row.handle == handle:
                self._free(slot)

    def generate(self, request: Request) -> Iterator[Token]:
        """Run `request` to its end (with whatever else is queued), yielding its tokens."""
        handle = self.add(request)
        try:
            while True:
                for t in self.step():
                    if t.handle == handle:
                        yield t
                        if t.finish:
                            return
                if not self._known(handle):
                    return
        finally:
            if self._known(handle):
                self.cancel(handle)

    def _known(self, handle: int) -> bool:
        return any(r.handle == handle for r in self.waiting) or any(
            r is not None and r.handle == handle for r in self.rows
        )

    @torch.inference_mode()
    def step(self) -> list[Token]:
        """One prefill chunk (of the first row still prefilling) and one decode step of every row
        that has a token to feed: the tokens they produced."""
        self._admit()
        out: list[Token] = []
        prefilling = [s for s, r in enumerate(self.rows) if r is not None and r.next is None]
        if prefilling:
            out += self._prefill_chunk(prefilling[0])
        flight, self._flight = self._flight, None
        if flight is not None:
            self._flight = self._follow(flight)  # queued before `flight`'s tokens are read
            out += self._collect(flight)
            if self._flight is not None:
                self._process(self._flight)
        if self._flight is None:
            decoding = [s for s, r in enumerate(self.rows) if r is not None and r.next is not None]
            if decoding:
                self._flight = self._launch(decoding)
        return out

    def _admit(self) -> None:
        """Waiting requests into free rows: the row whose cache shares the longest reusable prefix."""
        while self.waiting and None in self.rows:
            row = self.waiting.popleft()
            free = [s for s, r in enumerate(self.rows) if r is None]
            reuse = {s: self._reusable(self.held[s], row, self.held_adapter[s]) for s in free}
            slot = max(free, key=lambda s: (reuse[s], -s))
            stored = self._stored_prefix(row)
            if stored is not None and len(stored.ids) > reuse[slot]:  # into the row with the least to lose
                slot = min(free, key=lambda s: (reuse[s], s))
            self._start(slot, row, reuse[slot], stored)

    def _reusable(self, held: list[int], row: _Row, adapter: int = -1) -> int:
        """How many of the prompt's first ids the row's cache holding `held` (made with `adapter`)
        can serve (at least one id is always prefilled, for the logits of the last)."""
        if row.request.media is not None or not held or adapter != row.adapter:
            return 0
        n = _common_prefix(held, row.request.prompt[:-1])
        window = self.model.config.sliding_window
        return n if n == len(held) or len(held) <= window else 0

    def _stored_prefix(self, row: _Row) -> PrefixState | None:
        """The longest stored prefix of the prompt (short of its last id)."""
        prompt = row.request.prompt
        if row.request.media is not None:
            return None
        found = [s for (adapter, ids), s in self.prefixes.items()
                 if adapter == row.adapter and len(ids) < len(prompt) and tuple(prompt[: len(ids)]) == ids]  # fmt: skip
        return max(found, key=lambda s: len(s.ids), default=None)

    def _shared_prefix(self, row: _Row) -> int:
        """How many of the prompt's first ids (short of its last) it shares with another known
        prompt of the same adapter."""
        prompt = row.request.prompt
        others = itertools.chain(self.recent, ((r.adapter, r.request.prompt) for r in self.waiting),
                                 ((r.adapter, r.request.prompt) for r in self.rows if r is not None))  # fmt: skip
        head = prompt[:MIN_SHARED]
        best = max((_common_prefix(prompt, o) for a, o in others if a == row.adapter and o[:MIN_SHARED] == head),
                   default=0)  # fmt: skip
        return min(best, len(prompt) - 1)

    def _keep(self, slot: int, ids: list[int]) -> None:
        """Store a copy of the row's cache after `ids` (least recently used copies make room)."""
        key = (self.rows[slot].adapter, tuple(ids))
        if key in self.prefixes:
            self.prefixes.move_to_end(key)
            return
        state = self.gen.cache.snapshot(slot, ids)
        if state.nbytes > self.prefix_budget:
            return
        while sum(s.nbytes for s in self.prefixes.values()) + state.nbytes > self.prefix_budget:
            self.prefixes.popitem(last=False)
        self.prefixes[key] = state

    def _start(self, slot: int, row: _Row, reuse: int, stored: PrefixState | None = None) -> None:
        request = row.request
        need = len(request.prompt) + row.max_new
        if self.fixed_len is None and need > self.gen.max_len:
            self.gen.grow(min(self.context, need))
        if stored is not None and len(stored.ids) > reuse and self.gen.cache.restore(slot, stored):
            reuse = len(stored.ids)
            self.prefixes.move_to_end((row.adapter, stored.ids))
        else:
            self.gen.cache.keep_prefix(slot, reuse)
        self.reused_tokens += reuse
        if request.media is None and self.prefix_budget > 0:
            shared = self._shared_prefix(row)
            row.mark = shared if shared >= max(MIN_SHARED, reuse + 1) else 0
            self.recent.append((row.adapter, request.prompt))
        row.held, row.prefilled = list(request.prompt[:reuse]), reuse
        if request.media:
            ids = torch.tensor([request.prompt], device=self.model.device)
            row.embeds = self.model.embed_inputs(ids, request.media)
        self.sampling.set(slot, request.params, row.seed, request.prompt, request.logit_bias)
        self.rows[slot] = row
        self.held[slot], self.held_adapter[slot] = [], row.adapter

    def _free(self, slot: int) -> None:
        row = self.rows[slot]
        self.rows[slot] = None
        self.held[slot] = [] if row.request.media is not None else row.held

    def _prefill_chunk(self, slot: int) -> list[Token]:
        row = self.rows[slot]
        prompt = row.request.prompt
        at = row.prefilled
        decoding = any(r is not None and r.next is not None for r in self.rows)
        size = decode.PREFILL_CHUNK if decoding else decode.LONE_PREFILL_CHUNK
        if at < row.mark:  # the chunk ends where the shared prefix does
            size = min(size, row.mark - at)
        chunk = prompt[at : at + size]
        embeds = None if row.embeds is None else row.embeds[:, at : at + size]
        logits = self.gen.prefill(slot, chunk, at, embeds, size, row.adapter)
        row.prefilled += len(chunk)
        row.held += chunk
        if row.prefilled == row.mark:
            self._keep(slot, prompt[: row.mark])
        if row.prefilled < len(prompt):
            return []
        row.embeds = None
        sampling = self.sampling.view(slice(slot, slot + 1))
        position = torch.tensor([len(prompt)], device=self.model.device)
        drawn_from = logits if row.request.processor is None else self._processed([slot], logits)
        params = [row.request.params]
        tokens = sample_rows(drawn_from, sampling, position, candidate_cap(params), *self._kernels())
        out = StepOut(logits, tokens)
        if row.request.logprobs is not None:  # under the model's own distribution
            out.logprobs, out.top_ids, out.top_logprobs = logprob_outputs(logits, tokens)
        return self._emit([slot], out, [0], tokens.tolist())

    def _kernels(self) -> tuple[bool, bool]:
        return self.gen.options.sample_kernels, self.gen.options.pdl

    def _processed(self, slots: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The rows' `logits` (len(slots), vocab) rewritten by their processors; processors with
        one `batched` function (GrammarProcessor's: masks computed in parallel) take all rows at once."""
        procs = [self.rows[s].request.processor for s in slots]
        generated = [self.rows[s].held[len(self.rows[s].request.prompt) :] for s in slots]
        generated = [g + ([] if self.rows[s].next is None else [self.rows[s].next]) for g, s in zip(generated, slots)]
        logits = logits.float()
        batched = getattr(procs[0], "batched", None)
        if batched is not None and all(getattr(p, "batched", None) is batched for p in procs):
            return batched(procs, generated, logits)
        return torch.stack([p(g, row) for p, g, row in zip(procs, generated, logits, strict=True)])

    def _launch(self, decoding: list[int]) -> _InFlight:
        """Queue a decode step of the `decoding` rows (fed their last drawn tokens)."""
        rows = min(1 << max(decoding).bit_length(), self.slots)  # a power of two covering the decoding rows
        tokens, positions, adapters = [0] * rows, [0] * rows, [-1] * rows
        live = torch.zeros(rows, dtype=torch.bool)
        for s in range(rows):  # rows not decoding: their own position, their cache untouched
            row = self.rows[s]
            if row is not None:
                tokens[s], positions[s], adapters[s] = row.next or 0, len(row.held), row.adapter
            live[s] = s in decoding
        params = [self.rows[s].request.params for s in decoding]
        logprobs = any(self.rows[s].request.logprobs is not None for s in decoding)
        key = (rows, candidate_cap(params), logprobs)
        out = self.gen.step(tokens, positions, live, *key[1:], adapters=adapters)
        flight = _InFlight(decoding, [self.rows[s].handle for s in decoding], key, out, self._hooked(decoding))
        self._process(flight)  # the host holds every token these rows were fed: draw them again now
        return flight

    def _hooked(self, slots: list[int]) -> list[int]:
        return [s for s in slots if self.rows[s].request.processor is not None]

    def _process(self, flight: _InFlight) -> None:
        """Draw `flight`'s rows with a processor again, at the same random numbers, from their
        logits as the processors rewrite them (which needs every token the rows were fed on the
        host: for a queued step, once the step before it has been read)."""
        slots = [s for s in flight.pending if self.rows[s] is not None and self.rows[s].handle == flight.handle(s)]
        flight.pending = []
        if not slots:
            return
        at = torch.tensor(slots, device=self.model.device)
        logits = self._processed(slots, flight.logits[at])
        positions = torch.tensor([len(self.rows[s].held) + 1 for s in slots], device=self.model.device)
        cap = candidate_cap([self.rows[s].request.params for s in slots])
        flight.tokens[at] = sample_rows(logits, self.sampling.view(at), positions, cap, *self._kernels())
        if flight.logprobs is not None:  # of the tokens drawn now, under the model's own distribution
            flight.logprobs[at] = logprob_outputs(flight.logits[at], flight.tokens[at])[0]
        flight.send_to_host()

    def _follow(self, prev: _InFlight) -> _InFlight | None:
        """Queue the step after `prev` before its tokens reach the host (on a GPU the host then
        reads them while the step runs), when the same rows go on: nobody joined or left, and
        every row needs that step's token unless it stops. Rows with a processor are drawn again
        once `prev`'s tokens are read (Engine.step): their masks are computed while the step runs."""
        decoding = [s for s, r in enumerate(self.rows) if r is not None and r.next is not None]
        same = decoding == prev.slots and all(self.rows[s].handle == h for s, h in zip(decoding, prev.handles))
        room = all(self.rows[s].produced + 1 < self.rows[s].max_new for s in decoding)
        if not (same and room):
            return None
        out = self.gen.follow(prev.tokens, prev.key)
        return _InFlight(prev.slots, prev.handles, prev.key, out, self._hooked(prev.slots))

    def _collect(self, flight: _InFlight) -> list[Token]:
        """The tokens of a queued step, for its rows still running (one host copy)."""
        tokens = flight.host_tokens()
        kept = [i for i, (s, h) in enumerate(zip(flight.slots, flight.handles))
                if self.rows[s] is not None and self.rows[s].handle == h]  # fmt: skip
        for i in kept:
            row = self.rows[flight.slots[i]]
            row.held.append(row.next)
        slots = [flight.slots[i] for i in kept]
        return self._emit(slots, flight, slots, [tokens[i] for i in kept])

    def _emit(self, slots: list[int], out, at: list[int], tokens: list[int]) -> list[Token]:
        """Tokens for `slots` (their values `tokens`; their logprobs in `out`'s rows `at`),
        finishing rows that end."""
        want = [self.rows[s].request.logprobs is not None for s in slots]
        if any(want):
            chosen = out.logprobs[at].tolist()
            top_ids, top_lp = out.top_ids[at].tolist(), out.top_logprobs[at].tolist()
        result = []
        for i, s in enumerate(slots):
            row = self.rows[s]
            t = Token(row.handle, tokens[i])
            if want[i]:
                n = row.request.logprobs
                t.logprob, t.top = chosen[i], list(zip(top_ids[i][:n], top_lp[i][:n], strict=True))
            row.next, row.produced = tokens[i], row.produced + 1
            if tokens[i] in row.request.stop_ids:
                t.finish = "stop"
            elif row.produced >= row.max_new:
                t.finish = "length"
            if t.finish:
                self._free(s)
            result.append(t)
        return result


def _common_prefix(a: list[int], b: list[int]) -> int:
    """len of the longest common prefix (binary search over slice comparisons, which run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _InFlight:
    """A queued decode step: its rows (slots and the handles that held them), its graph key, and
    its results, snapshotted (the graph's buffers are overwritten by the next step) and on their
    way to the host."""

    def __init__(self, slots: list[int], handles: list[int], key, out: StepOut, pending: list[int]):
        self.slots, self.handles, self.key = slots, handles, key
        self.tokens = out.tokens.clone()
        self.logprobs, self.top_ids, self.top_logprobs = (
            (None, None, None) if out.logprobs is None else
            (out.logprobs.clone(), out.top_ids.clone(), out.top_logprobs.clone())
        )  # fmt: skip
        self.logits = out.logits  # a graph's buffer: read (Engine._process) before the next replay
        self.pending = pending  # rows whose processors have yet to redraw their tokens
        self.send_to_host()

    def handle(self, slot: int) -> int:
        return self.handles[self.slots.index(slot)]

    def send_to_host(self) -> None:
        """Start copying the tokens to the host (again, after a redraw)."""
        self._host, self._done = self.tokens, None
        if self.tokens.device.type == "cuda":
            self._host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self._host.copy_(self.tokens, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()

    def host_tokens(self) -> list[int]:
        if self._done is not None:
            self._done.synchronize()
        return self._host[self.slots].tolist()
