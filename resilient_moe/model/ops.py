"""Batch-invariant tensor primitives shared by the attention side and the expert side.

Why this file exists: every resilience guarantee is checked as "token-identical to a failure-free
run". After a failover the same token is computed in a different batch (another micro-batch split,
another expert worker's grouping, a prefill-style recompute instead of decode steps). If a row's
result depended on its batch, a near-tie could flip a greedy token. So each primitive here gives a
row the same bits whatever else shares its batch:

* GEMMs: on CPU in float32, `Linear` runs csrc/kernels.c, one fixed fused-multiply-add chain per
  output element whatever the shape. Elsewhere torch is used; measured on MKL (one thread), a row of
  ``x @ w.T`` is identical for any batch of >= 4 rows but differs for 1-3 rows (another kernel), so
  those calls and the attention matmuls pad to 4 rows.
* Attention on CPU in float32: `paged_attention` runs csrc/kernels.c, each row over its own
  sequence's keys read through the block table (no padding), one fixed reduction per row. The facts
  below are for the gathering path the other cases take (bfloat16, other devices with torch).
* ``q @ k.T``: identical across key lengths that are multiples of 16 (>= 16), not otherwise; keys
  are padded to a multiple of `KEY_PAD`, the padding masked to -inf.
* softmax over -inf padding and ``p @ v`` over zero padding are identical for any padded length.
  An attention sink (GPT-OSS) goes in front of the keys, so the real logits keep fixed positions and
  only -inf padding follows them.

`tests/test_batch_invariance.py` re-checks these facts on the machine it runs on. These are the
`native` kernels; on GPUs the `triton` kernels (resilient_moe/kernels/) are invariant by construction,
and model/kernel_choice.py chooses between them.

Shape letters: T tokens, D hidden, H query heads, G kv heads, R = H // G, d head dim, L keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_GEMM_ROWS = 4
KEY_PAD = 16
_PANEL = 16  # output columns per packed panel of the native kernel (csrc/kernels.c)

try:
    from resilient_moe import _kernels
except ImportError:  # pragma: no cover - the extension is built by every install
    _kernels = None


class Linear:
    """A weight [N, K] (and bias [N]) prepared once for batch-invariant ``x @ weight.T + bias``.

    On CPU in float32 the weight is packed into 16-column panels for the native kernel, which is
    batch-invariant by construction and faster than MKL for the few-row products of decode. Other
    dtypes and devices use torch with rows padded to MIN_GEMM_ROWS.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias.contiguous() if bias is not None else None
        self.native = native_linear(weight.dtype, weight.device)
        if self.native:
            N, K = weight.shape
            padded = -(-N // _PANEL) * _PANEL
            panels = weight.new_zeros((padded, K))
            panels[:N] = weight
            self.packed = panels.view(padded // _PANEL, _PANEL, K).permute(0, 2, 1).contiguous()  # [N16/16, K, 16]
            self.weight = None
        else:
            self.packed = None
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> [T, N]."""
        if not self.native:
            return _torch_linear(x, self.weight, self.bias)
        if x.stride(-1) != 1 or x.dtype != torch.float32:
            x = x.contiguous().float()
        rows = x.shape[0]
        y = torch.empty((rows, self.out_features), dtype=torch.float32)
        if rows:
            _kernels.linear(
                x.data_ptr(), self.packed.data_ptr(), 0 if self.bias is None else self.bias.data_ptr(), y.data_ptr(),
                rows, self.out_features, self.in_features, x.stride(0), self.out_features,
            )
        return y

    @property
    def nbytes(self) -> int:
        held = self.packed if self.native else self.weight
        return held.nbytes + (0 if self.bias is None else self.bias.nbytes)


class HeadwiseLinear:
    """One weight per head: x [T, H, K] -> [T, H, N] with head h computed as ``x[:, h] @ weight[h].T``.

    Each head is its own linear layer (`make_linear`, the kernel set's), so every row stays
    batch-invariant (MLA's absorbed projections).
    """

    def __init__(self, weight: torch.Tensor, make_linear=Linear) -> None:
        self.heads = [make_linear(w) for w in weight]  # weight [H, N, K]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(x[:, h]) for h, head in enumerate(self.heads)], dim=1)  # [T, H, N]


def configure_threads(threads: int, dtype: str, device: str) -> None:
    """Give this process's compute `threads` threads, and only one pool of them: where the native
    kernels do the work (float32 on the CPU) they get the threads and torch keeps one for the small
    elementwise ops in between (two pools of spinning threads on the same cores slow each other
    down); elsewhere torch gets them. The native split never changes a result (csrc/kernels.c)."""
    if _kernels is not None and dtype == "float32" and device in ("cpu", "auto") and (
            device == "cpu" or not torch.cuda.is_available()):
        torch.set_num_threads(1)
        _kernels.set_threads(threads)
    else:
        torch.set_num_threads(threads)


def compute_threads() -> int:
    """Threads this process computes with (as `configure_threads` set them)."""
    native = _kernels.threads() if _kernels is not None else 1
    return max(native, torch.get_num_threads())


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with rows padded to MIN_GEMM_ROWS, so a row does not depend on its batch."""
    rows = x.shape[0]
    if rows >= MIN_GEMM_ROWS:
        return F.linear(x, weight, bias)
    padded = x.new_zeros((MIN_GEMM_ROWS, *x.shape[1:]))
    padded[:rows] = x
    return F.linear(padded, weight, bias)[:rows]


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm`` with the row dimension of `a` padded to MIN_GEMM_ROWS."""
    rows = a.shape[1]
    if rows >= MIN_GEMM_ROWS:
        return torch.bmm(a, b)
    padded = a.new_zeros((a.shape[0], MIN_GEMM_ROWS, a.shape[2]))
    padded[:, :rows] = a
    return torch.bmm(padded, b)[:, :rows]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Hugging Face computes it: statistics in float32, scale in the input dtype."""
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; cos, sin [T, d]."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def swiglu(x: torch.Tensor, gate_up: Linear, down: Linear) -> torch.Tensor:
    """SiLU-gated MLP with the gate and up projections fused: gate_up [2F, D], down [D, F]."""
    return down(silu_gate(gate_up(x)))  # [T, D]


def silu_gate(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation of fused gate/up outputs h [T, 2F] (gate columns first) -> [T, F]."""
    gate, up = h.chunk(2, dim=-1)  # [T, F] each
    return F.silu(gate) * up


def clamped_gate(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's activation of fused gate/up outputs h [T, 2F] -> [T, F]: the gate is clamped from above,
    the up projection on both sides, and the up path carries a +1."""
    gate, up = h.chunk(2, dim=-1)  # [T, F] each
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def linear_group(products: list[tuple[Linear, torch.Tensor, torch.Tensor]]) -> None:
    """Run several native float32 products in one call, threads sharing all of them: each (linear, x
    [n, K] with unit column stride, y [n, N] contiguous rows) computes y = linear(x) in place, with
    the same bits as calling each linear alone (csrc/kernels.c linear_group)."""
    table = torch.tensor(
        [[x.data_ptr(), lin.packed.data_ptr(), 0 if lin.bias is None else lin.bias.data_ptr(), y.data_ptr(),
          x.shape[0], lin.out_features, lin.in_features, x.stride(0), y.stride(0)]
         for lin, x, y in products if x.shape[0]],
        dtype=torch.long,
    ).reshape(-1, 9)
    _kernels.linear_group(table.data_ptr(), table.shape[0])


def native_linear(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `Linear` runs the native kernel for weights of this dtype and device."""
    return _kernels is not None and device.type == "cpu" and dtype == torch.float32


def native_attention(q: torch.Tensor) -> bool:
    """Whether `paged_attention` runs queries like q (float32 on the CPU, the extension built)."""
    return _kernels is not None and q.device.type == "cpu" and q.dtype == torch.float32


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    block_start: torch.Tensor,
    row_seq: torch.Tensor,
    positions: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each query row over its own sequence's cached keys, read in place (C kernel).

    q [T, H, d]; k_cache [G, slots, d] and v_cache [G, slots, dv] (strided views are fine, last dim
    contiguous: MLA passes its latent rows and a view of their first C columns); blocks [sum NB] the
    sequences' block tables one after another, block_start [S] where each starts, row_seq [T] each
    row's sequence, positions [T]: row t sees keys max(0, position - window + 1) .. position of its
    sequence. sinks [H] (optional): a per-head logit with no value. Returns [T, H, dv] float32.

    Each row's reduction is fixed by the row alone (csrc/kernels.c), so it is bit-identical alone, in
    any batch, beside sequences of any length, in a prefill or a decode step; the cost follows the sum
    of the rows' visible keys, not rows x the longest.
    """
    T, H, D = q.shape
    G, DV = k_cache.shape[0], v_cache.shape[2]
    if H % G or k_cache.shape[2] != D or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)} (last dims must be contiguous)")
    if q.stride(-1) != 1:
        q = q.contiguous()
    index = [t if t.dtype == torch.long and t.is_contiguous() else t.long().contiguous()
             for t in (blocks, block_start, row_seq, positions)]
    sink = None if sinks is None else sinks.float().contiguous()
    out = torch.empty((T, H, DV), dtype=torch.float32)
    if T:
        _kernels.paged_attention(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), *(t.data_ptr() for t in index),
            0 if sink is None else sink.data_ptr(), T, H, G, D, DV, q.stride(0), q.stride(1), k_cache.stride(0),
            k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1), block_size,
            window or 0, scale,
        )
    return out


def padded_key_length(num_keys: int) -> int:
    """Smallest multiple of KEY_PAD that holds `num_keys` keys."""
    return max(KEY_PAD, -(-num_keys // KEY_PAD) * KEY_PAD)


def attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    masked: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None = None,
    batched_matmul=bmm,
) -> torch.Tensor:
    """Scaled dot-product attention over gathered, padded keys, kv-head-major.

    q [G, B, M, d] (the M query rows of each kv group: heads x tokens), keys [G, B, L, d] and values
    [G, B, L, dv] with L a multiple of KEY_PAD, masked [B, M, L] (True = not visible). sinks [G, 1, M]
    (optional): one more logit per query row that takes part in the softmax but has no value.
    `batched_matmul` is `bmm` (rows padded: batch-invariant) or plain torch.bmm (the torch kernels).
    Returns [G, B, M, dv].
    """
    groups, batch, rows, dim = q.shape
    length, value_dim = keys.shape[2], values.shape[3]
    k = keys.reshape(groups * batch, length, dim)  # [G*B, L, d]
    v = values.reshape(groups * batch, length, value_dim)  # [G*B, L, dv]
    scores = batched_matmul(q.reshape(groups * batch, rows, dim), k.transpose(1, 2)) * scale  # [G*B, M, L]
    scores = scores.view(groups, batch, rows, length).masked_fill(masked.unsqueeze(0), float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        sink = sinks.to(scores.dtype).unsqueeze(-1).expand(groups, batch, rows, 1)  # [G, B, M, 1]
        probs = torch.softmax(torch.cat([sink, scores], dim=-1), dim=-1, dtype=torch.float32)[..., 1:].to(q.dtype)
    out = batched_matmul(probs.reshape(groups * batch, rows, length), v)  # [G*B, M, dv]
    return out.view(groups, batch, rows, value_dim)
