"""Model families: the architecture settings only some have, and each family's config.json parsing.

`ModelConfig` (model/config.py) holds what every family has. The settings only some families have live in
the small frozen configs here: multi-head latent attention (DeepSeek-V3), how a router turns logits
into experts and weights, and what an expert computes and how it is stored (GPT-OSS, MXFP4). One parser
per family (`FAMILY_PARSERS`) reads a config.json the way that family's transformers config class does
and returns the family-specific `ModelConfig` keyword arguments.

The parsers read through `hf_fields.FieldReader`, so their errors name the field and the bad value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from resilient_moe.errors import ConfigError
from resilient_moe.model.hf_fields import FieldReader

ROUTER_SCORINGS = ("softmax", "sigmoid_grouped", "topk_softmax")
EXPERT_ACTIVATIONS = ("silu", "clamped_swiglu")
EXPERT_LAYOUTS = ("separate", "fused", "mxfp4")
MXFP4_BLOCK = 32  # elements that share one scale (OCP Microscaling, MXFP4)


def _require_positive(owner: str, **values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{owner}: {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class LatentAttentionConfig:
    """DeepSeek's multi-head latent attention (MLA).

    Each token is compressed to one latent of `kv_lora_rank` (normed) plus one rotary key of
    `qk_rope_head_dim` shared by every head; the per-head keys (nope part) and values are linear
    functions of the latent (`kv_b_proj`). So the KV cache keeps only latent + rotary key per token.
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: queries come straight from the hidden state (q_proj)
    rope_interleave: bool = True  # the checkpoint's rotary dims pair up as (x0, x1), (x2, x3), ...
    bias: bool = False  # attention_bias: biases on q_a_proj, kv_a_proj_with_mqa and o_proj

    def __post_init__(self) -> None:
        _require_positive(
            "config.json", kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
        )
        if self.q_lora_rank is not None:
            _require_positive("config.json", q_lora_rank=self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"config.json: qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_width(self) -> int:
        """Elements one token keeps per layer: the latent, then the rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class RouterConfig:
    """How a router turns its logits [T, E] into K experts and their weights per token.

    * softmax: softmax over all experts, then the top K (Mixtral, Qwen, OLMoE).
    * sigmoid_grouped: sigmoid scores. Experts are picked by score + `e_score_correction_bias`, only
      within the best `topk_group` of `n_group` equal groups (a group ranks by the sum of its two best);
      the weights are the picked experts' plain scores (normalised when norm_topk_prob), times
      `routed_scaling_factor` (DeepSeek-V3).
    * topk_softmax: the top K logits, softmax over those K (GPT-OSS).
    """

    scoring: str = "softmax"
    bias: bool = False  # the router's linear layer has a bias (GPT-OSS)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring not in ROUTER_SCORINGS:
            raise ConfigError(f"router scoring must be one of {', '.join(ROUTER_SCORINGS)}, got {self.scoring!r}")
        _require_positive("config.json", n_group=self.n_group, topk_group=self.topk_group)
        if self.topk_group > self.n_group:
            raise ConfigError(f"config.json: topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        if not self.routed_scaling_factor > 0:
            raise ConfigError(f"config.json: routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}")

    def check_experts(self, num_experts: int, top_k: int) -> None:
        """Raise ConfigError unless the grouping fits `num_experts` and leaves room for `top_k` picks."""
        if self.scoring != "sigmoid_grouped":
            return
        if num_experts % self.n_group:
            raise ConfigError(f"config.json: n_routed_experts ({num_experts}) must be a multiple of n_group ({self.n_group})")
        per_group = num_experts // self.n_group
        if per_group < 2:
            raise ConfigError(f"config.json: each of the n_group groups needs >= 2 experts (a group ranks by its "
                              f"two best scores); got {per_group}")
        if self.topk_group * per_group < top_k:
            raise ConfigError(f"config.json: topk_group ({self.topk_group}) groups of {per_group} experts cannot "
                              f"hold num_experts_per_tok ({top_k}) picks")


@dataclass(frozen=True)
class ExpertConfig:
    """What one routed expert computes, and how its weights are stored on disk.

    activation: `silu` is silu(gate) * up; `clamped_swiglu` is GPT-OSS's
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = clamp(gate, max=limit).
    layout: `separate` tensors per expert (gate, up, down); `fused` layer-wide tensors [E, ...] with
    gate and up interleaved (GPT-OSS); `mxfp4` the same, stored as MXFP4 blocks and scales.
    """

    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    bias: bool = False  # biases on the gate/up and down projections (GPT-OSS)
    layout: str = "separate"

    def __post_init__(self) -> None:
        if self.activation not in EXPERT_ACTIVATIONS:
            raise ConfigError(f"expert activation must be one of {', '.join(EXPERT_ACTIVATIONS)}, got {self.activation!r}")
        if self.layout not in EXPERT_LAYOUTS:
            raise ConfigError(f"expert layout must be one of {', '.join(EXPERT_LAYOUTS)}, got {self.layout!r}")
        if not self.swiglu_limit > 0:
            raise ConfigError(f"config.json: swiglu_limit must be > 0, got {self.swiglu_limit!r}")


# ---- config.json parsing ---------------------------------------------------------------------


def quantized_layout(raw: dict[str, Any], family: str, source: str) -> str | None:
    """The expert layout a `quantization_config` asks for (None when there is none); rejects the rest."""
    quant = raw.get("quantization_config")
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == "mxfp4" and family == "gpt_oss":
        return "mxfp4"
    raise ConfigError(
        f"{source}: quantization_config with quant_method {method!r} is not supported for {family} "
        "(supported: mxfp4 experts of gpt_oss)"
    )


def parse_mixtral(reader: FieldReader, num_layers: int) -> dict[str, Any]:
    window = reader.optional_int("sliding_window")
    return dict(
        num_experts=reader.int("num_local_experts"),
        moe_intermediate_size=reader.int("intermediate_size"),
        intermediate_size=reader.int("intermediate_size"),
        shared_expert_intermediate_size=0,
        norm_topk_prob=True,
        qkv_bias=False,
        o_bias=False,
        qk_norm=None,
        sparse_layers=tuple(True for _ in range(num_layers)),
        sliding_windows=tuple(window for _ in range(num_layers)),
        router_weights_fp32=True,  # Mixtral keeps the top-k weights in float32; the others cast to the hidden dtype
    )


def parse_qwen2_moe(reader: FieldReader, num_layers: int) -> dict[str, Any]:
    num_experts = reader.int("num_experts")
    return dict(
        num_experts=num_experts,
        moe_intermediate_size=reader.int("moe_intermediate_size"),
        intermediate_size=reader.int("intermediate_size"),
        shared_expert_intermediate_size=reader.int("shared_expert_intermediate_size", default=0),
        norm_topk_prob=reader.bool("norm_topk_prob", default=False),
        qkv_bias=reader.bool("qkv_bias", default=True),
        o_bias=False,
        qk_norm=None,
        sparse_layers=_qwen_sparse_layers(reader, num_layers, num_experts),
        sliding_windows=_qwen2_sliding_windows(reader, num_layers),
    )


def parse_qwen3_moe(reader: FieldReader, num_layers: int) -> dict[str, Any]:
    num_experts = reader.int("num_experts", alias="num_local_experts")
    bias = reader.bool("attention_bias", default=False)
    window = reader.optional_int("sliding_window") if reader.bool("use_sliding_window", default=False) else None
    return dict(
        num_experts=num_experts,
        moe_intermediate_size=reader.int("moe_intermediate_size"),
        intermediate_size=reader.int("intermediate_size"),
        shared_expert_intermediate_size=0,
        norm_topk_prob=reader.bool("norm_topk_prob", default=False),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",  # per head
        sparse_layers=_qwen_sparse_layers(reader, num_layers, num_experts),
        sliding_windows=tuple(window for _ in range(num_layers)),
    )


def parse_olmoe(reader: FieldReader, num_layers: int) -> dict[str, Any]:
    bias = reader.bool("attention_bias", default=False)
    return dict(
        num_experts=reader.int("num_experts"),
        moe_intermediate_size=reader.int("intermediate_size"),
        intermediate_size=reader.int("intermediate_size"),
        shared_expert_intermediate_size=0,
        norm_topk_prob=reader.bool("norm_topk_prob", default=False),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",  # over the whole projection
        sparse_layers=tuple(True for _ in range(num_layers)),
        sliding_windows=tuple(None for _ in range(num_layers)),
        clip_qkv=reader.optional_float("clip_qkv"),
    )


def _qwen_sparse_layers(reader: FieldReader, num_layers: int, num_experts: int) -> tuple[bool, ...]:
    step = reader.int("decoder_sparse_step", default=1)
    if step <= 0:
        raise ConfigError(f"{reader.source}: decoder_sparse_step must be > 0, got {step}")
    mlp_only = reader.raw.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) for i in mlp_only):
        raise ConfigError(f"{reader.source}: mlp_only_layers must be a list of layer indices, got {mlp_only!r}")
    return tuple(
        (i not in mlp_only) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)
    )


def _qwen2_sliding_windows(reader: FieldReader, num_layers: int) -> tuple[int | None, ...]:
    if not reader.bool("use_sliding_window", default=False):
        return tuple(None for _ in range(num_layers))
    window = reader.int("sliding_window")
    layer_types = reader.raw.get("layer_types")
    if layer_types is None:
        max_window_layers = reader.int("max_window_layers", default=num_layers)
        layer_types = [
            "sliding_attention" if (i + 1) % 2 and i < max_window_layers else "full_attention"
            for i in range(num_layers)
        ]
    if len(layer_types) != num_layers:
        raise ConfigError(f"{reader.source}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def parse_deepseek_v3(reader: FieldReader, num_layers: int) -> dict[str, Any]:
    """ModelConfig keyword arguments of a DeepSeek-V3 config.json (DeepseekV3Config's fields and defaults)."""
    num_experts = reader.int("n_routed_experts", alias="num_local_experts")
    moe_ffn = reader.int("moe_intermediate_size")
    n_shared = reader.int("n_shared_experts", default=1)
    if n_shared < 0:
        raise ConfigError(f"{reader.source}: n_shared_experts must be >= 0, got {n_shared}")
    first_dense = reader.int("first_k_dense_replace", default=3)
    if not 0 <= first_dense <= num_layers:
        raise ConfigError(f"{reader.source}: first_k_dense_replace must be in [0, {num_layers}], got {first_dense}")
    attention_bias = reader.bool("attention_bias", default=False)
    mla = LatentAttentionConfig(
        kv_lora_rank=reader.int("kv_lora_rank"),
        qk_nope_head_dim=reader.int("qk_nope_head_dim"),
        qk_rope_head_dim=reader.int("qk_rope_head_dim"),
        v_head_dim=reader.int("v_head_dim"),
        q_lora_rank=reader.optional_int("q_lora_rank"),
        rope_interleave=reader.bool("rope_interleave", default=True),
        bias=attention_bias,
    )
    router = RouterConfig(
        scoring="sigmoid_grouped",
        n_group=reader.int("n_group", default=1),
        topk_group=reader.int("topk_group", default=1),
        routed_scaling_factor=reader.float("routed_scaling_factor", default=1.0),
    )
    router.check_experts(num_experts, reader.int("num_experts_per_tok"))
    mtp = reader.int("num_nextn_predict_layers", default=0, alias="num_mtp_layers")
    return dict(
        # Every head's keys and values expand from one shared latent: one "kv head", and the rotary
        # tables span the rotary part of a head only.
        num_kv_heads=1,
        head_dim=mla.qk_rope_head_dim,
        num_experts=num_experts,
        moe_intermediate_size=moe_ffn,
        intermediate_size=reader.int("intermediate_size"),
        shared_expert_intermediate_size=moe_ffn * n_shared,
        norm_topk_prob=reader.bool("norm_topk_prob", default=True),
        qkv_bias=False,
        o_bias=attention_bias,
        qk_norm=None,
        sparse_layers=tuple(i >= first_dense for i in range(num_layers)),
        sliding_windows=tuple(None for _ in range(num_layers)),
        router_weights_fp32=True,  # the router runs in float32 and its weights stay float32
        mla=mla,
        router=router,
        unused_layers=max(0, mtp),
    )


def parse_gpt_oss(reader: FieldReader, num_layers: int) -> dict[str, Any]:
    """ModelConfig keyword arguments of a GPT-OSS config.json (GptOssConfig's fields and defaults)."""
    layout = quantized_layout(reader.raw, "gpt_oss", reader.source) or "fused"
    hidden = reader.int("hidden_size")
    ffn = reader.int("intermediate_size")
    if layout == "mxfp4" and (hidden % MXFP4_BLOCK or ffn % MXFP4_BLOCK):
        raise ConfigError(f"{reader.source}: MXFP4 experts need hidden_size ({hidden}) and intermediate_size "
                          f"({ffn}) to be multiples of {MXFP4_BLOCK}")
    bias = reader.bool("attention_bias", default=True)
    return dict(
        num_experts=reader.int("num_local_experts", alias="num_experts"),
        moe_intermediate_size=ffn,
        intermediate_size=ffn,
        shared_expert_intermediate_size=0,
        norm_topk_prob=False,  # the softmax over the chosen K already sums to one
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=None,
        sparse_layers=tuple(True for _ in range(num_layers)),
        sliding_windows=_gpt_oss_windows(reader, num_layers),
        router_weights_fp32=False,
        attention_sinks=True,
        router=RouterConfig(scoring="topk_softmax", bias=True),
        experts=ExpertConfig(
            activation="clamped_swiglu",
            swiglu_alpha=reader.float("swiglu_alpha", default=1.702),
            swiglu_limit=reader.float("swiglu_limit", default=7.0),
            bias=True,
            layout=layout,
        ),
    )


def _gpt_oss_windows(reader: FieldReader, num_layers: int) -> tuple[int | None, ...]:
    window = reader.optional_int("sliding_window")
    if window is not None and window <= 0:
        raise ConfigError(f"{reader.source}: sliding_window must be a positive integer or null, got {window}")
    layer_types = reader.raw.get("layer_types")
    if layer_types is None:  # GptOssConfig's default: sliding, full, sliding, ...
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ConfigError(f"{reader.source}: layer_types must list one type per layer ({num_layers}), got {layer_types!r}")
    for kind in layer_types:
        if kind not in ("sliding_attention", "full_attention"):
            raise ConfigError(f"{reader.source}: layer_types entry {kind!r} is not supported "
                              "(supported: sliding_attention, full_attention)")
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


FAMILY_PARSERS = {
    "mixtral": parse_mixtral,
    "qwen2_moe": parse_qwen2_moe,
    "qwen3_moe": parse_qwen3_moe,
    "olmoe": parse_olmoe,
    "deepseek_v3": parse_deepseek_v3,
    "gpt_oss": parse_gpt_oss,
}
DEFAULT_ROPE_THETA = {"mixtral": 1e6, "qwen2_moe": 10000.0, "qwen3_moe": 10000.0, "olmoe": 10000.0,
                      "deepseek_v3": 10000.0, "gpt_oss": 150000.0}
