"""Placement that knows context length: the frontend balances attention workers by tokens in flight
(prompt + generated), so short requests are steered away from a worker busy with one long request
instead of being split evenly by request count."""

from __future__ import annotations

from conftest import wait_until
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.launch import make_cluster
from resilient_moe.server.frontend import Frontend


def test_short_requests_avoid_the_worker_of_a_long_one(tiny_model, fork_server, tmp_path):
    long_prompt = [3 + i % 400 for i in range(300)]
    shorts = [[5 + i, 9, 11, 13] for i in range(6)]
    long_params = SamplingParams(max_tokens=60, ignore_eos=True)
    short_params = SamplingParams(max_tokens=12, ignore_eos=True)
    reference = LLMEngine(tiny_model, EngineConfig()).generate([long_prompt, *shorts],
                                                               [long_params] + [short_params] * len(shorts))
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=1)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            long = frontend.submit(long_prompt, long_params)
            wait_until(lambda: long.tokens, 60, "the long request to start")
            handles = [frontend.submit(p, short_params) for p in shorts]
            results = [h.wait(60).token_ids for h in [long, *handles]]
            assert results == [r.token_ids for r in reference]
            assert long.worker and all(h.worker and h.worker != long.worker for h in handles), \
                [(h.worker, len(h.prompt_ids)) for h in [long, *handles]]
        finally:
            frontend.close()
