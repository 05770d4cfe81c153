"""MatFormer slicing: plans, the streamed slicer, elastic mode, and errors.

The parent is a tiny E4B-shaped model (35 layers, 15 KV-shared, sparsity on layers 0-9) written by
transformers. Its weights are scaled down so that float32 rounding is not amplified over 35 layers.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from g3n.errors import G3nError
from g3n.matformer.plan import Plan, effective_parameters, load_plan, sub_config
from g3n.matformer.slicer import slice_checkpoint
from g3n.model.load import load_model
from helpers import TOKENIZER768, make_hf_model

TOL = 1e-4
E4B_SHAPE = {  # TOKENIZER768's vocab, so the parent can read text
    "num_hidden_layers": 35, "num_kv_shared_layers": 15, "intermediate_size": 64, "sliding_window": 8,
    "activation_sparsity_pattern": [0.95] * 10 + [0.0] * 25, "vocab_size": 768, "vocab_size_per_layer_input": 768,
}  # fmt: skip


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    hf = make_hf_model(seed=21, scale=0.15, attn_implementation="eager", **E4B_SHAPE)
    d = tmp_path_factory.mktemp("e4b_parent")
    hf.save_pretrained(d, max_shard_size="300KB")  # several shards
    shutil.copy(TOKENIZER768 / "tokenizer.model", d)
    return hf, d


def _ids(seed=0):
    return torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(seed))


def _hf(path):
    from transformers import Gemma3nForCausalLM

    return Gemma3nForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def test_identity_plan_reproduces_parent(parent, tmp_path):
    hf, d = parent
    out = slice_checkpoint(d, "E4B", tmp_path / "same").out_dir
    ours = load_model(out, dtype="float32", device="cpu")
    same = load_model(d, dtype="float32", device="cpu")
    with torch.no_grad():
        assert torch.equal(ours(_ids()), same(_ids()))
        assert (ours(_ids()) - hf(_ids()).logits).abs().max().item() < TOL
    for name, p in same.state_dict().items():
        assert torch.equal(p, ours.state_dict()[name]), name


def test_e2b_plan_gives_e2b_structure(parent, tmp_path):
    _, d = parent
    result = slice_checkpoint(d, "E2B", tmp_path / "e2b")
    cfg = json.loads((result.out_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["num_kv_shared_layers"] == 10
    assert cfg["intermediate_size"] == [32] * 30
    assert cfg["activation_sparsity_pattern"] == [0.95] * 10 + [0.0] * 20
    assert cfg["layer_types"] == ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(30)]
    assert (result.out_dir / "tokenizer.model").read_bytes() == (TOKENIZER768 / "tokenizer.model").read_bytes()
    assert (result.out_dir / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("plan", ["E2B", "E2.54B", "E1.96B"])
def test_slice_equals_transformers_and_elastic(parent, tmp_path, plan):
    _, d = parent
    out = slice_checkpoint(d, plan, tmp_path / plan).out_dir
    ours = load_model(out, dtype="float32", device="cpu")
    elastic = load_model(d, dtype="float32", device="cpu", matformer=plan)
    with torch.no_grad():
        ref = _hf(out)(_ids()).logits
        got = ours(_ids())
        assert (got - ref).abs().max().item() < TOL
        assert torch.equal(elastic(_ids()), got)


def test_slice_equals_independent_construction(parent, tmp_path):
    """The parent itself, with dropped FFN units zeroed and skipped layers bypassed, computes the
    slice. (Dense layers only are narrowed: the sparse layers' Gaussian top-k takes statistics over
    the whole width, so zeroed units would change them.)"""
    hf, d = parent
    skip = [20, 21, 22, 23, 24]
    widths = [64] * 10 + [40] * 25
    out = slice_checkpoint(d, Plan(ffn_widths=widths, skip_layers=skip), tmp_path / "custom").out_dir
    ours = load_model(out, dtype="float32", device="cpu")

    import copy

    ref_model = copy.deepcopy(hf)
    with torch.no_grad():
        for i, layer in enumerate(ref_model.model.layers):
            mlp = layer.mlp
            mlp.gate_proj.weight[widths[i] :] = 0
            mlp.up_proj.weight[widths[i] :] = 0
            mlp.down_proj.weight[:, widths[i] :] = 0
            if i in skip:
                layer.register_forward_hook(lambda m, args, kwargs, output: args[0], with_kwargs=True)
        ref = ref_model(_ids(1)).logits
        assert (ours(_ids(1)) - ref).abs().max().item() < TOL


def test_plan_files(parent, tmp_path):
    _, d = parent
    parent_cfg = load_model(d, device="cpu").config
    yaml_plan = tmp_path / "p.yaml"
    yaml_plan.write_text("name: mine\nffn_widths: 48\nskip_layers: [21, 22]\n")
    csv_plan = tmp_path / "p.csv"
    csv_plan.write_text("layer,ffn_width\n" + "".join(f"{i},{'skip' if i in (21, 22) else 48}\n" for i in range(35)))
    a, b = load_plan(str(yaml_plan), parent_cfg), load_plan(str(csv_plan), parent_cfg)
    assert a.kept_layers == b.kept_layers and len(a.kept_layers) == 33
    assert sub_config(parent_cfg, a) == sub_config(parent_cfg, b)
    assert sub_config(parent_cfg, a).num_kv_shared_layers == 13


def test_effective_parameters_match_googles_table():
    from transformers import Gemma3nTextConfig

    from g3n.config import text_config_from_dict

    e4b = text_config_from_dict(Gemma3nTextConfig().to_dict())
    counts = {n: effective_parameters(sub_config(e4b, load_plan(n, e4b))) / 1e9 for n in ("E4B", "E2B", "E1.96B")}
    assert counts == pytest.approx({"E4B": 3.98, "E2B": 1.91, "E1.96B": 1.96}, abs=0.01)


def test_effective_parameters_count_the_model(parent):
    """The count equals the model's own parameters without the two embedding tables, plus the K/V
    weights Google stores for KV-shared layers."""
    _, d = parent
    model = load_model(d, device="cpu")
    cfg = model.config
    own = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    kv = 2 * cfg.hidden_size * cfg.num_key_value_heads * cfg.head_dim + cfg.head_dim
    assert effective_parameters(cfg) == own + cfg.num_kv_shared_layers * kv


# ---- bad plans and bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    "plan,match",
    [
        (Plan(ffn_widths=[65] * 35), "layer 0 FFN width 65 must be between 1 and the parent's 64"),
        (Plan(ffn_widths=[64] * 34), "34 FFN widths for a parent of 35 layers"),
        (Plan(ffn_widths=[64] * 35, skip_layers=[19]), r"cannot skip layer\(s\) \[19\]"),
        (Plan(ffn_widths=[64] * 35, skip_layers=[18, 3]), r"cannot skip layer\(s\) \[18\]"),
        (Plan(ffn_widths=[64] * 35, skip_layers=[40]), "distinct layer indices"),
        (Plan(ffn_widths=[64] * 35, skip_layers=[3, 3]), "distinct layer indices"),
    ],
)
def test_impossible_plans(parent, tmp_path, plan, match):
    _, d = parent
    with pytest.raises(G3nError, match=match):
        slice_checkpoint(d, plan, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unknown_plan_lists_known(parent, tmp_path):
    with pytest.raises(G3nError, match="E2B.*yaml"):
        slice_checkpoint(parent[1], "E3B", tmp_path / "x")


def test_malformed_plan_files(parent, tmp_path):
    _, d = parent
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("layer,ffn_width\n0,64\n1,wide\n")
    with pytest.raises(G3nError, match=r"bad.csv:3: expected 'layer,ffn_width'"):
        slice_checkpoint(d, str(bad_csv), tmp_path / "x")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("ffn_widths: [1, 2\nskip_layers: 3\n")
    with pytest.raises(G3nError, match=r"bad.yaml:\d+: not valid YAML"):
        slice_checkpoint(d, str(bad_yaml), tmp_path / "x")
    wrong_field = tmp_path / "wrong.yaml"
    wrong_field.write_text("widths: 48\n")
    with pytest.raises(G3nError, match=r"unknown field\(s\) \['widths'\]"):
        slice_checkpoint(d, str(wrong_field), tmp_path / "x")


def test_output_exists(parent, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(G3nError, match="exists .*--overwrite"):
        slice_checkpoint(parent[1], "E2B", tmp_path / "out")
    assert slice_checkpoint(parent[1], "E2B", tmp_path / "out", overwrite=True).config.num_hidden_layers == 30
    assert slice_checkpoint(parent[1], "E2B", tmp_path / "out", overwrite=True).config.num_hidden_layers == 30


def test_overwrite_replaces_only_an_earlier_slice(parent, tmp_path):
    """--overwrite must not delete a directory that is not a slice or export, nor the parent."""
    keep = tmp_path / "work"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(G3nError, match="holds notes.txt"):
        slice_checkpoint(parent[1], "E2B", keep, overwrite=True)
    assert (keep / "notes.txt").read_text() == "precious"
    with pytest.raises(G3nError, match="is or contains"):
        slice_checkpoint(parent[1], "E2B", Path(parent[1]).parent, overwrite=True)
    assert Path(parent[1]).is_dir()


def test_parent_not_gemma3n(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(G3nError, match="not a Gemma 3n model"):
        slice_checkpoint(tmp_path, "E2B", tmp_path / "out")


def test_llama_cpp_warning(parent, tmp_path):
    from g3n.export.llama_cpp_limits import llama_cpp_problems

    result = slice_checkpoint(parent[1], "E2B", tmp_path / "e2b")
    assert any("laurel_rank" in w for w in result.warnings)  # the tiny parent's own sizes
    tiny = load_model("tiny", device="cpu").config
    widths = list(tiny.intermediate_size)
    assert llama_cpp_problems(tiny) == []
    assert llama_cpp_problems(sub_config(tiny, Plan(widths, [21]))) == []  # a shared layer: still 20
    assert any("exactly 20" in p for p in llama_cpp_problems(sub_config(tiny, Plan(widths, [3]))))


def test_cli_slice_and_elastic_generate(parent, tmp_path, capsys):
    from g3n.cli import main

    assert main(["slice", "--model", str(parent[1]), "--plan", "E2B", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "30 layers (10 KV-shared)" in out and "effective parameters" in out
    assert main(["slice", "--model", str(parent[1]), "--plan", "E2B", "--out", str(tmp_path / "s")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_elastic_tiny_chat(capsys):
    """The shipped tiny model with its FFNs cut still runs through the CLI (no files written)."""
    from g3n.cli import main

    plan = Plan(ffn_widths=[128] * 25, skip_layers=[21, 22])
    from g3n import load

    model, _ = load("tiny", device="cpu", matformer=plan)
    assert model.config.num_hidden_layers == 23 and model.config.intermediate_size == [128] * 23
    assert main(["generate", "--prompt", "Hi", "--greedy", "--max-new-tokens", "5", "--matformer", "E2B"]) == 2
    assert "E4B-shaped" in capsys.readouterr().err


# ---- slice search ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    rows = [
        {"text": "The capital of France is Paris. The sky is blue."},
        {"messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = 5."}]},
        {"text": "Water boils at 100 degrees Celsius."},
    ]
    path = d / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_perplexity_equals_transformers_loss(parent, calib):
    import math

    import g3n
    from g3n.matformer.search import perplexity, read_calibration

    hf, d = parent
    model, tok = g3n.load(d, dtype="float32", device="cpu")
    seqs = read_calibration(calib, tok, max_tokens=10_000, max_len=64)
    nll = 0.0
    with torch.no_grad():
        for ids in seqs:
            x = torch.tensor([ids])
            nll += hf(x, labels=x).loss.item() * (len(ids) - 1)
    expected = math.exp(nll / sum(len(s) - 1 for s in seqs))
    assert perplexity(model, seqs) == pytest.approx(expected, rel=1e-4)


def test_sub_model_shares_weights_and_equals_elastic(parent):
    from g3n.matformer.submodel import sub_model

    _, d = parent
    full = load_model(d, dtype="float32", device="cpu")
    sub = sub_model(full, load_plan("E2B", full.config))
    assert sub.model.layers[0].mlp.gate_proj.weight.data_ptr() == full.model.layers[0].mlp.gate_proj.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(sub(_ids()), load_model(d, dtype="float32", device="cpu", matformer="E2B")(_ids()))


def test_search_cli(parent, calib, tmp_path, capsys):
    from g3n.cli import main
    from g3n.matformer.search import candidate_plans

    _, d = parent
    plan_out, plot_out = tmp_path / "best.yaml", tmp_path / "pareto.png"
    parent_cfg = load_model(d, device="cpu").config
    budget = effective_parameters(sub_config(parent_cfg, load_plan("E2.54B", parent_cfg)))
    args = ["slice", "search", "--model", str(d), "--budget", str(budget), "--data", str(calib), "--device", "cpu"]
    assert main([*args, "--plan-out", str(plan_out), "--plot", str(plot_out)]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines()[1:] if line and not line.startswith("best")]
    assert len(table) == len(candidate_plans(parent_cfg))
    assert any(row[-2:] == ["over", "budget"] for row in table)  # E4B itself does not fit
    evaluated = {row[0]: float(row[-1]) for row in table if row[-1] != "budget"}
    best = load_plan(str(plan_out), parent_cfg)
    assert evaluated[best.name] == min(evaluated.values())
    assert effective_parameters(sub_config(parent_cfg, best)) <= budget
    assert plot_out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["slice", "--model", str(d), "--plan", str(plan_out), "--out", str(tmp_path / "best")]) == 0


def test_search_bad_input(parent, calib, tmp_path, capsys):
    from g3n.cli import main

    _, d = parent
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no"}\n')
    base = ["slice", "search", "--model", str(d), "--device", "cpu"]
    assert main([*base, "--budget", "lots", "--data", str(calib)]) == 2
    assert "budget 'lots'" in capsys.readouterr().err
    assert main([*base, "--budget", "1M", "--data", str(bad)]) == 2
    assert "bad.jsonl:2: expected an object with 'text' or 'messages'" in capsys.readouterr().err
    assert main([*base, "--budget", "10", "--data", str(calib)]) == 2
    assert "no candidate fits the budget" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,match",
    [
        ("ffn_widths: true\n", r"'ffn_widths' must be an integer .* \(got True, a boolean\)"),
        ("ffn_widths: [64, true]\n", r"'ffn_widths' must be .* \(got True, a boolean\)"),
        ("ffn_widths: 48\nskip_layers: [true]\n", r"'skip_layers' must be a list of layer indices \(got True"),
    ],
)
def test_booleans_are_not_widths_or_layers(parent, tmp_path, text, match):
    """YAML's true is Python's 1: it wrote intermediate_size [true, ...] and skipped layer 1."""
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(G3nError, match=match):
        slice_checkpoint(parent[1], str(tmp_path / "p.yaml"), tmp_path / "x")
    with pytest.raises(G3nError, match=r"skip_layers must be a list of integers \(got True, a boolean\)"):
        slice_checkpoint(parent[1], Plan(ffn_widths=[48] * 35, skip_layers=[True]), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_plan_files_that_are_not_utf8(parent, tmp_path):
    (tmp_path / "p.yaml").write_bytes(b"name: caf\xe9\nffn_widths: 48\n")
    with pytest.raises(G3nError, match=r"p.yaml:1: not UTF-8 text \(byte 9\)"):
        slice_checkpoint(parent[1], str(tmp_path / "p.yaml"), tmp_path / "x")
    (tmp_path / "p.csv").write_bytes(b"layer,ffn_width\n0,48\xe9\n")
    with pytest.raises(G3nError, match=r"p.csv: not UTF-8 text"):
        slice_checkpoint(parent[1], str(tmp_path / "p.csv"), tmp_path / "x")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("hidden_size", -32, r"config field 'hidden_size' must be an integer >= 1, got -32"),
        ("num_hidden_layers", "35", r"config field 'num_hidden_layers' must be an integer >= 1, got '35'"),
        ("intermediate_size", [64] * 34 + ["64"], r"'intermediate_size' must be integers >= 1 .* got '64'"),
        ("head_dim", True, r"'head_dim' must be an integer >= 1, got True"),
    ],
)
def test_parent_config_with_a_bad_dimension(parent, tmp_path, field, value, message):
    src = parent[1]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    raw = json.loads((bad / "config.json").read_text())
    text = raw.get("text_config", raw)
    text[field] = value
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(G3nError, match=message):
        slice_checkpoint(bad, "E2B", tmp_path / "x")


def test_calibration_text_that_is_not_utf8_names_the_line(tmp_path):
    from g3n.matformer.search import read_calibration
    from g3n.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(TOKENIZER768)
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "fine text"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(G3nError, match=r"c.jsonl:2: not UTF-8 \(byte offset 13 in the line\)"):
        read_calibration(path, tok, 100, 32)
    path.write_text('{"text": "fine text"}\n{"text": "lone \\udc80 surrogate"}\n')
    with pytest.raises(G3nError, match=r"c.jsonl:2: text has an invalid character at position 5"):
        read_calibration(path, tok, 100, 32)
