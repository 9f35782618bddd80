"""Online serving benchmark over HTTP: Poisson arrivals at several request rates, streaming completions.

For each rate it sends `--num-prompts` requests whose start times follow a Poisson process (rate
"inf": all at once), streams each one, and reports request and output-token throughput with TTFT,
time per output token (TPOT, after the first) and inter-token latency (ITL) percentiles, the shape of
vLLM's benchmark_serving. Prompts are random token ids of `--input-len` tokens; outputs are
`--output-len` tokens (ignore_eos), so every rate does the same work.

Without `--url` it starts `resilient-moe serve`'s stack in-process on a free port (the demo
checkpoint, 2 attention and 3 expert workers unless told otherwise) and stops it afterwards.

    python benchmarks/bench_serving.py [--rates 2,4,8,inf] [--num-prompts 48] [--input-len 32]
                                       [--output-len 64] [--url http://127.0.0.1:8000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)  # one entry per token after the first


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: list[int], output_len: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    result = RequestResult()
    start = time.perf_counter()
    last = None
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                tokens = sum(len(c.get("token_ids", [])) for c in chunk["choices"])
                if not tokens:
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft_s = now - start
                    result.itl_s += [0.0] * (tokens - 1)
                else:
                    result.itl_s += [now - last] + [0.0] * (tokens - 1)  # tokens delivered together: no gap
                last = now
                result.output_tokens += tokens
        result.e2e_s = time.perf_counter() - start
        result.ok = result.output_tokens == output_len
        if not result.ok:
            result.error = f"got {result.output_tokens} of {output_len} tokens"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_rate(url: str, model: str, prompts: list[list[int]], output_len: int, rate: float,
                   seed: int) -> tuple[list[RequestResult], float]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        tasks = []
        began = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(one_request(http, url, model, prompt, output_len)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - began


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(rate: float, results: list[RequestResult], duration_s: float) -> dict:
    done = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in done]
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itl = [x for r in done for x in r.itl_s]
    e2e = [r.e2e_s for r in done]
    tokens = sum(r.output_tokens for r in done)
    ms = 1000.0
    return {
        "rate": rate, "completed": len(done), "failed": len(results) - len(done), "duration_s": duration_s,
        "request_throughput": len(done) / duration_s, "output_throughput": tokens / duration_s,
        "ttft_mean_ms": statistics.fmean(ttft) * ms if ttft else float("nan"),
        "ttft_p50_ms": percentile(ttft, 50) * ms, "ttft_p99_ms": percentile(ttft, 99) * ms,
        "tpot_p50_ms": percentile(tpot, 50) * ms, "tpot_p99_ms": percentile(tpot, 99) * ms,
        "itl_mean_ms": statistics.fmean(itl) * ms if itl else float("nan"),
        "itl_p50_ms": percentile(itl, 50) * ms, "itl_p99_ms": percentile(itl, 99) * ms,
        "e2e_p50_ms": percentile(e2e, 50) * ms, "e2e_p99_ms": percentile(e2e, 99) * ms,
        "errors": sorted({r.error for r in results if not r.ok})[:3],
    }


def print_table(rows: list[dict]) -> None:
    columns = [("rate req/s", "rate", "{:>10}"), ("done", "completed", "{:>5}"), ("fail", "failed", "{:>4}"),
               ("req/s", "request_throughput", "{:>6.2f}"), ("out tok/s", "output_throughput", "{:>9.1f}"),
               ("TTFT p50", "ttft_p50_ms", "{:>8.1f}"), ("TTFT p99", "ttft_p99_ms", "{:>8.1f}"),
               ("TPOT p50", "tpot_p50_ms", "{:>8.1f}"), ("TPOT p99", "tpot_p99_ms", "{:>8.1f}"),
               ("ITL p50", "itl_p50_ms", "{:>7.1f}"), ("ITL p99", "itl_p99_ms", "{:>7.1f}"),
               ("E2E p50", "e2e_p50_ms", "{:>8.1f}")]
    header = "  ".join(f"{title:>{len(fmt.format(0) if 'f' in fmt else title)}}" for title, _, fmt in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for title, key, fmt in columns:
            value = row[key]
            text = ("inf" if math.isinf(value) else f"{value:g}") if key == "rate" else fmt.format(value)
            cells.append(f"{text:>{max(len(title), len(fmt.format(0)))}}")
        print("  ".join(cells))
    print("latencies in ms; TPOT = (e2e - TTFT) / (tokens - 1); ITL counts tokens delivered together as 0 gaps")
    for row in rows:
        if row["errors"]:
            print(f"rate {row['rate']}: errors: {row['errors']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one in-process)")
    parser.add_argument("--model", help="checkpoint for the in-process server (default: the demo model)")
    parser.add_argument("--attention-workers", type=int, default=2)
    parser.add_argument("--expert-workers", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--rates", default="2,4,8,inf", help="request rates (req/s), comma-separated; inf = burst")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    stack = None
    url = args.url
    if url is None:
        from resilient_moe.deployment import DeploymentConfig
        from resilient_moe.model.demo import demo_model_dir
        from resilient_moe.supervisor import ServingStack

        model = args.model or str(demo_model_dir())
        dep = DeploymentConfig(model=model, attention_workers=args.attention_workers,
                               expert_workers=args.expert_workers, micro_batches=args.micro_batches)
        stack = ServingStack(dep, port=0, progress=lambda text: print(text, file=sys.stderr)).start()
        url = stack.url
    try:
        with httpx.Client(timeout=30) as http:
            model_info = http.get(f"{url}/v1/models").json()["data"][0]
        model_name, vocab = model_info["id"], 256  # ids below 256 exist in every tokenizer we ship
        rng = random.Random(args.seed)
        prompts = [[1] + [rng.randrange(3, vocab) for _ in range(args.input_len - 1)] for _ in range(args.num_prompts)]
        asyncio.run(run_rate(url, model_name, prompts[:2], 4, math.inf, args.seed))  # warm-up
        rows = []
        for rate in rates:
            results, duration = asyncio.run(run_rate(url, model_name, prompts, args.output_len, rate, args.seed))
            rows.append(summarize(rate, results, duration))
            print(f"rate {rate:g}: {rows[-1]['completed']}/{len(results)} requests in {duration:.1f}s",
                  file=sys.stderr)
    finally:
        if stack is not None:
            stack.stop()
    print(f"\nserving benchmark: {model_name} at {url}, {args.num_prompts} requests per rate, "
          f"{args.input_len} prompt + {args.output_len} output tokens")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
