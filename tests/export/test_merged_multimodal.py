"""Merged exports of a multimodal checkpoint keep the whole model: transformers loads them as
Gemma3nForConditionalGeneration (no missing or unexpected weights), and their logits for an image
and audio prompt equal g3n's with the adapter (decoder and tower adapters merged); streamed
(`g3n export`) and from a model in memory (`save_merged`, fully tuned towers included)."""

import json

import pytest
import torch

pytest.importorskip("timm")
import g3n
from g3n.adapters.lora import add_lora, load_adapter, save_adapter
from g3n.adapters.merge import AdapterDeltas, save_merged, save_model_dir
from g3n.errors import G3nError
from g3n.export.hf import export_hf
from g3n.tokenizer import CHAT_TEMPLATE
from helpers import MM_IDS, make_hf_multimodal, save_hf_multimodal

IMG = [MM_IDS["boi"]] + [MM_IDS["image"]] * 4 + [MM_IDS["eoi"]]
AUD = [MM_IDS["boa"]] + [MM_IDS["audio"]] * 8 + [MM_IDS["eoa"]]
IDS = torch.tensor([[2, 105, 20, 30, *IMG, 40, *AUD, 41, 106, 105, 50]])
TOL = 1e-4  # float32 logits (up to about 30): merged weights round differently from LoRA's forward


def _media():
    import numpy as np
    from transformers import Gemma3nAudioFeatureExtractor

    pix = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    wav = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    f = Gemma3nAudioFeatureExtractor()([wav], return_tensors="pt")
    return {
        "pixel_values": pix,
        "input_features": f["input_features"],
        "input_features_mask": f["input_features_mask"].bool(),
    }


MEDIA = _media()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random multimodal checkpoint with the processor settings Google's checkpoints ship
    (the media tokens named in tokenizer_config.json, processor_config.json), so transformers'
    Gemma3nProcessor loads from it."""
    d = save_hf_multimodal(make_hf_multimodal(), tmp_path_factory.mktemp("mm"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = {
        "image_token": "<image_soft_token>", "boi_token": "<unused4>", "eoi_token": "<end_of_image>",
        "audio_token": "<audio_soft_token>", "boa_token": "<unused5>", "eoa_token": "<end_of_audio>",
    }  # fmt: skip
    assert [config["added_tokens_decoder"][str(MM_IDS[k])]["content"] for k in ("eoi", "image")] == [
        "<end_of_image>", "<image_soft_token>"
    ]  # fmt: skip
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    processor = {"processor_class": "Gemma3nProcessor", "image_seq_length": 4, "audio_seq_length": 8}
    (d / "processor_config.json").write_text(json.dumps(processor))
    return d


def _with_adapter(base):
    """g3n's model with towers and a random LoRA adapter on the decoder, vision and audio towers."""
    model, _ = g3n.load(base, dtype="float32", device="cpu", modalities=("image", "audio"))
    add_lora(model, r=4, alpha=8, parts=("text", "image", "audio"))
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    return model


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """The adapter's directory and g3n's logits with it (PEFT's unmerged forward)."""
    model = _with_adapter(base)
    d = save_adapter(model, tmp_path_factory.mktemp("adapter"), base_model=str(base))
    with torch.no_grad():
        logits = model(IDS, media=MEDIA)
    return d, logits


def _transformers(out):
    from transformers import Gemma3nForConditionalGeneration

    model, info = Gemma3nForConditionalGeneration.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(input_ids=IDS, **MEDIA).logits


def test_streamed_export_keeps_the_whole_model(base, adapter, tmp_path):
    adapter_dir, ours = adapter
    out = export_hf(base, tmp_path / "merged", adapter=adapter_dir, dtype="float32")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "preprocessor_config.json", "processor_config.json"} <= names  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3nForConditionalGeneration"] and config["dtype"] == "float32"
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    for name in ("preprocessor_config.json", "processor_config.json", "generation_config.json"):
        assert (out / name).read_text() == (base / name).read_text()

    theirs = _transformers(out)
    diff = (theirs - ours).abs().max().item()
    print(f"transformers on the merged export vs g3n with the adapter: max abs logit difference {diff:.2e}")
    assert diff < TOL
    # the adapter changes the logits (the towers' part too), so the comparison means something
    plain, _ = g3n.load(base, dtype="float32", device="cpu", modalities=("image", "audio"))
    with torch.no_grad():
        assert (plain(IDS, media=MEDIA) - ours).abs().max() > 1e-2
    # and g3n loads its own export: the same logits
    again, _ = g3n.load(out, dtype="float32", device="cpu", modalities=("image", "audio"))
    with torch.no_grad():
        assert (again(IDS, media=MEDIA) - ours).abs().max() < TOL


def test_transformers_answers_an_image_prompt_as_g3n(base, adapter, tmp_path):
    """The whole path a user takes with the merged export: transformers' AutoProcessor (its image
    processor and the exported chat template, given OpenAI-style content parts) and
    Gemma3nForConditionalGeneration build the same prompt and logits as g3n with the adapter."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from g3n.media import MediaProcessor

    adapter_dir, _ = adapter
    out = export_hf(base, tmp_path / "merged", adapter=adapter_dir, dtype="float32")
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE  # what the processor reads
    image = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((48, 80, 3)) * 255).astype("uint8")).save(image)

    def messages(key):
        return [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image", key: str(image)}, {"type": "text", "text": "Color?"}]},
        ]

    processor = AutoProcessor.from_pretrained(out)
    enc = processor.apply_chat_template(
        messages("url"), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    model, tok = g3n.load(base, dtype="float32", device="cpu", modalities=("image", "audio"))
    load_adapter(model, adapter_dir)
    ids, media = MediaProcessor(base)(tok, messages("image"))
    assert enc["input_ids"][0].tolist() == ids and ids.count(MM_IDS["image"]) == 4
    assert torch.equal(enc["pixel_values"], media["pixel_values"])
    from transformers import Gemma3nForConditionalGeneration

    hf = Gemma3nForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"]).logits
        ours = model(torch.tensor([ids]), media=media)
    assert (theirs - ours).abs().max() < TOL
    assert theirs[0, -1].argmax() == ours[0, -1].argmax()


def test_qlora_merge_of_a_multimodal_base_is_the_export(base, adapter, tmp_path):
    """merge_checkpoint (training's merge into the base's 16-bit weights) writes what export_hf does."""
    from safetensors.torch import load_file

    from g3n.adapters.merge import merge_checkpoint

    adapter_dir, _ = adapter
    merged = merge_checkpoint(base, adapter_dir, tmp_path / "merged", dtype=torch.float32)
    exported = export_hf(base, tmp_path / "exported", adapter=adapter_dir, dtype="float32")
    a, b = load_file(merged / "model.safetensors"), load_file(exported / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (merged / "config.json").read_text() == (exported / "config.json").read_text()


def test_tower_only_adapter_changes_only_the_towers(base, adapter, tmp_path):
    """Each tower's deltas land on its own weights: merging only the vision adapters moves the
    vision tower's weights and no others."""
    from safetensors.torch import load_file, save_file

    adapter_dir, _ = adapter
    d = tmp_path / "vision-only"
    d.mkdir()
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "vision_tower" in k}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    out = export_hf(base, tmp_path / "out", adapter=d, dtype="float32")
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.vision_tower.") for k in changed)


def test_save_merged_from_memory_keeps_the_whole_model(base, adapter, tmp_path):
    """save_merged (training's merge) writes the same model as the streamed export."""
    adapter_dir, ours = adapter
    model, _ = g3n.load(base, dtype="float32", device="cpu", modalities=("image", "audio"))
    load_adapter(model, adapter_dir)
    out = save_merged(model, tmp_path / "merged", tokenizer_dir=base, dtype=torch.float32)
    assert (_transformers(out) - ours).abs().max() < TOL


def test_fully_tuned_tower_is_written(base, tmp_path):
    """Towers tuned in full (no adapter) are written as they are in memory; towers not loaded come
    from the base."""
    model, _ = g3n.load(base, dtype="float32", device="cpu", modalities=("image",))
    with torch.no_grad():
        for p in model.towers.vision_tower.parameters():
            p.add_(0.01)
        model.model.embed_tokens.weight.mul_(1.1)
        ours = model(IDS[:, :12], media={"pixel_values": MEDIA["pixel_values"]})
    out = save_model_dir(model, tmp_path / "tuned", tokenizer_dir=base, dtype=torch.float32)
    from transformers import Gemma3nForConditionalGeneration

    hf = Gemma3nForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=IDS[:, :12], pixel_values=MEDIA["pixel_values"]).logits
    assert (theirs - ours).abs().max() < TOL
    from safetensors.torch import load_file

    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    audio = [k for k in before if k.startswith("model.audio_tower.")]
    assert audio and all(torch.equal(before[k], after[k]) for k in audio)


def test_bad_adapters_are_refused_before_writing(base, adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter_dir, _ = adapter
    with pytest.raises(G3nError, match="the adapter tunes (audio|vision)_tower; exports write the text decoder"):
        AdapterDeltas(adapter_dir)  # a text-only export (GGUF) still refuses tower adapters
    d = tmp_path / "bad"
    d.mkdir()
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    key = next(k for k in weights if "vision_tower" in k and "lora_A" in k)
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 1, *weights[key].shape[2:])
    save_file(weights, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    with pytest.raises(G3nError, match="an adapter of another model"):
        export_hf(base, tmp_path / "out", adapter=d, dtype="float32")
    assert not (tmp_path / "out").exists()


def test_interrupted_export_leaves_nothing(base, tmp_path, monkeypatch):
    from g3n.checkpoint import save

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(save, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        export_hf(base, tmp_path / "out", dtype="float32")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_an_earlier_multimodal_export(base, tmp_path):
    out = export_hf(base, tmp_path / "out", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(G3nError, match="exists"):
        export_hf(base, out, dtype="float32")
    export_hf(base, out, dtype="float32", overwrite=True)  # the processor files count as an export's
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
