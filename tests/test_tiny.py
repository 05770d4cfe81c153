"""The tiny model shipped in the package: a real HF checkpoint inside llama.cpp's limits, trained to
answer on topic."""

import torch

import g3n
from g3n.checkpoint.names import TINY_DIR


def test_small_on_disk():
    size = sum(f.stat().st_size for f in TINY_DIR.iterdir())
    assert size < 30 * 2**20


def test_within_llama_cpp_limits():
    cfg = g3n.load("tiny", device="cpu")[0].config
    assert cfg.num_hidden_layers - cfg.num_kv_shared_layers == 20
    assert cfg.layer_types[18] == "sliding_attention" and cfg.layer_types[19] == "full_attention"
    assert (cfg.laurel_rank, cfg.hidden_size_per_layer_input, cfg.altup_num_inputs) == (64, 256, 4)
    assert [s > 0 for s in cfg.activation_sparsity_pattern] == [True] * 10 + [False] * (cfg.num_hidden_layers - 10)


def test_transformers_loads_it_with_equal_logits():
    from transformers import Gemma3nForCausalLM

    hf = Gemma3nForCausalLM.from_pretrained(TINY_DIR, dtype=torch.float32, attn_implementation="eager").eval()
    model, tok = g3n.load("tiny", dtype="float32", device="cpu")
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is 3+4?"}])])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_answers_on_topic():
    from g3n.inference.generate import generate
    from g3n.inference.sampling import SamplingParams

    model, tok = g3n.load("tiny", device="cpu")
    qa = {"What is the capital of Japan?": "Tokyo", "What sound does a cow make?": "moo", "What is 7+8?": "15"}
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in qa]
    replies = generate(model, prompts, SamplingParams(greedy=True, max_new_tokens=20), tok.stop_ids)
    for answer, reply in zip(qa.values(), replies):
        assert answer in tok.decode(reply)
