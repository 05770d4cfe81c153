"""Vision projector GGUF (mmproj), verified by llama.cpp's own multimodal library (libmtmd, through
llama-cpp-python): it loads beside the model GGUF, its image embeddings match transformers' vision
tower + multimodal embedder, an image chat's first greedy tokens are g3n's, tower adapters are
merged; text-only checkpoints and towers llama.cpp cannot build are refused before writing.

The checkpoint is tiny but inside what llama.cpp hard-codes: TOKENIZER768's decoder widened to
2048 (libmtmd takes the projector's input width, 2048 in every MobileNetV5, for the text model's),
a four-stage MobileNetV5 giving 16 x 16 = 256 soft tokens for 256 x 256 images.
"""

import ctypes
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
llama_cpp = pytest.importorskip("llama_cpp")
import llama_cpp.mtmd_cpp as mtmd

import g3n
from g3n.cli import main
from g3n.errors import G3nError
from g3n.export.mmproj import export_mmproj, mmproj_path, plan_mmproj
from helpers import MM_IDS, llama_cpp_text_config, make_hf_multimodal, save_hf_multimodal

SIDE = 256
# libmtmd computes depthwise convolutions from float16 patches and kernels, so its embeddings
# (RMS-normalized, entries up to about 4.5) carry float16 rounding: measured 1.4e-3 relative error
# (f32 projector) and 1.6e-3 (f16), min per-token cosine 0.99997.
REL_TOL, COS_TOL = 5e-3, 0.9999
LOGIT_TOL = 0.1  # measured 0.043 (logits up to 1.8): llama.cpp's unbiased std in the sparse FFNs, rounding
PROMPT = "Describe this image."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The checkpoint, transformers' float32 image embeddings of IMAGE, and IMAGE."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    text = llama_cpp_text_config(hidden_size=2048, intermediate_size=[256] * 25)
    hf = make_hf_multimodal(image_tokens=256, text=text, scale=0.1)  # deep random decoders amplify float noise
    with torch.no_grad():
        table = hf.model.language_model.embed_tokens
        table.weight.mul_(5)  # (tied) a wider spread of logits: greedy choices float noise does not flip
        # llama.cpp embeds the vision/audio ids (<end_of_image>) from token_embd, transformers through the
        # embedders' hard embeddings: make the two agree here (docs/gguf_gemma3n_notes.md)
        for embedder in (hf.model.embed_vision, hf.model.embed_audio):
            ids = torch.arange(embedder.vocab_offset, embedder.vocab_offset + embedder.vocab_size)
            table.weight[ids] = embedder(input_ids=ids[None])[0] / table.embed_scale
    d = save_hf_multimodal(hf, tmp_path_factory.mktemp("mm"), image_size=SIDE)
    # libmtmd writes the image's start marker as text: name TOKENIZER768's boi piece as Gemma's is named
    proto = pb.ModelProto()
    proto.ParseFromString((d / "tokenizer.model").read_bytes())
    proto.pieces[10].piece = "<start_of_image>"
    (d / "tokenizer.model").write_bytes(proto.SerializeToString())
    image = (np.random.default_rng(0).random((SIDE, SIDE, 3)) * 255).astype(np.uint8)
    with torch.no_grad():
        out = hf.model.get_image_features(pixel_values=torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    ref = getattr(out, "pooler_output", out)[0].numpy()
    del hf
    return d, ref, image


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    """`g3n export --format ollama --quant f32`: model GGUF, projector and Modelfile."""
    d, _, _ = ckpt
    out = tmp_path_factory.mktemp("gguf") / "mm.gguf"
    assert main(["export", "--model", str(d), "--format", "ollama", "--quant", "f32", "--out", str(out)]) == 0
    return out


class Mtmd:
    """llama.cpp (llama-cpp-python) with libmtmd: the model GGUF plus its projector."""

    def __init__(self, model_path, mmproj):
        self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=1024, n_threads=1, verbose=False,
                                   type_k=0, type_v=0)  # fmt: skip
        params = mtmd.mtmd_context_params_default()
        params.n_threads, params.print_timings, params.use_gpu = 1, False, False
        self.ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, params)
        assert self.ctx, f"libmtmd could not load {mmproj}"
        self.chunks = None

    def close(self):
        if self.chunks:
            mtmd.mtmd_input_chunks_free(self.chunks)
        mtmd.mtmd_free(self.ctx)
        self.llm.close()

    def tokenize(self, text: str, image: np.ndarray):
        """[(kind, ids or n_tokens, chunk)] of `text` with its media marker standing for `image`."""
        buf = (ctypes.c_uint8 * image.size).from_buffer_copy(image.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(image.shape[1], image.shape[0], buf)
        self.chunks = mtmd.mtmd_input_chunks_init()
        data = text.encode()
        inp = mtmd.mtmd_input_text(text=data, text_len=len(data), add_special=True, parse_special=True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(self.ctx, self.chunks, ctypes.byref(inp), bitmaps, 1) == 0
        mtmd.mtmd_bitmap_free(bitmap)
        parts = []
        for i in range(mtmd.mtmd_input_chunks_size(self.chunks)):
            chunk = mtmd.mtmd_input_chunks_get(self.chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                parts.append(("text", [ids[j] for j in range(n.value)], chunk))
            else:
                parts.append(("image", mtmd.mtmd_input_chunk_get_n_tokens(chunk), chunk))
        return parts

    def embed(self, image: np.ndarray) -> np.ndarray:
        """libmtmd's embeddings (tokens x width) of one image."""
        ((_, n, chunk),) = [p for p in self.tokenize(mtmd.mtmd_default_marker().decode(), image) if p[0] == "image"]
        assert mtmd.mtmd_encode_chunk(self.ctx, chunk) == 0
        width = llama_cpp.llama_model_n_embd(self.llm.model)
        return np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self.ctx), shape=(n * width,)).reshape(n, width).copy()

    def greedy(self, n_new: int) -> tuple[np.ndarray, list[int]]:
        """Evaluate the tokenized prompt (text and image): the last position's logits, and the reply
        continued greedily."""
        ctx, n_past = self.llm.ctx, llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(self.ctx, ctx, self.chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        vocab, out, first = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm.model)), [], None
        for _ in range(n_new):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))
            first = logits.copy() if first is None else first
            out.append(int(logits.argmax()))
            token = (llama_cpp.llama_token * 1)(out[-1])
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(token, 1)) == 0
        return first, out


def _compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    cos = float(((ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)).min())
    return rel, cos


def test_libmtmd_loads_the_pair_and_embeddings_match_transformers(ckpt, exported, tmp_path):
    d, ref, image = ckpt
    projector = mmproj_path(exported)
    assert projector.name == "mmproj-mm.gguf" and projector.is_file()
    f16 = export_mmproj(d, tmp_path / "mmproj-f16.gguf", quant="f16")  # the default beside non-f32 models
    for path, tol in ((projector, REL_TOL), (f16, 2 * REL_TOL)):
        m = Mtmd(exported, path)
        try:
            assert mtmd.mtmd_support_vision(m.ctx) and not mtmd.mtmd_support_audio(m.ctx)
            got = m.embed(image)
        finally:
            m.close()
        rel, cos = _compare(ref, got)
        print(f"{path.name}: {got.shape[0]} tokens, relative error {rel:.2e}, max abs {np.abs(got - ref).max():.3f}, "
              f"min cosine {cos:.6f}")  # fmt: skip
        assert got.shape == ref.shape and rel < tol and cos > COS_TOL


def test_image_chat_first_greedy_tokens_equal_g3n(ckpt, exported):
    from PIL import Image

    from g3n.inference.generate import generate
    from g3n.inference.sampling import SamplingParams
    from g3n.media import MediaProcessor
    from g3n.tokenizer import IMAGE_PLACEHOLDER, format_chat

    d, _, image = ckpt
    model, tok = g3n.load(d, dtype="float32", device="cpu", modalities=("image",))
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                             {"type": "text", "text": PROMPT}]}]  # fmt: skip
    ids, media = MediaProcessor(d)(tok, messages)
    ours = generate(model, [ids], SamplingParams(greedy=True, max_new_tokens=6), (), 0, media)[0]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), media=media)[0, -1].numpy()
    del model
    m = Mtmd(exported, mmproj_path(exported))
    try:
        # g3n's prompt, its image as "\n\n" + libmtmd's marker + "\n\n" (libmtmd adds <start_of_image>, the soft
        # tokens and <end_of_image>, as g3n's expand_placeholders does)
        marker = "\n\n" + mtmd.mtmd_default_marker().decode() + "\n\n"
        text = format_chat(messages, True, media=True).replace(IMAGE_PLACEHOLDER, marker)
        parts = m.tokenize(text, image)
        theirs = [t for kind, v, _ in parts for t in (v if kind == "text" else [MM_IDS["image"]] * v)]
        assert theirs == ids  # the same prompt, token for token (the image's 256 soft tokens included)
        their_logits, got = m.greedy(len(ours))
    finally:
        m.close()
    diff = np.abs(their_logits - logits).max()
    print(f"g3n {ours}, llama.cpp {got}; last prompt position: logits up to {np.abs(logits).max():.2f}, "
          f"max abs difference {diff:.4f}")  # fmt: skip
    assert got == ours
    assert diff < LOGIT_TOL and (np.argsort(-their_logits)[:5] == np.argsort(-logits)[:5]).all()


def test_tower_adapters_are_merged(ckpt, tmp_path):
    from g3n.adapters.lora import add_lora, save_adapter

    d, ref, image = ckpt
    model, _ = g3n.load(d, dtype="float32", device="cpu", modalities=("image",))
    add_lora(model, r=4, alpha=8, parts=("image",))
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    adapter = save_adapter(model, tmp_path / "adapter", base_model=str(d))
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        tuned = model.towers.image_features(pixels)[0].numpy()  # PEFT's unmerged forward
    del model
    text = tmp_path / "mm.gguf"
    assert main(["export", "--model", str(d), "--adapter", str(adapter), "--format", "gguf", "--quant", "f32",
                 "--out", str(text)]) == 0  # fmt: skip
    m = Mtmd(text, mmproj_path(text))
    try:
        got = m.embed(image)
    finally:
        m.close()
    rel, cos = _compare(tuned, got)
    print(f"adapter: relative error {rel:.2e} (the adapter moves the embeddings {_compare(ref, tuned)[0]:.2e})")
    assert rel < REL_TOL and cos > COS_TOL and _compare(ref, tuned)[0] > 5 * REL_TOL


def test_modelfile_uses_model_and_projector(exported):
    text = (exported.parent / "Modelfile").read_text()
    assert text.startswith("FROM ./mm.gguf\nFROM ./mmproj-mm.gguf\n")


def test_text_only_checkpoint_is_refused(tmp_path, capsys):
    with pytest.raises(G3nError, match="text-only checkpoint .*a vision projector needs a multimodal"):
        export_mmproj("tiny", tmp_path / "mmproj-tiny.gguf")
    out = tmp_path / "tiny.gguf"
    assert main(["export", "--format", "gguf", "--mmproj", "--out", str(out)]) == 2
    assert "text-only checkpoint" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["export", "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0  # automatic: none
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]


def test_unrepresentable_tower_is_refused_before_writing(ckpt, tmp_path, capsys):
    d, _, _ = ckpt
    odd = tmp_path / "odd"
    odd.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(d / name, odd / name)
    (odd / "model.safetensors").symlink_to(d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_soft_tokens_per_image"] = 64
    cfg["vision_config"]["model_args"]["block_args"][1][0]["stride"] = 1
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        G3nError, match="cannot run this vision tower: 64 soft tokens per image.*block 1.0 has stride 1"
    ):
        export_mmproj(odd, tmp_path / "mmproj-odd.gguf")
    out = tmp_path / "out" / "odd.gguf"
    assert main(["export", "--model", str(odd), "--format", "gguf", "--out", str(out)]) == 2
    assert "--no-mmproj" in capsys.readouterr().err
    assert plan_mmproj(str(odd), out, False) is None  # --no-mmproj: the text model alone
    assert main(["export", "--model", str(odd), "--mmproj", "--out", str(tmp_path / "hf")]) == 2
    assert "--mmproj/--no-mmproj are for --format gguf/ollama" in capsys.readouterr().err
    assert not out.parent.exists()  # refused before the model GGUF was written
