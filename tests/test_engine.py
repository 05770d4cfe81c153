"""The generation engine (static KV cache, ring buffers for sliding layers, chunked prefill, one
fixed-shape decode step) against transformers' full forward, far past the sliding window."""

import pytest
import torch

from g3n import engine
from g3n.engine import Generator

TOL = 1e-4


def _teacher_forced(model, ids, prompt_len, cuda_graph=False):
    """Logits at every position from prefill(prompt) + one decode step per following token."""
    gen = Generator(model, 1, ids.shape[1], cuda_graph=cuda_graph)
    out = [gen.prefill(ids[:, :prompt_len], torch.ones(1, prompt_len, dtype=torch.bool))]
    for pos in range(prompt_len, ids.shape[1]):
        out.append(gen.step(ids[:, pos].to(model.device), pos).clone())
    return torch.stack(out, dim=1).cpu()


@pytest.mark.parametrize("chunk", [1024, 3])
def test_decode_far_past_the_window_matches_transformers(hf_model, ours, monkeypatch, chunk):
    """Window 8, 48 positions: every ring slot is rewritten several times; chunked prefill too."""
    monkeypatch.setattr(engine, "PREFILL_CHUNK", chunk)
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf_model(ids).logits[:, 19:]
    got = _teacher_forced(ours, ids, prompt_len=20)
    assert (got - expected).abs().max() < TOL


def test_left_padded_batch_equals_rows_alone(ours):
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 300, (n,), generator=g) for n in (13, 5)]
    width, steps = 13, 20
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.bool)
    for r, x in enumerate(rows):
        ids[r, width - len(x) :], mask[r, width - len(x) :] = x, True
    follow = torch.randint(0, 300, (2, steps), generator=g)
    gen = Generator(ours, 2, width + steps)
    batched = [gen.prefill(ids, mask)] + [gen.step(follow[:, s], width + s).clone() for s in range(steps - 1)]
    for r, x in enumerate(rows):
        alone = _teacher_forced(ours, torch.cat([x, follow[r, :-1]])[None], prompt_len=len(x))[0]
        assert (torch.stack([b[r] for b in batched]) - alone).abs().max() < TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_equals_eager(hf_dir):
    from g3n.model.load import load_model

    model = load_model(hf_dir, dtype="float32", device="cuda", ple_device="cpu")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(6))
    eager = _teacher_forced(model, ids, prompt_len=10, cuda_graph=False)
    graph = _teacher_forced(model, ids, prompt_len=10, cuda_graph=True)
    assert (eager - graph).abs().max() < 1e-4
