"""Build the tiny model shipped in src/g3n/assets/tiny/, and `g3n demo`'s fine-tuning data.

    python scripts/build_tiny.py --device cuda [--steps 6000] [--out src/g3n/assets/tiny]

1. Writes the corpus (scripts/tiny_corpus.py): facts about a hundred countries (capitals,
   continents, languages), colors, animal sounds, opposites, weekdays, arithmetic, greetings and
   made-up names to copy, each fact in several phrasings; some facts, phrasings and sums held out.
2. Trains a SentencePiece vocabulary on it (every name a whole piece) with Gemma's special tokens at
   Gemma's ids (pad 0, eos 1, bos 2, unk 3, mask 4, <start_of_turn> 105, <end_of_turn> 106, "\\n" 107).
3. Trains a Gemma 3n-architecture model with g3n's own decoder, loss on model turns only, MatFormer
   style: each step runs every layer's FFN at a nested width (its first 1, 1/2 or 1/4 of the units),
   so that sub-models sliced out of it (`g3n slice`) still answer. Its shape stays inside
   llama.cpp's hard-coded Gemma 3n limits: 20 KV-computing layers plus 5 KV-shared ones, laurel
   rank 64, PLE width 256, 4 AltUp streams, sparsity on layers 0-9. The per-layer embedding table
   covers the first 512 ids only (as Gemma 3n's covers its text ids only), which keeps the file small.
4. Measures the model on what it never saw (held-out phrasings and sums, made-up names, the
   half-width sub-model), runs `g3n demo`'s fine-tune on it and reports taught/kept, and saves an HF
   checkpoint (bfloat16 safetensors, config.json, tokenizer files) and the demo's data files.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

import tiny_corpus as tc

from g3n.checkpoint.atomic import write_atomic
from g3n.checkpoint.save import save_text_checkpoint
from g3n.config import TextConfig
from g3n.model.load import load_model
from g3n.model.text import Gemma3nForCausalLM
from g3n.tokenizer import CHAT_TEMPLATE, Tokenizer
from g3n.train.data import tokenize

SPECIALS = ["<mask>", "[multimodal]"] + [f"<unused{i}>" for i in range(99)] + ["<start_of_turn>", "<end_of_turn>"]
PLE_VOCAB = 512
WIDTHS = (1.0, 0.5, 0.25)


def train_tokenizer(corpus: tc.Corpus, vocab: int, out_dir: Path) -> Path:
    """BPE over every question and answer the corpus can hold (held-out ones too: the names must be
    whole pieces whether or not their facts are taught)."""
    lines = [f"{q}\n{a}" for q, a in corpus.train + corpus.unseen_phrasing + corpus.unseen_combination]
    lines += [
        f"{p.format(x=c)}\n{tc.CAPITAL_A.format(x=c, y=tc.COUNTRIES[c][0])}" for c in tc.TAUGHT for p in tc.CAPITAL_QS
    ]
    lines += ["user", "model"] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab,
        hard_vocab_limit=False,
        model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=SPECIALS + ["\n", "\n\n"],
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        minloglevel=2,
    )  # fmt: skip
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def tiny_config(vocab: int, ffn: int) -> TextConfig:
    return TextConfig(
        vocab_size=vocab,
        vocab_size_per_layer_input=PLE_VOCAB,
        hidden_size=128,
        hidden_size_per_layer_input=256,
        intermediate_size=[ffn] * 25,
        num_hidden_layers=25,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        sliding_window=128,
        num_kv_shared_layers=5,
        laurel_rank=64,
        altup_num_inputs=4,
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * 15,
        max_position_embeddings=2048,
        eos_token_id=[1, 106],
        torch_dtype="bfloat16",
    )


def init_weights(model: Gemma3nForCausalLM, seed: int) -> None:
    """transformers' initialisation: normal(0.02), norms 1, AltUp output scale 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "correct_output_scale" in name:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def transplant(model: Gemma3nForCausalLM, tok: Tokenizer, src: Path) -> None:
    """Start from an earlier build with another vocabulary and narrower FFNs: its layers as they are,
    its FFN units as the first units of the wider FFNs (the new units start with zero output), and
    each piece's embedding and per-layer row the mean of the earlier model's rows for the pieces its
    text has there (specials and byte pieces share ids in both vocabularies)."""
    old = load_model(src, dtype=torch.float32, device="cpu")
    old_tok = Tokenizer.from_dir(src)
    old_sd, shared = old.state_dict(), 109 + 256  # specials and "\n" pieces, then the 256 byte pieces
    with torch.no_grad():
        for name, p in model.state_dict().items():
            o = old_sd[name]
            if name.endswith(("embed_tokens.weight", "embed_tokens_per_layer.weight")):
                p[:shared] = o[:shared]
                for i in range(shared, p.shape[0]):
                    ids = old_tok.encode(tok.sp.id_to_piece(i).replace("\u2581", " "), add_bos=False)
                    p[i] = o[[j for j in ids if j < o.shape[0]] or [3]].mean(0)
            elif o.shape == p.shape:
                p.copy_(o)
            elif name.endswith(("gate_proj.weight", "up_proj.weight")):
                p[: o.shape[0]] = o
            elif name.endswith("down_proj.weight"):
                p.zero_()
                p[:, : o.shape[1]] = o
            else:
                raise ValueError(f"{name}: {tuple(o.shape)} in {src}, {tuple(p.shape)} here")


# ---- MatFormer: every FFN runs its first `width` units ------------------------------------------
def _nested_mlp_forward(self, x):
    """The FFN on its first units only (`self.keep`: 1 for those, 0 past them), the sparse layers'
    statistics taken over those units: what the sliced FFN computes. The units past them are masked,
    not sliced, so that every width has one shape and a compiled step never recompiles for one."""
    keep = self.keep
    gate = F.linear(x, self.gate_proj.weight)
    up = F.linear(x, self.up_proj.weight)
    if self.std_multiplier is not None:
        g, n = gate.float(), keep.sum()
        mean = (g * keep).sum(-1, keepdim=True) / n
        std = (((g - mean) * keep).square().sum(-1, keepdim=True) / n).sqrt()
        gate = F.relu(g - (mean + std * self.std_multiplier)).to(gate.dtype)
    return F.linear(self.act(gate) * up * keep.to(up.dtype), self.down_proj.weight)


def make_nested(model) -> list:
    mlps = [layer.mlp for layer in model.model.layers]
    for mlp in mlps:
        units = mlp.gate_proj.out_features
        mlp.register_buffer("keep", torch.ones(units, device=mlp.gate_proj.weight.device), persistent=False)
        mlp.forward = types.MethodType(_nested_mlp_forward, mlp)
    return mlps


def set_widths(mlps, fractions) -> None:
    for mlp, f in zip(mlps, fractions):
        units = mlp.keep.numel()
        width = max(1, round(f * units))
        mlp.keep.copy_(torch.arange(units, device=mlp.keep.device) < width)


def sample_widths(rng: random.Random, n: int) -> list[float]:
    """Mostly the whole model, often one nested width everywhere, sometimes a per-layer mix."""
    r = rng.random()
    if r < 0.4:
        return [1.0] * n
    if r < 0.6:
        return [0.5] * n
    if r < 0.7:
        return [0.25] * n
    return [rng.choice(WIDTHS) for _ in range(n)]


# ---- data ---------------------------------------------------------------------------------------
def conversations(pairs, rng: random.Random, multi_share: float = 0.25) -> list[list[tuple[str, str]]]:
    """Every pair as a one-turn chat, plus multi-turn chats of random pairs (so chat sessions work)."""
    return [[p] for p in pairs] + [rng.sample(pairs, rng.randint(2, 4)) for _ in range(int(len(pairs) * multi_share))]


def encode_examples(tok: Tokenizer, convs):
    """(ids, labels): loss on the model turns only, as g3n's fine-tuning data does it."""
    out = []
    for conv in convs:
        messages = [m for q, a in conv for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        ex = tokenize(tok, messages)
        out.append((ex.ids, ex.labels))
    return out


def batches(examples, batch_size, rng):
    """Random batches of similar lengths (little padding): shuffle, sort windows of 32 batches by
    length, cut, and shuffle the batches."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        window = 32 * batch_size
        for w in range(0, len(order), window):
            order[w : w + window] = sorted(order[w : w + window], key=lambda j: len(examples[j][0]))
        starts = list(range(0, len(order) - batch_size + 1, batch_size))
        rng.shuffle(starts)
        for i in starts:
            chunk = [examples[j] for j in order[i : i + batch_size]]
            width = max(len(x) for x, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.bool)
            for r, (x, y) in enumerate(chunk):  # right padding for training
                ids[r, : len(x)], labels[r, : len(y)], mask[r, : len(x)] = torch.tensor(x), torch.tensor(y), True
            yield ids, labels, mask


# ---- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def greedy_answers(model, tok: Tokenizer, questions: list[str], max_new: int = 32, batch: int = 256) -> list[str]:
    """Greedy replies by full forwards over prompts of equal length (no padding, no cache: the
    reference decode, independent of g3n's engine)."""
    device = next(model.parameters()).device
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    stops = set(tok.stop_ids)
    for rows in by_len.values():
        for s in range(0, len(rows), batch):
            group = rows[s : s + batch]
            ids = torch.tensor([prompts[i] for i in group], device=device)
            done = [False] * len(group)
            for _ in range(max_new):
                nxt = model(ids)[:, -1].argmax(-1)
                for r, (i, token) in enumerate(zip(group, nxt.tolist())):  # one copy to the host a step
                    done[r] = done[r] or token in stops
                    if not done[r]:
                        out[i].append(token)
                if all(done):
                    break
                ids = torch.cat([ids, nxt[:, None]], 1)
    return [tok.decode(o).strip() for o in out]


def accuracy(model, tok, pairs, limit: int | None = None) -> tuple[int, int]:
    pairs = pairs[:limit] if limit else pairs
    answers = greedy_answers(model, tok, [q for q, _ in pairs])
    return sum(a == want for a, (_, want) in zip(answers, pairs)), len(pairs)


def evaluate(model, tok, corpus: tc.Corpus, demo: dict, mlps, limit: int | None = None) -> dict:
    """Greedy accuracy on each held-out set (its first `limit` questions), the whole model and its
    nested FFN widths; leaves the model at full width, training."""
    model.eval()
    set_widths(mlps, [1.0] * len(mlps))
    sets = {
        "known facts (a corpus phrasing)": corpus.known,
        "known facts, held-out phrasings": corpus.unseen_phrasing,
        "known facts, phrasings seen for other facts only": corpus.unseen_combination,
        "held-out arithmetic": corpus.arithmetic,
        "made-up names to copy": corpus.copying,
        "taught capitals (never in the corpus: 0 expected)": demo["taught"],
    }
    result = {name: accuracy(model, tok, pairs, limit) for name, pairs in sets.items()}
    for f in WIDTHS[1:]:
        set_widths(mlps, [f] * len(mlps))
        result[f"known facts, FFN width x{f}"] = accuracy(model, tok, corpus.known, limit)
    set_widths(mlps, [1.0] * len(mlps))
    model.train()
    return result


def demo_finetune(model_dir: Path, demo_dir: Path, device: str, tok: Tokenizer, overrides: list[str]) -> dict:
    """`g3n demo`'s fine-tune (its config and data) on the built model: taught and kept counts."""
    from g3n.adapters.lora import load_adapter
    from g3n.demo import read_pairs
    from g3n.train.config import load_train_config
    from g3n.train.loop import train

    kept_pairs = read_pairs(demo_dir / "kept.jsonl")
    taught_pairs = read_pairs(demo_dir / "taught.jsonl")
    base = load_model(model_dir, dtype=torch.float32, device=device)
    before_taught = greedy_answers(base, tok, [q for q, _ in taught_pairs])
    before_kept = greedy_answers(base, tok, [q for q, _ in kept_pairs])
    with tempfile.TemporaryDirectory() as work:
        cfg = load_train_config(demo_dir / "config.yaml", overrides,
                                base={"model": str(model_dir), "device": device, "seed": 0, "output_dir": work,
                                      "compile": False})  # fmt: skip
        start = time.perf_counter()
        train(cfg, overwrite=True, progress=False)
        seconds = time.perf_counter() - start
        tuned = load_model(model_dir, dtype=torch.float32, device=device)
        load_adapter(tuned, Path(work) / "adapter")
        after_taught = greedy_answers(tuned, tok, [q for q, _ in taught_pairs])
        after_kept = greedy_answers(tuned, tok, [q for q, _ in kept_pairs])
    right = lambda answers, pairs: sum(a == want for a, (_, want) in zip(answers, pairs))
    for (q, want), a in zip(taught_pairs, after_taught):
        print(f"  taught  {q!r} -> {a!r}{'' if a == want else '  (want ' + repr(want) + ')'}")
    return {
        "taught before": right(before_taught, taught_pairs),
        "taught after": right(after_taught, taught_pairs),
        "kept (same answer)": sum(a == b for a, b in zip(before_kept, after_kept)),
        "kept right after": right(after_kept, kept_pairs),
        "of": (len(taught_pairs), len(kept_pairs)),
        "fine-tune seconds": round(seconds, 1),
    }


def write_demo_data(demo: dict, demo_dir: Path) -> None:
    demo_dir.mkdir(parents=True, exist_ok=True)
    for name, pairs in demo.items():
        tc.write_jsonl(demo_dir / f"{name}.jsonl", pairs)


def report(title: str, result: dict) -> None:
    print(f"== {title}", flush=True)
    for name, value in result.items():
        if isinstance(value, tuple) and len(value) == 2 and name != "of":
            print(f"  {name:55s} {value[0]:5d}/{value[1]:<5d} {100 * value[0] / max(1, value[1]):5.1f}%", flush=True)
        else:
            print(f"  {name:55s} {value}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=4096, help="most SentencePiece pieces (fewer if the corpus has fewer)")
    ap.add_argument("--ffn", type=int, default=512, help="FFN width of every layer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from an earlier build (another vocabulary, narrower FFNs): see transplant()")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="run the layers through torch.compile (g3n's training way)")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds of training: fewer steps if needed")
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-limit", type=int, default=None, help="measure the first N questions of each held-out set")
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "g3n" / "assets" / "tiny")
    ap.add_argument("--demo-dir", type=Path, default=ROOT / "src" / "g3n" / "assets" / "demo",
                    help="where the demo's data files go (its config.yaml is read from there)")  # fmt: skip
    ap.add_argument("--demo-set", action="append", default=[], help="override a demo fine-tune setting (key=value)")
    ap.add_argument("--evaluate", type=Path, default=None, help="only measure this built checkpoint")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    corpus = tc.build_corpus(args.seed)
    demo = tc.demo_data(corpus, args.seed)
    if args.evaluate:
        tok = Tokenizer.from_dir(args.evaluate)
        model = load_model(args.evaluate, dtype=torch.float32, device=args.device)
        report("held out", evaluate(model, tok, corpus, demo, make_nested(model), args.eval_limit))
        report("g3n demo's fine-tune", demo_finetune(args.evaluate, args.demo_dir, args.device, tok, args.demo_set))
        return

    work = args.out.with_name(args.out.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train_tokenizer(corpus, args.vocab, work)
    tok = Tokenizer.from_dir(work)
    rng = random.Random(args.seed)
    examples = encode_examples(tok, conversations(corpus.train, rng))
    print(f"{len(corpus.train)} pairs, {len(examples)} chats, {tok.sp.get_piece_size()} pieces, "
          f"longest {max(len(x) for x, _ in examples)} tokens", flush=True)  # fmt: skip
    names = sorted({c for c in tc.COUNTRIES} | {v[0] for v in tc.COUNTRIES.values()})
    split = [n for n in names if len(tok.encode(" " + n, add_bos=False)) > 1]
    print(f"names in more than one piece: {split or 'none'}", flush=True)

    model = Gemma3nForCausalLM(tiny_config(tok.sp.get_piece_size(), args.ffn))
    init_weights(model, args.seed)
    if args.init_from:
        transplant(model, tok, args.init_from)
    model.to(args.device).train()
    mlps = make_nested(model)
    if args.compile:  # g3n's compiled training layers: one graph per kind of layer, shared by all
        from g3n.train import recompute

        recompute.configure(model.model, False, compiled=True)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))  # fmt: skip
    total = args.steps  # cut to what fits --time-budget once the first steps are timed
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    data = batches(examples, args.batch_size, rng)
    start = time.time()
    step = 0
    while step < total:
        if args.time_budget and step == 50:
            total = min(total, int(args.time_budget / ((time.time() - start) / step)))
            print(f"{total} steps fit in {args.time_budget:.0f} s", flush=True)
        ids, labels, mask = (t.to(args.device) for t in next(data))
        set_widths(mlps, sample_widths(rng, len(mlps)))
        logits = model(ids, attention_mask=mask)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == total - 1:
            print(f"step {step:5d} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
        if args.eval_every and step and step % args.eval_every == 0:
            report(f"held out at step {step} (100 of each)", evaluate(model, tok, corpus, demo, mlps, 100))
        step += 1
    results = {"held out": evaluate(model, tok, corpus, demo, mlps, args.eval_limit)}
    report("held out", results["held out"])

    model.eval()
    save_text_checkpoint(model, work, torch.bfloat16)
    write_tokenizer_files(work)
    write_demo_data(demo, args.demo_dir)
    if args.out.exists():
        shutil.rmtree(args.out)
    work.rename(args.out)
    print(f"wrote {args.out} and {args.demo_dir}", flush=True)
    if (args.demo_dir / "config.yaml").exists():
        results["demo"] = demo_finetune(args.out, args.demo_dir, args.device, tok, args.demo_set)
        report("g3n demo's fine-tune", results["demo"])
    (args.demo_dir / "build_results.json").write_text(json.dumps(results, indent=1))


def write_tokenizer_files(out: Path) -> None:
    """tokenizer_config.json, special_tokens_map.json and generation_config.json as HF expects them."""
    special = {
        0: "<pad>",
        1: "<eos>",
        2: "<bos>",
        3: "<unk>",
        4: "<mask>",
        105: "<start_of_turn>",
        106: "<end_of_turn>",
    }
    decoder = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in special.items()
    }
    files = {
        "tokenizer_config.json": {
            "tokenizer_class": "GemmaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "model_max_length": 2048,
            "added_tokens_decoder": decoder,
            "chat_template": CHAT_TEMPLATE,
        },
        "special_tokens_map.json": {
            "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        },
        "generation_config.json": {
            "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0,
            "do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95,
        },
    }  # fmt: skip
    for name, content in files.items():
        text = json.dumps(content, indent=2) + "\n"
        write_atomic(out / name, lambda p, text=text: p.write_text(text))


if __name__ == "__main__":
    main()
