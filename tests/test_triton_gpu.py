"""The Triton kernels and the engine on a CUDA device (skipped where there is none).

The same references as the interpreter cases (tests/kernel_references.py), here in bfloat16 too, and
batch invariance where it matters most: on a GPU, where torch and cuBLAS pick kernels by batch size.
"""

from __future__ import annotations

import pytest
import torch

import test_parity_hf as parity
from kernel_references import attention_case, attention_reference, close, moe_reference, moe_weights, randn, windows
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.model.weights import Checkpoint
from resilient_moe.model.expert_side import ExpertSide
from resilient_moe.model.kernel_choice import KernelSet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_on_gpu(dtype):
    import torch.nn.functional as F

    from resilient_moe.kernels.matmul import TritonLinear

    g = torch.Generator().manual_seed(0)
    w, b, x = randn(300, 520, g=g, dtype=dtype), randn(300, g=g, dtype=dtype), randn(64, 520, g=g, dtype=dtype)
    linear = TritonLinear(w.to(CUDA), b.to(CUDA))
    full = linear(x.to(CUDA))
    assert close(full.cpu(), F.linear(x.float(), w.float(), b.float()), dtype)
    for start, rows in windows():
        assert torch.equal(linear(x[start:start + rows].to(CUDA)), full[start:start + rows])


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_and_log_softmax_on_gpu(dtype):
    from resilient_moe.kernels.log_softmax import log_softmax
    from resilient_moe.kernels.rms_norm import rms_norm
    from resilient_moe.model import ops

    g = torch.Generator().manual_seed(1)
    x, w = randn(64, 2048, g=g, dtype=dtype).to(CUDA), randn(2048, g=g, dtype=dtype).to(CUDA)
    normed = rms_norm(x, w, 1e-6)
    assert close(normed, ops.rms_norm(x, w, 1e-6), dtype)
    logits = randn(64, 50000, g=g, dtype=torch.float32, scale=4.0).to(CUDA)
    logp = log_softmax(logits)
    assert (logp - torch.log_softmax(logits, dim=-1)).abs().max().item() < 1e-4
    for start, rows in windows():
        assert torch.equal(rms_norm(x[start:start + rows], w, 1e-6), normed[start:start + rows])
        assert torch.equal(log_softmax(logits[start:start + rows]), logp[start:start + rows])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_on_gpu(dtype):
    from resilient_moe.kernels.fused_moe import fused_moe

    g = torch.Generator().manual_seed(2)
    weights = moe_weights(g, dtype, experts=16, hidden=256, width=96, bias=True)
    x, slots = randn(64, 256, g=g, dtype=dtype), torch.randint(0, 16, (64,), generator=g)
    on_gpu = [None if w is None else w.to(CUDA) for w in weights]
    full = fused_moe(x.to(CUDA), slots.to(CUDA), *on_gpu)
    assert close(full.cpu(), moe_reference(x, slots, *weights, "silu"), dtype)
    for start, rows in windows():
        part = fused_moe(x[start:start + rows].to(CUDA), slots[start:start + rows].to(CUDA), *on_gpu)
        assert torch.equal(part, full[start:start + rows])


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_on_gpu(dtype):
    from resilient_moe.kernels.paged_attention import paged_attention

    g = torch.Generator().manual_seed(3)
    q, k_cache, v_cache, table = attention_case(g, dtype, rows=64, groups=4, per_group=4, dim=128, slots=8192,
                                                seqs=4, length=2000)
    row_seq, positions = torch.randint(0, 4, (64,), generator=g), torch.randint(0, 2000, (64,), generator=g)
    args = [t.to(CUDA) for t in (q, k_cache, v_cache, table, row_seq, positions)]
    full = paged_attention(*args, 0.1)
    want = attention_reference(q, k_cache, v_cache, table, row_seq, positions, 0.1)
    assert close(full.cpu(), want, dtype)
    for start, rows in windows():
        part = paged_attention(args[0][start:start + rows], *args[1:4], args[4][start:start + rows],
                               args[5][start:start + rows], 0.1)
        assert torch.equal(part, full[start:start + rows])


def test_expert_side_on_gpu_answers_host_rows(tiny_models):
    """An expert worker's rows come from host frames: the GPU expert side stages them and answers on the host."""
    checkpoint = Checkpoint(tiny_models["mixtral"])
    side = ExpertSide(checkpoint, dtype=torch.float32, device=CUDA, kernels=KernelSet("triton"))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(24, checkpoint.cfg.hidden_size, generator=g)
    ids = torch.randint(0, checkpoint.cfg.num_experts, (24,), generator=g)
    y = side.forward(0, x, ids)
    assert y.device.type == "cpu"
    assert torch.equal(y, side.forward(0, x.to(CUDA), ids.to(CUDA)).cpu())
    assert close(y, ExpertSide(checkpoint).forward(0, x, ids), torch.float32)


def test_triton_engine_on_gpu_matches_transformers_and_is_batch_invariant(hf_checkpoints):
    model_dir = hf_checkpoints["qwen3_moe"]
    prompts = parity.ragged_prompts(4, 320, seed=6)
    reference = parity.hf_reference(model_dir, prompts, 8)
    engine = LLMEngine(model_dir, EngineConfig(device="cuda"))  # auto: triton on CUDA
    assert engine.kernels.name == "triton"
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert [r.token_ids for r in engine.generate(prompts, params)] == [t for t, _ in reference]
    bf16 = LLMEngine(model_dir, EngineConfig(device="cuda", dtype="bfloat16"))
    alone = bf16.generate(prompts[:1], params)[0].token_ids
    crowd = parity.ragged_prompts(63, 320, seed=7)
    assert bf16.generate(crowd[:30] + prompts[:1] + crowd[30:], params)[30].token_ids == alone


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_kv_rows_cross_to_the_host_on_a_side_stream_and_back(family):
    """A checkpoint's gather on the GPU lands in pinned host memory through staging.SideCopy, equal to the
    rows; a restore's rows go back (RestoredRows.scatter_into, staging.to_device) into the same slots."""
    from resilient_moe import staging
    from resilient_moe.model.config import ModelConfig
    from resilient_moe.engine.kv_cache import RestoredRows, new_kv_cache
    from test_kv_windows import family_config

    cfg = ModelConfig.from_hf_dict(family_config(family).to_dict())
    cache = new_kv_cache(cfg, num_blocks=8, block_size=4, dtype=torch.float32, device=CUDA)
    slots = torch.tensor([0, 5, 9, 30])  # host indices, as the block tables give them
    cache.scatter(slots, torch.randn(cfg.num_layers, 4, cache.row_width, device=CUDA))
    rows = cache.gather(slots)
    (host,) = staging.SideCopy([rows]).wait()
    assert host.device.type == "cpu" and host.is_pinned()
    assert torch.equal(host, rows.cpu())
    table = torch.zeros(cfg.num_layers, 8, cache.row_width)  # a store's rows [L, R, W]
    table[:, [3, 1, 6, 0]] = host
    other = new_kv_cache(cfg, num_blocks=8, block_size=4, dtype=torch.float32, device=CUDA)
    RestoredRows.read(table, cache.windows, torch.tensor([3, 1, 6, 0])).scatter_into(other, slots)
    full = list(cache.windows.full)
    assert torch.equal(other.gather(slots, full), rows[full])
