"""Vision projector GGUF ("mmproj") for llama.cpp's multimodal library (libmtmd) and Ollama.

llama.cpp runs Gemma 3n's vision tower (MobileNetV5) and its multimodal embedder from a second
GGUF beside the model: architecture `clip`, projector type `gemma3nv`, tensor names, metadata and
precision as llama.cpp's converter writes them (`convert_hf_to_gguf.py --mmproj`, class
`Gemma3nVisionAudioModel`). The audio tower is left out: llama.cpp does not run Gemma 3n audio.
Adapters of the towers are merged in, one tensor at a time; the file is written under a temporary
name and renamed when complete.

llama.cpp's MobileNetV5 graph hard-codes parts of the architecture (mmproj_problems lists them);
a checkpoint outside them is refused before anything is written.

Ids of the vision and audio vocabularies (e.g. `<end_of_image>`) are embedded by transformers through
the embedders' hard embeddings; llama.cpp reads every text id from `token_embd`, the rows of
`embed_tokens`. Those rows are also the output projection (tied), so the text GGUF keeps them as
they are: rewriting them would change the logits of those ids.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from g3n.errors import G3nError

ARCH = "clip"
PROJECTOR = "gemma3nv"
TOWER = "model.vision_tower.timm_model."
EMBEDDER = "model.embed_vision."
IMAGE_TOKENS = 256  # llama.cpp's graph pools the fused features to a fixed 16 x 16 grid
TIMM_ARCH = "mobilenetv5_300m_enc"
DEFAULT_IMAGE_SIZE = 768
# Gemma3nVisionAudioModel's names for the double-indexed MobileNetV5 blocks (stage, block, suffix).
BLOCK_SUFFIXES = (
    "conv_exp.weight", "bn1.weight", "conv_pwl.weight", "bn2.weight",
    "dw_start.conv.weight", "dw_start.bn.weight", "dw_mid.conv.weight", "dw_mid.bn.weight",
    "pw_exp.conv.weight", "pw_exp.bn.weight", "pw_proj.conv.weight", "pw_proj.bn.weight", "layer_scale.gamma",
    "attn.query.proj.weight", "attn.key.proj.weight", "attn.value.proj.weight", "attn.output.proj.weight",
    "attn.key.down_conv.weight", "attn.key.norm.weight", "attn.value.down_conv.weight", "attn.value.norm.weight",
    "norm.weight",
)  # fmt: skip
TYPES = {"f32": "F32", "f16": "F16"}


def mmproj_path(gguf_path: str | Path) -> Path:
    """Where the projector of the model GGUF `gguf_path` goes: `mmproj-NAME.gguf` beside it, the
    name llama.cpp's converter gives it."""
    gguf_path = Path(gguf_path)
    return gguf_path.with_name(f"mmproj-{gguf_path.name}")


def mmproj_type(quant: str) -> str:
    """The projector's weight type for a model GGUF of `quant`: F32 for an f32 export, else F16
    (llama.cpp's converter keeps convolutions at 16 bits: their rows are too short to quantize)."""
    return "f32" if quant.lower() == "f32" else "f16"


def _config(model_dir: Path) -> dict:
    from g3n.model.towers import multimodal_config

    raw = multimodal_config(model_dir)
    if raw is None:
        raise G3nError(f"{model_dir / 'config.json'}: a text-only checkpoint (no vision_config); a vision "
                       "projector needs a multimodal Gemma3nForConditionalGeneration checkpoint")  # fmt: skip
    return raw


def _preprocessor(model_dir: Path) -> dict:
    path = model_dir / "preprocessor_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise G3nError(f"{path}: not valid JSON ({e})") from None


def image_size(model_dir: Path) -> int | tuple[int, int]:
    """The side images are resized to (preprocessor_config.json, else Gemma 3n's 768); a
    (height, width) pair when not square."""
    size = _preprocessor(model_dir).get("size") or {}
    h, w = size.get("height", DEFAULT_IMAGE_SIZE), size.get("width", DEFAULT_IMAGE_SIZE)
    return h if h == w else (h, w)


def mmproj_problems(model_dir: str | Path) -> list[str]:
    """Reasons llama.cpp's Gemma 3n vision graph cannot run this checkpoint (empty when it can):
    it builds MobileNetV5 from four stages, downsamples by 2 at the first block of each stage only,
    fuses the last two stages and pools them to 16 x 16 = 256 soft tokens, and knows edge-residual,
    inverted-residual (no end depthwise conv, no squeeze-excite) and multi-query attention blocks
    (keys as wide as values, key/value stride 1 or 2)."""
    model_dir = Path(model_dir)
    raw = _config(model_dir)
    vision = raw.get("vision_config") or {}
    problems = []
    if vision.get("architecture", TIMM_ARCH) != TIMM_ARCH:
        problems.append(f"vision architecture {vision.get('architecture')!r}; llama.cpp runs {TIMM_ARCH}")
    tokens = raw.get("vision_soft_tokens_per_image", IMAGE_TOKENS)
    if tokens != IMAGE_TOKENS:
        problems.append(f"{tokens} soft tokens per image; llama.cpp's graph gives {IMAGE_TOKENS} (16 x 16)")
    size = image_size(model_dir)
    if not isinstance(size, int) or size % 256:
        problems.append(f"image size {size}; llama.cpp needs square images whose side is a multiple of 256")
    width, text_width = vision.get("hidden_size", 2048), (raw.get("text_config") or {}).get("hidden_size", 2048)
    if width != text_width:  # as in Gemma 3n E2B and E4B: 2048 both
        problems.append(f"the text model is {text_width} wide and the vision tower {width}; libmtmd takes the "
                        "projector's input width for its output width, so they must be equal")  # fmt: skip
    args = vision.get("model_args") or {}
    if args.get("msfa_output_resolution", 16) != 16:
        problems.append(f"MSFA output resolution {args['msfa_output_resolution']}; llama.cpp pools to 16")
    if tuple(args.get("msfa_indices", (-2, -1))) not in ((-2, -1), (3, 4)):
        problems.append(f"MSFA indices {args['msfa_indices']}; llama.cpp fuses the last two of four stages")
    stages = args.get("block_args")  # absent: timm's own mobilenetv5_300m_enc, which llama.cpp runs
    if stages is not None:
        problems += _block_problems(stages)
    return problems


def _block_problems(stages) -> list[str]:
    if len(stages) != 4:
        return [f"{len(stages)} stages; llama.cpp's graph has 4"]
    problems = []
    for s, blocks in enumerate(stages):
        for b, blk in enumerate(blocks):
            where, kind = f"block {s}.{b}", blk.get("block_type")
            stride = blk.get("stride", 1)
            if stride != (2 if b == 0 else 1):
                problems.append(
                    f"{where} has stride {stride}; llama.cpp downsamples by 2 at each stage's first block only"
                )
            if blk.get("noskip"):
                problems.append(f"{where} has no residual; llama.cpp adds one wherever shapes match")
            if blk.get("se_ratio", 0):
                problems.append(f"{where} has squeeze-excite, which llama.cpp's graph lacks")
            if kind == "er":
                if blk.get("exp_kernel_size", 3) != 3 or blk.get("pw_kernel_size", 1) != 1:
                    problems.append(f"{where}: llama.cpp's edge residual block takes a 3x3 then a 1x1 convolution")
            elif kind == "uir":
                if blk.get("dw_kernel_size_end", 0):
                    problems.append(f"{where} has an end depthwise convolution, which llama.cpp's graph lacks")
                if stride == 2 and not blk.get("dw_kernel_size_mid", 0):
                    problems.append(f"{where} downsamples without a middle depthwise convolution; llama.cpp "
                                    "downsamples there only")  # fmt: skip
            elif kind == "mqa":
                if blk.get("kv_stride", 1) not in (1, 2):
                    problems.append(f"{where} has key/value stride {blk.get('kv_stride')}; llama.cpp takes 1 or 2")
                if blk.get("key_dim") != blk.get("value_dim"):
                    problems.append(f"{where} has keys {blk.get('key_dim')} and values {blk.get('value_dim')} wide; "
                                    "llama.cpp needs them equal")  # fmt: skip
            else:
                problems.append(f"{where} is a {kind!r} block; llama.cpp knows er, uir and mqa")
    return problems


@functools.cache
def _name_map():
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 128)


def gguf_name(name: str) -> str:
    """llama.cpp's name for a vision tower or embedder tensor of the checkpoint."""
    rest = name.removeprefix(TOWER)
    parts = rest.split(".")
    if rest != name and parts[0] == "blocks" and len(parts) >= 4:
        suffix = ".".join(parts[3:])
        if suffix in BLOCK_SUFFIXES:
            return f"v.blk.{parts[1]}.{parts[2]}.{suffix}"
    else:
        base, _, kind = name.rpartition(".")
        mapped = _name_map().get_name(base)
        if mapped is not None:
            return f"{mapped}.{kind}"
    raise G3nError(f"vision projector export: no llama.cpp name for tensor {name}")


def _storage(gname: str, shape: tuple[int, ...], requested: str) -> str:
    """The converter's rule: 1-D tensors, norms, the stem and anything not named `.weight` (layer
    scales, the stem's bias) in F32; the multimodal projection in F16 (unless all is F32).
    Depthwise kernels stay F16 even then: llama.cpp's depthwise convolution multiplies them with
    F16 patches, which its CPU backend takes only beside F16 kernels."""
    if len(shape) <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight") or "stem" in gname:
        return "F32"
    if len(shape) == 4 and shape[1] == 1:  # depthwise: one input channel per group
        return "F16"
    if "input_projection" in gname and requested != "F32":
        return "F16"
    return requested


def _add_metadata(w, raw: dict, model_dir: Path, hidden: int, file_type: int) -> None:
    import gguf

    vision = raw["vision_config"]
    text = raw.get("text_config") or {}
    side = image_size(model_dir)
    pre = _preprocessor(model_dir)
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(model_dir.name)
    w.add_file_type(file_type)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_vision_projector_type(gguf.VisionProjectorType.GEMMA3NV)
    w.add_vision_projection_dim(text.get("hidden_size", 2048))
    w.add_vision_image_size(side)
    w.add_vision_patch_size(side // IMAGE_TOKENS)  # llama.cpp: image_size / patch_size soft tokens
    w.add_vision_embedding_length(hidden)
    w.add_vision_feed_forward_length(vision.get("intermediate_size", 2048) * 4)
    w.add_vision_block_count(128)  # the converter's placeholder: MobileNetV5 has no uniform blocks
    w.add_vision_head_count(vision.get("num_attention_heads", 8))
    w.add_vision_attention_layernorm_eps(vision.get("layer_norm_eps", 1e-6))
    # Gemma 3n's processor only rescales to [0, 1] (do_normalize false); the converter writes that.
    normalize = pre.get("do_normalize", False)
    w.add_vision_image_mean(list(pre.get("image_mean", [0.5] * 3)) if normalize else [0.0, 0.0, 0.0])
    w.add_vision_image_std(list(pre.get("image_std", [0.5] * 3)) if normalize else [1.0, 1.0, 1.0])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tower_deltas(adapter, model_dir: Path, shapes: dict):
    """The adapter (decoder and tower LoRA) checked against the whole checkpoint, or None."""
    if adapter is None:
        return None
    from g3n.adapters.merge import AdapterDeltas, _delta_name

    deltas = AdapterDeltas(adapter, towers=True)
    deltas.check({_delta_name(n): s for n, s in shapes.items()}, model_dir)
    return deltas


def export_mmproj(model: str, out: str | Path, adapter=None, quant: str = "f16", overwrite: bool = False) -> Path:
    """Write the vision projector of multimodal `model` (with `adapter` merged, towers included) as
    one GGUF llama.cpp's libmtmd loads beside the model GGUF; `quant` f16 (default) or f32."""
    import gguf
    import numpy as np

    from g3n.checkpoint.atomic import check_export_target, write_atomic
    from g3n.checkpoint.names import resolve_model_dir
    from g3n.checkpoint.reader import TensorIndex
    from g3n.export.gguf import _Entry, _shapes, _write_tensor_data, make_parent

    quant = quant.lower()
    if quant not in TYPES:
        raise G3nError(f"vision projector type {quant!r}: choose f16 or f32")
    model_dir = resolve_model_dir(model)
    raw = _config(model_dir)
    problems = mmproj_problems(model_dir)
    if problems:
        raise G3nError(f"{model_dir}: llama.cpp cannot run this vision tower: " + "; ".join(problems))
    out = check_export_target(out, "gguf", overwrite, protect=(model_dir, adapter))
    index = TensorIndex(model_dir)
    shapes = _shapes(index)
    deltas = _tower_deltas(adapter, model_dir, shapes)
    names = sorted(n for n in shapes if n.startswith((TOWER, EMBEDDER)))
    if not any(n.startswith(TOWER) for n in names):
        raise G3nError(f"{model_dir}: the checkpoint has no vision tower weights ({TOWER}*)")

    def tensor(name: str):
        t = index.read(name, shapes[name])
        if deltas is not None:
            t = deltas.merge(name, t)
        if name.endswith(("conv_stem.conv.bias", "layer_scale.gamma")):
            t = t.reshape(1, -1, 1, 1)  # broadcast over [W, H, C] in llama.cpp's graph
        return t

    entries = []
    for name in names:
        gname = gguf_name(name)
        shape = tuple(shapes[name])
        if name.endswith(("conv_stem.conv.bias", "layer_scale.gamma")):
            shape = (1, shape[0], 1, 1)
        entries.append(_Entry(gname, shape, _storage(gname, shape, TYPES[quant]), lambda n=name: iter([tensor(n)])))
    hidden = shapes.get(TOWER + "msfa.norm.weight", (raw["vision_config"].get("hidden_size", 2048),))[0]
    make_parent(out)

    def write(path: Path) -> None:
        w = gguf.GGUFWriter(str(path), ARCH)
        _add_metadata(w, raw, model_dir, hidden, 0 if quant == "f32" else 1)
        for e in entries:
            w.add_tensor_info(e.name, e.shape, np.float16 if e.type_name == "F16" else np.float32, e.nbytes)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        _write_tensor_data(w, entries)
        w.close()

    write_atomic(out, write)
    return out


def plan_mmproj(model: str, out: str | Path, wanted: bool | None, adapter=None, overwrite: bool = False):
    """Where `g3n export --format gguf/ollama` writes the projector, or None: beside the model GGUF
    for a multimodal checkpoint unless `wanted` is False; `wanted` True for a text-only one is an
    error. Checked before anything is written."""
    from g3n.checkpoint.atomic import check_export_target
    from g3n.checkpoint.names import resolve_model_dir
    from g3n.model.towers import multimodal_config

    model_dir = resolve_model_dir(model)
    if wanted is False:
        return None
    if multimodal_config(model_dir) is None:
        if wanted:
            _config(model_dir)  # the text-only error
        return None
    problems = mmproj_problems(model_dir)
    if problems:
        raise G3nError(f"{model_dir}: llama.cpp cannot run this vision tower: " + "; ".join(problems)
                       + " (pass --no-mmproj to export the text model alone)")  # fmt: skip
    path = mmproj_path(out)
    check_export_target(path, "gguf", overwrite, protect=(model_dir, adapter))
    return path
