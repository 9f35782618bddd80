"""Frozen configuration objects.

`ModelConfig` is read from a Hugging Face checkpoint's config.json (and generation_config.json);
`EngineConfig` holds the knobs of one engine (KV cache, batching). Both validate themselves where
they are built, and every error names the field and the bad value.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resilient_moe.errors import ConfigError
from resilient_moe.kernels import KERNEL_CHOICES
from resilient_moe.model.families import (
    DEFAULT_ROPE_THETA,
    FAMILY_PARSERS,
    ExpertConfig,
    LatentAttentionConfig,
    RouterConfig,
    quantized_layout,
)

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_DTYPES = ("float32", "bfloat16")

_ARCHITECTURE_TO_FAMILY = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "GptOssForCausalLM": "gpt_oss",
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters, normalised from either `rope_parameters` (transformers 5)
    or `rope_theta` + `rope_scaling` (transformers 4)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"config.json: rope type {self.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if not self.theta > 0:
            raise ConfigError(f"config.json: rope_theta must be > 0, got {self.theta!r}")
        if self.rope_type != "default" and not self.factor > 0:
            raise ConfigError(f"config.json: rope scaling factor must be > 0, got {self.factor!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one MoE checkpoint, in family-neutral terms.

    Shape letters used across the model code: T tokens, D hidden, H query heads, G kv heads,
    d head dim, E experts, K experts per token (top-k), F expert FFN width, V vocabulary.

    What only some families have sits in sub-configs (model/families.py): `mla` (DeepSeek-V3's latent
    attention; then G = 1 and d is the rotary part of a head), `router`, `experts`.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    intermediate_size: int  # width of dense (non-MoE) MLP layers
    shared_expert_intermediate_size: int  # 0: no shared expert
    norm_topk_prob: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: str | None  # None, "head" (per head, Qwen3) or "full" (over the whole projection, OLMoE)
    clip_qkv: float | None
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    sparse_layers: tuple[bool, ...]  # True where the layer's MLP is an MoE block
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    router_weights_fp32: bool  # Mixtral keeps the top-k weights in float32; the others cast to the hidden dtype
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    checkpoint_dtype: str = "float32"
    mla: LatentAttentionConfig | None = None
    router: RouterConfig = RouterConfig()
    experts: ExpertConfig = ExpertConfig()
    attention_sinks: bool = False  # a learned per-head logit joins every softmax (GPT-OSS)
    # Layers the checkpoint stores past num_layers that are not run (DeepSeek's multi-token-prediction
    # modules); their tensors are skipped at load.
    unused_layers: int = 0

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"unsupported model family {self.family!r} (supported: {', '.join(SUPPORTED_FAMILIES)})"
            )
        positive = (
            "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "num_experts", "top_k", "moe_intermediate_size", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok ({self.top_k}) exceeds the number of experts ({self.num_experts})"
            )
        self.router.check_experts(self.num_experts, self.top_k)
        if self.mla is not None and (self.num_kv_heads, self.head_dim) != (1, self.mla.qk_rope_head_dim):
            raise ConfigError("latent attention keeps one shared kv head whose rotary part is qk_rope_head_dim wide")
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.sparse_layers) != self.num_layers or len(self.sliding_windows) != self.num_layers:
            raise ConfigError("config.json: per-layer settings do not match num_hidden_layers")
        if not all(self.sparse_layers) and self.intermediate_size <= 0:
            raise ConfigError(f"config.json: intermediate_size must be > 0 for dense layers, got {self.intermediate_size!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"config.json: rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.qk_norm not in (None, "head", "full"):
            raise ConfigError(f"qk_norm must be None, 'head' or 'full', got {self.qk_norm!r}")
        if self.qk_norm == "full" and self.num_heads * self.head_dim != self.hidden_size:
            raise ConfigError("config.json: full-width q/k norm needs num_attention_heads * head_dim == hidden_size")
        for eos in self.eos_token_ids:
            if not 0 <= eos < self.vocab_size:
                raise ConfigError(f"eos_token_id {eos} is outside the vocabulary (size {self.vocab_size})")

    @property
    def sparse_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, sparse in enumerate(self.sparse_layers) if sparse)

    def expert_bytes(self, dtype_bytes: int = 4) -> int:
        """Bytes of one routed expert's three projections (and their biases) in one layer, as held in memory."""
        D, F = self.hidden_size, self.moe_intermediate_size
        biases = 2 * F + D if self.experts.bias else 0
        return (3 * D * F + biases) * dtype_bytes

    @property
    def kv_row_width(self) -> int:
        """Elements one token keeps in the KV cache of one layer: its K and V, or with latent attention
        its latent and rotary key."""
        if self.mla is not None:
            return self.mla.latent_width
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token occupies across all layers, in float32 (halve for bfloat16)."""
        return self.num_layers * self.kv_row_width * 4

    # ---- construction from a checkpoint -------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str]) -> "ModelConfig":
        """Read config.json (and generation_config.json when present) from a checkpoint directory."""
        path = Path(model_dir)
        if not path.is_dir():
            raise ConfigError(f"model directory {str(path)!r} does not exist or is not a directory")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"{config_path}: not found (a Hugging Face checkpoint needs config.json)")
        raw = _read_json(config_path)
        generation = {}
        if (path / "generation_config.json").is_file():
            generation = _read_json(path / "generation_config.json")
        return cls.from_hf_dict(raw, generation, source=str(config_path))

    @classmethod
    def from_hf_dict(
        cls, raw: dict[str, Any], generation: dict[str, Any] | None = None, source: str = "config.json"
    ) -> "ModelConfig":
        """Map a Hugging Face config dict onto a ModelConfig, applying each family's defaults."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object at the top level")
        family = _family_of(raw, source)
        reader = _FieldReader(raw, source)

        num_layers = reader.int("num_hidden_layers")
        hidden = reader.int("hidden_size")
        heads = reader.int("num_attention_heads")
        kv_heads = reader.int("num_key_value_heads", default=heads)
        head_dim = reader.optional_int("head_dim") or hidden // heads
        hidden_act = reader.str("hidden_act", default="silu")
        if hidden_act != "silu":
            raise ConfigError(f"{source}: hidden_act {hidden_act!r} is not supported (supported: 'silu')")

        quantized_layout(raw, family, source)  # rejects quantized checkpoints this runtime cannot read
        arch = {"num_kv_heads": kv_heads, "head_dim": head_dim, "router_weights_fp32": False, "clip_qkv": None}
        arch.update(FAMILY_PARSERS[family](reader, num_layers))
        theta_default = DEFAULT_ROPE_THETA[family]
        generation = generation or {}
        eos = _token_ids(generation.get("eos_token_id", raw.get("eos_token_id")), "eos_token_id", source)
        bos = raw.get("bos_token_id", generation.get("bos_token_id"))
        max_pos = reader.int("max_position_embeddings")
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        return cls(
            family=family,
            vocab_size=reader.int("vocab_size"),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            top_k=reader.int("num_experts_per_tok"),
            rms_norm_eps=reader.float("rms_norm_eps", default=1e-6),
            rope=_rope_config(raw, theta_default, max_pos, source),
            max_position_embeddings=max_pos,
            tie_word_embeddings=reader.bool("tie_word_embeddings", default=False),
            eos_token_ids=tuple(e for e in eos if 0 <= e < reader.int("vocab_size")),
            bos_token_id=bos if isinstance(bos, int) else None,
            checkpoint_dtype=str(dtype),
            **arch,
        )


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
    max_prefill_tokens_per_step: int = 512  # prompt tokens one step computes (chunked prefill), decodes aside
    max_model_len: int | None = None  # defaults to the checkpoint's max_position_embeddings
    micro_batches: int = 1
    torch_threads: int = 1
    # auto: native on CPU, triton on CUDA; native | torch (not batch-invariant) | triton (see resilient_moe/kernels)
    kernels: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens_per_step",
                     "torch_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("kv_cache_tokens", "kv_cache_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 1 <= self.micro_batches <= 8:
            raise ConfigError(f"micro_batches must be between 1 and 8, got {self.micro_batches!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")


# ---- helpers ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def _family_of(raw: dict[str, Any], source: str) -> str:
    model_type = raw.get("model_type")
    if model_type in SUPPORTED_FAMILIES:
        return model_type
    for arch in raw.get("architectures") or []:
        if arch in _ARCHITECTURE_TO_FAMILY:
            return _ARCHITECTURE_TO_FAMILY[arch]
    shown = model_type if model_type is not None else (raw.get("architectures") or None)
    raise ConfigError(
        f"{source}: unsupported model family {shown!r} (supported: {', '.join(SUPPORTED_FAMILIES)})"
    )


class _FieldReader:
    """Typed access to config.json fields with errors that name the field."""

    _missing = object()

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source

    def _get(self, name: str, default: Any, alias: str | None = None) -> Any:
        if name in self.raw and self.raw[name] is not None:
            return self.raw[name]
        if alias is not None and self.raw.get(alias) is not None:
            return self.raw[alias]
        if default is self._missing:
            raise ConfigError(f"{self.source}: required field {name!r} is missing")
        return default

    def int(self, name: str, default: Any = _missing, alias: str | None = None) -> int:
        value = self._get(name, default, alias)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self.source}: {name} must be an integer, got {value!r}")
        return value

    def optional_int(self, name: str) -> int | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self.source}: {name} must be an integer or null, got {value!r}")
        return value

    def float(self, name: str, default: Any = _missing) -> float:
        value = self._get(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{self.source}: {name} must be a number, got {value!r}")
        return float(value)

    def optional_float(self, name: str) -> float | None:
        value = self.raw.get(name)
        return None if value is None else self.float(name)

    def bool(self, name: str, default: Any = _missing) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.source}: {name} must be true or false, got {value!r}")
        return value

    def str(self, name: str, default: Any = _missing) -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.source}: {name} must be a string, got {value!r}")
        return value


def _token_ids(value: Any, name: str, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ConfigError(f"{source}: {name} must be an integer or a list of integers, got {value!r}")


def _rope_config(raw: dict[str, Any], theta_default: float, max_pos: int, source: str) -> RopeConfig:
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", theta_default))
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor {partial!r} is not supported (only 1.0)")
    original = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn") and original is None:
        original = max_pos
    factor = params.get("factor")
    if factor is None and rope_type == "yarn":  # as transformers: the context extension ratio
        factor = max_pos / original
    try:
        return RopeConfig(
            rope_type=rope_type,
            theta=float(params.get("rope_theta") or theta_default),
            factor=float(factor or 1.0),
            original_max_position_embeddings=original,
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=params.get("attention_factor"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{source}: invalid rope parameters {params!r}: {e}") from None


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
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingParams":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "stop_token_ids" in known:
            known["stop_token_ids"] = tuple(known["stop_token_ids"])
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**known)


# ---- deployment -----------------------------------------------------------------------------

TRANSPORTS = ("shm", "tcp")
PLACEMENTS = ("contiguous", "round_robin")
LAUNCHERS = ("local", "ray")


@dataclass(frozen=True)
class DeploymentConfig:
    """A local cluster: how many workers of each role, how they talk, how failures are detected.

    Loaded from YAML (configs/*.yaml) and overridden by CLI flags; every field is validated here
    and errors name the field.
    """

    model: str = ""
    attention_workers: int = 1
    expert_workers: int = 2
    micro_batches: int = 2
    transport: str = "shm"
    placement: str = "contiguous"
    host: str = "127.0.0.1"
    engine: EngineConfig = field(default_factory=EngineConfig)
    ring_bytes: int = 16 << 20  # per direction per link
    heartbeat_interval_s: float = 0.05
    heartbeat_timeout_s: float = 1.0
    probe_interval_s: float = 0.010
    probe_misses: int = 3
    part_deadline_s: float = 0.25  # least time an expert worker gets to answer a part before it is resent
    startup_timeout_s: float = 120.0
    resilience: bool = True  # False: the restart-everything baseline (no shadows; any death restarts all)
    # How the baseline restarts: "warm" (the fair one) every worker at once, forked from the warm fork
    # server; "cold" (naive, for comparison) fresh interpreters, expert workers first, then attention.
    baseline_restart: str = "warm"
    shadow_budget_bytes: int | None = None  # spare memory per expert worker for shadows; None: one copy of each
    shadow_policy: str = "spread"  # or "load_aware" (EPLB-style: hot experts get more copies, copies share tokens)
    rebalance_interval_s: float = 0.0  # load_aware: re-place experts by observed load this often (0: on demand only)
    load_half_life_s: float = 30.0  # half-life of the controller's decayed per-expert load estimate
    expert_wait_s: float = 15.0  # longest a micro-batch waits for a replacement when an expert has no live copy
    max_attention_workers: int | None = None  # most attention workers scaling may reach (KV store regions); None: as many as attention_workers
    drain_timeout_s: float = 30.0  # longest a draining worker (or server) takes to finish or hand over its requests
    kv_checkpoint: bool = True  # checkpoint attention workers' KV into the KV store (needs Redis)
    kv_store_bytes: int = 256 << 20  # host memory of each KV store (allocated as it is written)
    # KV store processes ("kv-store", "kv-store-1", ...); each serves its memory over TCP too. None: the
    # launcher's default: 1 locally; under Ray one on each worker node (at least kv_replicas + 1).
    kv_stores: int | None = None
    # Copies of each checkpoint in stores other than the writer's primary (another node's). None: the
    # launcher's default: 0 locally (the one store outlives any worker); 1 under Ray (it outlives a node).
    kv_replicas: int | None = None
    redis_url: str = ""  # "": the launcher starts a private redis-server when checkpointing is on
    log_level: str = "INFO"
    # "auto": each attention and expert worker runs on cores of its own (launch/cpus.py) with as many
    # torch and native GEMM threads as it has cores; "none": no pinning, engine.torch_threads threads.
    cpu_affinity: str = "auto"
    # "local": every role as a process on this host (launch/local.py); "ray": as Ray actors across the
    # nodes of a Ray cluster (launch/ray_cluster.py, needs the `ray` extra).
    launcher: str = "local"
    ray_address: str = ""  # launcher ray: the cluster to join ("auto", "HOST:PORT"); "": start a local Ray instance

    def __post_init__(self) -> None:
        for name in ("attention_workers", "expert_workers", "probe_misses"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.micro_batches, int) or not 1 <= self.micro_batches <= 8:
            raise ConfigError(f"micro_batches must be an integer between 1 and 8, got {self.micro_batches!r}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if not isinstance(self.ring_bytes, int) or self.ring_bytes < (1 << 16):
            raise ConfigError(f"ring_bytes must be an integer >= 65536, got {self.ring_bytes!r}")
        for name in ("heartbeat_interval_s", "heartbeat_timeout_s", "probe_interval_s", "part_deadline_s",
                     "startup_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s})"
            )
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host must be a non-empty string, got {self.host!r}")
        if self.shadow_policy not in ("spread", "load_aware"):
            raise ConfigError(f"shadow_policy must be spread or load_aware, got {self.shadow_policy!r}")
        for name in ("load_half_life_s", "expert_wait_s", "drain_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        value = self.rebalance_interval_s
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"rebalance_interval_s must be a number of seconds >= 0, got {value!r}")
        if value > 0 and self.shadow_policy != "load_aware":
            raise ConfigError(f"rebalance_interval_s ({value}) needs shadow_policy: load_aware; the spread placement "
                              "does not depend on load, so there is nothing to rebalance")
        value = self.max_attention_workers
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < self.attention_workers):
            raise ConfigError(f"max_attention_workers must be an integer >= attention_workers "
                              f"({self.attention_workers}), got {value!r}")
        if self.shadow_budget_bytes is not None and (
            not isinstance(self.shadow_budget_bytes, int) or self.shadow_budget_bytes < 0
        ):
            raise ConfigError(f"shadow_budget_bytes must be an integer >= 0, got {self.shadow_budget_bytes!r}")
        if not isinstance(self.kv_store_bytes, int) or isinstance(self.kv_store_bytes, bool) or self.kv_store_bytes < 1 << 20:
            raise ConfigError(f"kv_store_bytes must be an integer >= 1048576, got {self.kv_store_bytes!r}")
        if self.kv_replicas is None:
            object.__setattr__(self, "kv_replicas", 1 if self.launcher == "ray" else 0)
        if self.kv_stores is None:
            replicas = self.kv_replicas if isinstance(self.kv_replicas, int) else 0
            object.__setattr__(self, "kv_stores", replicas + 1 if self.launcher == "ray" else 1)
        for name, least in (("kv_stores", 1), ("kv_replicas", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.kv_replicas >= self.kv_stores:
            raise ConfigError(f"kv_replicas ({self.kv_replicas}) must be below kv_stores ({self.kv_stores}): a replica "
                              "is never kept in the writer's primary store")
        if not isinstance(self.redis_url, str) or (self.redis_url and not self.redis_url.startswith(
                ("redis://", "rediss://", "unix://"))):
            raise ConfigError(f"redis_url must be empty or a redis://, rediss:// or unix:// URL, got {self.redis_url!r}")
        for name in ("resilience", "kv_checkpoint"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.baseline_restart not in ("warm", "cold"):
            raise ConfigError(f"baseline_restart must be warm or cold, got {self.baseline_restart!r}")
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if not isinstance(self.ray_address, str) or (self.ray_address and self.launcher != "ray"):
            raise ConfigError(f"ray_address ({self.ray_address!r}) needs launcher: ray")
        if self.cpu_affinity not in ("auto", "none"):
            raise ConfigError(f"cpu_affinity must be auto or none, got {self.cpu_affinity!r}")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> "DeploymentConfig":
        """Read a deployment YAML; keyword overrides (CLI flags, None = not given) win over the file."""
        import yaml

        source = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: deployment config not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML ({e})") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of settings at the top level")
        return cls.from_dict(raw, source=source, **overrides)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config", **overrides: Any) -> "DeploymentConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        values = dict(raw)
        engine_raw = values.pop("engine", None) or {}
        if not isinstance(engine_raw, dict):
            raise ConfigError(f"{source}: engine must be a mapping, got {engine_raw!r}")
        engine_known = set(EngineConfig.__dataclass_fields__)
        bad = sorted(set(engine_raw) - engine_known)
        if bad:
            raise ConfigError(f"{source}: unknown engine setting {bad[0]!r} (known: {', '.join(sorted(engine_known))})")
        values.update({k: v for k, v in overrides.items() if v is not None and k != "engine"})
        engine = EngineConfig(**engine_raw)
        if isinstance(overrides.get("engine"), EngineConfig):
            engine = overrides["engine"]
        try:
            return cls(engine=engine, **values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)

    @property
    def attention_regions(self) -> int:
        """Attention workers the KV store keeps a region for: as many as scaling may ever start."""
        return self.max_attention_workers or self.attention_workers


ROLES = ("controller", "attention", "expert", "kv_store")


@dataclass(frozen=True)
class WorkerConfig:
    """What one worker process needs to start: who it is, where the controller is, the deployment."""

    name: str  # "controller", "aw-0", "ew-2"
    role: str
    index: int
    cluster_id: str
    controller_address: str
    deployment: DeploymentConfig
    cpus: tuple[int, ...] = ()  # the cores it is pinned to (launch/cpus.py); () = not pinned
    node: str = ""  # its failure domain: the Ray node id (hex) on Ray; "": this host (its hostname)
    # The controller's only: where the launcher puts each worker ((name, node) pairs; empty: one node),
    # so that shadow copies land on other nodes than their primaries (controller/placement.py).
    worker_nodes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        object.__setattr__(self, "cpus", tuple(self.cpus))
        object.__setattr__(self, "worker_nodes", tuple((str(w), str(n)) for w, n in self.worker_nodes))

    @property
    def threads(self) -> int:
        """Torch and native GEMM threads: one per pinned core, else the engine's setting."""
        return len(self.cpus) if self.cpus else self.deployment.engine.torch_threads

    def to_json(self) -> str:
        import dataclasses

        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerConfig":
        raw = json.loads(text)
        deployment = DeploymentConfig.from_dict(raw.pop("deployment"))
        return cls(deployment=deployment, **raw)
