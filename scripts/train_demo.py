"""Train the built-in demo model: a small Mixtral that writes readable English.

The text is the prose of Python's own standard library (docstrings, comments and the reference
topics of `pydoc_data`, read from the installed stdlib), so nothing is downloaded, plus the project's
own short description of itself (`tiny.BUILTIN_TEXT`, "Hello world! ..."), each of its sentences
starting a paragraph and repeated, so that the model knows them by heart: that is what a greeting
continues into. A byte-level BPE tokenizer is trained on it with
`tokenizers`, then a Mixtral of the demo's shape is trained with transformers on one CPU thread, and
the result is written in Hugging Face format (config.json, model.safetensors, tokenizer files). The
shipped checkpoint (resilient_moe/model/demo_checkpoint/) was made by this script with its defaults:

    nice -n 10 python scripts/train_demo.py --out resilient_moe/model/demo_checkpoint

Each run with the same arguments, Python version and torch build gives the same weights. Needs the
dev extras (transformers).
"""

from __future__ import annotations

import argparse
import ast
import io
import math
import random
import re
import shutil
import sys
import sysconfig
import time
import tokenize
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resilient_moe.model.tiny import (  # noqa: E402
    BUILTIN_TEXT,
    EOS_ID,
    TinySize,
    hf_config,
    train_tokenizer,
    write_tokenizer,
)

DEMO_SIZE = TinySize(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2,
                     intermediate_size=256, vocab_size=2048, max_position_embeddings=8192)
SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
MIN_CHARS = 40
MIN_PROSE = 0.93  # share of letters, spaces and . , ' in a paragraph: keeps prose, drops code and tables
BUILTIN_REPEATS = 30


def _prose(text: str) -> str | None:
    """One paragraph on one line, or None when it is too short or does not read as prose."""
    if ">>>" in text:
        return None
    line = " ".join(text.split())
    if len(line) < MIN_CHARS:
        return None
    prose = sum(c.isalpha() or c in " ,.'" for c in line) / len(line)
    return line if prose >= MIN_PROSE else None


def _docstrings(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out += re.split(r"\n\s*\n", doc)
    return out


def _comments(source: str) -> list[str]:
    """Runs of consecutive comment lines, joined."""
    runs, current, last_row = [], [], -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            text = tok.string.lstrip("#").strip()
            if tok.start[0] != last_row + 1 and current:
                runs.append(" ".join(current))
                current = []
            if text:
                current.append(text)
            last_row = tok.start[0]
    except (tokenize.TokenError, SyntaxError):
        pass
    if current:
        runs.append(" ".join(current))
    return runs


def stdlib_paragraphs(max_files: int | None = None) -> list[str]:
    """English paragraphs from the installed standard library's docstrings, comments and pydoc topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))
    paragraphs = []
    for path in files[:max_files]:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for raw in _docstrings(tree) + _comments(source):
            if (text := _prose(raw)) is not None:
                paragraphs.append(text)
    if max_files is None:
        from pydoc_data.topics import topics

        for _, page in sorted(topics.items()):
            paragraphs += [text for raw in re.split(r"\n\s*\n", page) if (text := _prose(raw)) is not None]
    return paragraphs


def builtin_paragraphs() -> list[str]:
    """Each sentence of the project's own text with the one after it, so that every sentence is seen
    at the start of a paragraph (as a prompt is) and continues as written."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(BUILTIN_TEXT.split()))
    return [" ".join(sentences[i:i + 2]) for i in range(len(sentences))]


def token_stream(tokenizer, paragraphs: list[str]) -> list[int]:
    """<s> paragraph </s>, one after another."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(paragraphs):
        ids += encoding.ids + [EOS_ID]  # the post-processor put <s> first
    return ids


def train(args: argparse.Namespace) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    began = time.monotonic()
    paragraphs = stdlib_paragraphs(args.max_files)
    if not paragraphs:
        raise SystemExit("no English text found in the standard library")
    paragraphs += builtin_paragraphs() * BUILTIN_REPEATS
    tokenizer = train_tokenizer(DEMO_SIZE.vocab_size, paragraphs)
    stream = torch.tensor(token_stream(tokenizer, paragraphs))
    block = args.seq_len + 1
    blocks = stream[: len(stream) // block * block].view(-1, block)  # [N, L+1]
    print(f"{len(paragraphs)} paragraphs, {len(stream)} tokens, {len(blocks)} blocks of {block} "
          f"({time.monotonic() - began:.1f}s)", flush=True)

    raw = hf_config("mixtral", DEMO_SIZE)
    config = MixtralConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type", "torch_dtype")},
                           output_router_logits=True, router_aux_loss_coef=0.02)
    model = MixtralForCausalLM(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    order: list[int] = []
    rng = random.Random(args.seed)
    model.train()
    for step in range(args.steps):
        if len(order) < args.batch:
            epoch = list(range(len(blocks)))
            rng.shuffle(epoch)
            order += epoch
        batch = blocks[order[: args.batch]]  # [B, L+1]
        del order[: args.batch]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {out.loss.item():.3f}  lr {lr_at(step):.2e}  "
                  f"{time.monotonic() - began:6.1f}s", flush=True)

    model.config.output_router_logits = False
    out_dir = Path(args.out)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    write_tokenizer(tmp, tokenizer, DEMO_SIZE.max_position_embeddings)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    print(f"wrote {out_dir} in {time.monotonic() - began:.1f}s", flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write (replaced)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-files", type=int, default=None, help="read only the first N stdlib files (tests)")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "seq_len", "threads", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
