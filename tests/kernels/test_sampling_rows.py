"""kernels/sampling.py's per-row top-k sampling (`sample_top_k_rows`: each row its own top_k, top_p
and min_p), run on the CPU by Triton's interpreter: as test_decode_kernels.py, this module runs
itself again in a subprocess with TRITON_INTERPRET=1 (Triton reads it when kernels are defined),
where the real tests are collected. Small shapes: the interpreter sorts about 1,000 logits a second."""

import os

import pytest
import torch

from helpers import run_under_triton_interpreter

pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") != "1":

    def test_per_row_sampling_under_the_triton_interpreter():
        run_under_triton_interpreter(__file__, passed=2, timeout=900)

else:
    from g3n.inference.sampling import SamplingParams, sample_tokens
    from g3n.kernels import sampling as sample_kernels

    VOCAB = 4000
    K_CAP = 20  # K = 32: rows with top_k below 16 keep more candidates than sample_top_k would (K = 16)
    # (top_k, top_p, min_p) a row, each row cut by another filter at its top uniform number (all three
    # keep a prefix of the sorted candidates, so at most one filter decides a row): row 0 by top-p
    # (top_k == K_CAP), row 1 by top_k 1 (argmax), row 2 by min-p (top_p 1.0), row 3 by top_k,
    # with top-p and min-p on but looser
    SETTINGS = [(20, 0.8, 0.0), (1, 1.0, 0.0), (12, 1.0, 0.3), (7, 0.95, 0.05)]
    DECIDING = {0: (20, 1.0, 0.0), 1: (K_CAP, 1.0, 0.0), 2: (12, 1.0, 0.0), 3: (K_CAP, 0.95, 0.05)}  # without it
    # two calls' uniform numbers, one a row: 0.9999 draws the last candidate a row's filters keep
    UNIFORM = torch.tensor([[0.9999, 0.3, 0.6, 0.9999], [0.5, 0.9999, 0.9999, 0.2]])

    def _torch_path(logits_row, settings, u: float) -> int:
        k, p, m = settings
        params = SamplingParams(top_k=k, top_p=p, min_p=m)
        return sample_tokens(logits_row[None], params, uniform=torch.tensor([u]), kernels=False).item()

    def test_each_row_draws_with_its_own_settings(monkeypatch):
        """sample_top_k_rows gives each row the token inference/sampling.py's torch.topk path draws
        with that row's settings, and the token sample_top_k draws for that row alone (with its own,
        smaller K for rows of small top_k; at one uniform number a row, for the interpreter's time).
        The cases tell the settings apart: on the torch path, every row's tokens change under another
        row's settings, and under its settings without the filter that decides it, so a kernel
        reading the wrong row, or skipping a filter, fails."""
        monkeypatch.setattr(sample_kernels, "BLOCK", 1024)  # 4 blocks a row, cheaper sorts than 2048's
        logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 2
        expected = torch.tensor(
            [[_torch_path(logits[r], SETTINGS[r], u) for r, u in enumerate(us.tolist())] for us in UNIFORM]
        )
        for r, row in enumerate(logits):
            others = [s for s in SETTINGS if s != SETTINGS[r]] + [DECIDING[r]]
            for settings in others:
                drawn = [_torch_path(row, settings, u) for u in UNIFORM[:, r].tolist()]
                assert drawn != expected[:, r].tolist(), (r, settings)

        top_k, top_p, min_p = (torch.tensor(column) for column in zip(*SETTINGS, strict=True))
        assert top_k.dtype == torch.int64 and top_p.dtype == min_p.dtype == torch.float32
        assert sample_kernels.usable_rows(logits, K_CAP)
        for us, tokens in zip(UNIFORM, expected, strict=True):
            assert torch.equal(sample_kernels.sample_top_k_rows(logits, top_k, top_p, min_p, us, K_CAP), tokens)

        for r, (k, p, m) in enumerate(SETTINGS):  # at the row's 0.9999 (its last kept candidate): one call a row
            c = UNIFORM[:, r].argmax()
            alone = sample_kernels.sample_top_k(logits[r : r + 1], k, p, m, UNIFORM[c, r : r + 1])
            assert torch.equal(alone, expected[c, r : r + 1])

    def test_usable_rows():
        """Float32 (batch, vocab) logits and 1 <= k_cap <= MAX_K, below the vocabulary (the torch
        path turns top-k off at a top_k as large)."""
        logits = torch.zeros(3, 500)
        assert sample_kernels.usable_rows(logits, 1) and sample_kernels.usable_rows(logits, sample_kernels.MAX_K)
        assert not sample_kernels.usable_rows(logits, 0)
        assert not sample_kernels.usable_rows(logits, sample_kernels.MAX_K + 1)
        assert not sample_kernels.usable_rows(logits[:, :100], 100)
        assert not sample_kernels.usable_rows(logits.half(), 20)
        assert not sample_kernels.usable_rows(logits[0], 20)
