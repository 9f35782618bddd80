"""What a plan needs of a model's architecture: element counts of each side, KV per token, FLOPs.

Counts come from the checkpoint's own tensor list (model/weights.py `TensorNames`), so they match
what an attention worker and an expert worker hold. A config.json alone is enough: planning for a
model you have not downloaded works from its config.
"""

from __future__ import annotations

from dataclasses import dataclass

from resilient_moe.model.config import ModelConfig


@dataclass(frozen=True)
class ModelShape:
    """Sizes the time and memory models use. Element counts, not bytes: the plan's precision decides.

    attention_params: every tensor an attention worker holds (embeddings, attention, norms, router,
    dense MLP layers, shared experts, LM head). read_params: those it reads in full each step (all but
    the embedding table, of which it reads one row per token). expert_params: one routed expert of one
    layer. kv_row: elements one token keeps per layer. attended(ctx) sums, over layers, the positions a
    token attends to at context ctx (sliding windows cut it).
    """

    name: str
    family: str
    num_layers: int
    sparse_layers: int
    hidden: int
    num_experts: int
    top_k: int
    vocab: int
    attention_params: int
    read_params: int
    expert_params: int
    kv_row: int
    kv_heads: int  # KV heads tensor parallelism can split (latent attention: 1, read whole by every rank)
    heads: int
    score_width: int  # per head and position: multiply-adds of q.k plus p.v
    windows: tuple[int | None, ...]
    max_context: int

    @classmethod
    def from_config(cls, cfg: ModelConfig, name: str = "") -> "ModelShape":
        from resilient_moe.model.weights import TensorNames

        names = TensorNames(cfg)
        attention = sum(_numel(s) for s in names.attention_shapes.values())
        embed = _numel(names.attention_shapes["model.embed_tokens.weight"])
        read = attention - embed + (embed if cfg.tie_word_embeddings else 0)  # a tied table is the LM head too
        if cfg.mla is not None:  # absorbed: q.k over latent + rope key, p.v over the latent
            width = 2 * cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
        else:
            width = 2 * cfg.head_dim
        return cls(
            name=name or cfg.family, family=cfg.family, num_layers=cfg.num_layers,
            sparse_layers=len(cfg.sparse_layer_ids), hidden=cfg.hidden_size, num_experts=cfg.num_experts,
            top_k=cfg.top_k, vocab=cfg.vocab_size, attention_params=attention, read_params=read,
            expert_params=cfg.expert_bytes(1), kv_row=cfg.kv_row_width,
            kv_heads=1 if cfg.mla is not None else cfg.num_kv_heads, heads=cfg.num_heads, score_width=width,
            windows=tuple(cfg.sliding_windows), max_context=cfg.max_position_embeddings,
        )

    def attended(self, ctx: float) -> float:
        """Positions attended per token, summed over layers, at context length ctx."""
        full = self.windows.count(None)
        if full == len(self.windows):
            return full * ctx
        return full * ctx + sum(min(ctx, w) for w in self.windows if w is not None)

    def kv_elements_per_token(self) -> int:
        """KV cache elements one token keeps, all layers (the paged cache keeps every layer's)."""
        return self.num_layers * self.kv_row

    def expert_elements(self) -> int:
        """Every routed expert of every sparse layer: one copy of the expert side."""
        return self.expert_params * self.num_experts * self.sparse_layers


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
