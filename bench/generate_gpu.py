"""Generation speed on a GPU: g3n's engine against transformers' generate(), random E2B/E4B weights,
bf16, prompt 512, 256 new tokens (--prompt, --new), sampling with Google's defaults, the per-layer
table in CPU memory.

Decode variants, each a DecodeOptions (inference/options.py) and Generator keywords
(inference/engine.py): `eager` (no graph), `graph` (the model's layers captured as a CUDA graph),
`compiled` (torch.compile of the whole step over the model's own layers, then the graph), `fused`
(torch.compile of the whole step over the engine's decode_layer_cached, then the graph: what
--compile step runs), `layers` (each kind of decoder layer compiled once, the step's inputs and
logits once each, all in the graph: --compile layers, here without g3n's decode kernels),
`layers-kernels` (with the Triton kernels for AltUp and attention: what --compile layers runs by
default; a row's `kernels` says whether they compiled or the step fell back to running without
them); suffixes: `-nogemv` (batch-1 products on cuBLAS instead of kernels/gemv.py), `-torchsample`
(sampling through torch.topk instead of kernels/sampling.py), `-nopdl` (g3n's kernels launched
without programmatic dependent launch). Every step samples each row in the step (the Generator's
RowSampling, inside the graph where there is one).

Timed two ways: `api` (g3n.inference.generate.generate_steps as users run it: the model's persistent
Engine, which queues each step before reading the last tokens; its engine takes DecodeOptions only,
so variants that are Generator keywords, `eager` and `compiled` on a GPU, are timed by `sync` alone)
and `sync` (--sync: the bench's own loop on a Generator, every row prefilled, then one
Generator.step per token, each token read on the host before the next step; its batch-1 run, or
with --profile every run, also profiles one decode step: kernels and GPU time, a graph replay where
the variant has a graph). Both gather the per-layer rows inside the step from the page-locked CPU
table. Before any speed counts, each variant's logits over teacher-forced steps are compared with
eager bf16 and with a float32 copy of the model: a variant passes when it is as close to float32 as
eager bf16 is (1.5x its difference + 0.05). --long SIZE...: a long prompt (--long-prompt) through
the api path. --hf: transformers' generate() on the same sizes (random weights of its own, text
vocabulary only). Extra tasks: --extra TASK:SIZE:BATCH:VARIANT (check1, api, time, long, gaps: GPU
idle time between the api path's kernels, sampler: sample_rows with the sampling kernels against
its torch.topk path, gemv: kernels/gemv.py against cuBLAS; SIZE and VARIANT are ignored by the
last two), e.g. api:E4B:1:layers. BENCH_TRACE=PREFIX writes every kernel of each profiled step, in
order, to PREFIX-<batch>-<decode kernels>-<gemv>.json.

Smoke test without a GPU: --device cpu --sizes tiny (a small random config) runs every part that
does not need CUDA (eager decoding, the checks, api, sync, --profile on CPU ops, --long, --hf); the
rest is skipped with the reason printed.

    PYTHONPATH=src python bench/generate_gpu.py [--sizes E2B E4B] [--batches 1 8]
        [--variants graph layers] [--check-variants eager graph layers] [--sync] [--profile] [--hf]
        [--hf-new 64] [--long E2B] [--long-variant graph] [--extra api:E4B:1:layers ...] [--budget-s 520]
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/generate_gpu.py --device cpu --sizes tiny \\
        --batches 1 2 --prompt 16 --new 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from functools import partial

import torch

from g3n.config import text_config_from_dict
from g3n.inference.engine import Generator
from g3n.inference.generate import generate_steps
from g3n.inference.options import DecodeOptions
from g3n.inference.sampling import RowSampling, SamplingParams, candidate_cap, sample_rows
from g3n.kernels import gemv
from g3n.kernels import sampling as sample_kernels
from g3n.model.ple_table import device_view
from g3n.model.text import Gemma3nForCausalLM, RotaryEmbedding

SIZES = {  # Gemma3nTextConfig fields over its defaults (E4B's widths)
    "E2B": {"vocab_size": 262400, "num_hidden_layers": 30, "intermediate_size": 8192, "num_kv_shared_layers": 10},
    "E4B": {"vocab_size": 262400, "num_hidden_layers": 35, "intermediate_size": 16384, "num_kv_shared_layers": 15},
    "tiny": {  # the CPU smoke test's: both kinds of attention, a sliding window the prompt passes, shared K/V
        "vocab_size": 512, "vocab_size_per_layer_input": 256, "hidden_size": 64, "hidden_size_per_layer_input": 8,
        "intermediate_size": 128, "num_hidden_layers": 10, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "sliding_window": 8, "num_kv_shared_layers": 5, "laurel_rank": 4,
        "activation_sparsity_pattern": [0.95, 0.95] + [0.0] * 8, "max_position_embeddings": 4096,
    },
}  # fmt: skip
PROMPT, NEW = 512, 256
VARIANTS = {  # Generator keywords besides the options; "compile": DecodeOptions.compile
    "eager": {"cuda_graph": False},
    "graph": {"compile": "off"},
    "compiled": {"compile": "step", "fused": False},
    "fused": {"compile": "step", "fused": True},
    "layers": {"compile": "layers"},
    "layers-kernels": {"compile": "layers"},
}
SUFFIXES = ("nopdl", "torchsample", "nogemv")
TASKS = ("check1", "api", "time", "long", "gaps", "sampler", "gemv")  # what --extra takes


def base_variant(name: str) -> str:
    return "-".join(p for p in name.split("-") if p not in SUFFIXES)


def use_variant(name: str) -> dict:
    """A variant's Generator keywords, its DecodeOptions under "options" (the decode kernels and
    the suffixes: see the module's docstring)."""
    parts = name.split("-")
    kw = dict(VARIANTS[base_variant(name)])
    kw["options"] = DecodeOptions(
        compile=kw.pop("compile", "off"),
        decode_kernels="kernels" in parts,
        gemv="nogemv" not in parts,
        sample_kernels="torchsample" not in parts,
        pdl="nopdl" not in parts,
    )
    return kw


def unsupported(task: str, variant: str | None, device: torch.device) -> str | None:
    """Why `task` cannot run `variant` on `device` (None: it can)."""
    if device.type != "cuda":
        if task in ("gemv", "sampler", "gaps"):
            return "its Triton kernels, CUDA graphs or GPU profile need CUDA"
        if variant is not None and base_variant(variant) != "eager":
            return "CUDA graphs (and torch.compile, captured in them) need CUDA"
    if task in ("api", "long", "gaps"):
        # the engine behind generate_steps builds its Generator from DecodeOptions alone: with a graph
        # on a GPU only, and `fused` as compiled
        extra = {k: v for k, v in use_variant(variant).items() if k != "options"}
        if extra not in ({}, {"cuda_graph": device.type == "cuda"}):
            return f"generate_steps takes DecodeOptions only, not Generator keywords {extra} (--sync times it)"
    return None


T0 = time.perf_counter()


def log(msg: str):
    print(f"[{time.perf_counter() - T0:5.0f}s] {msg}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device, others: int = 0) -> float | None:
    """Peak GPU memory since reset_peak, less `others` bytes (other resident models); None on a CPU."""
    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated(device) - others) / 2**30, 2)


def hf_config(size: str, **overrides):
    from transformers import Gemma3nTextConfig

    return Gemma3nTextConfig(**{**SIZES[size], **overrides})


def empty_model(cfg, dtype, device="cuda") -> Gemma3nForCausalLM:
    with torch.device("meta"):
        model = Gemma3nForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.model.rotary_emb = RotaryEmbedding(cfg).to(device)  # to_empty leaves its buffers unset
    return model


def build_g3n(size: str, device="cuda") -> Gemma3nForCausalLM:
    """Random bf16 weights on `device`, the per-layer table in CPU memory. q/k norm weights are 0.25
    so that attention scores (scaling 1.0, head_dim 256) have about unit spread: at 1.0 the softmax
    is a hard argmax, bf16 rounding decides which key wins, and eager bf16 differs from float32 by
    up to 5 in the logits (top-1 agreement 0-6%), which made the accuracy check blind (2026-11-29).
    """
    cfg = text_config_from_dict(hf_config(size).to_dict())
    model = empty_model(cfg, torch.bfloat16, device)
    table = model.model.embed_tokens_per_layer.to_empty(device="cpu").weight
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        block = torch.randn(8192, table.shape[1], generator=torch.Generator().manual_seed(0)) * 0.02
        for start in range(0, table.shape[0], 8192):  # the 2 B-entry table: one random block repeated (fast)
            table[start : start + 8192] = block[: table.shape[0] - start]
        for name, p in model.named_parameters():
            if p is table:
                continue
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(0.25)
            elif name.endswith("norm.weight") or "correct_output_scale" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02)
    return model.eval()


def float32_copy(model) -> Gemma3nForCausalLM:
    """The same weights in float32 (sharing the CPU per-layer table): the accuracy reference."""
    ref = empty_model(model.config, torch.float32, model.device)
    ref.model.embed_tokens_per_layer = model.model.embed_tokens_per_layer
    table = ref.model.embed_tokens_per_layer.weight
    src = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p is not table:
                p.copy_(src[name])
    return ref.eval()


def random_ids(model, shape, generator=None) -> torch.Tensor:
    """Random token ids of the text vocabulary (those with per-layer rows), on the CPU."""
    return torch.randint(0, model.config.vocab_size_per_layer_input, shape, generator=generator)


@torch.inference_mode()
def teacher_forced(model, kw: dict, ids, follow) -> torch.Tensor:
    """A variant's logits (steps, vocab) in float32: `ids` (T,) prefilled into row 0, then one
    decode step per token of `follow` (steps,)."""
    gen = Generator(model, 1, len(ids) + len(follow), **kw)
    gen.prefill(0, ids)
    steps = [gen.step(follow[s : s + 1], [len(ids) + s]).logits[0].float().clone() for s in range(len(follow))]
    return torch.stack(steps)


def check(model, ref, variants: list[str], steps: int = 16) -> dict[str, bool]:
    """Each variant's logits against eager bf16 and float32 (the pass rule is in the docstring)."""
    g = torch.Generator().manual_seed(0)
    ids, follow = random_ids(model, (64,), g), random_ids(model, (steps,), g)
    eager = use_variant("eager")
    exact = teacher_forced(ref, eager, ids, follow)
    base = teacher_forced(model, eager, ids, follow)
    base_err = (base - exact).abs().max().item()
    verdict = {}
    for name in variants:
        reason = unsupported("check", name, model.device)
        if reason:
            log(f"check {name}: skipped: {reason}")
            continue
        start = time.perf_counter()
        got = base if name == "eager" else teacher_forced(model, use_variant(name), ids, follow)
        err = (got - exact).abs().max().item()
        verdict[name] = err <= 1.5 * base_err + 0.05 and bool(torch.isfinite(got).all())
        top1 = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
        mean = (got - exact).abs().mean().item()
        log(
            f"check {name}: max|d| vs eager bf16 {(got - base).abs().max().item():.4f}, vs float32 {err:.4f} "
            f"(eager bf16 vs float32 {base_err:.4f}), mean|d| vs float32 {mean:.4f} (eager bf16 "
            f"{(base - exact).abs().mean().item():.4f}), top-1 = float32's {top1:.0%}, "
            f"{'PASS' if verdict[name] else 'FAIL'} ({time.perf_counter() - start:.0f}s incl. compile)"
        )
    return verdict


def profile_step(gen, tokens, positions, tag: str) -> dict:
    """Kernels and GPU time of one decode step with its sampling (`tokens` at `positions`), as the
    step runs: a replay of its graph where it has one. On a CPU: its ops and their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = gen.device.type == "cuda"
    synchronize(gen.device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        gen.step(tokens, positions)
        synchronize(gen.device)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = sorted((e for e in prof.events() if e.device_type == kind), key=lambda e: e.time_range.start)
    kernels = [(e.name, e.time_range.elapsed_us() if cuda else e.self_cpu_time_total) for e in events]
    by_name: dict[str, list[float]] = {}
    for name, us in kernels:
        by_name.setdefault(name[:60], []).append(us)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:8]
    if os.environ.get("BENCH_TRACE"):  # every kernel of the step in order: (name, us), to BENCH_TRACE-tag.json
        with open(f"{os.environ['BENCH_TRACE']}-{tag}.json", "w") as f:
            json.dump([(name, round(us, 2)) for name, us in kernels], f)
    return {
        "kernels" if cuda else "ops": len(kernels),
        "gpu_ms" if cuda else "cpu_ms": round(sum(us for _, us in kernels) / 1000, 2),
        "top": [(n, len(v), round(sum(v) / 1000, 3)) for n, v in top],
    }


def replay_ms(gen, key, n: int = 50) -> float:
    """GPU time of one replay of `key`'s graph (the whole step: row gather, layers, logits, draws),
    back to back (the same step again: it writes the same K/V)."""
    graph = gen.graphs[key][0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / n, 3)


@torch.inference_mode()
def run_api(model, batch: int, variant: str, prompt: int, new: int, others: int = 0) -> dict:
    """generate_steps as users run it (a warm-up request first, so compiling is not counted):
    time to the first token, the first decode step (graph capture), then tokens/s over the rest."""
    options = use_variant(variant)["options"]
    params = SamplingParams(max_new_tokens=new)
    prompts = random_ids(model, (batch, prompt)).tolist()
    device, out = model.device, {}
    for _attempt in ("warm-up", "timed"):
        synchronize(device)
        reset_peak(device)
        stamps = [time.perf_counter()]
        for _ in generate_steps(model, prompts, params, options=options):
            stamps.append(time.perf_counter())
        out.setdefault("first_step_s", round(stamps[2] - stamps[1], 2))
    out.update(tok_s=round(batch * (new - 2) / (stamps[-1] - stamps[2]), 1), ttft_s=round(stamps[1] - stamps[0], 3),
               peak_gib=peak_gib(device, others))  # fmt: skip
    return out


@torch.inference_mode()
def run_sync(model, batch: int, kw: dict, prompt: int, new: int, profile=False, others: int = 0) -> dict:
    """tokens/s of a Generator with each token read on the host before the next step (`sync`), time
    to first token (every row prefilled, the first tokens drawn), peak GPU memory less `others`
    (bytes of other resident models), GPU ms per replay (the step and its sampling); `profile`:
    one more step profiled (profile_step)."""
    device, options = model.device, kw["options"]
    params = SamplingParams()
    k_cap = candidate_cap([params] * batch)
    key = (batch, k_cap, False)  # the graph a step without logprobs replays
    prompts = random_ids(model, (batch, prompt))
    out = {}
    gen = None
    for _attempt in ("warm-up", "timed"):
        del gen  # its cache and graph memory must not count in the next peak
        synchronize(device)
        reset_peak(device)
        sampling = RowSampling(batch, model.config.vocab_size, device)
        for row in range(batch):
            sampling.set(row, params, seed=row, sequence=prompts[row].tolist())
        gen = Generator(model, batch, prompt + new, **kw, sampling=sampling)
        start = time.perf_counter()
        logits = torch.cat([gen.prefill(row, prompts[row]) for row in range(batch)])
        positions = torch.full((batch,), prompt, device=device)  # where the drawn tokens go
        tokens = sample_rows(logits, sampling, positions, k_cap, options.sample_kernels, options.pdl)
        tokens.tolist()
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        step = gen.step(tokens, positions, k_cap=k_cap)  # compiles (first time) and captures the graph
        step.tokens.tolist()
        out.setdefault("first_step_s", round(time.perf_counter() - start, 2))
        start = time.perf_counter()
        for s in range(1, new - 1):
            step = gen.step(step.tokens, [prompt + s] * batch, k_cap=k_cap)
            step.tokens.tolist()
        decode = time.perf_counter() - start
    out.update(tok_s=round(batch * (new - 2) / decode, 1), ttft_s=round(ttft, 3), peak_gib=peak_gib(device, others),
               compiled=gen.compiled, kernels=gen.options.decode_kernels and gen.compiled)  # fmt: skip
    if gen.cuda_graph:
        out["replay_ms"] = replay_ms(gen, key)
    if profile:  # the last position the cache has room for
        tag = f"{batch}-{gen.options.decode_kernels}-{gen.options.gemv}"
        out["profile"] = profile_step(gen, step.tokens, [prompt + new - 1] * batch, tag)
    return out


def _graph_us(fn, inputs, replays: int = 5) -> float:
    """GPU us per call of fn(x), captured in a CUDA graph over `inputs` in turn, back to back
    (warmed up on a side stream first, as capturing wants)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(inputs[0])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x in inputs:
            fn(x)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) * 1000 / (replays * len(inputs)), 2)


@torch.inference_mode()
def sampler(batch: int, vocab: int = 262400, draws: int = 64) -> dict:
    """sample_rows (each row's settings and seed, as a decode step draws) with the sampling kernels
    against its torch.topk path: tokens drawn at the same positions (so the same uniform numbers;
    random float32 logits, no ties), and GPU us per call of each, captured in a CUDA graph as the
    decode step runs them."""
    params = SamplingParams()
    rows = RowSampling(batch, vocab, "cuda")
    for row in range(batch):
        rows.set(row, params, seed=row, sequence=[])
    k_cap = candidate_cap([params] * batch)
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(batch, vocab, device="cuda", generator=g) * 4
    same = 0
    for at in range(draws):
        positions = torch.full((batch,), at, device="cuda")
        fast = sample_rows(logits, rows, positions, k_cap, kernels=True)
        same += int((fast == sample_rows(logits, rows, positions, k_cap, kernels=False)).sum())
    out = {"batch": batch, "same_tokens": f"{same}/{draws * batch}"}
    positions = torch.zeros(batch, dtype=torch.long, device="cuda")
    for name, kernels in (("kernels_us", True), ("torch_us", False)):
        sample = partial(sample_rows, logits, rows, k_cap=k_cap, kernels=kernels)
        out[name] = round(_graph_us(lambda p, sample=sample: sample(positions=p), [positions], replays=100), 1)
    return out


GEMV_SHAPES = {  # (N, K) of batch-1 products in a decode step
    "qkv+laurel E2B": (3136, 2048), "o_proj": (2048, 2048), "gate/up E2B": (16384, 2048),
    "down E2B": (2048, 8192), "gate/up E4B": (32768, 2048), "down E4B": (2048, 16384),
    "ple gate": (256, 2048), "ple proj": (2048, 256), "altup x3": (6144, 2048),
}  # fmt: skip


@torch.inference_mode()
def gemv_sweep(configs=None) -> list[dict]:
    """kernels/gemv.py's kernel against cuBLAS (F.linear) for each shape: us per product in a CUDA
    graph, cycling through copies of the weight that together exceed the L2 cache (as in a step,
    where each weight is read once); the best kernel configuration and its max |error| against a
    float32 product."""
    configs = configs or [(bn, bk, nw) for bn in (4, 8, 16) for bk in (512, 1024) for nw in (4, 8)]
    rows = []
    for name, (n, k) in GEMV_SHAPES.items():
        copies = max(4, (256 << 20) // (n * k * 2))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        exact = x.float() @ weights[0].float().T
        row = {"shape": name, "cublas_us": _graph_us(partial(torch.nn.functional.linear, x), weights)}
        best = None
        for bn, bk, nw in configs:
            chosen = (bn, min(k, bk), nw)
            us = _graph_us(lambda w, c=chosen, x=x: gemv.gemv(x, w, *c), weights)
            if best is None or us < best[0]:
                best = (us, chosen)
        err = (gemv.gemv(x, weights[0], *best[1]).float() - exact).abs().max().item()
        cublas_err = (torch.nn.functional.linear(x, weights[0]).float() - exact).abs().max().item()
        row.update(kernel_us=best[0], config=best[1], default_us=_graph_us(partial(gemv.gemv, x), weights),
                   max_err=round(err, 4), cublas_err=round(cublas_err, 4))  # fmt: skip
        log("gemv: " + json.dumps(row))
        rows.append(row)
    return rows


@torch.inference_mode()
def api_gaps(model, batch: int, variant: str, prompt: int, new: int = 64) -> dict:
    """Where the GPU waits in `generate_steps` (after a warm-up request): a profiled request's
    GPU busy and idle time per decode step, and its longest idle gaps with the kernels around
    them (what replay_ms, the graph alone back to back, does not show)."""
    from torch.profiler import ProfilerActivity, profile

    options = use_variant(variant)["options"]
    params = SamplingParams(max_new_tokens=new)
    prompts = random_ids(model, (batch, prompt)).tolist()
    for _ in generate_steps(model, prompts, params, options=options):
        pass
    torch.cuda.synchronize()
    prof = profile(activities=[ProfilerActivity.CUDA])
    for n, _ in enumerate(generate_steps(model, prompts, params, options=options)):
        if n == 8:  # past prefill and the first steps
            torch.cuda.synchronize()
            prof.start()
    torch.cuda.synchronize()
    prof.stop()
    steps = n - 8
    kernels = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    gaps, busy, end = [], 0.0, kernels[0].time_range.start
    for before, e in zip([None, *kernels], kernels):
        start, stop = e.time_range.start, e.time_range.end
        if start > end:
            gaps.append((start - end, before.name[:40] if before else "", e.name[:40]))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - kernels[0].time_range.start
    gaps.sort(reverse=True)
    return {
        "steps": steps,
        "busy_us_per_step": round(busy / steps, 1),
        "idle_us_per_step": round((span - busy) / steps, 1),
        "kernels_per_step": round(len(kernels) / steps, 1),
        "idle_in_gaps_over_3us_per_step": round(sum(g for g, _, _ in gaps if g > 3) / steps, 1),
        "top_gaps_us": [(round(g, 1), a, b) for g, a, b in gaps[:6]],
    }


def run_hf(size: str, batch: int, prompt: int, new: int, device: torch.device) -> dict:
    """transformers' generate() with sampling (Google's settings), SDPA, bf16, random weights of its
    own; the text vocabulary only (262144 at E2B/E4B, as ../shared/bench/hf_generate.py)."""
    from transformers import Gemma3nForCausalLM as HF

    cfg = hf_config(size)
    cfg = hf_config(size, vocab_size=cfg.vocab_size_per_layer_input)
    cfg._attn_implementation = "sdpa"
    with device:
        m = HF(cfg)
    m = m.to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": True, "top_k": 64, "top_p": 0.95,
          "temperature": 1.0}  # fmt: skip
    m.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    m.generate(ids, **kw)
    synchronize(device)
    seconds = time.perf_counter() - start
    out = {"tok_s": round(batch * new / seconds, 1), "peak_gib": peak_gib(device)}
    del m
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def set_inductor(settings: list[str]) -> None:
    """KEY=VALUE pairs (ints, floats or words) set on torch._inductor.config; dotted keys reach
    its sub-configs (triton.cudagraphs=0)."""
    from torch._inductor import config

    for item in settings:
        key, _, text = item.partition("=")
        value = {"true": True, "false": False}.get(text.lower(), text)
        if isinstance(value, str):
            try:
                value = int(text)
            except ValueError:
                with contextlib.suppress(ValueError):
                    value = float(text)
        *path, name = key.split(".")
        target = config
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, name):
            raise SystemExit(f"--inductor: torch._inductor.config has no {key!r}")
        if isinstance(getattr(target, name), bool):
            value = bool(value)
        setattr(target, name, value)
        log(f"inductor: {key} = {value!r}")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (or cuda:N), or cpu for a smoke test (with --sizes tiny)")
    ap.add_argument("--sizes", nargs="+", default=["E2B", "E4B"], choices=list(SIZES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt", type=int, default=PROMPT, help="prompt tokens of the timed requests")
    ap.add_argument("--new", type=int, default=NEW, help="new tokens of the timed requests (at least 3)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="timed at batch 1 (larger batches: the last); default layers (eager on a CPU)")  # fmt: skip
    ap.add_argument("--check-variants", nargs="+", default=["eager", "graph", "layers"])
    ap.add_argument("--sync", action="store_true", help="also time the last variant with the host-synced loop")
    ap.add_argument("--profile", action="store_true",
                    help="profile a decode step in every sync timing (without it: batch 1's only)")  # fmt: skip
    ap.add_argument("--hf", action="store_true", help="also time transformers generate()")
    ap.add_argument("--hf-new", type=int, default=None, help="new tokens for transformers (it is slow; default --new)")
    ap.add_argument("--hf-batches", nargs="+", type=int, default=None)
    ap.add_argument("--long", nargs="*", default=[], help="sizes for the long-context run (prompt --long-prompt)")
    ap.add_argument("--long-prompt", type=int, default=30_000)
    ap.add_argument("--long-variant", default=None, help="default: the last of --variants")
    ap.add_argument("--extra", nargs="*", default=[], help=f"more tasks, TASK:SIZE:BATCH:VARIANT ({', '.join(TASKS)})")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what starts after this many seconds")
    ap.add_argument("--wait-for", default=None, help="before the first timing, wait (up to 150 s) for this file")
    ap.add_argument(
        "--inductor", nargs="*", default=[], metavar="KEY=VALUE",
        help="torch._inductor.config settings for every compile of the run, e.g. combo_kernels=1",
    )  # fmt: skip
    args = ap.parse_args()
    args.device = torch.device(args.device)
    args.variants = args.variants or ["layers" if args.device.type == "cuda" else "eager"]
    args.long_variant = args.long_variant or args.variants[-1]
    args.hf_new = args.hf_new or args.new
    if args.new < 3:
        ap.error("--new must be at least 3 (the first token and the first step are not in tokens/s)")
    extra = [x.split(":") for x in args.extra]
    for x, parts in zip(args.extra, extra):
        if len(parts) != 4 or parts[0] not in TASKS or not parts[2].isdigit():
            ap.error(f"--extra {x}: not TASK:SIZE:BATCH:VARIANT with TASK one of {', '.join(TASKS)}")
    args.extra = [(t, size, int(b), v) for t, size, b, v in extra]
    named = args.variants + args.check_variants + [args.long_variant]
    named += [v for t, _, _, v in args.extra if t not in ("gemv", "sampler")]
    for v in named:
        if base_variant(v) not in VARIANTS:
            ap.error(f"unknown variant {v!r}: one of {', '.join(VARIANTS)}, with suffixes -{', -'.join(SUFFIXES)}")
    for size in args.long + [s for t, s, _, _ in args.extra if t not in ("gemv", "sampler")]:
        if size not in SIZES:
            ap.error(f"unknown size {size!r}: one of {', '.join(SIZES)}")
    return args


def main() -> int:
    args = parse_args()
    device = args.device
    set_inductor(args.inductor)
    log(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}")
    # Most important first: checks and batch 1 of every size, then larger batches, then long context.
    plan = []
    last = args.variants[-1]
    for size in args.sizes:
        plan += [("check", size, 1, None)] + [("api", size, 1, v) for v in args.variants]
        plan += [("time", size, 1, last)] if args.sync else []
    plan += [("api", size, b, last) for size in args.sizes for b in args.batches if b != 1]
    plan += [("long", size, 1, args.long_variant) for size in args.long]
    plan += args.extra
    if args.hf:
        plan += [("hf", size, b, None) for size in args.sizes for b in (args.hf_batches or args.batches)]
    models, verdicts, rows, long_rows = {}, {}, [], []
    for task, size, batch, variant in plan:
        if time.perf_counter() - T0 > args.budget_s:
            log(f"skipped (over budget): {task} {size} batch {batch} {variant or ''}")
            continue
        reason = unsupported(task, variant if task not in ("gemv", "sampler") else None, device)
        if reason:
            log(f"skipped: {task} {size} batch {batch} {variant or ''}: {reason}")
            continue
        if args.wait_for and not task.startswith("check"):  # e.g. tests running beside the compile: not during timings
            waited = time.perf_counter()
            while not os.path.exists(args.wait_for) and time.perf_counter() - waited < 150:
                time.sleep(1)
            log(f"waited {time.perf_counter() - waited:.0f} s for {args.wait_for}")
            args.wait_for = None
        if task == "sampler":
            for block in (1024, 2048, 4096):  # vocabulary entries per program of the first stage
                sample_kernels.BLOCK = block
                log(f"sampler, BLOCK {block}: " + json.dumps(sampler(batch)))
            sample_kernels.BLOCK = 2048
            continue
        if task == "gemv":
            gemv_sweep()
            continue
        if task == "hf":
            models.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            r = run_hf(size, batch, args.prompt, args.hf_new, device)
            rows.append({"size": size, "batch": batch, "engine": "transformers", **r})
            log(json.dumps(rows[-1]))
            continue
        if size not in models:
            start = time.perf_counter()
            models[size] = build_g3n(size, device)
            log(f"[{size}] built ({time.perf_counter() - start:.1f} s)")
            if device.type == "cuda":
                start = time.perf_counter()
                mapped = device_view(models[size].model, models[size].device)
                log(f"[{size}] per-layer table mapped for the GPU: {mapped is not None} "
                    f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
        model = models[size]
        others = sum(p.numel() * p.element_size() for m in models.values() if m is not model
                     for p in m.parameters() if p.is_cuda)  # fmt: skip
        if task in ("check", "check1"):  # check1: the one variant named (with eager as reference)
            ref = float32_copy(model)
            verdicts.setdefault(size, {}).update(
                check(model, ref, args.check_variants if task == "check" else [variant])
            )
            del ref
            if device.type == "cuda":
                torch.cuda.empty_cache()
        elif not verdicts.get(size, {}).get(variant, True):
            log(f"skipped (failed its check): {task} {size} {variant}")
        elif task == "time":
            rows.append({"size": size, "batch": batch, "engine": f"g3n {variant} sync"})
            r = run_sync(model, batch, use_variant(variant), args.prompt, args.new, args.profile or batch == 1, others)
            rows[-1].update(r)
            log(json.dumps(rows[-1]))
        elif task == "gaps":
            log(f"[{size}] gaps {variant}: " + json.dumps(api_gaps(model, batch, variant, args.prompt)))
        elif task == "api":
            rows.append({"size": size, "batch": batch, "engine": f"g3n {variant} api"})
            rows[-1].update(run_api(model, batch, variant, args.prompt, args.new, others))
            log(json.dumps(rows[-1]))
        else:  # long
            r = run_api(model, 1, variant, args.long_prompt, 64, others)
            long_rows.append({"size": size, "prompt": args.long_prompt, "new": 64, "variant": variant, **r})
            log(json.dumps(long_rows[-1]))

    def cell(value):
        return "" if value is None else value

    print("| size | batch | engine | tokens/s | time to first token (s) | first step (s, compile + capture) "
          "| peak GPU GiB | GPU ms / replay |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['batch']} | {r['engine']} | {r['tok_s']} | {cell(r.get('ttft_s'))} "
              f"| {cell(r.get('first_step_s'))} | {cell(r['peak_gib'])} | {cell(r.get('replay_ms'))} |")  # fmt: skip
    for r in long_rows:
        print(f"long context {r['size']} ({r['variant']}): prompt {r['prompt']}, {r['new']} new: time to first token "
              f"{r['ttft_s']} s, {r['tok_s']} tokens/s, peak GPU {cell(r['peak_gib'])} GiB, "
              f"first step {r['first_step_s']} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
