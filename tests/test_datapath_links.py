"""Links between real processes: shm and TCP, frames both ways, backpressure, dead peers, corruption.

The peer is this file run as a script (`python test_datapath_links.py peer ADDRESS...`): a small
expert-worker-like loop that accepts links and echoes DISPATCH frames as RESULT frames, and takes
commands in CONTROL frames (stall, burst, corrupt, garbage, stats). Every test kills its peer in a
`finally`, and a fixture checks that no child process and no fd outlives a test.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from resilient_moe import _native
from resilient_moe.datapath.frames import HEADER_SIZE, FrameHeader, FrameKind, encode, frame_size
from resilient_moe.datapath.dial import connect, listen
from resilient_moe.datapath.link import FrameTooLarge, Link, LinkClosed, LinkTimeout, PeerInfo
from resilient_moe.datapath.poller import Poller

HANG = 20.0  # generous bound on anything that could hang
SMALL_RING = 256 << 10

# ---------------------------------------------------------------------------------------- the peer


def _peer_main(addresses: list[str]) -> None:
    """Accept links on every address; echo DISPATCH; obey CONTROL commands. Exits on 'exit' or after 60 s."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    me = PeerInfo("ew-9", (2 << 24) | 9, 77, os.getpid())
    poller = Poller()
    listeners = {}
    for address in addresses:
        lst = listen(address, me, poller)
        poller.add_fd(lst.fileno())
        listeners[lst.fileno()] = lst
    print("READY " + " ".join(lst.address for lst in listeners.values()), flush=True)
    links: list[Link] = []
    closed = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, fds = poller.wait(0.2)
        for fd in fds:
            for _ in range(16):
                link = listeners[fd].accept()
                if link is None:
                    break
                links.append(link)
        for link in ready:
            try:
                for _ in range(10_000):
                    frame = link.recv()
                    if frame is None:
                        break
                    if _serve(link, frame, links, closed) == "exit":
                        return
                link.release()
            except LinkClosed:
                closed += 1
                links.remove(link)
                link.close()


def _serve(link: Link, frame, links: list[Link], closed: int) -> str | None:
    h = frame.header
    if h.kind is FrameKind.DISPATCH:
        link.send(FrameHeader(FrameKind.RESULT, seq=h.seq, layer=h.layer), aux=frame.aux, tensor=frame.tensor,
                  timeout=HANG)
        return None
    if h.kind is not FrameKind.CONTROL:
        return None
    cmd = json.loads(bytes(frame.body))
    op = cmd["op"]
    reply = {"op": op}
    if op == "stall":  # answer, then stop draining for a while
        link.send(FrameHeader(FrameKind.CONTROL, seq=h.seq), body=json.dumps(reply).encode())
        link.release()
        time.sleep(cmd["s"])
        return None
    if op == "burst":  # frames of the given sizes, tensor i filled with its seq
        for i, n in enumerate(cmd["sizes"]):
            link.send(FrameHeader(FrameKind.DISPATCH, seq=i), tensor=torch.full((n,), i % 251, dtype=torch.uint8),
                      timeout=HANG)
    elif op == "corrupt":  # a frame with one payload byte flipped, then a good one
        wire = encode(FrameHeader(FrameKind.RESULT, seq=1), tensor=torch.arange(100, dtype=torch.int32))
        wire[200] ^= 0x40
        link.send_raw(wire)
        link.send(FrameHeader(FrameKind.RESULT, seq=2), tensor=torch.arange(100, dtype=torch.int32))
    elif op == "garbage":  # bytes that are no frame header at all
        link.send_raw(b"\x5a" * 300)
    elif op == "stats":
        reply.update(rejected=link.rejected, closed=closed, links=len(links))
    elif op == "exit":
        return "exit"
    link.send(FrameHeader(FrameKind.CONTROL, seq=h.seq), body=json.dumps(reply).encode(), timeout=HANG)
    return None


# ---------------------------------------------------------------------------------------- harness


def _children() -> set[int]:
    mine = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                mine.add(int(pid))
    return mine


@pytest.fixture(autouse=True)
def no_leaks():
    """No fd and no child process may outlive a test."""
    fds_before = len(os.listdir("/proc/self/fd"))
    children_before = _children()  # e.g. the session's fork server, started by an earlier test
    yield
    assert _children() - children_before == set(), "a child process outlived the test"
    assert len(os.listdir("/proc/self/fd")) <= fds_before, "fds leaked"  # earlier tests may still be closing some


@contextlib.contextmanager
def peer_process(*addresses: str):
    """Start the peer; yields (Popen, [listener addresses]). Killed and reaped on exit, whatever happens."""
    log_file = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: the peer's logging never blocks
    from resilient_moe import auth

    env = {**os.environ, auth.SECRET_ENV: auth.secret().hex()}  # a test's own process: a tool's way in (auth.py)
    proc = subprocess.Popen([sys.executable, __file__, "peer", *addresses], stdout=subprocess.PIPE,
                            stderr=log_file, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("READY "):
            proc.kill()
            proc.wait(timeout=HANG)
            log_file.seek(0)
            raise RuntimeError(f"peer did not start: {line!r} {log_file.read()[-2000:]}")
        yield proc, line.split()[1:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=HANG)
        proc.stdout.close()
        log_file.close()


def me() -> PeerInfo:
    return PeerInfo("aw-0", 1 << 24, 5, os.getpid())


def addresses_for(transport: str) -> list[str]:
    return [f"shm:@rmoe-test-{os.getpid()}-{time.monotonic_ns()}" if transport == "shm" else "tcp:127.0.0.1:0"]


def dial(address: str, poller: Poller, **options) -> Link:
    if address.startswith("shm:"):
        options.setdefault("ring_size", SMALL_RING)
    return connect(address, me(), poller, timeout=HANG, **options)


def wait_frame(link: Link, poller: Poller, bound: float = HANG):
    """The next frame on link, waiting on the poller at most `bound` seconds."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        frame = link.recv()
        if frame is not None:
            return frame
        poller.wait(0.5)
    raise AssertionError("no frame arrived in time")


def command(link: Link, poller: Poller, op: str, **args) -> dict:
    """Send a CONTROL command and wait for its reply (other frames and replies before it are dropped)."""
    link.send(FrameHeader(FrameKind.CONTROL, seq=12345), body=json.dumps({"op": op, **args}).encode())
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        frame = wait_frame(link, poller)
        reply = json.loads(bytes(frame.body)) if frame.header.kind is FrameKind.CONTROL else None
        link.release()
        if reply is not None and reply["op"] == op:
            return reply
    raise AssertionError(f"no reply to {op}")


TRANSPORTS = ["shm", "tcp"]

# ---------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_many_frames_both_ways(transport: str) -> None:
    with peer_process(*addresses_for(transport)) as (_, (address,)), Poller() as poller:
        link = dial(address, poller)
        try:
            assert link.peer.name == "ew-9" and link.peer.incarnation == 77
            # Echo: sizes chosen so a 256 KiB ring wraps many times; several frames in flight.
            sizes = [1, 100, 4000, 30_000, 70_000, 17, 100_000, 0, 65_536, 9_999] * 6
            sent = {}
            for seq, n in enumerate(sizes):
                tensor = torch.randint(-1000, 1000, (n // 4,), dtype=torch.int32)  # n bytes
                aux = torch.arange(seq % 5, dtype=torch.int32) if seq % 2 else None
                link.send(FrameHeader(FrameKind.DISPATCH, seq=seq, layer=seq % 7), aux=aux, tensor=tensor, timeout=HANG)
                sent[seq] = (tensor.clone(), aux)
                if seq % 3 == 2:  # drain now and then so both rings keep moving
                    for _ in range(3):
                        frame = wait_frame(link, poller)
                        want, want_aux = sent.pop(frame.header.seq)
                        assert frame.header.kind is FrameKind.RESULT
                        assert torch.equal(frame.tensor, want)
                        assert (frame.aux is None) == (want_aux is None) or want_aux.numel() == 0
                        link.release()
            while sent:
                frame = wait_frame(link, poller)
                assert torch.equal(frame.tensor, sent.pop(frame.header.seq)[0])
                link.release()
            # The other direction: a burst from the peer, in order, wrapping the ring.
            burst = [50_000, 3, 90_000, 120_000, 64, 77_777] * 4
            link.send(FrameHeader(FrameKind.CONTROL), body=json.dumps({"op": "burst", "sizes": burst}).encode())
            for i, n in enumerate(burst):
                frame = wait_frame(link, poller)
                assert frame.header.seq == i and frame.tensor.numel() == n
                assert bool((frame.tensor == i % 251).all())
                link.release()
            assert wait_frame(link, poller).header.kind is FrameKind.CONTROL  # the burst's own reply
            link.release()
            # Too big for the link: refused with a clear error, link still fine.
            if transport == "shm":
                with pytest.raises(FrameTooLarge, match="half the ring"):
                    link.send(FrameHeader(FrameKind.DISPATCH), tensor=torch.zeros(SMALL_RING // 2, dtype=torch.uint8))
            else:
                link.max_frame = 1 << 20  # as if the peer had announced a 1 MiB limit
                with pytest.raises(FrameTooLarge, match="limit"):
                    link.send(FrameHeader(FrameKind.DISPATCH), tensor=torch.zeros(2 << 20, dtype=torch.uint8))
            link.send(FrameHeader(FrameKind.DISPATCH, seq=999), tensor=torch.ones(3))
            assert wait_frame(link, poller).header.seq == 999
            assert link.rejected == 0 and command(link, poller, "stats")["rejected"] == 0
        finally:
            link.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_links_count_what_they_send_and_tcp_reuses_its_receive_memory(transport: str) -> None:
    """Echoes of small and big frames, released one by one: after the first lap a TCP link receives
    into memory it already has (no buffer allocated per frame), and the bytes are still right; both
    transports count exactly the bytes of the frames they sent."""
    with peer_process(*addresses_for(transport)) as (_, (address,)), Poller() as poller:
        link = dial(address, poller)
        try:
            sizes = [64, 20_000, 4_000, 100_000, 256, 70_000]
            if transport == "tcp":
                sizes += [600_000, 1_000_000]  # bigger than its staging buffer: read into buffers of their own
            sent_before, frames_before, expected = link.bytes_sent, link.frames_sent, 0
            allocations = None
            for lap in range(5):
                for seq, n in enumerate(sizes):
                    tensor = torch.full((n // 4,), lap * 100 + seq, dtype=torch.int32)
                    link.send(FrameHeader(FrameKind.DISPATCH, seq=seq), tensor=tensor, timeout=HANG)
                    expected += frame_size(0, n)
                    frame = wait_frame(link, poller)
                    assert frame.header.seq == seq and torch.equal(frame.tensor, tensor)
                    link.release()
                if transport == "tcp" and lap == 0:
                    allocations = link._reader.allocations
            assert link.bytes_sent - sent_before == expected and link.frames_sent - frames_before == 5 * len(sizes)
            if transport == "tcp":
                assert link._reader.allocations == allocations, "laps after the first reuse the receive memory"
        finally:
            link.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_full_channel_backpressure_then_timeout(transport: str) -> None:
    with peer_process(*addresses_for(transport)) as (_, (address,)), Poller() as poller:
        link = dial(address, poller)
        try:
            frame_bytes = 32 << 10 if transport == "shm" else 1 << 20
            payload = torch.zeros(frame_bytes, dtype=torch.uint8)
            # Step 1: the peer stops draining for 1.5 s; sends block once the channel is full,
            # then complete when it drains again.
            command(link, poller, "stall", s=1.5)
            start = time.monotonic()
            slowest = 0.0
            for seq in range(400):  # the channel fills long before this
                t0 = time.monotonic()
                link.send(FrameHeader(FrameKind.DISPATCH, seq=seq), tensor=payload, timeout=HANG)
                slowest = max(slowest, time.monotonic() - t0)
                if slowest > 0.3:
                    break
                if seq % 4 == 3:  # keep our own incoming side drained (the peer echoes)
                    while link.recv() is not None:
                        link.release()
            assert slowest > 0.3, "sends never blocked on a full channel"
            assert time.monotonic() - start < HANG
            # Step 2: the peer stalls for good; a send gives up after its timeout.
            command_sent = time.monotonic()
            reply = command(link, poller, "stall", s=30)
            assert reply["op"] == "stall" and time.monotonic() - command_sent < HANG
            with pytest.raises(LinkTimeout):
                for seq in range(1000):
                    link.send(FrameHeader(FrameKind.DISPATCH, seq=seq), tensor=payload, timeout=0.5)
        finally:
            link.close()


def test_sigkilled_peer_is_seen_at_once() -> None:
    addresses = addresses_for("shm") + addresses_for("tcp")
    with peer_process(*addresses) as (proc, (shm_address, tcp_address)), Poller() as poller:
        shm, tcp = dial(shm_address, poller), dial(tcp_address, poller)
        blocked_sender = dial(shm_address, poller)
        try:
            for link in (shm, tcp, blocked_sender):
                link.send(FrameHeader(FrameKind.DISPATCH, seq=1), tensor=torch.ones(8))
                assert wait_frame(link, poller).header.seq == 1
                link.release()
            # Fill blocked_sender's ring while the peer sleeps, so the next send blocks.
            command(blocked_sender, poller, "stall", s=30)
            payload = torch.zeros(32 << 10, dtype=torch.uint8)
            with pytest.raises(LinkTimeout):
                for seq in range(100):
                    blocked_sender.send(FrameHeader(FrameKind.DISPATCH, seq=seq), tensor=payload, timeout=0.2)
            # A blocked send and a blocked poller both notice the SIGKILL quickly.
            killer = threading.Timer(0.3, os.kill, (proc.pid, signal.SIGKILL))
            killer.start()
            start = time.monotonic()
            with pytest.raises(LinkClosed):
                blocked_sender.send(FrameHeader(FrameKind.DISPATCH), tensor=payload, timeout=HANG)
            assert time.monotonic() - start < 5
            killer.join()
            dead: set[Link] = set()
            while not dead >= {shm, tcp} and time.monotonic() - start < 5:
                ready, _ = poller.wait(5.0)
                for link in ready:
                    try:
                        while link.recv() is not None:
                            link.release()
                    except LinkClosed:
                        dead.add(link)
            assert dead >= {shm, tcp}, "poller did not report both dead links within 5 s"
            assert not shm.alive and not tcp.alive
            with pytest.raises(LinkClosed):
                shm.send(FrameHeader(FrameKind.PROBE))
        finally:
            for link in (shm, tcp, blocked_sender):
                link.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_corrupt_frames_are_counted_and_skipped(transport: str, caplog) -> None:
    with peer_process(*addresses_for(transport)) as (_, (address,)), Poller() as poller:
        link = dial(address, poller)
        try:
            # Peer -> us: a corrupt frame then a good one.
            with caplog.at_level(logging.ERROR):
                link.send(FrameHeader(FrameKind.CONTROL), body=json.dumps({"op": "corrupt"}).encode())
                frame = wait_frame(link, poller)
            assert frame.header.seq == 2 and torch.equal(frame.tensor, torch.arange(100, dtype=torch.int32))
            assert link.rejected == 1
            assert "checksum mismatch" in caplog.text
            link.release()
            assert wait_frame(link, poller).header.kind is FrameKind.CONTROL  # the reply to 'corrupt'
            link.release()
            # Us -> peer: the same, via send_raw.
            wire = encode(FrameHeader(FrameKind.DISPATCH, seq=5), tensor=torch.ones(64))
            wire[HEADER_SIZE + 10] ^= 1
            link.send_raw(wire)
            link.send(FrameHeader(FrameKind.DISPATCH, seq=6), tensor=torch.ones(64))
            assert wait_frame(link, poller).header.seq == 6
            link.release()
            assert command(link, poller, "stats")["rejected"] == 1
            # Bytes that are no frame at all: shm skips the message, TCP cannot resync and closes.
            with caplog.at_level(logging.ERROR):
                link.send(FrameHeader(FrameKind.CONTROL), body=json.dumps({"op": "garbage"}).encode())
                if transport == "shm":
                    assert command(link, poller, "stats")["op"] == "stats"
                    assert link.rejected == 2 and "bad magic" in caplog.text
                else:
                    with pytest.raises(LinkClosed, match="bad magic"):
                        for _ in range(100):
                            wait_frame(link, poller)
                            link.release()
                    assert not link.alive and "corrupt" in caplog.text
        finally:
            link.close()


def test_closing_one_link_leaves_the_others_working() -> None:
    addresses = addresses_for("shm") + addresses_for("tcp")
    with peer_process(*addresses) as (_, (shm_address, tcp_address)), Poller() as poller:
        links = [dial(shm_address, poller), dial(shm_address, poller), dial(tcp_address, poller),
                 dial(tcp_address, poller)]
        try:
            for i, link in enumerate(links):
                link.send(FrameHeader(FrameKind.DISPATCH, seq=i), tensor=torch.full((10,), float(i)))
                assert wait_frame(link, poller).header.seq == i
                link.release()
            links[0].close()
            links[2].close()
            with pytest.raises(LinkClosed):
                links[0].recv()
            deadline = time.monotonic() + HANG
            while time.monotonic() < deadline:  # the peer notices both closes on its own
                stats = command(links[1], poller, "stats")
                if stats["closed"] == 2:
                    break
                time.sleep(0.05)
            assert stats["closed"] == 2 and stats["links"] == 2
            for seq, link in enumerate(links[1::2]):
                for k in range(20):
                    link.send(FrameHeader(FrameKind.DISPATCH, seq=100 * seq + k), tensor=torch.randn(1000))
                    assert wait_frame(link, poller).header.seq == 100 * seq + k
                    link.release()
        finally:
            for link in links:
                link.close()


# ---------------------------------------------------------------------------------------- in-process


def _pair(transport: str, poller_a: Poller, poller_b: Poller, **options) -> tuple[Link, Link]:
    """Both ends in this process (connect runs in a thread while we accept)."""
    lst = listen(addresses_for(transport)[0], PeerInfo("ew-1", 2 << 24, 1, os.getpid()), poller_b)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("a", connect(lst.address, me(), poller_a, **options)))
    thread.start()
    try:
        b = None
        deadline = time.monotonic() + HANG
        while b is None and time.monotonic() < deadline:
            select.select([lst.fileno()], [], [], 0.1)
            b = lst.accept()
        thread.join(HANG)
        return out["a"], b
    finally:
        lst.close()


def test_ring_api_wraps_and_stays_aligned() -> None:
    segment = _native.shm_segment(64 << 10)
    producer_bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    a, b = socket.socketpair()
    try:
        tx = _native.ShmRing(segment, 0, 64 << 10, True, producer_bell)
        rx = _native.ShmRing(segment, 0, 64 << 10, False, b.fileno())
        assert tx.max_message == (32 << 10) - 64
        with pytest.raises(_native.MessageTooLarge):
            tx.try_reserve(tx.max_message + 1)
        total = 0
        for i in range(500):
            n = (i * 977) % 20_000 + 1
            slot = tx.try_reserve(n)
            if slot is None:  # full: drain everything and retry
                while (msg := rx.recv()) is not None:
                    total += len(msg)
                rx.release()
                slot = tx.try_reserve(n)
            assert torch.frombuffer(slot, dtype=torch.uint8).data_ptr() % 64 == 0
            slot[:1] = bytes([i % 256])
            slot[-1:] = bytes([i % 256])
            tx.commit(n)
            assert tx.push(b"x" * 10) in (True, False)
        while (msg := rx.recv()) is not None:
            total += len(msg)
        rx.release()
        assert total > 500 * 10 and tx.used == 0
        tx.close()
        rx.close()
    finally:
        os.close(segment)
        os.close(producer_bell)
        a.close()
        b.close()


def test_corrupt_ring_closes_the_link(caplog) -> None:
    with Poller() as pa, Poller() as pb:
        a, b = _pair("shm", pa, pb, ring_size=SMALL_RING)
        try:
            # A producer that breaks the ring's rules: a record longer than what it published.
            slot = a.tx.try_reserve(64)
            a.tx.commit(64)
            record = torch.frombuffer(slot, dtype=torch.uint8).data_ptr() - _native.RING_RECORD_HEADER
            ctypes.memmove(record + 4, (1 << 30).to_bytes(4, "little"), 4)  # its length field
            with caplog.at_level(logging.WARNING), pytest.raises(LinkClosed, match="corrupt"):
                b.recv()
            assert not b.alive and "corrupt" in caplog.text
        finally:
            a.close()
            b.close()


def _dial_in_thread(lst, poller: Poller, to: str = "", **options) -> dict:
    """Connect to `lst` from a thread while this one accepts (`options` go to `connect`); {"link": ...}
    or {"error": ...}, and "accepted" when the listener accepted a link."""
    out: dict = {}

    def dial() -> None:
        try:
            out["link"] = connect(lst.address, me(), None, timeout=HANG, to=to, **options)
        except Exception as e:  # noqa: BLE001 (the test looks at what it was)
            out["error"] = e

    thread = threading.Thread(target=dial)
    thread.start()
    deadline = time.monotonic() + HANG
    while thread.is_alive() and time.monotonic() < deadline:
        select.select([lst.fileno()], [], [], 0.05)
        link = lst.accept()
        if link is not None:
            out["accepted"] = link
    thread.join(HANG)
    return out


def test_handshake_refusals_and_slow_clients() -> None:
    with Poller() as poller:
        lst = listen(addresses_for("shm")[0], me(), poller, max_ring_size=SMALL_RING, handshake_timeout=0.2)
        try:
            out = _dial_in_thread(lst, poller, ring_size=4 * SMALL_RING)
            assert "accepted" not in out and isinstance(out.get("error"), LinkClosed)
            assert "ring_size" in str(out["error"])
            # A client that connects and says nothing is dropped after the handshake timeout.
            silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            silent.connect("\0" + lst.address[len("shm:@"):])
            try:
                assert lst.accept() is None
                time.sleep(0.3)
                assert lst.accept() is None
                silent.settimeout(HANG)
                assert silent.recv(16) == b""  # the listener hung up on it
            finally:
                silent.close()
        finally:
            lst.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_connector_without_the_secret_is_refused_and_counted(transport: str, monkeypatch) -> None:
    from resilient_moe import auth
    from resilient_moe.datapath import handshake

    other = auth.new_secret()
    monkeypatch.setattr(handshake, "link_credential",
                        lambda identity, to: auth.Credential.make("link", handshake.link_context(identity, to), key=other))
    before = auth.REFUSED["link"]
    with Poller() as poller:
        with listen(addresses_for(transport)[0], PeerInfo("ew-1", 2 << 24, 1, os.getpid()), poller) as lst:
            out = _dial_in_thread(lst, poller)
    assert "accepted" not in out and "link" not in out
    assert isinstance(out["error"], LinkClosed) and "authentication failed: link: wrong credential" in str(out["error"])
    assert auth.REFUSED["link"] == before + 1


def test_a_hello_meant_for_another_worker_is_refused() -> None:
    from resilient_moe import auth

    before = auth.REFUSED["link"]
    with Poller() as poller:
        with listen(addresses_for("shm")[0], PeerInfo("ew-1", 2 << 24, 1, os.getpid()), poller) as lst:
            out = _dial_in_thread(lst, poller, to="ew-7")  # as a HELLO recorded on its way to ew-7 would be
            assert "meant for 'ew-7'" in str(out["error"]) and auth.REFUSED["link"] == before + 1
            out = _dial_in_thread(lst, poller, to="ew-1")
            assert "link" in out and "accepted" in out
            out["link"].close()
            out["accepted"].close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_listener_without_the_secret_is_dropped_by_the_connector(transport: str, monkeypatch) -> None:
    from resilient_moe import auth
    from resilient_moe.datapath.handshake import Listener, parse_hello

    def accepts_anyone(self, conn, data, transport):
        return (*parse_hello(data, FrameKind.HELLO), "0" * 64)

    monkeypatch.setattr(Listener, "_check_hello", accepts_anyone)
    with Poller() as poller:
        with listen(addresses_for(transport)[0], PeerInfo("ew-1", 2 << 24, 1, os.getpid()), poller) as lst:
            out = _dial_in_thread(lst, poller)
            if "accepted" in out:
                out["accepted"].close()
    assert "link" not in out
    assert isinstance(out["error"], auth.AuthError) and "did not prove the cluster secret" in str(out["error"])


def test_poller_sleeps_and_wakes_on_a_frame_and_on_an_fd() -> None:
    """A link made without a poller (its own doorbell) joins one later; a sleeping wait wakes up."""
    with Poller() as pb:
        lst = listen(addresses_for("shm")[0], PeerInfo("ew-1", 2 << 24, 1, os.getpid()), pb)
        out: dict = {}
        thread = threading.Thread(target=lambda: out.setdefault("a", connect(lst.address, me(), None,
                                                                              ring_size=SMALL_RING)))
        thread.start()
        b = None
        deadline = time.monotonic() + HANG
        while b is None and time.monotonic() < deadline:
            select.select([lst.fileno()], [], [], 0.1)
            b = lst.accept()
        thread.join(HANG)
        lst.close()
        a = out["a"]
        read_end, write_end = os.pipe()
        try:
            with Poller(spin_us=5) as pa:
                pa.add(a)
                pa.add_fd(read_end)
                # Well past the spin, so the wait sleeps in epoll and the doorbell must wake it.
                sender = threading.Timer(0.3, lambda: b.send(FrameHeader(FrameKind.RESULT, seq=7), tensor=torch.ones(5)))
                sender.start()
                start = time.monotonic()
                ready, fds = pa.wait(HANG)
                sender.join()
                assert ready == [a] and fds == [] and time.monotonic() - start < HANG / 2
                assert a.recv().header.seq == 7
                a.release()
                writer = threading.Timer(0.3, os.write, (write_end, b"x"))
                writer.start()
                ready, fds = pa.wait(HANG)
                writer.join()
                assert ready == [] and fds == [read_end]
                assert pa.wait(0) == ([], [read_end])  # level-triggered until read
                os.read(read_end, 1)
                assert pa.wait(0.05) == ([], [])
                pa.remove(a)
        finally:
            os.close(read_end)
            os.close(write_end)
            a.close()
            b.close()


def test_links_without_a_poller_and_bad_addresses() -> None:
    with Poller() as pb:
        lst = listen(addresses_for("tcp")[0], me(), pb)
        try:
            assert lst.address.startswith("tcp:127.0.0.1:")
        finally:
            lst.close()
    with pytest.raises(ValueError, match="link address"):
        connect("udp:1.2.3.4:5", me())
    with Poller() as pa, Poller() as pb:
        a, b = _pair("shm", pa, pb, ring_size=SMALL_RING)
        other = Poller()
        try:
            with pytest.raises(ValueError, match="another poller"):
                other.add(a)
        finally:
            other.close()
            a.close()
            b.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer"]:
        _peer_main(sys.argv[2:])


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_header_only_and_aux_only_frames_travel(transport):
    """Probes carry no payload at all; both transports must send and deliver them."""
    from resilient_moe.datapath.frames import FrameHeader, FrameKind
    from resilient_moe.datapath.dial import connect, listen
    from resilient_moe.datapath.link import PeerInfo
    from resilient_moe.datapath.poller import Poller

    poller = Poller()
    address = f"shm:@rmoe-test-probe-{os.getpid()}" if transport == "shm" else "tcp:127.0.0.1:0"
    listener = listen(address, PeerInfo("ew", 2, 1, os.getpid()), poller)
    poller.add_fd(listener.fileno())
    client_poller = Poller()
    connected: list = []
    dialer = threading.Thread(target=lambda: connected.append(
        connect(listener.address, PeerInfo("aw", 1, 1, os.getpid()), client_poller)))
    dialer.start()
    server = None
    try:
        for _ in range(200):
            poller.wait(0.05)
            server = listener.accept()
            if server is not None:
                break
        dialer.join(10)
        assert server is not None and connected
        client = connected[0]
        client.send(FrameHeader(FrameKind.PROBE, seq=7))
        client.send(FrameHeader(FrameKind.DISPATCH, seq=8), aux=torch.arange(3, dtype=torch.int32))
        got = []
        for _ in range(200):
            poller.wait(0.05)
            while (frame := server.recv()) is not None:
                got.append((frame.header.kind, frame.header.seq, None if frame.aux is None else frame.aux.tolist()))
            server.release()
            if len(got) == 2:
                break
        assert got == [(FrameKind.PROBE, 7, None), (FrameKind.DISPATCH, 8, [0, 1, 2])]
    finally:
        dialer.join(10)
        for link in connected:
            link.close()
        if server is not None:
            server.close()
        listener.close()
        poller.close()
        client_poller.close()


def test_shm_bursts_both_ways_never_deadlock_over_many_laps():
    """Regression: restarting at offset 0 in an empty ring once left room for a single frame until the
    consumer read past the padding, so two peers sending bursts blocked on each other."""
    rounds, burst = 600, 3
    with peer_process(f"shm:@rmoe-test-burst-{os.getpid()}") as (_, addresses):
        poller = Poller()
        link = connect(addresses[0], PeerInfo("aw", 1, 1, os.getpid()), poller, ring_size=1 << 20)
        try:
            x = torch.randn(400, 64)  # ~100 KiB frames: a 1 MiB ring laps every ~10 frames
            received = 0
            for r in range(rounds):
                for j in range(burst):
                    link.send(FrameHeader(FrameKind.DISPATCH, seq=r * burst + j), tensor=x, timeout=HANG)
                want = (r + 1) * burst
                deadline = time.monotonic() + HANG
                while received < want:
                    assert time.monotonic() < deadline, f"round {r}: replies stopped at {received}/{want}"
                    poller.wait(0.05)
                    got = False
                    while (frame := link.recv()) is not None:
                        assert torch.equal(frame.tensor, x)
                        received += 1
                        got = True
                    if got:
                        link.release()
        finally:
            link.close()
            poller.close()
