"""Load-aware expert placement on a skewed workload, with real processes and HTTP.

The checkpoint is built so that expert 0 is hot: its router always picks it first, so it takes half of
every layer's routed rows. Before any load is observed the controller places with spread (one copy
of each expert takes its tokens, shadows stand by); POST /admin/rebalance while 16 greedy streams run
places by the observed load (EPLB): the hot expert gets as many copies taking its tokens as its load
needs (two here: it alone carries as much as one and a half workers should), and its tokens are split
between them. Every stream is token-identical to the colocated engine, and the imbalance
between expert workers, measured from the rows they report computing, drops.
"""

from __future__ import annotations

import random
import time

import httpx
import torch

from conftest import hf_config, wait_until
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.proto import controller_pb2 as pb
from serving import admin_headers, serving_stack, streams_through

NUM_EXPERTS = 8
HOT = 0
STREAM_TOKENS = 96


def save_hot_expert_model(path):
    """A random Mixtral (2 layers, top-2 of 8 experts) whose router always picks expert HOT first.

    Every token's embedding carries a constant feature in the last hidden dimension that nothing reads
    but expert HOT's router row (attention, the experts and the LM head ignore it and never write to
    it), so the second expert, the tokens and everything else stay those of a random model: a wrong
    expert output anywhere changes them."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    config = hf_config("mixtral", num_local_experts=NUM_EXPERTS, num_experts_per_tok=2, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, -1] = 0.3
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight[:, -1] = 0.0
            attn.o_proj.weight[-1, :] = 0.0
            layer.mlp.experts.gate_up_proj[:, :, -1] = 0.0
            layer.mlp.experts.down_proj[:, -1, :] = 0.0
            layer.mlp.gate.weight[HOT, -1] = 30.0
        model.lm_head.weight[:, -1] = 0.0
    model.save_pretrained(path)
    return path


def expert_rows(stack) -> dict[str, float]:
    """Rows each serving expert worker reports having computed, once the reports stop changing."""
    def read():
        return {w.name: w.load.get("rows", 0.0) for w in stack.cluster.state().workers
                if w.role == pb.EXPERT and w.state == pb.READY}

    def stable():
        first = read()
        time.sleep(0.3)  # a few heartbeats
        return first if read() == first else None
    return wait_until(stable, 20, "the expert workers' row counts to settle")


def imbalance(before: dict[str, float], after: dict[str, float]) -> float:
    """Max over mean of the rows each expert worker computed between two readings."""
    rows = [after[w] - before.get(w, 0.0) for w in after]
    return max(rows) / (sum(rows) / len(rows))


def test_load_aware_rebalancing_spreads_a_hot_expert_while_streams_run(fork_server, tmp_path):
    model_dir = save_hot_expert_model(tmp_path / "hot")
    rng = random.Random(17)
    prompts = [[1] + [rng.randrange(3, 300) for _ in range(rng.randint(2, 20))] for _ in range(16)]
    params = SamplingParams(max_tokens=STREAM_TOKENS, ignore_eos=True)
    reference = [r.token_ids for r in LLMEngine(model_dir, EngineConfig()).generate(prompts, params)]
    probe, probe_params = prompts[:8], SamplingParams(max_tokens=16, ignore_eos=True)
    probe_reference = [r.token_ids for r in LLMEngine(model_dir, EngineConfig()).generate(probe, probe_params)]

    with serving_stack(model_dir, fork_server, tmp_path / "logs", attention_workers=1, expert_workers=3,
                       deployment_options={"shadow_policy": "load_aware"}) as stack:
        state = stack.cluster.state()
        assert all(sum(s > 0 for s in c.shares) <= 1 for c in state.ert.entries if c.workers), \
            "before any load is observed, one copy of each expert takes its tokens (spread)"
        before = expert_rows(stack)
        assert [h.token_ids for h in stack.frontend.generate(probe, probe_params)] == probe_reference
        spread_imbalance = imbalance(before, expert_rows(stack))
        wait_until(lambda: any(c.layer == 0 and c.expert == HOT for c in stack.cluster.state().expert_load), 10,
                   "the controller to observe the expert load")
        hot_load = {(c.layer, c.expert): c.tokens for c in stack.cluster.state().expert_load}
        assert max(hot_load, key=hot_load.get)[1] == HOT, "the observed load shows the hot expert"

        switched = {}

        def rebalance() -> None:
            answer = httpx.post(f"{stack.url}/admin/rebalance", json={}, headers=admin_headers(), timeout=10)
            assert answer.status_code == 200 and answer.json()["started"], answer.text

            def done():
                s = stack.cluster.state()
                return not s.rebalancing and s.counters["rebalances"] >= 1 and s
            switched["state"] = wait_until(done, 30, "the new placement to serve")
            switched["in_flight"] = stack.frontend.unfinished()

        results = streams_through(stack, rebalance, prompts, max_tokens=STREAM_TOKENS, after_tokens=2)
        assert [r.token_ids for r in results] == reference
        assert all(r.finish_reason == "length" and r.done for r in results)
        assert switched["in_flight"] > 0, "the routing table switched while streams were running"

        state = switched["state"]
        for layer in (0, 1):
            entry = state.ert.entries[layer * NUM_EXPERTS + HOT]
            assert sum(s > 0 for s in entry.shares) >= 2, "the hot expert has two copies that share its tokens"

        def dropped():  # old copies go once every attention worker routes by the new table
            s = stack.cluster.state()
            holders = {w.name: set() for w in s.workers if w.role == pb.EXPERT}
            for i, c in enumerate(s.ert.entries):
                for w in c.workers:
                    holders[w].add(divmod(i, NUM_EXPERTS))
            return all({(x.layer, x.expert) for x in w.experts} == holders[w.name]
                       for w in s.workers if w.role == pb.EXPERT)
        wait_until(dropped, 20, "every expert worker to hold exactly its part of the new placement")

        before = expert_rows(stack)
        assert [h.token_ids for h in stack.frontend.generate(probe, probe_params)] == probe_reference
        balanced = imbalance(before, expert_rows(stack))
        metrics = httpx.get(f"{stack.url}/metrics", timeout=10).text
    assert balanced < 0.75 * spread_imbalance, (spread_imbalance, balanced)
    assert 'resilient_moe_expert_load_tokens{expert="0",layer="0"}' in metrics
    assert "resilient_moe_rebalances_total 1.0" in metrics
