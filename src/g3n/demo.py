"""`g3n demo`: g3n's main job end to end on a model (the tiny one by default), in a few minutes on
a CPU: chat, a LoRA fine-tune on a bundled dataset (with a progress bar), the held-out loss before
and after, the taught facts before and after (`taught`), known facts the fine-tune does not repeat
checked for forgetting (`kept`), an export of the merged model, and the export loaded back and answering."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

DEMO_DATA = Path(__file__).resolve().parent / "assets" / "demo"
CHAT_QUESTIONS = ["Hello!", "What is 1+1?", "What is the capital of France?", "What color is the sky?"]


def _say(text: str) -> None:
    print(text, flush=True)


def _greedy_answers(model, tok, questions: list[str]) -> list[str]:
    from g3n.inference.generate import generate
    from g3n.inference.sampling import SamplingParams

    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    outs = generate(model, prompts, SamplingParams(greedy=True, max_new_tokens=32), tok.stop_ids, tok.pad_id)
    return [tok.decode(o).strip() for o in outs]


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(question, answer) of each one-turn chat record in a JSONL file."""
    pairs = []
    for line in path.read_text().splitlines():
        user, model = json.loads(line)["messages"]
        pairs.append((user["content"], model["content"]))
    return pairs


def run_demo(model_name: str = "tiny", device: str | None = None, seed: int = 0, out: str | None = None) -> dict:
    """Run every stage and return what was measured (used by the tests)."""
    from g3n import load
    from g3n.adapters.lora import load_adapter
    from g3n.export.hf import export_hf
    from g3n.inference.generate import stream_text
    from g3n.inference.sampling import SamplingParams
    from g3n.train.config import load_train_config
    from g3n.train.loop import train

    keep = out is not None
    work = Path(out) if keep else Path(tempfile.mkdtemp(prefix="g3n-demo-"))
    try:
        model, tok = load(model_name, device=device)
        params = SamplingParams(seed=seed, max_new_tokens=64)
        _say(f"== 1. chat with {model_name} (Google's sampling defaults: temperature 1, top_k 64, top_p 0.95) ==")
        for question in CHAT_QUESTIONS:
            pieces = stream_text(model, tok, tok.encode_chat([{"role": "user", "content": question}]), params)
            sys.stdout.write(f"you> {question}\nmodel> ")
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")

        probes = read_pairs(DEMO_DATA / "taught.jsonl")
        known = read_pairs(DEMO_DATA / "kept.jsonl")
        questions = [q for q, _ in probes]
        asked = questions + [q for q, _ in known]  # one batch: the taught questions, then the known facts
        answers = _greedy_answers(model, tok, asked)
        before, known_before = answers[: len(questions)], answers[len(questions) :]
        del model

        cfg = load_train_config(DEMO_DATA / "config.yaml", base={"model": model_name, "device": device,
                                                                  "seed": seed, "output_dir": str(work / "run")})  # fmt: skip
        _say(f"\n== 2. fine-tune: LoRA r={cfg.lora_r} on {DEMO_DATA / 'train.jsonl'} ({cfg.max_steps} steps) ==")
        history = train(cfg, overwrite=True)
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        _say(f"held-out loss (questions asked in words the fine-tune never saw): {evals[0]:.3f} -> {evals[-1]:.3f}")

        tuned, tok = load(model_name, device=device)
        load_adapter(tuned, work / "run" / "adapter")
        answers = _greedy_answers(tuned, tok, asked)
        after, known_after = answers[: len(questions)], answers[len(questions) :]
        _say("\n== 3. the taught facts, greedy, before -> after fine-tuning ==")
        right = [0, 0]
        for (question, expected), a, b in zip(probes, before, after):
            right[0] += a == expected
            right[1] += b == expected
            _say(f"you> {question}\n  before> {a}\n  after>  {b}")
        kept = sum(a == b for a, b in zip(known_before, known_after))
        _say(f"taught: {right[0]}/{len(probes)} before, {right[1]}/{len(probes)} after")
        _say(f"kept: {kept}/{len(known)} known facts the fine-tune did not repeat keep their answers")

        _say("\n== 4. export: the base model with the adapter merged in, as an HF checkpoint ==")
        start = time.perf_counter()
        merged_dir = export_hf(model_name, work / "merged", adapter=work / "run" / "adapter", dtype="float32",
                               overwrite=True)  # fmt: skip
        _say(f"wrote {merged_dir} in {time.perf_counter() - start:.1f} s")
        exported, tok = load(merged_dir, device=device)
        from_export = _greedy_answers(exported, tok, questions)
        same = from_export == after
        _say(f"the export, loaded back, answers the {len(questions)} questions "
             f"{'exactly as' if same else 'differently from'} the fine-tuned model")  # fmt: skip
        with torch.no_grad():
            ids = torch.tensor([tok.encode_chat([{"role": "user", "content": questions[0]}])])
            gap = (exported(ids) - tuned(ids)).abs().max().item()
        _say(f"largest logit difference export vs adapter: {gap:.2e}")
        if keep:
            _say(f"\nkept in {work}: run/ (checkpoints, metrics.jsonl, loss.png, adapter/) and merged/")
        return {"eval_before": evals[0], "eval_after": evals[-1], "taught_before": right[0], "taught_after": right[1],
                "taught_of": len(probes), "kept": kept, "kept_of": len(known), "export_matches": same,
                "logit_gap": gap}  # fmt: skip
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
