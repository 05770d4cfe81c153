"""The chunked, soft-capped cross-entropy equals the naive loss in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from g3n.train import lora_mlp, recompute
from g3n.train.loss import IGNORE, causal_lm_loss, chunked_cross_entropy


def naive(hidden, weight, labels, softcap):
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, ignore_index=IGNORE)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("softcap,chunk", [(30.0, 7), (30.0, 1000), (None, 16)])
def test_value_and_gradients(softcap, chunk, compiled, monkeypatch):
    """Compiled, the gradient takes another form (the target's -1 by comparison, no scatter)."""
    monkeypatch.setattr(recompute, "BACKEND", "aot_eager")
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(50, 24, generator=g) * 3).requires_grad_()
    weight = torch.randn(300, 24, generator=g).requires_grad_()
    labels = torch.randint(0, 300, (50,), generator=g)
    labels[::4] = IGNORE
    ref = naive(hidden, weight, labels, softcap)
    ref_gh, ref_gw = torch.autograd.grad(ref, (hidden, weight))
    got = chunked_cross_entropy(hidden, weight, labels, softcap, chunk, compiled)
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(gh, ref_gh, atol=1e-5, rtol=1e-4)
    assert torch.allclose(gw, ref_gw, atol=1e-5, rtol=1e-4)


def test_all_ignored_gives_zero():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = chunked_cross_entropy(hidden, torch.randn(20, 8), torch.full((4,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_model_loss_equals_transformers(hf_model, ours):
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :6] = IGNORE
    with torch.no_grad():
        ref = hf_model(ids, labels=labels).loss
        got = causal_lm_loss(ours, ids, labels, chunk=8)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_gradient_checkpointing_keeps_loss_and_gradients(hf_dir, packed, monkeypatch):
    """Recomputing layers in backward, on the device or with inputs offloaded, compiled layers
    (traced by torch.compile; aot_eager here, inductor on GPUs) and long rows' per-token work in
    checkpointed tiles change nothing: KV-shared layers get the sources' K/V gradients, and LoRA
    dropout draws the same masks when recomputed."""
    from g3n.adapters.lora import add_lora
    from g3n.model.load import load_model

    monkeypatch.setattr(recompute, "BACKEND", "aot_eager")
    model = load_model(hf_dir, dtype="float32", device="cpu").requires_grad_(True).train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (2, 24), generator=g)
    labels = ids.clone()
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 24]) if packed else None
    results = []
    modes = [(False, False, 0), (True, False, 0), ("offload", False, 0), ("offload", True, 0), (True, True, 0),
             ("offload", False, 7), ("offload", True, 7)]  # fmt: skip
    for checkpointing, compiled, tile in modes if packed else modes[:3] + modes[-1:]:
        recompute.configure(model.model, checkpointing, compiled)
        if tile:  # per-token work in tiles of 7 tokens (the last one shorter)
            monkeypatch.setattr(recompute, "TILE_FROM", tile)
            monkeypatch.setattr(recompute, "TILE", tile)
        model.zero_grad()
        torch.manual_seed(0)
        loss = causal_lm_loss(model, ids, labels, None, segments)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((compiled or tile, loss.item(), grads))
    _, loss_a, grads_a = results[0]
    assert len(grads_a) > 100
    for reordered, loss_b, grads_b in results[1:]:
        assert loss_a == pytest.approx(loss_b, abs=1e-6)
        assert grads_a.keys() == grads_b.keys()
        for name, ref in grads_a.items():
            if reordered:  # float32 sums in another order (AltUp as broadcast sums, fused loss, tiles): ~1e-4
                assert (grads_b[name] - ref).abs().max() <= 5e-4 * ref.abs().max() + 1e-7, name
            else:
                torch.testing.assert_close(grads_b[name], ref, atol=1e-5, rtol=1e-4, msg=name)

    add_lora(model, r=4, alpha=8, dropout=0.3)  # dropout: the recompute must replay the RNG
    results = []
    monkeypatch.setattr(recompute, "TILE_FROM", 7)
    monkeypatch.setattr(recompute, "TILE", 7)
    for checkpointing in (False, "offload"):
        recompute.configure(model.model, checkpointing, False)
        model.zero_grad()
        torch.manual_seed(0)
        causal_lm_loss(model, ids, labels, None, segments).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(results[0]) > 20
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], atol=1e-5, rtol=1e-4, msg=name)

    # fused_lora_mlp without dropout: the MLPs take train/lora_mlp.py's path, also inside recomputed,
    # offloaded and compiled layers (where it runs between two compiled graphs)
    for module in model.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = torch.nn.Identity()
    lora_mlp.use_fused_mlp(model)
    fused_calls, apply = [], lora_mlp._LoraMLP.apply
    monkeypatch.setattr(lora_mlp._LoraMLP, "apply", lambda *a: fused_calls.append(1) or apply(*a))
    results = []
    for checkpointing, compiled in ((False, False), ("offload", False), ("offload", True), (True, True)):
        recompute.configure(model.model, checkpointing, compiled)
        model.zero_grad()
        causal_lm_loss(model, ids, labels, None, segments).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(fused_calls) >= 4 * len(model.model.layers)  # every layer, and again in each recompute
    for grads in results[1:]:
        for name, ref in results[0].items():
            assert (grads[name] - ref).abs().max() <= 5e-4 * ref.abs().max() + 1e-7, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_tiles_and_compile_on_cuda_keep_loss_and_gradients(hf_dir, monkeypatch):
    """On a GPU, offloading goes through pinned memory, a side stream and prefetching, and compiled
    layers through inductor: the same loss and gradients as keeping every activation."""
    from g3n.model.load import load_model

    model = load_model(hf_dir, dtype="float32", device="cuda", ple_device="cpu").requires_grad_(True).train()
    model.model.embed_tokens_per_layer.requires_grad_(False)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3)).cuda()
    results = []
    for checkpointing, compiled, tile in ((False, False, 0), ("offload", False, 0), ("offload", False, 16),
                                          ("offload", True, 16), (True, True, 0)):  # fmt: skip
        monkeypatch.setattr(recompute, "TILE_FROM", tile or 8192)
        monkeypatch.setattr(recompute, "TILE", tile or 4096)
        recompute.configure(model.model, checkpointing, compiled)
        model.zero_grad()
        for _ in range(2):  # the second step reuses the pinned buffers
            model.zero_grad()
            loss = causal_lm_loss(model, ids, ids.clone())
            loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    loss_a, grads_a = results[0]
    for loss_b, grads_b in results[1:]:
        assert loss_b == pytest.approx(loss_a, abs=1e-4)
        for name, ref in grads_a.items():
            assert (grads_b[name] - ref).abs().max() <= 1e-3 * ref.abs().max() + 1e-6, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_reads_the_cpu_table_through_the_mapped_view(hf_dir, monkeypatch):
    """With the per-layer table in CPU memory, a CUDA model gathers the rows of its ids on the GPU
    through the page-locked view (no host gather): the same loss and gradients as the host gather."""
    from g3n.model import ple_table
    from g3n.model.load import load_model

    model = load_model(hf_dir, dtype="float32", device="cuda", ple_device="cpu").requires_grad_(True).train()
    model.model.embed_tokens_per_layer.requires_grad_(False)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(4)).cuda()
    results = []
    for mapped in (True, False):
        if not mapped:
            monkeypatch.setattr(ple_table, "device_view", lambda body, device: None)
        model.zero_grad()
        loss = causal_lm_loss(model, ids, ids.clone())
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        if mapped:
            assert isinstance(model.model._mapped_ple, ple_table._MappedTable)
    assert results[0][0] == results[1][0]
    for name, ref in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], ref, atol=0, rtol=0, msg=name)


def test_float16_sparse_mlp_backward_does_not_overflow():
    """The Gaussian top-k's statistics sum `width` gradients per token in backward: in float16 that
    sum overflowed at a loss scale of 32 on E2B (bench/train_gpu.py's probe). Here the per-element
    gradients (~240) are far inside float16's range and their sum (~49000) times Phi^-1(0.95) is
    not, while the input's true gradient (~41000) is: it must be finite and equal float32's."""
    from g3n.config import text_config_from_dict
    from g3n.model.text import MLP
    from helpers import hf_text_config

    cfg = text_config_from_dict(hf_text_config(intermediate_size=4096, hidden_size=8).to_dict())
    mlp = MLP(cfg, 0)  # sparsity 0.95: about 205 of 4096 gate values pass
    assert mlp.std_multiplier is not None
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mlp.gate_proj.weight.zero_()[:, 0] = torch.randn(4096, generator=g)
        mlp.up_proj.weight.zero_()[:, 0] = 1.0
        mlp.down_proj.weight.fill_(1.0)
    x = torch.zeros(1, 1, 8)
    x[..., 0] = 1.0
    grads = {}
    for dtype in (torch.float32, torch.float16):
        m, xi = MLP(cfg, 0).to(dtype), x.to(dtype).detach().requires_grad_()
        m.load_state_dict(mlp.state_dict())
        m(xi).backward(torch.full((1, 1, 8), 30.0, dtype=dtype))
        grads[dtype] = xi.grad.float()
    assert torch.isfinite(grads[torch.float16]).all()
    assert torch.allclose(grads[torch.float16], grads[torch.float32], rtol=2e-2, atol=1.0)


@pytest.mark.parametrize("compiled", [False, True])
def test_float16_altup_backward_does_not_overflow(compiled):
    """AltUp's 4 x 4 coefficients' gradient sums hidden_size products of gradient and stream
    (prediction) or innovation (correction): in float16 that overflowed at a loss scale of 256 on
    E2B. Here each product is 4 x 8 and the sum over 4096 hidden units is ~131000, out of float16's
    range, while the inputs' true gradients are ~4-16 (the router's weights and 1/hidden_size
    scale shrink that sum on its way back): they must be finite and equal float32's, eagerly and
    compiled."""
    from g3n.config import text_config_from_dict
    from g3n.model.text import AltUp
    from helpers import hf_text_config

    cfg = text_config_from_dict(hf_text_config(hidden_size=4096).to_dict())
    g = torch.Generator().manual_seed(0)
    altup = AltUp(cfg)
    with torch.no_grad():
        for w in altup.parameters():
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
        altup.router_norm.weight.fill_(1.0)
    altup.half().float()  # the same (float16-rounded) weights in both dtypes
    streams = (8.0 + 0.5 * torch.randn(4, 1, 2, 4096, generator=g)).half().float()
    step = (8.0 + 0.5 * torch.randn(1, 2, 4096, generator=g)).half().float()  # innovation ~8

    def run(dtype):
        m = AltUp(cfg).to(dtype)
        m.load_state_dict(altup.state_dict())
        m.requires_grad_(False)  # float16 trains LoRA only: AltUp's weights are frozen
        s = streams.to(dtype, copy=True).requires_grad_()
        predict = torch.compile(m.predict, backend="aot_eager") if compiled else m.predict
        correct = torch.compile(m.correct, backend="aot_eager") if compiled else m.correct
        predictions = predict(s)
        p = predictions.detach().requires_grad_()
        a = (p[cfg.altup_active_idx] + step.to(dtype)).detach().requires_grad_()
        corrected = correct(p, a)
        assert predictions.dtype == corrected.dtype == dtype
        predictions.backward(torch.full_like(predictions, 4.0))
        corrected.backward(torch.full_like(corrected, 4.0))
        return [t.grad.float() for t in (s, p, a)]

    names = ("streams (predict)", "predictions (correct)", "activated (correct)")
    grads = dict(zip(names, zip(run(torch.float16), run(torch.float32))))
    assert not [name for name, (got, _) in grads.items() if not torch.isfinite(got).all()]
    for name, (got, ref) in grads.items():
        assert ref.abs().max() < 100, name
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2, msg=name)


def test_compiled_checkpointed_layers_recompute_with_their_own_graph(monkeypatch):
    """Checkpointed layers must recompute with the compiled graph their forward ran. After a
    48-token row, a 160-token row makes dynamo add a dynamic-shape graph beside the static one;
    tried most recent first, the next (packed) row's recompute picked another graph than its
    forward, whose saved tensors differ under inductor, and backward stopped with CheckpointError
    (an H200 at 32K tokens; pytorch/pytorch#166926). Here with inductor on the CPU, tiles, the
    dense-mask limit and query chunks at 64 tokens: the packed row trains (it raised without
    recompute.dynamo_settings) and its loss and gradients equal the uncompiled run's."""
    from g3n.adapters.lora import add_lora
    from g3n.config import text_config_from_dict
    from g3n.model import text
    from g3n.model.text import Gemma3nForCausalLM
    from helpers import hf_text_config

    torch._dynamo.reset()
    monkeypatch.setattr(recompute, "BACKEND", "inductor")
    for name in ("TILE_FROM", "TILE"):
        monkeypatch.setattr(recompute, name, 64)
    monkeypatch.setattr(text, "DENSE_MASK_MAX", 64)
    monkeypatch.setattr(text, "QUERY_CHUNK", 64)
    hf = hf_text_config(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=32, sliding_window=16,
                        intermediate_size=128, num_hidden_layers=10, num_kv_shared_layers=5,
                        activation_sparsity_pattern=[0.95] * 3 + [0.0] * 7)  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3nForCausalLM(text_config_from_dict(hf.to_dict()))
    for n, p in model.named_parameters():
        torch.nn.init.ones_(p) if "norm" in n else torch.nn.init.normal_(p, std=0.05)
    add_lora(model, 16, 16, 0.0)
    model.train()
    g = torch.Generator().manual_seed(3)
    segments = torch.repeat_interleave(torch.arange(5), torch.tensor([40, 8, 33, 39, 40]))[None]
    rows = [(torch.randint(0, 300, (1, n), generator=g), None) for n in (48, 160)]
    rows.append((torch.randint(0, 300, (1, 160), generator=g), segments))
    for checkpointing, compiled in (("offload", True), (False, False)):
        recompute.configure(model.model, checkpointing, compiled)
        for ids, seg in rows if compiled else rows[-1:]:
            model.zero_grad()
            loss = causal_lm_loss(model, ids, ids.clone(), None, seg)
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if compiled:
            got = (loss.item(), grads)
    torch._dynamo.reset()
    assert got[0] == pytest.approx(loss.item(), abs=1e-5)
    assert got[1].keys() == grads.keys() and len(grads) > 20
    for name, ref in grads.items():  # float32 sums in other orders (fused kernels, tiles, chunks)
        assert (got[1][name] - ref).abs().max() <= 1e-3 * ref.abs().max() + 1e-7, name
