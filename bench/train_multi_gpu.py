"""Fine-tuning on several GPUs of one host (torchrun): correctness on the tiny model, E2B LoRA
tokens/s on 1 then N GPUs (DDP), E4B full fine-tuning peak memory per GPU (FSDP2). Prints a table.

    PYTHONPATH=src python bench/train_multi_gpu.py [--gpus 2] [--workdir /tmp/g3n-mgpu] [--parts tiny,e2b,e4b]
    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/train_multi_gpu.py --cpu-smoke    # the logic, tiny, gloo

Random-weight E2B/E4B checkpoints are written first (bench/make_synthetic_checkpoint.py, noise
drawn on the GPU, the tiny model's tokenizer copied in); the data is random text, every row cut to
max_length tokens. Every run is `train()` in a worker process (torchrun for several GPUs) that
stops before the final checkpoint and reports its history and peak memory. NCCL's NVLink multicast
stays off (NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(settings_file: str, stats_dir: str, stop_after: int, resume: bool) -> int:
    """One process of a run: train, then write this rank's history and peak memory."""
    import torch

    from g3n.train.config import load_train_config
    from g3n.train.loop import train

    cfg = load_train_config(base=json.loads(Path(settings_file).read_text()))
    start = time.perf_counter()
    history = train(cfg, resume=resume, progress=False, stop_after=stop_after or None)
    rank = int(os.environ.get("RANK", "0"))
    stats = {"rank": rank, "seconds": time.perf_counter() - start, "history": history}
    if torch.cuda.is_available() and str(cfg.device or "cuda").startswith("cuda"):
        stats["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        stats["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    Path(stats_dir).mkdir(parents=True, exist_ok=True)
    (Path(stats_dir) / f"rank{rank}.json").write_text(json.dumps(stats))
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    def __init__(self, workdir: Path, cpu: bool, timeout: float):
        self.workdir, self.cpu, self.timeout = workdir, cpu, timeout
        self.rows: list[dict] = []

    def run(self, name: str, settings: dict, procs: int, stop_after: int = 0, resume: bool = False) -> dict | None:
        """Train in `procs` processes (torchrun when more than one); returns rank 0's stats and
        the peak memory of every rank, or None (the failure is printed and recorded)."""
        run_dir = self.workdir / "runs" / name
        stats_dir = run_dir / "stats"
        shutil.rmtree(stats_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "settings.json").write_text(json.dumps(settings))
        me = [str(Path(__file__).resolve()), "--worker", str(run_dir / "settings.json"), "--stats", str(stats_dir),
              "--stop-after", str(stop_after)] + ["--resume"] * resume  # fmt: skip
        if procs > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}",
                   "--master-addr=127.0.0.1", f"--master-port={free_port()}", *me]  # fmt: skip
        else:
            cmd = [sys.executable, *me]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NCCL_NVLS_ENABLE": "0", "HF_HUB_OFFLINE": "1"}
        env.setdefault("OMP_NUM_THREADS", "1" if self.cpu else "4")
        print(f"[bench] {name}: {procs} process(es)", flush=True)
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=self.timeout, check=False)
            failed = done.returncode != 0
            log = done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            failed, log = True, f"timed out after {self.timeout:.0f} s\n{e.stdout or ''}{e.stderr or ''}"
        (run_dir / "log.txt").write_text(log if isinstance(log, str) else str(log))
        if failed:
            print(f"[bench] {name} FAILED ({time.perf_counter() - start:.0f} s):\n{str(log)[-2500:]}", flush=True)
            self.rows.append({"run": name, "procs": procs, "error": str(log).strip().splitlines()[-1:]})
            return None
        ranks = [json.loads(p.read_text()) for p in sorted(stats_dir.glob("rank*.json"))]
        stats = next(r for r in ranks if r["rank"] == 0)
        stats["peaks"] = [(r.get("peak_alloc_gib"), r.get("peak_reserved_gib")) for r in ranks]
        print(f"[bench] {name}: done in {time.perf_counter() - start:.0f} s", flush=True)
        return stats

    def record(self, name: str, procs: int, settings: dict, stats: dict | None, warmup: int = 2) -> dict | None:
        if stats is None:
            return None
        steps = [h for h in stats["history"] if "loss" in h]
        timed = [h["tokens_per_s"] for h in steps[warmup:]] or [h["tokens_per_s"] for h in steps]
        allocs = [a for a, _ in stats["peaks"] if a is not None]
        reserved = [r for _, r in stats["peaks"] if r is not None]
        row = {
            "run": name, "procs": procs,
            "global_batch": f"{settings['batch_size'] * settings['grad_accum'] * procs} x {settings['max_length']}",
            "tokens_per_s": statistics.median(timed),
            "peak_alloc_gib": max(allocs) if allocs else None, "peak_reserved_gib": max(reserved) if reserved else None,
            "loss": f"{steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}",
        }  # fmt: skip
        self.rows.append(row)
        return row


def write_text_data(path: Path, records: int, words: int, seed: int = 0) -> None:
    """Random words: every record is longer than max_length tokens, so every row is full."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    with path.open("w") as f:
        for _ in range(records):
            f.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n")


def synthetic_checkpoint(size: str, out: Path) -> Path:
    if (out / "config.json").is_file():
        return out
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "bench/make_synthetic_checkpoint.py"), "--size", size, "--out", str(out),
                    "--device", "cuda"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    tiny = ROOT / "src/g3n/assets/tiny"
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy2(tiny / name, out / name)
    print(f"[bench] wrote a random {size} checkpoint in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def correctness(bench: Bench, gpus: int, device: str) -> list[str]:
    """The tiny model in float32: N processes against one of the same global batch (LoRA and full),
    and the N-process full checkpoint resumed in one process."""
    data = bench.workdir / "tiny.jsonl"
    write_text_data(data, 64, 60)
    base = {"model": "tiny", "train_data": [str(data)], "eval_fraction": 0.0, "device": device, "dtype": "float32",
            "batch_size": 1, "grad_accum": 1, "max_length": 64, "max_steps": 4, "save_steps": 2,
            "learning_rate": 1e-3}  # fmt: skip
    notes = []
    for method, extra in (("LoRA/DDP", {}), ("full/FSDP2", {"lora": False, "learning_rate": 1e-4})):
        tag = method.split("/")[0].lower()
        many = {**base, **extra, "output_dir": str(bench.workdir / "runs" / f"tiny-{tag}-{gpus}" / "out")}
        one = {**base, **extra, "batch_size": gpus, "output_dir": str(bench.workdir / "runs" / f"tiny-{tag}-1" / "out")}
        a, b = bench.run(f"tiny-{tag}-{gpus}", many, gpus), bench.run(f"tiny-{tag}-1", one, 1)
        if a is None or b is None:
            notes.append(f"tiny {method}: a run failed (see above)")
            continue
        la, lb = ([h["loss"] for h in s["history"] if "loss" in h] for s in (a, b))
        notes.append(
            f"tiny {method}: {gpus} processes vs 1, max |loss difference| {max(abs(x - y) for x, y in zip(la, lb)):.2e} over {len(la)} steps"
        )
        if tag == "full":  # resume the N-process checkpoint-2 in one process
            out = Path(many["output_dir"])
            (out / "latest.json").write_text(json.dumps({"checkpoint": "checkpoint-2", "step": 2}))
            resumed = bench.run(f"tiny-{tag}-{gpus}-resumed-on-1", {**many, "grad_accum": gpus}, 1, resume=True)
            if resumed is not None:
                lr = [h["loss"] for h in resumed["history"] if "loss" in h]
                notes.append(f"tiny {method}: {gpus}-process checkpoint resumed in 1 process, max |loss difference| "
                             f"from the 1-process run {max(abs(x - y) for x, y in zip(lr, lb)):.2e}")  # fmt: skip
    return notes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/g3n-mgpu"))
    ap.add_argument("--parts", default="tiny,e2b,e4b", help="comma-separated: tiny, e2b, e4b")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same runs on the tiny model, gloo on the CPU")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    ap.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.stats, args.stop_after, args.resume)

    import torch

    device = "cpu" if args.cpu_smoke else "cuda"
    if not args.cpu_smoke and torch.cuda.device_count() < args.gpus:
        sys.exit(f"needs {args.gpus} GPUs, {torch.cuda.device_count()} visible (or use --cpu-smoke)")
    start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.workdir, args.cpu_smoke, args.timeout)
    parts = set(args.parts.split(","))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (gloo)'}, "
          f"{args.gpus} processes", flush=True)  # fmt: skip
    notes = correctness(bench, args.gpus, device) if "tiny" in parts else []

    length = 128 if args.cpu_smoke else 2048
    data = args.workdir / f"text-{length}.jsonl"
    write_text_data(data, 96, length + 64)
    common = {"train_data": [str(data)], "eval_fraction": 0.0, "device": device, "max_length": length,
              "grad_accum": 1, "save_steps": 1000, "learning_rate": 1e-5}  # fmt: skip
    steps = 4 if args.cpu_smoke else 8
    if "e2b" in parts:
        model = "tiny" if args.cpu_smoke else str(synthetic_checkpoint("E2B", args.workdir / "e2b-random"))
        lora = {**common, "model": model, "lora": True, "lora_r": 16, "batch_size": 4, "max_steps": steps + 1}
        rows = {}
        for procs in (1, args.gpus):
            settings = {**lora, "output_dir": str(args.workdir / "runs" / f"e2b-lora-{procs}" / "out")}
            stats = bench.run(f"e2b-lora-{procs}", settings, procs, stop_after=steps)
            rows[procs] = bench.record("E2B LoRA r16 (DDP)" if procs > 1 else "E2B LoRA r16", procs, settings, stats)
        if rows.get(1) and rows.get(args.gpus):
            notes.append(f"E2B LoRA tokens/s scaling 1 -> {args.gpus} GPUs: "
                         f"{rows[args.gpus]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x")  # fmt: skip
    if "e4b" in parts:
        model = "tiny" if args.cpu_smoke else str(synthetic_checkpoint("E4B", args.workdir / "e4b-random"))
        full = {**common, "model": model, "lora": False, "batch_size": 2, "dtype": "bfloat16", "max_steps": steps}
        settings = {**full, "output_dir": str(args.workdir / "runs" / f"e4b-full-{args.gpus}" / "out")}
        stats = bench.run(f"e4b-full-{args.gpus}", settings, args.gpus, stop_after=steps - 1)
        bench.record("E4B full FT (FSDP2, bf16 compute, fp32 master)", args.gpus, settings, stats)

    print("\n| run | GPUs | global batch (rows x tokens) | tokens/s (median) | peak allocated GiB/GPU (max) | peak reserved GiB/GPU | train loss |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in bench.rows:
        if "error" in r:
            print(f"| {r['run']} | {r['procs']} | FAILED: {r['error']} | | | | |")
            continue
        fmt = lambda v: "n/a" if v is None else f"{v:.1f}"
        print(f"| {r['run']} | {r['procs']} | {r['global_batch']} | {r['tokens_per_s']:.0f} | "
              f"{fmt(r['peak_alloc_gib'])} | {fmt(r['peak_reserved_gib'])} | {r['loss']} |")  # fmt: skip
    for note in notes:
        print(f"- {note}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0 if not any("error" in r for r in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
