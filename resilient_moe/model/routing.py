"""Routers: from router logits to each token's K experts and their weights (see RouterConfig).

Pure functions of a token's own logits, so a token picks the same experts with the same weights
whatever else shares its batch. Shape letters: T tokens, E experts, K experts per token, N groups.
"""

from __future__ import annotations

import torch


def softmax_then_topk(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral, Qwen, OLMoE: softmax over all E experts, keep the top K (renormalised when asked).

    logits [T, E] -> (ids [T, K] int64, weights [T, K] float32).
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, k, dim=-1)  # [T, K]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def topk_then_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS: the K largest logits, softmax over those K. logits [T, E] -> (ids, weights) [T, K]."""
    top, ids = torch.topk(logits, k, dim=-1)  # [T, K]
    return ids, torch.softmax(top, dim=-1, dtype=top.dtype)


def grouped_sigmoid_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores; choose within the best groups by score + bias; weight by plain score.

    logits [T, E] float32, correction_bias [E] -> (ids [T, K] int64, weights [T, K] float32).
    """
    T, E = logits.shape
    scores = torch.sigmoid(logits)  # [T, E]
    # Step 1: the bias only steers the choice (load balancing); the weights below ignore it.
    choice = scores + correction_bias  # [T, E]
    # Step 2: a group ranks by the sum of its two best; keep the best topk_group groups.
    group_rank = choice.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(dim=-1)  # [T, N]
    groups = torch.topk(group_rank, topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros_like(group_rank, dtype=torch.bool).scatter_(1, groups, True)  # [T, N]
    keep = keep.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)  # [T, E]
    # Step 3: the top K experts of the kept groups.
    ids = torch.topk(choice.masked_fill(~keep, float("-inf")), k, dim=-1).indices  # [T, K]
    weights = scores.gather(1, ids)  # [T, K]
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scaling
