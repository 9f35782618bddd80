"""Online serving benchmark over HTTP: Poisson arrivals at several request rates, streaming completions.

For each rate it sends `--num-prompts` requests whose start times follow a Poisson process (rate
"inf": all at once), streams each one, and reports request and output-token throughput with TTFT,
time per output token (TPOT, after the first) and inter-token latency (ITL) percentiles, the shape of
vLLM's benchmark_serving. Prompts are random token ids of `--input-len` tokens; outputs are
`--output-len` tokens (ignore_eos), so every rate does the same work.

Without `--url` it starts `resilient-moe serve`'s stack in-process on a free port (the demo
checkpoint, 2 attention and 3 expert workers unless told otherwise) and stops it afterwards.

    python benchmarks/bench_serving.py [--rates 2,4,8,inf] [--num-prompts 48] [--input-len 32]
                                       [--output-len 64] [--max-concurrency N] [--url http://127.0.0.1:8000]
                                       [--json out.json] [--trace tokens.json]

`--trace` keeps the wall-clock time at which the client saw each token. `--attribute` lines every
gap between two tokens of a stream up with the attention workers' steps (they log each step's
phases at debug level: the in-process stack turns that on, or pass `--aw-log` files of a running
server's workers) and prints where the large gaps (over twice the median) go: the step that
delivered the token computed prompt tokens, or it was a decode-only step, or the token reached the
client long after its step ended (delivery).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import random
import re
import statistics
import sys
import tempfile
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
    arrivals: list[float] = field(default_factory=list)  # time.time() of each chunk with tokens, as the client saw it


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
                result.arrivals.append(time.time())
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
                   seed: int, max_concurrency: int | None = None) -> tuple[list[RequestResult], float]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    gate = asyncio.Semaphore(max_concurrency or len(prompts))  # vLLM's --max-concurrency: at most this many in flight

    async def limited(prompt: list[int]) -> RequestResult:
        async with gate:
            return await one_request(http, url, model, prompt, output_len)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        tasks = []
        began = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
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


STEP_LINE = re.compile(r"step \d+ end=([\d.]+) commands_ms=([\d.]+) step_ms=([\d.]+) expert_wait_ms=([\d.]+) "
                       r"publish_ms=([\d.]+) checkpoint_ms=([\d.]+) decodes=(\d+) prompt_tokens=(\d+)")


def read_steps(paths: list[str]) -> list[dict]:
    """Every step an attention worker logged (its debug line), by end time."""
    steps = []
    for path in paths:
        with open(path, errors="replace") as f:
            for line in f:
                m = STEP_LINE.search(line)
                if m:
                    end, commands, step, wait, publish, checkpoint, decodes, prompt = m.groups()
                    steps.append({"end": float(end), "commands_ms": float(commands), "step_ms": float(step),
                                  "expert_wait_ms": float(wait), "publish_ms": float(publish),
                                  "checkpoint_ms": float(checkpoint), "decodes": int(decodes),
                                  "prompt_tokens": int(prompt)})
    return sorted(steps, key=lambda s: s["end"])


def attribute(arrivals: list[list[float]], steps: list[dict]) -> dict:
    """Each gap between two tokens of a stream, charged to the step that ended last before the later
    token reached the client: a prompt-computing step, a decode-only one, or delivery (the token came
    more than a decode step after that step ended). Gaps over twice the median count as large."""
    ends = [s["end"] for s in steps]
    gaps = []
    for times in arrivals:
        for before, after in zip(times, times[1:]):
            i = bisect.bisect_right(ends, after) - 1
            gaps.append((after - before, steps[i] if i >= 0 else None, after - ends[i] if i >= 0 else math.inf))
    if not gaps:
        return {}
    median = statistics.median(g for g, _, _ in gaps)
    decode_ms = statistics.median([s["step_ms"] for s in steps if not s["prompt_tokens"]] or [0.0])
    large = [(g, s, lag) for g, s, lag in gaps if g > 2 * median]
    kinds = {"prompt step": 0, "decode step": 0, "delivery": 0, "no step": 0}
    for g, step, lag in large:
        if step is None:
            kinds["no step"] += 1
        elif 1e3 * lag > decode_ms:
            kinds["delivery"] += 1
        else:
            kinds["prompt step" if step["prompt_tokens"] else "decode step"] += 1
    prompt_steps = [s for s in steps if s["prompt_tokens"]]
    lags = sorted(lag for _, _, lag in gaps if math.isfinite(lag))
    return {"gaps": len(gaps), "gap_p50_ms": 1e3 * median, "gap_p99_ms": 1e3 * percentile([g for g, _, _ in gaps], 99),
            "large": len(large), **kinds, "steps": len(steps), "prompt_steps": len(prompt_steps),
            "decode_step_p50_ms": decode_ms,
            "prompt_step_p50_ms": statistics.median([s["step_ms"] for s in prompt_steps]) if prompt_steps else 0.0,
            "expert_wait_share": sum(s["expert_wait_ms"] for s in steps) / max(1e-9, sum(s["step_ms"] for s in steps)),
            "commands_ms_max": max((s["commands_ms"] for s in steps), default=0.0),
            "publish_ms_max": max((s["publish_ms"] for s in steps), default=0.0),
            "checkpoint_ms_max": max((s["checkpoint_ms"] for s in steps), default=0.0),
            "delivery_lag_p50_ms": 1e3 * lags[len(lags) // 2] if lags else float("nan")}


def print_attribution(rate: float, a: dict) -> None:
    if not a:
        return
    print(f"\nrate {rate:g}: {a['gaps']} gaps between tokens, p50 {a['gap_p50_ms']:.1f} ms, p99 {a['gap_p99_ms']:.1f} ms "
          f"({a['gap_p99_ms'] / a['gap_p50_ms']:.2f}x); {a['large']} over 2x the median, delivered by:")
    print(f"  a step computing prompt tokens {a['prompt step']:5d}   (of {a['steps']} steps {a['prompt_steps']} did; "
          f"p50 {a['prompt_step_p50_ms']:.0f} ms against {a['decode_step_p50_ms']:.0f} ms decode-only)")
    print(f"  a decode-only step             {a['decode step']:5d}")
    print(f"  late delivery after the step   {a['delivery']:5d}   (client - step end, p50 {a['delivery_lag_p50_ms']:.1f} ms)")
    print(f"  steps: {100 * a['expert_wait_share']:.0f}% of their time waiting on expert workers; the most any step "
          f"spent on commands {a['commands_ms_max']:.1f} ms, publishing {a['publish_ms_max']:.1f} ms, "
          f"checkpointing {a['checkpoint_ms_max']:.1f} ms")


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
    parser.add_argument("--max-concurrency", type=int, help="at most this many requests in flight (as vLLM's client)")
    parser.add_argument("--transport", choices=["shm", "tcp"], default="shm")
    parser.add_argument("--trace", help="write every request's token arrival times (time.time()) here, as JSON")
    parser.add_argument("--attribute", action="store_true", help="attribute the large gaps to the workers' steps")
    parser.add_argument("--aw-log", action="append", default=[], help="an attention worker's log (with --url)")
    parser.add_argument("--log-dir", help="worker logs of the in-process stack (default: a temporary directory)")
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
                               expert_workers=args.expert_workers, micro_batches=args.micro_batches,
                               transport=args.transport, log_level="DEBUG" if args.attribute else "INFO")
        log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench-serving-")
        args.aw_log += [str(Path(log_dir) / f"aw-{i}.log") for i in range(args.attention_workers)]
        stack = ServingStack(dep, port=0, log_dir=log_dir, progress=lambda text: print(text, file=sys.stderr)).start()
        url = stack.url
    try:
        with httpx.Client(timeout=30) as http:
            model_info = http.get(f"{url}/v1/models").json()["data"][0]
        model_name, vocab = model_info["id"], 256  # ids below 256 exist in every tokenizer we ship
        rng = random.Random(args.seed)
        prompts = [[1] + [rng.randrange(3, vocab) for _ in range(args.input_len - 1)] for _ in range(args.num_prompts)]
        asyncio.run(run_rate(url, model_name, prompts[:2], 4, math.inf, args.seed))  # warm-up
        rows, traces = [], []
        for rate in rates:
            results, duration = asyncio.run(run_rate(url, model_name, prompts, args.output_len, rate, args.seed,
                                                     args.max_concurrency))
            rows.append(summarize(rate, results, duration))
            traces.append({"rate": rate, "arrivals": [r.arrivals for r in results]})
            print(f"rate {rate:g}: {rows[-1]['completed']}/{len(results)} requests in {duration:.1f}s",
                  file=sys.stderr)
    finally:
        if stack is not None:
            stack.stop()
    print(f"\nserving benchmark: {model_name} at {url}, {args.num_prompts} requests per rate, "
          f"{args.input_len} prompt + {args.output_len} output tokens")
    print_table(rows)
    if args.trace:
        Path(args.trace).write_text(json.dumps(traces))
    if args.attribute:
        steps = read_steps(args.aw_log)
        for trace in traces:
            print_attribution(trace["rate"], attribute(trace["arrivals"], steps))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
