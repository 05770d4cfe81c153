"""What llama.cpp's Gemma 3n graph hard-codes, so configs outside it are refused before export.

llama.cpp (as vendored in llama-cpp-python 0.3.x) builds Gemma 3n with fixed sizes: 20 layers that
compute their own K/V (layers 18 and 19 are the sources of the shared ones), laurel rank 64, PLE
width 256, 4 AltUp streams and activation sparsity on exactly the first 10 layers. A model outside
these loads wrong or not at all.
"""

from __future__ import annotations

from g3n.config import TextConfig


def llama_cpp_problems(cfg: TextConfig) -> list[str]:
    """Reasons llama.cpp cannot run this config (empty when it can)."""
    problems = []
    kv_layers = cfg.num_hidden_layers - cfg.num_kv_shared_layers
    if kv_layers != 20:
        problems.append(f"{kv_layers} layers compute their own K/V; llama.cpp requires exactly 20")
    for field, want in (("laurel_rank", 64), ("hidden_size_per_layer_input", 256), ("altup_num_inputs", 4)):
        if getattr(cfg, field) != want:
            problems.append(f"{field} is {getattr(cfg, field)}; llama.cpp requires {want}")
    sparse = [s > 0 for s in cfg.activation_sparsity_pattern]
    if sparse != [i < 10 for i in range(cfg.num_hidden_layers)]:
        problems.append("activation sparsity must be on exactly the first 10 layers for llama.cpp")
    return problems
