"""Generation speed on the CPU: g3n's engine against transformers' generate() on the shipped tiny
model (float32, both loaded from the same checkpoint directory), greedy, so the two must also
produce the same tokens. Run with one thread (timings on a shared 2-core machine swing otherwise):

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/generate_cpu.py [--prompt 64] [--new 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from functools import partial
from pathlib import Path

import torch

import g3n
from g3n.inference.engine import Generator
from g3n.inference.generate import generate
from g3n.inference.sampling import SamplingParams

TINY = Path(g3n.__file__).parent / "assets" / "tiny"


def best_of(repeats: int, fn) -> tuple[float, object]:
    """The fastest of `repeats` runs (after one warm-up), and the last result."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def hf_generate(hf, prompts, new: int) -> list[list[int]]:
    """Greedy, no stop token (eos unset, so nothing is suppressed or stops early either)."""
    with torch.inference_mode():
        out = hf.generate(torch.tensor(prompts), max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, len(prompts[0]) :].tolist()


def g3n_fused(model, prompts, new: int) -> list[list[int]]:
    """Greedy decoding through the engine's fused decode layers (what a compiled GPU step runs)."""
    ids = torch.tensor(prompts)
    gen = Generator(model, len(prompts), ids.shape[1] + new, fused=True)
    with torch.inference_mode():
        logits = torch.cat([gen.prefill(row, x) for row, x in enumerate(ids)])
        out = []
        for step in range(new):
            tok = logits.argmax(-1)
            out.append(tok)
            if step < new - 1:
                logits = gen.step(tok, [ids.shape[1] + step] * len(prompts)).logits
    return torch.stack(out, 1).tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens (greedy, no stop tokens)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import transformers
    from transformers import Gemma3nForCausalLM

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, {torch.get_num_threads()} thread(s)")  # fmt: skip
    ours, _ = g3n.load("tiny", dtype="float32", device="cpu")
    hf = Gemma3nForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    params = SamplingParams(greedy=True, max_new_tokens=args.new)
    g = torch.Generator().manual_seed(0)
    print("| batch | engine | tokens/s | vs transformers | same tokens as transformers |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        prompts = torch.randint(3, ours.config.vocab_size, (batch, args.prompt), generator=g).tolist()

        engines = {
            "transformers generate()": partial(hf_generate, hf, prompts, args.new),
            "g3n generate()": partial(generate, ours, prompts, params),
            "g3n engine, fused decode layers": partial(g3n_fused, ours, prompts, args.new),
        }
        results = {name: best_of(args.repeats, fn) for name, fn in engines.items()}
        ref_s, ref_tokens = results["transformers generate()"]
        for name, (seconds, tokens) in results.items():
            tok_s = batch * args.new / seconds
            print(f"| {batch} | {name} | {tok_s:.1f} | {ref_s / seconds:.2f}x | {tokens == ref_tokens} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
