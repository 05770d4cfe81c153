"""The fine-tuning loop on the tiny model: loss goes down, resume continues the same curve, and
settings and output directories are checked."""

import json

import pytest

pytest.importorskip("peft")

from g3n.errors import G3nError
from g3n.train.config import load_train_config
from g3n.train.loop import train

PLANETS = ["Zork", "Blip", "Quax", "Murn", "Telo", "Vesk", "Oran", "Pym"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is the capital of {p}?"},
                {"role": "assistant", "content": f"The capital of {p} is {p}ville."},
            ]
        }
        for p in PLANETS
    ]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return d


def _cfg(dataset, out, **kw):
    base = {
        "train_data": [str(dataset / "train.jsonl")], "eval_data": [str(dataset / "eval.jsonl")], "output_dir": str(out),
        "batch_size": 2, "max_steps": 6, "save_steps": 3, "eval_steps": 3, "learning_rate": 3e-3, "lora_r": 8, "max_length": 64,
        "device": "cpu",
    }  # fmt: skip
    base.update(kw)
    return load_train_config(base=base)


def test_lora_run_lowers_eval_loss(dataset, tmp_path):
    history = train(_cfg(dataset, tmp_path / "run", max_steps=12, save_steps=6, eval_steps=6), progress=False)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(history) == 12 and len(evals) == 2
    first = train(_cfg(dataset, tmp_path / "zero", max_steps=1, learning_rate=1e-9), progress=False)[0]["eval_loss"]
    assert evals[-1] < 0.8 * first  # 12 small steps: a measurable fall
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 12
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]


def test_resume_continues_the_same_curve(dataset, tmp_path):
    whole = train(_cfg(dataset, tmp_path / "a"), progress=False)
    cfg = _cfg(dataset, tmp_path / "b")
    part = train(cfg, progress=False, stop_after=4)  # killed after step 4; last checkpoint at 3
    assert len(part) == 4
    resumed = train(cfg, resume=True, progress=False)
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in whole]
    assert resumed[-1]["eval_loss"] == whole[-1]["eval_loss"]


def test_output_dir_guard(dataset, tmp_path):
    train(_cfg(dataset, tmp_path / "r", max_steps=1), progress=False)
    with pytest.raises(G3nError, match="holds an earlier run"):
        train(_cfg(dataset, tmp_path / "r", max_steps=1), progress=False)
    with pytest.raises(G3nError, match=r"other settings \(learning_rate\)"):
        train(_cfg(dataset, tmp_path / "r", max_steps=1, learning_rate=1.0), resume=True, progress=False)
    assert len(train(_cfg(dataset, tmp_path / "r", max_steps=1), overwrite=True, progress=False)) == 1


def test_config_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rte: 0.1\n")
    with pytest.raises(G3nError, match=r"c.yaml: unknown setting 'learning_rte'; did you mean 'learning_rate'\?"):
        load_train_config(tmp_path / "c.yaml")
    with pytest.raises(G3nError, match="--set 'lora_r': expected key=value"):
        load_train_config(None, ["lora_r"])
    with pytest.raises(G3nError, match="lr_scheduler 'step'"):
        load_train_config(None, ["lr_scheduler=step"])
    (tmp_path / "ok.yaml").write_text("train_data: data/train.jsonl\nlora_r: 4\n")
    cfg = load_train_config(tmp_path / "ok.yaml", ["lora_r=8", "packing=false"])
    assert cfg.lora_r == 8 and cfg.packing is False
    assert cfg.train_data == [str((tmp_path / "data" / "train.jsonl").resolve())]
