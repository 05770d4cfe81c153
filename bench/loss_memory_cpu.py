"""Peak memory of the loss at Gemma 3n's vocabulary: naive (full logits) vs chunked, on CPU.

    OMP_NUM_THREADS=1 python bench/loss_memory_cpu.py [--tokens 2048] [--dim 256]

Each variant runs in its own process (forward + backward of the loss alone, float32) and reports
its peak resident memory minus the memory of the inputs, so the numbers are what the loss adds.
"""

import argparse
import resource
import subprocess
import sys
import time

VOCAB = 262_400


def run(variant: str, tokens: int, dim: int) -> None:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, "src")
    from g3n.train.loss import chunked_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, dim, generator=g).requires_grad_()
    weight = (torch.randn(VOCAB, dim, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, VOCAB, (tokens,), generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "naive":
        logits = torch.tanh((hidden @ weight.t()) / 30.0) * 30.0
        loss = F.cross_entropy(logits, labels)
    else:
        loss = chunked_cross_entropy(hidden, weight, labels, 30.0, chunk=512)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{variant}\t{(peak - base) / 2**20:.2f}\t{time.perf_counter() - start:.1f}\t{loss.item():.6f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return run(args.variant, args.tokens, args.dim)
    print(f"tokens {args.tokens}, vocab {VOCAB}, dim {args.dim}, float32")
    print("variant\tpeak GiB added\tseconds\tloss")
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens), "--dim", str(args.dim)]
        print(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
