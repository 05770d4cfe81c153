"""Write a random-weight Gemma 3n text checkpoint at real sizes (for slicing/loading benchmarks).

    python bench/make_synthetic_checkpoint.py --size E4B --out /tmp/e4b-random [--shard-gb 2] [--device cuda]
        [--unit-norms] [--tokenizer-from tiny]

Weights are bf16 noise (no download needed); shapes, names and config are those of the released
model's text decoder, in the multimodal layout (`model.language_model.*`) that Google ships. One
tensor at a time is held in memory. `--unit-norms` sets norm weights to 1 (q/k norms 0.25, as
bench/generate_gpu.py does): with noise norms every activation shrinks 50-fold per norm and the
logits come out flat, so quantization error is invisible. `--tokenizer-from` copies a model's
tokenizer files in, which a GGUF export needs.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from g3n.checkpoint.names import resolve_model_dir
from g3n.checkpoint.save import hf_config_dict
from g3n.config import TextConfig
from g3n.model.text import Gemma3nForCausalLM

SIZES = {"E2B": (30, 8192, 10), "E4B": (35, 16384, 15)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="E4B")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--device", default="cpu", help="where the noise is drawn (cuda: much faster)")
    ap.add_argument("--unit-norms", action="store_true", help="norm weights 1 (q/k norms 0.25) instead of noise")
    ap.add_argument("--tokenizer-from", metavar="MODEL", help="copy this model's tokenizer files (e.g. tiny)")
    args = ap.parse_args()
    layers, width, shared = SIZES[args.size]
    cfg = TextConfig(num_hidden_layers=layers, intermediate_size=width, num_kv_shared_layers=shared)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Gemma3nForCausalLM(cfg).named_parameters()}
    args.out.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(args.out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            print(f"wrote {name} ({size / 2**30:.2f} GiB)", flush=True)
        shard, size = {}, 0

    for name, shape in shapes.items():
        if args.unit_norms and name.endswith(("q_norm.weight", "k_norm.weight")):
            t = torch.full(shape, 0.25, dtype=torch.bfloat16)
        elif args.unit_norms and (name.endswith("norm.weight") or "correct_output_scale" in name):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, dtype=torch.float32, device=args.device) * 0.02).to(torch.bfloat16).cpu()
        if size + t.numel() * 2 > args.shard_gb * 2**30:
            flush()
        shard[name.replace("model.", "model.language_model.", 1)] = t
        size += t.numel() * 2
    flush()
    (args.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text = hf_config_dict(cfg, torch.bfloat16)
    config = {"model_type": "gemma3n", "architectures": ["Gemma3nForConditionalGeneration"], "text_config": text}
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    if args.tokenizer_from:
        source = resolve_model_dir(args.tokenizer_from)
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if (source / name).is_file():
                shutil.copy(source / name, args.out / name)


if __name__ == "__main__":
    main()
