"""The chaos tool: scenario validation, the datapath fault hook, the report's arithmetic, and short runs
of real faults against a live server (EW crash, AW crash, link delay, controller crash), each of which
must lose no request and change no token compared with a failure-free replay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from chaos import report as reports
from chaos import runner, scenario
from chaos.injectors import Injection
from chaos.scenario import ScenarioError
from chaos.targets import ClusterView, Event, Worker
from chaos.workload import RequestResult, RequestSpec
from conftest import pid_alive, wait_until
from resilient_moe.datapath.faults import FaultPlan, FaultyLink, LinkFault
from resilient_moe.datapath.frames import Frame, FrameHeader, FrameKind, decode
from resilient_moe.datapath.link import PeerInfo
from serving import ADMIN_TOKEN, serving_stack

# ---- scenario validation ----------------------------------------------------------------------

GOOD = {"workload": {"concurrency": 2, "duration_s": 5}, "faults": [{"at_s": 1, "fault": "kill", "target": "ew-1"}]}


def with_changes(**changes) -> dict:
    raw = {"workload": dict(GOOD["workload"]), "faults": [dict(f) for f in GOOD["faults"]]}
    for path, value in changes.items():
        node = raw
        *parents, last = path.split("__")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return raw


@pytest.mark.parametrize("changes, message", [
    ({"workload__concurrency": None}, "workload: give exactly one of concurrency"),
    ({"workload__rate": 3}, "workload: give exactly one of concurrency"),
    ({"workload__duration_s": -1}, "workload.duration_s: must be > 0"),
    ({"workload__prompt_tokens": [9, 3]}, "workload.prompt_tokens: [min, max] needs min <= max"),
    ({"workload__temperature": "hot"}, "workload.temperature: must be a number, got 'hot'"),
    ({"workload__sed": 1}, "workload.sed: unknown field"),
    ({"faults__0__fault": "explode"}, "faults[0].fault: must be one of kill, terminate"),
    ({"faults__0__at_s": 9}, "faults[0].at_s: 9 is not before the workload ends"),
    ({"faults__0__target": None}, "faults[0].target: is required"),
    ({"faults__0__target": "aw-0->ew-1"}, "faults[0].target: a kill takes a worker id"),
    ({"faults__0__fault": "hang"}, "faults[0].duration_s: is required"),
    ({"faults__0__fault": "partition", "faults__0__target": "controller", "faults__0__duration_s": 1},
     "faults[0].target: a partition takes a link"),
    ({"faults__0__fault": "drop", "faults__0__duration_s": 1, "faults__0__drop_rate": 1.5},
     "faults[0].drop_rate: must be <= 1"),
    ({"faults__0__fault": "delay", "faults__0__duration_s": 1}, "faults[0].delay_ms: a delay needs"),
    ({"faults__0__interval_s": 3}, "faults[0].interval_s: only applies to an every: target"),
    ({"faults__0__count": 2}, "faults[0].count: unknown field"),
    ({"faults__0__fault": "node-kill"}, "faults[0].target: a node-kill takes a node: node:ID"),
    ({"faults__0__target": "node-of:aw-0"}, "faults[0].target: only a node-kill takes a node"),
    ({"faults": "kill ew-1"}, "faults: must be a list"),
    ({"faults__0__fault": "frontend-kill"}, "faults[0].target: a frontend-kill takes a frontend: fe-N"),
    ({"faults__0__fault": "supervisor-kill"}, "faults[0].target: a supervisor-kill takes no target but"),
    ({"faults__0__fault": "supervisor-kill", "faults__0__target": "supervisor", "faults__0__restart_after_s": -1},
     "faults[0].restart_after_s: must be >= 0"),
])
def test_bad_scenarios_are_rejected_naming_the_field(changes, message):
    raw = with_changes(**{k: v for k, v in changes.items() if k != "faults"})
    if "faults" in changes:
        raw["faults"] = changes["faults"]
    with pytest.raises(ScenarioError) as e:
        scenario.parse(raw, source="s.yaml")
    assert str(e.value).startswith("s.yaml: ") and message in str(e.value), str(e.value)


def test_every_shipped_scenario_is_valid_and_a_soak_expands_the_same_each_time():
    root = os.path.join(os.path.dirname(__file__), "..", "chaos", "scenarios")
    names = sorted(f for f in os.listdir(root) if f.endswith(".yaml"))
    assert {"ew-crash.yaml", "ew-hang.yaml", "aw-crash.yaml", "aw-hang.yaml", "controller-crash.yaml",
            "redis-outage.yaml", "link-partition.yaml", "rolling-crashes.yaml", "soak.yaml",
            "frontend-supervisor.yaml"} <= set(names)
    for name in names:
        scenario.load(os.path.join(root, name))
    soak = scenario.load(os.path.join(root, "soak.yaml"))
    assert len(soak.faults) > 20 and soak.faults == scenario.load(os.path.join(root, "soak.yaml")).faults
    assert all(a.at_s + a.duration_s <= b.at_s for a, b in zip(soak.faults, soak.faults[1:]))


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("workload: {concurrency: 2, duration_s: 5}\nfaults:\n  - {at_s: 1, fault: hang, target: ew-1}\n")
    cases = [
        (["validate", str(bad)], "faults[0].duration_s: is required"),
        (["run", str(bad), "--out", str(tmp_path / "out")], "faults[0].duration_s: is required"),
        (["validate", str(tmp_path / "missing.yaml")], "scenario file not found"),
        (["inject", "delay", "ew-1", "--url", "http://127.0.0.1:9", "--duration", "1"], "--delay-ms: a delay needs"),
    ]
    for args, message in cases:
        done = subprocess.run([sys.executable, "-m", "chaos.cli", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists(), "nothing runs when the scenario is bad"


def test_node_kill_kills_every_process_of_one_node_and_nothing_else():
    """A node-kill resolves its node through the admin view and has the server take that node down
    (POST /admin/node-kill: never the frontend, never another node); stand-in processes play the
    workers and a stand-in admin API plays the server's launcher."""
    from chaos.injectors import Injector
    from chaos.targets import TargetError, node_members

    procs = {name: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
             for name in ("aw-0", "ew-0", "aw-1", "ew-1")}
    try:
        nodes = {"aw-0": "aa11", "ew-0": "aa11", "aw-1": "bb22", "ew-1": "bb22"}
        workers = [{"id": n, "role": "attention" if n.startswith("aw") else "expert", "pid": p.pid,
                    "host": "127.0.0.1", "node": nodes[n], "incarnation": 1, "state": "ready"} for n, p in procs.items()]
        workers.append({"id": "frontend-1", "role": "frontend", "pid": os.getpid(), "host": "127.0.0.1",
                        "node": "aa11", "state": "ready"})
        view = ClusterView.from_json({"workers": workers, "ert": {"epoch": 1}}, time.time())
        assert node_members(view, "node-of:aw-0")[0] == "aa11"
        assert [w.id for w in node_members(view, "node:bb")[1]] == ["aw-1", "ew-1"]
        with pytest.raises(TargetError, match="names no node"):
            node_members(view, "node:cc")

        class Admin:
            asked: list[str] = []

            def cluster(self):
                return view

            def kill_node(self, node):
                self.asked.append(node)
                for name, p in procs.items():
                    if nodes[name] == node:
                        p.send_signal(signal.SIGKILL)
                return {"node": node, "killed": True}

        spec = scenario.parse({"workload": {"concurrency": 1, "duration_s": 5},
                               "faults": [{"at_s": 0, "fault": "node-kill", "target": "node-of:ew-0"}]}).faults[0]
        injection = Injection(0, spec, planned=time.time())
        admin = Admin()
        Injector(admin, None, None, "t").inject(injection)
        assert injection.error is None and sorted(injection.targets) == ["aw-0", "ew-0"] and admin.asked == ["aa11"]
        assert {t for t, _, _ in injection.killed} == {injection.started}, "one instant for the whole node"
        for name in ("aw-0", "ew-0"):
            assert procs[name].wait(10) == -signal.SIGKILL
        assert procs["aw-1"].poll() is None and procs["ew-1"].poll() is None
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


# ---- the datapath fault hook, without processes -------------------------------------------------


class FakeLink:
    """The wrapped end of a FaultyLink: records what is sent, hands out what was queued to arrive."""

    peer = identity = PeerInfo("ew-1", 1, 1, 1)
    transport, max_frame, max_recv_frame, window_bytes, rejected, alive = "fake", 1 << 20, 1 << 20, 1 << 21, 0, True

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.raw: list[bytes] = []
        self.arriving: list[Frame] = []

    def try_send(self, header, aux=None, tensor=None, body=None) -> bool:
        self.sent.append(header.seq)
        return True

    def send_raw(self, data, timeout=5.0) -> None:
        self.raw.append(bytes(data))

    def recv(self):
        return self.arriving.pop(0) if self.arriving else None

    def release(self) -> None:
        pass

    def flush(self) -> bool:
        return True

    backlogged = False


def frame(seq: int) -> FrameHeader:
    return FrameHeader(FrameKind.DISPATCH, seq=seq)  # carries rows (the tests leave the tensor out)


def test_link_faults_hold_in_order_and_release_on_time_or_when_lifted():
    plan = FaultPlan("aw-0")
    inner = FakeLink()
    link = FaultyLink(inner, plan, "ew-1")
    assert link.try_send(frame(0)) and inner.sent == [0], "no fault: sent at once"
    plan.update([LinkFault("d", "delay", target="ew-1", delay_ms=30, jitter_ms=20),
                 LinkFault("other", "partition", source="aw-1")])
    assert [f.id for f in plan.faults] == ["d"], "faults of other attention workers are ignored"
    other = FaultyLink(FakeLink(), plan, "ew-2")
    assert other.try_send(frame(9)) and other.inner.sent == [9], "a link no fault names is untouched"
    for i in range(5):
        assert link.try_send(frame(i + 1))
    assert link.recv() is None and inner.sent == [0], "held for the delay"
    wait_until(lambda: link.recv() is None and len(inner.sent) == 6, 2, "the delayed frames")
    assert inner.sent == [0, 1, 2, 3, 4, 5], "jitter never reorders a link"

    plan.update([LinkFault("p", "partition", target="ew-1")])
    inner.arriving.append(Frame(FrameHeader(FrameKind.RESULT), None, None, memoryview(b"xy")))
    assert link.try_send(frame(7)) and link.recv() is None
    time.sleep(0.05)
    assert link.recv() is None and inner.sent[-1] == 5, "a partition until removed holds both directions"
    plan.update([])
    arrived = link.recv()
    assert inner.sent[-1] == 7 and bytes(arrived.body) == b"xy"
    assert link.idle


def test_drop_is_repaired_by_a_retransmission_behind_which_later_frames_wait():
    plan = FaultPlan("aw-0")
    inner = FakeLink()
    link = FaultyLink(inner, plan, "ew-0")
    plan.update([LinkFault("x", "drop", drop_rate=1.0, retransmit_ms=40)])
    assert link.try_send(frame(1))
    plan.update([])
    assert link.try_send(frame(2)), "FIFO: waits behind the retransmission"
    assert inner.sent == []
    wait_until(lambda: link.flush() and len(inner.sent) == 2, 2, "the retransmission")
    assert inner.sent == [1, 2] and plan.counters["retransmits"] == 1


def test_lose_corrupt_and_late_hit_exactly_count_frames():
    plan = FaultPlan("aw-0")
    inner = FakeLink()
    link = FaultyLink(inner, plan, "ew-1")
    plan.update([LinkFault("l", "lose", drop_rate=1.0, count=1)])
    assert link.try_send(frame(1)) and link.try_send(frame(2))
    assert inner.sent == [2] and plan.counters["lost"] == 1, "one frame vanished, the next went"
    plan.update([LinkFault("c", "corrupt", drop_rate=1.0, count=1)])
    tensor = torch.arange(64, dtype=torch.float32).view(4, 16)
    assert link.try_send(frame(3), tensor=tensor) and link.try_send(frame(4), tensor=tensor)
    assert len(inner.raw) == 1 and inner.sent[-1] == 4
    with pytest.raises(ValueError, match="checksum mismatch"):
        decode(memoryview(bytearray(inner.raw[0])))  # the receiver rejects it
    plan.update([LinkFault("t", "late", delay_ms=30, count=1)])
    for seq in (5, 6):
        inner.arriving.append(Frame(FrameHeader(FrameKind.RESULT, seq=seq), None, None, memoryview(b"")))
    assert link.recv() is None, "the first answer is late, and the one behind it waits (FIFO)"
    got = wait_until(lambda: link.recv(), 2, "the late answer")
    assert got.header.seq == 5 and link.recv().header.seq == 6


def test_bad_link_faults_name_the_field():
    with pytest.raises(ValueError, match="drop_rate must be a probability"):
        LinkFault("x", "drop", drop_rate=2)
    with pytest.raises(ValueError, match="fault kind must be one of"):
        LinkFault("x", "cut")
    with pytest.raises(ValueError, match="unknown fault field 'delay'"):
        LinkFault.from_dict({"id": "x", "kind": "delay", "delay": 3})


# ---- the report's arithmetic --------------------------------------------------------------------


def result(index: int, start: float, arrivals: list[float], tokens: list[int], error: str | None = None):
    spec = RequestSpec(index, (1, 2), len(tokens), 0.0, 1.0, index, True)
    return RequestResult(spec, start, arrivals[-1] if arrivals else start, tokens, arrivals, "length", error)


def test_report_counts_stalls_losses_mismatches_and_recovery():
    workers = (Worker("aw-0", "attention", 10, "127.0.0.1", 1, "READY"),
               Worker("ew-0", "expert", 11, "127.0.0.1", 2, "READY"))
    baseline = ClusterView(100.0, workers, 3, 0, ())
    dead = ClusterView(101.5, (workers[0], Worker("ew-0", "expert", 11, "127.0.0.1", 2, "DEAD")), 4, 8, ())
    back = ClusterView(102.5, (workers[0], Worker("ew-0", "expert", 12, "127.0.0.1", 5, "READY")), 5, 0, ())
    spec = scenario.parse({"workload": {"concurrency": 1, "duration_s": 5},
                           "faults": [{"at_s": 1, "fault": "kill", "target": "ew-0"}]}).faults[0]
    kill = Injection(0, spec, planned=101.0, started=101.0, ended=101.0, targets=["ew-0"],
                     killed=[(101.0, "ew-0", 11)])
    steady = [100.0 + 0.02 * i for i in range(1, 6)]
    results = [
        result(0, 100.0, steady, [5, 6, 7, 8, 9]),  # finished before the fault
        result(1, 100.9, [100.95, 101.6, 101.62], [1, 2, 3]),  # stalled 650 ms across it
        result(2, 100.9, [100.95, 101.05, 101.07], [4, 4, 4]),  # kept going, but wrong tokens
        result(3, 100.9, [100.95], [9], error="stream error"),  # lost
    ]
    results[3].end = 101.3
    reference = [result(0, 0, steady, [5, 6, 7, 8, 9]), result(1, 0, [0.1, 0.12, 0.14], [1, 2, 3]),
                 result(2, 0, [0.1, 0.12, 0.14], [4, 4, 5])]
    events = [Event(101.04, "dead", "ew-0", "link closed")]
    report = reports.analyse(scenario.parse({"workload": {"concurrency": 1, "duration_s": 5},
                                             "assertions": {"max_stall_p99_s": 0.5, "recovery_within_s": 1}}),
                             [kill], results, reference, [(100.0, baseline), (101.5, dead), (102.5, back)],
                             events, baseline, 100.0)
    fault = report["faults"][0]
    assert fault["detection_s"] == pytest.approx(0.04)
    assert fault["in_flight"] == 3 and fault["lost"] == 1 and fault["token_mismatches"] == 1
    assert fault["stall_affected"]["count"] == 2 and fault["stall_affected"]["max"] == pytest.approx(0.65)
    assert fault["stall_unaffected"]["max"] == pytest.approx(0.1)
    assert fault["redundancy_restored_s"] == pytest.approx(1.5)
    verdict = {a["name"]: a["passed"] for a in report["assertions"]}
    assert verdict == {"every fault injected": True, "zero lost requests": False, "zero token mismatches": False,
                       "max stall p99 (s)": False, "recovery within (s)": False}
    assert not report["passed"]
    assert report["mismatched_requests"] == [{"index": 2, "first_difference": 2}]
    assert "| 0 | 1.0s | kill ew-0 | ew-0 | 40 ms |" in reports.markdown(report)


# ---- real faults against a live server --------------------------------------------------------


def shm_entries() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if "rmoe" in n or "resilient" in n}


def run_scenario(stack, raw: dict, out) -> dict:
    lines: list[str] = []
    try:
        report = runner.run(scenario.parse(raw, source="test"), stack.url, ADMIN_TOKEN, out, log=lines.append)
    except Exception:
        print("\n".join(lines))
        raise
    print("\n".join(lines))
    print(reports.markdown(report))
    return report


def short(faults: list[dict], temperature: float = 0.0, duration_s: float = 6.0, **extra) -> dict:
    return {"workload": {"concurrency": 4, "duration_s": duration_s, "prompt_tokens": [4, 24],
                         "output_tokens": [24, 48], "temperature": temperature, "seed": 11},
            "faults": faults, "settle_timeout_s": 30, **extra}


def assert_clean_run(report: dict, out) -> None:
    totals = report["totals"]
    assert totals["requests"] >= 8 and totals["completed"] == totals["requests"], report["lost_requests"]
    assert totals["lost"] == 0 and totals["token_mismatches"] == 0 and totals["unverified"] == 0
    assert all(f["started"] and not f["error"] for f in report["faults"]), report["faults"]
    assert report["passed"], report["assertions"]
    for name in ("report.json", "report.md", "timeline.png"):
        assert (out / name).stat().st_size > 0


@pytest.fixture
def live(tiny_model, fork_server, tmp_path):
    """Start a serving stack; afterwards no process of it and no shared memory of it may be left."""
    shm_before = shm_entries()
    pids: set[int] = set()

    def start(**options):
        stack_cm = serving_stack(tiny_model, fork_server, tmp_path / "logs", **options)
        stacks.append(stack_cm)
        stack = stack_cm.__enter__()
        pids.update(stack.cluster.pids.values())
        return stack

    stacks: list = []
    try:
        yield start
    finally:
        for stack_cm in stacks:
            stack_cm.__exit__(None, None, None)
    wait_until(lambda: not any(pid_alive(p) for p in pids), 15, "every cluster process to exit")
    assert shm_entries() == shm_before


def test_expert_worker_crash(live, tmp_path):
    stack = live(attention_workers=1, expert_workers=3)
    report = run_scenario(stack, short([{"at_s": 2, "fault": "kill", "target": "ew-1"}],
                                       assertions={"recovery_within_s": 25}), tmp_path / "out")
    assert_clean_run(report, tmp_path / "out")
    fault = report["faults"][0]
    assert fault["detection_s"] is not None and fault["redundancy_restored_s"] is not None

    # A tool stopped mid-hang (SIGTERM) resumes the worker it stopped before it exits.
    victim = stack.cluster.pids["ew-2"]
    tool = subprocess.Popen([sys.executable, "-m", "chaos.cli", "inject", "hang", "ew-2", "--duration", "60",
                             "--url", stack.url, "--token", ADMIN_TOKEN], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: process_state(victim) == "T", 30, "the tool to stop ew-2")
        tool.send_signal(signal.SIGTERM)
        assert tool.wait(30) == 130, tool.stdout.read()
        assert process_state(victim) not in ("T", "gone"), "ew-2 was resumed"
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
        if process_state(victim) == "T":
            os.kill(victim, signal.SIGCONT)


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_attention_worker_crash(live, tmp_path):
    stack = live(attention_workers=2, expert_workers=2)
    report = run_scenario(stack, short([{"at_s": 2, "fault": "kill", "target": "aw-0"}], temperature=0.8),
                          tmp_path / "out")
    assert_clean_run(report, tmp_path / "out")
    assert report["faults"][0]["in_flight"] >= 1


def test_frontend_kill_resumes_every_stream_once(live, tmp_path):
    """Two frontend processes; one is SIGKILLed under load. The workload resumes each broken stream at
    the other one (Idempotency-Key + Last-Event-ID): nothing lost, nothing repeated, every token the
    failure-free replay's."""
    stack = live(attention_workers=1, expert_workers=2, frontends=2)
    report = run_scenario(stack, short([{"at_s": 2, "fault": "frontend-kill", "target": "fe-0"}], temperature=0.8,
                                       assertions={"recovery_within_s": 30}), tmp_path / "out")
    assert_clean_run(report, tmp_path / "out")
    resumed = [r for r in json.loads((tmp_path / "out" / "requests.json").read_text())["chaos"] if r["resumes"]]
    assert resumed, "no stream broke: the kill did not hit a frontend that was streaming"
    assert all(len(r["tokens"]) <= r["max_tokens"] for r in resumed), "a resume repeated tokens"


def test_link_delay(live, tmp_path):
    stack = live(attention_workers=1, expert_workers=2)
    # 80 ms per frame on every link to ew-1: longer than the probe window, so the attention worker
    # suspects the slow link, replays to shadows, and routes back when the late answers arrive.
    fault = {"at_s": 1.5, "fault": "delay", "target": "ew-1", "delay_ms": 80, "jitter_ms": 20, "duration_s": 2}
    report = run_scenario(stack, short([fault]), tmp_path / "out")
    assert_clean_run(report, tmp_path / "out")
    assert report["faults"][0]["detection_s"] is not None, "the attention worker noticed the slow link"
    assert any(e["kind"] == "faults" for e in report["events"])


def test_controller_crash(live, tmp_path):
    stack = live(attention_workers=1, expert_workers=2)
    report = run_scenario(stack, short([{"at_s": 2, "fault": "kill", "target": "controller"}],
                                       assertions={"recovery_within_s": 20}), tmp_path / "out")
    assert_clean_run(report, tmp_path / "out")
