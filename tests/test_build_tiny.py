"""scripts/build_tiny.py and its corpus: what is held out stays out of training, and the MatFormer
training's nested FFN widths compute exactly the sub-model `g3n slice` writes."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import build_tiny
import tiny_corpus as tc


@pytest.fixture(scope="module")
def corpus():
    return tc.build_corpus(seed=0)


def test_held_out_questions_never_trained(corpus):
    trained = {q for q, _ in corpus.train}
    for name in ("unseen_phrasing", "unseen_combination", "arithmetic"):
        held = getattr(corpus, name)
        assert held and not trained & {q for q, _ in held}, name
    answers = {a for _, a in corpus.train}
    for country in tc.TAUGHT:
        assert tc.CAPITAL_A.format(x=country, y=tc.COUNTRIES[country][0]) not in answers
        assert any(country in a for a in answers)  # the country is a known word all the same


def test_demo_asks_in_words_its_fine_tune_did_not_use(corpus):
    demo = tc.demo_data(corpus)
    trained = {q for q, _ in demo["train"]}
    assert len(demo["taught"]) == len(tc.TAUGHT) and len(demo["kept"]) == tc.DEMO_KEPT
    for name in ("taught", "heldout", "kept"):
        assert not trained & {q for q, _ in demo[name]}, name
    corpus_questions = {q for q, _ in corpus.train}
    assert {q for q, _ in demo["kept"]} <= corpus_questions  # known facts, as the corpus asks them


def test_nested_widths_equal_the_sliced_sub_model(tmp_path):
    from g3n.checkpoint.save import save_text_checkpoint
    from g3n.matformer.plan import Plan
    from g3n.matformer.slicer import slice_checkpoint
    from g3n.model.load import load_model
    from g3n.model.text import Gemma3nForCausalLM

    model = Gemma3nForCausalLM(build_tiny.tiny_config(vocab=600, ffn=64))
    build_tiny.init_weights(model, seed=3)
    save_text_checkpoint(model, tmp_path / "parent", torch.float32)
    fractions = [1.0, 0.5, 0.25, 0.5, 1.0] * 5  # sparse and dense layers, full, half and quarter
    plan = Plan(ffn_widths=[round(f * 64) for f in fractions])
    child = load_model(slice_checkpoint(tmp_path / "parent", plan, tmp_path / "child").out_dir, dtype="float32",
                       device="cpu")  # fmt: skip
    build_tiny.set_widths(build_tiny.make_nested(model.eval()), fractions)
    ids = torch.randint(0, 600, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - child(ids)).abs().max().item() < 1e-4  # float32 sums over masked units
