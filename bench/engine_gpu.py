"""The engine as users run it, on a GPU: `g3n.generate` / `generate_steps` with default settings,
random E2B/E4B weights (bf16, the per-layer table in CPU memory, as `g3n generate` loads it),
against the same calls with `DecodeOptions(compile="off")`, in one process.

Rows: batch 1, prompt 512, 256 new tokens (first call: compile or cache load included; second
call: time to first token and decode tokens/s); an 8,192-token prompt's time to first token;
batch 8 through one engine (8 prompts in one `generate_steps`); peak GPU memory of each.

    PYTHONPATH=src python bench/engine_gpu.py [--sizes E2B E4B] [--variants default off]
"""

from __future__ import annotations

import argparse
import time

import torch
from generate_gpu import build_g3n

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["E2B"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--long", type=int, default=8192)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for size in args.sizes:
        model = build_g3n(size)
        vocab = model.config.vocab_size
        for name in args.variants:
            options = VARIANTS[name]
            g = torch.Generator().manual_seed(0)
            prompt = [torch.randint(0, vocab, (512,), generator=g).tolist()]
            rows = {"first call": timed(model, prompt, 256, options), "second call": timed(model, prompt, 256, options)}
            long = [torch.randint(0, vocab, (args.long,), generator=g).tolist()]
            timed(model, long, 2, options)  # the longer cache's graphs
            rows[f"prompt {args.long}"] = timed(model, long, 2, options)
            batch = [torch.randint(0, vocab, (512,), generator=g).tolist() for _ in range(8)]
            timed(model, batch, 16, options)
            rows["batch 8"] = timed(model, batch, 256, options)
            for what, r in rows.items():
                print(f"{size} {name:8s} {what:12s} {r}", flush=True)


if __name__ == "__main__":
    main()
