"""Causal attention without a mask tensor (flash kernels, blocked sliding window) equals SDPA with
the explicit (seq x seq) mask, eagerly and under torch.compile with changing lengths."""

import pytest
import torch
import torch.nn.functional as F

from g3n.model.text import build_mask, causal_attention

CASES = [(5, 4), (8, 4), (13, 4), (17, 8), (3, 8), (9, None), (1, 4)]


def reference(q, k, v, window):
    index = torch.arange(q.shape[2])
    mask = build_mask(index, index, torch.ones(q.shape[0], q.shape[2], dtype=torch.bool), window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def inputs(T, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, T, 16, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("T,window", CASES)
def test_equals_masked_sdpa(T, window):
    q, k, v = inputs(T, T)
    torch.testing.assert_close(causal_attention(q, k, v, window), reference(q, k, v, window), atol=1e-12, rtol=0)


def test_compiled_with_dynamic_lengths():
    attend = torch.compile(causal_attention, backend="aot_eager", dynamic=True)
    for T in (13, 21, 40, 7):
        q, k, v = inputs(T, T)
        torch.testing.assert_close(attend(q, k, v, 4), reference(q, k, v, 4), atol=1e-12, rtol=0)
