"""The fine-tuning loop: LoRA or full, gradient accumulation, clipping, AdamW, schedules, eval,
metrics, atomic checkpoints and exact resume.

Exact resume: the data order of every epoch is a permutation drawn from (seed, epoch), and a
checkpoint stores the step, the trainable weights, the optimizer and scheduler states and the RNG
state, so a resumed run takes the same batches and reaches the same losses as an uninterrupted one.

Several processes (torchrun, see distributed.py): optimizer step s takes the rows at positions
s*G .. (s+1)*G of the stream of epoch permutations, G = batch_size x grad_accum x processes (the
global batch), and each process takes its share of them. The loss of a step is normalised by the
step's target tokens over all processes, so the gradient is the same sum whatever the number of
processes or micro-batches: a 2-process run follows a 1-process run of the same global batch, and a
checkpoint resumes on another number of processes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from g3n.checkpoint.atomic import atomic_dir, is_or_contains, write_atomic
from g3n.errors import G3nError
from g3n.model.towers import MediaTokens, add_towers, multimodal_config
from g3n.train import distributed, recompute
from g3n.train.config import TrainConfig
from g3n.train.data import IGNORE, Example, load_examples, pack
from g3n.train.distributed import Dist, PeerError
from g3n.train.loss import causal_lm_loss

# A skipped float16 step (loss scaling) makes torch warn that the scheduler stepped first; intended.
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.json"


@dataclass
class Batch:
    ids: torch.Tensor
    labels: torch.Tensor
    segments: torch.Tensor | None  # None unless a row packs several samples
    media: dict | None = None  # pixel_values / input_features of the batch's images and audio


def make_rows(examples: list[Example], cfg: TrainConfig) -> list[tuple]:
    """(ids, labels, segment ids, media files) per row."""
    if cfg.packing:
        return [(r.ids, r.labels, r.segment_ids, tuple(r.media)) for r in pack(examples, cfg.max_length)]
    return [(e.ids, e.labels, [0] * len(e.ids), e.media) for e in examples]


def collate(rows, pad_id: int, processor=None) -> Batch:
    """Right-padded tensors; the rows' image/audio files read through `processor` (MediaProcessor).

    Right padding needs no attention mask: causal attention never looks ahead, so real tokens do
    not see the padding after them, and padding carries no labels. Segment ids are kept only when
    a row packs several samples (full layers then build masks from them: model/text.py)."""
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (x, y, s, _) in enumerate(rows):  # padding is its own segment
        ids[i, : len(x)], labels[i, : len(y)], segments[i, : len(s)] = torch.tensor(x), torch.tensor(y), torch.tensor(s)
    packed = any(len(set(r[2])) > 1 for r in rows)
    files = [item for row in rows for item in row[3]]
    media = processor.load(files) if files else None
    return Batch(ids, labels, segments if packed else None, media)


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The data order of one epoch (cached: every micro-batch of the epoch asks for it)."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist())


def step_rows(n: int, seed: int, step: int, global_batch: int) -> list[int]:
    """The rows of optimizer step `step` (0-based): positions step*G .. (step+1)*G of the
    concatenated epoch permutations, so a step may run across an epoch's end."""
    out = []
    for position in range(step * global_batch, (step + 1) * global_batch):
        epoch, i = divmod(position, n)
        out.append(epoch_order(n, seed, epoch)[i])
    return out


def target_tokens(row) -> int:
    return sum(1 for label in row[1][1:] if label != IGNORE)


def lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[
            cfg.lr_scheduler
        ]

    return f


def resume_schedule(sched, saved: dict) -> None:
    """Restore the scheduler's position, with the learning rate this run's schedule gives there:
    max_steps may have changed since the checkpoint, and the saved rate (e.g. 0 at the end of a
    linear decay) belongs to the old total."""
    sched.load_state_dict(saved)
    sched.last_epoch -= 1
    sched.step()  # recomputes every group's rate from the schedule at the restored position


@torch.no_grad()
def evaluate(model, rows, cfg: TrainConfig, pad_id: int, d: Dist | None = None, processor=None) -> float:
    """Mean loss over the eval rows (token-weighted). Several processes share the batches; each
    runs the same number of forwards (a sharded model needs all of them), a spare one weighted 0."""
    d = d or Dist()
    model.eval()
    batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    total, count = 0.0, 0
    for k in range(d.rank, math.ceil(len(batches) / d.world) * d.world, d.world):
        b = collate(batches[k] if k < len(batches) else batches[0], pad_id, processor)
        n = int((b.labels[:, 1:] != IGNORE).sum()) if k < len(batches) else 0
        if n or d.fsdp:
            loss = causal_lm_loss(model, b.ids.to(model.device), b.labels, None, b.segments, media=b.media)
            total += loss.item() * n
            count += n
    total, count = d.sum(total, count)
    if d.fsdp:  # the root keeps its weights gathered after a forward until a backward; free them
        model.model.reshard()
    model.train()
    return total / max(count, 1)


def save_checkpoint(out: Path, model, opt, sched, scaler, step: int, history: list, d: Dist | None = None) -> Path:
    """checkpoint-STEP/ written by process 0 under a temporary name, then renamed; latest.json
    points to it. Weights and optimizer state are full tensors by name (any number of processes
    can resume them); every process takes part in gathering them."""
    d = d or Dist()
    final = out / f"checkpoint-{step}"
    state = {"model": distributed.model_state(d, model), "optimizer": distributed.optimizer_state(d, model, opt)}
    if not d.main:
        return final
    with atomic_dir(final, overwrite=True) as tmp:
        state.update(scheduler=sched.state_dict(), scaler=scaler.state_dict() if scaler else None,
                     rng=torch.get_rng_state())  # fmt: skip
        torch.save(state, tmp / "state.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "history": history}))
    write_atomic(out / "latest.json", lambda p: p.write_text(json.dumps({"checkpoint": final.name, "step": step})))
    return final


# What a run writes into output_dir (the temporary names are write_atomic's and atomic_dir's)
RUN_FILES = (CONFIG_FILE, "latest.json", "metrics.jsonl", "loss.png", "adapter", "merged")
RUN_PATTERN = re.compile(r"checkpoint-\d+|\..+\.tmp-\d+(\.png)?")


def foreign_entries(out: Path) -> list[str]:
    """The names in output_dir that a g3n run does not write (empty for an earlier run's directory)."""
    return sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and not RUN_PATTERN.fullmatch(p.name))


def check_output_place(cfg: TrainConfig, out: Path, model_dir: Path | None) -> None:
    """output_dir may not be, or hold, the data files or the model: a run writes (and --overwrite
    deletes) there."""
    if out.exists() and not out.is_dir():
        raise G3nError(f"config: output_dir {out} is a file, not a directory")
    inputs = [("train_data", f) for f in cfg.train_data] + [("eval_data", f) for f in cfg.eval_data]
    inputs += [("model", model_dir)] if model_dir is not None else []
    for name, f in inputs:
        if is_or_contains(out, Path(f)):
            raise G3nError(f"config: output_dir {out} holds {name} {f}; choose a directory of its own for the run")


def prepare_output(
    cfg: TrainConfig, resume: bool, overwrite: bool, processes: int = 1, model_dir: Path | None = None
) -> Path:
    """Check output_dir and record the settings in it. An earlier run is a directory with a
    checkpoint (latest.json); one without (a run that failed before its first checkpoint) is
    started afresh. --overwrite replaces only an empty directory or one holding nothing but a
    run's own files."""
    out = Path(cfg.output_dir)
    check_output_place(cfg, out, model_dir)
    saved = out / CONFIG_FILE
    # an earlier run: a checkpoint or results; a run that failed before either is started afresh
    results = [out / "latest.json", out / "adapter", out / "merged", *out.glob("checkpoint-*")]
    earlier = saved.is_file() and any(p.exists() for p in results)
    if earlier and not (resume or overwrite):
        raise G3nError(f"{out}: holds an earlier run; pass --resume to continue it or --overwrite to replace it")
    if resume:
        if not (out / "latest.json").is_file():
            raise G3nError(f"{out}: no checkpoint to resume from")
        check_resumable(json.loads(saved.read_text()), cfg, out, processes)
    elif overwrite and out.is_dir():
        clear_run(out)
    elif saved.is_file():  # a run that stopped before its first checkpoint: started afresh
        (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    record = {**cfg.to_dict(), "processes": processes}
    write_atomic(saved, lambda p: p.write_text(json.dumps(record, indent=2)))
    return out


def clear_run(out: Path) -> None:
    """--overwrite: empty output_dir when it holds nothing but a run's own files; anything else
    there is refused rather than deleted."""
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise G3nError(
            f"{out}: --overwrite replaces only an earlier g3n run, and this directory holds other files ({shown}); "
            "choose another output_dir or remove them yourself"
        )
    for entry in out.iterdir():  # the entries, not the directory: it may be "." or a symlink
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _same_path(a, b) -> bool:
    """Two spellings of one existing file or directory."""
    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except (OSError, TypeError, ValueError):
        return False


def check_resumable(before: dict, cfg: TrainConfig, out: Path, processes: int) -> None:
    """The settings a run was started with must match the resuming ones, but for those that do not
    change the maths (output_dir: a run directory may be moved or named another way)."""
    # only their product with the processes matters; how layers run does not change the maths
    free = ("max_steps", "batch_size", "grad_accum", "gradient_checkpointing", "compile", "output_dir", "save_merged")
    defaults = {"load_in_4bit": False}  # settings added since older runs were started
    changed = sorted(k for k, v in cfg.to_dict().items() if before.get(k, defaults.get(k)) != v and k not in free)
    if "model" in changed and _same_path(before["model"], cfg.model):
        changed.remove("model")  # a relative path recorded before it was resolved against the config file
    if changed:
        raise G3nError(f"{out}: the run was started with other settings ({', '.join(changed)}); cannot resume")
    was = before["batch_size"] * before["grad_accum"] * before.get("processes", 1)
    now = cfg.batch_size * cfg.grad_accum * processes
    if was != now:
        raise G3nError(
            f"{out}: the run used a global batch of {was} rows ({before['batch_size']} x {before['grad_accum']} "
            f"x {before.get('processes', 1)} processes), this one {now} ({cfg.batch_size} x {cfg.grad_accum} x "
            f"{processes}); "
            + (f"set batch_size x grad_accum to {was // processes} to resume on {processes} process(es)"
               if was % processes == 0 else f"it cannot be split over {processes} processes")
        )  # fmt: skip


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, progress: bool = True, stop_after=None):
    """Run the fine-tune; returns the history (list of per-step dicts). `stop_after` (a step)
    interrupts the run there, as a kill would (used by tests). Under torchrun every process calls
    this; process 0 writes the outputs."""
    d = distributed.setup(cfg.device)
    try:
        with distributed.explained_timeouts(d):
            return _train(cfg, d, resume, overwrite, progress, stop_after)
    finally:
        distributed.teardown(d)


def _train(cfg: TrainConfig, d: Dist, resume: bool, overwrite: bool, progress: bool, stop_after):
    from g3n import load
    from g3n.adapters.lora import add_lora, save_adapter
    from g3n.adapters.merge import merge_checkpoint, save_merged, save_model_dir
    from g3n.checkpoint.names import resolve_model_dir
    from g3n.train.lora_mlp import use_fused_mlp

    if not cfg.train_data:
        raise G3nError("config: train_data names no file")
    distributed.check_same_settings(d, cfg.to_dict())
    model_dir = resolve_model_dir(cfg.model)  # a bad model name fails before output_dir is touched
    distributed.on_main(d, lambda: prepare_output(cfg, resume, overwrite, d.world, model_dir))
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    device = str(d.device) if d.on else cfg.device
    model, tok = load(cfg.model, dtype=cfg.dtype, device=device, ple_device="cpu" if cfg.ple_on_cpu else None,
                      load_in_4bit=cfg.load_in_4bit)  # fmt: skip
    if cfg.load_in_4bit:
        from g3n.model.quant import for_training

        for_training(model)
    if d.on and cfg.parts != ["text"]:
        raise PeerError("tuning the vision/audio tower runs on one process for now (set finetune_*_layers)")
    media_tokens = _media_setup(cfg, model, model_dir)
    run_dtype = model.dtype  # of the 16/32-bit weights: the merged checkpoint keeps it (lossless)
    half = run_dtype == torch.float16
    if cfg.lora:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.finetune_attention_modules,
                 cfg.finetune_mlp_modules, parts=cfg.parts)  # fmt: skip
        for p in model.parameters():
            if p.requires_grad:  # adapters train in float32 whatever the base dtype (loss scaling needs it)
                p.data = p.data.float()
        if cfg.fused_lora_mlp:
            use_fused_mlp(model)
    else:
        if half:
            raise G3nError("full fine-tuning in float16 needs float32 master weights; use bfloat16 or float32")
        if d.on and cfg.optim == "adamw_8bit":
            raise PeerError("optim adamw_8bit: full fine-tuning on several processes (FSDP) needs optim adamw")
        model.requires_grad_(False)
        model.model.requires_grad_(True)  # the decoder (towers are tuned with LoRA only)
        table = model.model.embed_tokens_per_layer.weight
        if table.device != model.device:  # kept off the accelerator: frozen
            table.requires_grad_(False)
    # auto: one CUDA GPU, 16-bit weights (compiled 4-bit layers and compiled DDP/FSDP are not yet
    # measured on a GPU: `compile: true` asks for them)
    auto = model.device.type == "cuda" and not d.on and not cfg.load_in_4bit
    runner = recompute.configure(model.model, cfg.gradient_checkpointing, auto if cfg.compile == "auto" else cfg.compile)
    model.train()

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
    processor = None
    if kinds:  # the files are read per batch; towers the config does not tune load frozen
        if d.on:
            raise PeerError("images/audio in the data: training on several processes is text-only for now")
        from g3n.media import MediaProcessor

        processor = MediaProcessor(model_dir)
        add_towers(model, model_dir, kinds)
    rows, eval_rows = make_rows(examples, cfg), make_rows(eval_examples, cfg)
    if not rows:
        raise G3nError("no training examples left (all were held out or had no labels)")
    distributed.check_same_data(d, rows)
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(rows) / global_batch))

    body = distributed.wrap(d, model, cfg.lora)  # the module the training forward goes through
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params, model.device)
    # Loss scaling starts at 2^10, not torch's 2^16: gradients reaching E2B's first layers measured
    # ~80 at scale 1 (random weights, H200), so 2^16 overflowed and skipped the first 6-7 steps.
    scaler = torch.amp.GradScaler(model.device.type, init_scale=2.0**10) if half else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    step, history = 0, []
    if resume:
        if not (out / "latest.json").is_file():  # process 0 found it: this host does not see output_dir
            raise G3nError(
                f"{out}/latest.json not found here: resuming needs output_dir on a filesystem every host sees"
            )
        latest = json.loads((out / "latest.json").read_text())
        ckpt = out / latest["checkpoint"]
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False, mmap=True)
        distributed.load_model_state(d, model, state["model"], str(ckpt))
        distributed.load_optimizer_state(d, model, opt, state["optimizer"])
        resume_schedule(sched, state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        meta = json.loads((ckpt / STATE_FILE).read_text())
        step, history = meta["step"], meta["history"]
        if step > total:
            raise G3nError(f"{ckpt}: the run is at step {step}, past this run's {total} steps; raise max_steps to "
                           "continue it")  # fmt: skip

    processes = f" x {d.world} processes" if d.on else ""
    summary = (
        f"[g3n] {stats.samples} samples ({stats.truncated} cut to {cfg.max_length} tokens, "
        f"{len(stats.without_labels)} without labels dropped, {len(stats.skipped)} bad skipped), "
        f"{len(rows)} rows, {len(eval_rows)} eval rows; "
        f"{total} steps of {cfg.batch_size} x {cfg.grad_accum} rows{processes}; "
        f"{sum(p.numel() for p in params):,} trainable parameters"
    )
    if d.main:
        print(summary, flush=True)
        layers = {
            True: "recomputed in backward",
            False: "kept",
            "offload": "recomputed in backward, inputs in CPU memory",
        }
        print(f"[g3n] layer activations {layers[cfg.gradient_checkpointing]}"
              + ("; compiling the decoder layers (the first steps take 30-70 s longer)" if runner.compiled else ""),
              flush=True)  # fmt: skip
        for problem in stats.skipped[:5]:
            print(f"[g3n] skipped: {problem}", flush=True)
    bar = None
    if progress and d.main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    metrics = (out / "metrics.jsonl").open("a") if d.main else None

    def log(record: dict) -> None:
        history.append(record)
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    try:
        if eval_rows and step == 0:  # the baseline the run's eval losses compare against
            loss = evaluate(model, eval_rows, cfg, tok.pad_id, d, processor)
            log({"step": 0, "eval_loss": round(loss, 6), "eval_perplexity": round(math.exp(loss), 4)})
        while step < total:
            start, loss_sum = time.perf_counter(), 0.0
            chosen = step_rows(len(rows), cfg.seed, step, global_batch)  # the whole step, all processes
            targets = max(1, sum(target_tokens(rows[i]) for i in chosen))
            tokens = sum(len(rows[i][0]) for i in chosen)
            for micro in range(cfg.grad_accum):
                first = (micro * d.world + d.rank) * cfg.batch_size  # this process's share
                b = collate([rows[i] for i in chosen[first : first + cfg.batch_size]], tok.pad_id, processor)
                n = int((b.labels[:, 1:] != IGNORE).sum())
                with distributed.accumulating(body, last=micro == cfg.grad_accum - 1):
                    ids = b.ids.to(model.device)
                    loss = causal_lm_loss(model, ids, b.labels, None, b.segments, body=body, media=b.media)
                    # sum over the step's target tokens / their count; DDP and FSDP average over processes
                    scaled = loss * (n * d.world / targets)
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.item() * n / targets
            (loss_sum,) = d.sum(loss_sum)
            if not math.isfinite(loss_sum):
                raise G3nError(f"loss became {loss_sum} at step {step + 1}; the last good checkpoint is kept in {out}")
            if scaler:
                scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)  # 0/None: measured only
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP
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
                record["eval_loss"] = round(evaluate(model, eval_rows, cfg, tok.pad_id, d, processor), 6)
                record["eval_perplexity"] = round(math.exp(record["eval_loss"]), 4)
            log(record)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % cfg.save_steps == 0 or step == total:
                save_checkpoint(out, model, opt, sched, scaler, step, history, d)
            if stop_after is not None and step >= stop_after:
                return history
    finally:
        if metrics:
            metrics.close()
        if bar:
            bar.close()

    if cfg.lora and d.main:
        save_adapter(model, out / "adapter", base_model=str(cfg.model))
    if cfg.writes_model and cfg.load_in_4bit:  # from the base checkpoint's 16-bit weights, not the 4-bit ones
        if d.main:
            merge_checkpoint(model_dir, out / "adapter", out / "merged", overwrite=True)
    elif cfg.writes_model:
        full = distributed.gathered_model(d, model)  # every process takes part under FSDP
        if d.main:
            write = save_merged if cfg.lora else save_model_dir
            write(full, out / "merged", model_dir, dtype=run_dtype, overwrite=True)
    if d.main:
        plot_losses(history, out / "loss.png")
    d.barrier()  # every process returns once the outputs are written
    return history


def _media_setup(cfg: TrainConfig, model, model_dir: Path):
    """The image/audio token ids of a multimodal checkpoint (None for a text-only one), for
    tokenizing data with media; the towers being tuned are loaded now, before adapters are added.
    Text-only work on a multimodal checkpoint needs neither transformers nor the towers."""
    raw = multimodal_config(model_dir)
    tuned = [p for p in cfg.parts if p != "text"]
    if raw is None:
        if tuned:
            raise G3nError(
                f"config: tuning the vision/audio tower needs a multimodal checkpoint; {model_dir} is text-only"
            )
        return None
    if tuned:
        add_towers(model, model_dir, tuned)
    return MediaTokens.from_config(raw)


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
