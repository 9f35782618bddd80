"""Structured outputs: what a grammar costs decode (colocated engine, the tiny checkpoint by default).

S sequences decode T tokens each, unguided, then with a JSON schema (one long string field, so no
request ends before T tokens) and with a regex. Prints decode tokens / s and the extra milliseconds per
guided token (mask: llguidance's bitmask plus its unpacking; consume: feeding the sampled token). The
tiny model's step is short, so the relative cost is far larger than on a real model; the absolute cost
per token is the number to carry over (it grows with the vocabulary: llguidance's mask work, and an
unpack over V).

    python benchmarks/bench_guided.py [--model DIR] [--seqs 8] [--tokens 96]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resilient_moe.engine.config import EngineConfig, SamplingParams  # noqa: E402
from resilient_moe.engine.engine import LLMEngine  # noqa: E402
from resilient_moe.engine.guided import guide_from  # noqa: E402


def run(engine: LLMEngine, seqs: int, tokens: int, guide: str | None) -> tuple[float, int]:
    prompts = [[1, 45 + i, 393, 84] for i in range(seqs)]
    params = SamplingParams(max_tokens=tokens, temperature=0.8, seed=1, ignore_eos=True, guide=guide)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, guide=guide))  # warm: compiles the grammar
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.token_ids) for o in out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: a tiny mixtral, written to a temp dir)")
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    model = args.model
    if model is None:
        from resilient_moe.model.tiny import make_tiny_model

        model = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "mixtral", seed=7)
    engine = LLMEngine(model, EngineConfig(max_model_len=args.tokens + 16))
    cases = [
        ("unguided", None),
        ("json_schema", guide_from("json_schema", {"type": "object", "required": ["note"], "properties": {
            "note": {"type": "string", "minLength": 4 * args.tokens}}})),
        ("regex", guide_from("regex", r"[a-z ]{%d,}" % (4 * args.tokens))),
    ]
    base = None
    print(f"{'case':<12} {'tokens':>7} {'s':>7} {'tok/s':>8} {'extra ms/token':>15}")
    for name, guide in cases:
        elapsed, n = run(engine, args.seqs, args.tokens, guide)
        per_token = elapsed / n
        base = per_token if base is None else base
        print(f"{name:<12} {n:>7} {elapsed:>7.2f} {n / elapsed:>8.1f} {1000 * (per_token - base):>15.3f}")


if __name__ == "__main__":
    main()
