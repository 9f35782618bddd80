"""A request's logits must not depend on what shares its batch (see resilient_moe/model/ops.py).

The first tests re-check, on this machine, the numeric facts ops.py relies on; the rest check the
engine end to end: alone vs batched, different micro-batch splits, recompute after preemption.
"""

from __future__ import annotations

import random

import pytest
import torch

from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.model import ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_do_not_depend_on_batch(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(99, 70, generator=g).to(dtype)
    b = torch.randn(99, generator=g).to(dtype)
    x = torch.randn(40, 70, generator=g).to(dtype)
    linear = ops.Linear(w, b)
    full = linear(x)
    assert (full.float() - torch.nn.functional.linear(x, w, b).float()).abs().max() < (1e-4 if dtype == torch.float32 else 0.5)
    for start, rows in [(0, 1), (3, 2), (5, 3), (7, 4), (11, 9), (2, 30), (1, 7)]:
        assert torch.equal(linear(x[start : start + rows]), full[start : start + rows])


def test_native_kernel_vector_and_portable_paths_agree_bitwise():
    from resilient_moe import _kernels

    g = torch.Generator().manual_seed(4)
    linear = ops.Linear(torch.randn(37, 53, generator=g), torch.randn(37, generator=g))
    x = torch.randn(13, 53, generator=g)
    fast = linear(x)
    _kernels.set_portable(True)
    try:
        portable = linear(x)
    finally:
        _kernels.set_portable(False)
    assert torch.equal(fast, portable)


def test_attention_row_independent_of_padding_and_batch():
    g = torch.Generator().manual_seed(1)
    G, R, d = 2, 2, 16
    keys = torch.randn(G, 1, 64, d, generator=g)
    values = torch.randn(G, 1, 64, d, generator=g)
    q = torch.randn(G, 1, R, d, generator=g)

    def run(length, batch_copies):
        k = keys[:, :, :length].expand(-1, batch_copies, -1, -1)
        v = values[:, :, :length].expand(-1, batch_copies, -1, -1)
        masked = (torch.arange(length) >= 21).expand(batch_copies, R, length)
        return ops.attention(q.expand(-1, batch_copies, -1, -1), k, v, masked, 0.25)[:, 0]

    reference = run(32, 1)
    for length in (48, 64):
        for copies in (1, 3, 8):
            assert torch.equal(run(length, copies), reference)


def _logits_alone_and_batched(model_dir, micro_batches):
    prompt = [5, 9, 13, 77, 101, 4, 8]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    alone = LLMEngine(model_dir, EngineConfig())
    alone.keep_logits = True
    alone.add_request("x", prompt, params)
    ref = []
    while alone.has_unfinished():
        alone.step()
        ref.append(alone.last_logits["x"].clone())

    rng = random.Random(3)
    crowd = LLMEngine(model_dir, EngineConfig(micro_batches=micro_batches))
    crowd.keep_logits = True
    for i in range(6):
        crowd.add_request(f"o{i}", [rng.randrange(3, 300) for _ in range(rng.randint(2, 30))], params)
    crowd.step()
    crowd.add_request("x", prompt, params)  # joins mid-flight, prefilled beside decodes
    got = []
    while crowd.has_unfinished():
        events = crowd.step()
        if any(e.request_id == "x" for e in events):
            got.append(crowd.last_logits["x"].clone())
    return ref, got


def test_engine_logits_identical_alone_and_in_batches(tiny_model):
    for micro_batches in (1, 3):
        ref, got = _logits_alone_and_batched(tiny_model, micro_batches)
        assert len(ref) == len(got) == 6
        for a, b in zip(ref, got):
            assert torch.equal(a, b), f"logits changed with batch composition (micro_batches={micro_batches})"


def test_recompute_after_preemption_gives_identical_tokens(tiny_model):
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(5, 20))] for _ in range(6)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    roomy = LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)
    tight_engine = LLMEngine(tiny_model, EngineConfig(kv_cache_tokens=160, block_size=16))
    tight = tight_engine.generate(prompts, params)
    assert tight_engine.scheduler.num_preemptions > 0, "the small cache should have forced preemptions"
    assert [r.token_ids for r in tight] == [r.token_ids for r in roomy]


def test_linear_group_gives_each_product_its_own_bits():
    """A layer's experts in one native call: each product's rows are what its linear gives alone, and a
    row alone gives the bits it has among many (csrc/kernels.c linear_group)."""
    g = torch.Generator().manual_seed(8)
    experts = [ops.Linear(torch.randn(48 + 16 * i, 40, generator=g), torch.randn(48 + 16 * i, generator=g))
               for i in range(5)]
    xs = [torch.randn(rows, 40, generator=g) for rows in (1, 7, 0, 13, 64)]
    outs = [torch.empty(x.shape[0], e.out_features) for e, x in zip(experts, xs)]
    ops.linear_group(list(zip(experts, xs, outs)))
    for e, x, y in zip(experts, xs, outs):
        assert torch.equal(y, e(x))
        for row in range(0, x.shape[0], 5):
            single = torch.empty(1, e.out_features)
            ops.linear_group([(e, x[row : row + 1], single)])
            assert torch.equal(single[0], y[row])


@pytest.mark.parametrize("between", [False, True])
def test_grouped_native_experts_match_one_expert_at_a_time(tiny_model, between):
    """ExpertSide runs a layer's experts as two native group calls (in groups, `between` called after
    each, when an expert worker answers probes): the same bits as each expert's MLP alone."""
    from resilient_moe.model.expert_side import ExpertSide
    from resilient_moe.model.weights import Checkpoint

    side = ExpertSide(Checkpoint(tiny_model))
    assert side.native
    g = torch.Generator().manual_seed(9)
    E = side.checkpoint.cfg.num_experts
    x = torch.randn(50, side.checkpoint.cfg.hidden_size, generator=g)
    ids = torch.randint(0, E, (50,), generator=g)
    calls = []
    y = side.forward(1, x, ids, (lambda: calls.append(1)) if between else None)
    for i in range(50):
        gate_up, down = side._weights[(1, int(ids[i]))]
        assert torch.equal(y[i], side._mlp(x[i : i + 1], gate_up, down)[0])
    assert bool(calls) == between
