"""Search MatFormer slices under a parameter budget by perplexity on calibration data.

Candidates are Google's published plans (for E4B-shaped parents) and generated ones: uniform FFN
widths (a fraction of the parent's), the same with the wide early (sparse) layers kept whole, each
with and without skipping a block of KV-shared layers (the layers E2B drops). Every candidate under
the budget is evaluated by perplexity on the calibration data, with weights shared with the parent
in memory; the result is a table, a Pareto plot, and the best plan written as a plan file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from g3n.config import TextConfig
from g3n.errors import G3nError
from g3n.matformer.plan import BUILTIN_PLANS, Plan, builtin_plan, effective_parameters, sub_config, validate_plan
from g3n.matformer.submodel import sub_model

FRACTIONS = (1.0, 0.75, 0.5, 0.375, 0.25)


def parse_budget(text: str) -> int:
    """'1.5B', '900M', '2e9' or '1500000000' -> a parameter count."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMbBgG]?)\s*", str(text))
    if not m:
        raise G3nError(f"budget {text!r}: expected a parameter count such as 1.5B, 900M or 2e9")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def read_calibration(path: str | Path, tokenizer, max_tokens: int, max_len: int) -> list[list[int]]:
    """Token sequences from a JSONL file of {"text": ...} or {"messages": [...]} lines."""
    path = Path(path)
    if not path.is_file():
        raise G3nError(f"{path}: calibration file not found")
    seqs, total = [], 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise G3nError(f"{path}:{line_no}: not UTF-8 (byte offset {e.start} in the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise G3nError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            try:
                if isinstance(row, dict) and isinstance(row.get("text"), str):
                    ids = tokenizer.encode(row["text"])
                elif isinstance(row, dict) and isinstance(row.get("messages"), list):
                    ids = tokenizer.encode_chat(row["messages"], add_generation_prompt=False)
                else:
                    raise G3nError("expected an object with 'text' or 'messages'")
            except G3nError as e:
                raise G3nError(f"{path}:{line_no}: {e}") from None
            ids = ids[:max_len]
            if len(ids) > 1:
                seqs.append(ids)
                total += len(ids)
            if total >= max_tokens:
                break
    if not seqs:
        raise G3nError(f"{path}: no usable calibration text (each line needs at least 2 tokens)")
    return seqs


@torch.inference_mode()
def perplexity(model, seqs: list[list[int]]) -> float:
    """exp(mean next-token negative log-likelihood) over all sequences."""
    nll, count = 0.0, 0
    for ids in seqs:
        x = torch.tensor([ids], device=model.device)
        logits = model(x)[0, :-1].float()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def candidate_plans(parent: TextConfig) -> list[Plan]:
    n, first_shared = parent.num_hidden_layers, parent.first_kv_shared_layer
    sources = {parent.kv_source(i) for i in range(first_shared, n)}
    block = [i for i in range(first_shared, min(first_shared + 5, n)) if i not in sources]
    sparse = [i for i, s in enumerate(parent.activation_sparsity_pattern) if s > 0]
    plans = []
    if n == 35:
        plans += [builtin_plan(name, parent) for name in BUILTIN_PLANS]
    for f in FRACTIONS:
        uniform = [max(1, round(f * w)) for w in parent.intermediate_size]
        early_wide = [w if i in sparse else u for i, (w, u) in enumerate(zip(parent.intermediate_size, uniform))]
        shapes = [("", uniform)] + ([("-sparse-full", early_wide)] if sparse and f < 1 else [])
        for tag, widths in shapes:
            for skip in ([], block) if block else ([],):
                name = f"ffn{f:g}{tag}" + (f"-skip{block[0]}-{block[-1]}" if skip else "")
                plans.append(Plan(ffn_widths=widths, skip_layers=list(skip), name=name))
    unique, seen = [], set()
    for p in plans:
        key = (tuple(p.ffn_widths[i] for i in p.kept_layers), tuple(p.skip_layers))
        if key not in seen:
            validate_plan(p, parent)
            seen.add(key)
            unique.append(p)
    return unique


@dataclass
class Candidate:
    plan: Plan
    effective_params: int
    perplexity: float | None  # None when over the budget (not evaluated)


def search(model, seqs, budget: int, progress=None) -> list[Candidate]:
    """Evaluate every candidate plan under `budget`; return all candidates, best first."""
    results = []
    plans = candidate_plans(model.config)
    for i, plan in enumerate(plans):
        size = effective_parameters(sub_config(model.config, plan))
        ppl = perplexity(sub_model(model, plan), seqs) if size <= budget else None
        results.append(Candidate(plan, size, ppl))
        if progress:
            progress(i + 1, len(plans), plan.name)
    if all(c.perplexity is None for c in results):
        smallest = min(c.effective_params for c in results)
        raise G3nError(f"no candidate fits the budget of {budget:,} parameters (the smallest has {smallest:,})")
    return sorted(results, key=lambda c: (c.perplexity is None, c.perplexity or 0.0, c.effective_params))


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """Evaluated candidates that no other beats on both size and perplexity."""
    done = sorted((c for c in cands if c.perplexity is not None), key=lambda c: (c.effective_params, c.perplexity))
    front, best = [], math.inf
    for c in done:
        if c.perplexity < best:
            front.append(c)
            best = c.perplexity
    return front


def plot(cands: list[Candidate], budget: int, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in cands if c.perplexity is not None]
    front = pareto(cands)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([c.effective_params / 1e6 for c in done], [c.perplexity for c in done], s=18, label="candidates")
    ax.plot([c.effective_params / 1e6 for c in front], [c.perplexity for c in front], "-o", color="C1",
            label="Pareto front")  # fmt: skip
    ax.axvline(budget / 1e6, color="gray", ls="--", label="budget")
    best = done[0]  # candidates come best first
    ax.scatter([best.effective_params / 1e6], [best.perplexity], s=80, color="C3", zorder=3, label=best.plan.name)
    ax.set_xlabel("effective parameters (M, without embeddings)")
    ax.set_ylabel("perplexity on calibration data")
    ax.set_title("MatFormer slices")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
