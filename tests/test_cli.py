"""The g3n command: help texts, generate, chat, demo, and one-line errors."""

import re
import subprocess
import sys

import pytest

from g3n.cli import main


def run_cli(args, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("command", ["generate", "chat", "demo", "export"])
def test_help_explains(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "tiny" in out
    if command not in ("demo", "export"):
        for flag in (
            "--temperature",
            "--top-k",
            "--top-p",
            "--min-p",
            "--repetition-penalty",
            "--seed",
            "--max-new-tokens",
        ):
            assert flag in out


@pytest.mark.parametrize(
    "command", [[], ["generate"], ["chat"], ["train"], ["export"], ["inspect"], ["slice"], ["slice", "search"],
                ["serve"], ["demo"]],
)  # fmt: skip
def test_every_help_prints(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(" ".join(["usage: g3n", *command]))


def test_help_subprocess():
    r = subprocess.run([sys.executable, "-m", "g3n", "--help"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.startswith("usage: g3n") and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "add,argv,handler",
    [
        ("_add_generate", ["generate", "--prompt", "x"], "cmd_generate"),
        ("_add_chat", ["chat", "--image", "a.png"], "cmd_chat"),
        ("_add_train", ["train", "run.yaml", "--set", "lr=1e-4"], "cmd_train"),
        ("_add_export", ["export", "--out", "out", "--format", "gguf"], "cmd_export"),
        ("_add_inspect", ["inspect", "--no-plot"], "cmd_inspect"),
        ("_add_slice", ["slice", "--plan", "E2B"], "cmd_slice"),
        ("_add_slice", ["slice", "search", "--budget", "2B", "--data", "d.jsonl"], "cmd_slice_search"),
        ("_add_serve", ["serve", "--port", "0", "--text-only"], "cmd_serve"),
        ("_add_demo", ["demo", "--seed", "1"], "cmd_demo"),
    ],
)
def test_each_subcommand_is_added_by_its_own_function(add, argv, handler):
    """build_parser only assembles the subcommands: one function adds a subcommand's options and its
    handler, and parses as the whole parser does."""
    import argparse

    from g3n import cli

    parser = argparse.ArgumentParser(prog="g3n")
    getattr(cli, add)(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func is getattr(cli, handler)
    assert vars(args) == vars(cli.build_parser().parse_args(argv))


def test_generate_answers_on_topic(capsys):
    rc, out, _ = run_cli(
        ["generate", "--prompt", "What is the capital of France?", "--greedy", "--device", "cpu"], capsys
    )
    assert rc == 0 and "Paris" in out


def test_generate_seed_reproduces(capsys):
    args = ["generate", "--prompt", "Tell me a fact.", "--seed", "7", "--temperature", "1.5", "--device", "cpu"]
    _, a, _ = run_cli(args, capsys)
    _, b, _ = run_cli(args, capsys)
    assert a == b and a.strip()


def test_chat_keeps_conversation_and_commands(capsys, monkeypatch):
    import g3n.inference.generate as gen

    seen = []

    original = gen.stream_text

    def spy(model, tok, ids, params, media=None, **kw):
        seen.append(tok.decode(ids, skip_special=False))
        return original(model, tok, ids, params, media, **kw)

    monkeypatch.setattr(gen, "stream_text", spy)
    script = "What is 2+2?\nWhat is the capital of Peru?\n/reset\nHi\n/nonsense\n/quit\nnever read\n"
    rc, out, _ = run_cli(["chat", "--greedy", "--device", "cpu"], capsys, script, monkeypatch)
    assert rc == 0
    assert len(seen) == 3
    assert "What is 2+2?" in seen[1] and "Peru" in seen[1]  # second turn sees the first
    assert "2+2" not in seen[2]  # /reset forgot it
    assert seen[1].count("<bos>") == 1
    assert "Lima" in out and "[conversation reset]" in out and "unknown command '/nonsense'" in out


def test_compile_option_reaches_the_engine(capsys, monkeypatch):
    """--compile picks the decode step's compile mode (ignored on a CPU, where nothing is captured)."""
    import g3n.inference.engine as gen
    from g3n.inference.options import CompileMode, DecodeOptions

    modes = []
    original = gen.Engine

    def spy(model, slots, options):
        modes.append(DecodeOptions().compile if options is None else options.compile)
        return original(model, slots, options)

    monkeypatch.setattr(gen, "Engine", spy)
    for flag, mode in (("layers", CompileMode.LAYERS), ("step", CompileMode.STEP), ("off", CompileMode.OFF)):
        args = ["generate", "--prompt", "Hi", "--greedy", "--max-new-tokens", "3", "--device", "cpu", "--compile", flag]
        rc, out, _ = run_cli(args, capsys)
        assert rc == 0 and out.strip() and modes[-1] == mode
    rc, out, _ = run_cli(["generate", "--prompt", "Hi", "--greedy", "--max-new-tokens", "3", "--device", "cpu"], capsys)
    assert rc == 0 and modes[-1] == DecodeOptions().compile  # no --compile: the options' default
    from g3n.errors import G3nError

    with pytest.raises(G3nError, match="compile must be 'off', 'layers' or 'step', not True"):
        DecodeOptions(compile=True)  # the Python API names the modes as the CLI does


def test_chat_drops_a_message_that_does_not_fit_and_goes_on(capsys, monkeypatch):
    script = "word " * 3000 + "\nWhat is the capital of Peru?\n/quit\n"
    rc, out, err = run_cli(["chat", "--greedy", "--device", "cpu"], capsys, script, monkeypatch)
    assert rc == 0
    assert "does not fit" in err and "message dropped" in err
    assert "Lima" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "--prompt", "x", "--device", "gpu"], "'gpu' is not a device (cpu, cuda or cuda:N)"),
        (["serve", "--port", "99999"], "99999 is outside 0..65535"),
        (["serve", "--max-queue", "0"], "0 < 1"),
        (["serve", "--max-batch", "0"], "0 < 1"),
        (["generate", "--prompt", "x", "--context", "0"], "0 < 1"),
    ],
)
def test_bad_option_values_are_usage_errors(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_result_files_get_their_directory_before_the_work(tmp_path, capsys):
    plot = tmp_path / "new" / "dir" / "absmax.png"
    assert main(["inspect", "--model", "tiny", "--plot", str(plot)]) == 0
    assert plot.is_file()


def test_demo_runs_on_tiny(tmp_path, capsys):
    """The whole path: chat, fine-tune (held-out loss falls; the taught facts, asked before and
    after, and at least 90% of known facts the fine-tune does not repeat keep their answers),
    export, and the export answers as the fine-tuned model does."""
    rc, out, _ = run_cli(["demo", "--device", "cpu", "--out", str(tmp_path / "demo")], capsys)
    assert rc == 0
    assert "Paris" in out and out.count("model>") == 4
    before, after = (float(x) for x in re.search(r"held-out loss .*: ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before - 0.3
    assert re.search(r"taught: \d+/10 before, \d+/10 after", out)
    kept, known = (int(x) for x in re.search(r"kept: (\d+)/(\d+)", out).groups())
    assert known == 30 and kept >= 0.9 * known
    assert "answers the 10 questions exactly as the fine-tuned model" in out
    assert float(re.search(r"export vs adapter: ([\d.e+-]+)", out).group(1)) < 1e-3
    assert (tmp_path / "demo" / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "run" / "loss.png").is_file()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "--model", "/no/such/dir", "--prompt", "x"], "/no/such/dir: no such directory"),
        (["generate", "--prompt", "x", "--top-p", "0"], "invalid top_p"),
        (["generate", "--model", "model.gguf", "--prompt", "x"], "GGUF"),
        (["generate", "--raw", "--system", "be brief", "--prompt", "x"], "need the chat format"),
        (["slice", "search", "--budget", "1B", "--data", "x.jsonl", "--load-in-4bit"], "drop --load-in-4bit"),
        (
            ["generate", "--model", "model.gguf", "--prompt", "x", "--compile", "layers"],
            "a GGUF file runs in llama.cpp",
        ),
    ],
)
def test_errors_are_one_line(args, needle, capsys):
    rc, _out, err = run_cli(args, capsys)
    assert rc == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_option_subprocess():
    r = subprocess.run(
        [sys.executable, "-m", "g3n", "generate", "--prompt", "x", "--bogus"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr and "Traceback" not in r.stderr


def test_bad_checkpoint_subprocess(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    r = subprocess.run([sys.executable, "-m", "g3n", "generate", "--model", str(tmp_path), "--prompt", "x"],
                       capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip()
        == f"g3n: error: {tmp_path}/config.json: model_type is 'llama', not a Gemma 3n model ('gemma3n' or 'gemma3n_text')"
    )


def test_export_merges_an_adapter(tmp_path, capsys, monkeypatch):
    """`g3n export --adapter` writes base + LoRA as an HF checkpoint with the adapted model's logits;
    an existing output is refused, and a failed export leaves nothing under the final name."""
    import torch

    import g3n
    from g3n.adapters.lora import load_adapter
    from helpers import tiny_with_saved_adapter

    model = tiny_with_saved_adapter(tmp_path / "adapter")
    tok = g3n.load("tiny", dtype="float32", device="cpu")[1]
    out = tmp_path / "merged"
    args = [
        "export",
        "--model",
        "tiny",
        "--adapter",
        str(tmp_path / "adapter"),
        "--out",
        str(out),
        "--dtype",
        "float32",
    ]
    rc, stdout, _ = run_cli(args, capsys)
    assert rc == 0 and "exported" in stdout
    merged, merged_tok = g3n.load(out, dtype="float32", device="cpu")
    reference, _ = g3n.load("tiny", dtype="float32", device="cpu")
    load_adapter(reference, tmp_path / "adapter")
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])])
    with torch.no_grad():
        # float32: W + BA rounds otherwise than x W + (x A) B, by as much as the CPU's BLAS kernels
        # make it (1.1e-4 on one machine, under 1e-4 on another); the adapter moves logits by up to 7
        diff = (merged(ids) - reference(ids)).abs().max().item()
        assert diff < 3e-4 and (reference(ids) - model(ids)).abs().max() < 1e-4
    assert merged_tok.encode("Hello") == tok.encode("Hello")

    rc, _, err = run_cli(args, capsys)
    assert rc == 2 and "output directory exists (pass --overwrite" in err

    from g3n.adapters import merge

    def disk_full(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(merge, "save_text_checkpoint", disk_full)
    with pytest.raises(OSError):
        main(["export", "--model", "tiny", "--out", str(tmp_path / "failed")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


def test_full_fine_tune_writes_a_loadable_model(tmp_path, capsys):
    """lora: false ends with an HF checkpoint in output_dir/merged, named in the last line."""
    import torch

    import g3n
    from helpers import write_capitals_dataset

    data = write_capitals_dataset(tmp_path)
    out = tmp_path / "full"
    sets = [f"train_data={data / 'train.jsonl'}", f"eval_data={data / 'eval.jsonl'}", f"output_dir={out}",
            "lora=false", "max_steps=2", "batch_size=2", "max_length=64", "learning_rate=0.001", "device=cpu"]  # fmt: skip
    rc, stdout, err = run_cli(["train", *[a for s in sets for a in ("--set", s)]], capsys)
    assert rc == 0, err
    assert stdout.strip().splitlines()[-1].endswith(f"; outputs in {out}; model in {out / 'merged'}")
    tuned, tok = g3n.load(out / "merged", dtype="float32", device="cpu")
    base, _ = g3n.load("tiny", dtype="float32", device="cpu")
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is the capital of Zork?"}])])
    with torch.no_grad():
        assert (tuned(ids) - base(ids)).abs().max() > 1e-3
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # written atomically, no leftovers


def test_export_overwrite_replaces_only_an_earlier_export(tmp_path, capsys):
    """--overwrite never deletes the model, the adapter or a directory with other files (it used to
    remove sb2 with sb2/base in it); an HF export into a file and a GGUF into a directory are refused."""
    import shutil

    from g3n.checkpoint.names import TINY_DIR
    from helpers import tiny_with_saved_adapter

    shutil.copytree(TINY_DIR, tmp_path / "sb2" / "base")
    (tmp_path / "sb2" / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    base = str(tmp_path / "sb2" / "base")
    for out in ("sb2", "sb2/base"):
        rc, _, err = run_cli(["export", "--model", base, "--out", str(tmp_path / out), "--overwrite"], capsys)
        assert rc == 2 and f"is or contains {base}, which this export reads; choose another --out" in err
    tiny_with_saved_adapter(tmp_path / "run" / "adapter")
    rc, _, err = run_cli(["export", "--adapter", str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "run"),
                          "--overwrite"], capsys)  # fmt: skip
    assert rc == 2 and "which this export reads" in err
    rc, _, err = run_cli(
        ["export", "--model", base, "--out", str(tmp_path / "sb2" / "notes.txt"), "--overwrite"], capsys
    )
    assert rc == 2 and "notes.txt: not a directory; an HF export writes a directory" in err
    shutil.copytree(TINY_DIR, tmp_path / "other")
    (tmp_path / "other" / "notes.txt").write_text("mine")
    rc, _, err = run_cli(["export", "--out", str(tmp_path / "other"), "--overwrite"], capsys)
    assert rc == 2 and "other: holds notes.txt, which an HF export does not write" in err
    rc, _, err = run_cli(["export", "--format", "gguf", "--out", str(tmp_path / "other"), "--overwrite"], capsys)
    assert rc == 2 and "other: not a file; a GGUF export writes one file" in err
    rc, _, err = run_cli(["export", "--format", "gguf", "--out", str(tmp_path / "sb2" / "notes.txt"), "--overwrite"],
                         capsys)  # fmt: skip
    assert rc == 2 and "notes.txt: not a GGUF file" in err
    assert (tmp_path / "sb2" / "notes.txt").read_text() == "mine"
    assert (
        sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "run" not in p.parts and "other" not in p.parts)
        == before
    )

    out = tmp_path / "exports" / "merged"  # an earlier export is replaced
    assert main(["export", "--out", str(out)]) == 0
    assert main(["export", "--out", str(out), "--overwrite", "--dtype", "float16"]) == 0
    assert '"dtype": "float16"' in (out / "config.json").read_text()


def test_export_uses_the_adapters_base_model(tmp_path, capsys):
    """Without --model, the adapter's recorded base is merged into (not 'tiny'); an unknown or
    missing base asks for --model; an adapter of another shape is a one-line error."""
    import json
    import shutil

    from g3n.checkpoint.names import TINY_DIR
    from helpers import tiny_with_saved_adapter, widen_first_lora_a

    base = tmp_path / "base"
    shutil.copytree(TINY_DIR, base)
    adapter = tmp_path / "adapter"
    tiny_with_saved_adapter(adapter)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    rc, out, err = run_cli(["export", "--adapter", str(adapter), "--out", str(tmp_path / "merged")], capsys)
    assert rc == 0, err
    assert f"exported {base} + adapter {adapter}" in out

    for recorded, message in ((str(tmp_path / "gone"), "base model '.*gone' not found"),
                              ("", "records no base_model_name_or_path")):  # fmt: skip
        config_path.write_text(json.dumps({**config, "base_model_name_or_path": recorded}))
        rc, _, err = run_cli(["export", "--adapter", str(adapter), "--out", str(tmp_path / "x")], capsys)
        assert rc == 2 and re.search(message, err) and "pass the base model with --model" in err
        assert len(err.strip().splitlines()) == 1

    from argparse import Namespace

    from g3n.cli import _resolve_model  # serve, chat and generate --adapter resolve --model the same way

    config_path.write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    assert _resolve_model(Namespace(model=None, adapter=str(adapter))) == str(base)
    assert _resolve_model(Namespace(model=None)) == "tiny"
    capsys.readouterr()

    widen_first_lora_a(adapter)
    for fmt in ("hf", "gguf"):
        rc, _, err = run_cli(["export", "--model", "tiny", "--adapter", str(adapter), "--format", fmt,
                              "--out", str(tmp_path / f"bad-{fmt}")], capsys)  # fmt: skip
        assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert re.search(r"adapter tensor .*lora_A.weight has shape \(4, \d+\), but .* needs \(4, \d+\)", err), err
    assert not (tmp_path / "bad-hf").exists() and not (tmp_path / "bad-gguf").exists()


def test_export_refuses_contradictory_options(tmp_path, capsys):
    from g3n.export.gguf import QUANTS

    rc, _, err = run_cli(["export", "--format", "hf", "--quant", "q4_0", "--out", str(tmp_path / "a")], capsys)
    assert rc == 2 and "--quant q4_0 is for --format gguf/ollama" in err
    rc, _, err = run_cli(
        ["export", "--format", "gguf", "--dtype", "float32", "--out", str(tmp_path / "a.gguf")], capsys
    )
    assert rc == 2 and "--dtype float32 is for --format hf; a GGUF's weight type is --quant" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ", ".join(QUANTS) in help_text and "dynamic" in help_text and "q4_k_m" in help_text


def test_ctrl_c_during_a_reply_stops_it_and_keeps_the_chat(capsys, monkeypatch):
    import os
    import signal

    import g3n.inference.generate as gen

    seen, original = [], gen.stream_text

    def interrupted_after_two_pieces(model, tok, ids, params, media=None, **kw):
        seen.append(tok.decode(ids, skip_special=False))
        for n, piece in enumerate(original(model, tok, ids, params, media, **kw)):
            yield piece
            if n == 1 and len(seen) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the first reply streams

    monkeypatch.setattr(gen, "stream_text", interrupted_after_two_pieces)
    script = "What is the capital of Peru?\nAnd of France?\n/quit\n"
    rc, out, err = run_cli(["chat", "--greedy", "--device", "cpu"], capsys, script, monkeypatch)
    assert rc == 0 and "[reply stopped; the part shown is kept]" in err
    first = out.split("model> ")[1].strip()
    assert len(seen) == 2 and f"Peru?<end_of_turn>\n<start_of_turn>model\n{first}<end_of_turn>" in seen[1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C at the prompt still quits


def test_chat_input_that_is_not_utf8_is_reported_and_skipped(capsys, monkeypatch):
    import io

    stdin = io.TextIOWrapper(io.BytesIO(b"bad \xff byte\nWhat is the capital of Peru?\n/quit\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    rc, out, err = run_cli(["chat", "--greedy", "--device", "cpu"], capsys)
    assert rc == 0 and "your message has an invalid character at position 4" in err and "Lima" in out
    rc, _, err = run_cli(["generate", "--prompt", "a\udcffb", "--device", "cpu"], capsys)  # argv's surrogateescape
    assert rc == 2 and "text has an invalid character at position" in err and "Traceback" not in err


@pytest.mark.skipif(not __import__("os").path.isdir("/sys/kernel"), reason="needs Linux's read-only /sys")
@pytest.mark.parametrize("fmt,name", [("hf", "g3n-x"), ("gguf", "g3n-x.gguf")])
def test_export_to_a_place_that_cannot_be_written_is_one_line_and_tilde_is_home(capsys, monkeypatch, fmt, name):
    monkeypatch.setenv("HOME", "/sys")
    quant = ["--quant", "f32"] if fmt == "gguf" else []
    rc, _, err = run_cli(["export", "--format", fmt, *quant, f"--out=~/{name}"], capsys)
    assert rc == 2 and err.startswith(f"g3n: error: /sys/{name}") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_closed_streams_and_broken_pipes_end_quietly(capsys, monkeypatch):
    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    generate = ["generate", "--prompt", "Hi", "--greedy", "--max-new-tokens", "4", "--device", "cpu"]
    monkeypatch.setattr(sys, "stdout", Gone())  # `g3n generate ... | head -c0`
    assert main(generate) == 141
    monkeypatch.setattr(sys, "stdout", None)  # `g3n generate >&-`
    assert main(generate) == 0
    monkeypatch.setattr(sys, "stdin", None)  # `g3n chat <&-`
    assert main(["chat", "--device", "cpu"]) == 2
    assert "g3n chat reads its messages from stdin, which is closed" in capsys.readouterr().err
