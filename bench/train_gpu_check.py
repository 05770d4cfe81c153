"""GPU check of the fine-tuning loop on the tiny model: bf16, fp16 (loss scaling), 8-bit AdamW,
gradient checkpointing on/off, the per-layer table kept on the CPU. Prints one table.

    PYTHONPATH=src python bench/train_gpu_check.py
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from g3n.errors import G3nError
from g3n.train.config import load_train_config
from g3n.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "bf16": {},
    "bf16 no-ckpt": {"gradient_checkpointing": False},
    "bf16 full FT": {"lora": False, "learning_rate": 1e-5},
    "fp16 scaled": {"dtype": "float16"},
    "bf16 adamw_8bit": {"optim": "adamw_8bit"},
}


def main() -> int:
    assert torch.cuda.is_available(), "needs CUDA"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    rows = []
    for name, extra in VARIANTS.items():
        out = Path(tempfile.mkdtemp()) / "run"
        settings = {"train_data": [str(ROOT / "examples/planets/train.jsonl")],
                    "eval_data": [str(ROOT / "examples/planets/heldout.jsonl")], "output_dir": str(out),
                    "max_steps": 30, "batch_size": 4, "max_length": 256, "learning_rate": 1e-3, "eval_steps": 30,
                    "save_steps": 30, "device": "cuda", "dtype": "bfloat16", **extra}  # fmt: skip
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            history = train(load_train_config(base=settings), progress=False)
        except (G3nError, ImportError) as e:
            rows.append((name, f"refused: {e}"))
            continue
        seconds = time.perf_counter() - start
        losses = [h["loss"] for h in history if "loss" in h]
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        skipped = sum(1 for h in history if h.get("skipped_overflow"))
        finite = all(math.isfinite(x) for x in losses + evals)
        peak = torch.cuda.max_memory_allocated() / 2**20
        summary = (
            f"finite={finite} loss {losses[0]:.3f}->{losses[-1]:.3f} eval {evals[0]:.3f}->{evals[-1]:.3f} "
            f"skipped={skipped} {seconds / 30 * 1000:.0f} ms/step peak {peak:.0f} MiB"
        )
        rows.append((name, summary))
    from g3n import load

    model, _ = load("tiny", device="cuda", ple_device="cpu")
    rows.append(("PLE table device", str(model.model.embed_tokens_per_layer.weight.device)))
    for name, text in rows:
        print(f"{name:18s} {text}")
    print(json.dumps(dict(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
