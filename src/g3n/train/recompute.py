"""How training runs each decoder layer: gradient checkpointing (recompute in the backward pass),
optionally with the layer inputs offloaded to CPU memory, and optionally compiled.

Memory at long context is mostly what checkpointing keeps per layer: the layer's input, the four
AltUp streams (4 x hidden per token; 537 MB per layer at 32K tokens in bf16, 16 GB for E2B's 30
layers). `offload` moves each input to pinned CPU memory on a side stream while the next layers
run, and brings it back (prefetched one layer ahead) for the recompute.

`compiled` runs the two elementwise-heavy halves of a layer (AltUp prediction + norms + Laurel
before attention; residuals, MLP with its sparsity, AltUp correction and the per-layer input
after) and the attention through torch.compile. The compiled functions take the layer as an
argument, so every layer of the same kind shares one compiled graph.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.utils.checkpoint

MODES = (False, True, "offload")
BACKEND = "inductor"  # torch.compile's backend (tests use "aot_eager": the same tracing, no codegen)


def _begin(layer, streams):
    return layer.begin(streams)


def _attend(attn, normed, cos, sin, k, v, mask):
    return attn(normed, cos, sin, k, v, mask)


def _end(layer, predictions, attn, laurel, per_layer_input):
    return layer.end(predictions, attn, laurel, per_layer_input)


def _project_kv(attn, normed, cos, sin):
    return attn.project_kv(normed, cos, sin)


def _compiled():
    return _compile(BACKEND)


@functools.cache
def _compile(backend: str):
    return tuple(in_training_settings(torch.compile(f, backend=backend)) for f in (_begin, _attend, _end, _project_kv))


def in_training_settings(fn):
    """fn, called under dynamo_settings: inside a training run's (`train()` enters them once) at no
    cost, else entered around this call (nothing else in the process sees them)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _settings_depth:
            return fn(*args, **kwargs)
        with dynamo_settings():
            return fn(*args, **kwargs)

    return call


_settings_depth = 0  # how many dynamo_settings blocks are open (per process; training runs on one thread)


@contextlib.contextmanager
def dynamo_settings():
    """Dynamo's settings for training's compiled functions, set only inside this block (a training
    run, or one call of such a function outside one: entering costs about 70 us, so training
    enters it once, not around each of its hundreds of compiled calls a step):
    - a function that fails to compile runs uncompiled, with a warning (`suppress_errors`);
    - a few variants per function (sparse/dense, sliding/full, grad on/off): a higher recompile limit;
    - a function's compiled graphs are tried in the order they were made, not most recent first. A
      checkpointed region must recompute with the graph its forward ran: once a function has a static
      and a dynamic-shape graph that both accept the inputs (a 2048-token batch, then a longer one),
      the most-recent-first order could pick the other in the backward pass, and
      torch.utils.checkpoint would stop with "Recomputed values ... have different metadata"
      (pytorch/pytorch#166926; torchtitan applies the same setting)."""
    import torch._dynamo

    config = torch._dynamo.config
    patch = {"suppress_errors": True}
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            patch[name] = max(getattr(config, name), 64)
    lru = getattr(torch._C._dynamo.eval_frame, "_set_lru_cache", None)
    if hasattr(config, "cache_entry_use_lru"):  # newer torch
        patch["cache_entry_use_lru"], lru = False, None
    global _settings_depth
    with config.patch(patch):
        _settings_depth += 1
        if lru is not None:
            lru(False)  # older torch: the same, through eval_frame
        try:
            yield
        finally:
            _settings_depth -= 1
            if lru is not None:
                lru(True)


class LayerRunner:
    """How training runs the decoder layers (set as TextModel.layer_runner by `configure`):
    `checkpointing` one of MODES (False, True: recomputed in backward, "offload": and their inputs
    wait in CPU memory), `compiled`: the layer halves, attention and K/V projection through
    torch.compile."""

    def __init__(self, checkpointing: bool | str = False, compiled: bool = False):
        if checkpointing not in MODES:
            raise ValueError(f"gradient_checkpointing must be one of {MODES}, got {checkpointing!r}")
        self.checkpointing, self.compiled = checkpointing, compiled

    def run(self, model, streams, per_layer, rope: dict, kv_for, masks: dict):
        return run_layers(model, streams, per_layer, rope, kv_for, masks, self.checkpointing, self.compiled)

    def project_kv(self, attn, normed, cos, sin):
        return project_kv(attn, normed, cos, sin, self.compiled)


def configure(body, checkpointing: bool | str = False, compiled: bool = False) -> LayerRunner:
    """Run `body`'s (a TextModel's) layers the training way; returns the runner it now uses."""
    body.layer_runner = LayerRunner(checkpointing, compiled)
    return body.layer_runner


def is_compiled(body) -> bool:
    """Whether `body`'s layers (and so training's loss chunks) run compiled."""
    return getattr(body.layer_runner, "compiled", False)


def project_kv(attn, normed, cos, sin, compiled: bool = False):
    """Attention.project_kv (a layer's new K/V), compiled when `compiled`."""
    return (_compiled()[3] if compiled else _project_kv)(attn, normed, cos, sin)


def layer_forward(layer, streams, per_layer_input, cos, sin, kv_for, mask, compiled: bool = False):
    """One decoder layer, always through the module's call (so wrappers' hooks run: FSDP gathers
    the layer's shards there); `compiled` and rows past TILE_FROM tokens run through layer_body."""
    body = functools.partial(layer_body, compiled=compiled) if compiled or streams.shape[2] > TILE_FROM else None
    return layer(streams, per_layer_input, cos, sin, kv_for, mask, body=body)


def layer_body(layer, streams, per_layer_input, cos, sin, kv_for, mask, compiled: bool = False):
    """DecoderLayer.forward's work, its halves compiled when `compiled`. Past TILE_FROM tokens the
    halves before and after attention (all per-token work) run in tiles of TILE tokens, each
    checkpointed: only one tile's intermediates (MLP 4 x 16384 wide for E4B, float32 norms) exist
    at a time, at the cost of recomputing them once more."""
    begin, attend, end, _ = _compiled() if compiled else (_begin, _attend, _end, None)
    predictions, normed, laurel = _tiles(begin, layer, [(streams, 2)], (2, 1, 1))
    k, v = kv_for(layer.self_attn, normed)
    attn = attend(layer.self_attn, normed, cos, sin, k, v, mask)
    pieces = [(predictions, 2), (attn, 1), (laurel, 1), (per_layer_input, 1)]
    return _tiles(end, layer, pieces, (2,))[0]


TILE_FROM, TILE = 8192, 4096  # tokens per row


def _tiles(fn, layer, pieces: list, out_dims: tuple) -> tuple:
    """fn(layer, *tensors) over token tiles (`pieces`: (tensor, its token dim)), each tile
    checkpointed when gradients are on; outputs joined along `out_dims`."""
    length = pieces[0][0].shape[pieces[0][1]]
    if length <= TILE_FROM:
        out = fn(layer, *(t for t, _ in pieces))
        return out if isinstance(out, tuple) else (out,)
    outs = []
    for start in range(0, length, TILE):
        args = [t.narrow(dim, start, min(TILE, length - start)) for t, dim in pieces]
        out = (
            torch.utils.checkpoint.checkpoint(fn, layer, *args, use_reentrant=False)
            if torch.is_grad_enabled()
            else fn(layer, *args)
        )
        outs.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.cat([o[i] for o in outs], dim=dim) for i, dim in enumerate(out_dims))


class Offloader:
    """Pinned CPU copies of layer inputs made on a side stream (overlapping the next layers), and
    brought back in reverse order, each prefetched while the layer after it recomputes. On a CPU
    device the tensors are simply kept (the same code path, nothing to move)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.saved: list = []  # per layer input: (cpu tensor, copy-done event) or a kept tensor
        self.fetched: dict[int, tuple] = {}  # index -> (gpu tensor, ready event)

    def save(self, x: torch.Tensor) -> int:
        if self.stream is None:
            self.saved.append(x)
            return len(self.saved) - 1
        buf = _pinned(len(self.saved), x)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            buf.copy_(x, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        x.record_stream(self.stream)  # x's memory is not reused before the copy has read it
        self.saved.append((buf, done))
        return len(self.saved) - 1

    def _fetch(self, index: int) -> None:
        if index < 0 or index in self.fetched or self.saved[index] is None:
            return
        buf, done = self.saved[index]
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(done)
            x = buf.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.fetched[index] = (x, ready)

    def load(self, index: int) -> torch.Tensor:
        """The input saved at `index`, on the device; starts bringing back the one before it."""
        if self.stream is None:
            x, self.saved[index] = self.saved[index], None
            return x
        self._fetch(index)
        x, ready = self.fetched.pop(index)
        self.saved[index] = None
        torch.cuda.current_stream(self.device).wait_event(ready)
        x.record_stream(torch.cuda.current_stream(self.device))
        self._fetch(index - 1)
        return x


_PINNED: dict[int, torch.Tensor] = {}  # per offloaded layer: one pinned buffer, reused every step


def _pinned(index: int, like: torch.Tensor) -> torch.Tensor:
    """Layer `index`'s pinned CPU buffer, shaped like `like`; grown only when a longer batch comes.
    (Fresh pinned tensors per step would each be rounded up to a power of two and kept by the
    caching allocator: up to twice the memory, more with varying lengths.) Reuse is safe: every
    copy into or out of a buffer runs on the offloader's side stream, in order, and a step's
    backward has read a layer's input before the next forward overwrites it."""
    buf = _PINNED.get(index)
    if buf is None or buf.dtype != like.dtype or buf.numel() < like.numel():
        _PINNED[index] = buf = torch.empty(like.numel(), dtype=like.dtype, pin_memory=True)
    return buf[: like.numel()].view(like.shape)


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class _OffloadedLayer(torch.autograd.Function):
    """A checkpointed layer whose input waits in CPU memory for the backward pass. The K/V a
    KV-shared layer reads from its source layer are explicit inputs, so their gradients flow back."""

    @staticmethod
    def forward(ctx, layer, offloader, compiled, streams, per_layer_input, cos, sin, mask, k, v):
        ctx.layer, ctx.offloader, ctx.compiled = layer, offloader, compiled
        ctx.index = offloader.save(streams)
        ctx.rng = _rng_state(streams.device)  # LoRA dropout draws the same masks when recomputing
        ctx.save_for_backward(per_layer_input, cos, sin, mask, k, v)
        return layer_forward(layer, streams, per_layer_input, cos, sin, _kv(k, v, cos, sin, compiled), mask, compiled)

    @staticmethod
    def backward(ctx, grad):
        per_layer_input, cos, sin, mask, k, v = ctx.saved_tensors
        x = ctx.offloader.load(ctx.index).detach().requires_grad_(ctx.needs_input_grad[3])
        per_layer_input, k, v = (
            t.detach().requires_grad_(need) if t is not None else None
            for t, need in ((per_layer_input, ctx.needs_input_grad[4]), (k, ctx.needs_input_grad[8]),
                            (v, ctx.needs_input_grad[9]))
        )  # fmt: skip
        cpu_rng, device_rng = ctx.rng
        devices = [x.device] if device_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(cpu_rng)
            if device_rng is not None:
                torch.cuda.set_rng_state(device_rng, x.device)
            kv_for = _kv(k, v, cos, sin, ctx.compiled)
            out = layer_forward(ctx.layer, x, per_layer_input, cos, sin, kv_for, mask, ctx.compiled)
        torch.autograd.backward(out, grad)
        grads = [t.grad if t is not None and t.requires_grad else None for t in (x, per_layer_input, k, v)]
        return None, None, None, grads[0], grads[1], None, None, None, grads[2], grads[3]


def _kv(k, v, cos, sin, compiled):
    """kv_for inside an offloaded layer: the source's K/V for a shared layer, else its own."""
    if k is not None:
        return lambda attn, normed, new=None: (k, v)
    return lambda attn, normed, new=None: project_kv(attn, normed, cos, sin, compiled)


def run_layers(model, streams, per_layer, rope: dict, kv_for, masks: dict, checkpointing=False, compiled=False):
    """Every decoder layer of `model` (a TextModel) under a checkpointing mode (off without gradients)."""
    cfg = model.cfg
    mode = checkpointing if torch.is_grad_enabled() else False
    sources = {cfg.kv_source(i) for i, layer in enumerate(model.layers) if layer.self_attn.kv_shared}
    offloader = Offloader(streams.device) if mode == "offload" else None
    if offloader is not None and not streams.requires_grad:
        # A Function's output needs a grad-requiring input to be backpropagated at all (the
        # layers' own weights are not inputs): with frozen embeddings (LoRA), make the first one.
        streams = streams.detach().requires_grad_()
    for i, layer in enumerate(model.layers):
        kind = cfg.layer_types[i]
        cos, sin = rope[kind]
        args = (streams, per_layer[:, :, i, :], cos, sin, kv_for, masks[kind])
        if offloader is not None and i not in sources:  # a source's K/V must keep their graph
            k, v = kv_for(layer.self_attn, None) if layer.self_attn.kv_shared else (None, None)
            streams = _OffloadedLayer.apply(layer, offloader, compiled, *args[:4], masks[kind], k, v)
        elif mode:
            # Recomputing a layer calls kv_for again: a K/V-computing layer recomputes its own K/V
            # (same values), a shared layer reads the source's K/V kept from the first pass.
            streams = torch.utils.checkpoint.checkpoint(layer_forward, layer, *args, compiled, use_reentrant=False)
        else:
            streams = layer_forward(layer, *args, compiled)
    return streams
