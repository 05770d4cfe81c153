"""The decode step's matrix-vector products: g3n's Triton kernel (kernels/gemv.py) against cuBLAS
(F.linear), on every weight shape of an E2B/E4B decode step, at 1 and 8 rows. Each timing replays a
CUDA graph of back-to-back calls over enough copies of the weight that none is read from L2 (as in
a real step, where 4.8 GB of weights stream through once). Prints one table and the estimated
per-step GEMV time of the decoder layers.

    PYTHONPATH=src python bench/gemv_gpu.py [--rows 1 8]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from g3n.kernels import gemv

# (out, in) of nn.Linear weights; per-layer counts for E2B (30 layers, 20 with their own K/V)
SHAPES = {
    "q_proj, o_proj": ((2048, 2048), 30 * 2),
    "k_proj, v_proj": ((512, 2048), 20 * 2),
    "gate/up E2B": ((8192, 2048), 30 * 2),
    "down E2B": ((2048, 8192), 30),
    "laurel left": ((64, 2048), 30),
    "laurel right": ((2048, 64), 30),
    "PLE gate": ((256, 2048), 30),
    "PLE projection": ((2048, 256), 30),
    "altup projections": ((2048, 2048), 6),
    "per_layer_model_projection E2B": ((7680, 2048), 1),
    "gate/up E4B": ((16384, 2048), 0),
    "down E4B": ((2048, 16384), 0),
}
L2_BYTES = 256 * 2**20  # stream through more than the H200's 50 MB L2 (and its neighbours)


def time_us(fn, weights, x, reps: int = 5) -> float:
    """Microseconds per call, replaying a CUDA graph of one call per weight copy."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights:
            fn(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * len(weights))


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    rows_out, step = [], {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for rows in args.rows:
        for name, ((n, k), per_step) in SHAPES.items():
            size = n * k * 2
            copies = max(2, min(64, -(-L2_BYTES // size)))
            weights = [torch.randn(n, k, device="cuda", generator=g).mul_(0.02).bfloat16() for _ in range(copies)]
            x = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
            exact = x.float() @ weights[0].float().T
            ours, theirs = gemv.gemv(x, weights[0]), F.linear(x, weights[0])
            err = {w: (y.float() - exact).abs().max().item() for w, y in (("g3n", ours), ("cublas", theirs))}
            t_cublas, t_g3n = time_us(F.linear, weights, x), time_us(gemv.gemv, weights, x)
            row = {"shape": name, "out x in": f"{n} x {k}", "rows": rows, "cublas_us": round(t_cublas, 2),
                   "cublas_tb_s": round(size / t_cublas / 1e6, 2), "g3n_us": round(t_g3n, 2),
                   "g3n_tb_s": round(size / t_g3n / 1e6, 2), "speedup": round(t_cublas / t_g3n, 2),
                   "max_err_g3n": round(err["g3n"], 4), "max_err_cublas": round(err["cublas"], 4)}  # fmt: skip
            rows_out.append(row)
            print(json.dumps(row), flush=True)
            for who, t in (("cublas", t_cublas), ("g3n", t_g3n)):
                step[(rows, who)] = step.get((rows, who), 0.0) + t * per_step
            del weights
            torch.cuda.empty_cache()
    print("\n| weight | out x in | rows | cuBLAS us | TB/s | g3n us | TB/s | speedup | max err g3n / cuBLAS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['shape']} | {r['out x in']} | {r['rows']} | {r['cublas_us']} | {r['cublas_tb_s']} | {r['g3n_us']} "
              f"| {r['g3n_tb_s']} | {r['speedup']}x | {r['max_err_g3n']} / {r['max_err_cublas']} |")  # fmt: skip
    for rows in args.rows:
        print(f"E2B step, the layers' and embedding projections' GEMVs at {rows} row(s): cuBLAS "
              f"{step[(rows, 'cublas')] / 1000:.2f} ms, g3n {step[(rows, 'g3n')] / 1000:.2f} ms")  # fmt: skip
    print("tuned tiles:", {str(k): str(v) for k, v in gemv._tuned_kernel.cache.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
