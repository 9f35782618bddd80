"""The datapath survives its own faults: a corrupt frame, a lost frame and a reply past its deadline each
cost a resend, never a crash or a hang; an expert worker rejects malformed frames and keeps serving; a
poison request is failed after it takes two attention workers down, and nothing else is lost.
"""

from __future__ import annotations

import concurrent.futures
import random
import time

import pytest
import torch

from conftest import wait_until, worker_load
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.model.config import ModelConfig
from resilient_moe.datapath.faults import LinkFault
from resilient_moe.datapath.frames import FrameFlags, FrameHeader, FrameKind, dispatch_aux
from resilient_moe.datapath.dial import connect, listen
from resilient_moe.datapath.link import PeerInfo
from resilient_moe.datapath.part_rules import check_result, cut_parts, rows_per_part
from resilient_moe.datapath.poller import Poller
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.launch import make_cluster
from resilient_moe.launch.launcher import Launcher
from resilient_moe.model.weights import Checkpoint
from resilient_moe.model.expert_side import ExpertSide
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend import Frontend, RequestFailed
from resilient_moe.workers.expert_worker import ExpertServer


def workload(n: int = 8, max_tokens: int = 40):
    rng = random.Random(21)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(4, 30))] for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model):
    prompts, params = workload()
    return [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]


def inject(cluster: Launcher, fault: LinkFault) -> None:
    cluster.client.stub.SetFaults(pb.FaultUpdate(add=[fault.to_proto(pb)]), timeout=5)


# kind -> (the fault, the AW counter that shows it happened)
FAULTS = {
    "corrupt": (LinkFault("bitflip", "corrupt", target="ew-0", drop_rate=1.0, count=1), "fault_corrupted"),
    "lose": (LinkFault("loss", "lose", target="ew-0", drop_rate=1.0, count=1), "fault_lost"),
    "late": (LinkFault("slow", "late", target="ew-0", delay_ms=1500, count=1), "fault_late"),
}


@pytest.mark.parametrize("kind", list(FAULTS))
def test_an_injected_datapath_fault_costs_a_resend(tiny_model, reference, fork_server, tmp_path, kind):
    """One frame between aw-0 and ew-0 is bit-flipped, lost, or answered past its deadline, in the
    middle of decoding: its part is resent to another holder of its experts, the late or corrupt copy
    is dropped, and every request's tokens are the failure-free ones."""
    fault, hit = FAULTS[kind]
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=1, expert_workers=2, micro_batches=2)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            handles = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 5 for h in handles), 60, "requests to be mid-generation")
            inject(cluster, fault)
            assert [h.wait(120).token_ids for h in handles] == reference
            wait_until(lambda: worker_load(cluster, "aw-0", hit) == 1, 10, f"aw-0 to report the {kind} frame")
            if kind == "late":  # everything behind the late answer waits too (a link is FIFO), probe answers
                # included: the part is resent once its deadline passes or the probes go unanswered
                assert worker_load(cluster, "aw-0", "deadline_misses") + worker_load(cluster, "aw-0", "suspicions") >= 1
            else:  # the worker answers probes all along: only the deadline shows the part is gone
                assert worker_load(cluster, "aw-0", "deadline_misses") >= 1, "the part missed its deadline"
            assert worker_load(cluster, "aw-0", "replayed_frames") >= 1, "and was resent"
            if kind == "corrupt":
                wait_until(lambda: worker_load(cluster, "ew-0", "frames_corrupt") >= 1, 10,
                           "ew-0 to count the frame its checksum rejected")
            if kind == "late":
                wait_until(lambda: worker_load(cluster, "aw-0", "stale_replies") >= 1, 10,
                           "the late answer to be dropped as a duplicate")
            assert all(h.duplicates == 0 for h in handles)
        finally:
            frontend.close()


def test_a_poison_request_is_failed_after_two_workers_and_the_others_finish(tiny_model, reference, fork_server, tmp_path):
    """A request whose first step takes its attention worker down (chaos `poison`) is moved once,
    admitted alone on the next worker, takes that one down too, and is then failed with an error that
    names it; every other request (those that shared a worker with it too) finishes token-identical."""
    prompts, params = workload()
    poison_token = 502  # outside the workload's token range (3..499)
    assert all(poison_token not in p for p in prompts)
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=2)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            handles = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 3 for h in handles), 60, "requests to be mid-generation")
            inject(cluster, LinkFault("poison", "poison", token_id=poison_token))
            poison = frontend.submit([1, 7, poison_token, 9], SamplingParams(max_tokens=8))
            with pytest.raises(RequestFailed) as failure:
                poison.wait(60)
            assert failure.value.kind == "poison" and poison.request_id in str(failure.value)
            assert len(poison.lost_on) == 2 and set(poison.lost_on) == {"aw-0", "aw-1"}
            # each death is a fault record with the exit status the launcher saw (the worker exits with 5)
            causes = wait_until(lambda: (c := {r.component: r.cause for r in cluster.state().fault_records
                                               if r.role == "attention"}) and len(c) == 2
                                and set(c.values()) == {"exited with code 5"} and c, 30,
                                "both attention workers' fault records to say how they exited")
            assert set(causes) == {"aw-0", "aw-1"}
            assert [h.wait(120).token_ids for h in handles] == reference
            cluster.client.stub.SetFaults(pb.FaultUpdate(clear=True), timeout=5)
            later = frontend.submit(prompts[0], params)
            assert later.wait(60).token_ids == reference[0], "the replaced workers serve again"
        finally:
            frontend.close()


# ---- an expert worker checks every DISPATCH before its kernels see it -----------------------------


def test_expert_worker_rejects_malformed_dispatch_frames_and_keeps_serving(tiny_model):
    cfg = ModelConfig.from_pretrained(tiny_model)
    held = [(0, e) for e in range(cfg.num_experts - 1)]  # the last expert of layer 0 is not held here
    ew_poller, aw_poller = Poller(), Poller()
    ew_id, aw_id = PeerInfo("ew-0", 1, 1, 1), PeerInfo("aw-0", 2, 2, 2)
    server = ExpertServer(ExpertSide(Checkpoint(tiny_model), held), ew_poller, ew_id)
    listener = listen("shm:@rmoe-test-validate", ew_id, ew_poller)
    connecting = concurrent.futures.ThreadPoolExecutor(1).submit(
        connect, "shm:@rmoe-test-validate", aw_id, aw_poller, ring_size=1 << 20)
    server.add_link(wait_until(listener.accept, 5, "the link"))
    link = connecting.result(5)
    try:
        D = cfg.hidden_size
        rows = torch.randn(3, D)
        ones = torch.ones(3, dtype=torch.int32)
        ids = dispatch_aux(ones, torch.tensor([0, 1, 2]))
        bad = {
            "6 wide": (rows[:, :6], ids, 0),
            "int64 rows": (rows.long(), ids, 0),
            "uint8 rows": (rows.to(torch.uint8), ids, 0),
            "2 ids": (rows, dispatch_aux(ones, torch.tensor([0, 1])), 0),
            "counts off": (rows, dispatch_aux(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 2])), 0),
            "no ids": (rows, None, 0),
            "counts only": (rows, ones, 0),
            "zero count": (rows, dispatch_aux(torch.tensor([0, 2, 1]), torch.tensor([0, 1, 2])), 0),
            "bad expert": (rows, dispatch_aux(ones, torch.tensor([0, 1, 9999])), 0),
            "negative expert": (rows, dispatch_aux(ones, torch.tensor([0, -1, 2])), 0),
            "not held": (rows, dispatch_aux(ones, torch.tensor([0, cfg.num_experts - 1, 2])), 0),
            "bad layer": (rows, ids, 200),
            "3-d rows": (rows.view(3, 1, D), ids, 0),
        }
        for seq, (tensor, aux, layer) in enumerate(bad.values(), start=1):
            link.send(FrameHeader(FrameKind.DISPATCH, seq=seq, layer=layer), aux=aux, tensor=tensor.contiguous())
        good_seq = len(bad) + 1
        # The middle token asks for two experts: its row travels once, its two results come back.
        counts, experts = torch.tensor([1, 2, 1]), torch.tensor([0, 1, 2, 3])
        link.send(FrameHeader(FrameKind.DISPATCH, seq=good_seq, layer=0), aux=dispatch_aux(counts, experts),
                  tensor=rows)
        answers = {}
        deadline = time.monotonic() + 10
        while len(answers) < good_seq and time.monotonic() < deadline:
            server.poll_once(0.01)
            aw_poller.wait(0.01)
            while (frame := link.recv()) is not None:
                answers[frame.header.seq] = (frame.header.flags, bytes(frame.body).decode(errors="replace"),
                                             None if frame.tensor is None else frame.tensor.clone())
            link.release()
        assert len(answers) == good_seq
        reasons = [answers[seq][1] for seq in range(1, good_seq)]
        assert all(answers[seq][0] & FrameFlags.ERROR for seq in range(1, good_seq))
        expected = ["6 wide", "float32, bfloat16 or float16", "float32, bfloat16 or float16", "need 3 counts",
                    "add up to 4 experts", "need 3 counts", "need 3 counts", "counts must be in [1,", "out of range", "out of range",
                    "not held here", "outside the model", "2-d tensor"]
        for reason, fragment in zip(reasons, expected):
            assert fragment in reason, (fragment, reason)
        assert server.counters["frames_rejected"] == len(bad)
        flags, _, result = answers[good_seq]
        assert not flags & FrameFlags.ERROR
        pairs = rows[torch.tensor([0, 1, 1, 2])]  # one row per (token, expert) pair
        expected_rows = ExpertSide(Checkpoint(tiny_model), held).forward(0, pairs, experts)
        assert torch.equal(result, expected_rows), "the worker still serves, bit-identically, one row per pair"
    finally:
        link.close()
        server.close()
        listener.close()


# ---- the rules, without processes ---------------------------------------------------------------


def test_parts_fit_the_link_both_ways():
    # 8 KiB rows (hidden 2048, float32) through 64 KiB rings: 32 KiB frames, 3 rows each.
    assert rows_per_part(32704, 32704, 65536, 8192, 8192) == 3
    # A receive limit smaller than the send limit caps the part by its RESULT.
    assert rows_per_part(1 << 20, 40000, 1 << 22, 8192, 8192) == 4
    with pytest.raises(ValueError, match="does not fit this link"):
        rows_per_part(4096, 4096, 8192, 8192, 8192)


def test_parts_are_cut_by_rows_sent_and_pairs_answered():
    one = torch.ones(10, dtype=torch.long)
    # One expert per row: as rows_per_part says, 3 rows of 8 KiB a part through 32 KiB frames.
    assert cut_parts(one, 8192, 8192, 32704, 32704, 65536) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    # Eight experts per row cost the DISPATCH 8 KiB + 36 bytes a row, not 8 rows: 127 rows fit 1 MiB.
    eight = torch.full((300,), 8)
    cuts = cut_parts(eight, 8192, 4, 1 << 20, 1 << 20, 1 << 23)
    assert cuts[0] == (0, (((1 << 20) - 256) // (8192 + 36)))
    # A RESULT limit of 40000 bytes: a row asking for 8 experts (64 KiB of results) goes alone (the
    # expert worker splits its answer); the others fill parts around it.
    assert cut_parts(torch.tensor([1, 1, 8, 1, 1]), 8192, 8192, 1 << 20, 40000, 1 << 22) == \
        [(0, 2), (2, 3), (3, 5)]
    with pytest.raises(ValueError, match="does not fit this link"):
        cut_parts(one, 8192, 8192, 4096, 4096, 8192)


def test_result_checks_name_what_does_not_match():
    def result(tensor, aux=None, flags=FrameFlags.NONE):
        from resilient_moe.datapath.frames import Frame
        return Frame(FrameHeader(FrameKind.RESULT, flags=flags), aux, tensor, memoryview(b""))

    assert check_result(result(torch.zeros(4, 8)), 4, 0, 8) == (0, 4)
    assert "3 rows" in check_result(result(torch.zeros(3, 8)), 4, 0, 8) or "rows [0, 3)" in \
        check_result(result(torch.zeros(3, 8)), 4, 0, 8)
    assert "wide" in check_result(result(torch.zeros(4, 7)), 4, 0, 8)
    assert "float" in check_result(result(torch.zeros(4, 8, dtype=torch.int32)), 4, 0, 8)
    # A RESULT the expert worker split: pieces in order, each with its first row in aux.
    assert check_result(result(torch.zeros(2, 8), torch.tensor([0], dtype=torch.int32)), 4, 0, 8) == (0, 2)
    assert check_result(result(torch.zeros(2, 8), torch.tensor([2], dtype=torch.int32)), 4, 2, 8) == (2, 2)
    assert "rows [3, 5)" in check_result(result(torch.zeros(2, 8), torch.tensor([3], dtype=torch.int32)), 4, 2, 8)


def test_a_result_larger_than_the_link_takes_back_arrives_in_pieces(tiny_model):
    """The attention worker's end of a TCP link takes frames of at most 2 KiB: a DISPATCH of 8 rows
    with two experts each (hidden 64: 4 KiB of results for its 16 pairs) goes out whole, and the
    expert worker answers it in pieces that reassemble, by their row offsets, into exactly the rows a
    whole answer would carry."""
    ew_poller, aw_poller = Poller(), Poller()
    ew_id, aw_id = PeerInfo("ew-0", 1, 1, 1), PeerInfo("aw-0", 2, 2, 2)
    experts = ExpertSide(Checkpoint(tiny_model))
    server = ExpertServer(experts, ew_poller, ew_id)
    listener = listen("tcp:127.0.0.1:0", ew_id, ew_poller)
    connecting = concurrent.futures.ThreadPoolExecutor(1).submit(connect, listener.address, aw_id, aw_poller,
                                                                 max_frame=2048)
    server.add_link(wait_until(listener.accept, 5, "the link"))
    link = connecting.result(5)
    try:
        rows = torch.randn(8, experts.checkpoint.cfg.hidden_size)
        ids = torch.arange(16) % experts.checkpoint.cfg.num_experts  # two experts per token: 16 pairs
        link.send(FrameHeader(FrameKind.DISPATCH, seq=1, layer=0), aux=dispatch_aux(torch.full((8,), 2), ids),
                  tensor=rows)
        pairs = rows.repeat_interleave(2, dim=0)  # [16, D]
        out, received = torch.empty_like(pairs), 0
        deadline = time.monotonic() + 10
        pieces = 0
        while received < 16 and time.monotonic() < deadline:
            server.poll_once(0.01)
            aw_poller.wait(0.01)
            while (frame := link.recv()) is not None:
                placed = check_result(frame, 16, received, rows.shape[1])
                assert not isinstance(placed, str), placed
                offset, count = placed
                out[offset:offset + count] = frame.tensor
                received += count
                pieces += 1
        assert received == 16 and pieces > 1 and server.counters["replies_split"] == 1
        assert torch.equal(out, experts.forward(0, pairs, ids))
    finally:
        link.close()
        server.close()
        listener.close()
