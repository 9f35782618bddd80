"""The engine's settings (`EngineConfig`: KV cache, batching, kernels) and one request's
(`SamplingParams`), validated where they are built; every error names the field and the bad value."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from resilient_moe.errors import ConfigError
from resilient_moe.kernels import KERNEL_CHOICES

SUPPORTED_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine (colocated, or one attention worker).

    KV capacity is set in tokens (`kv_cache_tokens`) or bytes (`kv_cache_bytes`); when both are
    unset the cache holds `max_num_seqs` full-length sequences of `max_model_len` tokens.
    """

    dtype: str = "float32"
    device: str = "auto"  # "auto" picks CUDA when available, else CPU
    block_size: int = 16
    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_prefill_tokens_per_step: int = 512  # hard cap on prompt tokens one step computes (chunked prefill)
    # Latency a step that also computes prompt tokens should stay within while others decode: each
    # step's prompt chunk is sized by the measured prefill cost to fit (engine/chunk_policy.py). None:
    # 4x the measured steady decode step of this device; never below one decode step.
    max_step_ms: float | None = None
    max_model_len: int | None = None  # defaults to the checkpoint's max_position_embeddings
    micro_batches: int = 1
    # Threads of this process's compute (the native kernels' pool on the CPU in float32, else torch's).
    # None: one per core the process may run on (its affinity), so a colocated engine, or a worker
    # pinned to its cores, uses all it owns.
    torch_threads: int | None = None
    # auto: native on CPU, triton on CUDA; native | torch (not batch-invariant) | triton (see resilient_moe/kernels)
    kernels: str = "auto"
    # Automatic prefix caching: a request reuses the KV blocks of the longest prefix of full blocks an
    # earlier request on this engine computed (engine/kv_cache.py BlockAllocator); batch-invariant kernels
    # make the reused rows the bits a recompute would give, so tokens are the same either way.
    enable_prefix_caching: bool = True

    @property
    def threads(self) -> int:
        """`torch_threads`, or the cores this process may run on when it is None."""
        return self.torch_threads or len(os.sched_getaffinity(0))

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens_per_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("kv_cache_tokens", "kv_cache_bytes", "max_model_len", "torch_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_step_ms is not None and (
                isinstance(self.max_step_ms, bool) or not isinstance(self.max_step_ms, (int, float))
                or not 0 < self.max_step_ms < float("inf")):
            raise ConfigError(f"max_step_ms must be a positive number of milliseconds, got {self.max_step_ms!r}")
        if not 1 <= self.micro_batches <= 8:
            raise ConfigError(f"micro_batches must be between 1 and 8, got {self.micro_batches!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError(f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")



@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. temperature 0 means greedy.

    The random stream of a request is derived from (seed, position) alone, so its tokens do not
    depend on what else shares its batch, nor on which worker produces them after a failover.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the top n
    # vLLM's semantics: presence and frequency count the generated tokens, repetition the prompt's too
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)  # (token id, added to its logit)
    min_tokens: int = 0  # end-of-sequence and stop token ids are masked until this many are generated
    # Structured outputs: llguidance's grammar text (engine/guided.py's guide_from), None: unconstrained
    guide: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise ConfigError(f"temperature must be between 0 and 100, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise ConfigError(f"logprobs must be an integer between 0 and 20, got {self.logprobs!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ConfigError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                raise ConfigError(f"{name} must be between -2 and 2, got {value!r}")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not 0.0 < rp <= 10.0:
            raise ConfigError(f"repetition_penalty must be in (0, 10], got {rp!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 and isinstance(b, (int, float))
                   and -100.0 <= b <= 100.0 for t, b in self.logit_bias):
            raise ConfigError(f"logit_bias must map token ids to biases in [-100, 100], got {self.logit_bias!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or \
                not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(f"min_tokens must be an integer between 0 and max_tokens ({self.max_tokens}), "
                              f"got {self.min_tokens!r}")
        if self.guide is not None and (not isinstance(self.guide, str) or not self.guide):
            raise ConfigError(f"guide must be a grammar's text, got {self.guide!r}")

    @property
    def adjusts_logits(self) -> bool:
        """Whether logits change before sampling (bias, penalties, min_tokens, a grammar)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.min_tokens or self.guide)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": self.ignore_eos,
            "logprobs": self.logprobs,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": [[t, b] for t, b in self.logit_bias],
            "min_tokens": self.min_tokens,
            "guide": self.guide,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingParams":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "stop_token_ids" in known:
            known["stop_token_ids"] = tuple(known["stop_token_ids"])
        if "logit_bias" in known:
            known["logit_bias"] = tuple((int(t), float(b)) for t, b in known["logit_bias"])
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**known)
