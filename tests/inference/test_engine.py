"""The generation engine (static KV cache, ring buffers for sliding layers, chunked prefill, one
fixed-shape decode step, the fused decode layers a compiled step runs) against transformers' full
forward, far past the sliding window."""

import copy
import warnings

import pytest
import torch

from g3n.inference import decode, engine
from g3n.inference.decode import cache_bucket
from g3n.inference.engine import Generator
from g3n.inference.options import CompileMode, DecodeOptions
from helpers import fake_cuda_graph, record_layer_compiles, teacher_forced

TOL = 1e-4


@pytest.mark.parametrize("chunk,fused", [(1024, False), (3, False), (1024, True)])
def test_decode_far_past_the_window_matches_transformers(hf_model, ours, monkeypatch, chunk, fused):
    """Window 8, 48 positions: every ring slot is rewritten several times; chunked prefill too;
    `fused`: the decode layers the compiled GPU step is made of (AltUp without GEMMs, GQA without
    K/V copies), run eagerly here."""
    monkeypatch.setattr(decode, "PREFILL_CHUNK", chunk)
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf_model(ids).logits[:, 19:]
    got = teacher_forced(ours, ids, prompt_len=20, cuda_graph=False, fused=fused)
    assert (got - expected).abs().max() < TOL


def test_cache_bucket_rounds_up_within_the_context():
    """Compiled steps are specialised to the cache length, so lengths share power-of-two buckets."""
    assert [cache_bucket(n, 32768) for n in (1, 768, 1024, 1025, 30064)] == [1024, 1024, 1024, 2048, 32768]
    assert cache_bucket(200, 256) == 256 and cache_bucket(5000, 4096) == 5000


@pytest.mark.parametrize("fused", [False, True])
def test_rows_at_their_own_positions_equal_rows_alone(ours, fused):
    """Two rows of different lengths share a step, each at its own position (no padding); a row
    the step does not write (live False) keeps its cache as it was."""
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 300, (n,), generator=g) for n in (13, 5)]
    steps = 20
    follow = torch.randint(0, 300, (2, steps), generator=g)
    gen = Generator(ours, 2, 13 + steps, fused=fused)
    first = [gen.prefill(r, x)[0] for r, x in enumerate(rows)]
    batched = [torch.stack(first)]
    for s in range(steps - 1):
        batched.append(gen.step(follow[:, s], [13 + s, 5 + s]).logits.clone())
        if s == 3:  # a step that writes neither row changes nothing
            held = {k: v.clone() for k, v in gen.cache.keys.items()}
            gen.step(follow[:, 0], [13 + s + 1, 5 + s + 1], live=torch.tensor([False, False]))
            assert all(torch.equal(held[k], gen.cache.keys[k]) for k in held)
    for r, x in enumerate(rows):
        alone = teacher_forced(ours, torch.cat([x, follow[r, :-1]])[None], prompt_len=len(x), fused=fused)[0]
        assert (torch.stack([b[r] for b in batched]) - alone).abs().max() < TOL


def test_decode_compiles_after_training_compiled_in_the_same_process():
    """Training's compiled calls turn dynamo's suppress_errors on only while they run: after one
    ran, the process's setting is unchanged, and the decode step's strict setting still lets
    torch.compile build and still raises past the recompile limit instead of running uncompiled."""
    from g3n.train import recompute

    assert torch._dynamo.config.suppress_errors is False
    trained = recompute.in_training_settings(torch.compile(lambda x: x + 1, backend="eager"))
    assert trained(torch.ones(2)).tolist() == [2.0, 2.0]
    assert torch._dynamo.config.suppress_errors is False
    with decode.strict_dynamo(), torch._dynamo.config.patch(recompile_limit=1):
        double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
        assert double(torch.ones(2)).tolist() == [2.0, 2.0]
        with pytest.raises(Exception, match="recompile"):
            double(torch.ones(3))
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["step", "layers"])
def test_cuda_graph_and_compiled_steps_equal_eager(hf_dir, mode):
    """`mode`: the whole step compiled, or each kind of layer (compile="layers")."""
    compiled_mode = DecodeOptions(compile=mode)
    from g3n.model.load import load_model

    model = load_model(hf_dir, dtype="float32", device="cuda", ple_device="cpu")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(6))
    eager = teacher_forced(model, ids, prompt_len=10, cuda_graph=False)
    graph = teacher_forced(model, ids, prompt_len=10, cuda_graph=True, options=DecodeOptions(compile="off"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "torch.compile of the decode (step|layers) failed")  # no silent fallback
        compiled = teacher_forced(model, ids, prompt_len=10, cuda_graph=True, options=compiled_mode)
    assert (eager - graph).abs().max() < 1e-4
    assert (eager - compiled).abs().max() < 1e-4
    # A second request whose token column has other strides reuses the compiled step: a
    # recompile (minutes at real sizes) would raise here, warn and fail.
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.filterwarnings("error", "torch.compile of the decode (step|layers) failed")
        again = teacher_forced(model, ids.T.contiguous().T, prompt_len=10, cuda_graph=True, options=compiled_mode)
    assert (again - compiled).abs().max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_failed_compile_falls_back_to_the_uncompiled_graph(hf_dir, monkeypatch):
    from g3n.model.load import load_model

    def broken():
        def fail(*args):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(decode, "compiled_decode", broken)
    model = load_model(hf_dir, dtype="float32", device="cuda")
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(7))
    eager = teacher_forced(model, ids, prompt_len=10, cuda_graph=False)
    with pytest.warns(UserWarning, match="no compiler here"):
        fallback = teacher_forced(model, ids, prompt_len=10, cuda_graph=True, options=DecodeOptions(compile="step"))
    assert (eager - fallback).abs().max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_reads_the_cpu_table_in_the_graph(tiny):
    """The per-layer table stays in CPU memory and the graph step gathers its rows itself (no host
    round trip), and generation, which queues each step before reading the last tokens, gives
    the CPU's greedy tokens; a batch of seeded rows equals each row alone, and equals
    generate_steps, which samples in the graph."""
    import g3n
    from g3n.inference.generate import generate, generate_rows, generate_steps
    from g3n.inference.sampling import SamplingParams

    cpu_model, tok = tiny
    model, _ = g3n.load("tiny", dtype="float32", device="cuda", ple_device="cpu")
    gen = Generator(model, 1, 64)
    assert gen.ple_table is not None and gen.ple_table.device.type == "cuda"
    assert model.model.embed_tokens_per_layer.weight.device.type == "cpu"
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in ("Hi", "What is 12+7?")]
    greedy = SamplingParams(greedy=True, max_new_tokens=24)
    assert generate(model, prompts, greedy) == generate(cpu_model, prompts, greedy)
    params = [SamplingParams(seed=s, max_new_tokens=16, temperature=1.5) for s in (1, 2)]
    batched = list(zip(*generate_rows(model, prompts, params), strict=True))  # per row: 16 tokens
    for prompt, p, row in zip(prompts, params, batched, strict=True):
        (alone,) = zip(*generate_rows(model, [prompt], [p]), strict=True)
        assert alone == row
        # generate_steps samples inside the graph, from the same uniform numbers
        assert tuple(t for (t,) in generate_steps(model, [prompt], p)) == alone


def test_per_layer_compile_shares_one_graph_per_kind_of_layer(tiny, monkeypatch):
    """The per-layer compile (`compile="layers"`) traces decode_layer_cached once per kind of
    layer (sliding or full, K/V computed or shared, sparsity, width: at most 6 graphs for the
    shipped model's 25 layers), not once per layer, the step's inputs and logits once each, and
    decodes as the model's own layers do."""
    graphs = record_layer_compiles(monkeypatch)
    model = copy.deepcopy(tiny[0])  # the fused decode fuses its weights (views): not on the shared fixture
    cfg = model.config
    kinds = {(cfg.layer_types[i], i >= cfg.first_kv_shared_layer, cfg.activation_sparsity_pattern[i],
              cfg.intermediate_size[i]) for i in range(cfg.num_hidden_layers)}  # fmt: skip
    ids = torch.randint(0, 700, (1, 30), generator=torch.Generator().manual_seed(8))
    with torch._dynamo.config.patch(recompile_limit=64):
        layered = teacher_forced(model, ids, prompt_len=10, cuda_graph=False, fused="layers")
    own = teacher_forced(model, ids, prompt_len=10, cuda_graph=False, fused=False)
    assert len(graphs["layer"]) <= len(kinds) == 6  # of 25 layers
    assert len(graphs["inputs"]) == len(graphs["logits"]) == 1
    assert (layered - own).abs().max() < TOL


def _kernel_failing_compile(monkeypatch, seen: list) -> None:
    """A compiled decode step that fails while the decode kernels are on (as a torch that cannot
    compile them would) and otherwise decodes as the uncompiled step; `seen` gets, per call,
    whether the kernels were on. The kernels count as usable for the model (as bf16 on a GPU)."""

    def compiled_decode():
        def step(*args):  # decode_logits' arguments: the engine's options, then the rows' adapters
            options = args[-2]
            seen.append(options.decode_kernels)
            if options.decode_kernels:
                raise RuntimeError("this compiler cannot take the decode kernels")
            return decode.decode_logits(*args)

        return step

    monkeypatch.setattr(decode, "compiled_decode", compiled_decode)
    monkeypatch.setattr(engine.decode_kernels, "usable", lambda x, cfg: True)


def test_a_compile_failing_with_the_decode_kernels_drops_them_for_that_engine_only(ours, monkeypatch):
    """The engine whose compile fails with the decode kernels compiles without them (a warning;
    its own options say so) and decodes as the uncompiled step; the options it was given, and
    the next engine, still have them, and that engine tries them again."""
    fake_cuda_graph(monkeypatch)
    seen = []
    _kernel_failing_compile(monkeypatch, seen)
    model = copy.deepcopy(ours)  # the fused decode fuses its weights (views): not on the shared fixture
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(9))
    expected = teacher_forced(model, ids, prompt_len=10, cuda_graph=False)[:, 1]  # the first decode step
    asked = DecodeOptions(compile="step")
    for _ in range(2):  # two engines in turn: each tries the kernels first
        seen.clear()
        gen = Generator(model, 1, 12, options=asked, cuda_graph=True)
        gen.prefill(0, ids[0, :10])
        with pytest.warns(UserWarning, match="decode kernels failed to compile.*cannot take the decode kernels"):
            got = gen.step(ids[:, 10], [10]).logits  # warm-up (compiling) and capture
        assert seen == [True, False, False, False]  # failed with them; warm-up x2 and capture without
        assert gen.compiled and gen.compile is CompileMode.STEP
        assert gen.options == DecodeOptions(compile="step", decode_kernels=False)
        assert asked.decode_kernels  # the caller's options are not changed
        assert (got - expected).abs().max() < TOL


def test_a_compile_failing_without_the_kernels_decodes_uncompiled(ours, monkeypatch):
    """A compile that fails with the decode kernels off is not theirs: the engine captures the
    uncompiled step, with a warning."""
    fake_cuda_graph(monkeypatch)
    seen = []

    def compiled_decode():
        def step(*args):
            seen.append(args[-2].decode_kernels)  # the engine's options (then the rows' adapters)
            raise RuntimeError("no compiler here")

        return step

    monkeypatch.setattr(decode, "compiled_decode", compiled_decode)
    model = copy.deepcopy(ours)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(10))
    expected = teacher_forced(model, ids, prompt_len=10, cuda_graph=False)[:, 1]
    gen = Generator(model, 1, 12, options=DecodeOptions(compile="step", decode_kernels=False), cuda_graph=True)
    gen.prefill(0, ids[0, :10])
    with pytest.warns(UserWarning, match="decode step failed, decoding uncompiled: RuntimeError: no compiler here"):
        got = gen.step(ids[:, 10], [10]).logits
    assert seen == [False] and not gen.compiled and gen.fused is False
    assert (got - expected).abs().max() < TOL
