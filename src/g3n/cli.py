"""The `g3n` command. Each subcommand parses its options and calls into the package; no logic here."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

from g3n.errors import G3nError
from g3n.inference.options import CompileMode, DecodeOptions

DESCRIPTION = """\
g3n runs, fine-tunes, slices and exports Google's Gemma 3n models on your own hardware.

MODEL (--model) is a local checkpoint directory (config.json, *.safetensors, tokenizer.model),
a Hugging Face id already in your local HF cache (e.g. google/gemma-3n-E4B-it), or `tiny`, the
small model shipped inside the package (the default)."""


SEVERAL_GPUS_HELP = """\
several GPUs or hosts (PyTorch's torchrun; LoRA with DistributedDataParallel, full fine-tuning
sharded with FSDP2, each process on the GPU of its LOCAL_RANK):
  g3n train CONFIG --gpus N                                   (one host: runs torchrun --standalone)
  torchrun --nproc-per-node N -m g3n train CONFIG             (the same, by hand)
  torchrun --nnodes H --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \\
      --rdzv-id RUN -m g3n train CONFIG                       (on every host)
batch_size is per process: the global batch is batch_size x grad_accum x processes, and a run
follows a one-process run of the same global batch. Process 0 writes the outputs; a run resumes on
another number of processes when batch_size x grad_accum x processes stays the same (output_dir on
a filesystem every host sees). G3N_DIST_TIMEOUT (seconds, default 900) bounds how long a process
waits for the others."""


LOAD_IN_4BIT_HELP = (
    "store the decoder layers' attention and MLP weights in 4 bits (NF4, bitsandbytes: pip install 'g3n[qlora]'); "
    "--dtype is then the compute dtype"
)


def _device_arg(text: str) -> str:
    """--device: checked when parsed, as a usage error."""
    from g3n.model.load import parse_device

    try:
        parse_device(text)
    except G3nError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _int_in(low: int, high: int | None = None):
    """An argparse type for integers in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value} is outside {low}..{high}" if high is not None else f"{value} < {low}"
            )
        return value

    return parse


def _parent_dir(path: str) -> str:
    """Create the directory a result file goes to (checked before long work, not after it)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def _expand_home(args, *names) -> None:
    """`~` in path options expanded once, where they enter (the shell leaves `--out=~/x` as it is)."""
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if v.startswith("~") else v for v in value])


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="checkpoint directory, cached HF id, 'tiny' (default; with --adapter: the adapter's base model), "
        "or a .gguf file (run by llama.cpp through llama-cpp-python; --dtype/--device/--matformer do not apply)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and compute dtype (auto: bfloat16 on GPU, float32 on CPU for small models)",
    )
    g.add_argument("--device", type=_device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    g.add_argument("--load-in-4bit", action="store_true", help=LOAD_IN_4BIT_HELP)
    g.add_argument(
        "--context",
        type=_int_in(1),
        default=None,
        metavar="TOKENS",
        help="for a .gguf file: llama.cpp's context, allocated up front (default: 4096 or the model's own "
        "context, whichever is smaller)",
    )
    g.add_argument(
        "--compile",
        default=None,  # None: DecodeOptions' default
        choices=[mode.value for mode in CompileMode],
        help="on a GPU, compile the decode step with torch.compile before it is captured as a CUDA graph: "
        "'layers' compiles each kind of decoder layer, 'step' the whole step as one graph (the longest compile), "
        "'off' runs the model's own layers in the graph. The compile is paid once per machine and shape; later "
        f"runs load it from ~/.cache/g3n/torch-compile (default: {DecodeOptions().compile}; ignored on a CPU)",
    )
    g.add_argument(
        "--ple-on-gpu",
        action="store_true",
        help="keep the per-layer embedding table on the GPU (default: in CPU memory, read by the GPU over the "
        "bus at the same speed; about 3 GiB less GPU memory for E2B, 4.5 GiB for E4B)",
    )
    g.add_argument(
        "--matformer",
        default=None,
        metavar="PLAN",
        help="run a MatFormer sub-model straight from the parent's weights: a built-in plan "
        "(E2B, E1.96B, E2.54B, E4B) or a plan file (.yaml/.csv); see `g3n slice --help`",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults are Google's recommendation for Gemma 3n)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 means greedy (1.0)")
    g.add_argument("--top-k", type=int, default=64, help="keep the k most likely tokens; 0 = off (64)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (0.95)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (0.0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 = off (1.0)")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same output")
    g.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens (256)")


def _add_media_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images and audio (a Gemma3nForConditionalGeneration checkpoint)")
    g.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="an image for the (first) prompt; repeatable"
    )
    g.add_argument(
        "--audio",
        action="append",
        default=[],
        metavar="PATH",
        help="an audio clip (wav, flac, ogg, mp3; at most 30 s) for the (first) prompt; repeatable",
    )


def _user_turn(text: str, images=(), audios=()) -> dict:
    """A user message; media go before the text, as Google's examples place them."""
    if not images and not audios:
        return {"role": "user", "content": text}
    parts = [{"type": "image", "image": p} for p in images] + [{"type": "audio", "audio": p} for p in audios]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _sampling(args):
    from g3n.inference.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        greedy=args.greedy,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )


def _resolve_model(args) -> str:
    """--model, else the base model an --adapter records, else the tiny model (set on args)."""
    if args.model is None:
        args.model = "tiny"
        if getattr(args, "adapter", None):
            from g3n.adapters.lora import adapter_base_model

            args.model = adapter_base_model(args.adapter)
            print(f"[g3n] base model from {args.adapter}/adapter_config.json: {args.model}", file=sys.stderr)
    return args.model


def _load(args):
    """The model for commands that need g3n's own model object (slice search): 16-bit weights."""
    from g3n import load

    if args.load_in_4bit or args.context or args.matformer or args.compile:
        raise G3nError("slice search evaluates plans of the 16-bit parent checkpoint (no decoding): drop "
                       "--load-in-4bit, --context, --matformer and --compile")  # fmt: skip
    start = time.perf_counter()
    model, tok = load(_resolve_model(args), dtype=args.dtype, device=args.device)
    print(
        f"[g3n] loaded {args.model} ({model.config.num_hidden_layers} layers, {model.dtype}, {model.device})"
        f" in {time.perf_counter() - start:.1f}s",
        file=sys.stderr,
    )
    return model, tok


def _print_stream(pieces) -> str:
    out = []
    for piece in pieces:
        out.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(out)


def _engine(args, modalities=None, **kw):
    """g3n's engine for a checkpoint, llama.cpp for a .gguf file (inference/backends.py), decoding
    as --compile says; towers for the media given on the command line (chat loads others when
    /image or /audio first asks)."""
    from g3n.inference.backends import load_engine

    kinds = [k for k in ("image", "audio") if getattr(args, k, None)] if modalities is None else modalities
    options = None if args.compile is None else DecodeOptions(compile=args.compile)  # None: the defaults
    return load_engine(_resolve_model(args), dtype=args.dtype, device=args.device, matformer=args.matformer,
                       modalities=kinds, load_in_4bit=args.load_in_4bit, context=args.context, options=options,
                       ple_on_gpu=args.ple_on_gpu, **kw)  # fmt: skip


def cmd_generate(args) -> int:
    params = _sampling(args)
    if args.raw and (args.image or args.audio or args.system):
        raise G3nError("--raw continues plain text; a system prompt, images and audio need the chat format "
                       "(drop --raw)")  # fmt: skip
    engine = _engine(args, adapter=args.adapter, max_batch=1)
    media = None
    if args.raw:
        ids = engine.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            _user_turn(args.prompt, args.image, args.audio)
        ]
        ids, media = engine.prepare(messages)
    _print_stream(engine.stream(ids, params, media))
    return 0


CHAT_HELP = (
    "commands: /image PATH, /audio PATH (attach to your next message), /reset (forget the conversation), "
    "/system TEXT (set a system prompt), /quit, /help"
)


class _StopOnInterrupt:
    """Ctrl-C during a reply ends the reply after the token being made (the engine is never left
    mid-step), and the chat goes on; a second Ctrl-C interrupts at once."""

    def __enter__(self):
        import signal

        self.hit, self.previous = False, None
        with contextlib.suppress(ValueError):  # not the main thread: Ctrl-C keeps its default
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def until_hit(self, pieces):
        try:
            for piece in pieces:
                yield piece
                if self.hit:
                    return
        finally:
            if hasattr(pieces, "close"):
                pieces.close()  # the engine drops the row


def _chat_reply(engine, ids, params, media) -> tuple[str, bool]:
    """The reply streamed to the terminal, and whether Ctrl-C stopped it."""
    sys.stdout.write("model> ")
    with _StopOnInterrupt() as stop:
        try:
            reply = _print_stream(stop.until_hit(engine.stream(ids, params, media)))
        except KeyboardInterrupt:  # the second Ctrl-C
            reply, stop.hit = "", True
            sys.stdout.write("\n")
    return reply, stop.hit


def _chat_lines(interactive: bool):
    """The chat's input lines; one that is not valid UTF-8 is reported and skipped."""
    from g3n.tokenizer import check_text

    if sys.stdin is None:
        raise G3nError("g3n chat reads its messages from stdin, which is closed")
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become lone surrogates: check_text names them
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return
        try:
            yield check_text(line, "your message")
        except G3nError as e:
            print(f"g3n: {e}", file=sys.stderr)


def cmd_chat(args) -> int:
    _expand_home(args, "model", "adapter", "matformer", "image", "audio")
    params = _sampling(args)
    engine = _engine(args, adapter=args.adapter, max_batch=1)
    system = args.system
    history: list[dict] = []
    pending = {"image": list(args.image), "audio": list(args.audio)}  # for the next user message
    interactive = sys.stdin is not None and sys.stdin.isatty()
    print(f"[g3n] chatting with {args.model}. {CHAT_HELP}", file=sys.stderr)
    for line in _chat_lines(interactive):
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit", "/q"):
            break
        if text == "/help":
            print(CHAT_HELP)
            continue
        if text == "/reset":
            history.clear()
            print("[conversation reset]")
            continue
        if text.startswith("/system"):
            system = text[len("/system") :].strip() or None
            history.clear()
            print("[system prompt set, conversation reset]" if system else "[system prompt cleared]")
            continue
        command, _, rest = text.partition(" ")
        if command in ("/image", "/audio"):
            if not rest.strip():
                print(f"usage: {command} PATH")
                continue
            pending[command[1:]].append(rest.strip())
            print(f"[{command[1:]} {rest.strip()} will go with your next message]")
            continue
        if text.startswith("/"):
            print(f"unknown command {command!r}; {CHAT_HELP}")
            continue
        history.append(_user_turn(text, pending["image"], pending["audio"]))
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            ids, media = engine.prepare(messages)
        except G3nError as e:  # a bad attachment: say so, drop it, keep the conversation
            print(f"g3n: {e}", file=sys.stderr)
            history.pop()
            pending = {"image": [], "audio": []}
            continue
        pending = {"image": [], "audio": []}
        try:
            reply, stopped = _chat_reply(engine, ids, params, media)
        except G3nError as e:  # e.g. no longer fits the context: drop this message, keep the chat
            print(f"\ng3n: {e} (message dropped; /reset starts a new conversation)", file=sys.stderr)
            history.pop()
            continue
        if stopped:
            print("[reply stopped" + ("; the part shown is kept]" if reply else "; message dropped]"), file=sys.stderr)
            if not reply:
                history.pop()
                continue
        history.append({"role": "assistant", "content": reply})
    return 0


SERVE_HELP = """\
Serve a model over HTTP with OpenAI's chat-completions API, plus a chat page at / .

  POST /v1/chat/completions   messages (text, and image_url / input_audio parts for a multimodal
                              checkpoint, whose towers are loaded at start unless --text-only),
                              stream, temperature, top_p, max_tokens, stop, seed (+ top_k, min_p,
                              repetition_penalty); Google's sampling defaults when not given
  POST /v1/completions        raw prompts (text or token ids, batches), echo, logprobs (the prompt's
                              too: lm-eval's loglikelihood requests), the same sampling fields
  GET  /v1/models             the one loaded model (its id is what requests name as "model")
  GET  /metrics               Prometheus metrics (requests, tokens, queue, latencies)
  GET  /health                status and queue (no API key needed)
  GET  /                      a small chat page (streaming, image/audio upload)

Requests are generated together, up to --max-batch (a GGUF file runs one at a time): a request that
arrives while others generate joins them at the next step, and one that ends frees its place at once
(continuous batching); later ones wait in a queue of --max-queue and get 429 past it. A request's seed gives the
same reply whether it ran alone or batched. POSTs must be application/json, and the Host header an IP
address, localhost or an --allowed-host name (against cross-site use from web pages; browser apps on
other origins need --cors-origin; docs/serve.md, Security). Any OpenAI client works, e.g. with Python's:
  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything").chat.completions.create(...)"""


def cmd_serve(args) -> int:
    try:
        from g3n.serve import Limits, run_server
    except ImportError as e:
        raise G3nError(f"g3n serve needs the serve extra ({e.name} is missing): pip install 'g3n[serve]'") from None
    api_key = args.api_key if args.api_key is not None else os.environ.get("G3N_API_KEY")
    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        where = "--api-key" if args.api_key is not None else "$G3N_API_KEY"
        raise G3nError(f"{where} is empty or starts or ends with whitespace (an empty key would serve without one): "
                       "give a real key, or none at all")  # fmt: skip
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"[g3n] warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)  # fmt: skip
    limits = Limits(max_queue=args.max_queue, max_batch=args.max_batch, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens, max_body_bytes=int(args.max_body_mb * 2**20),
                    max_connections=args.max_connections, batching=args.batching)  # fmt: skip
    modalities = () if args.text_only else "all"  # every tower the checkpoint has, loaded now
    args.adapter, served = _serve_adapters(args.adapter)
    if args.model is None and args.adapter is None and served:  # the base model the first one records
        from g3n.adapters.lora import adapter_base_model

        args.model = adapter_base_model(served[0][1])
    engine = _engine(args, modalities, adapter=args.adapter, max_batch=args.max_batch, lazy_towers=False)
    for name, path in served:
        if not hasattr(engine, "add_adapter"):
            raise G3nError("--adapter NAME=DIR needs g3n's engine (an HF checkpoint); a GGUF file runs as it is")
        engine.add_adapter(name, path)
        print(f"[g3n] serving adapter {path} as model '{name}'", file=sys.stderr)
    print(f"[g3n] serving {engine.name} on http://{args.host}:{args.port} (chat page at /, API at /v1)",
          file=sys.stderr)  # fmt: skip
    run_server(engine, args.host, args.port, limits, api_key, args.log_level, args.allowed_host, args.cors_origin)
    return 0


def _serve_adapters(values: list[str] | None) -> tuple[str | None, list[tuple[str, str]]]:
    """serve's --adapter values: (the one DIR merged at load or None, [(NAME, DIR) served per row])."""
    merged, served = [], []
    for value in values or []:
        name, sep, path = value.partition("=")
        if sep and name and path and "/" not in name and not Path(value).exists():
            served.append((name, str(Path(path).expanduser())))
        else:
            merged.append(str(Path(value).expanduser()))
    if len(merged) > 1:
        raise G3nError("--adapter DIR (merged into the model at load) takes one directory; serve several beside "
                       "the model as --adapter NAME=DIR")  # fmt: skip
    names = [n for n, _ in served]
    if len(set(names)) < len(names):
        raise G3nError(f"--adapter names must differ: {', '.join(names)}")
    return (merged[0] if merged else None), served


def cmd_demo(args) -> int:
    from g3n.demo import run_demo

    start = time.perf_counter()
    run_demo(args.model, device=args.device, seed=args.seed, out=args.out)
    print(f"\n[g3n] demo finished in {time.perf_counter() - start:.0f} s")
    return 0


SLICE_HELP = """\
Write a MatFormer sub-model of a Gemma 3n checkpoint (normally E4B) as a plain HF checkpoint.

PLAN is a built-in name or a plan file:
  E2B      FFN 8192 (half of E4B's) everywhere, layers 20-24 skipped   (Google's E2B, 1.91 B effective)
  E1.96B   as E2B with layer 4 at full width
  E2.54B   35 layers: layers 4 and 20-24 at full width, the rest at half
  E4B      the parent unchanged
  plan.yaml:  ffn_widths: [8192, 16384, ...]  (one per parent layer, or one number for all)
              skip_layers: [20, 21, 22, 23, 24]
  plan.csv:   layer,ffn_width   (one row per parent layer; width 0 or 'skip' skips the layer)

The output keeps the parent's tokenizer, towers and other files; config.json gets the new
num_hidden_layers, intermediate_size list, num_kv_shared_layers, layer_types and sparsity pattern;
the per-layer embedding table and its projection keep only the kept layers. Tensors are streamed
in chunks, so memory stays far below the model's size."""


def format_params(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def cmd_slice(args) -> int:
    import resource

    from g3n.matformer.slicer import slice_checkpoint

    if not args.model or not args.plan or not args.out:
        raise G3nError("g3n slice needs --model, --plan and --out (see g3n slice --help)")
    _expand_home(args, "model", "plan", "out")
    start = time.perf_counter()

    def progress(done, total, name):
        print(f"[g3n] shard {min(done + 1, total)}/{total}: {name}", file=sys.stderr, flush=True)

    result = slice_checkpoint(args.model, args.plan, args.out, overwrite=args.overwrite, progress=progress)
    cfg = result.config
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {result.out_dir} in {time.perf_counter() - start:.1f}s (peak memory {peak:.2f} GiB)")
    print(f"plan {result.plan.name}: {cfg.num_hidden_layers} layers ({cfg.num_kv_shared_layers} KV-shared), "
          f"FFN widths {sorted(set(cfg.intermediate_size))}, skipped {result.plan.skip_layers or 'none'}")  # fmt: skip
    print(f"effective parameters: {format_params(result.effective_params)} (without embeddings and towers)")
    for w in result.warnings:
        print(f"warning: llama.cpp cannot run this model ({w}); GGUF export will be refused", file=sys.stderr)
    return 0


def cmd_slice_search(args) -> int:
    from g3n.matformer.plan import save_plan
    from g3n.matformer.search import parse_budget, plot, read_calibration, search

    _expand_home(args, "model", "data")
    budget = parse_budget(args.budget)
    model, tok = _load(args)
    seqs = read_calibration(args.data, tok, args.max_tokens, args.max_length)
    print(f"[g3n] {sum(map(len, seqs))} calibration tokens in {len(seqs)} sequences", file=sys.stderr)

    def progress(done, total, name):
        print(f"[g3n] candidate {done}/{total}: {name}", file=sys.stderr, flush=True)

    cands = search(model, seqs, budget, progress)
    print(f"{'plan':32} {'layers':>6} {'effective':>12} {'perplexity':>11}")
    for c in sorted(cands, key=lambda c: c.effective_params):
        ppl = f"{c.perplexity:11.3f}" if c.perplexity is not None else "over budget"
        print(f"{c.plan.name:32} {len(c.plan.kept_layers):6d} {format_params(c.effective_params):>12} {ppl:>11}")
    best = cands[0]
    save_plan(best.plan, args.plan_out)
    plot(cands, budget, args.plot)
    print(f"best under {format_params(budget)}: {best.plan.name} ({format_params(best.effective_params)}, "
          f"perplexity {best.perplexity:.3f}); plan written to {args.plan_out}, plot to {args.plot}")  # fmt: skip
    return 0


def cmd_train(args) -> int:
    from g3n.train.config import load_train_config
    from g3n.train.distributed import launched
    from g3n.train.loop import train

    if args.gpus is not None:
        if launched():
            raise G3nError("--gpus: this process already runs under torchrun; leave --gpus out")
        return _launch_torchrun(args)
    _expand_home(args, "config")
    cfg = load_train_config(args.config, (args.set or []) + ["load_in_4bit=true"] * args.load_in_4bit)
    history = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":
        return 0  # process 0 reports
    last = history[-1] if history else {}
    evals = [h for h in history if "eval_loss" in h]
    print(f"done: step {last.get('step')}, train loss {last.get('loss')}", end="")
    if evals:
        print(f", eval loss {evals[0]['eval_loss']} -> {evals[-1]['eval_loss']}", end="")
    model = f"; model in {os.path.join(cfg.output_dir, 'merged')}" if cfg.writes_model else ""
    print(f"; outputs in {cfg.output_dir}{model}")
    return 0


def cmd_inspect(args) -> int:
    from g3n.checkpoint.inspect import inspect_checkpoint

    out = args.plot
    if out is None:
        from g3n.checkpoint.names import resolve_model_dir

        out = f"{resolve_model_dir(args.model).name}-absmax.png"
    inspect_checkpoint(args.model, None if args.no_plot else out, limit=None if args.all else args.top)
    return 0


def _launch_torchrun(args) -> int:
    """`g3n train --gpus N`: the same command under torchrun, one process per GPU of this host."""
    import subprocess

    import torch

    visible = torch.cuda.device_count()
    if args.gpus < 1 or args.gpus > visible:
        raise G3nError(
            f"--gpus {args.gpus}: {visible} GPU(s) visible on this host"
            + (" (CUDA_VISIBLE_DEVICES selects which)" if visible else "; train on the CPU without --gpus")
        )
    argv = [args.config] if args.config else []
    for item in args.set or []:
        argv += ["--set", item]
    argv += ["--resume"] * args.resume + ["--overwrite"] * args.overwrite + ["--load-in-4bit"] * args.load_in_4bit
    if args.gpus == 1:
        return main(["train", *argv])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}"]
    print(f"[g3n] torchrun {' '.join(launcher[3:])} -m g3n train {' '.join(argv)}", flush=True)
    return subprocess.call([*launcher, "-m", "g3n", "train", *argv])


def cmd_export(args) -> int:
    _expand_home(args, "model", "adapter", "out")
    start = time.perf_counter()
    if args.format == "hf" and args.quant is not None:
        raise G3nError(f"--quant {args.quant} is for --format gguf/ollama; an HF export's weight type is --dtype")
    if args.format != "hf" and args.dtype is not None:
        raise G3nError(f"--dtype {args.dtype} is for --format hf; a GGUF's weight type is --quant (e.g. --quant f32)")
    if args.format == "hf" and args.mmproj is not None:
        raise G3nError("--mmproj/--no-mmproj are for --format gguf/ollama; an HF export keeps the towers")
    model = _resolve_model(args)
    if args.format == "hf":
        from g3n.export.hf import export_hf

        detail = args.dtype or "bfloat16"
        out = export_hf(model, args.out, adapter=args.adapter, dtype=detail, overwrite=args.overwrite)
    else:
        from g3n.export.gguf import export_gguf
        from g3n.export.mmproj import export_mmproj, mmproj_type, plan_mmproj
        from g3n.export.ollama import modelfile_path, write_modelfile

        detail = args.quant or "f16"
        # every output checked before anything is written
        projector = plan_mmproj(model, args.out, args.mmproj, args.adapter, args.overwrite)
        if args.format == "ollama":
            modelfile_path(Path(args.out), overwrite=args.overwrite)
        out = export_gguf(model, args.out, adapter=args.adapter, quant=detail, overwrite=args.overwrite)
        if projector is not None:
            export_mmproj(model, projector, adapter=args.adapter, quant=mmproj_type(detail), overwrite=args.overwrite)
            print(f"[g3n] wrote the vision projector {projector} ({mmproj_type(detail)}; llama.cpp: --mmproj)")
        if args.format == "ollama":
            modelfile = write_modelfile(out, overwrite=args.overwrite, projector=projector)
            print(f"[g3n] wrote {modelfile}; run: ollama create NAME -f {modelfile}")
    what = f"{model} + adapter {args.adapter}" if args.adapter else model
    print(f"[g3n] exported {what} to {out} ({args.format}, {detail}) in {time.perf_counter() - start:.1f} s")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a reply to one prompt, streamed to the terminal",
        description="Generate a reply to one prompt (formatted as a chat user turn unless --raw) "
        "and stream it to the terminal. Stops at <end_of_turn>, eos, or --max-new-tokens.",
    )
    _add_model_args(p)
    _add_adapter_arg(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--system", default=None, help="a system prompt (folded into the user turn)")
    p.add_argument("--raw", action="store_true", help="continue the prompt as plain text, no chat template")
    _add_media_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)


def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="interactive multi-turn chat",
        description="Interactive multi-turn chat that keeps the conversation. " + CHAT_HELP + ". "
        "Reads stdin, so a file of lines can be piped in.",
    )
    _add_model_args(p)
    _add_adapter_arg(p)
    p.add_argument("--system", default=None, help="a system prompt for the conversation")
    _add_media_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)


def _add_train(sub) -> None:
    from g3n.train.config import settings_help

    p = sub.add_parser(
        "train",
        help="fine-tune (LoRA or full) on chat data",
        description="Fine-tune a model on chat datasets. CONFIG is a YAML file of settings; --set "
        "key=value overrides any of them. A run writes checkpoints (resumable with --resume), "
        "metrics.jsonl, loss.png and, for LoRA, a PEFT adapter into output_dir; one run at a time writes there "
        "(another is refused, naming the process that holds it in output_dir/.g3n-lock).\n\n"
        + SEVERAL_GPUS_HELP
        + "\n\nsettings:\n"
        + settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML file of settings (optional with --set)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in output_dir: only a directory that is empty or holds nothing but a run's "
        "own files (train_config.json, latest.json, metrics.jsonl, loss.png, checkpoint-N, adapter, merged); "
        "anything else there is refused, never deleted",
    )
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: the same as --set load_in_4bit=true")
    p.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="train on N GPUs of this host: runs this command under torchrun (--standalone, N processes); "
        "LoRA with DistributedDataParallel, full fine-tuning sharded with FSDP2",
    )
    p.set_defaults(func=cmd_train)


def _add_export(sub) -> None:
    from g3n.export.gguf import QUANTS

    p = sub.add_parser(
        "export",
        help="write a model (with a LoRA adapter merged in) as an HF checkpoint, GGUF or Ollama model",
        description="Export a model for other tools; with --adapter, a PEFT LoRA adapter (e.g. "
        "runs/NAME/adapter from g3n train) is merged in first.\n"
        "  --format hf      an HF checkpoint directory (config.json, model.safetensors, tokenizer files) "
        "of the whole model (towers too, for a multimodal checkpoint), for transformers and g3n\n"
        f"  --format gguf    one GGUF file for llama.cpp (--quant {', '.join(QUANTS)})\n"
        "  --format ollama  the GGUF plus a Modelfile beside it (Gemma's template, <end_of_turn> stop, "
        "Google's sampling defaults)\n"
        "For a multimodal checkpoint, gguf and ollama also write the vision projector mmproj-NAME.gguf beside the "
        "model (llama.cpp's --mmproj; the Modelfile uses both), tower adapters merged; --no-mmproj skips it. "
        "llama.cpp does not run Gemma 3n audio.\n"
        "Outputs appear complete or not at all.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None,
                   help="base model: checkpoint directory, cached HF id, or 'tiny' (default: with --adapter, the base "
                   "its adapter_config.json records; else 'tiny')")  # fmt: skip
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to merge in")
    p.add_argument("--out", required=True, help="output directory (hf) or .gguf file (gguf, ollama); "
                   "missing parent directories are created")  # fmt: skip
    p.add_argument("--format", default="hf", choices=["hf", "gguf", "ollama"], help="hf (default), gguf or ollama")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="hf only: dtype of the written weights (default bfloat16)")  # fmt: skip
    p.add_argument("--quant", default=None, type=str.lower, choices=QUANTS, metavar="QUANT",
                   help=f"gguf/ollama only: {', '.join(QUANTS)} (default f16; q4_0..q6_k through llama.cpp's "
                   "quantizer; dynamic: llama.cpp's Q5_K_M with the token table at Q8_0, the per-layer table "
                   "and every attn_v/ffn_down at Q6_K: more accurate than q4_k_m at about 1.1x its size)")  # fmt: skip
    p.add_argument("--mmproj", action=argparse.BooleanOptionalAction, default=None,
                   help="gguf/ollama only: write the vision projector mmproj-NAME.gguf beside the GGUF (default: for "
                   "multimodal checkpoints; --mmproj makes a text-only checkpoint an error, --no-mmproj skips it); "
                   "f16, or f32 with --quant f32")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export at --out (never a directory with other files, the model or the "
                   "adapter)")  # fmt: skip
    p.set_defaults(func=cmd_export)


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="weights' abs max per tensor group vs float16's range, with a plot",
        description="Read every tensor of a checkpoint once (one at a time) and report, per tensor group "
        "(layer numbers folded), the abs max, the headroom to float16's 65504, and a worst case for the sums "
        "the weight enters (abs max x fan-in); groups past 65504 are flagged as float16 overflow risks. "
        "Saves a PNG of abs max per layer/block. This is how the vision tower's Conv2D problem shows.",
    )
    p.add_argument("--model", default="tiny", help="checkpoint directory, cached HF id or 'tiny'")
    p.add_argument("--plot", type=_parent_dir, default=None, metavar="PNG",
                   help="where to save the plot (default: NAME-absmax.png)")  # fmt: skip
    p.add_argument("--no-plot", action="store_true", help="only print the table")
    p.add_argument("--top", type=int, default=25, help="show the N groups with the largest weights (and all flagged)")
    p.add_argument("--all", action="store_true", help="show every group")
    p.set_defaults(func=cmd_inspect)


def _add_slice(sub) -> None:
    """`g3n slice` writes a sub-model; its `search` subcommand finds which one to write."""
    p = sub.add_parser(
        "slice",
        help="cut a MatFormer sub-model (E2B, custom) out of E4B",
        description=SLICE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="the parent checkpoint (directory or cached HF id)")
    p.add_argument("--plan", help="built-in plan name or plan file (.yaml/.csv)")
    p.add_argument("--out", help="output directory for the sub-model checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_slice)
    _add_slice_search(p.add_subparsers(dest="slice_command", metavar="search"))


def _add_slice_search(slice_sub) -> None:
    s = slice_sub.add_parser(
        "search",
        help="find the best slice under a parameter budget",
        description="Evaluate candidate MatFormer plans (Google's published ones and generated ones: "
        "uniform FFN widths, wide sparse layers, skipped KV-shared blocks) by perplexity on calibration "
        "data; print a table of effective parameters vs perplexity, save a Pareto plot, and write the "
        "best plan under the budget as a plan file for `g3n slice --plan`.",
    )
    _add_model_args(s)
    s.add_argument("--budget", required=True, help="effective parameters allowed, e.g. 2B, 900M, 1.5e9")
    s.add_argument("--data", required=True, help='calibration JSONL: {"text": ...} or {"messages": [...]} per line')
    s.add_argument("--max-tokens", type=_int_in(1), default=20000, help="calibration tokens to use (20000)")
    s.add_argument("--max-length", type=_int_in(2), default=1024, help="tokens per calibration sequence (1024)")
    s.add_argument("--plan-out", type=_parent_dir, default="best_plan.yaml",
                   help="where to write the best plan (best_plan.yaml)")  # fmt: skip
    s.add_argument("--plot", type=_parent_dir, default="matformer_pareto.png",
                   help="where to save the Pareto plot (PNG)")  # fmt: skip
    s.set_defaults(func=cmd_slice_search)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server and chat page",
        description=SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                   help="a PEFT LoRA adapter directory (e.g. runs/NAME/adapter from g3n train): DIR is merged into "
                   "the model at load; NAME=DIR is served beside it, unmerged, as the model id NAME (requests pick "
                   "it with \"model\": \"NAME\"; rows of different adapters share each step); repeatable")  # fmt: skip
    p.add_argument("--text-only", action="store_true",
                   help="do not load a multimodal checkpoint's vision/audio towers (less memory; images and "
                   "audio then get a 400)")  # fmt: skip
    _add_server_args(p)
    p.set_defaults(func=cmd_serve)


def _add_adapter_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None,
                   help="a PEFT LoRA adapter directory (e.g. runs/NAME/adapter from g3n train), merged in at load "
                   "(with --load-in-4bit: run beside the 4-bit weights, unmerged); without --model, its base model")  # fmt: skip


def _nonempty(what: str):
    """An argparse type for a string that must not be empty or blank."""

    def parse(text: str) -> str:
        if not text.strip() or text != text.strip():
            raise argparse.ArgumentTypeError(f"{what} must not be empty or start or end with whitespace")
        return text

    return parse


def _megabytes(text: str) -> float:
    """--max-body-mb: a finite size > 0 (NaN, inf and negatives would refuse or crash every request)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0 or value * 2**20 < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a size in MiB > 0")
    return value


def _add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", type=_nonempty("the host"), default="127.0.0.1",
                   help="address to listen on (127.0.0.1: this machine only)")  # fmt: skip
    g.add_argument("--port", type=_int_in(0, 65535), default=8000, help="port (8000)")
    g.add_argument("--api-key", type=_nonempty("the API key"), default=None,
                   help="require this key (Authorization: Bearer KEY) on every route but /health; "
                   "also read from $G3N_API_KEY. The chat page asks for it as a password")  # fmt: skip
    g.add_argument("--allowed-host", action="append", default=[], metavar="NAME", type=_nonempty("a host name"),
                   help="a host name clients may reach the server by, besides IP addresses, localhost and --host "
                   "(the Host header; others get 421, against DNS rebinding); repeatable; '*' allows any")  # fmt: skip
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN", type=_nonempty("an origin"),
                   help="a browser app's origin (https://app.example.com) allowed to call the API across origins "
                   "(CORS); repeatable; '*' allows any page; none by default")  # fmt: skip
    g.add_argument("--max-batch", type=_int_in(1), default=8, help="requests generated together (8)")
    g.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                   help="continuous (default): requests join and leave the running batch at every step; "
                   "static: a batch runs to its end before waiting requests start (for comparison)")  # fmt: skip
    g.add_argument("--max-queue", type=_int_in(1), default=32, help="requests that may wait; more get 429 (32)")
    g.add_argument("--max-connections", type=_int_in(1), default=256,
                   help="open connections; past it requests get 503 (256)")  # fmt: skip
    g.add_argument("--max-prompt-tokens", type=_int_in(1), default=None,
                   help="longest prompt accepted (default: the model's context minus one)")  # fmt: skip
    g.add_argument("--max-tokens", type=_int_in(1), default=1024,
                   help="new tokens per reply when a request sets no max_tokens (1024)")  # fmt: skip
    g.add_argument("--max-body-mb", type=_megabytes, default=20,
                   help="largest request body in MiB, media included (20)")  # fmt: skip
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info)")  # fmt: skip


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole path on the tiny model: chat, fine-tune, export, run the export",
        description="Run g3n's main job on a model (the tiny one by default; about a minute on a CPU): "
        "chat with Google's sampling defaults; a LoRA fine-tune on a bundled dataset (new facts plus "
        "replayed known ones) with a progress bar; the held-out loss before and after; the taught "
        "questions before and after; an export of the merged model as an HF checkpoint, loaded back "
        "and checked against the fine-tuned model.",
    )
    p.add_argument("--model", default="tiny", help="checkpoint directory, cached HF id, or 'tiny' (default)")
    p.add_argument("--device", type=_device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--out", default=None, help="keep the run and the export in this directory (default: a temp dir)")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    from g3n import __version__

    parser = argparse.ArgumentParser(
        prog="g3n", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"g3n {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # in the order `g3n --help` lists them
    for add in (_add_generate, _add_chat, _add_train, _add_export, _add_inspect, _add_slice, _add_serve, _add_demo):
        add(sub)
    return parser


def _print_error(e: G3nError) -> None:
    """Under torchrun, an error every process raised alike is printed once per host; others name
    the process."""
    rank = os.environ.get("RANK", "0")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and getattr(e, "all_ranks", False):
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"g3n: error: {e}", file=sys.stderr)
        return
    print(f"g3n: error{f' (process {rank})' if rank != '0' else ''}: {e}", file=sys.stderr)


def _closed_streams_to_devnull() -> None:
    """A closed stdout/stderr (`>&-`): Python leaves None there, which print skips but write does not."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (for the process's life)


def _os_error(e: OSError) -> G3nError | None:
    """The file-system problems a user fixes (permissions, space) as one line naming the file."""
    import errno

    if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return None
    where = f"{e.filename}: " if e.filename else ""
    return G3nError(f"{where}{e.strerror or e}")


def main(argv: list[str] | None = None) -> int:
    _closed_streams_to_devnull()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except G3nError as e:
        _print_error(e)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except OSError as e:
        error = _os_error(e)
        if error is None:
            raise
        _print_error(error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
