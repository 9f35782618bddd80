"""Shared fixtures: tiny checkpoints written by transformers' own save_pretrained, and by ours."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

HF_COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,  # wider than the default so greedy picks are far from ties
)


def hf_config(family: str, **overrides):
    """A transformers config object of `family` with tiny dimensions."""
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    kwargs = dict(HF_COMMON)
    if family == "mixtral":
        kwargs.update(num_local_experts=6, num_experts_per_tok=2)
        cls = MixtralConfig
    elif family == "qwen2_moe":
        kwargs.update(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=80, decoder_sparse_step=1, mlp_only_layers=[1],
                      norm_topk_prob=False)
        cls = Qwen2MoeConfig
    elif family == "qwen3_moe":
        kwargs.update(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16,
                      norm_topk_prob=True)
        cls = Qwen3MoeConfig
    else:
        kwargs.update(num_experts=6, num_experts_per_tok=2, eos_token_id=2, pad_token_id=0)
        cls = OlmoeConfig
    kwargs.update(overrides)
    return cls(**kwargs)


def save_hf_model(path, family: str, seed: int = 0, **overrides):
    """Build a random model with transformers and save_pretrained it (the real on-disk names)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides), attn_implementation="eager")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """family -> directory of a transformers-written checkpoint."""
    root = tmp_path_factory.mktemp("hf")
    return {family: save_hf_model(root / family, family, seed=i) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> directory of a checkpoint written by `resilient-moe make-tiny-model` (with tokenizer)."""
    from resilient_moe.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_model(root / family, family, seed=7) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_model(tiny_models):
    return tiny_models["mixtral"]


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Before Ray is imported anywhere (it reads this at import): Ray test clusters use loopback only.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # One cluster secret for the session, as a launcher would install it (in memory only): links, gRPC and
    # KV-store handshakes made in this process prove it; the fork server gets it through a pipe, its
    # workers in each spawn request. A test's own subprocess that needs it is given it explicitly.
    from resilient_moe import auth

    if not auth.has_secret():
        auth.install(auth.new_secret())


@pytest.fixture(scope="session")
def fork_server():
    """One fork server for the session's clusters (importing torch once instead of per worker)."""
    from resilient_moe.launch.fork_server import ForkServer

    z = ForkServer()
    z.wait_hello(120)
    yield z
    z.shutdown()


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.02):
    """Poll `predicate` until true; fail the test after `timeout_s` (a hang guard, not a timing assertion)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def worker_load(cluster, name: str, key: str) -> float:
    """A counter that worker `name` of a running cluster reports in its heartbeats (0 until it does)."""
    return next((w.load.get(key, 0.0) for w in cluster.state().workers if w.name == name), 0.0)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# A checkpoint of real widths (Qwen3-30B-A3B's attention and routing shapes, two layers, narrow experts
# to keep CPU time down): frame limits, prefill stalls and KV sizes only show at these widths.
REAL_WIDTH = dict(vocab_size=1024, hidden_size=2048, intermediate_size=256, moe_intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=64,
                  num_experts_per_tok=8, max_position_embeddings=4096, initializer_range=0.05)
REAL_PROMPT_TOKENS = 3000
REAL_NEW_TOKENS = 6


@pytest.fixture(scope="session")
def real_width(tmp_path_factory):
    """(checkpoint dir, a 3000-token prompt, HF's 6 greedy tokens for it), built once per session."""
    import random

    from transformers import AutoModelForCausalLM

    path = save_hf_model(tmp_path_factory.mktemp("real-width"), "qwen3_moe", seed=5, **REAL_WIDTH)
    rng = random.Random(5)
    prompt = [rng.randrange(3, REAL_WIDTH["vocab_size"]) for _ in range(REAL_PROMPT_TOKENS)]
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=REAL_NEW_TOKENS, min_new_tokens=REAL_NEW_TOKENS,
                             do_sample=False)
    del model
    return path, prompt, out[0, len(prompt):].tolist()


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server on a Unix socket (its path), stopped afterwards."""
    import shutil
    import subprocess
    import time

    import redis

    path = str(tmp_path / "redis.sock")
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--unixsocket", path, "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(unix_socket_path=path, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)
        client.close()
        yield path
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray test cluster for the session's Ray tests (starting one takes about 15 s here)."""
    pytest.importorskip("ray")
    from resilient_moe.launch.ray_local import LoopbackRayCluster

    cluster = LoopbackRayCluster()
    yield cluster
    cluster.shutdown()
