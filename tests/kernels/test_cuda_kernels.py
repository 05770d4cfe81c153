"""g3n's Triton kernels compiled for a real GPU (the CPU suite runs them through Triton's
interpreter, tests/kernels/test_decode_kernels.py): batch-1 products, top-k sampling, and a bfloat16
decode through all of them against the same decode through cuBLAS and torch.topk."""

import copy

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_gemv_rounds_float32_sums_at_real_shapes():
    """E2B's batch-1 shapes: float32 sums rounded to bfloat16 (within half a bfloat16 step of the
    float32 product), on average as close to it as cuBLAS's."""
    from g3n.kernels import gemv

    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in [(3136, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (256, 2048), (2048, 256), (2048, 64)]:
        x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
        w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).bfloat16()
        assert gemv.usable(x, w)
        exact = x.float() @ w.float().T
        out = gemv.product(x, w).float()
        assert ((out - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all(), (n, k)
        cublas = torch.nn.functional.linear(x, w).float()
        assert (out - exact).abs().mean() <= 1.1 * (cublas - exact).abs().mean() + 1e-7, (n, k)


def test_cuda_sampling_kernels_draw_what_torch_draws():
    """At the vocabulary's real size and Google's settings, the kernels' token for each uniform
    number is the torch.topk path's (float logits without ties)."""
    from g3n.inference.sampling import SamplingParams, sample_tokens
    from g3n.kernels import sampling as sample_kernels

    g = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(4, 262400, device="cuda", generator=g) * 4
    for params in (SamplingParams(), SamplingParams(top_k=20, top_p=0.8, min_p=0.05)):
        for _ in range(8):
            uniform = torch.rand(4, device="cuda", generator=g)
            assert sample_kernels.usable(logits, params.top_k)
            fast = sample_tokens(logits, params, uniform=uniform)
            slow = sample_tokens(logits, params, uniform=uniform, kernels=False)
            assert torch.equal(fast, slow)


def test_cuda_bfloat16_decode_through_the_kernels_matches_cublas():
    """The compiled bfloat16 decode (decode kernels, batch-1 products, PDL) gives the logits of
    the same decode with the products on cuBLAS, as close to the float32 model's."""
    import g3n
    from g3n.inference.options import DecodeOptions
    from helpers import teacher_forced

    model, _ = g3n.load("tiny", dtype="bfloat16", device="cuda")
    f32 = copy.deepcopy(model).float()
    ids = torch.randint(0, 700, (1, 16), generator=torch.Generator().manual_seed(2))
    kernels = teacher_forced(model, ids, 10, options=DecodeOptions(compile="layers")).float()
    cublas = teacher_forced(model, ids, 10, options=DecodeOptions(compile="layers", gemv=False)).float()
    reference = teacher_forced(f32, ids, 10, cuda_graph=False).float()
    err = (kernels - reference).abs().max().item()
    assert err <= 1.25 * (cublas - reference).abs().max().item() + 1e-3
    assert (kernels - cublas).abs().max() < 0.05 * cublas.abs().max()
