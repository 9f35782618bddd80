"""The architecture of one MoE checkpoint: `ModelConfig`, read from a Hugging Face checkpoint's
config.json (and generation_config.json), family-neutral, validated where it is built; every error names
the field and the bad value. What only some families have sits in model/families.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resilient_moe.errors import ConfigError
from resilient_moe.model.families import (
    DEFAULT_ROPE_THETA,
    FAMILY_PARSERS,
    ExpertConfig,
    LatentAttentionConfig,
    RouterConfig,
    quantized_layout,
)
from resilient_moe.model.hf_fields import FieldReader, read_json

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

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
        raw = read_json(config_path)
        generation = {}
        if (path / "generation_config.json").is_file():
            generation = read_json(path / "generation_config.json")
        return cls.from_hf_dict(raw, generation, source=str(config_path))

    @classmethod
    def from_hf_dict(
        cls, raw: dict[str, Any], generation: dict[str, Any] | None = None, source: str = "config.json"
    ) -> "ModelConfig":
        """Map a Hugging Face config dict onto a ModelConfig, applying each family's defaults."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object at the top level")
        family = _family_of(raw, source)
        reader = FieldReader(raw, source)

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
