"""Small random-weight checkpoints in real Hugging Face on-disk format, for tests.

`make_tiny_model` writes config.json, generation_config.json, model.safetensors (expert tensor
names and layouts exactly as each family stores them; GPT-OSS experts in MXFP4, as released), and a
byte-level BPE tokenizer (tokenizer.json +
tokenizer_config.json with a chat template) trained on a built-in text, so nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from resilient_moe.model.config import SUPPORTED_FAMILIES, ModelConfig
from resilient_moe.errors import ConfigError
from resilient_moe.model import mxfp4
from resilient_moe.model.weights import TensorNames

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
BOS_ID, EOS_ID = 1, 2

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Training text for the tokenizer: any prose works; this one is about the system itself.
BUILTIN_TEXT = """
A mixture of experts model sends every token to a few experts chosen by a router. The attention
workers keep the key and value cache of every request, and the expert workers keep the experts.
When an expert worker dies, its experts still live as shadow copies on other workers, so the
tokens are sent again to a shadow and the answer is the same. When an attention worker dies, the
requests it served are restored from the last checkpoint of their cache on another worker.
The controller watches every worker, fences the dead, and publishes a new routing table. Nothing
is lost, nothing is repeated, and the text that comes out is the text that would have come out
without any failure. Hello world! The quick brown fox jumps over the lazy dog. 0123456789
Servers answer requests over HTTP, stream tokens as they are made, and report metrics for the
people who keep them running at night.
"""


@dataclass(frozen=True)
class TinySize:
    """Dimensions of a tiny checkpoint (the defaults run fast on one CPU core)."""

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    intermediate_size: int = 128
    vocab_size: int = 512
    max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"--hidden-size ({self.hidden_size}) must be a multiple of --heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"--heads ({self.num_heads}) must be a multiple of --kv-heads ({self.num_kv_heads})")
        if self.top_k > self.num_experts:
            raise ConfigError(f"--top-k ({self.top_k}) must not exceed --experts ({self.num_experts})")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ConfigError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} for a byte-level tokenizer")


def hf_config(family: str, size: TinySize) -> dict:
    """config.json contents as the family's transformers config class writes them."""
    head_dim = size.hidden_size // size.num_heads
    common = {
        "vocab_size": size.vocab_size,
        "hidden_size": size.hidden_size,
        "num_hidden_layers": size.num_layers,
        "num_attention_heads": size.num_heads,
        "num_key_value_heads": size.num_kv_heads,
        "max_position_embeddings": size.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "num_experts_per_tok": size.top_k,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
    }
    if family == "mixtral":
        return {**common, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "num_local_experts": size.num_experts, "intermediate_size": size.intermediate_size,
                "rope_theta": 1e6, "sliding_window": None}
    if family == "qwen2_moe":
        return {**common, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                "num_experts": size.num_experts, "moe_intermediate_size": size.intermediate_size,
                "intermediate_size": 2 * size.intermediate_size,
                "shared_expert_intermediate_size": 2 * size.intermediate_size,
                "decoder_sparse_step": 1, "mlp_only_layers": [1] if size.num_layers > 1 else [],
                "norm_topk_prob": False, "qkv_bias": True, "use_sliding_window": False, "rope_theta": 1e6}
    if family == "qwen3_moe":
        return {**common, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                "num_experts": size.num_experts, "moe_intermediate_size": size.intermediate_size,
                "intermediate_size": 2 * size.intermediate_size, "head_dim": head_dim,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                "attention_bias": False, "use_sliding_window": False, "rope_theta": 1e6}
    if family == "olmoe":
        return {**common, "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
                "num_experts": size.num_experts, "intermediate_size": size.intermediate_size,
                "norm_topk_prob": False, "attention_bias": False, "clip_qkv": None, "rope_theta": 10000.0}
    if family == "deepseek_v3":
        n_group, topk_group = _expert_groups(size)
        return {**common, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                # transformers repeats keys and values num_heads // num_key_value_heads times after expanding
                # the latent to every head, so it needs these equal; latent attention itself has no kv heads.
                "num_key_value_heads": size.num_heads,
                "n_routed_experts": size.num_experts, "n_shared_experts": 1,
                "moe_intermediate_size": size.intermediate_size, "intermediate_size": 2 * size.intermediate_size,
                "first_k_dense_replace": 1 if size.num_layers > 1 else 0,
                "q_lora_rank": 3 * head_dim, "kv_lora_rank": 2 * head_dim, "qk_nope_head_dim": head_dim,
                "qk_rope_head_dim": max(2, head_dim // 4 * 2), "v_head_dim": head_dim, "rope_interleave": True,
                "n_group": n_group, "topk_group": topk_group, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                "attention_bias": False, "num_nextn_predict_layers": 0,
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                    "original_max_position_embeddings": max(1, size.max_position_embeddings // 4),
                                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}}
    if family == "gpt_oss":
        return {**common, "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "head_dim": head_dim,
                "num_local_experts": size.num_experts, "intermediate_size": size.intermediate_size,
                "sliding_window": 32, "attention_bias": True, "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
                "rms_norm_eps": 1e-5,
                "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(size.num_layers)],
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                    "beta_slow": 1.0, "truncate": False,
                                    "original_max_position_embeddings": max(1, size.max_position_embeddings // 32)},
                "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    raise ConfigError(f"unsupported model family {family!r} (supported: {', '.join(SUPPORTED_FAMILIES)})")


def _expert_groups(size: TinySize) -> tuple[int, int]:
    """(n_group, topk_group) for DeepSeek's grouped routing: up to 4 groups of >= 2 experts, half of them
    kept (all when half cannot hold top_k picks)."""
    n_group = next((g for g in (4, 2) if size.num_experts % g == 0 and size.num_experts // g >= 2), 1)
    topk_group = max(1, n_group // 2)
    if topk_group * (size.num_experts // n_group) < size.top_k:
        topk_group = n_group
    return n_group, topk_group


def random_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, drawn from one seeded generator in a fixed (sorted) order.

    MXFP4 experts are drawn in float (the fused layout) and then quantized, as a released checkpoint's.
    """
    quantize = cfg.experts.layout == "mxfp4"
    if quantize:
        cfg = dataclasses.replace(cfg, experts=dataclasses.replace(cfg.experts, layout="fused"))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(TensorNames(cfg).all_shapes().items()):
        if len(shape) == 1:  # norm scales (and biases): near 1 for norms, near 0 for biases
            base = 0.0 if name.endswith("bias") else 1.0
            tensors[name] = base + 0.1 * torch.randn(shape, generator=generator)
        else:
            tensors[name] = 0.05 * torch.randn(shape, generator=generator)
    if quantize:
        for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            # [E, in, out] -> stored [E, out, in/32, 16] blocks and [E, out, in/32] scales
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = mxfp4.quantize(tensors.pop(name).transpose(1, 2))
    return tensors


def train_tokenizer(vocab_size: int, texts=None):
    """A byte-level BPE tokenizer with our special tokens, trained on `texts` (default: a built-in text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([BUILTIN_TEXT] * 4 if texts is None else texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tokenizer


def make_tiny_model(out_dir: str | os.PathLike[str], family: str, seed: int = 0, size: TinySize | None = None,
                    overrides: dict | None = None) -> Path:
    """Write a random-weight checkpoint of `family` to `out_dir` (created if needed); `overrides` replace
    config.json fields (e.g. DeepSeek-V3's own attention widths), validated as any checkpoint's are."""
    size = size or TinySize()
    raw = {**hf_config(family, size), **(overrides or {})}
    cfg = ModelConfig.from_hf_dict(raw)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(random_weights(cfg, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(out, train_tokenizer(size.vocab_size), size.max_position_embeddings)
    return out


def write_tokenizer(out: Path, tokenizer, model_max_length: int) -> None:
    """tokenizer.json and a tokenizer_config.json with our special tokens and chat template."""
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
