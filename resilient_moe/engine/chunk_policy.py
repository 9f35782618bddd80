"""How many prompt tokens a step may compute: prefill chunks sized to a step-latency target.

A fixed chunk in tokens freezes decoding streams for as long as that chunk takes on this hardware
(512 tokens at hidden 2048 is about a second of CPU), so the scheduler measures instead:

* `StepCostModel` learns, online, what a step costs: its decode part (an average of steps with no
  prompt tokens) and its prefill part, ms = b * n + c * n * (context + n / 2) for a chunk of n tokens
  starting at `context` cached tokens (the GEMMs grow with n, attention with n times the keys it
  reads). b and c are fitted by recursive least squares with forgetting, so they follow the machine
  as its load changes.
* `prefill_chunk_tokens` (pure) turns a time budget, the fitted costs and a prompt's context into the
  largest chunk that fits, between a floor (a prompt always advances) and the hard cap.

The target (`EngineConfig.max_step_ms`, see `step_target_ms`) defaults to 4x the measured steady decode
step, and is never below one decode step. Chunk sizes then vary with timing, which is safe: batch
invariance makes a prompt's tokens the same however it is chunked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_TARGET_DECODE_STEPS = 4.0  # the default max_step_ms, in steady decode steps
MIN_CHUNK_TOKENS = 16  # a prompt advances at least this much a step, whatever the budget
_CONTEXT_UNIT = 1000.0  # n * context is fitted per thousand tokens, to keep both features of one size
_FORGET = 0.9  # weight of older prefill observations, per observation
_P_MAX = 1e4  # bound on the least-squares covariance
_DECODE_WEIGHT = 0.2  # weight of the newest decode-only step in the decode average


@dataclass(frozen=True)
class PrefillCost:
    """Fitted prefill cost: per_token_ms * n + per_token_context_ms * n * (context + n / 2) / 1000."""

    per_token_ms: float
    per_token_context_ms: float  # per thousand context tokens

    def ms(self, tokens: int, context: int) -> float:
        return tokens * (self.per_token_ms + self.per_token_context_ms * (context + tokens / 2) / _CONTEXT_UNIT)


def step_target_ms(max_step_ms: float | None, decode_ms: float) -> float:
    """The latency a step should stay within: the setting, or DEFAULT_TARGET_DECODE_STEPS decode steps;
    never below one decode step (decodes run every step whatever the target)."""
    target = max_step_ms if max_step_ms is not None else DEFAULT_TARGET_DECODE_STEPS * decode_ms
    return max(target, decode_ms)


def prefill_chunk_tokens(budget_ms: float, cost: PrefillCost, context: int, wanted: int, cap: int,
                         floor: int = MIN_CHUNK_TOKENS) -> int:
    """The largest chunk n <= min(wanted, cap) with cost.ms(n, context) <= budget_ms, and at least
    min(floor, wanted, cap): the most prompt tokens of one sequence, `context` of them already cached,
    that fit the time left in a step."""
    limit = min(wanted, cap)
    if limit <= 0:
        return 0
    least = min(floor, limit)
    if budget_ms <= 0:
        return least
    # cost.ms(n) = (c / 2000) n^2 + (b + c * context / 1000) n, increasing in n: solve cost.ms(n) = budget.
    quad = max(cost.per_token_context_ms, 0.0) / (2 * _CONTEXT_UNIT)
    lin = max(cost.per_token_ms, 0.0) + max(cost.per_token_context_ms, 0.0) * context / _CONTEXT_UNIT
    if quad > 0:
        n = (-lin + math.sqrt(lin * lin + 4 * quad * budget_ms)) / (2 * quad)
    elif lin > 0:
        n = budget_ms / lin
    else:
        return limit
    return max(least, min(limit, int(n)))


class StepCostModel:
    """Online estimate of a step's decode time and of the prefill cost model (see the module doc)."""

    def __init__(self) -> None:
        self.decode_ms: float | None = None
        self.prefill_steps = 0
        # Recursive least squares over theta = (b, c): p is the inverse information matrix (2 x 2),
        # started wide so the first observations decide.
        self._theta = [0.0, 0.0]
        self._p = [[1e2, 0.0], [0.0, 1e2]]

    @property
    def ready(self) -> bool:
        """Both parts measured: chunks can be sized by time."""
        return self.decode_ms is not None and self.prefill_steps > 0

    @property
    def cost(self) -> PrefillCost:
        return PrefillCost(max(self._theta[0], 0.0), max(self._theta[1], 0.0))

    def observe(self, elapsed_ms: float, decodes: int, chunks: list[tuple[int, int]]) -> None:
        """One step took `elapsed_ms` computing `decodes` single-token rows and prompt chunks (tokens,
        context). Steps with no decode rows and no chunk teach nothing."""
        if not chunks:
            if decodes:
                weight = 1.0 if self.decode_ms is None else _DECODE_WEIGHT
                self.decode_ms = elapsed_ms if self.decode_ms is None else \
                    (1 - weight) * self.decode_ms + weight * elapsed_ms
            return
        prefill_ms = elapsed_ms - ((self.decode_ms or 0.0) if decodes else 0.0)
        x = [float(sum(n for n, _ in chunks)),
             sum(n * (ctx + n / 2) for n, ctx in chunks) / _CONTEXT_UNIT]
        self._update(x, max(prefill_ms, 0.0))
        self.prefill_steps += 1

    def _update(self, x: list[float], y: float) -> None:
        p, theta = self._p, self._theta
        px = [p[0][0] * x[0] + p[0][1] * x[1], p[1][0] * x[0] + p[1][1] * x[1]]
        denom = _FORGET + x[0] * px[0] + x[1] * px[1]
        gain = [px[0] / denom, px[1] / denom]
        error = y - (theta[0] * x[0] + theta[1] * x[1])
        self._theta = [theta[0] + gain[0] * error, theta[1] + gain[1] * error]
        p = [[(p[i][j] - gain[i] * px[j]) / _FORGET for j in range(2)] for i in range(2)]
        # Forgetting inflates p along directions the chunks never vary in; bound it (no wind-up).
        scale = max(1.0, max(p[0][0], p[1][1]) / _P_MAX)
        self._p = [[v / scale for v in row] for row in p]
