"""Generation speed on a GPU: g3n's engine (static cache, CUDA-graph decode, PLE table on the CPU)
against transformers' generate(), random E2B/E4B weights, bf16, prompt 512, 256 new tokens,
sampling with Google's defaults. One table: tokens/s, time to first token, peak GPU memory.

    PYTHONPATH=src python bench/generate_gpu.py [--sizes E2B E4B] [--batches 1 8] [--no-hf]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from g3n.config import text_config_from_dict
from g3n.engine import Generator
from g3n.generate import SamplingParams, next_tokens
from g3n.model.text import Gemma3nForCausalLM

SIZES = {
    "E2B": {"num_hidden_layers": 30, "intermediate_size": 8192, "num_kv_shared_layers": 10},
    "E4B": {"num_hidden_layers": 35, "intermediate_size": 16384, "num_kv_shared_layers": 15},
}
PROMPT, NEW = 512, 256


def hf_config(size: str, vocab: int):
    from transformers import Gemma3nTextConfig

    return Gemma3nTextConfig(vocab_size=vocab, **SIZES[size])


def build_g3n(size: str) -> Gemma3nForCausalLM:
    """Random bf16 weights on the GPU, the per-layer table in CPU memory."""
    cfg = text_config_from_dict(hf_config(size, 262400).to_dict())
    with torch.device("meta"):
        model = Gemma3nForCausalLM(cfg)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    table = model.model.embed_tokens_per_layer
    table.to_empty(device="cpu")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "cpu":
                p.normal_(0, 0.02)
            elif name.endswith("norm.weight") or "correct_output_scale" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device="cuda", dtype=torch.float32) * 0.02)
    model.model.rotary_emb.to("cuda")
    return model.eval()


def run_g3n(model, batch: int) -> dict:
    params = SamplingParams()
    ids = torch.randint(0, 262144, (batch, PROMPT), device="cuda")
    mask = torch.ones_like(ids, dtype=torch.bool)
    for attempt in ("warm-up", "timed"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gen = Generator(model, batch, PROMPT + NEW)
        start = time.perf_counter()
        logits = gen.prefill(ids, mask)
        tok = next_tokens(logits, params)
        tok.cpu()
        ttft = time.perf_counter() - start
        logits = gen.step(tok, PROMPT)  # captures the CUDA graph
        tok = next_tokens(logits, params)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(1, NEW - 1):
            logits = gen.step(tok, PROMPT + step)
            tok = next_tokens(logits, params)
        torch.cuda.synchronize()
        decode = time.perf_counter() - start
    return {"tok_s": round(batch * (NEW - 2) / decode, 1), "ttft_s": round(ttft, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}  # fmt: skip


@torch.inference_mode()
def graph_vs_eager(model, steps: int = 24) -> float:
    """Max logit difference between CUDA-graph and eager decode steps on the same tokens."""
    ids = torch.randint(0, 262144, (1, 64), device="cuda")
    mask = torch.ones_like(ids, dtype=torch.bool)
    tokens = torch.randint(0, 262144, (steps, 1), device="cuda")
    out = []
    for graph in (False, True):
        gen = Generator(model, 1, 64 + steps, cuda_graph=graph)
        gen.prefill(ids, mask)
        out.append(torch.stack([gen.step(tokens[s], 64 + s).float().clone() for s in range(steps)]))
    return (out[0] - out[1]).abs().max().item()


def run_hf(size: str, batch: int) -> dict:
    from transformers import Gemma3nForCausalLM as HF

    cfg = hf_config(size, 262144)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        m = HF(cfg)
    m = m.to(torch.bfloat16).eval()
    ids = torch.randint(0, 262144, (batch, PROMPT), device="cuda")
    kw = {
        "max_new_tokens": NEW,
        "min_new_tokens": NEW,
        "do_sample": True,
        "top_k": 64,
        "top_p": 0.95,
        "temperature": 1.0,
    }
    m.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    m.generate(ids, **kw)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"tok_s": round(batch * NEW / seconds, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    del m
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["E2B", "E4B"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    rows = []
    for size in args.sizes:
        start = time.perf_counter()
        model = build_g3n(size)
        print(f"[{size}] built in {time.perf_counter() - start:.0f}s", flush=True)
        print(f"[{size}] CUDA graph vs eager decode: max logit difference {graph_vs_eager(model):.3g}", flush=True)
        for batch in args.batches:
            rows.append({"size": size, "batch": batch, "engine": "g3n", **run_g3n(model, batch)})
            print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
        if not args.no_hf:
            for batch in args.batches:
                rows.append({"size": size, "batch": batch, "engine": "transformers", **run_hf(size, batch)})
                print(json.dumps(rows[-1]), flush=True)
    print("| size | batch | engine | tokens/s | time to first token (s) | peak GPU GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['batch']} | {r['engine']} | {r['tok_s']} | {r.get('ttft_s', '')} | {r['peak_gib']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
