"""DecodeOptions: one options object, passed explicitly to each engine, instead of environment
switches read into module globals: two engines in one process each decode as their own options
say, and nothing in the package reads the old switches."""

import re
from pathlib import Path

import pytest
import torch

import g3n
from g3n.errors import G3nError
from g3n.inference.engine import Generator
from g3n.inference.options import CompileMode, DecodeOptions
from g3n.kernels import gemv
from g3n.kernels import sampling as sample_kernels

SWITCHES = ("G3N_COMPILE", "G3N_FUSE_WEIGHTS", "G3N_DECODE_KERNELS", "G3N_GEMV", "G3N_SAMPLE_KERNELS", "G3N_PDL")


def test_compile_takes_the_cli_words_and_refuses_others():
    assert DecodeOptions().compile is CompileMode.LAYERS  # fast by default (nothing is compiled on a CPU)
    assert [DecodeOptions(compile=w).compile for w in ("off", "layers", "step")] == list(CompileMode)
    assert DecodeOptions(compile=CompileMode.LAYERS) == DecodeOptions(compile="layers")
    for bad in (True, False, None, "1", "Layers"):
        with pytest.raises(G3nError, match=f"compile must be 'off', 'layers' or 'step', not {re.escape(repr(bad))}"):
            DecodeOptions(compile=bad)
    with pytest.raises(G3nError, match="gemv must be True or False, not 0"):
        DecodeOptions(gemv=0)
    with pytest.raises(TypeError, match="options must be a DecodeOptions"):
        Generator(None, 1, 8, options="layers")


def test_two_engines_over_one_model_keep_their_own_product_choice(monkeypatch):
    """The batch-1 product choice (gemv, pdl) reaches the model's own layers per engine: two
    engines over one model, their steps interleaved, each run every product as it chose; the
    choice does not outlive the engine's calls."""
    model, _ = g3n.load("tiny", dtype="float32", device="cpu")
    calls = []
    real = gemv.product
    monkeypatch.setattr(gemv, "product", lambda x, w, kernel=True, pdl=True: calls.append((kernel, pdl)) or real(x, w))
    engines = {
        (True, True): Generator(model, 1, 16),
        (False, False): Generator(model, 1, 16, options=DecodeOptions(gemv=False, pdl=False)),
        (True, False): Generator(model, 1, 16, options=DecodeOptions(pdl=False)),
    }
    ids = torch.randint(0, 700, (1, 8), generator=torch.Generator().manual_seed(1))
    outputs = {choice: [] for choice in engines}
    for position in range(5, 8):  # prefill, then steps, the engines in turn
        for choice, gen in engines.items():
            calls.clear()
            if position == 5:
                out = gen.prefill(0, ids[0, :5])
            else:
                out = gen.step(ids[:, position - 1], [position - 1]).logits
            outputs[choice].append(out.clone())
            assert calls and set(calls) == {choice}
    calls.clear()
    model(ids[:, :1])  # the model itself, outside any engine: the default
    assert calls and set(calls) == {(True, True)}
    assert not any(gemv.ROUTE in m.__dict__ for m in model.modules())
    for choice in engines:  # on the CPU the kernel does not run: the same logits every way
        assert all(torch.equal(a, b) for a, b in zip(outputs[choice], outputs[True, True], strict=True))


def test_sampling_follows_the_engine_options(tiny, monkeypatch):
    """DecodeOptions.sample_kernels (and pdl) reach every draw of a generation: the first token's
    and the engine's steps'."""
    from g3n.inference.generate import generate_steps
    from g3n.inference.sampling import SamplingParams

    model, tok = tiny
    drawn = []

    def fake_kernels(logits, top_k, top_p, min_p, uniform, k_cap, pdl=True):
        drawn.append(pdl)
        return logits.argmax(-1)

    monkeypatch.setattr(sample_kernels, "usable_rows", lambda logits, k_cap: True)  # as on a GPU
    monkeypatch.setattr(sample_kernels, "sample_top_k_rows", fake_kernels)
    prompt = tok.encode_chat([{"role": "user", "content": "Hi"}])
    params = SamplingParams(seed=3, max_new_tokens=4)
    for options, expected in [
        (DecodeOptions(), [True] * 4),
        (DecodeOptions(pdl=False), [False] * 4),
        (DecodeOptions(sample_kernels=False), []),
    ]:
        drawn.clear()
        steps = list(generate_steps(model, [prompt], params, options=options))
        assert len(steps) == 4 and drawn == expected  # the first token, then 3 engine steps


def test_backends_pass_their_options_to_every_engine(tiny, monkeypatch):
    """TorchEngine hands its DecodeOptions to its engine, which streaming and serving share."""
    import copy

    from g3n.inference.backends import TorchEngine
    from g3n.inference.sampling import SamplingParams

    model, tok = tiny
    model = copy.deepcopy(model)  # no engines from other tests
    options = DecodeOptions(gemv=False, sample_kernels=False)
    engine = TorchEngine(model, tok, "tiny", options=options)
    ids = engine.encode_chat([{"role": "user", "content": "Hi"}])
    params = SamplingParams(greedy=True, max_new_tokens=2)
    list(engine.stream(ids, params))
    engine.submit(ids, params)
    while engine.engine.busy:
        engine.step()
    assert engine.engine.options == options
    assert TorchEngine(model, tok, "tiny").options == DecodeOptions()
    with pytest.raises(G3nError, match="options must be a DecodeOptions"):
        TorchEngine(model, tok, "tiny", options="step")


def test_nothing_reads_the_decode_switches_from_the_environment():
    """The six environment switches of the decode path are gone from the package (the tests above
    show the options doing their work instead)."""
    src = Path(g3n.__file__).parent
    found = [
        f"{path.relative_to(src)}: {name}"
        for path in sorted(src.rglob("*.py"))
        for name in SWITCHES
        if name in path.read_text()
    ]
    assert not found
