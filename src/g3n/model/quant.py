"""4-bit (NF4) base weights for QLoRA fine-tuning and low-memory inference, through bitsandbytes.

bitsandbytes runs the same `Linear4bit` on CUDA (its kernels) and on the CPU (PyTorch ops), so the
CPU tests exercise the code path a GPU runs.

What goes 4-bit: the decoder layers' attention (q/k/v/o) and MLP (gate/up/down) projections, the
modules LoRA adapts. They hold about 98% of the decoder's matrix weights (E4B: 110 M of 112 M per
layer). Kept in 16 bits: the embeddings (`embed_tokens`, tied to the output head), the per-layer
embedding table (PLE; it may stay in CPU memory), the norms, and the small matrices (AltUp's router
and coefficients, Laurel's rank-64 pair, the per-layer input gate/projection and
`per_layer_model_projection`): they save little memory and are sensitive (AltUp's coefficients are
clipped at 120 and its router goes through tanh; the PLE path is added into every layer).

Format: NF4 in blocks of 64 weights with one scale per block, the scales themselves quantized to
8 bits in blocks of 256 ("double quantization", QLoRA paper): about 4.13 bits per weight. Weights
are quantized from the checkpoint's values cast to the compute dtype, one tensor at a time, on the
target device (the 16-bit copy of one matrix is the only extra memory).
"""

from __future__ import annotations

import torch

from g3n.errors import G3nError

QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INSTALL = "pip install 'g3n[qlora]'"
MIN_VERSION = (0, 50)  # tested here (CUDA, and the CPU through PyTorch ops)


def require_backend(device: torch.device | str = "cpu"):
    """bitsandbytes, checked to quantize on `device`; a G3nError naming what to install otherwise."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise G3nError(f"load_in_4bit needs bitsandbytes (4-bit NF4 weights): {INSTALL}") from None
    except Exception as e:  # noqa: BLE001 - a broken install (missing CUDA library, ...) reads the same to users
        raise G3nError(f"load_in_4bit: bitsandbytes is installed but does not import ({e}); {INSTALL}") from None
    version = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_VERSION:
        raise G3nError(f"load_in_4bit needs bitsandbytes >= {'.'.join(map(str, MIN_VERSION))} "
                       f"(found {bnb.__version__}): pip install -U 'g3n[qlora]'")  # fmt: skip
    try:  # a 4-bit backend for this device (bitsandbytes has none for some accelerators)
        bnb.functional.quantize_4bit(torch.zeros(64, device=device), quant_type="nf4")
    except Exception as e:  # noqa: BLE001 - whatever the backend raises, the answer is the same
        raise G3nError(f"load_in_4bit: bitsandbytes cannot quantize to 4 bits on {device} ({e})") from None
    return bnb


def is_quantized_name(name: str) -> bool:
    """Whether the parameter `name` (e.g. model.layers.3.mlp.up_proj.weight) is stored 4-bit."""
    parts = name.split(".")
    return name.startswith("model.layers.") and parts[-1] == "weight" and parts[-2] in QUANTIZED


def linear_4bit(weight: torch.Tensor, compute_dtype: torch.dtype, device: torch.device):
    """A bias-free bitsandbytes Linear4bit (NF4, double-quantized scales) holding `weight`,
    quantized on `device`; forward computes in `compute_dtype`."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
    param = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, compress_statistics=True,
                              quant_type="nf4", module=layer)  # fmt: skip
    layer.weight = param.to(device)  # quantizes there
    return layer


def is_4bit(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


def refuse_merge(model, what: str = "merging LoRA adapters") -> None:
    """Merging into 4-bit weights would round base + adapter to NF4 again: most of the adapter's
    change is smaller than NF4's step, so it would be lost, and the quantization error added."""
    if is_4bit(model):
        raise G3nError(
            f"{what} into 4-bit (NF4) weights is refused: the sum would be rounded to 4 bits again, losing most "
            "of the adapter's change; merge into the original 16-bit weights instead (g3n export --model BASE "
            "--adapter DIR, or save_merged: true, which reads the base checkpoint)"
        )


def for_training(model) -> None:
    """Keep the CPU's inference-only weight repacking (AVX512-BF16) off: after it, bitsandbytes'
    CPU matmul has no backward, so an eval between training steps would cut the input gradients."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
