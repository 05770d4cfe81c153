"""LoRA fine-tuning on one GPU: transformers + PEFT (the baseline) against g3n, same weights, same
batches. Prints one table: tokens/s (median of timed steps after warm-up), peak GiB
(torch.cuda.max_memory_allocated), first-step loss.

    PYTHONPATH=src python bench/train_gpu.py --sizes E2B,E4B [--rows speed,long,fp16] [--profile]
    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/train_gpu.py --cpu-smoke   # the logic, tiny sizes

Random weights at the real E2B/E4B text sizes (vocab 262400, per-layer table), LoRA r16 alpha16 on
q,k,v,o,gate,up,down, bf16, AdamW; the baseline with gradient checkpointing
(../shared/bench/hf_baseline.py's setup). g3n runs the training loop's own pieces (add_lora,
float32 adapters, causal_lm_loss, clipping), the per-layer table in CPU memory.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from g3n.adapters.lora import add_lora
from g3n.config import text_config_from_dict
from g3n.model.text import Gemma3nForCausalLM, RotaryEmbedding
from g3n.train import recompute
from g3n.train.lora_mlp import use_fused_mlp
from g3n.train.loss import causal_lm_loss

SIZES = {
    "E2B": {"num_hidden_layers": 30, "intermediate_size": 8192, "num_kv_shared_layers": 10},
    "E4B": {"num_hidden_layers": 35, "intermediate_size": 16384, "num_kv_shared_layers": 15},
    "tiny": {"num_hidden_layers": 12, "intermediate_size": 256, "num_kv_shared_layers": 4, "hidden_size": 128,
                 "vocab_size": 2048, "vocab_size_per_layer_input": 2000, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 32, "hidden_size_per_layer_input": 16, "laurel_rank": 8, "sliding_window": 64},
}  # fmt: skip
FUSED_LORA_MLP = False  # --fused-lora-mlp: the training config's fused_lora_mlp for every g3n row
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GiB = 2**30


def hf_model(size: str, device: str):
    from transformers import Gemma3nForCausalLM as HFModel
    from transformers import Gemma3nTextConfig

    cfg = Gemma3nTextConfig(**SIZES[size])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = HFModel(cfg)
    return model.to(torch.bfloat16), cfg


def g3n_model(hf_cfg, state: dict, device: str, ple_device: str, dtype=torch.bfloat16):
    """g3n's decoder over the baseline's own weight tensors (shared, not copied; the per-layer
    table moved to `ple_device`)."""
    cfg = text_config_from_dict(hf_cfg.to_dict())
    with torch.device("meta"):
        model = Gemma3nForCausalLM(cfg)
    ple = "model.embed_tokens_per_layer.weight"
    weights = {n: t.to(ple_device if n == ple else device, dtype) for n, t in state.items() if n != "lm_head.weight"}
    model.load_state_dict(weights, assign=True, strict=True)
    model.model.rotary_emb = RotaryEmbedding(cfg).to(device)
    return model


def lora_model(cfg, state, device: str, dtype, checkpointing, compiled: bool):
    """g3n's model over `state` with the training loop's LoRA (r16 on TARGETS' kinds, float32
    adapters over `dtype` weights) and the given checkpointing mode and compiling."""
    model = g3n_model(cfg, state, device, "cpu", dtype)
    add_lora(model, 16, 16, 0.0)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if FUSED_LORA_MLP:
        use_fused_mlp(model)
    recompute.configure(model.model, checkpointing, compiled)
    return model


def timed_steps(step, warmup: int, steps: int, device: str) -> tuple[float, list[float], float]:
    """(first loss, per-step seconds of the timed steps, first step's seconds incl. compiling)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times, first_loss, first_time = [], None, 0.0
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        seconds = time.perf_counter() - start
        if i == 0:
            first_loss, first_time = loss, seconds
        if i >= warmup:
            times.append(seconds)
    return first_loss, times, first_time


def batches(n: int, bs: int, seq: int, vocab: int, device: str):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (bs, seq), generator=g).to(device) for _ in range(n)]


def packed_segments(seq: int, device: str, shortest: int = 256, longest: int = 4096) -> torch.Tensor:
    """(1, seq) segment ids of samples of random lengths packed into one row, as the training
    loop's `packing` makes them."""
    g = torch.Generator().manual_seed(2)
    shortest, longest = min(shortest, seq // 8), min(longest, seq // 2)  # several samples on short rows too
    lengths, total = [], 0
    while total < seq:
        lengths.append(min(int(torch.randint(shortest, longest + 1, (1,), generator=g)), seq - total))
        total += lengths[-1]
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(device)


def run_hf(size, data, device, warmup, steps, train=True):
    """The baseline's timed steps; returns them with its base weights (names as g3n's) and config."""
    from peft import LoraConfig, get_peft_model

    model, cfg = hf_model(size, device)
    if not train:
        return None, {n: p.detach() for n, p in model.state_dict().items()}, cfg
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    it = iter(data)

    def step():
        ids = next(it)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    reset(device)
    result = timed_steps(step, warmup, steps, device)
    opt.state.clear()
    base = model.get_base_model()
    state = {n: p.detach() for n, p in base.state_dict().items() if "lora_" not in n}
    state = {n.replace(".base_layer.", "."): t for n, t in state.items()}
    return result, state, cfg


FP16_WARMUP = 14  # float16 rows: 2^10 down to 2^-3 if every warm-up step overflowed


def run_g3n(cfg, state, data, device, warmup, steps, checkpointing, compiled, dtype=torch.bfloat16, segments=None):
    model = lora_model(cfg, state, device, dtype, checkpointing, compiled)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10) if dtype == torch.float16 else None  # as the loop
    it = iter(data)
    finite, skipped = [], []

    def step():
        ids = next(it)
        loss = causal_lm_loss(model, ids, ids, None, segments)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:  # an overflowing step is skipped and the scale lowered, as in the training loop
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        finite.append(math.isfinite(value))
        skipped.append(not math.isfinite(float(norm)))
        return value

    reset(device)
    with recompute.dynamo_settings():  # entered once, as train() does
        result = timed_steps(step, warmup, steps, device)
    return result, (all(finite), sum(skipped), scaler.get_scale() if scaler else None)


def reset(device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device) -> float:
    return torch.cuda.max_memory_allocated() / GiB if device == "cuda" else float("nan")


def profile_step(cfg, state, data, device, checkpointing="offload", compiled=True):
    """One g3n step (the default offload+compile after warm-up) under the profiler: wall time
    against the GPU's kernel time (the gap is host work the GPU waits for), and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    model = lora_model(cfg, state, device, torch.bfloat16, checkpointing, compiled)
    model.train()
    for ids in data[:3]:
        causal_lm_loss(model, ids, ids, None, None).backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        causal_lm_loss(model, data[3], data[3], None, None).backward()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) for e in kernels) / 1e3
    print(f"profile ({checkpointing}, compiled={compiled}): step {wall * 1e3:.0f} ms wall (under the profiler), "
          f"{len(kernels)} GPU kernels/copies taking {busy:.0f} ms", flush=True)  # fmt: skip
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    del model
    torch._dynamo.reset()


def memory_at_peak(cfg, state, data, device, top: int = 14):
    """Where one g3n training step's memory peaks (offload+compile, AdamW, after warm-up): each
    phase's peak; the layers whose backward (recompute + backward) peaks highest; then, from the
    allocator's trace of another step's layers backward (E4B 1 x 2048's peak phase), the tensors
    allocated there and alive at its peak, grouped by size (sizes name them: a (2048 x
    intermediate) bf16 MLP activation is 64 MiB for E4B...)."""
    model = lora_model(cfg, state, device, torch.bfloat16, "offload", True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    phases: list = []

    def mark(name):
        torch.cuda.synchronize()
        phases.append((name, torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()))
        torch.cuda.reset_peak_memory_stats()

    layer_peaks, original = [], recompute.layer_forward  # (layer whose recompute starts, peak since the last mark)

    def marked(layer, *args, **kwargs):
        """recompute.layer_forward with a mark at each recompute in the backward pass (offloaded and
        checkpointed layers alike run it with gradients on only then)."""
        if torch.is_grad_enabled() and in_backward[0]:
            mark_layer(layer.layer)
        return original(layer, *args, **kwargs)

    def mark_layer(layer):
        torch.cuda.synchronize()
        layer_peaks.append((layer, torch.cuda.max_memory_allocated()))
        torch.cuda.reset_peak_memory_stats()

    in_backward = [False]

    def step(ids, marks=False, per_layer=False, trace=False):
        """One training step; `marks`: each phase's peak; `per_layer`: a mark at each layer's
        recompute; `trace`: the allocator's history of the layers' backward (returned)."""
        noted = mark if marks else (lambda name: None)

        def backward_begins(g):
            in_backward[0] = True
            if trace:
                torch.cuda.memory._record_memory_history(max_entries=1_000_000, context=None)
            noted("loss backward")

        def layers_done(module, args, out):
            noted("embeddings + layers forward")
            out.register_hook(backward_begins)

        handle = model.model.register_forward_hook(layers_done)
        if per_layer:  # before the forward: checkpointed layers recompute with the function they ran
            recompute.layer_forward = marked
        try:
            loss = causal_lm_loss(model, ids, ids, None, None)
            noted("loss forward")
            loss.backward()
        finally:
            recompute.layer_forward, in_backward[0] = original, False
        if per_layer:
            mark_layer(None)  # closes the last layer's interval
        noted("layers backward")
        snap = torch.cuda.memory._snapshot() if trace else None
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        noted("clip + AdamW step")
        handle.remove()
        return snap

    for ids in data[:3]:
        step(ids)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(data[3], marks=True)
    print(f"memory by phase ({before / GiB:.2f} GiB allocated before the step; peak / allocated at the end, GiB):",
          flush=True)  # fmt: skip
    for name, top_, now in phases:
        print(f"    {name:28s} {top_ / GiB:6.2f} / {now / GiB:6.2f}", flush=True)
    step(data[4], per_layer=True)
    peaks = [(layer, top_) for (layer, _), (_, top_) in itertools.pairwise(layer_peaks)]  # a layer's own backward
    print("layers backward, the highest peaks by layer (GiB): "
          + ", ".join(f"{layer}: {top_ / GiB:.2f}" for layer, top_ in sorted(peaks, key=lambda p: -p[1])[:6]),
          flush=True)  # fmt: skip
    try:
        snap = step(data[4], trace=True)
    except Exception as e:  # noqa: BLE001 - the phases above still count
        print(f"memory trace failed: {type(e).__name__}: {e}", flush=True)
        snap = None
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    if snap is not None:  # frees of tensors made before the trace are not seen: an upper bound
        live, total, best, at_peak = {}, 0, 0, {}
        for e in snap["device_traces"][torch.cuda.current_device()]:
            if e["action"] == "alloc":
                live[e["addr"]] = e["size"]
                total += e["size"]
            elif e["action"] == "free_requested" and e["addr"] in live:
                total -= live.pop(e["addr"])
            if total > best:
                best, at_peak = total, dict(live)
        sizes: dict = {}
        for size in at_peak.values():
            sizes[size] = sizes.get(size, 0) + 1
        print(f"layers backward: at its peak {best / GiB:.2f} GiB allocated in it are alive:", flush=True)
        for size, count in sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:top]:
            print(f"    {count:4d} x {size / 2**20:9.2f} MiB = {count * size / GiB:6.3f} GiB", flush=True)
    torch._dynamo.reset()  # the model and optimizer go with this frame


def fp16_overflow(cfg, half_state, ids, device, scale: float):
    """Where float16 overflows: one eager step without checkpointing, its loss scaled by `scale`
    (as GradScaler does), the backward watched op by op. Prints the first ops whose inputs are
    finite and whose output is not, with the forward line that made their autograd node
    (anomaly mode records it), and each decoder layer's output abs max and gradient abs max."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    model = lora_model(cfg, half_state, device, torch.float16, False, False)
    model.train()
    found, stats = [], {}

    def floats(tree):
        return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]

    class FirstOverflow(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if len(found) < 6 and "empty" not in str(func) and any(not torch.isfinite(t).all() for t in floats(out)):
                ins = floats((args, kwargs))
                if all(torch.isfinite(t).all() for t in ins):
                    node = torch._C._current_autograd_node()
                    trace = (node.metadata.get("traceback_") or []) if node is not None else []
                    where = [line.strip() for line in "".join(trace).splitlines() if "g3n/" in line][-3:]
                    found.append({"op": str(func), "node": node.name() if node is not None else None,
                                  "inputs": [(tuple(t.shape), str(t.dtype).replace("torch.", ""),
                                              float(f"{t.abs().max().item():.4g}")) for t in ins],
                                  "forward": where})  # fmt: skip
            return out

    def hook(i):
        def forward(module, args, out):
            stats[i] = [out.float().abs().max().item(), None]
            out.register_hook(lambda g: stats[i].__setitem__(1, g.float().abs().max().item()))

        return forward

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.autograd.detect_anomaly(check_nan=False):
            loss = causal_lm_loss(model, ids, ids, None, None)
            with FirstOverflow():
                (loss * scale).backward()
    except RuntimeError as e:  # anomaly mode or a non-finite op: what was found so far still counts
        print(f"fp16 overflow probe: backward stopped: {str(e)[:200]}", flush=True)
    for h in handles:
        h.remove()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    print(f"fp16 overflow probe at scale {scale:g}: loss {loss.item():.4f}; non-finite grads in {len(bad)} "
          f"tensors {bad[:3]}; first overflowing ops:", flush=True)  # fmt: skip
    for f in found:
        print("   ", json.dumps(f), flush=True)
    print("    per layer (output abs max / grad abs max): "
          + " ".join(f"{i}:{a:.3g}/{g if g is None else f'{g:.3g}'}" for i, (a, g) in sorted(stats.items())),
          flush=True)  # fmt: skip
    del model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="E2B,E4B")
    ap.add_argument("--rows", default="speed,long,fp16",
                    help="speed (1x2048, 4x2048), long (1 x 8K..32K), packed (the long rows packing samples of "
                         "256-4096 tokens), fp16")  # fmt: skip
    ap.add_argument("--variants", default="ckpt,ckpt+compile,offload,offload+compile")
    ap.add_argument("--long", default="8192,16384,32768")
    ap.add_argument("--long-variant", default="offload+compile", help="the g3n variant of the long and fp16 rows")
    ap.add_argument("--caps", default="E2B:16,E4B:24", help="GiB caps for the long rows")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile one compiled 1 x 2048 step (host vs GPU time)")
    ap.add_argument("--memory", action="store_true",
                    help="a 1 x 2048 step's memory: each phase's peak, the layers peaking highest, the tensors "
                         "alive at the layers' backward peak")  # fmt: skip
    ap.add_argument("--fp16-probe", nargs="+", type=float, metavar="SCALE",
                    help="after the float16 row: the first ops that overflow at these loss scales")  # fmt: skip
    ap.add_argument("--fused-lora-mlp", action="store_true", help="g3n's rows with fused_lora_mlp: true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    global FUSED_LORA_MLP
    FUSED_LORA_MLP = args.fused_lora_mlp
    device = "cpu" if args.cpu_smoke else "cuda"
    sizes = ["tiny"] if args.cpu_smoke else args.sizes.split(",")
    speed = [(1, 64), (2, 64)] if args.cpu_smoke else [(1, 2048), (4, 2048)]
    longs = [128, 256] if args.cpu_smoke else [int(x) for x in args.long.split(",")]
    caps = dict(item.split(":") for item in args.caps.split(","))
    variants = {"ckpt": (True, False), "ckpt+compile": (True, True), "offload": ("offload", False),
                "offload+compile": ("offload", True), "none": (False, False), "none+compile": (False, True)}  # fmt: skip
    chosen = args.variants.split(",")
    rows_kind = set(args.rows.split(","))
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}", flush=True)  # fmt: skip
    rows = []

    def g3n_row(size, work, name, cap, *run_args):
        try:
            result, finite = run_g3n(*run_args)
            record(size, work, f"g3n {name}", result, finite, cap)
        except torch.OutOfMemoryError:
            record(size, work, f"g3n {name}", None, cap=cap, error="OOM")
        except Exception as e:  # noqa: BLE001 - a failing variant is a row, the rest still runs
            record(size, work, f"g3n {name}", None, cap=cap, error=f"{type(e).__name__}: {str(e)[:300]}")
        torch.cuda.empty_cache() if device == "cuda" else None

    def record(size, work, who, result, finite=(True, 0, None), cap=None, error=None):
        row = {"size": size, "work": work, "who": who, "cap_gib": cap}
        if error:
            row["error"] = error
        else:
            (loss, times, first), med = result, statistics.median(result[1])
            bs, seq = (int(x) for x in work.split(" x "))
            row.update(tok_s=round(bs * seq / med), peak_gib=round(peak(device), 2), loss=round(loss, 4),
                       first_step_s=round(first, 1), spread=round((max(times) - min(times)) / med, 3),
                       finite=finite[0], skipped=finite[1])  # fmt: skip
            if finite[2] is not None:
                row["final_scale"] = finite[2]
        rows.append(row)
        print(json.dumps(row), flush=True)

    ple = "model.embed_tokens_per_layer.weight"
    for size in sizes:
        vocab = 262144 if size != "tiny" else 2000
        state = cfg = None
        for bs, seq in speed if "speed" in rows_kind else []:
            data = batches(args.warmup + args.steps, bs, seq, vocab, device)
            work = f"{bs} x {seq}"
            if not args.no_baseline or state is None:
                state = None  # the baseline's peak must not include another copy of the weights
                reset(device)
                try:
                    result, state, cfg = run_hf(size, data, device, args.warmup, 0 if args.no_baseline else args.steps)
                    if not args.no_baseline:
                        record(size, work, "transformers+PEFT (ckpt)", result)
                except torch.OutOfMemoryError:
                    record(size, work, "transformers+PEFT (ckpt)", None, error="OOM")
                    _, state, cfg = run_hf(size, data[:1], device, 0, 1, train=False)
                state[ple] = state[ple].cpu()  # moved once; every g3n variant keeps it in CPU memory
            if args.profile and bs == 1 and device == "cuda" and len(data) >= 4:
                profile_step(cfg, state, data, device)
            if args.memory and bs == 1 and device == "cuda" and len(data) >= 5:
                memory_at_peak(cfg, state, data, device)
            for name in chosen:
                g3n_row(size, work, name, None, cfg, state, data, device, args.warmup, args.steps, *variants[name])  # fmt: skip
        if state is None:
            _, state, cfg = run_hf(size, batches(1, 1, 64, vocab, device), device, 0, 1, train=False)
            state[ple] = state[ple].cpu()
        if "fp16" in rows_kind and size != "E4B":
            # the loss scale starts at the loop's 2^10 and halves on each overflowing step: warm up
            # until it has settled, so the timed steps are applied ones (skipped counts all steps)
            warmup16 = max(args.warmup, FP16_WARMUP)
            data = batches(warmup16 + args.steps, *speed[0], vocab, device)
            half = {n: t.to(torch.float16) for n, t in state.items()}
            g3n_row(size, f"{speed[0][0]} x {speed[0][1]}", f"{args.long_variant}, float16 + loss scaling",
                    None, cfg, half, data, device, warmup16, args.steps, *variants[args.long_variant], torch.float16)  # fmt: skip
            if device == "cuda" and args.fp16_probe:
                for scale in args.fp16_probe:
                    fp16_overflow(cfg, half, data[0], device, scale)
            del half
        for seq in longs if "long" in rows_kind else []:
            cap = float(caps.get(size, 0)) or None
            if device == "cuda" and cap:
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(cap * GiB / torch.cuda.get_device_properties(0).total_memory)
            data = batches(3, 1, seq, vocab, device)
            try:
                for packing in [False, True] if "packed" in rows_kind else [False]:
                    segments = packed_segments(seq, device) if packing else None
                    name = args.long_variant + (", packed samples" if packing else "")
                    g3n_row(size, f"1 x {seq}", name, cap, cfg, state, data, device, 1, 2, *variants[args.long_variant],
                            torch.bfloat16, segments)  # fmt: skip
            finally:
                if device == "cuda":
                    torch.cuda.set_per_process_memory_fraction(1.0)
        state = None
        gc.collect()
        torch._dynamo.reset()  # compiled code can hold this size's modules (and weights) alive
        if device == "cuda":
            torch.cuda.empty_cache()
            print(f"[bench] after {size}: {torch.cuda.memory_allocated() / GiB:.2f} GiB still allocated", flush=True)
    print(
        "\n| size | work | who | cap GiB | tokens/s | peak GiB | first loss | first step s | finite (skipped; final loss scale) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['work']} | {r['who']} | {r['cap_gib'] or ''} | {r.get('tok_s', r.get('error'))} | "
              f"{r.get('peak_gib', '')} | {r.get('loss', '')} | {r.get('first_step_s', '')} | "
              f"{r.get('finite', '')} ({r.get('skipped', '')}{'; ' + str(r['final_scale']) if 'final_scale' in r else ''}) |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
