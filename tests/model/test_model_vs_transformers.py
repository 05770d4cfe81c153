"""Our decoder against transformers' Gemma3nForCausalLM on the same random weights (float32).

The tiny config exercises every feature: sliding + full layers (window 8, sequences of 24+ tokens,
more than 2 x window), KV-shared layers (5 of 10), sparse layers with different sparsities,
per-layer FFN widths, and token ids >= vocab_size_per_layer_input (256 of 300).
"""

import pytest
import torch

from helpers import make_hf_model

TOL = 1e-4


def _ids(batch, seq, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    ids[:, 5 % seq] = 299  # past the per-layer table: uses row 0
    ids[:, 7 % seq] = 256
    return ids


def test_config_exercises_every_feature(ours):
    cfg = ours.config
    assert {"sliding_attention", "full_attention"} == set(cfg.layer_types)
    assert cfg.num_kv_shared_layers > 0
    assert 0 < sum(s > 0 for s in cfg.activation_sparsity_pattern) < cfg.num_hidden_layers
    assert len(set(cfg.intermediate_size)) > 1
    assert cfg.vocab_size > cfg.vocab_size_per_layer_input


@pytest.mark.parametrize("seq", [1, 8, 24, 40])
def test_full_forward_matches(hf_model, ours, seq):
    ids = _ids(2, seq)
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape == (2, seq, 300)
    assert ref.std().item() > 0.2  # logits of a real spread, so the tolerance means something
    assert (got - ref).abs().max().item() < TOL


def test_padded_batch_matches(hf_model, ours):
    ids = _ids(3, 30, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    mask[2, :17] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf_model(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask)  # positions derived from the mask
    real = mask.bool()
    assert (got - ref)[real].abs().max().item() < TOL
    # A padded row gives the logits of the same tokens run alone.
    with torch.no_grad():
        alone = ours(ids[2:, 17:])
    assert (got[2, 17:] - alone[0]).abs().max().item() < TOL


def test_ple_ids_past_table_use_row_zero(ours):
    ids = _ids(1, 12)
    swapped = ids.clone()
    swapped[0, 5] = 0  # same PLE row, different main embedding
    with torch.no_grad():
        ple_a = ours.model.per_layer_inputs(ids, torch.zeros(1, 12, 32))
        ple_b = ours.model.per_layer_inputs(swapped, torch.zeros(1, 12, 32))
    assert torch.equal(ple_a, ple_b)


@pytest.mark.parametrize("chunks", [[40], [1] * 40, [10, 1, 1, 13, 1, 14], [9, 31]])
def test_cached_decoding_matches_full_forward(ours, chunks):
    ids = _ids(2, 40, seed=3)
    with torch.no_grad():
        full = ours(ids)
        cache, outs, start = ours.new_cache(), [], 0
        for n in chunks:
            outs.append(ours(ids[:, start : start + n], cache=cache))
            start += n
    stepped = torch.cat(outs, dim=1)
    assert (stepped - full).abs().max().item() < TOL
    # Sliding layers keep at most the window; shared layers keep nothing.
    cfg = ours.config
    for layer in range(cfg.num_hidden_layers):
        if layer >= cfg.first_kv_shared_layer:
            assert layer not in cache.keys
        elif cfg.layer_types[layer] == "sliding_attention":
            assert cache.keys[layer].shape[2] == cfg.sliding_window
        else:
            assert cache.keys[layer].shape[2] == 40


def test_cached_decoding_with_left_padding(ours):
    ids = _ids(2, 26, seed=4)
    mask = torch.ones(2, 26, dtype=torch.bool)
    mask[0, :9] = False
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = ours.new_cache()
        first = ours(ids[:, :12], attention_mask=mask[:, :12], cache=cache)
        rest = [ours(ids[:, i : i + 1], attention_mask=mask[:, i : i + 1], cache=cache) for i in range(12, 26)]
    stepped = torch.cat([first] + rest, dim=1)
    assert (stepped - full)[mask].abs().max().item() < TOL


def test_default_layer_pattern_and_sharing():
    """transformers' default pattern (4 sliding, 1 full) with 15 layers, 5 shared, no sparsity."""
    from g3n.model.load import load_model

    hf = make_hf_model(
        seed=5,
        attn_implementation="eager",
        num_hidden_layers=15,
        num_kv_shared_layers=5,
        intermediate_size=64,
        activation_sparsity_pattern=[0.0] * 15,
        sliding_window=4,
    )
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d, dtype="float32", device="cpu")
    ids = _ids(1, 20, seed=6)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_as_accurate_as_transformers(hf_model, hf_dir, ours, dtype):
    """Random weights amplify rounding, so the bound is transformers' own mean error in that dtype."""
    import copy

    from g3n.model.load import load_model

    low = load_model(hf_dir, dtype=dtype, device="cpu")
    hf_low = copy.deepcopy(hf_model).to(dtype)
    assert low.dtype == dtype
    ids = _ids(2, 24, seed=7)
    with torch.no_grad():
        ref = ours(ids)
        got = low(ids)
        hf_err = (hf_low(ids).logits.float() - ref).abs().mean().item()
    assert got.dtype == dtype and torch.isfinite(got).all()
    err = (got.float() - ref).abs().mean().item()
    assert err < 1.5 * hf_err, (err, hf_err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(hf_model, hf_dir, ours, dtype):
    """On the GPU: float32 equals the CPU result; low precision is as accurate as transformers'
    own on the same GPU; cached decoding follows the full forward."""
    import copy

    from g3n.model.load import load_model

    gpu = load_model(hf_dir, dtype=dtype, device="cuda")
    hf_gpu = copy.deepcopy(hf_model).to("cuda", dtype)
    ids = _ids(2, 40, seed=8).clamp(max=255)  # older transformers index PLE out of range on CUDA
    with torch.no_grad():
        ref = ours(ids)
        got = gpu(ids).float().cpu()
        hf_err = (hf_gpu(ids.cuda()).logits.float().cpu() - ref).abs().mean().item()
        cache = gpu.new_cache()
        stepped = torch.cat([gpu(ids[:, i : i + 1], cache=cache) for i in range(40)], dim=1).float().cpu()
    if dtype == torch.float32:
        assert (got - ref).abs().max().item() < 1e-3 and (stepped - ref).abs().max().item() < 1e-3
    else:  # random weights amplify rounding: bound by transformers' own mean error
        assert torch.isfinite(got).all() and torch.isfinite(stepped).all()
        assert (got - ref).abs().mean().item() < 1.5 * hf_err, hf_err
        assert (stepped - ref).abs().mean().item() < 1.5 * hf_err, hf_err


@pytest.mark.parametrize("size", ["E2B", "E4B"])
def test_real_sizes_have_transformers_names_and_shapes(size):
    """At the released sizes (built on the meta device) every parameter has HF's name and shape."""
    from transformers import Gemma3nForCausalLM as HFModel
    from transformers import Gemma3nTextConfig

    from g3n.config import text_config_from_dict
    from g3n.model.text import Gemma3nForCausalLM

    layers, width, shared = (30, 8192, 10) if size == "E2B" else (35, 16384, 15)
    hf_cfg = Gemma3nTextConfig(num_hidden_layers=layers, intermediate_size=width, num_kv_shared_layers=shared)
    with torch.device("meta"):
        hf = HFModel(hf_cfg)
        ours = Gemma3nForCausalLM(text_config_from_dict(hf_cfg.to_dict()))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.named_parameters()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.named_parameters()}
    assert our_shapes == hf_shapes
    text_params = sum(p.numel() for p in ours.parameters())
    expected = {"E2B": 0.54e9 + 2.01e9 + 1.84e9, "E4B": 0.54e9 + 2.35e9 + 3.91e9}[size]
    assert abs(text_params - expected) / expected < 0.02  # GEMMA3N.md rounds each part


def test_packed_samples_equal_separate_runs(ours):
    """Samples packed in one row (segment ids) give exactly the logits they give alone: positions
    restart and no token attends across samples, also past the sliding window."""
    lengths = [5, 19, 1, 11]
    samples = [_ids(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    packed = torch.cat(samples)[None]
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        got = ours(packed, segment_ids=segments)[0]
        alone = torch.cat([ours(s[None])[0] for s in samples])
    assert (got - alone).abs().max().item() < 1e-5
    with torch.no_grad():  # without segment ids the samples would see each other
        assert (ours(packed)[0] - alone).abs().max().item() > 1e-2
