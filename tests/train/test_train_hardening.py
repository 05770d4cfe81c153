"""What a careless or hostile run directory, config or dataset cannot do to a run: run code,
split or mix runs, leave stale files, or end in a traceback."""

import json

import pytest
import torch

pytest.importorskip("peft")

from g3n.errors import G3nError
from g3n.train.loop import train
from helpers import train_config, write_capitals_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_capitals_dataset(tmp_path_factory.mktemp("data"))


class _Payload:
    """Creates a file when unpickled, as a planted os.system would run a command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_resume_never_unpickles_code_from_the_run_directory(dataset, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    cfg = train_config(dataset, out, max_steps=2, save_steps=1)
    train(cfg, progress=False, stop_after=1)
    state = out / "checkpoint-1" / "state.pt"
    real = torch.load(state, weights_only=True)  # a real checkpoint: tensors and plain data only
    torch.save({**real, "scheduler": _Payload(marker)}, state)
    with pytest.raises(G3nError, match="state.pt: holds objects other than tensors"):
        train(cfg, resume=True, progress=False)
    assert not marker.exists()
    state.write_bytes(state.read_bytes()[:100])  # truncated: one line, no traceback
    with pytest.raises(G3nError, match="state.pt: cannot read the checkpoint"):
        train(cfg, resume=True, progress=False)


def test_a_second_run_into_a_held_output_dir_is_refused_naming_the_holder(dataset, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    script = (
        "import pathlib, time\nfrom g3n.checkpoint.atomic import dir_lock\n"
        f"with dir_lock(pathlib.Path({str(out)!r})):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(G3nError, match=f"g3n process {holder.pid} on .* is writing a training run there"):
            train(train_config(dataset, out, max_steps=1), progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".g3n-lock"]  # the holder's run untouched
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's lock file is left behind: taken over, and the lock is gone after the run
    assert (out / ".g3n-lock").is_file()
    train(train_config(dataset, out, max_steps=1), progress=False)
    assert not (out / ".g3n-lock").exists() and (out / "adapter").is_dir()


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_killed_runs_are_removed(dataset, tmp_path):
    out = tmp_path / "run"
    cfg = train_config(dataset, out, max_steps=2, save_steps=1)
    train(cfg, progress=False, stop_after=1)
    dead = _dead_pid()
    stale = [out / f".checkpoint-2.g3n-partial-{dead}", out / f".checkpoint-3.tmp-{dead}"]  # this and the old naming
    for d in stale:
        d.mkdir()
        (d / "state.pt").write_bytes(b"partial")
    files = [out / f".latest.json.g3n-partial-{dead}", out / "adapter" / f".adapter_model.safetensors.tmp-{dead}"]
    (out / "adapter").mkdir()
    for f in files:
        f.write_text("partial")
    alive = out / f".loss.png.g3n-partial-{__import__('os').getpid()}.png"  # a process that still runs
    alive.write_text("x")
    train(cfg, resume=True, progress=False)
    assert not any(p.exists() for p in stale + files) and alive.exists()


def test_tilde_in_output_dir_and_data_means_home(dataset, tmp_path, monkeypatch):
    import shutil

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    shutil.copy(dataset / "train.jsonl", home / "train.jsonl")
    config = cwd / "config.yaml"
    config.write_text(f"output_dir: ~/runs/x\ntrain_data: ~/train.jsonl\neval_data: [{dataset / 'eval.jsonl'}]\n"
                      "max_steps: 2\nsave_steps: 1\nbatch_size: 2\nmax_length: 64\nlora_r: 4\ndevice: cpu\n")  # fmt: skip
    from g3n.train.config import load_train_config

    cfg = load_train_config(config)
    assert cfg.output_dir == str(home / "runs" / "x") and cfg.train_data == [str(home / "train.jsonl")]
    train(cfg, progress=False, stop_after=1)
    assert list(cwd.iterdir()) == [config]  # no literal ./~
    resumed = train(load_train_config(config, ["output_dir=~/runs/x"]), resume=True, progress=False)
    assert resumed[-1]["step"] == 2 and (home / "runs" / "x" / "adapter").is_dir()


def test_metrics_end_at_the_checkpoint_when_a_run_resumes(dataset, tmp_path):
    out = tmp_path / "run"
    cfg = train_config(dataset, out)  # 6 steps, checkpoints at 3 and 6, evals at 0, 3, 6
    train(cfg, progress=False, stop_after=5)  # killed after step 5: steps 4 and 5 run again
    train(cfg, resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "text,message",
    [
        ("epochs: .inf\n", r"config: epochs must be a finite number, got inf"),
        ("learning_rate: .nan\n", r"config: learning_rate must be a finite number, got nan"),
        ("train_data: 5\n", r"c.yaml: train_data must be a file name or a list of them, got 5"),
        ("eval_data: [a.jsonl, 3]\n", r"c.yaml: eval_data must be a file name or a list of them"),
        ("seed: 18446744073709551616\n", r"config: invalid seed 18446744073709551616: must be >= 0 and < 2\*\*63"),
    ],
)
def test_config_values_that_were_tracebacks(tmp_path, text, message):
    from g3n.train.config import load_train_config

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(G3nError, match=message):
        load_train_config(tmp_path / "c.yaml")


def test_config_file_that_is_not_utf8(tmp_path):
    from g3n.train.config import load_train_config

    (tmp_path / "c.yaml").write_bytes(b"max_steps: 2\noutput_dir: caf\xe9\n")
    with pytest.raises(G3nError, match=r"c.yaml:2: not UTF-8 text \(byte 28\)"):
        load_train_config(tmp_path / "c.yaml")


def test_a_batch_too_large_for_memory_is_a_one_line_error(dataset, tmp_path, monkeypatch):
    from g3n.train import loop

    def huge(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 327155712000 bytes. Error code 12 (Cannot allocate memory)")  # fmt: skip

    monkeypatch.setattr(loop, "causal_lm_loss", huge)
    with pytest.raises(G3nError, match=r"out of cpu memory .* batch_size 2 rows of up to max_length 64 tokens"):
        train(train_config(dataset, tmp_path / "run", max_steps=1), progress=False)


def test_a_full_disk_during_a_checkpoint_keeps_the_last_complete_one(dataset, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "run"
    cfg = train_config(dataset, out, max_steps=2, save_steps=1)
    original = torch.save

    def full_at_step_2(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path):
            open(path, "wb").write(b"half")  # noqa: SIM115
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_step_2)
    with pytest.raises(
        G3nError, match=r"checkpoint-2: no space left on the device .* last complete checkpoint is kept"
    ):
        train(cfg, progress=False)
    assert sorted(p.name for p in out.iterdir() if p.name != "metrics.jsonl") == [
        "checkpoint-1", "latest.json", "train_config.json"]  # fmt: skip
    assert json.loads((out / "latest.json").read_text())["step"] == 1


@pytest.mark.skipif(not __import__("os").path.isdir("/sys/kernel"), reason="needs Linux's read-only /sys")
def test_an_output_dir_that_cannot_be_written_is_a_one_line_error(dataset):
    with pytest.raises(G3nError, match=r"/sys/g3n-run: cannot write there"):
        train(train_config(dataset, "/sys/g3n-run", max_steps=1), progress=False)


def test_bitsandbytes_is_imported_without_its_hub_line(tmp_path, monkeypatch, caplog):
    """bitsandbytes' CPU backend (AVX-512 BF16 CPUs) logs, at import, its failure to fetch a Hub
    kernel (about trust_remote_code); PEFT imports bitsandbytes whenever installed, so every
    `g3n train` printed it. Faked here: g3n imports it first, without that line."""
    import sys

    from g3n.adapters.lora import import_bitsandbytes_quietly

    fake = tmp_path / "bitsandbytes"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import logging\nlogging.getLogger('bitsandbytes.backends.cpu.ops').warning("
        "'Failed to load CPU gemm_4bit_forward from kernels-community: trust_remote_code is needed')\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('other warnings still show')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    import_bitsandbytes_quietly()
    assert "bitsandbytes" in sys.modules
    assert [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")] == [
        "other warnings still show"
    ]


def test_writes_remove_their_own_stale_temporaries(tmp_path):
    """Exports and slices (write_atomic, atomic_dir) remove what a killed earlier write of the same
    name left (GGUF and f16 intermediates, directories); another file's are left alone."""
    import os

    from g3n.checkpoint.atomic import atomic_dir, write_atomic

    dead = _dead_pid()
    stale = [tmp_path / f".m.gguf.tmp-{dead}", tmp_path / f".m.gguf.g3n-partial-{dead}.f16"]
    other = tmp_path / f".other.gguf.g3n-partial-{dead}"
    for p in [*stale, other]:
        p.write_text("partial")
    names = []
    write_atomic(tmp_path / "m.gguf", lambda p: names.append(p.name) or p.write_text("gguf"))
    assert names == [f".m.gguf.g3n-partial-{os.getpid()}"]  # hidden, g3n's, unfinished, whose
    assert not any(p.exists() for p in stale) and other.exists() and (tmp_path / "m.gguf").read_text() == "gguf"
    stale_dir = tmp_path / f".hf.tmp-{dead}"
    stale_dir.mkdir()
    with atomic_dir(tmp_path / "hf") as d:
        (d / "config.json").write_text("{}")
    assert not stale_dir.exists() and (tmp_path / "hf" / "config.json").is_file()
