"""Fine-tuning on several processes (torchrun, gloo on the CPU): two processes follow a one-process
run of the same global batch, write their outputs once, resume in one process, and bad input stops
every process with one clear message.

Tolerance: float32 sums run in another order (rows split between processes, padded differently,
gradients all-reduced) and the logged values are rounded (loss to 1e-6, gradient norm to 1e-4), so
per-step losses must agree within 2e-5 and gradient norms within 1e-4 + 5e-4 x the norm (Adam turns
float noise in near-zero gradients into relative differences of the next steps' norms). Observed
here: losses within 5e-6, gradient norms within 2.3e-4 x the norm at step 3 (1.3e-5 while padded
rows still had an attention mask; a padded batch's gradient equals its rows' within 6e-7 either
way). A lost or doubled gradient moves the norm by percents.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from g3n.errors import G3nError
from g3n.train import distributed
from g3n.train.config import load_train_config
from g3n.train.loop import train
from helpers import write_capitals_dataset

TESTS = Path(__file__).resolve().parent.parent
SRC = TESTS.parent / "src"
PLANETS = ["Zork", "Blip", "Quax", "Murn", "Telo", "Vesk", "Oran", "Pym", "Abra", "Kell", "Lunn", "Sorb"]
TOL = {"loss": (2e-5, 0), "grad_norm": (1e-4, 5e-4), "eval_loss": (2e-5, 0)}  # (absolute, relative)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = write_capitals_dataset(tmp_path_factory.mktemp("data"), PLANETS, ", of course.")
    _small_model(d / "model")
    return d


def _small_model(d: Path) -> None:
    """A 10-layer random model (tests/helpers.py) with TOKENIZER768: fewer layers than `tiny`, so
    fewer collectives per step under FSDP."""
    import shutil

    from helpers import TOKENIZER768, make_hf_model

    make_hf_model(vocab_size=768, vocab_size_per_layer_input=768).save_pretrained(d)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(TOKENIZER768 / name, d / name)


def _settings(data, out, **kw) -> dict:
    """Unpacked rows of different lengths (so batches are padded differently in one and two
    processes), 3 steps, a checkpoint at step 2."""
    base = {
        "model": str(data / "model"), "train_data": [str(data / "train.jsonl")],
        "eval_data": [str(data / "eval.jsonl")], "output_dir": str(out), "batch_size": 1, "max_steps": 3, "save_steps": 2, "eval_steps": 3, "learning_rate": 3e-3, "lora_r": 8,
        "max_length": 64, "packing": False, "device": "cpu",
    }  # fmt: skip
    base.update(kw)
    return base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, settings: dict | None, script: str | None = None, timeout: float = 150, resume=False, env=None):
    """`torchrun --nproc-per-node 2 -m g3n train CONFIG` (or a script), gloo on the CPU."""
    config = tmp_path / "config.yaml"
    if settings is not None:
        config.write_text(json.dumps(settings))  # JSON is YAML
    target = [str(script)] if script else ["-m", "g3n", "train", str(config), *["--resume"] * resume]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *target]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _steps(history) -> dict[int, dict]:
    return {h["step"]: h for h in history if "loss" in h}


def _close(a: dict[int, dict], b: dict[int, dict]) -> None:
    assert a.keys() == b.keys()
    for step, x in a.items():
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in x or key in b[step]:
                absolute, relative = TOL[key]
                assert abs(x[key] - b[step][key]) <= absolute + relative * abs(b[step][key]), (step, key, x, b[step])


@pytest.mark.parametrize("lora", [True, False], ids=["lora-ddp", "full-fsdp2"])
def test_two_processes_follow_one_and_resume_in_one(data, tmp_path, lora):
    extra = {} if lora else {"lora": False, "learning_rate": 1e-4, "save_merged": True}
    two = tmp_path / "two"
    run = _torchrun(tmp_path, _settings(data, two, **extra))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done: step 3") == 1  # process 0 reports

    # the same global batch (2 rows) in one process
    one = train(load_train_config(base=_settings(data, tmp_path / "one", batch_size=2, **extra)), progress=False)
    logged = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in logged] == [0, 1, 2, 3]  # written once, by process 0
    _close(_steps(logged), _steps(one))
    assert abs(logged[0]["eval_loss"] - one[0]["eval_loss"]) <= TOL["eval_loss"][0]  # sharded eval
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (two / "adapter" / "adapter_model.safetensors").is_file() == lora
    if not lora:  # the merged model gathered from the shards equals the one-process one (bf16 files)
        from safetensors.torch import load_file

        a, b = (load_file(d / "merged" / "model.safetensors") for d in (two, tmp_path / "one"))
        assert a.keys() == b.keys()
        close = {k: torch.allclose(a[k].float(), b[k].float(), rtol=2**-7, atol=1e-6) for k in a}  # 1 bf16 step
        assert all(close.values()), [k for k, ok in close.items() if not ok]

    # stopped after the step-2 checkpoint, resumed in one process with batch_size x grad_accum = 2
    (two / "latest.json").write_text(json.dumps({"checkpoint": "checkpoint-2", "step": 2}))
    with pytest.raises(G3nError, match=r"global batch of 2 rows \(1 x 1 x 2 processes\).*set batch_size x grad_accum"):
        train(load_train_config(base=_settings(data, two, **extra)), resume=True, progress=False)
    resumed = train(load_train_config(base=_settings(data, two, grad_accum=2, **extra)), resume=True, progress=False)
    assert [h["step"] for h in resumed] == [0, 1, 2, 3]
    _close(_steps(resumed), _steps(one))
    if not lora:  # and in two processes again: the sharded model and optimizer load the full tensors
        (two / "latest.json").write_text(json.dumps({"checkpoint": "checkpoint-2", "step": 2}))
        run = _torchrun(tmp_path, _settings(data, two, **extra), resume=True)
        assert run.returncode == 0, run.stderr[-3000:]
        last = json.loads((two / "metrics.jsonl").read_text().splitlines()[-1])
        _close({3: last}, {3: _steps(one)[3]})


def test_micro_batches_weigh_every_token_of_a_step_alike(data, tmp_path):
    """The loss is normalised by the step's target tokens, not per micro-batch: 1 row x 2
    micro-batches (rows of different lengths) gives the gradient of one batch of 2 rows."""
    split = train(load_train_config(base=_settings(data, tmp_path / "a", grad_accum=2)), progress=False)
    whole = train(load_train_config(base=_settings(data, tmp_path / "b", batch_size=2)), progress=False)
    _close(_steps(split), _steps(whole))


DROPOUT_SCRIPT = """
import json, os, sys, torch
from g3n.cli import main
draws, dropout = [], torch.nn.Dropout.forward
def forward(self, x):
    y = dropout(self, x)
    if self.training and self.p > 0:
        draws.append(((y == 0) & (x != 0)).flatten()[:512].tolist())
    return y
torch.nn.Dropout.forward = forward
code = main(["train", {config!r}])
with open({folder!r} + f"/draws-{{os.environ['RANK']}}.json", "w") as f:
    json.dump(draws, f)
sys.exit(code)
"""


def test_each_process_draws_dropout_masks_of_its_own(data, tmp_path):
    """LoRA dropout on two processes: the masks each process draws (the first 512 of each call's,
    over rows of both processes' lengths) differ between the processes, as they would within one
    process's batch; one step, no eval."""
    settings = _settings(data, tmp_path / "run", max_steps=1, save_steps=1, eval_data=[], eval_fraction=0,
                         lora_dropout=0.3)  # fmt: skip
    (tmp_path / "config.yaml").write_text(json.dumps(settings))
    script = tmp_path / "dropout.py"
    script.write_text(DROPOUT_SCRIPT.format(config=str(tmp_path / "config.yaml"), folder=str(tmp_path)))
    run = _torchrun(tmp_path, None, script=str(script))
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = (json.loads((tmp_path / f"draws-{rank}.json").read_text()) for rank in (0, 1))
    assert len(first) == len(second) > 0 and any(any(mask) for mask in first)
    same = [a == b[: len(a)] or b == a[: len(b)] for a, b in zip(first, second, strict=True)]
    assert not any(same), f"{sum(same)} of {len(same)} dropout calls drew the same mask on both processes"


def test_settings_that_differ_between_processes_stop_both_with_one_message(data, tmp_path):
    settings = _settings(data, tmp_path / "run")
    (tmp_path / "config.yaml").write_text(json.dumps(settings))
    script = tmp_path / "differ.py"
    script.write_text(
        "import os, sys\nfrom g3n.cli import main\n"
        f"lr = 0.001 * (1 + int(os.environ['RANK']))\n"
        f"sys.exit(main(['train', {str(tmp_path / 'config.yaml')!r}, '--set', f'learning_rate={{lr}}']))\n"
    )
    start = time.perf_counter()
    run = _torchrun(tmp_path, None, script=str(script), timeout=90)
    assert run.returncode != 0
    message = "process 1 was started with other settings than process 0 (learning_rate 0.001 on process 0, 0.002 on process 1)"
    assert run.stderr.count(message) == 1, run.stderr[-3000:]  # once per host, not once per process
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_a_process_that_stops_answering_ends_the_run(tmp_path):
    """Collectives time out (G3N_DIST_TIMEOUT): process 1 never reaches the all-reduce, process 0
    gives up after 3 s and exits, and torchrun stops process 1."""
    script = tmp_path / "silent.py"
    script.write_text(
        "import time\nfrom g3n.train import distributed\n"
        "d = distributed.setup('cpu')\n"
        "if d.rank == 1:\n    time.sleep(120)\n"
        "with distributed.explained_timeouts(d):\n    d.sum(1.0)\n"
    )
    start = time.perf_counter()
    run = _torchrun(tmp_path, None, script=str(script), timeout=90, env={distributed.TIMEOUT_ENV: "3"})
    assert run.returncode != 0
    assert "G3nError: process 0: the other processes did not answer within 3 s (G3N_DIST_TIMEOUT)" in run.stderr
    assert time.perf_counter() - start < 60


def test_gpus_option_runs_torchrun(monkeypatch, capsys):
    import subprocess as sp

    from g3n.cli import main

    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(sp, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["train", "c.yaml", "--gpus", "2", "--set", "lora_r=4", "--resume"]) == 0
    assert calls == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                      "-m", "g3n", "train", "c.yaml", "--set", "lora_r=4", "--resume"]]  # fmt: skip
    assert "[g3n] torchrun --standalone --nproc-per-node=2 -m g3n train c.yaml" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "c.yaml", "--gpus", "2"]) == 2
    assert "already runs under torchrun" in capsys.readouterr().err


def test_more_processes_than_gpus(monkeypatch):

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.PeerError, match=r"2 processes on this host but 1 GPU\(s\) visible"):
        distributed.setup("cuda")
    with pytest.raises(G3nError, match="device 'cuda:1': under torchrun each process takes the GPU of its LOCAL_RANK"):
        distributed.setup("cuda:1")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(G3nError, match="G3N_DIST_TIMEOUT='soon'"):
        distributed.timeout_s()


def test_gpus_option_refuses_more_than_visible(capsys):
    from g3n.cli import main

    n = torch.cuda.device_count()
    assert main(["train", "--gpus", str(n + 1), "--set", "train_data=x.jsonl"]) == 2
    assert f"--gpus {n + 1}: {n} GPU(s) visible on this host" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_refused():
    import g3n

    model, _ = g3n.load("tiny", dtype="float32", device="cpu")
    model.requires_grad_(True)  # full fine-tuning: every weight is saved
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    name = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(G3nError, match=rf"{name} has shape \(3, 3\) but the model's is .*another model"):
        distributed.load_model_state(distributed.Dist(), model, {**state, name: torch.zeros(3, 3)}, "ckpt")
    with pytest.raises(G3nError, match=r"ckpt: has a weight 'lora_A' .*another model or method"):
        distributed.load_model_state(distributed.Dist(), model, {**state, "lora_A": torch.zeros(1)}, "ckpt")


FSDP_SCRIPT = """
import os, sys, tempfile, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
dist.init_process_group("gloo", rank=0, world_size=1)
from helpers import make_hf_model
from g3n.train import recompute
from g3n.model.load import load_model
from g3n.train.loss import causal_lm_loss
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
recompute.BACKEND = "aot_eager"
d = tempfile.mkdtemp()
make_hf_model(attn_implementation="eager").save_pretrained(d)
ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
losses = []
for sharded in (False, True):
    model = load_model(d, dtype="float32", device="cpu").requires_grad_(True).train()
    if sharded:
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model.model, mesh=mesh)
    for mode, compiled, tile in (("offload", False, 7), (True, False, 7), ("offload", True, 0)):
        recompute.configure(model.model, mode, compiled)
        recompute.TILE_FROM = recompute.TILE = tile or 8192
        model.zero_grad()
        loss = causal_lm_loss(model, ids, ids.clone())
        loss.backward()
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()
                 if p.grad is not None]
        losses.append([loss.item(), sum(float(g.double().square().sum()) for g in grads) ** 0.5])
print("LOSSES", losses)
dist.destroy_process_group()
"""


def test_fsdp_layers_run_tiled_and_compiled(tmp_path):
    """Long rows' tiles and compiled layers still go through each layer's call, where FSDP2
    gathers the layer's shards (the first version called the halves directly: mixed Tensor and
    DTensor). One process, gloo; the sharded losses and gradient norms equal the plain model's."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT.format(tests=str(TESTS), port=_free_port()))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    losses = json.loads(done.stdout.split("LOSSES", 1)[1].strip())
    plain, sharded = losses[:3], losses[3:]
    assert all(
        abs(a[0] - b[0]) < 1e-5 and abs(a[1] - b[1]) < 1e-4 * a[1] for a, b in zip(plain, sharded, strict=True)
    ), losses
