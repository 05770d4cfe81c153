"""`g3n inspect`: how close a checkpoint's weights come to float16's range, per tensor group.

This is the analysis that found Gemma 3n's float16 problem: the vision tower's Conv2D weights reach
abs max 98, and a 1x1 conv over ~2k channels sums thousands of such products, past float16's 65504.
Every tensor is read once, one at a time (memory holds one tensor), and summarised as

- abs max, and the headroom to 65504 (how many times larger it could get);
- a worst case for the product sums the weight takes part in: abs max x fan-in (inputs of size 1);
  a group whose worst case passes 65504 is flagged: applied in float16 it can overflow.

Groups are tensor names with layer/block numbers replaced by `*`, so one row covers a kind of
weight across layers; the plot shows abs max per layer for the decoder and per block for the towers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from g3n.checkpoint.atomic import write_atomic
from g3n.errors import G3nError

FP16_MAX = 65504.0
PARTS = {
    "language_model": "decoder",
    "vision_tower": "vision",
    "audio_tower": "audio",
    "embed_vision": "vision embedder",
    "embed_audio": "audio embedder",
}
_NUMBER = re.compile(r"\.(\d+)(?=\.)")


@dataclass
class TensorStat:
    name: str
    shape: tuple[int, ...]
    abs_max: float
    fan_in: int

    @property
    def worst_sum(self) -> float:
        return self.abs_max * self.fan_in


@dataclass
class Group:
    key: str
    part: str
    tensors: list[TensorStat] = field(default_factory=list)

    @property
    def top(self) -> TensorStat:
        return max(self.tensors, key=lambda t: t.abs_max)

    @property
    def worst(self) -> TensorStat:
        return max(self.tensors, key=lambda t: t.worst_sum)

    @property
    def risk(self) -> str:
        if self.top.abs_max > FP16_MAX:
            return "does not fit float16"
        if self.worst.worst_sum > FP16_MAX:
            return "may overflow when applied"
        return ""


def part_of(name: str) -> str:
    for key, label in PARTS.items():
        if f".{key}." in f".{name}":
            return label
    return "decoder" if name.startswith(("model.layers.", "model.embed", "model.norm")) else "other"


def fan_in(name: str, shape: tuple[int, ...]) -> int:
    """Products summed per output element: in-features (x kernel) for matrices and convolutions;
    1 for lookups (embedding tables) and vectors (norms, scales, biases)."""
    if len(shape) < 2 or "embed_tokens" in name or name.endswith("embedding.weight"):
        return 1
    n = shape[1]
    for k in shape[2:]:
        n *= k
    return n


def scan(model_dir: Path, progress: bool = True) -> list[TensorStat]:
    """abs max and fan-in of every tensor in the checkpoint, one tensor in memory at a time."""
    from safetensors import safe_open
    from tqdm import tqdm

    from g3n.checkpoint.reader import TensorIndex

    index = TensorIndex(model_dir)
    by_file: dict[Path, list[str]] = {}
    for name, path in index.file_of.items():
        by_file.setdefault(path, []).append(name)
    stats = []
    bar = tqdm(total=len(index.file_of), desc="inspect", unit="tensor", disable=not progress)
    for path, names in sorted(by_file.items()):
        if not path.is_file():
            raise G3nError(f"{path}: shard listed in the index is missing")
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(names):
                t = f.get_tensor(name)
                shape = tuple(t.shape)
                top = float(t.abs().max()) if t.numel() and t.is_floating_point() else 0.0
                stats.append(TensorStat(name, shape, top, fan_in(name, shape)))
                bar.update()
    bar.close()
    return stats


def group(stats: list[TensorStat]) -> list[Group]:
    groups: dict[str, Group] = {}
    for s in stats:
        key = _NUMBER.sub(".*", s.name)
        groups.setdefault(key, Group(key, part_of(s.name))).tensors.append(s)
    return sorted(groups.values(), key=lambda g: -g.top.abs_max)


def report(groups: list[Group], limit: int | None = 25) -> str:
    """A text table: the groups with the largest weights first, then every flagged group."""
    rows = groups if limit is None else groups[:limit] + [g for g in groups[limit:] if g.risk]
    width = min(max((len(g.key) for g in rows), default=10), 80)
    lines = [f"{'group':<{width}}  {'part':<15} {'abs max':>9} {'headroom':>9} {'max x fan-in':>13}  risk"]
    for g in rows:
        key = g.key if len(g.key) <= width else "..." + g.key[-(width - 3) :]
        headroom = FP16_MAX / g.top.abs_max if g.top.abs_max else float("inf")
        lines.append(
            f"{key:<{width}}  {g.part:<15} {g.top.abs_max:>9.4g} {headroom:>8.3g}x {g.worst.worst_sum:>13.4g}  {g.risk}"
        )
    flagged = [g for g in groups if g.risk]
    lines.append(
        f"{len(groups)} groups, {sum(len(g.tensors) for g in groups)} tensors; "
        + (f"{len(flagged)} flagged for float16" if flagged else "nothing flagged for float16")
    )
    return "\n".join(lines)


def _unit(name: str) -> tuple[str, tuple] | None:
    """The layer/block a tensor belongs to, with a natural sort key (None: not in a tower or decoder
    stack, e.g. embeddings)."""
    m = re.search(r"(layers|conformer|blocks)\.(\d+)(?:\.(\d+))?\.", name)
    if m:
        nums = tuple(int(g) for g in m.groups()[1:] if g is not None)
        return ".".join(map(str, nums)), (1, nums)
    m = re.search(r"timm_model\.(conv_stem|msfa)\.", name)
    if m:
        return m.group(1), (0 if m.group(1) == "conv_stem" else 2, ())
    return None


def plot(stats: list[TensorStat], path: Path, title: str) -> None:
    """Per layer (decoder) and per block (towers): abs max and abs max x fan-in, log scale, with
    float16's limit marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict] = {}
    for s in stats:
        unit = _unit(s.name)
        if unit is None:
            continue
        label, key = unit
        per = panels.setdefault(part_of(s.name), {})
        top, worst = per.get((key, label), (0.0, 0.0))
        per[(key, label)] = (max(top, s.abs_max), max(worst, s.worst_sum))
    if not panels:
        raise G3nError("no layered tensors to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3 * len(panels)), squeeze=False)
    for ax, (part, per) in zip(axes[:, 0], sorted(panels.items()), strict=True):
        units = sorted(per)
        xs = range(len(units))
        ax.semilogy(xs, [per[u][0] for u in units], marker=".", label="abs max")
        ax.semilogy(xs, [per[u][1] for u in units], marker=".", alpha=0.7, label="abs max x fan-in")
        ax.axhline(FP16_MAX, color="red", linestyle="--", linewidth=1, label="float16 max (65504)")
        step = max(1, len(units) // 24)
        ax.set_xticks(list(xs)[::step], [u[1] for u in units][::step], rotation=60, fontsize=7)
        ax.set_title(part)
        ax.set_xlabel("layer" if part == "decoder" else "block")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def inspect_checkpoint(model: str, plot_path: str | None, progress: bool = True, limit: int | None = 25):
    """Scan, print the table, save the plot; returns the groups."""
    from g3n.checkpoint.names import resolve_model_dir

    model_dir = resolve_model_dir(model)
    if not model_dir.is_dir():
        raise G3nError(f"{model_dir}: no such directory")
    stats = scan(model_dir, progress)
    groups = group(stats)
    print(report(groups, limit))
    if plot_path:
        plot(stats, Path(plot_path), f"{model_dir.name}: abs max of weights")
        print(f"[g3n] wrote {plot_path}")
    return groups
