"""Injected datapath faults (chaos testing): delay, loss, corruption and partitions on AW <-> EW links.

The chaos tool (chaos/) asks the controller for them (SetFaults); they travel to every attention worker
in the cluster state, and each AW's forwarding engine wraps the links they name in a `FaultyLink`.
Off by default: no link is wrapped, so fault injection costs nothing on the datapath.

They are applied at the attention worker's end of each link and follow what real transports and
real failures do:

- `delay`: every frame the AW sends on the link leaves `delay_ms` later, plus a uniform extra in
  [0, `jitter_ms`]. Frames keep their order (links are FIFO), so it adds to every round trip.
- `drop`: each frame the AW sends is lost with probability `drop_rate` and sent again
  `retransmit_ms` later, as TCP repairs a lost segment; frames behind it wait (head-of-line).
- `partition`: nothing crosses the link in either direction until the fault ends, then everything
  held is delivered, as over a TCP connection that survived the cut. The AW sees a silent link, its
  probes go unanswered, and it suspects the EW and replays to shadow experts; when the partition
  heals, the EW's held answers (to probes too) clear the suspicion.
- `corrupt`: a frame the AW sends arrives with one bit flipped; the receiver's checksum rejects it,
  so it is lost for good and only the part's deadline gets its rows answered (by a resend).
- `lose`: a frame the AW sends vanishes (no retransmit), e.g. a buggy NIC or a crashed relay.
- `late`: a frame arriving at the AW (a RESULT, a probe answer) is held `delay_ms` before it is
  delivered, e.g. an EW stalled between computing and answering; past the part's deadline the AW
  resends elsewhere and the late answer is dropped as a duplicate.

One fault is not about a link: `poison` (with `token_id`) makes an attention worker exit when it
schedules a request whose prompt holds that token, as a request that triggers a bug would take its
worker down; the frontend must then stop moving that request from worker to worker.

`drop`, `corrupt`, `lose` and `late` pick frames with probability `drop_rate` (1 for `late` when
unset); `corrupt`, `lose` and `late` only pick frames that carry rows (DISPATCH out, RESULT in), not
probes; `count` > 0 limits a fault to that many frames in all (0: no limit), so a test can hit
exactly one frame. A fault names its link by `source` (an attention worker, "" = every one) and
`target` (an expert worker, "" = every one); `expires_at` (unix time, 0 = until removed) ends it on
every AW at the same moment, however late the AW learned of it.
"""

from __future__ import annotations

import math
import random
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from resilient_moe.datapath.frames import HEADER_SIZE, Frame, FrameHeader, FrameKind, encode
from resilient_moe.datapath.link import Link
from resilient_moe.errors import ConfigError

LINK_KINDS = ("delay", "drop", "partition", "corrupt", "lose", "late")
KINDS = (*LINK_KINDS, "poison")
_RATED = ("drop", "corrupt", "lose", "late")  # kinds that pick frames at random (drop_rate)


@dataclass(frozen=True)
class LinkFault:
    """One injected fault on the AW -> EW links it names."""

    id: str
    kind: str  # "delay" | "drop" | "partition"
    source: str = ""  # attention worker name; "" = every attention worker
    target: str = ""  # expert worker name; "" = every expert worker
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    drop_rate: float = 0.0
    retransmit_ms: float = 200.0
    expires_at: float = 0.0  # unix time; 0 = until removed
    count: int = 0  # frames it may hit in all; 0 = no limit
    token_id: int = -1  # poison: the prompt token that takes an attention worker down (ignored otherwise)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"fault id must be a non-empty string, got {self.id!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"fault kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("source", "target"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"fault {name} must be a worker name or '', got {getattr(self, name)!r}")
        for name in ("delay_ms", "jitter_ms", "retransmit_ms", "expires_at"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"fault {name} must be a number >= 0, got {value!r}")
        if isinstance(self.drop_rate, bool) or not isinstance(self.drop_rate, (int, float)) or not 0 <= self.drop_rate <= 1:
            raise ConfigError(f"fault drop_rate must be a probability in [0, 1], got {self.drop_rate!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 0 <= self.count < 1 << 32:
            raise ConfigError(f"fault count must be an integer >= 0, got {self.count!r}")
        if isinstance(self.token_id, bool) or not isinstance(self.token_id, int) or \
                (self.kind == "poison" and self.token_id < 0):
            raise ConfigError(f"fault token_id must be a token id >= 0 for a poison fault, got {self.token_id!r}")
        if self.kind in ("delay", "late") and self.delay_ms == 0 and self.jitter_ms == 0:
            raise ConfigError(f"a {self.kind} fault needs delay_ms > 0 or jitter_ms > 0")
        if self.kind in ("drop", "corrupt", "lose") and self.drop_rate == 0:
            raise ConfigError(f"a {self.kind} fault needs drop_rate > 0 (the probability that a frame is hit)")

    def applies_to(self, source: str, target: str) -> bool:
        return self.source in ("", source) and self.target in ("", target)

    def active(self, now: float) -> bool:
        return self.expires_at == 0 or now < self.expires_at

    @property
    def link(self) -> str:
        """The links it names, as the chaos tool writes them: "aw-0->ew-1", "*->ew-1", "aw-0->*"."""
        return f"{self.source or '*'}->{self.target or '*'}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LinkFault":
        if not isinstance(data, dict):
            raise ConfigError(f"a fault must be an object, got {data!r}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown fault field {unknown[0]!r} (known: {', '.join(cls.__dataclass_fields__)})")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"fault: {e}") from None

    def to_proto(self, pb):
        """As a controller_pb2.Fault (`pb` is the controller_pb2 module)."""
        return pb.Fault(**self.to_dict())

    @classmethod
    def from_proto(cls, msg) -> "LinkFault":
        return cls(**{name: getattr(msg, name) for name in cls.__dataclass_fields__})


class FaultPlan:
    """The faults in force on one attention worker's links, and their shared state (random stream,
    frames hit per fault, counters); every `FaultyLink` of the worker consults it."""

    def __init__(self, me: str, clock: Callable[[], float] = time.time) -> None:
        self.me = me
        self.clock = clock  # unix time, to compare with expires_at
        self.faults: list[LinkFault] = []
        self._rng = random.Random(zlib.crc32(me.encode()))
        self._hits: dict[str, int] = {}  # fault id -> frames it hit
        self.counters = {"held_frames": 0, "retransmits": 0, "corrupted": 0, "lost": 0, "late": 0}

    def update(self, faults: list[LinkFault]) -> None:
        self.faults = [f for f in faults if f.source in ("", self.me) and f.kind in LINK_KINDS]
        ids = {f.id for f in self.faults}
        self._hits = {i: n for i, n in self._hits.items() if i in ids}

    def on(self, target: str) -> list[LinkFault]:
        """Faults in force now on the link to `target`."""
        now = self.clock()
        return [f for f in self.faults if f.target in ("", target) and f.active(now)]

    def _hit(self, fault: LinkFault) -> bool:
        """Does `fault` pick the frame at hand? (its rate, within its count)"""
        if fault.count and self._hits.get(fault.id, 0) >= fault.count:
            return False
        rate = fault.drop_rate if fault.drop_rate or fault.kind != "late" else 1.0
        if rate < 1.0 and self._rng.random() >= rate:
            return False
        self._hits[fault.id] = self._hits.get(fault.id, 0) + 1
        return True

    def _partition_end(self, faults: list[LinkFault]) -> float | None:
        """Monotonic time when the partition among `faults` ends (inf: until removed), None if none."""
        ends = [f.expires_at for f in faults if f.kind == "partition"]
        if not ends:
            return None
        if 0 in ends:
            return math.inf
        return time.monotonic() + max(0.0, max(ends) - self.clock())

    def plan_send(self, target: str, rows: bool) -> tuple[str, float | None, bool]:
        """(fate, due, partitioned) of a frame about to be sent to `target` (`rows`: it carries rows):
        fate "pass", "lose" or "corrupt"; due: monotonic time it may leave (None: now)."""
        faults = self.on(target)
        if not faults:
            return "pass", None, False
        fate = "pass"
        for f in faults:
            if f.kind in ("lose", "corrupt") and rows and self._hit(f):
                fate = f.kind
                self.counters["lost" if f.kind == "lose" else "corrupted"] += 1
        end = self._partition_end(faults)
        due = end if end is not None else time.monotonic()
        held = end is not None
        for f in faults:
            if f.kind == "delay":
                due += (f.delay_ms + self._rng.uniform(0.0, f.jitter_ms)) / 1000.0
                held = True
            elif f.kind == "drop" and self._hit(f):
                due += f.retransmit_ms / 1000.0
                self.counters["retransmits"] += 1
                held = True
        return fate, (due if held else None), end is not None

    def plan_recv(self, target: str, rows: bool) -> tuple[float | None, bool]:
        """(due, partitioned) of a frame that arrived from `target` (`rows`: it carries rows): when it may
        be delivered (None: now)."""
        faults = self.on(target)
        if not faults:
            return None, False
        end = self._partition_end(faults)
        due = end if end is not None else time.monotonic()
        held = end is not None
        for f in faults:
            if f.kind == "late" and rows and self._hit(f):
                due += (f.delay_ms + self._rng.uniform(0.0, f.jitter_ms)) / 1000.0
                self.counters["late"] += 1
                held = True
        return (due if held else None), end is not None

    def partitioned(self, target: str) -> bool:
        return any(f.kind == "partition" for f in self.on(target))


@dataclass
class _Held:
    due: float  # time.monotonic() when it may go
    partitioned: bool  # held by a partition: goes as soon as no partition covers its link
    header: FrameHeader | None = None  # outgoing: the frame to send (tensors copied)...
    aux: torch.Tensor | None = None
    tensor: torch.Tensor | None = None
    body: bytes | None = None
    raw: bytes | None = None  # ...or its (corrupted) bytes
    frame: Frame | None = None  # incoming: a private copy of the frame that arrived


class FaultyLink(Link):
    """A link whose frames go through a `FaultPlan`: held, delayed, lost or corrupted on the way out,
    held on the way in. Everything else (liveness, the poller, closing) is the wrapped link's.

    Held frames move when the owner next calls `recv`, `flush` or `try_send` on the link, so an
    owner that polls its links (as the forwarding engine does every few milliseconds) needs nothing else.
    """

    def __init__(self, inner: Link, plan: FaultPlan, target: str) -> None:
        self.inner = inner
        self.plan = plan
        self.target = target
        self.peer = inner.peer
        self.transport = inner.transport
        self.max_frame = inner.max_frame
        self.max_recv_frame = inner.max_recv_frame
        self.window_bytes = inner.window_bytes
        self._out: deque[_Held] = deque()
        self._in: deque[_Held] = deque()

    @property
    def rejected(self) -> int:  # type: ignore[override]
        return self.inner.rejected

    @property
    def idle(self) -> bool:
        """Nothing held: the owner may unwrap the link once no fault names it."""
        return not self._out and not self._in

    # ---- sending ----------------------------------------------------------------------------

    def try_send(self, header, aux=None, tensor=None, body=None) -> bool:
        fate, due, partitioned = self.plan.plan_send(self.target, header.kind == FrameKind.DISPATCH)
        if fate == "lose":
            return True  # gone: only the sender's deadline notices
        raw = self._corrupted(header, aux, tensor, body) if fate == "corrupt" else None
        if not self._out and due is None and raw is None:
            return self.inner.try_send(header, aux, tensor, body)
        now = time.monotonic()
        due = now if due is None else due
        if self._out:
            due = max(due, self._out[-1].due)  # FIFO: never overtake a frame held before it
        self._out.append(_Held(due, partitioned, header, _own(aux), _own(tensor), body, raw))
        self.plan.counters["held_frames"] += 1
        self._pump()
        return True

    def send(self, header, aux=None, tensor=None, body=None, timeout: float = 5.0) -> None:
        if not self.try_send(header, aux, tensor, body):
            self.inner.send(header, aux, tensor, body, timeout)

    def send_raw(self, data, timeout: float = 5.0) -> None:
        self.inner.send_raw(data, timeout)

    def flush(self) -> bool:
        self._pump()
        return self.inner.flush() and not self._out

    @property
    def backlogged(self) -> bool:
        return bool(self._out) or self.inner.backlogged

    def next_due(self) -> float | None:
        """Monotonic time the first held frame may move (None: nothing held)."""
        heads = [q[0].due for q in (self._out, self._in) if q]
        return min(heads) if heads else None

    def _corrupted(self, header, aux, tensor, body) -> bytes:
        """The frame as it would go on the wire, with one bit flipped (in the tensor when it has one)."""
        identity = self.inner.identity  # type: ignore[attr-defined]
        header.sender, header.incarnation = identity.number, identity.incarnation
        data = encode(header, aux=aux, tensor=tensor, body=body)
        at = HEADER_SIZE + (len(data) - HEADER_SIZE) // 2 if len(data) > HEADER_SIZE else 40
        data[at] ^= 0x10
        return bytes(data)

    def _pump(self) -> None:
        """Send held frames that are due (in order), and free those of a partition that was lifted."""
        now = time.monotonic()
        for queue in (self._out, self._in):
            if queue and queue[0].partitioned and queue[0].due > now and not self.plan.partitioned(self.target):
                for held in queue:
                    if held.partitioned:
                        held.due = min(held.due, now)
        while self._out and self._out[0].due <= now:
            held = self._out[0]
            if held.raw is not None:
                try:
                    self.inner.send_raw(held.raw, timeout=1.0)
                except TimeoutError:
                    pass  # a corrupt frame that found no room: lost either way
            elif not self.inner.try_send(held.header, held.aux, held.tensor, held.body):
                return  # no room yet: the rest waits behind it
            self._out.popleft()

    # ---- receiving --------------------------------------------------------------------------

    def recv(self) -> Frame | None:
        self._pump()
        now = time.monotonic()
        if self._in and self._in[0].due <= now:
            return self._in.popleft().frame
        for _ in range(64):  # bounded: a busy link cannot keep this call forever
            frame = self.inner.recv()
            if frame is None:
                return None
            due, partitioned = self.plan.plan_recv(self.target, frame.header.kind == FrameKind.RESULT)
            if due is None and not self._in:
                return frame
            due = max(now if due is None else due, self._in[-1].due if self._in else 0.0)
            self._in.append(_Held(due, partitioned, frame=_copy(frame)))
            self.plan.counters["held_frames"] += 1
            if self._in[0].due <= now:
                return self._in.popleft().frame
        return None

    def release(self) -> None:
        self.inner.release()

    # ---- the wrapped link's ------------------------------------------------------------------

    def fileno(self) -> int:
        return self.inner.fileno()

    def close(self) -> None:
        self._out.clear()
        self._in.clear()
        self.inner.close()

    @property
    def alive(self) -> bool:
        return self.inner.alive


def _own(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clone()


def _copy(frame: Frame) -> Frame:
    """A frame whose tensors and body own their memory (a held frame outlives the ring's release)."""
    return Frame(frame.header, None if frame.aux is None else frame.aux.clone(),
                 None if frame.tensor is None else frame.tensor.clone(), memoryview(bytes(frame.body)))
