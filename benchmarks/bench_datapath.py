"""Datapath benchmark: shm link vs TCP link vs gRPC unary vs multiprocessing.Pipe, two real processes.

For each payload size it measures, between a client (this process) and a server process:
  - round trip: the client sends a payload, the server replies with one of the same size; median
    and p99 over many trips;
  - one-way throughput: the client streams many payloads, the server takes them without replying
    and acks the last one;
and, for the two links, the server's CPU time while it sits idle in its poll loop for about a
second (no core may be pinned while idle).

The links carry real frames through the Link API (header, CRC-32C, tensor views on receipt).
gRPC (generic handler, raw bytes, no protobuf) and Pipe carry bare bytes, which favours them.
The client and server are pinned to different CPUs when there are two, and both call
gc.freeze() after set-up, as a latency-minded worker would.

    python benchmarks/bench_datapath.py [--quick] [--json out.json]

`--routing` instead measures failover bookkeeping on an attention worker's step thread at
DeepSeek-V3's size (58 sparse layers x 256 experts, 8 expert workers, one shadow per expert): the
time of each routing change (suspect, trust again, a new link, a fence, a new table) through the
forwarding engine, and of preparing a new table's tensors (which runs off the step).

    python benchmarks/bench_datapath.py --routing [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

KiB, MiB = 1 << 10, 1 << 20
SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB]
TRANSPORTS = ["shm", "tcp", "grpc", "pipe"]
RING_SIZE = 16 * MiB  # per direction: takes the 4 MiB frames (at most half a ring)
SERVER_LIFETIME_S = 900  # a server exits on its own after this, whatever happens


# ---------------------------------------------------------------------------------------- helpers


def pin(cpu: int) -> None:
    """Pin this process to one CPU when there are at least two (client 0, server 1).

    Counts the machine's CPUs, not this process's affinity, which a spawned server inherits from
    the already pinned client."""
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {cpu})


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def identity(name: str):
    from resilient_moe.datapath.link import PeerInfo

    return PeerInfo(name, 0, 1, os.getpid())


# ---------------------------------------------------------------------------------------- servers


def link_server(address: str, conn, pin_cpu: bool) -> None:
    """Echo DISPATCH frames; CONTROL commands: sink (take n frames, then ack), idle, exit."""
    if pin_cpu:
        pin(1)
    import torch

    torch.set_num_threads(1)
    from resilient_moe.datapath.frames import FrameHeader, FrameKind
    from resilient_moe.datapath.dial import listen
    from resilient_moe.datapath.link import LinkClosed
    from resilient_moe.datapath.poller import Poller

    poller = Poller()
    listener = listen(address, identity("bench-server"), poller)
    poller.add_fd(listener.fileno())
    conn.send(listener.address)
    gc.freeze()
    sink_left = 0
    deadline = time.monotonic() + SERVER_LIFETIME_S
    while time.monotonic() < deadline:
        ready, fds = poller.wait(0.1)
        if fds:
            listener.accept()
        for link in ready:
            try:
                for _ in range(100_000):
                    frame = link.recv()
                    if frame is None:
                        break
                    h = frame.header
                    if h.kind is FrameKind.DISPATCH:
                        if sink_left:
                            sink_left -= 1
                            if not sink_left:
                                link.send(FrameHeader(FrameKind.CONTROL, seq=h.seq), body=b'{"op": "sunk"}')
                        else:
                            link.send(FrameHeader(FrameKind.RESULT, seq=h.seq), tensor=frame.tensor, timeout=30)
                        link.release()
                        continue
                    cmd = json.loads(bytes(frame.body))
                    link.release()
                    if cmd["op"] == "sink":
                        sink_left = cmd["n"]
                    elif cmd["op"] == "idle":  # the worker's own idle loop, timed
                        start, cpu0 = time.monotonic(), cpu_seconds()
                        while time.monotonic() - start < cmd["s"]:
                            poller.wait(0.1)
                        reply = {"op": "idle", "cpu_s": cpu_seconds() - cpu0, "wall_s": time.monotonic() - start}
                        link.send(FrameHeader(FrameKind.CONTROL), body=json.dumps(reply).encode())
                    elif cmd["op"] == "exit":
                        return
            except LinkClosed:
                link.close()
                return


def grpc_server(conn, pin_cpu: bool) -> None:
    """Generic unary handlers on raw bytes: Echo returns the request, Sink returns nothing."""
    if pin_cpu:
        pin(1)
    from concurrent import futures

    import grpc

    options = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=options)
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
        "Sink": grpc.unary_unary_rpc_method_handler(lambda request, context: b""),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("rmoe.Bench", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    gc.freeze()
    if conn.poll(SERVER_LIFETIME_S):  # anything (or EOF) means stop
        pass
    server.stop(0)


def pipe_server(conn, pin_cpu: bool) -> None:
    """First byte: E echo, S sink (ack with b'A' when the marker byte b'L' ends a message), Q quit."""
    if pin_cpu:
        pin(1)
    gc.freeze()
    deadline = time.monotonic() + SERVER_LIFETIME_S
    while time.monotonic() < deadline:
        if not conn.poll(1.0):
            continue
        msg = conn.recv_bytes()
        op = msg[:1]
        if op == b"E":
            conn.send_bytes(msg)
        elif op == b"L":
            conn.send_bytes(b"A")
        elif op == b"Q":
            return


# ---------------------------------------------------------------------------------------- clients
# One endpoint per transport, all servers up at once, so that round trips can be measured in
# interleaved rounds: this VM-friendly design keeps a slow spell of the host from landing on one
# transport only, which would distort the ratios.


class LinkEndpoint:
    """Client side of a shm or TCP link to a link_server."""

    def __init__(self, transport: str, pin_cpu: bool, ctx) -> None:
        from resilient_moe.datapath.dial import connect
        from resilient_moe.datapath.poller import Poller

        address = f"shm:@rmoe-bench-{os.getpid()}" if transport == "shm" else "tcp:127.0.0.1:0"
        self.parent, child = ctx.Pipe()
        self.server = ctx.Process(target=link_server, args=(address, child, pin_cpu), daemon=True)
        self.server.start()
        child.close()
        self.poller = self.link = None
        if not self.parent.poll(120):
            raise RuntimeError(f"{transport} server did not start")
        options = {"ring_size": RING_SIZE} if transport == "shm" else {}
        self.poller = Poller()
        self.link = connect(self.parent.recv(), identity("bench-client"), self.poller, timeout=30, **options)

    def payload(self, size: int):
        import torch

        return torch.randn(size // 2).to(torch.bfloat16).view(-1, 1024)  # [rows, 1024] bf16

    def _wait_frame(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            frame = self.link.recv()
            if frame is not None:
                return frame
            self.poller.wait(1.0)
        raise TimeoutError("no reply within 30 s")

    def roundtrip(self, x, seq: int) -> None:
        from resilient_moe.datapath.frames import FrameHeader, FrameKind

        self.link.send(FrameHeader(FrameKind.DISPATCH, seq=seq), tensor=x, timeout=30)
        frame = self._wait_frame()
        assert frame.header.seq == seq and frame.tensor.shape == x.shape
        self.link.release()

    def stream(self, x, n: int) -> None:
        from resilient_moe.datapath.frames import FrameHeader, FrameKind

        self.link.send(FrameHeader(FrameKind.CONTROL), body=json.dumps({"op": "sink", "n": n}).encode())
        for i in range(n):
            self.link.send(FrameHeader(FrameKind.DISPATCH, seq=i), tensor=x, timeout=30)
        frame = self._wait_frame()  # the ack: nothing else comes back meanwhile
        assert frame.header.kind is FrameKind.CONTROL
        self.link.release()

    def idle(self, seconds: float) -> dict:
        from resilient_moe.datapath.frames import FrameHeader, FrameKind

        self.link.send(FrameHeader(FrameKind.CONTROL), body=json.dumps({"op": "idle", "s": seconds}).encode())
        reply = json.loads(bytes(self._wait_frame().body))
        self.link.release()
        return {"cpu_s": reply["cpu_s"], "wall_s": reply["wall_s"]}

    def close(self) -> None:
        from resilient_moe.datapath.frames import FrameHeader, FrameKind

        try:
            if self.link is not None and self.link.alive:
                self.link.send(FrameHeader(FrameKind.CONTROL), body=b'{"op": "exit"}')
        finally:
            if self.link is not None:
                self.link.close()
            if self.poller is not None:
                self.poller.close()
            stop(self.server)
            self.parent.close()


class GrpcEndpoint:
    """Client side of the gRPC server: unary calls on raw bytes."""

    def __init__(self, pin_cpu: bool, ctx) -> None:
        import grpc

        self.parent, child = ctx.Pipe()
        self.server = ctx.Process(target=grpc_server, args=(child, pin_cpu), daemon=True)
        self.server.start()
        child.close()
        self.channel = None
        if not self.parent.poll(120):
            raise RuntimeError("grpc server did not start")
        port = self.parent.recv()
        options = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB)]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.echo = self.channel.unary_unary("/rmoe.Bench/Echo")
        self.sink = self.channel.unary_unary("/rmoe.Bench/Sink")
        grpc.channel_ready_future(self.channel).result(timeout=30)

    def payload(self, size: int) -> bytes:
        return os.urandom(size)

    def roundtrip(self, payload: bytes, seq: int) -> None:
        assert len(self.echo(payload, timeout=30)) == len(payload)

    def stream(self, payload: bytes, n: int) -> None:
        for _ in range(n):
            self.sink(payload, timeout=30)

    def close(self) -> None:
        try:
            if self.channel is not None:
                self.channel.close()
            self.parent.send(b"stop")
        finally:
            stop(self.server)
            self.parent.close()


class PipeEndpoint:
    """Client side of a multiprocessing.Pipe to pipe_server."""

    def __init__(self, pin_cpu: bool, ctx) -> None:
        self.conn, child = ctx.Pipe()
        self.server = ctx.Process(target=pipe_server, args=(child, pin_cpu), daemon=True)
        self.server.start()
        child.close()

    def payload(self, size: int) -> tuple[bytes, bytes, bytes]:
        body = os.urandom(size - 1)
        return b"E" + body, b"S" + body, b"L" + body  # echo, sink, last of a stream

    def roundtrip(self, payload, seq: int) -> None:
        self.conn.send_bytes(payload[0])
        if not self.conn.poll(30):
            raise TimeoutError("pipe server did not answer")
        assert len(self.conn.recv_bytes()) == len(payload[0])

    def stream(self, payload, n: int) -> None:
        for _ in range(n - 1):
            self.conn.send_bytes(payload[1])
        self.conn.send_bytes(payload[2])
        if not self.conn.poll(60) or self.conn.recv_bytes() != b"A":
            raise TimeoutError("pipe server did not ack")

    def close(self) -> None:
        try:
            self.conn.send_bytes(b"Q")
        except OSError:
            pass
        finally:
            stop(self.server)
            self.conn.close()


def stop(process: mp.Process) -> None:
    """Reap a server: give it a moment to exit, then kill it (by its own handle, nothing broader)."""
    process.join(2)
    if process.is_alive():
        process.kill()
        process.join(10)


def measure(endpoints: dict, sizes: list[int], trips: int, rounds: int, stream_bytes: int, budget_s: float) -> dict:
    """Round trips in `rounds` interleaved rounds per size, then one stream per transport."""
    results = {name: {} for name in endpoints}
    for size in sizes:
        payloads = {name: ep.payload(size) for name, ep in endpoints.items()}
        samples = {name: [] for name in endpoints}
        for name, ep in endpoints.items():  # warm-up
            for i in range(max(5, trips // 20)):
                ep.roundtrip(payloads[name], i)
        for _ in range(rounds):
            for name, ep in endpoints.items():
                start = time.monotonic()
                for i in range(trips // rounds):
                    t0 = time.perf_counter_ns()
                    ep.roundtrip(payloads[name], i)
                    samples[name].append((time.perf_counter_ns() - t0) / 1e3)
                    if time.monotonic() - start > budget_s / rounds and i >= 5:
                        break
        for name, ep in endpoints.items():
            n = max(20, min(20_000, stream_bytes // size))
            t0 = time.perf_counter()
            ep.stream(payloads[name], n)
            results[name][size] = {"rtt_us": samples[name], "gbps": n * size / (time.perf_counter() - t0) / 1e9,
                                   "frames": n}
        print(f"  measured {human(size)}", file=sys.stderr)
    return results


# ---------------------------------------------------------------------------------------- routing changes


class _IdleLink:
    """Just enough of a Link for the forwarding engine's bookkeeping (nothing is sent)."""

    transport = "shm"
    alive = True
    max_frame = max_recv_frame = window_bytes = 1 << 20

    def close(self) -> None:
        pass


def routing_changes(layers: int = 58, experts: int = 256, workers: int = 8, repeats: int = 30) -> list[dict]:
    """Milliseconds per routing change on the step thread (median and max over `repeats`)."""
    import random

    from resilient_moe.datapath.expert_peers import ExpertPeer
    from resilient_moe.datapath.forwarding import Forwarder
    from resilient_moe.datapath.poller import Poller
    from resilient_moe.datapath.routing_table import RoutingTable

    rng = random.Random(0)
    names = [f"ew-{i}" for i in range(workers)]
    candidates = []
    for i in range(layers * experts):
        primary = i % workers
        shadow = (primary + 1 + rng.randrange(workers - 1)) % workers
        candidates.append((names[primary], names[shadow]))

    def table(epoch: int) -> RoutingTable:
        return RoutingTable(epoch, layers, experts, tuple(candidates))

    forwarder = Forwarder(identity("aw-0"), Poller(), 1 << 20, on_suspect=lambda *a: None)
    for name in names:
        forwarder.peers[name] = ExpertPeer(name, 1, _IdleLink())
    prepared = [table(e).prepare() for e in range(2, repeats + 2)]
    began = time.perf_counter()
    table(1).prepare()
    prepare_ms = 1e3 * (time.perf_counter() - began)
    forwarder.set_routing(table(1).prepare())
    logging.disable(logging.WARNING)  # the events log a line each; time the bookkeeping alone
    samples: dict[str, list[float]] = {k: [] for k in ("suspect", "trust again", "new link", "fence", "new table")}

    def timed(kind: str, action) -> None:
        start = time.perf_counter()
        action()
        samples[kind].append(1e3 * (time.perf_counter() - start))

    for i in range(repeats):
        victim = names[i % workers]
        timed("suspect", lambda: forwarder.suspect(victim, "benchmark"))
        timed("trust again", lambda: forwarder._trust_again(forwarder.peers[victim]))
        timed("fence", lambda: forwarder.fence(victim, forwarder.peers[victim].incarnation))

        def relink() -> None:  # what _install does besides the poller: the peer is back, routes follow
            forwarder.peers[victim] = ExpertPeer(victim, 2 + i, _IdleLink())
            forwarder.unavailable.discard(victim)
            forwarder._reroute()

        timed("new link", relink)
        forwarder.zombies.clear()
        timed("new table", lambda: forwarder.set_routing(prepared[i]))
    logging.disable(logging.NOTSET)
    rows = [{"change": k, "median_ms": statistics.median(v), "max_ms": max(v)} for k, v in samples.items()]
    rows.append({"change": "prepare a table (off the step)", "median_ms": prepare_ms, "max_ms": prepare_ms})
    return rows


def print_routing(rows: list[dict], layers: int = 58, experts: int = 256, workers: int = 8) -> None:
    print(f"\nrouting changes on the step thread: {layers} layers x {experts} experts, {workers} expert workers, "
          f"2 copies each (target: <= 5 ms)")
    header = f"{'change':>32} {'median ms':>10} {'max ms':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['change']:>32} {r['median_ms']:10.2f} {r['max_ms']:8.2f}")


# ---------------------------------------------------------------------------------------- main


def human(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer trips and bytes (about 30 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="comma list of " + ",".join(TRANSPORTS))
    parser.add_argument("--no-pin", action="store_true", help="do not pin client and server to different CPUs")
    parser.add_argument("--routing", action="store_true", help="measure routing changes at DeepSeek-V3 size instead")
    args = parser.parse_args()
    if args.routing:
        import torch

        torch.set_num_threads(1)
        rows = routing_changes()
        print_routing(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"routing": rows}, f, indent=2)
        return 0
    transports = [t for t in args.transports.split(",") if t]
    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        parser.error(f"unknown transports {sorted(unknown)}")
    trips, rounds, stream_bytes, budget_s = (300, 3, 32 * MiB, 1.0) if args.quick else (3000, 6, 256 * MiB, 6.0)
    from resilient_moe import auth

    # Links prove it at handshake. The server processes are this benchmark's own (a tool, not a cluster's
    # roles), so they get it the way a tool does: in their environment (auth.py).
    os.environ[auth.SECRET_ENV] = auth.ensure_secret().hex()
    pin_cpu = not args.no_pin
    if pin_cpu:
        pin(0)
    ctx = mp.get_context("spawn")
    import torch

    torch.set_num_threads(1)

    # Step 1: every server up, then interleaved measurements; servers are reaped whatever happens.
    endpoints: dict = {}
    try:
        for transport in transports:
            if transport in ("shm", "tcp"):
                endpoints[transport] = LinkEndpoint(transport, pin_cpu, ctx)
            elif transport == "grpc":
                endpoints[transport] = GrpcEndpoint(pin_cpu, ctx)
            else:
                endpoints[transport] = PipeEndpoint(pin_cpu, ctx)
        gc.freeze()
        results = measure(endpoints, SIZES, trips, rounds, stream_bytes, budget_s)
        idle = {name: ep.idle(1.0) for name, ep in endpoints.items() if isinstance(ep, LinkEndpoint)}
    finally:
        for ep in endpoints.values():
            ep.close()

    # Step 2: one table, ratios against shm.
    from resilient_moe import _native

    print(f"\ndatapath round trip and one-way throughput, 2 processes ({'pinned' if pin_cpu else 'unpinned'}, "
          f"crc32c: {_native.crc32c_impl()}, {os.cpu_count()} CPUs)")
    header = f"{'payload':>8} {'transport':>9} {'rtt p50 us':>11} {'rtt p99 us':>11} {'x shm':>7} {'GB/s':>7} {'shm x':>7}"
    print(header)
    print("-" * len(header))
    table = []
    for size in SIZES:
        base = results.get("shm", {}).get(size)
        for transport in transports:
            r = results[transport][size]
            p50, p99 = statistics.median(r["rtt_us"]), percentile(r["rtt_us"], 0.99)
            slower = p50 / statistics.median(base["rtt_us"]) if base else float("nan")
            faster = base["gbps"] / r["gbps"] if base else float("nan")
            print(f"{human(size):>8} {transport:>9} {p50:11.1f} {p99:11.1f} {slower:7.1f} {r['gbps']:7.2f} {faster:7.1f}")
            table.append({"size": size, "transport": transport, "rtt_p50_us": p50, "rtt_p99_us": p99,
                          "rtt_vs_shm": slower, "gbps": r["gbps"], "shm_gbps_ratio": faster,
                          "trips": len(r["rtt_us"]), "stream_frames": r["frames"]})
    for transport, usage in idle.items():
        print(f"idle receiver ({transport}): {1e3 * usage['cpu_s']:.1f} ms CPU over {usage['wall_s']:.2f} s "
              f"({100 * usage['cpu_s'] / usage['wall_s']:.2f}% of a core)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table, "idle": idle, "pinned": pin_cpu, "quick": args.quick,
                       "crc32c": _native.crc32c_impl()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
