"""g3n's Triton kernels: the decode step's (kernels/decode.py), top-k sampling's
(kernels/sampling.py) and batch-1 products' (kernels/gemv.py), and the engine's options choosing
them, run on the CPU by Triton's interpreter: this module runs itself again in a subprocess with
TRITON_INTERPRET=1 (Triton reads it when kernels are defined), where the real tests are collected."""

import os

import pytest
import torch

from helpers import run_under_triton_interpreter

pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") != "1":

    def test_kernels_under_the_triton_interpreter():
        run_under_triton_interpreter(__file__, passed=12, timeout=1800)

else:
    import copy

    import g3n
    from g3n.inference.engine import Generator
    from g3n.inference.generate import generate_steps
    from g3n.inference.options import DecodeOptions
    from g3n.inference.sampling import SamplingParams, candidate_probs, draw, sample_tokens
    from g3n.kernels import decode as decode_kernels
    from g3n.kernels import gemv
    from g3n.kernels import sampling as sample_kernels
    from helpers import record_layer_compiles, teacher_forced

    @pytest.fixture(scope="module")
    def bf16_and_f32():
        model, _ = g3n.load("tiny", dtype="bfloat16")
        return model, copy.deepcopy(model).float()

    def _err(a, b) -> float:
        return (a.float() - b.float()).abs().max().item()

    def _check(kernel_out, eager_out, f32_out):
        """As close to float32 as eager bfloat16 (the same roundings: only the float32 sums'
        order differs), and within one bfloat16 step of eager bfloat16."""
        assert _err(kernel_out, f32_out) <= 1.25 * _err(eager_out, f32_out) + 1e-3
        assert _err(kernel_out, eager_out) <= 2**-7 * eager_out.float().abs().max().item()

    @pytest.mark.parametrize("index", [0, 9, 24])  # sparse, dense, KV-shared
    def test_each_kernel_rounds_as_eager_bfloat16(bf16_and_f32, index):
        model, f32 = bf16_and_f32
        layer, ref = model.model.layers[index], f32.model.layers[index]
        assert decode_kernels.usable(torch.zeros(1, dtype=torch.bfloat16), model.config)
        g = torch.Generator().manual_seed(index)
        hidden = model.config.hidden_size
        streams = (torch.randn(4, 2, 1, hidden, generator=g) * 3).bfloat16()
        h, mlp_out, projected = (torch.randn(2, 1, hidden, generator=g).bfloat16() for _ in range(3))

        predictions, normed = decode_kernels.predict_and_norm(layer, streams)
        eager_p = layer.altup.predict(streams)
        f32_p = ref.altup.predict(streams.float())
        _check(predictions, eager_p, f32_p)
        _check(normed, layer.input_layernorm(eager_p[0]), ref.input_layernorm(f32_p[0]))

        corrected, first = decode_kernels.correct(layer, predictions, h, mlp_out)
        eager_c = layer.altup.correct(predictions, h + layer.post_feedforward_layernorm(mlp_out))
        f32_c = ref.altup.correct(predictions.float(), h.float() + ref.post_feedforward_layernorm(mlp_out.float()))
        _check(corrected, eager_c, f32_c)
        _check(first, layer.altup.scale_corrected_output(eager_c[0]), ref.altup.scale_corrected_output(f32_c[0]))

        out = decode_kernels.add_per_layer_input(layer, corrected, projected)
        ple, ple32 = layer.post_per_layer_input_norm(projected), ref.post_per_layer_input_norm(projected.float())
        assert torch.equal(out[0], corrected[0])
        _check(out[1:], corrected[1:] + ple, corrected[1:].float() + ple32)

    def test_flash_decoding_equals_softmax_attention():
        """attend (splits of the keys scored by the kernel, combined in PyTorch) equals softmax
        attention in float32: over several splits and several loop steps per split, a key count
        that is no multiple of a step, masked keys, and a split whose keys are all masked."""
        g = torch.Generator().manual_seed(0)
        keys = decode_kernels.ATTEND_SPLITS * decode_kernels.ATTEND_BLOCK + 70  # 2 steps per split
        q = torch.randn(2, 2, 4, 64, generator=g).bfloat16()
        k, v = (torch.randn(2, 2, keys, 64, generator=g).bfloat16() for _ in range(2))
        valid = torch.rand(2, keys, generator=g) < 0.7
        valid[1, :200] = False  # row 1's first splits see no key
        out = decode_kernels.attend(q, k, v, valid)
        scores = torch.einsum("bhgd,bhkd->bhgk", q.float(), k.float()).masked_fill(~valid[:, None, None], float("-inf"))
        expected = torch.einsum("bhgk,bhkd->bhgd", scores.softmax(-1), v.float())
        assert out.dtype == torch.bfloat16
        # rounded to nearest as .to(): the float32 result's rounding, barring ties of the sums' order
        assert (out != expected.bfloat16()).float().mean() < 0.01
        assert ((out.float() - expected).abs() <= expected.abs() * 2**-8 + 1e-6).all()

    def _teacher_forced(model, ids, prompt_len, **kw):
        return teacher_forced(model, ids, prompt_len, cuda_graph=False, **kw).float()

    def test_decode_through_the_kernels_equals_the_fused_decode(bf16_and_f32, monkeypatch):
        """The decode layers with the kernels give the logits of the same layers without them (as
        close to the float32 model's), and the kernels did run."""
        model, f32 = bf16_and_f32
        ids = torch.randint(0, 700, (1, 13), generator=torch.Generator().manual_seed(3))
        plain = _teacher_forced(model, ids, 10, fused=True, options=DecodeOptions(decode_kernels=False))
        reference = _teacher_forced(f32, ids, 10, fused=False)
        calls = []
        for name in ("predict_and_norm", "attend"):
            kernel = getattr(decode_kernels, name)
            monkeypatch.setattr(decode_kernels, name, lambda *a, k=kernel, n=name: calls.append(n) or k(*a))
        kernels = _teacher_forced(model, ids, 10, fused=True)  # DecodeOptions' default: the kernels on
        for name in ("predict_and_norm", "attend"):
            assert calls.count(name) == 3 * len(model.model.layers)  # 3 decode steps
        assert _err(kernels, reference) <= 1.25 * _err(plain, reference) + 1e-3
        assert _err(kernels, plain) < 0.05 * plain.abs().max().item()

    def test_compiled_layer_keeps_the_kernels_as_opaque_ops(bf16_and_f32, monkeypatch):
        """Under torch.compile the kernels are custom ops (no compiler traces them): one graph per
        kind of layer holds them, and the compiled step decodes as the uncompiled one."""
        model, _ = bf16_and_f32
        graphs = record_layer_compiles(monkeypatch)
        ids = torch.randint(0, 700, (1, 12), generator=torch.Generator().manual_seed(4))
        with torch._dynamo.config.patch(recompile_limit=64):
            layered = _teacher_forced(model, ids, 10, fused="layers")
        eager = _teacher_forced(model, ids, 10, fused=True)
        code = "\n".join(gm.code for gm in graphs["layer"])
        for op in ("altup_predict", "altup_correct", "add_per_layer_input", "attend"):
            assert f"g3n.{op}" in code
        assert torch.equal(layered, eager)

    @pytest.mark.parametrize(
        "params",
        [
            SamplingParams(),  # Google's: top_k 64, top_p 0.95
            SamplingParams(top_k=40, top_p=0.5, min_p=0.1, temperature=0.7),
            SamplingParams(top_k=1, repetition_penalty=1.3),
        ],
    )
    def test_top_k_sampling_kernels_draw_what_the_torch_path_draws(params, monkeypatch):
        """sample_tokens through the kernels (several rounds of block top-k, then the sampling
        program) picks, at the same uniform numbers, the token inference/sampling.py's torch.topk path
        picks: top-k, top-p, min-p, temperature and the repetition penalty all applied alike."""
        monkeypatch.setattr(sample_kernels, "BLOCK", 256)  # 12 blocks, then two rounds of candidates
        monkeypatch.setattr(sample_kernels, "FINAL", 256)
        g = torch.Generator().manual_seed(params.top_k)
        logits = torch.randn(3, 3000, generator=g) * 4
        seen = torch.rand(3, 3000, generator=g) < 0.01
        calls = []
        real = sample_kernels.sample_top_k
        monkeypatch.setattr(sample_kernels, "sample_top_k", lambda *a: calls.append(1) or real(*a))
        for _ in range(3):
            uniform = torch.rand(3, generator=g)
            probs, ids = candidate_probs(logits, params, seen)
            expected = ids.gather(-1, draw(probs, uniform)).squeeze(-1)
            assert torch.equal(sample_tokens(logits, params, seen, uniform), expected)
        assert len(calls) == 3

    def test_two_engines_over_one_model_decode_with_their_own_kernels(bf16_and_f32, monkeypatch):
        """Two engines over one bfloat16 model, their steps interleaved: the one with the decode
        kernels and the batch-1 product kernel on runs them, the one with both off runs neither
        (PyTorch and F.linear), and each decodes as it does alone."""
        model, _ = bf16_and_f32
        model = copy.deepcopy(model)  # the fused decode fuses its weights (views)
        calls = []
        for module, name in ((decode_kernels, "predict_and_norm"), (decode_kernels, "attend"), (gemv, "gemv")):
            kernel = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, k=kernel, n=name, **kw: calls.append(n) or k(*a, **kw))
        ids = torch.randint(0, 700, (1, 11), generator=torch.Generator().manual_seed(6))
        choices = {"on": DecodeOptions(), "off": DecodeOptions(decode_kernels=False, gemv=False)}
        alone = {c: _teacher_forced(model, ids, 10, fused=True, options=o) for c, o in choices.items()}
        engines = {c: Generator(model, 1, 11, options=o, cuda_graph=False, fused=True) for c, o in choices.items()}
        for gen in engines.values():
            gen.prefill(0, ids[0, :10])
        layers = len(model.model.layers)
        for pos in range(10, 11):  # one step each, after both prefills: interleaved, at the interpreter's cost
            for choice, gen in engines.items():
                calls.clear()
                logits = gen.step(ids[:, pos], [pos]).logits.float()
                assert torch.equal(logits, alone[choice][:, pos - 9])
                if choice == "on":
                    assert calls.count("predict_and_norm") == calls.count("attend") == layers
                    assert calls.count("gemv") > layers  # every batch-1 product
                else:
                    assert not calls

    def test_sampling_through_the_kernels_or_not_as_the_options_say(monkeypatch):
        """generate_steps draws through the sampling kernels by default and through the torch.topk
        path with sample_kernels off: the same tokens at the same seed (the kernels draw what the
        torch path draws), the kernels run only in the first."""
        model, tok = g3n.load("tiny", dtype="float32")  # float32 logits: no ties for the two paths to order apart
        calls = []
        real = sample_kernels.sample_top_k_rows
        monkeypatch.setattr(sample_kernels, "sample_top_k_rows", lambda *a: calls.append(1) or real(*a))
        prompt = tok.encode_chat([{"role": "user", "content": "Hi"}])
        params = SamplingParams(seed=4, max_new_tokens=4, temperature=0.8)
        with_kernels = list(generate_steps(model, [prompt], params))
        assert len(calls) == len(with_kernels) == 4
        calls.clear()
        without = list(generate_steps(model, [prompt], params, options=DecodeOptions(sample_kernels=False)))
        assert not calls and without == with_kernels

    def test_batch_one_products_equal_float32_products_rounded():
        """gemv (the kernel for one token row) gives F.linear's float32 sums rounded to bfloat16,
        for the shapes it is configured for; `project` takes it only for one row without
        gradients, and plain nn.Linear (no bias)."""
        g = torch.Generator().manual_seed(5)
        for n, k in [(40, 128), (256, 2048), (2048, 256), (64, 64)]:
            x = torch.randn(1, 1, k, generator=g).bfloat16()
            w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
            assert gemv.usable(x, w)
            exact = x.float() @ w.float().T
            out = gemv.product(x, w)
            assert out.shape == (1, 1, n) and out.dtype == torch.bfloat16
            assert ((out.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
        linear = torch.nn.Linear(128, 40, bias=False).bfloat16()
        calls = []
        real = gemv.gemv
        gemv_spy = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gemv, "gemv", gemv_spy)
            with torch.no_grad():
                gemv.project(linear, torch.randn(1, 128).bfloat16())
                gemv.project(linear, torch.randn(2, 128).bfloat16())  # two rows: F.linear
            gemv.project(linear, torch.randn(1, 128).bfloat16())  # weight needs grad: F.linear
        assert len(calls) == 1
