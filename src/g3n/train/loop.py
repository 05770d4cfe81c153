"""The fine-tuning loop: LoRA or full, gradient accumulation, clipping, AdamW, schedules, eval,
metrics, atomic checkpoints and exact resume.

Exact resume: the data order of every epoch is a permutation drawn from (seed, epoch), and a
checkpoint stores the step, the trainable weights, the optimizer and scheduler states and the RNG
state, so a resumed run takes the same batches and reaches the same losses as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import G3nError
from ..model.save import atomic_dir, write_atomic
from ..model.towers import TOWER_OF, add_towers
from .config import TrainConfig
from .data import IGNORE, Example, load_examples, pack
from .loss import causal_lm_loss

# A skipped float16 step (loss scaling) makes torch warn that the scheduler stepped first; intended.
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.json"


@dataclass
class Batch:
    ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    segments: torch.Tensor | None
    tokens: int
    media: dict | None = None  # pixel_values / input_features of the batch's images and audio


def make_rows(examples: list[Example], cfg: TrainConfig) -> list[tuple]:
    """(ids, labels, segment ids, media files) per row."""
    if cfg.packing:
        return [(r.ids, r.labels, r.segment_ids, tuple(r.media)) for r in pack(examples, cfg.max_length)]
    return [(e.ids, e.labels, [0] * len(e.ids), e.media) for e in examples]


def collate(rows, pad_id: int, processor=None) -> Batch:
    """Right-padded tensors; the rows' image/audio files read through `processor` (MediaProcessor)."""
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (x, y, s, _) in enumerate(rows):  # right padding; padding is its own segment
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)], segments[i, : len(s)] = (
            torch.tensor(x), torch.tensor(y), True, torch.tensor(s),
        )  # fmt: skip
    files = [item for row in rows for item in row[3]]
    media = processor.load(files) if files else None
    return Batch(ids, labels, mask, segments, int(mask.sum()), media)


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The data order of one epoch (cached: every micro-batch of the epoch asks for it)."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist())


def lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[
            cfg.lr_scheduler
        ]

    return f


@torch.no_grad()
def evaluate(model, rows, cfg: TrainConfig, pad_id: int, processor=None) -> float:
    """Mean loss over the eval rows (token-weighted)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), cfg.batch_size):
        b = collate(rows[i : i + cfg.batch_size], pad_id, processor)
        n = int((b.labels[:, 1:] != IGNORE).sum())
        if n:
            loss = causal_lm_loss(model, b.ids.to(model.device), b.labels, b.mask, b.segments, media=b.media)
            total += loss.item() * n
            count += n
    model.train()
    return total / max(count, 1)


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, model, opt, sched, scaler, step: int, history: list) -> Path:
    """checkpoint-STEP/ written under a temporary name, then renamed; latest.json points to it."""
    final = out / f"checkpoint-{step}"
    with atomic_dir(final, overwrite=True) as tmp:
        torch.save(
            {
                "model": trainable_state(model),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler else None,
                "rng": torch.get_rng_state(),
            },
            tmp / "state.pt",
        )
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "history": history}))
    write_atomic(out / "latest.json", lambda p: p.write_text(json.dumps({"checkpoint": final.name, "step": step})))
    return final


def prepare_output(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    out = Path(cfg.output_dir)
    saved = out / CONFIG_FILE
    if saved.is_file() and not (resume or overwrite):
        raise G3nError(f"{out}: holds an earlier run; pass --resume to continue it or --overwrite to replace it")
    if resume:
        if not (out / "latest.json").is_file():
            raise G3nError(f"{out}: no checkpoint to resume from")
        before = json.loads(saved.read_text())
        changed = sorted(k for k, v in cfg.to_dict().items() if before.get(k) != v and k != "max_steps")
        if changed:
            raise G3nError(f"{out}: the run was started with other settings ({', '.join(changed)}); cannot resume")
    elif overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(saved, lambda p: p.write_text(json.dumps(cfg.to_dict(), indent=2)))
    return out


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, progress: bool = True, stop_after=None):
    """Run the fine-tune; returns the history (list of per-step dicts). `stop_after` (a step)
    interrupts the run there, as a kill would (used by tests)."""
    from .. import load
    from ..model.load import resolve_model_dir
    from .lora import add_lora, save_adapter, save_merged

    if not cfg.train_data:
        raise G3nError("config: train_data names no file")
    out = prepare_output(cfg, resume, overwrite)
    torch.manual_seed(cfg.seed)
    model, tok = load(cfg.model, dtype=cfg.dtype, device=cfg.device, ple_device="cpu" if cfg.ple_on_cpu else None)
    model_dir = resolve_model_dir(cfg.model)
    processor, towers = _media_setup(cfg, model, model_dir)
    half = model.dtype == torch.float16
    if cfg.lora:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.finetune_attention_modules,
                 cfg.finetune_mlp_modules, parts=cfg.parts)  # fmt: skip
        for p in model.parameters():
            if p.requires_grad:  # adapters train in float32 whatever the base dtype (loss scaling needs it)
                p.data = p.data.float()
    else:
        if half:
            raise G3nError("full fine-tuning in float16 needs float32 master weights; use bfloat16 or float32")
        model.requires_grad_(False)
        modules = {"text": model.model} | ({p: getattr(towers, TOWER_OF[p]) for p in towers.parts} if towers else {})
        for part in cfg.parts:
            modules[part].requires_grad_(True)
        table = model.model.embed_tokens_per_layer.weight
        if table.device != model.device:  # kept off the accelerator: frozen
            table.requires_grad_(False)
    model.model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()

    media_tokens = processor.tokens if processor else None
    examples, stats = load_examples(cfg.train_data, tok, cfg.max_length, cfg.responses_only, cfg.skip_bad, media_tokens)
    if cfg.eval_data:
        eval_examples, _ = load_examples(
            cfg.eval_data, tok, cfg.max_length, cfg.responses_only, cfg.skip_bad, media_tokens
        )
    else:
        order = epoch_order(len(examples), cfg.seed, -1)
        n_eval = int(len(examples) * cfg.eval_fraction)
        eval_examples = [examples[i] for i in order[:n_eval]]
        examples = [examples[i] for i in order[n_eval:]]
    kinds = {kind for ex in examples + eval_examples for kind, _ in ex.media}
    if kinds:  # towers the data needs but the config does not tune: loaded frozen
        add_towers(model, model_dir, kinds)
    rows, eval_rows = make_rows(examples, cfg), make_rows(eval_examples, cfg)
    if not rows:
        raise G3nError("no training examples left (all were held out or had no labels)")
    batches_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params, model.device)
    scaler = torch.amp.GradScaler(model.device.type) if half else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    step, history = 0, []
    if resume:
        latest = json.loads((out / "latest.json").read_text())
        ckpt = out / latest["checkpoint"]
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        with torch.no_grad():
            named = dict(model.named_parameters())
            for n, t in state["model"].items():
                named[n].copy_(t)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        meta = json.loads((ckpt / STATE_FILE).read_text())
        step, history = meta["step"], meta["history"]

    summary = (
        f"[g3n] {stats.samples} samples ({stats.truncated} cut to {cfg.max_length} tokens, "
        f"{len(stats.without_labels)} without labels dropped, {len(stats.skipped)} bad skipped), "
        f"{len(rows)} rows, {len(eval_rows)} eval rows; "
        f"{total} steps of {cfg.batch_size} x {cfg.grad_accum} rows; "
        f"{sum(p.numel() for p in params):,} trainable parameters"
    )
    print(summary, flush=True)
    for problem in stats.skipped[:5]:
        print(f"[g3n] skipped: {problem}", flush=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    metrics = (out / "metrics.jsonl").open("a")

    def log(record: dict) -> None:
        history.append(record)
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    try:
        if eval_rows and step == 0:  # the baseline the run's eval losses compare against
            loss = evaluate(model, eval_rows, cfg, tok.pad_id, processor)
            log({"step": 0, "eval_loss": round(loss, 6), "eval_perplexity": round(math.exp(loss), 4)})
        while step < total:
            start, tokens, loss_sum = time.perf_counter(), 0, 0.0
            for micro in range(cfg.grad_accum):
                k = step * cfg.grad_accum + micro
                epoch, pos = divmod(k, batches_per_epoch)
                order = epoch_order(len(rows), cfg.seed, epoch)
                chosen = order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
                b = collate([rows[i] for i in chosen], tok.pad_id, processor)
                loss = causal_lm_loss(model, b.ids.to(model.device), b.labels, b.mask, b.segments, media=b.media)
                scaled = loss / cfg.grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.item() / cfg.grad_accum
                tokens += b.tokens
            if not math.isfinite(loss_sum):
                raise G3nError(f"loss became {loss_sum} at step {step + 1}; the last good checkpoint is kept in {out}")
            if scaler:
                scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm) and not scaler:  # with loss scaling: skip the step, lower the scale
                raise G3nError(f"gradients became non-finite at step {step + 1}; the last good checkpoint is in {out}")
            lr = sched.get_last_lr()[0]
            skipped = False
            if scaler:
                scale = scaler.get_scale()
                scaler.step(opt)  # skips the update when the scaled gradients overflowed
                scaler.update()
                skipped = scaler.get_scale() < scale
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "loss": round(loss_sum, 6), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                      "tokens_per_s": round(tokens / (time.perf_counter() - start), 1)}  # fmt: skip
            if skipped:
                record["skipped_overflow"] = True  # float16: loss scale lowered, weights unchanged
            if eval_rows and (step % cfg.eval_steps == 0 or step == total):
                record["eval_loss"] = round(evaluate(model, eval_rows, cfg, tok.pad_id, processor), 6)
                record["eval_perplexity"] = round(math.exp(record["eval_loss"]), 4)
            log(record)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % cfg.save_steps == 0 or step == total:
                save_checkpoint(out, model, opt, sched, scaler, step, history)
            if stop_after is not None and step >= stop_after:
                return history
    finally:
        metrics.close()
        if bar:
            bar.close()

    if cfg.lora:
        save_adapter(model, out / "adapter", base_model=str(cfg.model))
    if cfg.save_merged:
        save_merged(model, out / "merged", resolve_model_dir(cfg.model), overwrite=True)
    plot_losses(history, out / "loss.png")
    return history


def _media_setup(cfg: TrainConfig, model, model_dir: Path):
    """(MediaProcessor or None, towers or None): a multimodal checkpoint gets a processor (its data
    may hold images/audio); the towers being tuned are loaded now, before adapters are added."""
    import json

    raw = json.loads((model_dir / "config.json").read_text())
    if "vision_config" not in raw:
        if {"image", "audio"} & set(cfg.parts):
            raise G3nError(
                f"config: tuning the vision/audio tower needs a multimodal checkpoint; {model_dir} is text-only"
            )
        return None, None
    from ..media import MediaProcessor

    tuned = [p for p in cfg.parts if p != "text"]
    return MediaProcessor(model_dir), (add_towers(model, model_dir, tuned) if tuned else None)


def make_optimizer(cfg: TrainConfig, params, device: torch.device):
    if cfg.optim == "adamw_8bit":
        if device.type != "cuda":
            raise G3nError("optim adamw_8bit needs a CUDA GPU (bitsandbytes); use adamw on the CPU")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise G3nError("optim adamw_8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h for h in history if "loss" in h]
    ax.plot([h["step"] for h in steps], [h["loss"] for h in steps], label="train loss")
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
