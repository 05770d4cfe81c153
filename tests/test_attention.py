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
