"""Causal attention without a mask tensor (flash kernels, blocked sliding window, packed rows'
segments in each block's mask) equals SDPA with the explicit (seq x seq) mask, eagerly and under
torch.compile with changing lengths."""

import pytest
import torch
import torch.nn.functional as F

from g3n.model.text import build_mask, causal_attention

CASES = [(5, 4), (8, 4), (13, 4), (17, 8), (3, 8), (9, None), (1, 4)]


def reference(q, k, v, window, segments=None):
    index = torch.arange(q.shape[2])
    mask = build_mask(index, index, torch.ones(q.shape[0], q.shape[2], dtype=torch.bool), window, segments)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def packed(T, seed):
    """Segment ids of 2 rows: several samples of random lengths, then padding (-1) in row 1."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(2):
        cuts = sorted(torch.randint(0, T, (3,), generator=g).tolist())
        ids = torch.zeros(T, dtype=torch.long)
        for n, c in enumerate(cuts):
            ids[c:] = n + 1
        if r == 1:
            ids[T - T // 4 :] = -1
        rows.append(ids)
    return torch.stack(rows)


def inputs(T, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, T, 16, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("T,window", CASES)
def test_equals_masked_sdpa(T, window):
    q, k, v = inputs(T, T)
    torch.testing.assert_close(causal_attention(q, k, v, window), reference(q, k, v, window), atol=1e-12, rtol=0)


@pytest.mark.parametrize("T,window", CASES)
def test_packed_rows_attend_within_their_segments(T, window):
    q, k, v = inputs(T, T + 100)
    segments = packed(T, T)
    got = causal_attention(q, k, v, window, segments)
    torch.testing.assert_close(got, reference(q, k, v, window, segments), atol=1e-12, rtol=0)


def test_compiled_with_dynamic_lengths():
    attend = torch.compile(causal_attention, backend="aot_eager", dynamic=True)
    for T in (13, 21, 40, 7):
        q, k, v = inputs(T, T)
        torch.testing.assert_close(attend(q, k, v, 4), reference(q, k, v, 4), atol=1e-12, rtol=0)
        segments = packed(T, T)
        torch.testing.assert_close(attend(q, k, v, 4, segments), reference(q, k, v, 4, segments), atol=1e-12, rtol=0)


@pytest.mark.parametrize("T", [9, 13, 17])
def test_long_packed_rows_on_full_layers_attend_in_chunks(T, monkeypatch):
    """Past DENSE_MASK_MAX tokens a full layer's packed row attends in checkpointed chunks of
    queries (no (seq x seq) mask): the same outputs and gradients, also inside torch.compile."""
    from g3n.model import text

    monkeypatch.setattr(text, "DENSE_MASK_MAX", 8)
    monkeypatch.setattr(text, "QUERY_CHUNK", 5)
    q, k, v = (t.requires_grad_() for t in inputs(T, T + 200))
    segments = packed(T, T + 1)
    ref = reference(q, k, v, None, segments)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    attend = torch.compile(causal_attention, backend="aot_eager", dynamic=True)
    for fn in (causal_attention, attend):
        got = fn(q, k, v, None, segments)
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
        for g, r in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), ref_grads):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=0)
