"""QLoRA on one GPU: g3n (4-bit NF4 base, LoRA r16) against transformers + PEFT + bitsandbytes 4-bit,
random E2B/E4B weights at the real text sizes, 1 x 2048 tokens. Prints a table.

    PYTHONPATH=src python bench/qlora_gpu.py [--sizes E2B,E4B] [--runs g3n-bf16,g3n-fp16,hf-bf16,generate]
    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/qlora_gpu.py --cpu-smoke      # the same runs, tiny model, CPU

Both sides: LoRA r16 alpha 16 on q,k,v,o,gate,up,down, gradient checkpointing (non-reentrant),
AdamW, batch 1 x 2048 tokens, 2 warm-up steps then the median tokens/s of the rest (4 steps; float16
runs 10 more, as the loss scale halves from 2^16 on each overflowing step first); peak memory is
torch.cuda.max_memory_allocated over load + steps (reset before the load).
- g3n: `train()` with load_in_4bit (bf16 compute; fp16 compute with loss scaling, as on a T4), the
  per-layer table in CPU memory (g3n's default), the chunked loss.
- transformers: Gemma3nForCausalLM.from_pretrained with BitsAndBytesConfig(nf4, double quant,
  bf16 compute), every nn.Linear 4-bit but the tied head and AltUp's (4-bit AltUp fails in training:
  Gemma 3n clamps its coefficients in place), the per-layer table on
  the GPU, PEFT's get_peft_model, loss from full logits (labels=ids). No prepare_model_for_kbit_training
  (it would upcast the embeddings and the 2 B-parameter per-layer table to float32).
- generate: g3n's engine on the 4-bit model (CUDA graph), greedy, 128 new tokens.
The checkpoint is random bf16 noise (matrices N(0, 0.02), vectors 1.0) written once in the text
layout (gemma3n_text) both libraries load, with the tiny model's tokenizer; g3n's rows are random
words through that tokenizer, transformers' random ids: losses are not comparable, only finite or not.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from g3n.checkpoint.save import save_tensors
from g3n.config import TextConfig
from g3n.model.text import Gemma3nForCausalLM

SIZES = {"E2B": (30, 8192, 10), "E4B": (35, 16384, 15)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALTUP = ["modality_router", "prediction_coefs", "correction_coefs"]  # as suffixes: every transformers 5.x matches
WARMUP, TIMED = 2, 4
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:5.0f}s] {msg}", flush=True)


def write_checkpoint(cfg: TextConfig, out: Path, device: str) -> Path:
    """Random bf16 weights in the gemma3n_text layout, one 2 GiB shard in memory at a time."""
    if (out / "config.json").is_file():
        return out
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Gemma3nForCausalLM(cfg).named_parameters()}
    gen = torch.Generator(device).manual_seed(0)

    def tensors():
        for name, shape in shapes.items():
            if len(shape) == 1:
                yield name, torch.ones(shape, dtype=torch.bfloat16)
            else:
                yield name, (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_tensors(tensors(), cfg, tmp, torch.bfloat16)
    tiny = ROOT / "src/g3n/assets/tiny"
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy2(tiny / name, tmp / name)
    tmp.rename(out)
    return out


def config_for(size: str, smoke: bool) -> TextConfig:
    layers, width, shared = SIZES[size]
    if smoke:  # the same layer pattern, small widths
        return TextConfig(num_hidden_layers=layers, intermediate_size=256, num_kv_shared_layers=shared, hidden_size=128,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=1024,
                          vocab_size_per_layer_input=1024, hidden_size_per_layer_input=16, laurel_rank=8)  # fmt: skip
    return TextConfig(num_hidden_layers=layers, intermediate_size=width, num_kv_shared_layers=shared)


def write_text_data(path: Path, records: int, words: int) -> None:
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    with path.open("w") as f:
        for _ in range(records):
            f.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n")


def reset(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def run_g3n(model_dir: Path, data: Path, work: Path, dtype: str, length: int, device: str, steps: int) -> dict:
    from g3n.train.config import load_train_config
    from g3n.train.loop import train

    settings = {
        "model": str(model_dir), "train_data": [str(data)], "eval_fraction": 0.0, "device": device, "dtype": dtype,
        "load_in_4bit": True, "lora_r": 16, "lora_alpha": 16, "batch_size": 1, "grad_accum": 1, "max_length": length,
        "max_steps": steps + 1, "save_steps": 1000, "learning_rate": 1e-4, "gradient_checkpointing": True,
        "output_dir": str(work / f"run-{dtype}"),
    }  # fmt: skip
    reset(device)
    history = train(load_train_config(base=settings), overwrite=True, progress=False, stop_after=steps)
    done = [h for h in history if "loss" in h]
    return {
        "tokens_per_s": statistics.median(h["tokens_per_s"] for h in done[WARMUP:]),
        "peak_gib": peak_gib(device),
        "first_loss": done[0]["loss"],
        "finite": all(math.isfinite(h["loss"]) for h in done),
        "last_applied": not done[-1].get("skipped_overflow"),
        "skipped": sum(1 for h in done if h.get("skipped_overflow")),
        "steps": len(done),
        "last_grad_norm": done[-1]["grad_norm"],
    }


def run_hf(model_dir: Path, length: int, device: str) -> dict:
    import bitsandbytes  # noqa: F401 - fail early and clearly when it is missing
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, Gemma3nForCausalLM

    reset(device)
    # AltUp's modules stay 16-bit: in training mode Gemma 3n clamps prediction_coefs.weight in place, which
    # fails on a 4-bit weight ("result type Float can't be cast to ... unsigned char").
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=ALTUP + ["lm_head"])  # fmt: skip
    model = Gemma3nForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                               device_map=device, attn_implementation="sdpa")  # fmt: skip
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size_per_layer_input
    rates, losses = [], []
    for _ in range(WARMUP + TIMED):
        ids = torch.randint(0, vocab, (1, length), generator=gen).to(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises
        rates.append(length / (time.perf_counter() - start))
    result = {
        "tokens_per_s": statistics.median(rates[WARMUP:]),
        "peak_gib": peak_gib(device),
        "first_loss": losses[0],
        "finite": all(math.isfinite(x) for x in losses),
        "skipped": 0,
    }
    del model, opt
    return result


def run_generate(model_dir: Path, device: str, new: int = 128) -> dict:
    from g3n.inference.backends import load_engine
    from g3n.inference.sampling import SamplingParams

    reset(device)
    engine = load_engine(str(model_dir), dtype="bfloat16", device=device, load_in_4bit=True)
    ids = engine.encode("the quick brown fox " * 64)
    params = [SamplingParams(temperature=0.0, max_new_tokens=new)]
    start, count = time.perf_counter(), 0
    for piece in engine.run_batch([ids], params):
        count += piece.finish is None
        if count == 1:
            first = time.perf_counter()
    rate = (count - 1) / (time.perf_counter() - first) if count > 1 else 0.0
    result = {"tokens_per_s": rate, "peak_gib": peak_gib(device), "first_loss": None, "finite": count > 0,
              "skipped": 0, "note": f"{count} tokens, prompt {len(ids)}, {time.perf_counter() - start:.1f} s"}  # fmt: skip
    del engine
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="E2B,E4B")
    ap.add_argument("--runs", default="g3n-bf16,g3n-fp16,hf-bf16,generate")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/g3n-qlora"))
    ap.add_argument("--cpu-smoke", action="store_true", help="the tiny model's shape family, small, on the CPU")
    ap.add_argument("--fp16-extra-steps", type=int, default=10, help="steps for the float16 loss scale to settle")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no run past this many seconds")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    device = "cpu" if args.cpu_smoke else "cuda"
    length = 128 if args.cpu_smoke else 2048
    args.workdir.mkdir(parents=True, exist_ok=True)
    import bitsandbytes
    import peft
    import transformers

    versions = (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
                f"bitsandbytes {bitsandbytes.__version__}, "
                f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}")  # fmt: skip
    log(versions)
    data = args.workdir / f"text-{length}.jsonl"
    write_text_data(data, 16, length + 64)
    rows = []
    sizes, runs = args.sizes.split(","), args.runs.split(",")
    # every size's training runs first (g3n bf16 and transformers side by side), then float16, then
    # the engine: if the time budget runs out, the comparison is what is left
    order = [(z, r) for r in runs if r in ("g3n-bf16", "hf-bf16") for z in sizes]
    order = sorted(order, key=lambda zr: sizes.index(zr[0]))
    order += [(z, "g3n-fp16") for z in reversed(sizes) if "g3n-fp16" in runs]
    order += [(sizes[0], "generate")] if "generate" in runs else []
    dirs, took = {}, {}
    for size, run in order:
        spent = time.perf_counter() - T0
        if spent + 1.3 * took.get(size, 0) > args.budget_s:
            rows.append(
                {"size": size, "run": run, "error": f"not run: {spent:.0f} s spent of a {args.budget_s:.0f} s budget"}
            )
            continue
        if size not in dirs:
            dirs[size] = write_checkpoint(
                config_for(size, args.cpu_smoke), args.workdir / f"{size.lower()}-random", device
            )
            log(f"{size}: checkpoint ready")
        start = time.perf_counter()
        try:
            if run.startswith("g3n-"):
                dtype = {"g3n-bf16": "bfloat16", "g3n-fp16": "float16"}[run]
                # float16: the loss scale starts at 2^16 and halves on every overflowing step until it
                # fits; more steps so that updates follow
                steps = WARMUP + TIMED + (args.fp16_extra_steps if dtype == "float16" else 0)
                result = run_g3n(dirs[size], data, args.workdir, dtype, length, device, steps)
            elif run == "hf-bf16":
                result = run_hf(dirs[size], length, device)
            else:
                result = run_generate(dirs[size], device)
        except Exception as e:  # noqa: BLE001 - record and go on to the next run
            result = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        took[size] = max(took.get(size, 0), time.perf_counter() - start)
        rows.append({"size": size, "run": run, **result})
        log(f"{size} {run}: {json.dumps(result)}")
        if args.json:
            args.json.write_text(json.dumps({"versions": versions, "rows": rows}, indent=2))

    print(f"\n{versions}; 1 x {length} tokens, LoRA r16 on q,k,v,o,gate,up,down, gradient checkpointing")
    print("| size | run | peak GiB | tokens/s | first-step loss | finite | notes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | {r['run']} | | | | | FAILED: {r['error']} |")
            continue
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        loss = "" if r["first_loss"] is None else f"{r['first_loss']:.3f}"
        notes = r.get("note", "")
        if r["skipped"]:
            last = "applied" if r["last_applied"] else "SKIPPED"
            notes = f"{r['skipped']} of {r['steps']} steps skipped while the loss scale settled; last step {last}"
        print(f"| {r['size']} | {r['run']} | {peak} | {r['tokens_per_s']:.0f} | {loss} | "
              f"{'yes' if r['finite'] else 'NO'} | {notes} |")  # fmt: skip
    print(f"total {time.perf_counter() - T0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"versions": versions, "rows": rows}, indent=2))
    return 0 if not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
