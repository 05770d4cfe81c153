"""The fine-tuning loop on the tiny model: loss goes down, resume continues the same curve, and
settings and output directories are checked."""

import json
import shutil

import pytest
import torch

pytest.importorskip("peft")

from g3n.errors import G3nError
from g3n.train.config import load_train_config
from g3n.train.loop import CONFIG_FILE, train
from helpers import train_config, write_capitals_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_capitals_dataset(tmp_path_factory.mktemp("data"))


_cfg = train_config


def test_lora_run_lowers_eval_loss(dataset, tmp_path):
    history = train(_cfg(dataset, tmp_path / "run", max_steps=12, save_steps=6, eval_steps=6), progress=False)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert [h["step"] for h in history] == list(range(13)) and len(evals) == 3  # eval at steps 0, 6, 12
    assert evals[-1] < 0.8 * evals[0]  # 12 small steps: a measurable fall
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 13
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]


def test_resume_continues_the_same_curve(dataset, tmp_path):
    whole = train(_cfg(dataset, tmp_path / "a"), progress=False)
    cfg = _cfg(dataset, tmp_path / "b")
    part = train(cfg, progress=False, stop_after=4)  # killed after step 4; last checkpoint at 3
    assert len(part) == 5  # the step-0 eval and steps 1-4
    resumed = train(cfg, resume=True, progress=False)
    assert [h["step"] for h in resumed] == [0, 1, 2, 3, 4, 5, 6]
    assert [h.get("loss") for h in resumed] == [h.get("loss") for h in whole]
    assert resumed[-1]["eval_loss"] == whole[-1]["eval_loss"]


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
)
def test_resume_with_lora_dropout_continues_the_same_curve(dataset, tmp_path, device):
    """LoRA dropout draws its masks on the run's device (on CUDA from the GPU's generator): a
    resumed run draws the masks the uninterrupted one drew, so it reaches the same losses. Other
    masks from step 4 on move the losses by about 1%; the GPU may sum in another order from run
    to run, hence its tolerance."""
    kw = {"device": device, "dtype": "float32", "compile": False, "lora_dropout": 0.5, "learning_rate": 1e-2}
    whole = train(_cfg(dataset, tmp_path / "a", **kw), progress=False)
    cfg = _cfg(dataset, tmp_path / "b", **kw)
    train(cfg, progress=False, stop_after=4)  # killed after step 4; last checkpoint at 3
    resumed = train(cfg, resume=True, progress=False)
    assert [h["step"] for h in resumed] == [h["step"] for h in whole] == list(range(7))
    rel = 0 if device == "cpu" else 1e-5
    losses = [[h.get("loss", h.get("eval_loss")) for h in run] + [run[-1]["eval_loss"]] for run in (whole, resumed)]
    assert losses[1] == pytest.approx(losses[0], rel=rel, abs=0)
    without = train(_cfg(dataset, tmp_path / "c", **{**kw, "lora_dropout": 0.0}), progress=False)
    assert [h.get("loss") for h in without] != [h.get("loss") for h in whole]  # the masks change the losses


def test_a_steps_random_numbers_come_from_seed_rank_and_step():
    """What a step draws (dropout masks) depends on the seed, the process and the step alone, so
    processes drop different inputs and a resumed step draws what it drew before."""
    from g3n.train.loop import seed_step

    def mask(seed, rank, step):
        seed_step(seed, rank, step)
        torch.rand(7)  # whatever was drawn before in the step
        seed_step(seed, rank, step)
        return torch.nn.functional.dropout(torch.ones(256), 0.5) == 0

    assert torch.equal(mask(0, 1, 3), mask(0, 1, 3))
    others = [mask(0, 0, 3), mask(0, 1, 4), mask(1, 1, 3)]
    assert all(not torch.equal(mask(0, 1, 3), m) for m in others)


def test_data_orders_of_different_seeds_and_epochs_differ():
    """Every (seed, epoch) pair has an order of its own: seed 1's held-out split (epoch -1) is not
    seed 0's epoch 999, as it is under an arithmetic mix such as seed * 1000 + epoch."""
    from g3n.train.loop import epoch_order, stream_seed

    assert epoch_order(64, 1, -1) != epoch_order(64, 0, 999)
    assert epoch_order(64, 1, -1) == epoch_order(64, 1, -1)
    keys = [(seed, epoch) for seed in range(-2, 4) for epoch in range(-1, 2000)]
    assert len({stream_seed("data order", *key) for key in keys}) == len(keys)


def test_fused_lora_mlp_follows_the_same_curve(dataset, tmp_path, monkeypatch):
    """`fused_lora_mlp: true` (the MLP's own backward, train/lora_mlp.py) trains the same run: the
    losses and the final eval loss of the default path, in float32 on the CPU."""
    from g3n.train import lora_mlp

    calls = []
    apply = lora_mlp._LoraMLP.apply
    monkeypatch.setattr(lora_mlp._LoraMLP, "apply", lambda *a: calls.append(1) or apply(*a))
    whole = train(_cfg(dataset, tmp_path / "a"), progress=False)
    assert not calls
    fused = train(_cfg(dataset, tmp_path / "b", fused_lora_mlp=True), progress=False)
    assert calls
    losses = [[h["loss"] for h in run if "loss" in h] for run in (whole, fused)]
    assert len(losses[0]) == 6 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert fused[-1]["eval_loss"] == pytest.approx(whole[-1]["eval_loss"], rel=1e-4)
    with pytest.raises(G3nError, match="config: fused_lora_mlp needs lora: true"):
        load_train_config(None, ["lora=false", "fused_lora_mlp=true"])


def test_output_dir_guard(dataset, tmp_path):
    train(_cfg(dataset, tmp_path / "r", max_steps=1), progress=False)
    with pytest.raises(G3nError, match="holds an earlier run"):
        train(_cfg(dataset, tmp_path / "r", max_steps=1), progress=False)
    with pytest.raises(G3nError, match=r"other settings \(learning_rate\)"):
        train(_cfg(dataset, tmp_path / "r", max_steps=1, learning_rate=1.0), resume=True, progress=False)
    assert len(train(_cfg(dataset, tmp_path / "r", max_steps=1), overwrite=True, progress=False)) == 2


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


def test_config_value_types(tmp_path):
    with pytest.raises(G3nError, match="config: lora_r must be int, got 'eight'"):
        load_train_config(None, ["lora_r=eight"])
    with pytest.raises(G3nError, match="config: packing must be bool, got 1"):
        load_train_config(None, ["packing=1"])
    with pytest.raises(G3nError, match="config: optim 'sgd': use adamw, adamw_8bit"):
        load_train_config(None, ["optim=sgd"])
    with pytest.raises(G3nError, match="nothing would be trained"):
        load_train_config(None, ["finetune_language_layers=false"])
    with pytest.raises(G3nError, match="tuned with LoRA only"):
        load_train_config(None, ["finetune_audio_layers=true", "lora=false"])
    # tower adapters merge into the whole-model checkpoint (adapters/merge.save_merged)
    assert load_train_config(None, ["finetune_vision_layers=true", "save_merged=true"]).save_merged
    assert load_train_config(None, ["learning_rate=1"]).learning_rate == 1  # an int where a float goes is fine
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-3\n")  # a string to PyYAML (no dot)
    assert load_train_config(tmp_path / "c.yaml", ["weight_decay=1e-2"]).learning_rate == 0.001
    assert load_train_config(None, ["weight_decay=1e-2"]).weight_decay == 0.01


def test_adamw_8bit_needs_cuda(dataset, tmp_path):
    with pytest.raises(G3nError, match="adamw_8bit needs a CUDA GPU"):
        train(_cfg(dataset, tmp_path / "r", optim="adamw_8bit"), progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    import torch

    from g3n.train import loop

    real, calls = loop.causal_lm_loss, []

    def nan_at_third_step(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():  # a training step, not an eval
            calls.append(1)
        return loss * float("nan") if len(calls) == 3 and torch.is_grad_enabled() else loss

    monkeypatch.setattr(loop, "causal_lm_loss", nan_at_third_step)
    out = tmp_path / "nan"
    with pytest.raises(G3nError, match=r"loss became nan at step 3; the last good checkpoint is kept"):
        train(_cfg(dataset, out, save_steps=1, eval_steps=100), progress=False)
    assert json.loads((out / "latest.json").read_text())["step"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_float16_training_with_loss_scaling(dataset, tmp_path):
    import math

    import torch

    out = tmp_path / "fp16"
    history = train(_cfg(dataset, out, dtype="float16", max_steps=4, save_steps=4, eval_steps=2), progress=False)
    assert all(math.isfinite(h["loss"]) for h in history if "loss" in h)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert math.isfinite(evals[-1]) and evals[-1] < evals[0]
    state = torch.load(out / "checkpoint-4" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the loss scale is saved for an exact resume
    assert {t.dtype for t in state["model"].values()} == {torch.float32}  # adapters train in float32
    with pytest.raises(G3nError, match="full fine-tuning in float16"):
        train(_cfg(dataset, tmp_path / "full16", dtype="float16", lora=False), progress=False)


def test_save_merged_writes_a_loadable_checkpoint(dataset, tmp_path):
    import torch

    import g3n
    from g3n.adapters.lora import load_adapter

    out = tmp_path / "m"
    train(_cfg(dataset, out, max_steps=3, save_merged=True), progress=False)
    merged, _ = g3n.load(out / "merged", dtype="float32", device="cpu")
    base, tok = g3n.load("tiny", dtype="float32", device="cpu")
    load_adapter(base, out / "adapter")
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is the capital of Zork?"}])])
    with torch.no_grad():
        a, b = merged(ids), base(ids)
    assert (a - b).abs().max() < 1e-3  # a float32 run's merged weights stay float32 (were bfloat16: 0.1)
    assert torch.equal(a[0, -1].argmax(), b[0, -1].argmax())
    assert (out / "merged" / "tokenizer.model").is_file()


def test_resume_accepts_runs_started_before_new_settings(tmp_path):
    """A run saved before `compile`/`load_in_4bit` existed (and with the old checkpointing default)
    resumes; switching how layers run (checkpointing, compile) does not block a resume."""
    from g3n.train.config import TrainConfig
    from g3n.train.loop import CONFIG_FILE, prepare_output

    cfg = TrainConfig(output_dir=str(tmp_path), train_data=["x.jsonl"], compile=False)
    old = {**cfg.to_dict(), "gradient_checkpointing": True}
    del old["compile"], old["load_in_4bit"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(old))
    (tmp_path / "latest.json").write_text("{}")
    prepare_output(cfg, resume=True, overwrite=False)
    with pytest.raises(G3nError, match="other settings \\(lora_r\\)"):
        prepare_output(
            TrainConfig(output_dir=str(tmp_path), train_data=["x.jsonl"], lora_r=4), resume=True, overwrite=False
        )


def test_overwrite_refuses_a_directory_that_is_not_a_run(dataset, tmp_path):
    """--overwrite replaces an earlier run, never a directory of other files nor one holding the
    data; without it, such a directory is refused too when it holds the data."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "mine" / CONFIG_FILE).write_text("{}")
    (tmp_path / "mine" / "latest.json").write_text("{}")
    with pytest.raises(G3nError, match=r"--overwrite replaces only an earlier g3n run.*\(notes.txt\)"):
        train(_cfg(dataset, tmp_path / "mine", max_steps=1), overwrite=True, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    for out in (dataset, dataset.parent):
        with pytest.raises(G3nError, match=r"output_dir .* holds train_data"):
            train(_cfg(dataset, out, max_steps=1), overwrite=True, progress=False)
    assert (dataset / "train.jsonl").is_file()
    with pytest.raises(G3nError, match=r"output_dir .*train.jsonl is a file"):
        train(_cfg(dataset, dataset / "train.jsonl", max_steps=1), overwrite=True, progress=False)
    (tmp_path / "empty").mkdir()
    assert len(train(_cfg(dataset, tmp_path / "empty", max_steps=1), overwrite=True, progress=False)) == 2


def test_a_run_that_fails_early_does_not_block_the_next(dataset, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"messages": 3}\n')
    out = tmp_path / "r"
    with pytest.raises(G3nError, match="bad.jsonl:1"):
        train(_cfg(dataset, out, train_data=[str(tmp_path / "bad.jsonl")]), progress=False)
    with pytest.raises(G3nError, match="no such directory"):
        train(_cfg(dataset, out, model=str(tmp_path / "nowhere")), progress=False)
    assert not out.exists() or not (out / "latest.json").exists()
    with pytest.raises(G3nError, match="no checkpoint to resume from"):
        train(_cfg(dataset, out, max_steps=1), resume=True, progress=False)
    assert len(train(_cfg(dataset, out, max_steps=1), progress=False)) == 2


def test_a_run_with_results_but_no_checkpoint_is_still_an_earlier_run(dataset, tmp_path, monkeypatch):
    """Checkpoints deleted to free disk: the adapter is still there, so a new run is refused (not
    silently replacing it); --overwrite works also for output_dir "." (its entries are removed)."""
    out = tmp_path / "r"
    train(_cfg(dataset, out, max_steps=1), progress=False)
    for ckpt in out.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    (out / "latest.json").unlink()
    with pytest.raises(G3nError, match="holds an earlier run"):
        train(_cfg(dataset, out, max_steps=1), progress=False)
    monkeypatch.chdir(out)
    assert train(_cfg(dataset, ".", max_steps=1), overwrite=True, progress=False)[-1]["step"] == 1
    assert (out / "adapter").is_dir()


def test_resume_from_another_spelling_of_output_dir(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(_cfg(dataset, "runs/t1", max_steps=2, save_steps=1), progress=False, stop_after=1)
    resumed = train(_cfg(dataset, "./runs/t1", max_steps=2, save_steps=1), resume=True, progress=False)
    assert resumed[-1]["step"] == 2


def test_resume_below_the_checkpoints_step_is_refused(dataset, tmp_path):
    out = tmp_path / "r"
    train(_cfg(dataset, out, max_steps=3, save_steps=1), progress=False, stop_after=2)
    with pytest.raises(G3nError, match="at step 2, past this run's 1 steps; raise max_steps"):
        train(_cfg(dataset, out, max_steps=1, save_steps=1), resume=True, progress=False)


def test_resume_when_the_model_was_recorded_as_a_relative_path(dataset, tmp_path, monkeypatch):
    """Runs started before model paths were resolved recorded them as given: the same directory
    spelled another way still resumes."""
    from g3n.checkpoint.names import TINY_DIR

    shutil.copytree(TINY_DIR, tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(dataset, "run", max_steps=2, save_steps=1, model=str(tmp_path / "ckpt"))
    train(cfg, progress=False, stop_after=1)
    saved = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    (tmp_path / "run" / CONFIG_FILE).write_text(json.dumps({**saved, "model": "ckpt"}))
    assert train(cfg, resume=True, progress=False)[-1]["step"] == 2


@pytest.mark.parametrize(
    "setting, message",
    [
        ("max_steps=-1", r"invalid max_steps -1: must be >= 0 \(0: use epochs\)"),
        ("epochs=0", r"invalid epochs 0: must be > 0"),
        ("max_grad_norm=-1", r"invalid max_grad_norm -1: must be >= 0 \(0 or null: no clipping\)"),
        ("warmup_steps=-2", r"invalid warmup_steps -2: must be >= 0"),
        ("lora_alpha=0", r"invalid lora_alpha 0: must be > 0"),
        ("lora_dropout=1.5", r"invalid lora_dropout 1.5: must be >= 0 and < 1"),
        ("device=gpu", r"invalid device: 'gpu' is not a device \(cpu, cuda or cuda:N\)"),
    ],
)
def test_settings_out_of_range(setting, message):
    with pytest.raises(G3nError, match=f"config: {message}"):
        load_train_config(None, [setting])


def test_max_grad_norm_zero_or_null_means_no_clipping(dataset, tmp_path):
    import torch

    assert load_train_config(None, ["max_grad_norm=null"]).max_grad_norm is None
    out = tmp_path / "noclip"
    history = train(_cfg(dataset, out, max_steps=1, max_grad_norm=0), progress=False)
    assert history[-1]["grad_norm"] > 0
    state = torch.load(out / "checkpoint-1" / "state.pt", weights_only=True)
    assert any(t.abs().sum() > 0 for name, t in state["model"].items() if "lora_B" in name)  # the step moved them


def test_resume_with_more_steps_follows_the_new_schedule(dataset, tmp_path):
    """A finished linear schedule ends at lr 0; resumed with a larger max_steps, the next step takes
    the rate the new schedule gives there, and training moves on."""
    from g3n.train.loop import lr_lambda

    cfg = _cfg(dataset, tmp_path / "r", max_steps=4, save_steps=4, eval_steps=100)
    first = train(cfg, progress=False)
    longer = _cfg(dataset, tmp_path / "r", max_steps=8, save_steps=4, eval_steps=100)
    resumed = train(longer, resume=True, progress=False)
    step5 = resumed[len(first)]
    assert step5["step"] == 5 and step5["lr"] > 0
    assert step5["lr"] == pytest.approx(longer.learning_rate * lr_lambda(longer, 8)(4))
    assert len({h["loss"] for h in resumed if h["step"] > 4}) > 1


def test_model_path_is_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "models" / "base").mkdir(parents=True)
    for model in ("models/base", "./models/base"):
        (tmp_path / "cfg" / "c.yaml").write_text(f"model: {model}\n")
        monkeypatch.chdir(tmp_path)  # not the config's folder
        assert load_train_config(tmp_path / "cfg" / "c.yaml").model == str(tmp_path / "cfg" / "models" / "base")
    (tmp_path / "cfg" / "c.yaml").write_text("model: ../elsewhere\n")  # written as a path: named where looked for
    assert load_train_config(tmp_path / "cfg" / "c.yaml").model == str(tmp_path / "elsewhere")
    for model in ("tiny", "google/gemma-3n-E2B-it"):
        (tmp_path / "cfg" / "c.yaml").write_text(f"model: {model}\n")
        assert load_train_config(tmp_path / "cfg" / "c.yaml").model == model


def test_packed_rows_through_compiled_layers_keep_one_shape(tmp_path, monkeypatch):
    """Packed batches run through compiled layers are all max_length wide and keep their segment
    ids (rows of other widths, with or without several samples, made compiled layers recompile
    mid-run: steps of seconds on a GPU); eager layers keep each batch as wide as its widest row.
    The compiled code goes to the same disk cache as the engine's."""
    from g3n.inference import compile_cache
    from g3n.train import loop, recompute

    monkeypatch.setattr(recompute, "BACKEND", "aot_eager")
    monkeypatch.setattr(compile_cache, "_chosen", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # both restored after the test
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    places = ["Aa", "Bbbbbbbbbbbbb", "Cc", "Ddddd dddd dddd", "E", "Ffff ff", "Gggggggggg g g g", "H", "Iiii", "Jjj"]
    data = write_capitals_dataset(tmp_path, places)
    shapes, collate = [], loop.collate

    def spy(rows, *args):
        batch = collate(rows, *args)
        shapes.append((batch.ids.shape[1], batch.segments is not None, max(len(r[0]) for r in rows)))
        return batch

    monkeypatch.setattr(loop, "collate", spy)
    for compiled in (True, False):
        shapes.clear()
        # the compiled run short (tracing is most of its time), the eager one long enough for other widths
        cfg = train_config(
            data, tmp_path / str(compiled), compile=compiled, max_length=128, max_steps=2 if compiled else 4
        )
        train(cfg, progress=False)
        widths = {width for width, _, _ in shapes}
        if compiled:
            assert widths == {128} and all(segments for _, segments, _ in shapes)
            assert compile_cache._chosen == tmp_path / "cache" / "g3n" / "torch-compile"
        else:
            assert all(width == widest for width, _, widest in shapes) and len(widths) > 1
    torch._dynamo.reset()
