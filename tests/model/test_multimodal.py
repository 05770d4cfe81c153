"""Images and audio: g3n's decoder behind transformers' towers equals transformers'
Gemma3nForConditionalGeneration; prompts, files and float16 behave."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
import g3n
from g3n.errors import G3nError
from g3n.inference.generate import generate
from g3n.inference.sampling import SamplingParams
from g3n.media import MediaProcessor, load_audio, load_image
from g3n.model.towers import make_convs_fp16_safe
from helpers import MM_IDS, make_hf_multimodal, save_hf_multimodal

IMG = [MM_IDS["boi"]] + [MM_IDS["image"]] * 4 + [MM_IDS["eoi"]]
AUD = [MM_IDS["boa"]] + [MM_IDS["audio"]] * 8 + [MM_IDS["eoa"]]


@pytest.fixture(scope="module")
def hf_mm():
    return make_hf_multimodal()


@pytest.fixture(scope="module")
def mm_dir(hf_mm, tmp_path_factory):
    return save_hf_multimodal(hf_mm, tmp_path_factory.mktemp("mm"))


@pytest.fixture(scope="module")
def ours(mm_dir):
    return g3n.load(mm_dir, dtype="float32", device="cpu", modalities=("image", "audio"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import soundfile
    from PIL import Image

    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 80, 3)) * 255).astype("uint8")).save(d / "a.png")
    soundfile.write(d / "a.wav", (rng.standard_normal(12000) * 0.1).astype("float32"), 24000)
    return d


def _audio_features(seconds=0.5, seed=0):
    from transformers import Gemma3nAudioFeatureExtractor

    wav = np.random.default_rng(seed).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1
    f = Gemma3nAudioFeatureExtractor()([wav], return_tensors="pt")
    return f["input_features"], f["input_features_mask"].bool()


def test_logits_equal_transformers_with_images_and_audio(hf_mm, ours):
    model, _ = ours
    ids = torch.tensor([[2, 105, 20, 30, *IMG, 40, *IMG, 41, *AUD, 50, 106]])
    pix = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    feats, mask = _audio_features()
    with torch.no_grad():
        ref = hf_mm(input_ids=ids, pixel_values=pix, input_features=feats, input_features_mask=mask).logits
        got = model(ids, media={"pixel_values": pix, "input_features": feats, "input_features_mask": mask})
        no_image = model(ids, media={"pixel_values": pix * 0.5, "input_features": feats, "input_features_mask": mask})
    assert (got - ref).abs().max() < 1e-4
    assert (no_image - got).abs().max() > 1e-2  # the image really reaches the logits


def test_padded_batch_equals_transformers(hf_mm, ours):
    model, _ = ours
    rows = [[2, 20, *IMG, 30, 31, 32], [2, *IMG, 33]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pix = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf_mm(input_ids=ids, attention_mask=attn, pixel_values=pix).logits
        got = model(ids, attention_mask=attn, media={"pixel_values": pix})
    real = attn.bool()
    assert (got[real] - ref[real]).abs().max() < 1e-4


def test_greedy_generation_with_image_equals_transformers(hf_mm, ours):
    model, _ = ours
    prompt = [2, 105, 20, *IMG, 30, 106, 105, 40]
    pix = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ref = hf_mm.generate(
        input_ids=torch.tensor([prompt]), pixel_values=pix, max_new_tokens=8, do_sample=False, min_new_tokens=8
    )[0, len(prompt) :].tolist()
    got = generate(model, [prompt], SamplingParams(greedy=True, max_new_tokens=8), media={"pixel_values": pix})
    assert got[0] == ref


def test_text_only_loading_of_a_multimodal_checkpoint(hf_mm, mm_dir):
    model, _ = g3n.load(mm_dir, dtype="float32", device="cpu")
    assert model.towers is None  # towers are read only when asked for
    ids = torch.tensor([[2, 105, 20, 30, 40, 106]])
    with torch.no_grad():
        assert (model(ids) - hf_mm(input_ids=ids).logits).abs().max() < 1e-4
    with pytest.raises(G3nError, match="without vision/audio towers"):
        model(ids, media={"pixel_values": torch.zeros(1, 3, 64, 64)})


def test_processor_builds_gemma_prompts(ours, mm_dir, files):
    model, tok = ours
    proc = MediaProcessor(mm_dir)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(files / "a.png")},
                {"type": "text", "text": "  What is this?  "},
                {"type": "audio", "audio": str(files / "a.wav")},
            ],
        }
    ]
    ids, media = proc(tok, messages)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    i = ids.index(MM_IDS["boi"])
    assert tok.decode(ids[:i], skip_special=False).endswith("<start_of_turn>user\n\n\n")  # "\n\n" + sequence
    assert ids[i : i + len(IMG)] == IMG
    j = ids.index(MM_IDS["boa"])
    assert ids[j : j + len(AUD)] == AUD
    assert tok.decode(ids[i + len(IMG) : j]).strip() == "What is this?"
    assert media["pixel_values"].shape == (1, 3, 64, 64)
    # 0.5 s at 24 kHz resampled to 16 kHz: 10 ms hops of 32 ms frames
    assert media["input_features"].shape[0] == 1 and 45 <= media["input_features"].shape[1] <= 50
    out = generate(model, [ids], SamplingParams(greedy=True, max_new_tokens=4), media=media)
    full = [*ids]
    for tok_id in out[0]:
        with torch.no_grad():
            assert int(model(torch.tensor([full]), media=media)[0, -1].argmax()) == tok_id
        full.append(tok_id)


def test_bad_media_inputs(ours, mm_dir, files, tmp_path):
    model, tok = ours
    with pytest.raises(G3nError, match="image file not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(G3nError, match="bad.png: not an image"):
        load_image(tmp_path / "bad.png")
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(G3nError, match="bad.wav: not an audio file"):
        load_audio(tmp_path / "bad.wav")
    import soundfile

    soundfile.write(tmp_path / "long.wav", np.zeros(16000 * 31, dtype="float32"), 16000)
    with pytest.raises(G3nError, match="31.0 s of audio; Gemma 3n takes at most 30 s"):
        load_audio(tmp_path / "long.wav")
    with pytest.raises(G3nError, match="needs the model loaded with its image tower"):
        tok.encode_chat([{"role": "user", "content": [{"type": "image", "image": "x.png"}]}])
    with pytest.raises(G3nError, match="4 image soft tokens .* but 2 image"):
        model(torch.tensor([[2, *IMG]]), media={"pixel_values": torch.zeros(2, 3, 64, 64)})
    with pytest.raises(G3nError, match="text-only checkpoint"):
        g3n.load("tiny", modalities=("image",))


def test_float16_vision_tower_stays_finite(ours):
    """Conv weights at the real model's abs max (98, 37, 34.75, 33.75) and an activation scale that
    drives the last 1x1 conv past float16's 65504: plain float16 gives inf/NaN; g3n's float32 convs
    stay finite and close to float32."""
    model, _ = ours
    towers = copy.deepcopy(model.towers)
    scale_to = {
        "msfa.ffn.pw_proj.conv.weight": 98.0,
        "msfa.ffn.pw_exp.conv.weight": 37.0,
        "blocks.3.2.pw_proj.conv.weight": 34.75,
        "blocks.3.2.pw_exp.conv.weight": 33.75,
        "msfa.ffn.pw_exp.bn.weight": 400.0,
    }
    with torch.no_grad():
        for name, p in towers.vision_tower.named_parameters():
            for suffix, value in scale_to.items():
                if name.endswith(suffix):
                    p.mul_(value / p.abs().max())
        pix = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
        half = copy.deepcopy(towers).half()
        ref = copy.deepcopy(half).float().image_features(pix)  # the same float16 weights, float32 compute
        plain = half.image_features(pix.half())
        assert make_convs_fp16_safe(half.vision_tower) == 31
        safe = half.image_features(pix.half())
    assert not torch.isfinite(plain).all()
    assert torch.isfinite(safe).all()
    err = (safe.float() - ref).abs().mean() / ref.abs().mean()
    assert err < 0.01, err  # float16 inputs, embedder and output


def test_cli_generate_with_image_and_audio(ours, mm_dir, files):
    model, tok = ours
    args = ["--model", str(mm_dir), "--dtype", "float32", "--device", "cpu", "--greedy", "--max-new-tokens", "5"]
    cmd = [sys.executable, "-m", "g3n.cli", "generate", *args, "--prompt", "What is it?"]
    cmd += ["--image", str(files / "a.png"), "--audio", str(files / "a.wav")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    message = {
        "role": "user",
        "content": [
            {"type": "image", "image": str(files / "a.png")},
            {"type": "audio", "audio": str(files / "a.wav")},
            {"type": "text", "text": "What is it?"},
        ],
    }
    ids, media = MediaProcessor(mm_dir)(tok, [message])
    expected = tok.decode(
        generate(model, [ids], SamplingParams(greedy=True, max_new_tokens=5), tok.stop_ids, 0, media)[0]
    )
    assert out.stdout.strip() == expected.rstrip("\ufffd").strip()  # a cut-off UTF-8 byte is held back
    bad = subprocess.run(
        [*cmd[:-4], "--image", str(files / "nope.png")], capture_output=True, text=True, timeout=120, check=False
    )
    assert bad.returncode == 2 and "nope.png: image file not found" in bad.stderr


def test_inspect_flags_float16_risks(mm_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from g3n.cli import main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(mm_dir, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    conv = "model.vision_tower.timm_model.msfa.ffn.pw_proj.conv.weight"  # fan-in 80
    weights[conv] = weights[conv] / weights[conv].abs().max() * 1000.0  # x 80 = 80000 > 65504
    weights["model.language_model.norm.weight"][0] = 70000.0
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert main(["inspect", "--model", str(ckpt), "--plot", str(tmp_path / "p.png"), "--top", "3"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("model.")}
    assert "may overflow when applied" in rows[conv] and "1000" in rows[conv]
    assert "does not fit float16" in rows["model.language_model.norm.weight"]
    assert "2 flagged for float16" in out
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert main(["inspect", "--model", str(mm_dir), "--no-plot"]) == 0
    assert "nothing flagged for float16" in capsys.readouterr().out


def test_cli_chat_attaches_images_and_survives_a_bad_one(mm_dir, files):
    script = f"/image {files / 'a.png'}\nDescribe it.\n/image {files / 'nope.png'}\nAnd now?\nPlain text.\n/quit\n"
    cmd = [sys.executable, "-m", "g3n.cli", "chat", "--model", str(mm_dir), "--device", "cpu", "--greedy"]
    out = subprocess.run(
        cmd + ["--max-new-tokens", "3"], input=script, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "nope.png: image file not found" in out.stderr
    assert out.stdout.count("model> ") == 2  # the turn with the missing image was dropped, the chat went on


@pytest.fixture(scope="module")
def color_data(tmp_path_factory):
    """Solid red/blue/green images and the question "What color is it?" answered with the color;
    paths relative to the dataset file."""
    import json

    from PIL import Image

    d = tmp_path_factory.mktemp("colors")
    (d / "img").mkdir()
    colors = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
    lines = []
    for i in range(12):
        name = list(colors)[i % 3]
        Image.new("RGB", (40 + i, 40), colors[name]).save(d / "img" / f"{i}.png")
        user = [{"type": "image", "image": f"img/{i}.png"}, {"type": "text", "text": "What color is it?"}]
        lines.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": name}]})
    (d / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines[:9]) + "\n")
    (d / "eval.jsonl").write_text("\n".join(json.dumps(x) for x in lines[9:]) + "\n")
    return d


def test_multimodal_examples_mask_prompts_and_media(ours, mm_dir, color_data):
    from g3n.media import media_ids
    from g3n.train.data import IGNORE, load_examples

    _, tok = ours
    proc = MediaProcessor(mm_dir)
    examples, stats = load_examples([str(color_data / "train.jsonl")], tok, 256, media_tokens=proc.tokens)
    ex = examples[0]
    assert stats.samples == 9 and ex.media == (("image", str(color_data / "img" / "0.png")),)
    assert ex.ids.count(MM_IDS["image"]) == 4
    # the user turn is tokenized as at inference: the ids equal the prompt MediaProcessor builds
    prompt, _ = proc(tok, [{"role": "user", "content": [{"type": "image", "image": ex.media[0][1]},
                                                         {"type": "text", "text": "What color is it?"}]}])  # fmt: skip
    assert ex.ids[: len(prompt) - 3] == prompt[:-3]  # up to "<start_of_turn>model\n"
    learned = [t for t, y in zip(ex.ids, ex.labels, strict=True) if y != IGNORE]
    assert tok.decode(learned) == "red" and not media_ids(proc.tokens) & set(learned)
    (color_data / "bad.jsonl").write_text(
        '{"messages": [{"role": "user", "content": [{"type": "image", "image": "img/none.png"}]}, '
        '{"role": "assistant", "content": "x"}]}\n'
    )
    with pytest.raises(G3nError, match=r"bad.jsonl:1: image file img/none.png not found"):
        load_examples([str(color_data / "bad.jsonl")], tok, 256, media_tokens=proc.tokens)
    inside = ex.ids.index(MM_IDS["image"]) + 2
    with pytest.raises(G3nError, match="train.jsonl:1: .* would cut through an image"):
        load_examples([str(color_data / "train.jsonl")], tok, inside, media_tokens=proc.tokens)


def test_lora_on_language_and_vision_learns_colors(mm_dir, color_data, tmp_path):
    from g3n.train.config import load_train_config
    from g3n.train.loop import train

    base = {
        "model": str(mm_dir), "train_data": [str(color_data / "train.jsonl")],
        "eval_data": [str(color_data / "eval.jsonl")], "output_dir": str(tmp_path / "run"), "device": "cpu",
        "dtype": "float32", "batch_size": 3, "max_steps": 24, "eval_steps": 12, "save_steps": 24,
        "learning_rate": 1e-2, "lora_r": 4, "max_length": 128, "finetune_vision_layers": True,
    }  # fmt: skip
    history = train(load_train_config(base=base), progress=False)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert evals[-1] < 0.8 * evals[0], evals  # 6.55 -> 4.80 measured (a random 10-layer model)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    vision = [k for k in adapter if "vision_tower" in k and "lora_B" in k]
    assert vision and any(adapter[k].abs().max() > 0 for k in vision)  # the tower's adapters were trained
    assert any("language_model" in k or ".layers." in k for k in adapter)
    from g3n.adapters.merge import AdapterDeltas

    with pytest.raises(G3nError, match="the adapter tunes vision_tower; exports write the text decoder"):
        AdapterDeltas(tmp_path / "run" / "adapter")


def test_one_rule_says_whether_a_checkpoint_is_multimodal(tmp_path):
    """Loading towers, serving and training ask the same question the same way: a checkpoint is
    multimodal when its config has both vision_config and audio_config (a config with one of them
    was an image model to the server, multimodal to training and text-only to the tower loader)."""
    import json

    from g3n.errors import G3nError
    from g3n.model.towers import checkpoint_modalities, multimodal_config, read_hf_config

    for keys, multimodal in (((), False), (("vision_config",), False), (("audio_config",), False),
                             (("vision_config", "audio_config"), True)):  # fmt: skip
        d = tmp_path / "-".join(keys or ("text",))
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "gemma3n", **{k: {} for k in keys}}))
        assert (multimodal_config(d) is not None) == multimodal
        assert checkpoint_modalities(d) == (["image", "audio"] if multimodal else [])
        if not multimodal:
            with pytest.raises(G3nError, match="text-only checkpoint"):
                read_hf_config(d)
