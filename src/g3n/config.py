"""Gemma 3n text-decoder configuration, read from a checkpoint's config.json.

Accepts the two layouts transformers writes: a multimodal `gemma3n` config with a nested
`text_config`, and a text-only `gemma3n_text` config; and both rope layouts (the old
`rope_theta`/`rope_local_base_freq` keys and the newer `rope_parameters` mapping).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from g3n.errors import G3nError

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass
class TextConfig:
    vocab_size: int = 262_400
    vocab_size_per_layer_input: int = 262_144
    hidden_size: int = 2048
    hidden_size_per_layer_input: int = 256
    intermediate_size: list[int] = field(default_factory=list)
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: list[str] = field(default_factory=list)
    final_logit_softcapping: float | None = 30.0
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    max_position_embeddings: int = 32_768
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_coef_clip: float | None = 120.0
    altup_correct_scale: bool = True
    laurel_rank: int = 64
    num_kv_shared_layers: int = 15
    activation_sparsity_pattern: list[float] = field(default_factory=list)
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    torch_dtype: str | None = None

    def __post_init__(self):
        self._check_sizes()
        n = self.num_hidden_layers
        if isinstance(self.intermediate_size, int):
            self.intermediate_size = [self.intermediate_size] * n
        if not self.layer_types:
            self.layer_types = [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(n)]
        if not self.activation_sparsity_pattern:
            k = 10 if n > 10 else 0
            self.activation_sparsity_pattern = [0.95] * k + [0.0] * (n - k)
        elif isinstance(self.activation_sparsity_pattern, (int, float)):
            self.activation_sparsity_pattern = [float(self.activation_sparsity_pattern)] * n
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.validate()

    def _check_sizes(self) -> None:
        """Sizes are positive integers (a string or a negative one was a traceback far from here)."""
        positive = ("vocab_size", "vocab_size_per_layer_input", "hidden_size", "hidden_size_per_layer_input",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                    "max_position_embeddings", "altup_num_inputs", "laurel_rank")  # fmt: skip
        for name in (*positive, "num_kv_shared_layers", "altup_active_idx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name in positive else 0):
                raise G3nError(
                    f"config field '{name}' must be an integer >= {1 if name in positive else 0}, got {value!r}"
                )
        widths = self.intermediate_size
        for w in widths if isinstance(widths, list) else [widths]:
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                raise G3nError(f"config field 'intermediate_size' must be integers >= 1 (one per layer), got {w!r}")

    def validate(self) -> None:
        n = self.num_hidden_layers
        for name in ("intermediate_size", "layer_types", "activation_sparsity_pattern"):
            got = len(getattr(self, name))
            if got != n:
                raise G3nError(f"config field '{name}' has {got} entries, expected one per layer ({n})")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise G3nError(f"config field 'layer_types' has unknown layer type(s) {bad}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise G3nError("config: num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 <= self.num_kv_shared_layers < n:
            raise G3nError(f"config field 'num_kv_shared_layers' = {self.num_kv_shared_layers} is out of range")
        first_shared = n - self.num_kv_shared_layers
        if self.num_kv_shared_layers and set(self.layer_types[first_shared:]) - set(self.layer_types[:first_shared]):
            raise G3nError("config: a KV-shared layer has no earlier layer of its type to share from")

    # ---- derived facts the decoder needs -------------------------------------------------
    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source(self, layer: int) -> int:
        """Index of the layer whose K/V this layer attends to (itself unless KV-shared)."""
        if layer < self.first_kv_shared_layer:
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(self.first_kv_shared_layer) if self.layer_types[i] == kind)

    def to_dict(self) -> dict:
        return asdict(self)


def text_config_from_dict(raw: dict, source: str = "config.json") -> TextConfig:
    """Build a TextConfig from a transformers config dict (multimodal or text-only)."""
    model_type = raw.get("model_type")
    if model_type == "gemma3n":
        if not isinstance(raw.get("text_config"), dict):
            raise G3nError(f"{source}: a 'gemma3n' config needs a 'text_config' object")
        text = dict(raw["text_config"])
        text.setdefault("torch_dtype", raw.get("torch_dtype") or raw.get("dtype"))
    elif model_type == "gemma3n_text":
        text = dict(raw)
    else:
        raise G3nError(f"{source}: model_type is {model_type!r}, not a Gemma 3n model ('gemma3n' or 'gemma3n_text')")
    if text.get("torch_dtype") is None:
        text["torch_dtype"] = text.get("dtype")

    rope = text.get("rope_parameters")
    if isinstance(rope, dict) and (FULL in rope or SLIDING in rope):
        full, sliding = rope.get(FULL) or {}, rope.get(SLIDING) or {}
        for kind, params in ((FULL, full), (SLIDING, sliding)):
            if params.get("rope_type", "default") != "default":
                raise G3nError(f"{source}: rope_parameters.{kind}.rope_type {params['rope_type']!r} is not supported")
        if "rope_theta" in full:
            text["rope_theta"] = full["rope_theta"]
        if "rope_theta" in sliding:
            text["rope_local_base_freq"] = sliding["rope_theta"]
    scaling = text.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise G3nError(f"{source}: rope_scaling {scaling!r} is not supported")

    known = set(TextConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in text.items() if k in known and v is not None}
    try:
        return TextConfig(**kwargs)
    except TypeError as e:  # a field of the wrong type
        raise G3nError(f"{source}: {e}") from None


def read_yaml(path: Path):
    """A YAML file's content; a syntax error names the file and line."""
    import yaml

    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise G3nError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise G3nError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None


def read_text_config(path: str | Path) -> TextConfig:
    path = Path(path)
    if not path.is_file():
        raise G3nError(f"{path}: config.json not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise G3nError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise G3nError(f"{path}: expected a JSON object")
    return text_config_from_dict(raw, str(path))
