"""The fine-tuning loop: LoRA or full, gradient accumulation, clipping, AdamW, schedules, eval,
metrics, atomic checkpoints and exact resume.

Exact resume: the data order of every epoch is a permutation drawn from (seed, epoch), the random
numbers of a step (LoRA dropout) are drawn from (seed, process rank, step), and a checkpoint stores
the step, the trainable weights and the optimizer and scheduler states, so a resumed run takes the
same batches and dropout masks, on any device, and reaches the same losses as an uninterrupted one.

Several processes (torchrun, see distributed.py): optimizer step s takes the rows at positions
s*G .. (s+1)*G of the stream of epoch permutations, G = batch_size x grad_accum x processes (the
global batch), and each process takes its share of them. The loss of a step is normalised by the
step's target tokens over all processes, so the gradient is the same sum whatever the number of
processes or micro-batches: a 2-process run follows a 1-process run of the same global batch, and a
checkpoint resumes on another number of processes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
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

from g3n.checkpoint.atomic import (
    LOCK_FILE,
    TEMP_PATTERN,
    atomic_dir,
    dir_lock,
    is_or_contains,
    remove_stale_temps,
    write_atomic,
)
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


def collate(rows, pad_id: int, processor=None, packed_width: int | None = None) -> Batch:
    """Right-padded tensors; the rows' image/audio files read through `processor` (MediaProcessor).

    Right padding needs no attention mask: causal attention never looks ahead, so real tokens do
    not see the padding after them, and padding carries no labels. Segment ids are kept only when
    a row packs several samples (full layers then build masks from them: model/text.py).
    `packed_width` (packing's max_length): every batch is that wide and keeps its segment ids, so
    compiled layers see one shape and one kind of attention for the whole run (batches of varying
    width, with or without segments, recompiled them mid-run)."""
    width = packed_width or max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (x, y, s, _) in enumerate(rows):  # padding is its own segment
        ids[i, : len(x)], labels[i, : len(y)], segments[i, : len(s)] = torch.tensor(x), torch.tensor(y), torch.tensor(s)
    packed = packed_width is not None or any(len(set(r[2])) > 1 for r in rows)
    files = [item for row in rows for item in row[3]]
    media = processor.load(files) if files else None
    return Batch(ids, labels, segments if packed else None, media)


def packed_width(cfg: TrainConfig, model) -> int | None:
    """The width every batch is padded to: max_length when packed rows run through compiled layers
    (one shape, no recompiles), else None (each batch as wide as its widest row; eager layers
    take any shape, and padding would only add work)."""
    return cfg.max_length if cfg.packing and recompute.is_compiled(model.model) else None


def stream_seed(purpose: str, *key: int) -> int:
    """The seed of the random stream that `purpose` and `key` (the run's seed, an epoch, a rank, a
    step) name: a hash of all of them, so two keys never share a seed the way an arithmetic mix
    does (seed * 1000 + epoch gives seed 1's held-out split, epoch -1, seed 0's order of epoch 999)."""
    digest = hashlib.blake2b(json.dumps([purpose, *key]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch generator takes it


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The data order of one epoch (epoch -1: which examples are held out for eval), the same on
    every process (cached: every micro-batch of the epoch asks for it)."""
    generator = torch.Generator().manual_seed(stream_seed("data order", seed, epoch))
    return tuple(torch.randperm(n, generator=generator).tolist())


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed the random numbers optimizer step `step` (0-based) draws on this process (LoRA dropout
    masks), on the CPU and every accelerator, from (seed, rank, step) alone. A resumed step so
    draws what the uninterrupted run drew, on any device, with no generator state in the
    checkpoint; and each process draws masks of its own, as the rows of one batch do. The data
    order comes from generators of its own (epoch_order), the same on every process."""
    torch.manual_seed(stream_seed("step", seed, rank, step))


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
        b = collate(batches[k] if k < len(batches) else batches[0], pad_id, processor, packed_width(cfg, model))
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
    try:
        with atomic_dir(final, overwrite=True) as tmp:
            state.update(scheduler=sched.state_dict(), scaler=scaler.state_dict() if scaler else None)
            torch.save(state, tmp / "state.pt")
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "history": history}))
    except G3nError as e:
        raise G3nError(f"{e}; the run stopped at step {step}, its last complete checkpoint is kept in {out}") from None
    except RuntimeError as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        raise G3nError(f"{final}: could not be written ({str(e).splitlines()[0]}); the run stopped at step {step}, "
                       f"its last complete checkpoint is kept in {out}") from None  # fmt: skip
    write_atomic(out / "latest.json", lambda p: p.write_text(json.dumps({"checkpoint": final.name, "step": step})))
    return final


# What a run writes into output_dir (the temporary names are atomic.TEMP_PATTERN's)
RUN_FILES = (CONFIG_FILE, "latest.json", "metrics.jsonl", "loss.png", "adapter", "merged", LOCK_FILE)
RUN_PATTERN = re.compile(r"checkpoint-\d+")


def foreign_entries(out: Path) -> list[str]:
    """The names in output_dir that a g3n run does not write (empty for an earlier run's directory)."""
    return sorted(
        p.name
        for p in out.iterdir()
        if p.name not in RUN_FILES and not RUN_PATTERN.fullmatch(p.name) and not TEMP_PATTERN.fullmatch(p.name)
    )


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
    cfg: TrainConfig,
    resume: bool,
    overwrite: bool,
    processes: int = 1,
    model_dir: Path | None = None,
    held: contextlib.ExitStack | None = None,
) -> Path:
    """Lock output_dir for this run (until `held` closes), check it and record the settings in it.
    An earlier run is a directory with a checkpoint (latest.json); one without (a run that failed
    before its first checkpoint) is started afresh. --overwrite replaces only an empty directory or
    one holding nothing but a run's own files. Temporaries of killed runs are removed."""
    out = Path(cfg.output_dir)
    check_output_place(cfg, out, model_dir)
    if resume and not (out / "latest.json").is_file():
        raise G3nError(f"{out}: no checkpoint to resume from")
    with contextlib.ExitStack() as local:
        (held or local).enter_context(dir_lock(out, "a training run"))
        _prepare_locked(cfg, out, resume, overwrite, processes)
    return out


def _prepare_locked(cfg: TrainConfig, out: Path, resume: bool, overwrite: bool, processes: int) -> None:
    for place in (out, out / "adapter"):
        remove_stale_temps(place)
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
    record = {**cfg.to_dict(), "processes": processes}
    write_atomic(saved, lambda p: p.write_text(json.dumps(record, indent=2)))


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
        if entry.name == LOCK_FILE:
            continue  # this run's
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
    from g3n.adapters.lora import import_bitsandbytes_quietly

    import_bitsandbytes_quietly()
    d = distributed.setup(cfg.device)
    try:
        with distributed.explained_timeouts(d), recompute.dynamo_settings():
            return _train(cfg, d, resume, overwrite, progress, stop_after)
    finally:
        distributed.teardown(d)


@dataclass
class _Run:
    """What one fine-tune's steps, evals and checkpoints share."""

    cfg: TrainConfig
    d: Dist
    out: Path
    model: torch.nn.Module
    tok: object
    body: torch.nn.Module  # the module the training forward goes through (DDP or FSDP under torchrun)
    params: list
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None  # float16 weights only
    rows: list
    eval_rows: list
    processor: object | None  # reads the batches' image/audio files
    total: int  # optimizer steps of the run
    global_batch: int  # rows per optimizer step, over all processes

    def evaluate(self) -> float:
        return evaluate(self.model, self.eval_rows, self.cfg, self.tok.pad_id, self.d, self.processor)


def _train(cfg: TrainConfig, d: Dist, resume: bool, overwrite: bool, progress: bool, stop_after):
    """The run in order: settings and output_dir, model, data, optimizer, resume, steps, results."""
    from g3n.checkpoint.names import resolve_model_dir

    if not cfg.train_data:
        raise G3nError("config: train_data names no file")
    distributed.check_same_settings(d, cfg.to_dict())
    model_dir = resolve_model_dir(cfg.model)  # a bad model name fails before output_dir is touched
    with contextlib.ExitStack() as held:  # output_dir is this run's until it ends
        distributed.on_main(d, lambda: prepare_output(cfg, resume, overwrite, d.world, model_dir, held))
        model, tok, media_tokens, run_dtype = _load_model(cfg, d, model_dir)
        runner = _make_trainable(cfg, d, model, run_dtype)
        rows, eval_rows, stats, processor = _load_rows(cfg, d, model, tok, model_dir, media_tokens)
        run = _start_run(cfg, d, model, tok, rows, eval_rows, processor, run_dtype)
        step, history = _resume(run) if resume else (0, [])
        if d.main:
            _print_summary(run, stats, runner.compiled)
        if not _train_steps(run, step, history, progress, stop_after):
            return history  # stopped at stop_after, as a kill would
        _finish(run, model_dir, run_dtype, history)
        return history


def _load_model(cfg: TrainConfig, d: Dist, model_dir: Path):
    """(model, tokenizer, media token ids, dtype): the model on this process's device with the
    towers the config tunes; the image/audio token ids are None for a text-only checkpoint; the
    dtype is the 16/32-bit weights' (the merged checkpoint keeps it: lossless)."""
    from g3n import load

    torch.manual_seed(cfg.seed)  # the adapters' initial weights: the same on every process
    device = str(d.device) if d.on else cfg.device
    model, tok = load(cfg.model, dtype=cfg.dtype, device=device, ple_device="cpu" if cfg.ple_on_cpu else None,
                      load_in_4bit=cfg.load_in_4bit)  # fmt: skip
    if cfg.load_in_4bit:
        from g3n.model.quant import for_training

        for_training(model)
    if d.on and cfg.parts != ["text"]:
        raise PeerError("tuning the vision/audio tower runs on one process for now (set finetune_*_layers)")
    media_tokens = _media_setup(cfg, model, model_dir)
    return model, tok, media_tokens, model.dtype


def _make_trainable(cfg: TrainConfig, d: Dist, model, run_dtype: torch.dtype) -> recompute.LayerRunner:
    """LoRA adapters (float32 whatever the base dtype: loss scaling needs it) or the decoder's own
    weights made trainable, and the layers set to run the training way; returns their runner."""
    from g3n.adapters.lora import add_lora
    from g3n.train.lora_mlp import use_fused_mlp

    if cfg.lora:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.finetune_attention_modules,
                 cfg.finetune_mlp_modules, parts=cfg.parts)  # fmt: skip
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if cfg.fused_lora_mlp:
            use_fused_mlp(model)
    else:
        if run_dtype == torch.float16:
            raise G3nError("full fine-tuning in float16 needs float32 master weights; use bfloat16 or float32")
        if d.on and cfg.optim == "adamw_8bit":
            raise PeerError("optim adamw_8bit: full fine-tuning on several processes (FSDP) needs optim adamw")
        model.requires_grad_(False)
        model.model.requires_grad_(True)  # the decoder (towers are tuned with LoRA only)
        table = model.model.embed_tokens_per_layer.weight
        if table.device != model.device:  # kept off the accelerator: frozen
            table.requires_grad_(False)
    # auto: one CUDA GPU, 16-bit weights; compiled 4-bit layers and compiled DDP/FSDP run only when
    # `compile: true` asks for them (their speed on a GPU is unverified)
    auto = model.device.type == "cuda" and not d.on and not cfg.load_in_4bit
    compiled = auto if cfg.compile == "auto" else cfg.compile
    if compiled:  # the layers' one-off compile kept on disk, as the engine's is: paid once per machine
        from g3n.inference import compile_cache

        compile_cache.use()
    runner = recompute.configure(model.model, cfg.gradient_checkpointing, compiled)
    model.train()
    return runner


def _load_rows(cfg: TrainConfig, d: Dist, model, tok, model_dir: Path, media_tokens):
    """(rows, eval rows, data statistics, media processor): the training data tokenized and cut
    into rows; the eval rows from eval_data, else eval_fraction of the data held out."""
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
    processor = _media_processor(d, model, model_dir, examples + eval_examples)
    rows, eval_rows = make_rows(examples, cfg), make_rows(eval_examples, cfg)
    if not rows:
        raise G3nError("no training examples left (all were held out or had no labels)")
    distributed.check_same_data(d, rows)
    return rows, eval_rows, stats, processor


def _media_processor(d: Dist, model, model_dir: Path, examples: list[Example]):
    """The reader of the examples' image/audio files (None when there are none); it reads them per
    batch. The towers they need and the config does not tune load frozen."""
    kinds = {kind for ex in examples for kind, _ in ex.media}
    if not kinds:
        return None
    if d.on:
        raise PeerError("images/audio in the data: training on several processes is text-only for now")
    from g3n.media import MediaProcessor

    processor = MediaProcessor(model_dir)
    add_towers(model, model_dir, kinds)
    return processor


def _start_run(cfg: TrainConfig, d: Dist, model, tok, rows, eval_rows, processor, run_dtype) -> _Run:
    """The step count, the model wrapped for this number of processes, the optimizer, the
    schedule and (float16) the loss scaler."""
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(rows) / global_batch))
    body = distributed.wrap(d, model, cfg.lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params, model.device)
    # Loss scaling starts at 2^10, not torch's 2^16: the gradients reaching E2B's first layers are
    # large enough that 2^16 overflows and skips the first steps.
    scaler = torch.amp.GradScaler(model.device.type, init_scale=2.0**10) if run_dtype == torch.float16 else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    return _Run(cfg, d, Path(cfg.output_dir), model, tok, body, params, opt, sched, scaler, rows, eval_rows,
                processor, total, global_batch)  # fmt: skip


def _resume(run: _Run) -> tuple[int, list]:
    """Load the latest checkpoint into the run; returns its step and history. Nothing random is
    restored: each step seeds its own random numbers (seed_step)."""
    out = run.out
    if not (out / "latest.json").is_file():  # process 0 found it: this host does not see output_dir
        raise G3nError(f"{out}/latest.json not found here: resuming needs output_dir on a filesystem every host sees")
    latest = json.loads((out / "latest.json").read_text())
    ckpt = out / latest["checkpoint"]
    state = load_state(ckpt / "state.pt")
    distributed.load_model_state(run.d, run.model, state["model"], str(ckpt))
    distributed.load_optimizer_state(run.d, run.model, run.opt, state["optimizer"])
    resume_schedule(run.sched, state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    meta = json.loads((ckpt / STATE_FILE).read_text())
    step, history = meta["step"], meta["history"]
    if step > run.total:
        raise G3nError(f"{ckpt}: the run is at step {step}, past this run's {run.total} steps; raise max_steps to "
                       "continue it")  # fmt: skip
    if run.d.main:  # the records of steps after the checkpoint are run again: metrics.jsonl ends at its step
        text = "".join(json.dumps(record) + "\n" for record in history)
        write_atomic(out / "metrics.jsonl", lambda p: p.write_text(text))
    return step, history


def load_state(path: Path) -> dict:
    """A checkpoint's state.pt: tensors and plain data only (torch's weights_only loader), so a
    planted pickle in a run directory cannot run code."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = [
            line.split("error:", 1)[-1].split(". Please")[0].strip()
            for line in str(e).splitlines()
            if "Unpickler error" in line
        ]
        raise G3nError(f"{path}: holds objects other than tensors and plain data, refused"
                       + (f" ({found[0]})" if found else "")) from None  # fmt: skip
    except (RuntimeError, EOFError, OSError) as e:
        raise G3nError(f"{path}: cannot read the checkpoint ({str(e).splitlines()[0] if str(e) else e!r}); "
                       "resume from an earlier checkpoint-N by pointing latest.json at it") from None  # fmt: skip


def _print_summary(run: _Run, stats, compiled: bool) -> None:
    """What the run is about to do: data, steps, trainable parameters, how the layers run."""
    cfg, d = run.cfg, run.d
    processes = f" x {d.world} processes" if d.on else ""
    print(
        f"[g3n] {stats.samples} samples ({stats.truncated} cut to {cfg.max_length} tokens, "
        f"{len(stats.without_labels)} without labels dropped, {len(stats.skipped)} bad skipped), "
        f"{len(run.rows)} rows, {len(run.eval_rows)} eval rows; "
        f"{run.total} steps of {cfg.batch_size} x {cfg.grad_accum} rows{processes}; "
        f"{sum(p.numel() for p in run.params):,} trainable parameters",
        flush=True,
    )
    layers = {True: "recomputed in backward", False: "kept", "offload": "recomputed in backward, inputs in CPU memory"}
    print(f"[g3n] layer activations {layers[cfg.gradient_checkpointing]}"
          + ("; compiling the decoder layers (the first steps take 30-70 s longer, once per machine: the compiled "
             "code is cached on disk)" if compiled else ""),
          flush=True)  # fmt: skip
    for problem in stats.skipped[:5]:
        print(f"[g3n] skipped: {problem}", flush=True)


class _Log:
    """Where a run's records go: its history, and on process 0 metrics.jsonl and the progress bar."""

    def __init__(self, run: _Run, history: list, step: int, progress: bool):
        self.history, self.bar = history, None
        if progress and run.d.main:
            from tqdm import tqdm

            self.bar = tqdm(total=run.total, initial=step, desc="train", unit="step", dynamic_ncols=True)
        self.metrics = (run.out / "metrics.jsonl").open("a") if run.d.main else None

    def __call__(self, record: dict) -> None:
        self.history.append(record)
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.bar and "loss" in record:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")  # fmt: skip

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.bar:
            self.bar.close()


def _train_steps(run: _Run, step: int, history: list, progress: bool, stop_after) -> bool:
    """The optimizer steps from `step` to the end, with evals, records and checkpoints; False when
    stopped at `stop_after`."""
    log = _Log(run, history, step, progress)
    try:
        with _out_of_memory_explained(run):
            return _steps(run, step, log, stop_after)
    finally:
        log.close()


@contextlib.contextmanager
def _out_of_memory_explained(run: _Run):
    """An allocation that fails (a batch far too large for the device) as a one-line error naming
    the settings that size it, not a traceback."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        text = str(e)
        if (
            not isinstance(e, torch.OutOfMemoryError)
            and "can't allocate memory" not in text
            and "out of memory" not in text
        ):
            raise
        cfg = run.cfg
        raise G3nError(
            f"out of {run.model.device.type} memory ({text.splitlines()[0][:160]}): a micro-batch of batch_size "
            f"{cfg.batch_size} rows of up to max_length {cfg.max_length} tokens does not fit; lower batch_size "
            "(raise grad_accum to keep the global batch) or max_length"
        ) from None


def _steps(run: _Run, step: int, log: _Log, stop_after) -> bool:
    cfg = run.cfg
    if run.eval_rows and step == 0:  # the baseline the run's eval losses compare against
        loss = run.evaluate()
        log({"step": 0, "eval_loss": round(loss, 6), "eval_perplexity": round(math.exp(loss), 4)})
    while step < run.total:
        record = _optimizer_step(run, step)
        step += 1
        if run.eval_rows and (step % cfg.eval_steps == 0 or step == run.total):
            record["eval_loss"] = round(run.evaluate(), 6)
            record["eval_perplexity"] = round(math.exp(record["eval_loss"]), 4)
        log(record)
        if step % cfg.save_steps == 0 or step == run.total:
            save_checkpoint(run.out, run.model, run.opt, run.sched, run.scaler, step, log.history, run.d)
        if stop_after is not None and step >= stop_after:
            return False
    return True


def _optimizer_step(run: _Run, step: int) -> dict:
    """Optimizer step `step` (0-based) on this process's share of its rows; returns its record."""
    start = time.perf_counter()
    seed_step(run.cfg.seed, run.d.rank, step)
    chosen = step_rows(len(run.rows), run.cfg.seed, step, run.global_batch)  # the whole step, all processes
    tokens = sum(len(run.rows[i][0]) for i in chosen)
    (loss,) = run.d.sum(_accumulate_gradients(run, chosen))
    if not math.isfinite(loss):
        raise G3nError(f"loss became {loss} at step {step + 1}; the last good checkpoint is kept in {run.out}")
    lr, grad_norm, skipped = _update_weights(run, step)
    record = {"step": step + 1, "loss": round(loss, 6), "lr": lr, "grad_norm": round(grad_norm, 4),
              "tokens_per_s": round(tokens / (time.perf_counter() - start), 1)}  # fmt: skip
    if skipped:
        record["skipped_overflow"] = True  # float16: loss scale lowered, weights unchanged
    return record


def _accumulate_gradients(run: _Run, chosen: list[int]) -> float:
    """Forward and backward over this process's micro-batches of the step's rows `chosen`; returns
    this process's part of the step's loss."""
    cfg, d = run.cfg, run.d
    targets = max(1, sum(target_tokens(run.rows[i]) for i in chosen))
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        first = (micro * d.world + d.rank) * cfg.batch_size  # this process's share
        rows = [run.rows[i] for i in chosen[first : first + cfg.batch_size]]
        b = collate(rows, run.tok.pad_id, run.processor, packed_width(cfg, run.model))
        n = int((b.labels[:, 1:] != IGNORE).sum())
        with distributed.accumulating(run.body, last=micro == cfg.grad_accum - 1):
            ids = b.ids.to(run.model.device)
            loss = causal_lm_loss(run.model, ids, b.labels, None, b.segments, body=run.body, media=b.media)
            # sum over the step's target tokens / their count; DDP and FSDP average over processes
            scaled = loss * (n * d.world / targets)
            (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        loss_sum += loss.item() * n / targets
    return loss_sum


def _update_weights(run: _Run, step: int) -> tuple[float, float, bool]:
    """Clip, step the optimizer and the schedule; returns (the step's learning rate, the gradient
    norm, whether loss scaling skipped the update)."""
    opt, scaler = run.opt, run.scaler
    if scaler:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm or math.inf)  # 0/None: measured only
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP
    if not torch.isfinite(grad_norm) and not scaler:  # with loss scaling: skip the step, lower the scale
        raise G3nError(f"gradients became non-finite at step {step + 1}; the last good checkpoint is in {run.out}")
    lr = run.sched.get_last_lr()[0]
    skipped = False
    if scaler:
        scale = scaler.get_scale()
        scaler.step(opt)  # skips the update when the scaled gradients overflowed
        scaler.update()
        skipped = scaler.get_scale() < scale
    else:
        opt.step()
    run.sched.step()
    opt.zero_grad(set_to_none=True)
    return lr, float(grad_norm), skipped


def _finish(run: _Run, model_dir: Path, run_dtype: torch.dtype, history: list) -> None:
    """The run's results: the adapter, the merged or fully tuned model (save_merged), loss.png."""
    from g3n.adapters.lora import save_adapter
    from g3n.adapters.merge import merge_checkpoint, save_merged, save_model_dir

    cfg, d, out = run.cfg, run.d, run.out
    if cfg.lora and d.main:
        save_adapter(run.model, out / "adapter", base_model=str(cfg.model))
    if cfg.writes_model and cfg.load_in_4bit:  # from the base checkpoint's 16-bit weights, not the 4-bit ones
        if d.main:
            merge_checkpoint(model_dir, out / "adapter", out / "merged", overwrite=True)
    elif cfg.writes_model:
        full = distributed.gathered_model(d, run.model)  # every process takes part under FSDP
        if d.main:
            write = save_merged if cfg.lora else save_model_dir
            write(full, out / "merged", model_dir, dtype=run_dtype, overwrite=True)
    if d.main:
        plot_losses(history, out / "loss.png")
    d.barrier()  # every process returns once the outputs are written


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
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
