"""MatFormer Mix-n-Match: plans for sub-models nested in a Gemma 3n checkpoint.

Every FFN of Gemma 3n nests narrower FFNs (its first d units), and whole layers can be skipped: E2B
is E4B with FFN width 8192 and layers 20-24 skipped. A `Plan` names, for each parent layer, the FFN
width to keep, and which layers to skip. From a plan this module derives the sub-model's config and,
for every sub-model tensor, which slices of which parent tensor it is made of; the slicer
(`slicer.py`) and the elastic loader (`model/load.py`) share that one mapping.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path

from g3n.config import TextConfig, read_yaml
from g3n.errors import G3nError

# Google's published configurations whose layer plans are known, for an E4B-shaped parent (35 layers).
# Google writes FFN widths in units of 2048 of E4B's 8 x 2048 = 16384: "4x" is half the parent's width.
# Each entry: (fraction of the parent's FFN width per layer, layers to skip).
_E4B_LAYERS = 35
_SHARED_BLOCK = [20, 21, 22, 23, 24]


def _fractions(wide_layers=(), default: float = 0.5) -> list[float]:
    return [1.0 if i in wide_layers else default for i in range(_E4B_LAYERS)]


BUILTIN_PLANS = {
    "E4B": (_fractions(default=1.0), []),
    "E2.54B": (_fractions(wide_layers=[4, *_SHARED_BLOCK]), []),
    "E2B": (_fractions(), _SHARED_BLOCK),
    "E1.96B": (_fractions(wide_layers=[4]), _SHARED_BLOCK),
}


def builtin_plan(name: str, parent: TextConfig) -> Plan:
    fractions, skip = BUILTIN_PLANS[name]
    if parent.num_hidden_layers != _E4B_LAYERS:
        raise G3nError(
            f"built-in plan {name!r} is for E4B-shaped parents ({_E4B_LAYERS} layers); "
            f"this parent has {parent.num_hidden_layers}"
        )
    widths = [max(1, round(f * w)) for f, w in zip(fractions, parent.intermediate_size)]
    return Plan(ffn_widths=widths, skip_layers=list(skip), name=name)


@dataclass
class Plan:
    """FFN width for every parent layer (the widths of skipped layers are ignored) and layers to skip."""

    ffn_widths: list[int]
    skip_layers: list[int] = field(default_factory=list)
    name: str = "custom"

    @property
    def kept_layers(self) -> list[int]:
        return [i for i in range(len(self.ffn_widths)) if i not in set(self.skip_layers)]


def load_plan(spec: str | Plan, parent: TextConfig) -> Plan:
    """A plan from a built-in name, a YAML or CSV file, or a Plan; validated against the parent."""
    if isinstance(spec, Plan):
        plan = spec
    elif spec in BUILTIN_PLANS:
        plan = builtin_plan(spec, parent)
    elif Path(spec).suffix.lower() in (".yaml", ".yml", ".csv"):
        plan = _read_plan_file(Path(spec), parent)
    else:
        raise G3nError(
            f"unknown MatFormer plan {spec!r}: use one of {', '.join(BUILTIN_PLANS)} or a .yaml/.csv plan file"
        )
    validate_plan(plan, parent)
    return plan


def _read_plan_file(path: Path, parent: TextConfig) -> Plan:
    if not path.is_file():
        raise G3nError(f"{path}: plan file not found")
    if path.suffix.lower() == ".csv":
        return _read_plan_csv(path, parent)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise G3nError(f"{path}: a plan is a mapping with 'ffn_widths' and optionally 'skip_layers'")
    unknown = set(raw) - {"name", "ffn_widths", "skip_layers"}
    if unknown:
        raise G3nError(f"{path}: unknown field(s) {sorted(unknown)} (expected name, ffn_widths, skip_layers)")
    widths = raw.get("ffn_widths")
    if _is_int(widths):
        widths = [widths] * parent.num_hidden_layers
    if not isinstance(widths, list) or not all(_is_int(w) for w in widths):
        raise G3nError(f"{path}: 'ffn_widths' must be an integer or a list of integers, one per layer"
                       + _first_bool(widths))  # fmt: skip
    skip = raw.get("skip_layers") or []
    if not isinstance(skip, list) or not all(_is_int(i) for i in skip):
        raise G3nError(f"{path}: 'skip_layers' must be a list of layer indices" + _first_bool(skip))
    return Plan(ffn_widths=widths, skip_layers=skip, name=str(raw.get("name", path.stem)))


def _is_int(value) -> bool:
    """An integer, not a boolean (YAML's true is Python's 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _first_bool(values) -> str:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return next((f" (got {v!r}, a boolean)" for v in values if isinstance(v, bool)), "")


def _read_plan_csv(path: Path, parent: TextConfig) -> Plan:
    """CSV with a header `layer,ffn_width`; a width of 0 (or the word skip) skips the layer."""
    widths: dict[int, int] = {}
    skip = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise G3nError(f"{path}: not UTF-8 text (byte {e.start})") from None
    with io.StringIO(text, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if not header or [h.strip() for h in header[:2]] != ["layer", "ffn_width"]:
            raise G3nError(f"{path}:1: expected the header 'layer,ffn_width'")
        for line, row in enumerate(rows, start=2):
            if not row or not "".join(row).strip():
                continue
            try:
                layer, width = int(row[0]), row[1].strip().lower()
                value = 0 if width == "skip" else int(width)
            except (ValueError, IndexError):
                raise G3nError(f"{path}:{line}: expected 'layer,ffn_width' with integers, got {row}") from None
            if layer in widths:
                raise G3nError(f"{path}:{line}: layer {layer} listed twice")
            widths[layer] = value
            if value == 0:
                skip.append(layer)
    n = parent.num_hidden_layers
    if sorted(widths) != list(range(n)):
        raise G3nError(f"{path}: needs one row per parent layer 0..{n - 1}, got {len(widths)} rows")
    full = parent.intermediate_size  # a skipped layer's width is never used
    return Plan(ffn_widths=[widths[i] or full[i] for i in range(n)], skip_layers=skip, name=path.stem)


def validate_plan(plan: Plan, parent: TextConfig) -> None:
    n = parent.num_hidden_layers
    for field_name in ("ffn_widths", "skip_layers"):
        values = getattr(plan, field_name)
        if not isinstance(values, (list, tuple)) or not all(_is_int(v) for v in values):
            raise G3nError(f"plan {plan.name!r}: {field_name} must be a list of integers{_first_bool(values)}")
    if len(plan.ffn_widths) != n:
        raise G3nError(f"plan {plan.name!r}: {len(plan.ffn_widths)} FFN widths for a parent of {n} layers")
    for i, (w, parent_w) in enumerate(zip(plan.ffn_widths, parent.intermediate_size)):
        if i not in plan.skip_layers and not 0 < w <= parent_w:
            raise G3nError(f"plan {plan.name!r}: layer {i} FFN width {w} must be between 1 and the parent's {parent_w}")
    bad = [i for i in plan.skip_layers if not 0 <= i < n]
    if bad or len(set(plan.skip_layers)) != len(plan.skip_layers):
        raise G3nError(f"plan {plan.name!r}: skip_layers must be distinct layer indices 0..{n - 1}")
    sources = {parent.kv_source(i) for i in range(parent.first_kv_shared_layer, n)}
    hit = sorted(sources & set(plan.skip_layers))
    if hit:
        raise G3nError(
            f"plan {plan.name!r}: cannot skip layer(s) {hit}: the KV-shared layers read their keys and values"
        )
    if len(plan.kept_layers) == 0:
        raise G3nError(f"plan {plan.name!r}: skips every layer")


def sub_config(parent: TextConfig, plan: Plan) -> TextConfig:
    """The sub-model's config: kept layers renumbered, their widths, sparsity and types."""
    kept = plan.kept_layers
    shared_skipped = sum(1 for i in plan.skip_layers if i >= parent.first_kv_shared_layer)
    return dataclasses.replace(
        parent,
        num_hidden_layers=len(kept),
        intermediate_size=[plan.ffn_widths[i] for i in kept],
        layer_types=[parent.layer_types[i] for i in kept],
        activation_sparsity_pattern=[parent.activation_sparsity_pattern[i] for i in kept],
        num_kv_shared_layers=parent.num_kv_shared_layers - shared_skipped,
    )


@dataclass
class Source:
    """A sub-model tensor = the parent tensor `name`, cut to `pieces` (tuples of slices), joined on `dim`."""

    name: str
    pieces: list[tuple[slice, ...]]
    dim: int = 0


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs [start, stop) of sorted indices."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def tensor_source(suffix: str, parent: TextConfig, plan: Plan | None) -> Source:
    """Where the sub-model's text tensor `suffix` (its name inside the text model, e.g.
    'layers.3.mlp.up_proj.weight') comes from in the parent; the whole tensor when plan is None."""
    if plan is None:
        return Source(suffix, [()])
    kept = plan.kept_layers
    P = parent.hidden_size_per_layer_input
    blocks = [(a * P, b * P) for a, b in _runs(kept)]
    if suffix == "embed_tokens_per_layer.weight":
        return Source(suffix, [(slice(None), slice(a, b)) for a, b in blocks], dim=1)
    if suffix == "per_layer_model_projection.weight":
        return Source(suffix, [(slice(a, b),) for a, b in blocks], dim=0)
    if suffix.startswith("layers."):
        _, idx, rest = suffix.split(".", 2)
        parent_layer = kept[int(idx)]
        name = f"layers.{parent_layer}.{rest}"
        width = plan.ffn_widths[parent_layer]
        if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            return Source(name, [(slice(0, width),)])
        if rest == "mlp.down_proj.weight":
            return Source(name, [(slice(None), slice(0, width))], dim=1)
        return Source(name, [()])
    return Source(suffix, [()])


def effective_parameters(cfg: TextConfig) -> int:
    """Parameters that must sit in accelerator memory, counted as Google does: the text decoder
    without the token and per-layer embedding tables (towers excluded), with K/V weights counted for
    every layer as Google's checkpoints store them."""
    h, P, L, n = cfg.hidden_size, cfg.hidden_size_per_layer_input, cfg.num_hidden_layers, cfg.altup_num_inputs
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    attention = 2 * h * q + 2 * h * kv + 2 * cfg.head_dim  # q, o, k, v, q_norm, k_norm
    altup = h + n * n + n * n * n + h * n + h  # output scale, correction, prediction, router, router norm
    laurel = 2 * h * cfg.laurel_rank + h
    per_layer = 2 * h * P + h  # input gate, projection, norm
    norms = 4 * h
    layers = sum(attention + 3 * h * w + altup + laurel + per_layer + norms for w in cfg.intermediate_size)
    top = h * L * P + P + 2 * (n - 1) * h * h + h  # PLE projection + its norm, altup (un)embed, final norm
    return layers + top


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write a plan as YAML that `load_plan` (and `g3n slice --plan`) reads back."""
    import yaml

    path = Path(path)
    data = {"name": plan.name, "ffn_widths": list(plan.ffn_widths), "skip_layers": sorted(plan.skip_layers)}
    path.write_text(yaml.safe_dump(data, default_flow_style=None, sort_keys=False))
    return path
