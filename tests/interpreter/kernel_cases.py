"""Each batch-invariant Triton kernel (resilient_moe/kernels/) under Triton's CPU interpreter: against
torch in float32 and float16 (never bfloat16, which the interpreter computes wrongly without an
error), then for batch invariance: a row gives the same bits whatever else shares its batch, for
batch sizes 1..64 with the split points moving (every size for the tiled GEMMs, where rows share
tiles; every third size for the one-program-per-row kernels, which the interpreter runs row by row).

Run by tests/test_triton_kernels.py in a child process with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_references import attention_case, attention_reference, close, moe_reference, moe_weights, randn, windows
from resilient_moe.errors import ExpertUnavailableError
from resilient_moe.kernels import interpreted
from resilient_moe.kernels.fused_moe import align_rows, fused_moe
from resilient_moe.kernels.log_softmax import log_softmax
from resilient_moe.kernels.matmul import TritonLinear
from resilient_moe.kernels.paged_attention import paged_attention
from resilient_moe.kernels.rms_norm import MAX_BLOCK, rms_norm
from resilient_moe.model import ops
from resilient_moe.model.weights import Checkpoint
from resilient_moe.model.expert_side import ExpertSide
from resilient_moe.model.kernel_choice import KernelSet

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """These cases need Triton imported for its interpreter (TRITON_INTERPRET=1 before the process
    started); tests/test_triton_kernels.py runs them so, in a child process."""
    if not interpreted():
        pytest.fail("run these cases through tests/test_triton_kernels.py (a child process with TRITON_INTERPRET=1 "
                    "set before Triton is imported)")


def row_windows():
    """Every third window: for kernels with one program per row, each row costs a Python call here."""
    return windows()[::3]


# ---- matmul ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_matches_torch(dtype):
    g = torch.Generator().manual_seed(0)
    for rows, n, k, bias in [(1, 40, 72, True), (37, 33, 16, False), (70, 100, 130, True)]:
        w, b, x = randn(n, k, g=g, dtype=dtype), randn(n, g=g, dtype=dtype), randn(rows, k, g=g, dtype=dtype)
        got = TritonLinear(w, b if bias else None)(x)
        assert got.dtype == dtype and got.shape == (rows, n)
        assert close(got, F.linear(x.float(), w.float(), b.float() if bias else None), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_rows_do_not_depend_on_batch(dtype):
    g = torch.Generator().manual_seed(1)
    linear = TritonLinear(randn(40, 72, g=g, dtype=dtype), randn(40, g=g, dtype=dtype))
    x = randn(64, 72, g=g, dtype=dtype)
    full = linear(x)
    for start, rows in windows():
        assert torch.equal(linear(x[start:start + rows]), full[start:start + rows]), f"rows {start}..{start + rows}"
    strided = torch.cat([x, x], dim=1)[:, :72]  # a row stride that is not the row width
    assert torch.equal(linear(strided), full)


# ---- RMSNorm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch_and_is_row_invariant(dtype):
    g = torch.Generator().manual_seed(2)
    for width in (48, MAX_BLOCK + 100):  # one chunk, and the chunked loop
        x, w = randn(3, width, g=g, dtype=dtype), randn(width, g=g, dtype=dtype)
        assert close(rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6), dtype)
    x, w = randn(64, 48, g=g, dtype=dtype), randn(48, g=g, dtype=dtype)
    full = rms_norm(x, w, 1e-5)
    assert torch.equal(rms_norm(x.view(16, 4, 48), w, 1e-5), full.view(16, 4, 48))  # heads as rows
    for start, rows in row_windows():
        assert torch.equal(rms_norm(x[start:start + rows], w, 1e-5), full[start:start + rows])


# ---- log-softmax -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_matches_torch_and_is_row_invariant(dtype):
    g = torch.Generator().manual_seed(3)
    x = randn(4, 2500, g=g, dtype=dtype, scale=4.0)  # three chunks
    x[1, :2000] = float("-inf")  # top-k / top-p leave masked logits
    got = log_softmax(x)
    want = torch.log_softmax(x.float(), dim=-1)
    assert got.dtype == torch.float32
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert (got[finite] - want[finite]).abs().max().item() < 1e-4
    x = randn(64, 300, g=g, dtype=dtype, scale=4.0)
    full = log_softmax(x)
    for start, rows in row_windows():
        assert torch.equal(log_softmax(x[start:start + rows]), full[start:start + rows])


# ---- fused MoE -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "clamped_swiglu"])
def test_fused_moe_matches_per_expert_torch(dtype, activation):
    g = torch.Generator().manual_seed(4)
    weights = moe_weights(g, dtype, bias=activation == "clamped_swiglu")  # GPT-OSS: biases + clamped SwiGLU
    x = randn(30, 40, g=g, dtype=dtype)
    slots = torch.randint(0, 5, (30,), generator=g)
    slots[:3] = 2  # one expert with many rows, one (4) possibly with none
    got = fused_moe(x, slots, *weights, activation=activation, limit=0.9)
    assert close(got, moe_reference(x, slots, *weights, activation, limit=0.9), dtype)


def test_align_rows_pads_each_expert_to_whole_blocks():
    rows, block_slot = align_rows(torch.tensor([2, 0, 2, 2, 1, 0]), 4, 2)
    n = 6  # padding marker
    assert rows.tolist()[:8] == [1, 5, 4, n, 0, 2, 3, n]  # expert 0: rows 1, 5; expert 1: 4; expert 2: 0, 2, 3
    assert block_slot.tolist() == [0, 1, 2, 2, -1, -1, -1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_rows_do_not_depend_on_batch(dtype):
    g = torch.Generator().manual_seed(5)
    weights = moe_weights(g, dtype, bias=True)
    x = randn(64, 40, g=g, dtype=dtype)
    slots = torch.randint(0, 5, (64,), generator=g)
    full = fused_moe(x, slots, *weights)
    for start, rows in windows():
        part = fused_moe(x[start:start + rows], slots[start:start + rows], *weights)
        assert torch.equal(part, full[start:start + rows]), f"rows {start}..{start + rows}"
    shuffled = torch.randperm(64, generator=g)  # other neighbours in every block
    assert torch.equal(fused_moe(x[shuffled], slots[shuffled], *weights), full[shuffled])


def test_expert_side_grouped_matches_native(tiny_models):
    checkpoint = Checkpoint(tiny_models["qwen3_moe"])
    native = ExpertSide(checkpoint)
    grouped = ExpertSide(checkpoint, kernels=KernelSet("triton"))
    assert grouped.held == native.held and grouped.kernels.grouped_experts
    g = torch.Generator().manual_seed(6)
    x = torch.randn(24, checkpoint.cfg.hidden_size, generator=g)
    ids = torch.randint(0, checkpoint.cfg.num_experts, (24,), generator=g)
    calls = []
    got = grouped.forward(1, x, ids, between=lambda: calls.append(1))
    assert calls, "an expert worker answers probes between kernels"
    assert close(got, native.forward(1, x, ids), torch.float32)
    assert torch.equal(grouped.forward(1, x[5:9], ids[5:9]), got[5:9])
    grouped.drop([(1, int(ids[0]))])
    with pytest.raises(ExpertUnavailableError, match=f"expert {int(ids[0])} of layer 1 is not held"):
        grouped.forward(1, x, ids)
    assert torch.equal(grouped.forward(1, x[ids != ids[0]], ids[ids != ids[0]]), got[ids != ids[0]])


# ---- paged attention -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_matches_torch(dtype):
    g = torch.Generator().manual_seed(7)
    q, k_cache, v_cache, table = attention_case(g, dtype)
    row_seq, positions = torch.tensor([0, 1, 1, 0]), torch.tensor([70, 99, 5, 33])
    sinks = randn(4, g=g, dtype=dtype)
    for window, sink in [(None, None), (20, None), (None, sinks), (40, sinks)]:  # split 32: rows span 1..4 splits
        got = paged_attention(q, k_cache, v_cache, table, row_seq, positions, 0.25, window, sink, split=32)
        assert close(got, attention_reference(q, k_cache, v_cache, table, row_seq, positions, 0.25, window, sink), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_latent_rows(dtype):
    """DeepSeek's latent cache: keys are whole rows [1, slots, C + r], values a strided view of their first C."""
    g = torch.Generator().manual_seed(8)
    rows = randn(1, 128, 48, g=g, dtype=dtype)
    table = torch.randperm(128, generator=g)[:60].view(1, 60)
    q = randn(3, 4, 48, g=g, dtype=dtype)
    positions, row_seq = torch.tensor([59, 20, 0]), torch.zeros(3, dtype=torch.long)
    got = paged_attention(q, rows, rows[..., :32], table, row_seq, positions, 0.2, split=32)
    assert got.shape == (3, 4, 32)
    assert close(got, attention_reference(q, rows, rows[..., :32], table, row_seq, positions, 0.2), dtype)


@pytest.mark.parametrize("dtype,window", [(torch.float32, None), (torch.float16, 24)])
def test_paged_attention_rows_do_not_depend_on_batch(dtype, window):
    """Rows of different lengths (so the grid's split count changes with the batch), with and without a window."""
    g = torch.Generator().manual_seed(9)
    q, k_cache, v_cache, table = attention_case(g, dtype, rows=64, groups=1, per_group=2, slots=512, seqs=4, length=96)
    row_seq = torch.randint(0, 4, (64,), generator=g)
    positions = torch.randint(0, 96, (64,), generator=g)
    positions[:8] = torch.tensor([0, 15, 16, 31, 32, 63, 64, 95])  # on and around split and tile edges

    def run(rows, slots=table):
        return paged_attention(q[rows], k_cache, v_cache, slots, row_seq[rows], positions[rows], 0.3, window, split=32)

    full = run(slice(0, 64))
    for start, count in windows()[::8] + [(64 - 1, 1), (5, 1)]:
        assert torch.equal(run(slice(start, start + count)), full[start:start + count]), f"rows {start}..{start + count}"
    order = torch.randperm(64, generator=g)
    assert torch.equal(run(order), full[order])
    short = positions < 40  # the same rows through a shorter slot table: fewer splits in the grid
    assert torch.equal(run(short, table[:, :48]), full[short])
