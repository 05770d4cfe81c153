"""Loading checkpoints: layouts transformers writes, text-only reading, and clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from g3n.checkpoint.reader import TensorIndex
from g3n.errors import G3nError
from g3n.model.load import load_model

TOL = 1e-4


def _ids():
    return torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(11))


def _same_logits(model, hf_model):
    with torch.no_grad():
        return (model(_ids()) - hf_model(_ids()).logits).abs().max().item() < TOL


def test_sharded_checkpoint(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert _same_logits(load_model(tmp_path, dtype="float32", device="cpu"), hf_model)


def _multimodal_checkpoint(hf_model, hf_dir, out):
    """A Gemma3nForConditionalGeneration-style checkpoint: text under model.language_model.,
    tower weights beside it, in a shard of their own that is not even valid safetensors."""
    out.mkdir()
    text = {
        k.replace("model.", "model.language_model.", 1): v for k, v in load_file(hf_dir / "model.safetensors").items()
    }
    save_file(text, str(out / "model-00001-of-00002.safetensors"))
    (out / "model-00002-of-00002.safetensors").write_bytes(b"tower weights we must never open")
    towers = ["model.vision_tower.timm_model.conv_stem.conv.weight", "model.audio_tower.conformer.0.norm.weight",
              "model.embed_vision.embedding.weight", "model.embed_audio.embedding.weight"]  # fmt: skip
    weight_map = {k: "model-00001-of-00002.safetensors" for k in text}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in towers})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "model_type": "gemma3n",
        "architectures": ["Gemma3nForConditionalGeneration"],
        "text_config": hf_model.config.to_dict(),
        "vision_config": {"model_type": "gemma3n_vision"},
        "audio_config": {"model_type": "gemma3n_audio"},
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_multimodal_checkpoint_reads_text_only(hf_model, hf_dir, tmp_path, monkeypatch):
    ckpt = _multimodal_checkpoint(hf_model, hf_dir, tmp_path / "mm")
    read = []
    original = TensorIndex.read
    monkeypatch.setattr(TensorIndex, "read", lambda self, key, *a: read.append(key) or original(self, key, *a))
    model = load_model(ckpt, dtype="float32", device="cpu")
    assert _same_logits(model, hf_model)
    assert read and all(k.startswith("model.language_model.") for k in read)


def test_old_rope_keys(hf_model, hf_dir, tmp_path):
    """Configs written before rope_parameters (rope_theta / rope_local_base_freq) load the same."""
    shutil.copytree(hf_dir, tmp_path / "old")
    cfg = json.loads((hf_dir / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["full_attention"]["rope_theta"]
    cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    assert _same_logits(load_model(tmp_path / "old", dtype="float32", device="cpu"), hf_model)


def test_shared_layer_kv_weights_are_ignored(hf_model, hf_dir, tmp_path):
    """Google's files carry (unused) K/V weights for KV-shared layers; they must not matter."""
    d = tmp_path / "extra"
    shutil.copytree(hf_dir, d)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.9.self_attn.k_proj.weight"] = torch.randn(32, 32)
    save_file(tensors, str(d / "model.safetensors"))
    assert _same_logits(load_model(d, dtype="float32", device="cpu"), hf_model)


# ---- bad input: one clear error naming the file, key or option ----------------------------


def _copy(hf_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(hf_dir, d)
    return d


def _error(path, **kw) -> str:
    with pytest.raises(G3nError) as e:
        load_model(path, dtype="float32", device="cpu", **kw)
    return str(e.value)


def test_missing_directory(tmp_path):
    assert "no such directory" in _error(tmp_path / "nope")


def test_missing_config(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    (d / "config.json").unlink()
    assert "config.json not found" in _error(d)


def test_not_gemma3n(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    msg = _error(d)
    assert "config.json" in msg and "'llama'" in msg and "not a Gemma 3n" in msg


def test_invalid_json_config(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    (d / "config.json").write_text("{ not json")
    assert "config.json: not valid JSON" in _error(d)


def test_inconsistent_config_field(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["activation_sparsity_pattern"] = [0.95, 0.0]
    (d / "config.json").write_text(json.dumps(cfg))
    assert "activation_sparsity_pattern" in _error(d)


def test_no_weights(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    (d / "model.safetensors").unlink()
    assert "no model.safetensors" in _error(d)


def test_missing_shard(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="200KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    msg = _error(tmp_path)
    assert victim.name in msg and "missing" in msg


def test_truncated_shard(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    msg = _error(d)
    assert "model.safetensors" in msg and "truncated or corrupt" in msg


def test_wrong_shape(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.2.mlp.gate_proj.weight"] = torch.zeros(63, 32)
    save_file(tensors, str(d / "model.safetensors"))
    msg = _error(d)
    assert "model.layers.2.mlp.gate_proj.weight" in msg and "[63, 32]" in msg and "[64, 32]" in msg


def test_missing_tensor(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.3.laurel.linear_left.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    assert "model.layers.3.laurel.linear_left.weight" in _error(d)


def test_unknown_dtype(hf_dir):
    with pytest.raises(G3nError, match="unknown dtype 'float8'"):
        load_model(hf_dir, dtype="float8", device="cpu")


def test_unknown_model_name():
    with pytest.raises(G3nError, match="no such directory"):
        load_model("./definitely/not/here", device="cpu")


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(G3nError, match="not in the local Hugging Face cache"):
        load_model("google/gemma-3n-E4B-it", device="cpu")


def test_hub_id_from_cache(hf_model, hf_dir, tmp_path, monkeypatch):
    """An HF id resolves to its snapshot in the local cache, as the hub lays it out."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someone--tiny-gemma3n"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(hf_dir, repo / "snapshots" / commit)
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        model = load_model("someone/tiny-gemma3n", dtype="float32", device="cpu")
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
    assert _same_logits(model, hf_model)


def test_unknown_device_is_a_clear_error():
    import g3n

    with pytest.raises(G3nError, match=r"'gpu' is not a device \(cpu, cuda or cuda:N\)"):
        g3n.load("tiny", device="gpu")
