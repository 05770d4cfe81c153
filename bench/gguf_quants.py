"""Size and error of every GGUF export type against the f16 export, measured in llama.cpp.

    OMP_NUM_THREADS=2 python bench/gguf_quants.py [--model tiny] [--out /tmp/g3n-gguf]

For each quant: file size, max and mean absolute logit difference to the f16 file over a few chat
prompts (all positions), and how often the top token agrees with the f16 file's.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from g3n.export.gguf import QUANTS, export_gguf
from g3n.tokenizer import format_chat

PROMPTS = ["What is the capital of France?", "What is 7+5?", "Who are you?", "What color is the sky?"]


def logits(path: Path) -> list[np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
    out = []
    for prompt in PROMPTS:
        ids = llm.tokenize(format_chat([{"role": "user", "content": prompt}]).encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", default="/tmp/g3n-gguf")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {q: export_gguf(args.model, out / f"model-{q}.gguf", quant=q, overwrite=True) for q in QUANTS}
    reference = logits(paths["f16"])
    print("| quant | size (MB) | vs f16 size | max abs logit diff | mean abs diff | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for q, path in paths.items():
        got = logits(path)
        diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(got, reference)])
        agree = np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(got, reference)]))
        size = os.path.getsize(path)
        print(f"| {q} | {size / 1e6:.1f} | {size / os.path.getsize(paths['f16']):.2f} | {diff.max():.3f} | "
              f"{diff.mean():.4f} | {agree:.1%} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
