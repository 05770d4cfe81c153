import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from helpers import make_hf_model


@pytest.fixture(scope="session")
def hf_model():
    """transformers' Gemma3nForCausalLM with random weights (eager attention, float32)."""
    return make_hf_model(attn_implementation="eager")


@pytest.fixture(scope="session")
def tiny():
    """The shipped tiny model and its tokenizer, in float32 (read-only: tests must not change it)."""
    import g3n

    return g3n.load("tiny", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_dir(hf_model, tmp_path_factory):
    """That model saved by transformers as a single-file checkpoint."""
    d = tmp_path_factory.mktemp("hf_causal")
    hf_model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def ours(hf_dir):
    from g3n.model.load import load_model

    return load_model(hf_dir, dtype="float32", device="cpu")
