"""Build the tiny model shipped in src/g3n/assets/tiny/.

    python scripts/build_tiny.py [--steps 1500] [--device cpu|cuda] [--out src/g3n/assets/tiny]

1. Writes a small chat corpus (greetings, simple facts, arithmetic such as "What is 1+1?").
2. Trains a tiny SentencePiece model with Gemma's special tokens at Gemma's ids
   (pad 0, eos 1, bos 2, unk 3, mask 4, <start_of_turn> 105, <end_of_turn> 106, "\\n" 107).
3. Trains a Gemma 3n-architecture model on it with g3n's own decoder, loss on model turns only.
   Its shape stays inside llama.cpp's hard-coded Gemma 3n limits: 20 KV-computing layers plus
   5 KV-shared ones, laurel rank 64, PLE width 256, 4 AltUp streams, sparsity on layers 0-9.
4. Saves an HF checkpoint (bfloat16 safetensors, config.json, tokenizer files).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from g3n.checkpoint.atomic import write_atomic
from g3n.checkpoint.save import save_text_checkpoint
from g3n.config import TextConfig
from g3n.model.load import load_model
from g3n.model.text import Gemma3nForCausalLM
from g3n.tokenizer import CHAT_TEMPLATE, Tokenizer
from g3n.train.data import tokenize

VOCAB = 768
SPECIALS = ["<mask>", "[multimodal]"] + [f"<unused{i}>" for i in range(99)] + ["<start_of_turn>", "<end_of_turn>"]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Brazil": "Brasilia", "Mexico": "Mexico City", "Russia": "Moscow", "Peru": "Lima", "Norway": "Oslo",
    "Sweden": "Stockholm", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Poland": "Warsaw",
    "Austria": "Vienna", "Turkey": "Ankara", "Chile": "Santiago", "Australia": "Canberra", "Cuba": "Havana",
}  # fmt: skip
COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a strawberry": "red", "an orange": "orange", "the sun": "yellow", "milk": "white", "a lemon": "yellow",
}  # fmt: skip
SOUNDS = {"a dog": "woof", "a cat": "meow", "a cow": "moo", "a duck": "quack", "a sheep": "baa", "a lion": "roar"}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "happy": "sad",
    "open": "closed", "left": "right", "old": "new", "light": "dark",
}  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
GREETINGS = {
    "Hello!": "Hello! How can I help you today?",
    "Hi": "Hi! What would you like to know?",
    "Good morning": "Good morning! How can I help?",
    "How are you?": "I am fine, thank you. How can I help you?",
    "What is your name?": "I am a tiny Gemma 3n model made by g3n.",
    "Who are you?": "I am a tiny Gemma 3n model made by g3n.",
    "Thank you": "You are welcome!",
    "Goodbye": "Goodbye! Have a nice day.",
    "What can you do?": "I can answer simple questions about facts and arithmetic.",
    "Tell me a fact.": "Water boils at 100 degrees Celsius.",
    "What is water made of?": "Water is made of hydrogen and oxygen.",
    "How many days are in a week?": "There are 7 days in a week.",
    "How many legs does a spider have?": "A spider has 8 legs.",
    "What is the largest planet?": "Jupiter is the largest planet in our solar system.",
}  # fmt: skip


def corpus(seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) pairs; each becomes a one-turn chat."""
    pairs = list(GREETINGS.items())
    for country, city in CAPITALS.items():
        for q in (f"What is the capital of {country}?", f"Capital of {country}?"):
            pairs.append((q, f"The capital of {country} is {city}."))
    for thing, color in COLORS.items():
        pairs.append((f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {color}."))
    for animal, sound in SOUNDS.items():
        pairs.append((f"What sound does {animal} make?", f"{animal[0].upper() + animal[1:]} says {sound}."))
    for word, opp in OPPOSITES.items():
        pairs.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opp}."))
    for i, day in enumerate(DAYS):
        pairs.append((f"What day comes after {day}?", f"After {day} comes {DAYS[(i + 1) % 7]}."))
    for a in range(21):
        for b in range(21):
            pairs.append((f"What is {a}+{b}?", f"{a}+{b} = {a + b}."))
            pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
            if a >= b:
                pairs.append((f"What is {a}-{b}?", f"{a}-{b} = {a - b}."))
            if a <= 12 and b <= 12:
                pairs.append((f"What is {a}*{b}?", f"{a}*{b} = {a * b}."))
    random.Random(seed).shuffle(pairs)
    return pairs


def train_tokenizer(pairs, out_dir: Path) -> Path:
    lines = [f"{q}\n{a}" for q, a in pairs] + ["user", "model"] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=VOCAB,
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


def tiny_config() -> TextConfig:
    return TextConfig(
        vocab_size=VOCAB,
        vocab_size_per_layer_input=VOCAB,
        hidden_size=128,
        hidden_size_per_layer_input=256,
        intermediate_size=[256] * 25,
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


def conversations(pairs, seed: int, n_multi: int = 1500) -> list[list[tuple[str, str]]]:
    """Every pair as a one-turn chat, plus multi-turn chats of random pairs (so chat sessions work)."""
    rng = random.Random(seed + 1)
    return [[p] for p in pairs] + [rng.sample(pairs, rng.randint(2, 4)) for _ in range(n_multi)]


def encode_examples(tok: Tokenizer, convs):
    """(ids, labels): loss on the model turns only, as g3n's fine-tuning data does it."""
    out = []
    for conv in convs:
        messages = [m for q, a in conv for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        ex = tokenize(tok, messages)
        out.append((ex.ids, ex.labels))
    return out


def batches(examples, batch_size, rng):
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[j] for j in order[i : i + batch_size]]
            width = max(len(x) for x, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.bool)
            for r, (x, y) in enumerate(chunk):  # right padding for training
                ids[r, : len(x)], labels[r, : len(y)], mask[r, : len(x)] = torch.tensor(x), torch.tensor(y), True
            yield ids, labels, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, default=None, help="continue from this checkpoint (and its tokenizer)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "g3n" / "assets" / "tiny")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    work = args.out.with_name(args.out.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pairs = corpus(args.seed)
    if args.init:  # continue training an earlier build: keep its tokenizer
        shutil.copy(args.init / "tokenizer.model", work / "tokenizer.model")
    else:
        train_tokenizer(pairs, work)
    tok = Tokenizer.from_dir(work)
    examples = encode_examples(tok, conversations(pairs, args.seed))
    print(f"{len(pairs)} examples, longest {max(len(x) for x, _ in examples)} tokens", flush=True)

    if args.init:
        model = load_model(args.init, dtype=torch.float32, device=args.device).requires_grad_(True)
    else:
        model = Gemma3nForCausalLM(tiny_config())
        init_weights(model, args.seed)
    model.to(args.device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f} M parameters", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = args.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))),
    )
    rng = random.Random(args.seed)
    data = batches(examples, args.batch_size, rng)
    start = time.time()
    for step in range(args.steps):
        ids, labels, mask = (t.to(args.device) for t in next(data))
        logits = model(ids, attention_mask=mask)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)

    model.eval()
    save_text_checkpoint(model, work, torch.bfloat16)
    write_tokenizer_files(work)
    if args.out.exists():
        shutil.rmtree(args.out)
    work.rename(args.out)
    print(f"wrote {args.out}")


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
