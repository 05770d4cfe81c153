"""float16 check of the multimodal path at E2B size on a GPU (random weights, built in memory).

    PYTHONPATH=src python bench/multimodal_gpu.py

E2B's text decoder (g3n) and transformers' full-size vision (MobileNetV5-300M) and audio towers,
random weights; the vision tower's msfa.ffn.pw_proj conv scaled to the real model's abs max 98
and the norm before it scaled until plain float16 overflows (random weights alone stay small).
Prints one table: finite or not, error vs float32, time, peak memory.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from g3n.checkpoint.save import hf_config_dict
from g3n.config import TextConfig
from g3n.inference.generate import generate
from g3n.inference.sampling import SamplingParams
from g3n.model.text import Gemma3nForCausalLM, RotaryEmbedding
from g3n.model.towers import Towers, _materialize_buffers, make_convs_fp16_safe


def init_(module, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and ("norm" in name or ".bn." in name):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.normal_(0, 0.02, generator=g)
            else:  # 1 / sqrt(fan-in)
                p.normal_(0, (1.0 / p[0].numel()) ** 0.5, generator=g)


def main():
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nVisionConfig

    dev = "cuda"
    text_cfg = TextConfig(num_hidden_layers=30, intermediate_size=8192, num_kv_shared_layers=10)
    cfg = Gemma3nConfig(
        text_config=hf_config_dict(text_cfg, torch.bfloat16),
        vision_config=Gemma3nVisionConfig().to_dict(),
        audio_config=Gemma3nAudioConfig().to_dict(),
    )
    with torch.device("meta"):
        towers = Towers(cfg)
        model = Gemma3nForCausalLM(text_cfg)
    _materialize_buffers(towers, dev)
    model.to_empty(device=dev)
    model.model.rotary_emb = RotaryEmbedding(text_cfg).to(dev)
    init_(model, 0)
    init_(towers, 1)
    with torch.no_grad():
        for name, p in towers.vision_tower.named_parameters():
            if name.endswith("msfa.ffn.pw_proj.conv.weight"):
                p.mul_(98.0 / p.abs().max())
            if name.endswith("msfa.ffn.pw_exp.bn.weight"):
                p.fill_(40.0)
    towers.eval()
    print(
        f"vision tower {sum(p.numel() for p in towers.vision_tower.parameters()) / 1e6:.0f} M params, "
        f"audio tower {sum(p.numel() for p in towers.audio_tower.parameters()) / 1e6:.0f} M",
        flush=True,
    )

    pix = torch.rand(2, 3, 768, 768, device=dev, generator=torch.Generator(device=dev).manual_seed(2))
    rows = []
    with torch.no_grad():
        ref = towers.float().image_features(pix)
        half = towers.half()
        torch.cuda.synchronize()
        t = time.perf_counter()
        plain = half.image_features(pix.half())
        torch.cuda.synchronize()
        rows.append(("vision fp16 plain", bool(torch.isfinite(plain).all()), None, time.perf_counter() - t))
        n = make_convs_fp16_safe(half.vision_tower)
        half.image_features(pix.half())  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        safe = half.image_features(pix.half())
        torch.cuda.synchronize()
        err = float((safe.float() - ref).abs().mean() / ref.abs().mean())
        rows.append(
            (f"vision fp16 g3n ({n} convs f32)", bool(torch.isfinite(safe).all()), err, time.perf_counter() - t)
        )

        from transformers import Gemma3nAudioFeatureExtractor

        wav = torch.randn(16000 * 10, generator=torch.Generator().manual_seed(3)).numpy() * 0.1
        f = Gemma3nAudioFeatureExtractor()([wav], return_tensors="pt")
        feats, mask = f["input_features"].to(dev), f["input_features_mask"].bool().to(dev)
        a16 = half.audio_features(feats.half(), mask)
        a32 = towers.float().audio_features(feats, mask)
        towers.half()
        err = float((a16.float() - a32).abs().mean() / a32.abs().mean())
        rows.append(("audio fp16 (10 s)", bool(torch.isfinite(a16).all()), err, None))

    model.half()
    model.towers = towers
    t = towers.tokens
    prompt = [2, 105, 1000, 108, t.boi] + [t.image] * t.image_count + [t.eoi, 108, 2000, 106, 107, 105, 3000, 107]
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(
        model, [prompt], SamplingParams(greedy=True, max_new_tokens=32), (), 0, {"pixel_values": pix[:1].half()}
    )
    torch.cuda.synchronize()
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=dev), media={"pixel_values": pix[:1].half()})
    rows.append(("E2B fp16 image prompt: logits", bool(torch.isfinite(logits).all()), None, None))
    rows.append((f"E2B fp16 generate 32 tokens ({len(out[0])} made)", True, None, time.perf_counter() - start))
    print(f"\n{'check':<45} {'finite':>6} {'rel err vs fp32':>16} {'seconds':>8}")
    for name, finite, err, sec in rows:
        e = f"{err:.2e}" if err is not None else "-"
        s = f"{sec:.3f}" if sec is not None else "-"
        print(f"{name:<45} {finite!s:>6} {e:>16} {s:>8}")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; torch {torch.__version__}")


if __name__ == "__main__":
    main()
