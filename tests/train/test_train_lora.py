"""LoRA adapters: PEFT's format both ways with transformers, and merging."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

pytest.importorskip("peft")

from g3n.adapters.lora import add_lora, load_adapter, save_adapter
from g3n.adapters.merge import merge_lora, save_merged
from g3n.model.load import load_model

TOL = 1e-4


def _ids():
    return torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(5))


def _lora_model(hf_dir, **kw):
    model = add_lora(load_model(hf_dir, dtype="float32", device="cpu"), r=4, alpha=8, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter an effect to compare
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_only_adapters_train(hf_dir):
    model = _lora_model(hf_dir, mlp=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(".self_attn." in n for n in trainable)
    assert not any(".mlp." in n for n in trainable)


def test_adapter_loads_in_transformers_peft(hf_dir, tmp_path):
    from peft import PeftModel
    from transformers import Gemma3nForCausalLM

    model = _lora_model(hf_dir)
    save_adapter(model, tmp_path / "adapter", base_model=str(hf_dir))
    hf = Gemma3nForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    hf = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, ref = model(_ids()), hf(_ids()).logits
        base = load_model(hf_dir, dtype="float32", device="cpu")(_ids())
    assert (ours - base).abs().max().item() > 1e-2  # the adapter matters
    assert (ours - ref).abs().max().item() < TOL


def test_transformers_adapter_loads_in_g3n(hf_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3nForCausalLM

    hf = Gemma3nForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    hf = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf_adapter")
    ours = load_adapter(load_model(hf_dir, dtype="float32", device="cpu"), tmp_path / "hf_adapter")
    with torch.no_grad():
        assert (ours(_ids()) - hf.eval()(_ids()).logits).abs().max().item() < TOL


def test_merge_equals_adapter_and_transformers_loads_it(hf_dir, tmp_path):
    from transformers import Gemma3nForCausalLM

    model = _lora_model(hf_dir)
    with torch.no_grad():
        before = model(_ids())
        merged = merge_lora(model)(_ids())
    assert (merged - before).abs().max().item() < TOL
    out = save_merged(_lora_model(hf_dir), tmp_path / "merged", dtype=torch.float32)
    hf = Gemma3nForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (hf(_ids()).logits - before).abs().max().item() < TOL


def test_load_adapter_of_another_shape_is_one_line(tmp_path):
    """An adapter whose tensors do not fit the model: G3nError naming the adapter, the tensor and
    both shapes (was PyTorch's RuntimeError from load_state_dict), for export and serve alike."""
    import g3n
    from g3n.adapters.lora import load_adapter
    from g3n.errors import G3nError
    from helpers import tiny_with_saved_adapter, widen_first_lora_a

    tiny_with_saved_adapter(tmp_path / "adapter")
    key = widen_first_lora_a(tmp_path / "adapter")
    model, _ = g3n.load("tiny", dtype="float32", device="cpu")
    with pytest.raises(G3nError) as e:
        load_adapter(model, tmp_path / "adapter")
    width = model.get_submodule(key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")).in_features
    tensor = key.removeprefix("base_model.model.")
    assert str(e.value) == (
        f"{tmp_path / 'adapter'}: adapter tensor {tensor} has shape (4, {width + 1}), but "
        f"{tensor.removesuffix('.lora_A.weight')} needs (4, {width}): an adapter of another model (pass its base with --model)"
    )


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_bfloat16_adapter_products_keep_gradients_and_no_float32_activations(hf_dir, backend):
    """With float32 adapters on bfloat16 weights (what the training loop trains), the adapters'
    products run in bfloat16: an adapted MLP's output and gradients stay within bfloat16 rounding
    of a float32 copy's (as PEFT's float32 products do), and nothing of MLP width is kept for the
    backward pass in float32 (PEFT kept the down projection's input as a float32 copy), also
    compiled (`backend`: training compiles the MLP)."""
    import copy

    model = _lora_model(hf_dir)
    exact = copy.deepcopy(model.model.layers[0].mlp)  # float32 throughout (PEFT's path for float32)
    mlp = model.to(torch.bfloat16).model.layers[0].mlp
    for p in mlp.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    x = torch.randn(2, 20, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    peft_mlp = copy.deepcopy(mlp)
    for m in peft_mlp.modules():  # PEFT's own forward
        m.__dict__.pop("forward", None)
    width, runs = model.config.intermediate_size[0], []
    for module, dtype in ((exact, torch.float32), (mlp, torch.bfloat16), (peft_mlp, torch.bfloat16)):
        saved, xin = [], x.to(dtype).detach().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            out = (torch.compile(module, backend=backend) if backend else module)(xin)
        out.float().pow(2).sum().backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
        wide32 = [
            t
            for t in saved
            if t.dtype == torch.float32 and t.dim() and t.shape[-1] == width and t.numel() >= 40 * width
        ]
        runs.append((out.float(), xin.grad.float(), grads, wide32))
    (ref_out, ref_dx, ref_grads, _), (out, dx, grads, wide32), (peft_out, peft_dx, peft_grads, peft_wide32) = runs
    assert peft_wide32 and not wide32
    assert grads.keys() == ref_grads.keys() and len(grads) == 6
    # bfloat16 rounding (the base products', also in PEFT's path) puts both 1-2% from float32
    for ours, peft, ref, name in [(out, peft_out, ref_out, "output"), (dx, peft_dx, ref_dx, "input gradient")] + [
        (grads[n], peft_grads[n], ref, n) for n, ref in ref_grads.items()
    ]:
        assert ours.dtype == torch.float32 and _error(ours, ref) <= 1.5 * _error(peft, ref) + 5e-3, name


def _error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


class _WideBuffers(TorchDispatchMode):
    """Counts the storages of at least `numel` elements that ops made and that are still alive."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.live, self.peak = numel, set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.numel * t.element_size():
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.live:
                    self.live.add(storage.data_ptr())
                    self.peak = max(self.peak, len(self.live))
                    weakref.finalize(storage, self.live.discard, storage.data_ptr())
        return out


def _mlp_runs(hf_dir, layer: int, dtype, device="cpu"):
    """Layer `layer`'s adapted MLP run fused and through PEFT's modules (and in float32): output,
    input gradient, adapter gradients, the most (tokens x width) buffers alive at once."""
    import copy

    from g3n.train.lora_mlp import _forward, use_fused_mlp

    model = _lora_model(hf_dir).to(device)
    use_fused_mlp(model)
    exact = copy.deepcopy(model.model.layers[layer].mlp)
    mlp = model.to(dtype).model.layers[layer].mlp
    for p in mlp.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # float32 adapters, as the training loop keeps them
    assert mlp.forward.__func__ is _forward and exact.forward.__func__ is _forward
    plain = copy.deepcopy(mlp)
    plain.__dict__.pop("forward")  # the model's own MLP over PEFT's modules
    x = torch.randn(2, 20, model.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(device)
    runs = []
    for module, run_dtype in ((exact, torch.float32), (mlp, dtype), (plain, dtype)):
        xin = x.to(run_dtype).detach().requires_grad_()
        with _WideBuffers(40 * model.config.intermediate_size[layer]) as wide:
            out = module(xin)
            out.float().pow(2).sum().backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
        runs.append((out.float(), xin.grad.float(), grads, wide.peak, out.grad_fn.name()))
    return runs


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", [0, 9])  # sparse (Gaussian top-k), dense
def test_fused_lora_mlp_equals_peft_modules(hf_dir, layer, device):
    """In float32 the fused LoRA MLP (its own backward) gives the output and gradients of the model's
    MLP over PEFT's modules."""
    runs = _mlp_runs(hf_dir, layer, torch.float32, device)
    _, (out, dx, grads, _, name), (ref_out, ref_dx, ref_grads, _, ref_name) = runs
    assert "LoraMLP" in name and "LoraMLP" not in ref_name
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) == 6
    for n, ref in ref_grads.items():
        torch.testing.assert_close(grads[n], ref, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", [0, 9])
def test_fused_lora_mlp_in_bfloat16_reuses_its_buffers(hf_dir, layer, device):
    """In bfloat16 the fused MLP is as close to float32 as the model's MLP over PEFT's modules, with
    at most 4 (tokens x width) buffers alive at once (5 with the Gaussian top-k's recompute and its
    mask) where autograd's path holds more (the E4B 1 x 2048 step's peak: bench/train_gpu.py --memory)."""
    runs = _mlp_runs(hf_dir, layer, torch.bfloat16, device)
    (ref_out, ref_dx, ref_grads, _, _), (out, dx, grads, peak, _), (p_out, p_dx, p_grads, p_peak, _) = runs

    assert peak <= (4 if layer == 9 else 6) < p_peak, (peak, p_peak)
    for ours, peft, ref, name in [(out, p_out, ref_out, "output"), (dx, p_dx, ref_dx, "input gradient")] + [
        (grads[n], p_grads[n], ref, n) for n, ref in ref_grads.items()
    ]:
        assert ours.dtype == torch.float32 and _error(ours, ref) <= 1.5 * _error(peft, ref) + 5e-3, name


@pytest.mark.parametrize(
    "change,message",
    [
        ({"use_dora": True}, r"adapter_config.json: use_dora is not supported"),
        ({"peft_type": "IA3"}, r"adapter_config.json: peft_type 'IA3': g3n loads and merges LoRA adapters only"),
        ("truncate", r"adapter_model.safetensors: cannot read the adapter weights .* truncated"),
    ],
)
def test_one_rule_for_adapters_in_every_export(tmp_path, change, message):
    """A DoRA adapter merged into the HF export but was refused by the GGUF export; an IA3 adapter
    or a truncated weights file were tracebacks. Now HF export, GGUF export and loading say the same."""
    import json

    import g3n
    from g3n.errors import G3nError
    from g3n.export.gguf import export_gguf
    from g3n.export.hf import export_hf
    from helpers import tiny_with_saved_adapter

    adapter = tmp_path / "adapter"
    tiny_with_saved_adapter(adapter)
    if change == "truncate":
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    errors = []
    for export in (lambda: export_hf("tiny", tmp_path / "hf", adapter=adapter),
                   lambda: export_gguf("tiny", tmp_path / "m.gguf", adapter=adapter, quant="f32"),
                   lambda: load_adapter(g3n.load("tiny", dtype="float32", device="cpu")[0], adapter)):  # fmt: skip
        with pytest.raises(G3nError, match=message) as e:
            export()
        errors.append(str(e.value))
    assert len(set(errors)) == 1 and not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()
