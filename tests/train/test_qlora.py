"""QLoRA: 4-bit (NF4) base weights through bitsandbytes, LoRA on top, merging into the 16-bit
originals, and the errors around them. bitsandbytes runs its 4-bit layers on the CPU with PyTorch
ops, so these tests take the code path a GPU takes (the `test` extra installs it)."""

import json
import sys

import pytest
import torch

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

import g3n
import g3n.checkpoint.names
import g3n.model.load
from g3n.errors import G3nError
from g3n.model.quant import QUANTIZED
from g3n.train.loop import train
from helpers import train_config, write_capitals_dataset

# The 16 NF4 levels (QLoRA paper, appendix E): quantiles of N(0, 1) scaled to [-1, 1].
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # fmt: skip
# NF4 rounds each weight to the nearest level times its 64-weight block's absmax. For Gaussian-like
# weights the absmax of a block is about 2.4 standard deviations and the levels' spacing gives an RMS
# rounding error of about 0.1 of the weights' RMS; y = W x with random x then carries the same relative
# error. Measured on the tiny model's 165 projections: 0.076-0.106, and within 0.4% of the plain
# NF4 round trip below (the rest is the 8-bit double-quantized scales). The bound leaves room for
# other weight distributions; the lower bound shows the weights really are 4-bit.
NF4_MAX_REL_ERROR = 0.125


def nf4_reference(w: torch.Tensor) -> torch.Tensor:
    """NF4 round trip in plain PyTorch (blocks of 64, float32 scales: no double quantization)."""
    blocks = w.float().reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    levels = (blocks / absmax)[..., None].sub(NF4).abs().argmin(-1)
    return (NF4[levels] * absmax).reshape(w.shape)


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny4():
    return g3n.load("tiny", dtype="float32", device="cpu", load_in_4bit=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_capitals_dataset(tmp_path_factory.mktemp("data"))


def _cfg(dataset, out, **kw):
    return train_config(
        dataset, out, **{"max_steps": 12, "save_steps": 12, "eval_steps": 12, "load_in_4bit": True, **kw}
    )


def test_4bit_layers_match_16bit_within_nf4_error(tiny, tiny4):
    model16, model4 = tiny[0], tiny4[0]
    g = torch.Generator().manual_seed(0)
    checked = 0
    for i in (0, 9, 17, 24):  # sparse, full-attention, KV-source and KV-shared layers
        for kind in QUANTIZED:
            part = "self_attn" if kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            layer16 = getattr(getattr(model16.model.layers[i], part), kind, None)
            if layer16 is None:  # KV-shared layers have no k/v projections
                continue
            layer4 = getattr(getattr(model4.model.layers[i], part), kind)
            assert isinstance(layer4, bnb.nn.Linear4bit) and layer4.weight.quant_type == "nf4"
            assert layer4.weight.compress_statistics  # double-quantized scales
            x = torch.randn(32, layer16.in_features, generator=g)
            with torch.no_grad():
                y16, y4 = layer16(x), layer4(x)
                y_ref = x @ nf4_reference(layer16.weight).T
            error = rel(y4, y16)
            assert 0.02 < error < NF4_MAX_REL_ERROR, (i, kind, error)
            # the same error as plain NF4 rounding, up to the 8-bit double-quantized scales
            assert abs(error - rel(y_ref, y16)) < 0.02 * rel(y_ref, y16), (i, kind, error, rel(y_ref, y16))
            checked += 1
    assert checked == 4 * 7 - 2


def test_only_layer_projections_are_4bit(tiny4):
    model = tiny4[0]
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit and all(n.rpartition(".")[2] in QUANTIZED for n in four_bit)
    kept = [n for n, p in model.named_parameters() if not isinstance(p, bnb.nn.Params4bit)]
    assert all(model.get_parameter(n).dtype == torch.float32 for n in kept)
    for name in ("embed_tokens", "embed_tokens_per_layer", "altup_projections", "per_layer_model_projection", "laurel",
                 "altup.", "per_layer_input_gate", "norm"):  # fmt: skip
        assert any(name in n for n in kept), name
    with torch.no_grad():
        ids = torch.tensor([tiny4[1].encode("The capital of France is Paris.", add_bos=True)])
        assert torch.isfinite(model(ids)).all()


def test_qlora_run_lowers_loss_and_merges_from_16bit_weights(dataset, tmp_path):
    from safetensors.torch import load_file

    from g3n.export.hf import export_hf

    out = tmp_path / "run"
    history = train(_cfg(dataset, out, save_merged=True), progress=False)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert evals[-1] < 0.8 * evals[0]
    # the merged checkpoint equals the adapter merged into the 16-bit model (PEFT's merge in float32)
    export_hf("tiny", tmp_path / "reference", adapter=out / "adapter")
    merged, reference = (
        load_file(out / "merged" / "model.safetensors"),
        load_file(tmp_path / "reference" / "model.safetensors"),
    )
    base = load_file(g3n.checkpoint.names.TINY_DIR / "model.safetensors")
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in merged)
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert len(changed) == 165 and all(k.rsplit(".", 2)[-2] in QUANTIZED for k in changed)  # 25 x 7 - 10 shared k/v
    assert json.loads((out / "merged" / "config.json").read_text()) == json.loads(
        (tmp_path / "reference" / "config.json").read_text()
    )
    merged_model, _ = g3n.load(out / "merged", dtype="float32", device="cpu")
    assert merged_model.config.num_hidden_layers == 25  # a checkpoint g3n loads


def test_qlora_float16_compute_with_loss_scaling(dataset, tmp_path):
    history = train(_cfg(dataset, tmp_path / "fp16", dtype="float16", max_steps=4, eval_data=[], eval_fraction=0.0),
                    progress=False)  # fmt: skip
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    assert sum(not h.get("skipped_overflow") for h in steps) >= 2  # the scale settles; updates happen


def test_save_tensors_writes_shards_that_load(tiny, tmp_path):
    from g3n.checkpoint.save import save_tensors

    model, _ = tiny
    items = ((n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters())
    save_tensors(items, model.config, tmp_path / "ck", torch.bfloat16, shard_bytes=2**20)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    loaded, _ = g3n.load("tiny", dtype="float32", device="cpu")
    again = g3n.model.load.load_model(tmp_path / "ck", dtype="float32", device="cpu")
    ids = torch.tensor([[2, 10, 20, 30]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), again(ids))  # the shipped weights are bf16: a lossless round trip


def test_missing_backend_names_the_extra(monkeypatch, capsys):
    from g3n.cli import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(G3nError, match=r"bitsandbytes.*pip install 'g3n\[qlora\]'"):
        g3n.load("tiny", device="cpu", load_in_4bit=True)
    assert main(["generate", "--model", "tiny", "--device", "cpu", "--prompt", "hi", "--load-in-4bit"]) == 2
    assert "pip install 'g3n[qlora]'" in capsys.readouterr().err


def test_merging_into_4bit_is_refused(dataset, tmp_path):
    from g3n.adapters.lora import add_lora
    from g3n.adapters.merge import merge_lora, save_merged

    model, _ = g3n.load("tiny", dtype="float32", device="cpu", load_in_4bit=True)
    add_lora(model, r=4, alpha=4)
    assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in model.modules())  # PEFT's 4-bit LoRA layers
    with pytest.raises(G3nError, match="4-bit .*refused.*16-bit"):
        merge_lora(model)
    with pytest.raises(G3nError, match="4-bit .*refused"):
        save_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(G3nError, match="load_in_4bit .* lora: true"):
        _cfg(dataset, tmp_path / "full", lora=False)


def test_adapter_runs_beside_4bit_weights(tmp_path):
    from g3n.inference.backends import load_engine
    from g3n.inference.sampling import SamplingParams
    from helpers import tiny_with_saved_adapter

    tiny_with_saved_adapter(tmp_path / "adapter")
    plain = load_engine("tiny", dtype="float32", device="cpu", load_in_4bit=True)
    tuned = load_engine("tiny", dtype="float32", device="cpu", load_in_4bit=True, adapter=tmp_path / "adapter")
    ids = torch.tensor([plain.encode("The capital of France")])
    with torch.no_grad():
        assert (plain.model(ids) - tuned.model(ids)).abs().max() > 1e-3  # the adapter takes part
    pieces = list(tuned.stream(ids[0].tolist(), SamplingParams(temperature=0.0, max_new_tokens=5)))
    assert pieces
    with pytest.raises(G3nError, match="GGUF"):
        load_engine("model.gguf", load_in_4bit=True)


def test_compiled_decode_is_skipped_for_4bit(tiny4):
    from g3n.inference.engine import Generator
    from g3n.inference.options import CompileMode, DecodeOptions

    gen = Generator(tiny4[0], batch=1, max_len=16, options=DecodeOptions(compile="step"))
    assert gen.compile is CompileMode.OFF  # bitsandbytes' layers are not compiled (the default asks for it)


def test_compiled_training_layers_run_4bit(monkeypatch):
    """`compile: true` traces bitsandbytes' 4-bit layers and PEFT's LoRA on them (aot_eager here:
    the same tracing as inductor on GPUs, no code generation): outputs and LoRA gradients unchanged."""
    from g3n.adapters.lora import add_lora
    from g3n.train import recompute

    monkeypatch.setattr(recompute, "BACKEND", "aot_eager")
    model, tok = g3n.load("tiny", dtype="float32", device="cpu", load_in_4bit=True)
    add_lora(model, r=4, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    model.train()
    ids = torch.tensor([tok.encode("The capital of France is Paris.", add_bos=True)])
    results = []
    for compiled in (False, True):
        recompute.configure(model.model, True, compiled)
        model.zero_grad()
        logits = model(ids)
        logits.float().logsumexp(-1).mean().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((logits.detach(), grads))
    # compiled AltUp sums its 4-wide products in float32 in another order: rounding-level changes
    assert torch.allclose(results[0][0], results[1][0], atol=1e-4)
    ref = results[0][1]
    assert ref.abs().max() > 0 and (results[1][1] - ref).abs().max() <= 5e-4 * ref.abs().max()
