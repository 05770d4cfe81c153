"""GGUF export for llama.cpp and Ollama, written with the `gguf` package (gguf-py).

Architecture `gemma3n`, metadata as llama.cpp's own converter writes it, tensor names from gguf's
tensor map for Gemma 3n, the AltUp projections stacked into one tensor each, zero placeholder K/V
weights for KV-shared layers (llama.cpp requires the tensors but never reads them), the
SentencePiece vocabulary with its piece types, and Google's sampling defaults in
`general.sampling.*`. Configs llama.cpp cannot represent (llama_cpp_limits.py) are refused before
anything is written; the file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from g3n.config import SLIDING, TextConfig, read_text_config
from g3n.errors import G3nError
from g3n.export.llama_cpp_limits import llama_cpp_problems
from g3n.extras import import_llama_cpp

if TYPE_CHECKING:  # imported where used, so `g3n export --help` lists QUANTS without loading torch
    import numpy as np
    import torch

# Written directly with gguf-py: one type for every weight matrix (norms and other 1-D tensors stay F32).
DIRECT = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
# Quantized by llama.cpp's own quantizer (llama_model_quantize) from an f16 export, with its
# per-tensor mixture rules (e.g. token tables kept at higher precision).
LLAMA_QUANTIZER = {"q4_0": "Q4_0", "q5_0": "Q5_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
QUANTS = (*DIRECT, *LLAMA_QUANTIZER, "dynamic")
ARCH = "gemma3n"
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama_ftype

# g3n's `dynamic` recipe: llama.cpp's Q5_K_M mixture with per-tensor overrides (first matching
# pattern wins). The token table is also the output projection (tied), the most sensitive matrix
# per byte, so it gets Q8_0; the per-layer table (2 B of E2B's 4.4 B weights) stays at Q6_K, above
# the layers; every attention-value and FFN-down projection gets Q6_K (Q5_K_M gives it to half of
# them). Tensors llama.cpp leaves unquantized (AltUp, Laurel, PLE projections) stay F16, and rows
# too narrow for 256-wide K-quant blocks fall back to llama.cpp's usual substitutes.
DYNAMIC_BASE = "Q5_K_M"
DYNAMIC_OVERRIDES = (
    (r"^token_embd\.weight$", "Q8_0"),
    (r"^per_layer_token_embd\.weight$", "Q6_K"),
    (r"\.(attn_v|ffn_down)\.weight$", "Q6_K"),
)


def dynamic_type(name: str) -> str | None:
    """The type the `dynamic` recipe asks for `name`, or None where llama.cpp's Q5_K_M rules decide."""
    import re

    return next((t for pattern, t in DYNAMIC_OVERRIDES if re.search(pattern, name)), None)


ROWS_PER_CHUNK = 4096  # rows read, converted and written at a time: memory stays a few chunks


@dataclass
class _Entry:
    """One GGUF tensor: its name, shape (PyTorch order), storage type and where its rows come from."""

    name: str
    shape: tuple[int, ...]
    type_name: str  # F32, F16 or a ggml quantization type
    chunks: Callable[[], Iterator[torch.Tensor]]  # the tensor's rows, in order

    @property
    def qtype(self):
        import gguf

        return None if self.type_name in ("F32", "F16") else gguf.GGMLQuantizationType[self.type_name]

    @property
    def nbytes(self) -> int:
        import gguf

        if self.qtype is None:
            return math.prod(self.shape) * (4 if self.type_name == "F32" else 2)
        return math.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))

    def encode(self, chunk: torch.Tensor) -> np.ndarray:
        import gguf
        import numpy as np

        data = chunk.float().numpy()
        if self.qtype is None:
            return data.astype(np.float32 if self.type_name == "F32" else np.float16)
        return gguf.quants.quantize(data, self.qtype)


def _storage(shape: tuple[int, ...], requested: str) -> str:
    """1-D tensors stay F32; rows that do not fill whole quantization blocks fall back to F16."""
    import gguf

    if len(shape) <= 1 or requested == "F32":
        return "F32"
    if requested != "F16" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[requested]][0]:
        return "F16"
    return requested


def _entries(tensors, cfg: TextConfig, quant: str, adapter=None) -> list[_Entry]:
    """Every tensor llama.cpp's Gemma 3n graph loads, as lazily read row chunks."""
    import gguf
    import torch

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3N, cfg.num_hidden_layers)
    entries = []

    def add(gname: str, shape, chunks):
        entries.append(_Entry(gname, tuple(shape), _storage(tuple(shape), DIRECT[quant]), chunks))

    def rows(name: str):
        def chunks():
            start = 0
            for chunk in tensors.row_chunks(name, ROWS_PER_CHUNK):
                yield adapter.merge(name, chunk, start) if adapter is not None else chunk
                start += chunk.shape[0]

        return chunks

    stacked = {"altup_projections": "altup_proj", "altup_unembed_projections": "altup_unembd_proj"}
    for hf, gname in stacked.items():
        parts = [f"model.{hf}.{i}.weight" for i in range(cfg.altup_num_inputs - 1)]
        shape = (len(parts), *tensors.shapes[parts[0]])
        add(f"{gname}.weight", shape, lambda parts=parts: iter([torch.stack([tensors.read(p) for p in parts])]))
    kv = cfg.num_key_value_heads * cfg.head_dim
    placeholders = {}
    for i in range(cfg.first_kv_shared_layer, cfg.num_hidden_layers):  # required by llama.cpp, never read
        placeholders[f"model.layers.{i}.self_attn.k_proj.weight"] = torch.zeros(kv, cfg.hidden_size)
        placeholders[f"model.layers.{i}.self_attn.v_proj.weight"] = torch.zeros(kv, cfg.hidden_size)
        placeholders[f"model.layers.{i}.self_attn.k_norm.weight"] = torch.ones(cfg.head_dim)
    own = [n for n in tensors.shapes if not n.startswith(tuple(f"model.{hf}." for hf in stacked))]
    for name in sorted(own + list(placeholders)):
        gname = names.get_name(name, try_suffixes=(".weight",))
        if gname is None:
            raise G3nError(f"GGUF export: no llama.cpp name for tensor {name}")
        # llama.cpp looks every tensor up as NAME.weight (also altup.correct_output_scale, a bare parameter)
        gname = gname if gname.endswith(".weight") else gname + ".weight"
        if name in placeholders:
            add(gname, placeholders[name].shape, lambda t=placeholders[name]: iter([t]))
            continue
        shape = tuple(tensors.shapes[name])
        if name == "model.embed_tokens_per_layer.weight" and shape[0] < cfg.vocab_size:
            # llama.cpp sizes every token table by the vocabulary: rows past the per-layer table
            # repeat its row 0, the row g3n and transformers use for those ids.
            def padded(name=name, extra=cfg.vocab_size - shape[0]):
                first = None
                for chunk in rows(name)():
                    first = chunk[:1] if first is None else first
                    yield chunk
                for start in range(0, extra, ROWS_PER_CHUNK):
                    yield first.expand(min(ROWS_PER_CHUNK, extra - start), -1)

            add(gname, (cfg.vocab_size, *shape[1:]), padded)
        else:
            add(gname, shape, rows(name))
    return entries


def _write_tensor_data(w, entries: list[_Entry]) -> None:
    """Write each tensor chunk by chunk (gguf's writer only takes whole arrays), with its alignment."""
    fout = w.fout[0]
    for e in entries:
        w.write_padding(fout, fout.tell())
        written = 0
        for chunk in e.chunks():
            data = e.encode(chunk)
            data.tofile(fout)
            written += data.nbytes
        if written != e.nbytes:
            raise G3nError(f"GGUF export: tensor {e.name} gave {written} bytes, expected {e.nbytes}")
        w.write_padding(fout, written)


def _add_metadata(w, cfg: TextConfig, name: str) -> None:
    from g3n.model.text import std_multiplier

    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(list(cfg.intermediate_size))
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_freq_base_swa(cfg.rope_local_base_freq)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([t == SLIDING for t in cfg.layer_types])
    if cfg.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_altup_active_idx(cfg.altup_active_idx)
    w.add_altup_num_inputs(cfg.altup_num_inputs)
    w.add_embedding_length_per_layer_input(cfg.hidden_size_per_layer_input)
    w.add_shared_kv_layers(cfg.num_kv_shared_layers)  # uint32, as llama.cpp reads it
    w.add_activation_sparsity_scale([std_multiplier(s) if s > 0 else 0.0 for s in cfg.activation_sparsity_pattern])
    # Google's recommended sampling for Gemma 3n (read by llama.cpp's sampler defaults).
    w.add_float32("general.sampling.temp", 1.0)
    w.add_int32("general.sampling.top_k", 64)
    w.add_float32("general.sampling.top_p", 0.95)
    w.add_float32("general.sampling.min_p", 0.0)


def _vocabulary(tokenizer_path: Path, model_dir: Path, vocab_size: int):
    """(pieces, scores, types) for all `vocab_size` ids: the SentencePiece pieces, then the added
    tokens of tokenizer_config.json (Gemma 3n's image/audio tokens), then unused fillers, so the
    token count equals the embedding rows as llama.cpp requires."""
    import json

    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer_path.read_bytes())
    T, P = gguf.TokenType, pb.ModelProto.SentencePiece
    kinds = {P.NORMAL: T.NORMAL, P.UNKNOWN: T.UNKNOWN, P.CONTROL: T.CONTROL, P.USER_DEFINED: T.USER_DEFINED,
             P.BYTE: T.BYTE, P.UNUSED: T.UNUSED}  # fmt: skip
    pieces = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [kinds[p.type] for p in proto.pieces]
    if len(pieces) > vocab_size:
        raise G3nError(f"{tokenizer_path}: {len(pieces)} tokens, more than config.json's vocab_size {vocab_size}")
    added = {}
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        for i, token in json.loads(config.read_text()).get("added_tokens_decoder", {}).items():
            added[int(i)] = token
    for i in range(len(pieces), vocab_size):
        token = added.get(i)
        pieces.append(token["content"].encode("utf-8") if token else f"<g3n_unused_{i}>".encode())
        scores.append(-1000.0)
        types.append((T.CONTROL if token.get("special") else T.USER_DEFINED) if token else T.UNUSED)
    return proto, pieces, scores, types


def _add_tokenizer(w, tokenizer_path: Path, model_dir: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    proto, pieces, scores, types = _vocabulary(tokenizer_path, model_dir, vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_pad_token_id(max(sp.pad_id(), 0))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)  # Gemma: no dummy "▁" prefix
    w.add_chat_template(_chat_template(model_dir))


def _chat_template(model_dir: Path) -> str:
    """The checkpoint's own chat template when it takes content parts, else g3n's (tokenizer.py)."""
    from g3n.tokenizer import export_chat_template

    return export_chat_template(model_dir)


def export_gguf(model: str, out: str | Path, adapter=None, quant: str = "f16", overwrite: bool = False) -> Path:
    """Write `model` (with `adapter` merged) as one GGUF file llama.cpp and Ollama load; missing
    parent directories are created."""
    import gguf
    import numpy as np

    from g3n.checkpoint.atomic import check_export_target, write_atomic
    from g3n.checkpoint.names import resolve_model_dir
    from g3n.model.load import TextTensors

    quant = quant.lower()
    if quant not in QUANTS:
        raise G3nError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    model_dir = resolve_model_dir(model)
    out = check_export_target(out, "gguf", overwrite, protect=(model_dir, adapter))
    tokenizer_path = model_dir / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise G3nError(f"{tokenizer_path}: missing; GGUF needs the SentencePiece tokenizer.model")
    problems = llama_cpp_problems(read_text_config(model_dir / "config.json"))
    if problems:
        raise G3nError(f"{model_dir}: llama.cpp cannot run this model: " + "; ".join(problems))
    tensors = TextTensors(model_dir)
    try:
        # a multimodal checkpoint takes adapters of its towers too (they go to the projector, mmproj.py)
        adapter_deltas = text_deltas(model_dir, adapter)
        if adapter_deltas is not None:
            adapter_deltas.check(tensors.shapes, model_dir)
        make_parent(out)
    except BaseException:
        tensors.close()
        raise
    cfg = tensors.config

    direct = quant if quant in DIRECT else "f16"  # the rest are quantized by llama.cpp from an f16 file

    def write(path: Path) -> None:
        entries = _entries(tensors, cfg, direct, adapter_deltas)
        w = gguf.GGUFWriter(str(path), ARCH)
        _add_metadata(w, cfg, model_dir.name)
        w.add_file_type(FILE_TYPES[direct])
        _add_tokenizer(w, tokenizer_path, model_dir, cfg.vocab_size)
        for e in entries:
            dtype = np.float16 if e.type_name == "F16" else np.float32
            w.add_tensor_info(e.name, e.shape, dtype, e.nbytes, raw_dtype=e.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        _write_tensor_data(w, entries)
        w.close()

    try:
        if quant not in DIRECT:
            write_atomic(out, lambda path: _llama_quantize(write, path, quant))
        else:
            write_atomic(out, write)
    finally:
        tensors.close()
    return out


def make_parent(out: Path) -> None:
    """Create `out`'s missing parent directories (as an HF export does); refuse an unwritable one."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise G3nError(f"{out.parent}: cannot create the output directory ({e.strerror or e})") from None
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise G3nError(f"{out.parent}: not a writable directory")


def _llama_quantize(write_f16, path: Path, quant: str) -> None:
    """Write an f16 GGUF beside `path`, then quantize it into `path` with llama.cpp."""
    llama_cpp = import_llama_cpp(f"quant {quant}")
    source = path.with_name(path.name + ".f16")
    try:
        write_f16(source)
        quantize_with_llama_cpp(llama_cpp, source, path, quant)
    finally:
        source.unlink(missing_ok=True)


def quantize_with_llama_cpp(llama_cpp, source: Path, path: Path, quant: str) -> None:
    """llama_model_quantize from `source` (f16) to `path`; `dynamic` passes its per-tensor overrides
    as the NULL-terminated {pattern, ggml_type} array of llama_model_quantize_params.tt_overrides."""
    import ctypes

    import gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(
        llama_cpp, f"LLAMA_FTYPE_MOSTLY_{DYNAMIC_BASE if quant == 'dynamic' else LLAMA_QUANTIZER[quant]}"
    )
    params.nthread = os.cpu_count() or 1
    if quant == "dynamic":
        overrides = (llama_cpp.llama_model_tensor_override * (len(DYNAMIC_OVERRIDES) + 1))()
        for o, (pattern, type_name) in zip(overrides, DYNAMIC_OVERRIDES):
            o.pattern, o.type = pattern.encode(), int(gguf.GGMLQuantizationType[type_name])
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), ctypes.byref(params)) != 0:
        raise G3nError(f"llama.cpp could not quantize to {quant}")


def _shapes(index) -> dict[str, tuple[int, ...]]:
    return {n: tuple(index.handle(f).get_slice(n).get_shape()) for n, f in index.file_of.items()}


class MultimodalTextDeltas:
    """The adapter's deltas for the text GGUF of a multimodal checkpoint: its decoder weights are
    merged there, its tower weights (checked against the checkpoint too) belong to the projector."""

    def __init__(self, model_dir: Path, adapter):
        from g3n.adapters.merge import AdapterDeltas

        self.dir = Path(model_dir)
        self.deltas = AdapterDeltas(adapter, towers=True)

    def check(self, text_shapes: dict, model_dir) -> None:
        """Refuse an adapter of another model: decoder weights against the text shapes, tower
        weights against the checkpoint's."""
        from g3n.adapters.merge import LANGUAGE_PREFIX, _delta_name
        from g3n.checkpoint.reader import TensorIndex

        shapes = _shapes(TensorIndex(self.dir))
        towers = {_delta_name(n): s for n, s in shapes.items() if not n.startswith(LANGUAGE_PREFIX)}
        self.deltas.check({**towers, **text_shapes}, model_dir)

    def merge(self, name: str, rows, start: int = 0):
        return self.deltas.merge(name, rows, start)


def text_deltas(model_dir: Path, adapter=None):
    """What export_gguf merges into the text GGUF's rows: None without an adapter; for a multimodal
    checkpoint MultimodalTextDeltas (tower adapters allowed), else the adapter's AdapterDeltas."""
    from g3n.model.towers import multimodal_config

    if adapter is None:
        return None
    if multimodal_config(model_dir) is not None:
        return MultimodalTextDeltas(model_dir, adapter)
    from g3n.adapters.merge import AdapterDeltas

    return AdapterDeltas(adapter)
