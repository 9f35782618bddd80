"""References and inputs for the Triton kernel tests (tests/interpreter/kernel_cases.py under the
interpreter, tests/test_triton_gpu.py on a GPU): plain torch in float32, one row or expert at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}  # relative to the reference's largest magnitude


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    scale = want.abs().max().item() or 1.0
    return (got.float() - want.float()).abs().max().item() <= TOL[dtype] * scale


def windows(total: int = 64):
    """(start, rows) for every batch size 1..total, each at its own start: split points vary with the size."""
    return [(((rows * 7) % (total - rows + 1)), rows) for rows in range(1, total + 1)]


def randn(*shape, g, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def moe_reference(x, slots, gate_up, down, gate_up_bias, down_bias, activation, alpha=1.702, limit=7.0):
    out = torch.empty(x.shape, dtype=torch.float32)
    for i, e in enumerate(slots.tolist()):
        h = F.linear(x[i:i + 1].float(), gate_up[e].float(), None if gate_up_bias is None else gate_up_bias[e].float())
        gate, up = h.chunk(2, dim=-1)
        if activation == "silu":
            a = F.silu(gate) * up
        else:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            a = (up + 1) * gate * torch.sigmoid(gate * alpha)
        out[i] = F.linear(a, down[e].float(), None if down_bias is None else down_bias[e].float())[0]
    return out


def moe_weights(g, dtype, experts=5, hidden=40, width=24, bias=False):
    gate_up, down = randn(experts, 2 * width, hidden, g=g, dtype=dtype, scale=0.2), randn(experts, hidden, width, g=g, dtype=dtype, scale=0.2)
    if not bias:
        return gate_up, down, None, None
    return gate_up, down, randn(experts, 2 * width, g=g, dtype=dtype), randn(experts, hidden, g=g, dtype=dtype)


def attention_reference(q, k_cache, v_cache, table, row_seq, positions, scale, window=None, sinks=None):
    T, H, D = q.shape
    G = k_cache.shape[0]
    R = H // G
    out = []
    for t in range(T):
        pos = int(positions[t])
        lo = 0 if not window else max(0, pos - window + 1)
        slots = table[row_seq[t], lo:pos + 1]
        k, v = k_cache[:, slots].float(), v_cache[:, slots].float()  # [G, n, d]
        scores = torch.einsum("grd,gnd->grn", q[t].float().view(G, R, D), k) * scale
        if sinks is not None:
            scores = torch.cat([sinks.float().view(G, R, 1), scores], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., (0 if sinks is None else 1):]
        out.append(torch.einsum("grn,gnd->grd", probs, v).reshape(H, -1))
    return torch.stack(out)


def attention_case(g, dtype, rows=4, groups=2, per_group=2, dim=16, slots=256, seqs=2, length=100):
    k_cache = randn(groups, slots, dim, g=g, dtype=dtype)
    v_cache = randn(groups, slots, dim, g=g, dtype=dtype)
    table = torch.randperm(slots, generator=g)[: seqs * length].view(seqs, length)  # scattered, as blocks are
    q = randn(rows, groups * per_group, dim, g=g, dtype=dtype)
    return q, k_cache, v_cache, table
