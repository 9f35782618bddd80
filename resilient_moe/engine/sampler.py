"""Token sampling: logit bias, min_tokens, penalties, then greedy or temperature, top-k, top-p, with a
random stream per (seed, position).

A request's stream depends on nothing but its seed and the output position being sampled, and its
logit adjustments on nothing but its parameters and its tokens (prompt and output), so its tokens
are the same alone or in any batch, and after a failover to another worker that has the same tokens.
A structured output's grammar mask (engine/guided.py) is applied after `adjust_logits`, by the
scheduler, which keeps each sequence's grammar state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from resilient_moe.engine.config import SamplingParams

_MASK64 = (1 << 64) - 1

# A kernel's log-softmax over rows [S, V] -> float32 [S, V] (the triton kernels'); None: torch's.
LogSoftmax = Callable[[torch.Tensor], torch.Tensor]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, position: int) -> int:
    """64-bit seed of the random stream used to sample output position `position` of a request."""
    return _splitmix64(seed ^ _splitmix64(position))


def choice_seed(seed: int, index: int) -> int:
    """Seed of choice `index` of a request whose seed is `seed` (n > 1, several prompts): choice 0 keeps
    the request's own, so n=1 is unchanged; the others get streams of their own, fixed by (seed, index)."""
    return seed if index == 0 else _splitmix64(seed ^ _splitmix64(~index & _MASK64)) & ((1 << 63) - 1)


def adjust_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
                  eos_token_ids: frozenset[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """One row of float32 logits [V] with a request's adjustments, in vLLM's order: logit bias, the
    min_tokens mask (end-of-sequence and stop token ids at -inf), then the penalties
      repetition r (tokens of prompt or output): l / r where l > 0, else l * r
      frequency f, presence p (tokens of the output, c times): l - f * c - p * (c > 0)
    All tensor ops over the vocabulary; a new row (the input is not changed)."""
    vocab = logits.shape[-1]
    out = logits.clone()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias if t < vocab], dtype=torch.long)
        bias = torch.tensor([b for t, b in params.logit_bias if t < vocab], dtype=out.dtype)
        out.index_add_(0, ids.to(out.device), bias.to(out.device))
    if len(output_ids) < params.min_tokens:
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        ids = torch.tensor(sorted(t for t in banned if t < vocab), dtype=torch.long)
        out.index_fill_(0, ids.to(out.device), float("-inf"))
    if params.repetition_penalty != 1.0:
        seen = torch.bincount(torch.tensor(prompt_ids + output_ids, dtype=torch.long), minlength=vocab)[:vocab] > 0
        seen = seen.to(out.device)
        rp = params.repetition_penalty
        out = torch.where(seen, torch.where(out > 0, out / rp, out * rp), out)
    if params.frequency_penalty or params.presence_penalty:
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab)[:vocab]
        counts = counts.to(device=out.device, dtype=out.dtype)
        out = out - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(out.dtype)
    return out


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p to one row of float32 logits [V]; removed tokens get -inf."""
    scaled = logits / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the top one always stays).
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) > params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sample_row(logits: torch.Tensor, params: SamplingParams, seed: int, position: int,
               log_softmax: LogSoftmax | None = None) -> int:
    """Pick the token for output `position` from one row of float32 logits [V]."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    filtered = filter_logits(logits, params)
    probs = torch.softmax(filtered, dim=-1) if log_softmax is None else log_softmax(filtered[None])[0].exp()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(stream_seed(seed, position))
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws index i with probability p_i.
    race = torch.empty(probs.shape, dtype=torch.float32).exponential_(generator=generator)
    return int(torch.argmax(probs.cpu() / race))


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int],
           log_softmax: LogSoftmax | None = None) -> list[int]:
    """One token per row of float32 logits [S, V] (adjusted already: `adjust_logits`); greedy rows share
    one argmax."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    return [
        greedy[i] if p.temperature == 0.0 else sample_row(logits[i], p, seeds[i], positions[i], log_softmax)
        for i, p in enumerate(params)
    ]


def logprobs_of(logits: torch.Tensor, token: int, top: int,
                log_softmax: LogSoftmax | None = None) -> tuple[float, tuple[tuple[int, float], ...]]:
    """Log-probability of `token` under the unmodified distribution, and the `top` most likely tokens."""
    logp = torch.log_softmax(logits, dim=-1) if log_softmax is None else log_softmax(logits[None])[0]
    chosen = float(logp[token])
    if top <= 0:
        return chosen, ()
    values, ids = torch.topk(logp, top)
    return chosen, tuple(zip(ids.tolist(), values.tolist()))
