"""A token's hidden row travels once to each expert worker, however many of its experts are there.

An attention worker's forwarding engine and real expert servers (threads of this process, over shm
links): the bytes a link carries for a call are counted by the link itself and must be one hidden
row per token plus the header and the expert list; the expert outputs come back one per (token,
expert) pair, bit-identical to computing every pair alone; and after an expert worker dies with
the call outstanding, the resend to its shadow carries each row once too.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from resilient_moe.datapath.dial import listen
from resilient_moe.datapath.forwarding import Forwarder
from resilient_moe.datapath.frames import frame_size
from resilient_moe.datapath.link import PeerInfo
from resilient_moe.datapath.poller import Poller
from resilient_moe.datapath.routing_table import RoutingTable
from resilient_moe.model.expert_side import ExpertSide
from resilient_moe.model.weights import Checkpoint
from resilient_moe.workers.expert_worker import ExpertServer

T = 12  # tokens of the call


class ExpertThread:
    """An ExpertServer serving its links on a thread until stopped (`serving` cleared: it reads nothing)."""

    def __init__(self, model, name: str, number: int) -> None:
        self.identity = PeerInfo(name, number, 1, os.getpid())
        self.poller = Poller()
        self.server = ExpertServer(ExpertSide(Checkpoint(model)), self.poller, self.identity)
        self.listener = listen(f"shm:@rmoe-test-dedup-{os.getpid()}-{name}", self.identity, self.poller)
        self.address = self.listener.address
        self.serving = threading.Event()
        self.serving.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            while (link := self.listener.accept()) is not None:
                self.server.add_link(link)
            if self.serving.is_set():
                self.server.poll_once(0.005)
            else:
                time.sleep(0.005)

    def kill(self) -> None:
        """Stop at once, answering nothing more; its links close as a dead process's would."""
        self._stop.set()
        self._thread.join(5)
        self.server.close()
        self.listener.close()


@pytest.fixture
def experts(tiny_model):
    started: list[ExpertThread] = []

    def start(n: int) -> list[ExpertThread]:
        started.extend(ExpertThread(tiny_model, f"ew-{i}", 0x02000000 | i) for i in range(n))
        return started

    yield start
    for e in started:
        e.kill()


def forwarder_to(workers: list[ExpertThread], candidates, cfg) -> Forwarder:
    forwarder = Forwarder(PeerInfo("aw-0", 0x01000000, 7, os.getpid()), Poller(), 1 << 20)
    for w in workers:
        forwarder.connect(w.identity.name, w.address, 1)
    table = RoutingTable(1, cfg.num_layers, cfg.num_experts,
                         tuple(candidates(e) for _ in range(cfg.num_layers) for e in range(cfg.num_experts)))
    forwarder.set_routing(table)
    forwarder.begin_step(1)
    return forwarder


def call(forwarder: Forwarder, x: torch.Tensor, ids: torch.Tensor, layer: int = 1, before=None) -> torch.Tensor:
    """Submit one routed-expert call and wait (bounded) for its outputs [T, K, D]; `before` runs right
    after the submit (e.g. a worker dies with the call outstanding)."""
    forwarder.submit(0, layer, x, ids)
    if before is not None:
        before()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = forwarder.take(0)
        if out is not None:
            return out
        forwarder.wait()
    raise AssertionError("the call was not answered within 20 s")


def reference(model, x: torch.Tensor, ids: torch.Tensor, layer: int = 1) -> torch.Tensor:
    """Every (token, expert) pair computed as its own row: [T, K, D]."""
    K = ids.shape[1]
    pairs = x.repeat_interleave(K, dim=0)  # [T*K, D]
    return ExpertSide(Checkpoint(model)).forward(layer, pairs, ids.reshape(-1)).view(x.shape[0], K, -1)


def dispatch_bytes(tokens: int, pairs: int, hidden: int) -> int:
    """One DISPATCH frame: the header, a count per token and an id per pair, one float32 row per token."""
    return frame_size(4 * (tokens + pairs), tokens * hidden * 4)


def top_k_ids(k: int, experts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(T)])  # [T, k], distinct per token


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_a_token_is_sent_once_to_a_worker_whatever_its_experts_there(tiny_model, experts, k):
    cfg = Checkpoint(tiny_model).cfg
    (ew,) = experts(1)
    forwarder = forwarder_to([ew], lambda e: ("ew-0",), cfg)
    try:
        link = forwarder.peers["ew-0"].link
        x, ids = torch.randn(T, cfg.hidden_size), top_k_ids(k, cfg.num_experts)
        sent_before, frames_before = link.bytes_sent, link.frames_sent
        out = call(forwarder, x, ids)
        assert link.frames_sent - frames_before == 1
        assert link.bytes_sent - sent_before == dispatch_bytes(T, T * k, cfg.hidden_size)
        assert forwarder.counters["rows_sent"] == T and forwarder.counters["pairs_sent"] == T * k
        assert torch.equal(out, reference(tiny_model, x, ids)), "one result per pair, as if computed alone"
    finally:
        forwarder.close()


def test_each_worker_gets_the_rows_of_the_tokens_with_experts_there(tiny_model, experts):
    """Even experts on ew-0, odd on ew-1: a token goes to a worker iff one of its experts is there."""
    cfg = Checkpoint(tiny_model).cfg
    workers = experts(2)
    forwarder = forwarder_to(workers, lambda e: (f"ew-{e % 2}",), cfg)
    try:
        x = torch.randn(T, cfg.hidden_size)
        ids = torch.tensor([[0, 2, 4], [1, 3, 5], [0, 1, 6]] * (T // 3))  # all even, all odd, mixed
        before = {n: p.link.bytes_sent for n, p in forwarder.peers.items()}
        out = call(forwarder, x, ids)
        for w in (0, 1):
            mine = ids % 2 == w  # [T, K]
            tokens, pairs = int(mine.any(1).sum()), int(mine.sum())
            sent = forwarder.peers[f"ew-{w}"].link.bytes_sent - before[f"ew-{w}"]
            assert sent == dispatch_bytes(tokens, pairs, cfg.hidden_size), f"ew-{w}"
        assert torch.equal(out, reference(tiny_model, x, ids))
    finally:
        forwarder.close()


def test_a_call_outstanding_on_a_dead_worker_is_resent_once_per_token(tiny_model, experts):
    """ew-0 (every expert's primary) takes the call and dies without answering: the resend to the
    shadows on ew-1 carries each token's row once with all its experts, and the outputs are
    bit-identical to a failure-free call."""
    cfg = Checkpoint(tiny_model).cfg
    primary, shadow = experts(2)
    primary.serving.clear()
    forwarder = forwarder_to([primary, shadow], lambda e: ("ew-0", "ew-1"), cfg)
    try:
        x, ids = torch.randn(T, cfg.hidden_size), top_k_ids(4, cfg.num_experts, seed=1)
        link0, link1 = forwarder.peers["ew-0"].link, forwarder.peers["ew-1"].link
        first, second = link0.bytes_sent, link1.bytes_sent
        out = call(forwarder, x, ids, before=primary.kill)
        assert link0.bytes_sent - first == dispatch_bytes(T, 4 * T, cfg.hidden_size)
        assert link1.bytes_sent - second == dispatch_bytes(T, 4 * T, cfg.hidden_size), "the replay: one row per token"
        assert forwarder.counters["replayed_frames"] == 1
        assert torch.equal(out, reference(tiny_model, x, ids))
    finally:
        forwarder.close()
