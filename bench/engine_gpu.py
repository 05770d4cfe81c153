"""The engine as users run it, on a GPU: `g3n.generate` / `generate_steps` with default settings,
random E2B/E4B weights (bf16, the per-layer table in CPU memory, as `g3n generate` loads it),
against the same calls with `DecodeOptions(compile="off")`, in one process.

Rows: batch 1, prompt 512, 256 new tokens (first call: compile or cache load included; second
call, another prompt: time to first token and decode tokens/s); an 8,192-token prompt's time to
first token; batch 8 through one engine (8 prompts in one `generate_steps`); peak GPU memory of
each. Every timed call has prompts of its own (a prompt seen before would reuse its cache).

    PYTHONPATH=src python bench/engine_gpu.py [--sizes E2B E4B] [--variants default off]

Diagnostics: `--chunks 512 2048 8192` times the long prompt per prefill chunk size; `--profile N`
profiles N batch-1 decode steps (GPU busy time and kernels a step, the top kernels);
`--second-process` then times a new process's first call (the compile cache's hit), with dynamo's
own compile times; `--adapters N` times batch 8 with N random LoRA adapters (r 16 on the seven
projections) served per row (adapters/row_lora.py), rows spread over them, against batch 8 on
the base model; `--grammar` times batch 1 and 8 with every row under a JSON schema's grammar
(a synthetic vocabulary of the model's size: no tokenizer on the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from generate_gpu import build_g3n

from g3n.inference import decode
from g3n.inference.engine import Engine, Request
from g3n.inference.generate import generate_steps
from g3n.inference.options import DecodeOptions
from g3n.inference.sampling import SamplingParams

VARIANTS = {"default": DecodeOptions(), "off": DecodeOptions(compile="off")}


def timed(model, prompts, new: int, options) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    stamps = [time.perf_counter()]
    for _ in generate_steps(model, prompts, SamplingParams(max_new_tokens=new), options=options):
        stamps.append(time.perf_counter())
    out = {"ttft_s": round(stamps[1] - stamps[0], 3), "total_s": round(stamps[-1] - stamps[0], 2),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}  # fmt: skip
    if len(stamps) > 3:
        out["tok_s"] = round(len(prompts) * (len(stamps) - 3) / (stamps[-1] - stamps[2]), 1)
    return out


def random_adapter(model, out: Path, seed: int, rank: int = 16) -> Path:
    """A PEFT LoRA adapter of the decoder's seven projections with random A and B."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            out_features, in_features = module.weight.shape
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=g) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}))
    return out


def adapters_row(model, prompts, n: int) -> dict:
    """Batch 8 through one engine whose rows use `n` adapters in turn, and the same on the base."""
    out = {}
    for label, count in (("base", 0), (f"{n} adapters", n)):
        engine = Engine(model, len(prompts))
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(count):
                engine.add_adapter(f"a{i}", random_adapter(model, Path(tmp) / f"a{i}", i))
        names = [f"a{i % count}" if count else None for i in range(len(prompts))]
        for new in (16, 256):  # warm-up (captures), then timed
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for p, name in zip(prompts, names, strict=True):
                engine.add(Request(p[:-new] if new == 16 else p, SamplingParams(max_new_tokens=new), adapter=name))
            start, produced = time.perf_counter(), 0
            while engine.busy:
                produced += len(engine.step())
        out[label] = {"tok_s": round(produced / (time.perf_counter() - start), 1),  # prefills included
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}  # fmt: skip
    return out


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
          "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "age", "tags"]}  # fmt: skip


def synthetic_vocabulary(size: int):
    """llguidance's view of a `size`-token vocabulary shaped like Gemma's (the 256 bytes, then
    pieces of 1-8 printable characters, a quarter with a leading space): the mask's cost without a
    real tokenizer on the GPU machine. Id 1 ends a reply."""
    import random

    import llguidance as llg

    from g3n.inference.grammar import Vocabulary

    rng, chars = random.Random(0), [chr(c) for c in range(33, 127)]
    tokens = [b"\xff<pad>", b"\xff<eos>"] + [bytes([b]) for b in range(256)]
    while len(tokens) < size:
        text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 8)))
        tokens.append((" " * (rng.random() < 0.25) + text).encode())

    class Pieces:
        eos_token_id, bos_token_id, special_token_ids = 1, None, [0, 1]

        def __init__(self):
            self.tokens = tokens

        def __call__(self, data: bytes) -> list[int]:
            return [2 + b for b in data]

    lltok = llg.LLTokenizer(llg.TokenizerWrapper(Pieces()), n_vocab=size, eos_token=[1])
    return Vocabulary(lltok, {b: 2 + b for b in range(256)})


def grammar_row(model, prompts) -> dict:
    """Batch 1 and batch 8 with every row under a JSON schema's grammar (GrammarProcessor, the
    server's response_format path) against the same rows without."""
    from g3n.inference.grammar import GrammarProcessor, json_grammar

    vocab, grammar, out = synthetic_vocabulary(model.config.vocab_size), json_grammar(PERSON), {}
    for rows in (1, len(prompts)):
        for label in ("plain", "json schema"):
            engine = Engine(model, rows)
            for new in (16, 256):  # warm-up (captures), then timed
                for p in prompts[:rows]:
                    proc = GrammarProcessor(vocab, grammar, [1], new) if label != "plain" else None
                    engine.add(Request(p[:-new] if new == 16 else p, SamplingParams(max_new_tokens=new),
                                       frozenset({1}), processor=proc))  # fmt: skip
                torch.cuda.synchronize()
                start, produced = time.perf_counter(), 0
                while engine.busy:
                    produced += len(engine.step())
            out[f"batch {rows}, {label}"] = {"tok_s": round(produced / (time.perf_counter() - start), 1),
                                             "tokens": produced}  # fmt: skip
    return out


def profile(model, prompt, steps: int) -> None:
    """GPU busy time and kernel launches per decode step (batch 1), and the costliest kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gen = generate_steps(model, prompt, SamplingParams(max_new_tokens=steps + 40))
    for _ in range(20):
        next(gen)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            next(gen)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    gen.close()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e3  # ms
    print(f"profile: {steps} steps, wall {wall / steps * 1e3:.3f} ms/step, GPU busy {busy / steps:.3f} ms/step, "
          f"{len(kernels) / steps:.0f} kernels/step", flush=True)  # fmt: skip
    totals: dict = {}
    for e in kernels:
        n, t = totals.get(e.name, (0, 0.0))
        totals[e.name] = (n + 1, t + e.device_time)
    for name, (n, t) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"  {t / steps:8.1f} us/step {n / steps:5.1f}x  {name[:110]}", flush=True)


def profile_prefill(model, vocab: int, length: int, chunk: int) -> None:
    """Where a long prompt's prefill time goes: wall time per chunk and the costliest ops (CPU and
    GPU), chunks of `chunk` tokens."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    g = torch.Generator().manual_seed(1)
    saved = decode.PREFILL_CHUNK, decode.LONE_PREFILL_CHUNK
    decode.PREFILL_CHUNK = decode.LONE_PREFILL_CHUNK = chunk
    timed(model, [torch.randint(0, vocab, (length,), generator=g).tolist()], 2, DecodeOptions())
    prompt = [torch.randint(0, vocab, (length,), generator=g).tolist()]
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        row = timed(model, prompt, 2, DecodeOptions())
    decode.PREFILL_CHUNK, decode.LONE_PREFILL_CHUNK = saved
    print(f"prefill profile: {length} tokens, chunk {chunk}: {row}", flush=True)
    for key in ("self_cpu_time_total", "self_device_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=70), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["E2B"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--long", type=int, default=8192)
    ap.add_argument("--chunks", type=int, nargs="*", default=[], help="prefill chunk sizes for the long prompt")
    ap.add_argument("--profile", type=int, default=0, help="profile this many batch-1 decode steps")
    ap.add_argument("--second-process", action="store_true", help="then time a new process's first call")
    ap.add_argument("--first-only", action="store_true", help="only the batch-1 calls (the second process)")
    ap.add_argument("--adapters", type=int, default=0, help="then batch 8 with this many LoRA adapters per row")
    ap.add_argument("--grammar", action="store_true", help="then batch 1 and 8 under a JSON schema's grammar")
    ap.add_argument("--grammar-only", action="store_true", help="only the grammar rows")
    ap.add_argument("--profile-prefill", type=int, default=0, metavar="CHUNK",
                    help="only profile the long prompt's prefill in chunks of CHUNK tokens")  # fmt: skip
    args = ap.parse_args()
    started = time.perf_counter()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for size in args.sizes:
        model = build_g3n(size)
        vocab = model.config.vocab_size
        if args.profile_prefill:
            profile_prefill(model, vocab, args.long, args.profile_prefill)
            continue
        if args.grammar_only:
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(0, vocab, (512,), generator=g).tolist() for _ in range(8)]
            for what, r in grammar_row(model, prompts).items():
                print(f"{size} {what} {r}", flush=True)
            continue
        for name in args.variants:
            options = VARIANTS[name]
            g = torch.Generator().manual_seed(0)
            prompt = [torch.randint(0, vocab, (512,), generator=g).tolist()]
            first = timed(model, prompt, 256, options)
            print(
                f"{size} {name:8s} first call   {first} ({time.perf_counter() - started:.1f}s since start)", flush=True
            )
            # another prompt: the same one again would restore its kept prefix (shared-prefix reuse)
            other = [torch.randint(0, vocab, (512,), generator=g).tolist()]
            rows = {"second call": timed(model, other, 256, options)}
            print(f"{size} {name:8s} second call  {rows['second call']}", flush=True)
            if args.first_only:
                print(torch._dynamo.utils.compile_times(), flush=True)
                continue
            if args.profile and name == "default":
                profile(model, prompt, args.profile)
            for chunk in args.chunks:
                long = [torch.randint(0, vocab, (args.long,), generator=g).tolist()]
                saved = decode.PREFILL_CHUNK, decode.LONE_PREFILL_CHUNK
                decode.PREFILL_CHUNK = decode.LONE_PREFILL_CHUNK = chunk
                timed(model, long, 2, options)
                rows[f"prompt {args.long}, chunk {chunk}"] = timed(model, long, 2, options)
                print(f"{size} {name:8s} prompt {args.long}, chunk {chunk} {rows[f'prompt {args.long}, chunk {chunk}']}",
                      flush=True)  # fmt: skip
                decode.PREFILL_CHUNK, decode.LONE_PREFILL_CHUNK = saved
            long = [torch.randint(0, vocab, (args.long,), generator=g).tolist()]
            timed(model, long, 2, options)  # the longer cache's graphs
            rows[f"prompt {args.long}"] = timed(model, long, 2, options)
            batch = [torch.randint(0, vocab, (512,), generator=g).tolist() for _ in range(16)]
            timed(model, batch[8:], 16, options)
            rows["batch 8"] = timed(model, batch[:8], 256, options)
            print(f"{size} {name:8s} prompt {args.long} {rows[f'prompt {args.long}']}; batch 8 {rows['batch 8']}",
                  flush=True)  # fmt: skip
            if args.adapters and name == "default":
                fresh = [torch.randint(0, vocab, (512,), generator=g).tolist() for _ in range(8)]
                for label, r in adapters_row(model, fresh, args.adapters).items():
                    rows[f"batch 8, {label}"] = r
                    print(f"{size} {name:8s} batch 8, {label} {r}", flush=True)
            if args.grammar and name == "default":
                fresh = [torch.randint(0, vocab, (512,), generator=g).tolist() for _ in range(8)]
                rows.update(grammar_row(model, fresh))
            for what, r in rows.items():
                print(f"{size} {name:8s} {what:12s} {r}", flush=True)
        if args.second_process:
            child = [sys.executable, __file__, "--sizes", size, "--variants", "default", "--first-only"]
            print(f"second process ({size}):", flush=True)
            subprocess.run(child, check=True)


if __name__ == "__main__":
    main()
