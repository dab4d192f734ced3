#!/usr/bin/python3
"""A small character language model whose attention is relbias.attention, trained on Debian's
fortunes and evaluated past its training length.

The model and the split follow the C++ quality benchmark (bench/quality, README "Which bias?"):
2 pre-LN layers, d_model 64, 4 heads, GELU MLP, tied embeddings, no absolute positions (the bias
is the only positional signal), Adam with warm-up and cosine decay, 2000 steps of 32 windows of
64 characters; the fortune files literature, science and wisdom are held out whole. It prints
held-out bits per character at 1x and 8x the training length.

    /usr/bin/python3 examples/python/train_char_lm.py --bias alibi          # the full run: 2000 steps, 3-10 min
    /usr/bin/python3 examples/python/train_char_lm.py --quick               # 150 steps: 10-60 s (CI runs it)

Needs the relbias package (README, "From Python") and Debian's fortunes package.
"""

import argparse
import math
import os
import time

import torch
from torch import nn

import relbias

FORTUNES = "/usr/share/games/fortunes"
HELD_OUT = {"literature", "science", "wisdom"}  # bench/quality/data.hpp's held_out_files
VOCAB = 97


def char_token(c: int) -> int:
    """bench/quality/data.hpp's char_token: '\\n' -> 0, printable ASCII -> 1..95, tab as space, else 96."""
    if c == 10:
        return 0
    if c == 9:
        c = 32
    return c - 31 if 32 <= c <= 126 else 96


def records(data: bytes):
    """bench/quality/data.hpp's read_records: lines up to a line "%" form a record (each line
    ending in a newline); empty records are dropped."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the file ends its last line
    record = b""
    for line in lines:
        if line == b"%":
            if record:
                yield record
            record = b""
        else:
            record += line + b"\n"
    if record:
        yield record


def read_fortunes(directory=FORTUNES):
    """(training tokens, held-out tokens): every fortune file in name order, each record followed
    by "%\n" (as bench/quality's read_fortunes); the .dat indices and .u8 links are skipped."""
    table = torch.tensor([char_token(c) for c in range(256)], dtype=torch.long)
    train, held = [], []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if "." in name or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        text = b"".join(record + b"%\n" for record in records(data))
        (held if name in HELD_OUT else train).append(table[torch.frombuffer(bytearray(text), dtype=torch.uint8).long()])
    if not train or not held:
        raise SystemExit(f"no fortunes in {directory}: apt-get install fortunes")
    return torch.cat(train), torch.cat(held)


def make_bias(name, heads, train_length, d_model, seed):
    """The bias schemes as bench/quality/experiment.hpp initialises them."""
    if name == "alibi":
        return relbias.ALiBi(heads)
    if name == "t5":
        bias = relbias.T5Bias(heads, causal=True)
        bias.reset_parameters(seed, d_model)
        return bias
    if name == "per_offset":
        return relbias.PerOffset(heads, causal=True, clip=train_length)
    if name == "kerple_power":
        return relbias.KerplePower(heads, seed)
    if name == "kerple_log":
        return relbias.KerpleLog(heads, seed)
    if name == "fire":
        return relbias.FIRE(heads, seed)
    if name == "sandwich":
        return relbias.Sandwich(heads, d_model // heads)
    return relbias.NoBias(heads)


class Block(nn.Module):
    def __init__(self, d_model, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x, bias):
        b, L, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, L, 3, self.heads, d // self.heads)
        # q, k, v: [batch, seq, heads, dim] views into the projection, read in place (no copies)
        o = relbias.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias, causal=True)
        x = x + self.out(o.reshape(b, L, d))
        return x + self.mlp(self.ln2(x))


class CharModel(nn.Module):
    def __init__(self, bias, d_model=64, heads=4, layers=2):
        super().__init__()
        self.bias = bias  # one bias module shared by every layer
        self.embed = nn.Embedding(VOCAB, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.bias)
        return self.norm(x) @ self.embed.weight.t()  # tied output embedding


def learning_rate(step, steps, peak, warmup_fraction=0.05, final_fraction=0.1):
    """Linear warm-up, then cosine decay to final_fraction of the peak (experiment.hpp)."""
    warmup = max(1, int(warmup_fraction * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def bits_per_char(model, stream, chars, length, per_batch=16):
    """Mean bits per character over consecutive windows of `length` of stream[:chars + 1]."""
    windows = chars // length
    nats = 0.0
    for first in range(0, windows, per_batch):
        count = min(per_batch, windows - first)
        span = stream[first * length:(first + count) * length + 1]
        x = span[:-1].view(count, length)
        y = span[1:].view(count, length)
        logits = model(x)
        nats += nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum").item()
    return nats / (windows * length) / math.log(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bias", default="alibi",
                        choices=["none", "alibi", "t5", "per_offset", "kerple_power", "kerple_log", "fire", "sandwich"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="training length")
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-chars", type=int, default=32768, help="held-out characters scored per length")
    parser.add_argument("--quick", action="store_true", help="150 steps, 8192 characters per evaluation (10-60 s)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_chars = 150, 8192

    torch.manual_seed(args.seed)
    train, held = read_fortunes()
    bias = make_bias(args.bias, 4, args.length, 64, args.seed)
    model = CharModel(bias)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"relbias.attention with {bias}; {sum(p.numel() for p in model.parameters())} weights; "
          f"{len(train)} training and {len(held)} held-out characters; {torch.get_num_threads()} threads")

    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(args.steps):
        first = torch.randint(0, len(train) - args.length - 1, (args.batch,), generator=g)
        index = first.unsqueeze(1) + torch.arange(args.length + 1)
        window = train[index]
        logits = model(window[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), window[:, 1:].reshape(-1))
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if hasattr(bias, "project"):
            bias.project()  # KERPLE's constraints after every step
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  train {loss.item() / math.log(2):.3f} bits/char  {time.time() - start:6.1f} s")

    results = {}
    for multiple in (1, 8):
        results[multiple] = bits_per_char(model, held, args.eval_chars, multiple * args.length)
        print(f"held-out bits/char at {multiple}x the training length ({multiple * args.length}): {results[multiple]:.3f}")
    if not all(math.isfinite(r) and r < math.log2(VOCAB) for r in results.values()):
        raise SystemExit("the model learned nothing: held-out bits/char not below log2(97)")


if __name__ == "__main__":
    main()
