"""Size and accuracy of GGUF export types against the f16 export, measured in llama.cpp.

    OMP_NUM_THREADS=2 python bench/gguf_quants.py [--model tiny|DIR] [--out /tmp/g3n-gguf]
        [--quants f16,q8_0,...] [--from-f16] [--keep]

For each quant: file size (also relative to q4_k_m, the type `dynamic` is meant to beat), and the
next-token distributions of a few chat prompts at every position compared with the f16 file's, all
from llama.cpp's logits: mean and max KL divergence KL(f16 || quant) in nats, top-1 agreement, max
absolute logit difference. `--model DIR` takes any checkpoint, e.g. random E2B-size weights from
`bench/make_synthetic_checkpoint.py --size E2B --unit-norms --tokenizer-from tiny`. `--from-f16`
quantizes the llama.cpp types from the one f16 file (the same quantizer call as `g3n export`, without
writing an f16 file per type: minutes saved at E2B size). Files are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from g3n.export.gguf import DIRECT, QUANTS, export_gguf, quantize_with_llama_cpp
from g3n.tokenizer import format_chat

PROMPTS = ["What is the capital of France?", "What is 7+5?", "Who are you?", "What color is the sky?"]
DEFAULT_QUANTS = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "dynamic")


def logits(path: Path, threads: int) -> list[np.ndarray]:
    """llama.cpp's logits at every position of each prompt (chat-formatted, one BOS)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=threads)
    out = []
    for prompt in PROMPTS:
        ids = llm.tokenize(format_chat([{"role": "user", "content": prompt}]).encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    del llm
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(got: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, float]:
    """KL(reference || got) per position, top-1 agreement and the largest logit difference."""
    kl, agree, diff = [], [], 0.0
    for a, b in zip(got, reference):
        la, lb = log_softmax(a), log_softmax(b)
        kl.append((np.exp(lb) * (lb - la)).sum(-1))
        agree.append(a.argmax(-1) == b.argmax(-1))
        diff = max(diff, float(np.abs(a - b).max()))
    kl, agree = np.concatenate(kl), np.concatenate(agree)
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "top1": float(agree.mean()), "diff": diff, "n": len(kl)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", default="/tmp/g3n-gguf")
    parser.add_argument("--quants", default=",".join(DEFAULT_QUANTS), help=f"comma-separated, of {', '.join(QUANTS)}")
    parser.add_argument("--from-f16", action="store_true", help="quantize llama.cpp types from the one f16 file")
    parser.add_argument("--keep", action="store_true", help="keep the GGUF files")
    args = parser.parse_args()
    quants = [q.strip().lower() for q in args.quants.split(",") if q.strip()]
    unknown = set(quants) - set(QUANTS)
    if unknown:
        parser.error(f"unknown quant(s) {', '.join(sorted(unknown))}")
    quants = ["f16"] + [q for q in quants if q != "f16"]  # the reference
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths, sizes = {}, {}
    try:
        for q in quants:
            start = time.perf_counter()
            path = out / f"model-{q}.gguf"
            if args.from_f16 and q not in DIRECT:
                import llama_cpp

                quantize_with_llama_cpp(llama_cpp, paths["f16"], path, q)
            else:
                export_gguf(args.model, path, quant=q, overwrite=True)
            paths[q], sizes[q] = path, path.stat().st_size
            print(f"{q}: {sizes[q] / 1e6:.1f} MB written in {time.perf_counter() - start:.0f} s", flush=True)
        reference = logits(paths["f16"], threads)
        rows = {q: compare(logits(p, threads), reference) if q != "f16" else None for q, p in paths.items()}
    finally:
        if not args.keep:
            for path in paths.values():
                path.unlink(missing_ok=True)
    print(f"\n{sum(len(r) for r in reference)} positions of {len(PROMPTS)} chat prompts; KL(f16 || quant) in nats\n")
    q4km = sizes.get("q4_k_m")
    print("| quant | size (MB) | vs f16 | vs q4_k_m | mean KL | max KL | top-1 agreement | max abs logit diff |")
    print("|---|---|---|---|---|---|---|---|")
    for q in paths:
        r = rows[q] or {"kl": 0.0, "kl_max": 0.0, "top1": 1.0, "diff": 0.0}
        size = sizes[q]
        rel = f"{size / q4km:.2f}" if q4km else "-"
        print(f"| {q} | {size / 1e6:.1f} | {size / sizes['f16']:.2f} | {rel} | {r['kl']:.2e} | {r['kl_max']:.2e} | "
              f"{r['top1']:.1%} | {r['diff']:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
