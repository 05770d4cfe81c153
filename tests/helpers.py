"""Tiny random Gemma 3n checkpoints written by transformers, the numerical reference."""

from __future__ import annotations

import torch


def hf_text_config(**overrides):
    from transformers import Gemma3nTextConfig

    kw = {
        "vocab_size": 300,
        "vocab_size_per_layer_input": 256,
        "hidden_size": 32,
        "hidden_size_per_layer_input": 8,
        "intermediate_size": [64, 48, 64, 32, 64, 64, 48, 64, 64, 64],
        "num_hidden_layers": 10,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "sliding_window": 8,
        "num_kv_shared_layers": 5,
        "laurel_rank": 4,
        "altup_num_inputs": 4,
        "activation_sparsity_pattern": [0.95, 0.95, 0.9, 0.0, 0.0, 0.95, 0.0, 0.0, 0.0, 0.0],
        "max_position_embeddings": 256,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
        },
    }
    kw.update(overrides)
    return Gemma3nTextConfig(**kw)


def randomize_(model, seed=0, scale=0.4):
    """Random weights everywhere (transformers inits norms to 1 and some scales to 0).

    `scale` sets matrix weights to scale / sqrt(fan_in): deep models need less to stay tame.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "correct_output_scale" in name:
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (scale / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1))
    return model


def make_hf_model(seed=0, scale=0.4, **overrides):
    from transformers import Gemma3nForCausalLM

    torch.manual_seed(seed)
    model = Gemma3nForCausalLM(hf_text_config(**overrides)).float().eval()
    return randomize_(model, seed, scale)


def tiny_with_saved_adapter(adapter_dir, seed=0):
    """The tiny model with a LoRA adapter whose B weights are random (so it changes the logits),
    saved in PEFT's format to `adapter_dir`; returns the adapted model (float32, CPU)."""
    import g3n
    from g3n.train.lora import add_lora, save_adapter

    model, _ = g3n.load("tiny", dtype="float32", device="cpu")
    torch.manual_seed(seed)  # PEFT draws the A matrices from the global generator
    add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    save_adapter(model, adapter_dir, base_model="tiny")
    return model.eval()
