"""Injected datapath faults (chaos testing): delay, jitter, frame loss and partitions on AW <-> EW links.

The chaos tool (chaos/) asks the controller for them (SetFaults); they travel to every attention worker
in the cluster state, and each AW's forwarding engine applies those that name its links. Off by
default: the forwarding engine then holds `faults = None` and pays one `is None` test per frame.

They are applied at the attention worker, the end that keeps every frame until answered, and they
follow what the real transports do, so a fault shows up as the timing it would cause, never as a
frame the runtime could not get back:

- `delay`: every frame the AW sends on the link leaves `delay_ms` later, plus a uniform extra in
  [0, `jitter_ms`]. Frames keep their order (links are FIFO), so it adds to every round trip.
- `drop`: each frame the AW sends is lost with probability `drop_rate` and sent again
  `retransmit_ms` later, as TCP repairs a lost segment; frames behind it wait (head-of-line).
- `partition`: nothing crosses the link in either direction until the fault ends, then everything
  held is delivered, as over a TCP connection that survived the cut. The AW sees a silent link, its
  probes go unanswered, and it suspects the EW and replays to shadow experts; when the partition
  heals, the EW's held answers (to probes too) clear the suspicion.

A fault names its link by `source` (an attention worker, "" = every one) and `target` (an expert
worker, "" = every one); `expires_at` (unix time, 0 = until removed) ends it on every AW at the same
moment, however late the AW learned of it.
"""

from __future__ import annotations

import math
import random
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable

from resilient_moe.datapath.frames import Frame
from resilient_moe.errors import ConfigError

KINDS = ("delay", "drop", "partition")


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
        if self.kind == "delay" and self.delay_ms == 0 and self.jitter_ms == 0:
            raise ConfigError("a delay fault needs delay_ms > 0 or jitter_ms > 0")
        if self.kind == "drop" and self.drop_rate == 0:
            raise ConfigError("a drop fault needs drop_rate > 0")

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


@dataclass
class _Held:
    due: float  # time.monotonic() when it may go
    partitioned: bool  # held by a partition: goes as soon as no partition covers its link
    owner: object  # the forwarding engine's peer record (opaque here)
    target: str
    link: Any
    header: Any = None  # outgoing: the frame to send
    aux: Any = None
    tensor: Any = None
    frame: Any = None  # incoming: a private copy of the frame that arrived


class LinkFaults:
    """The faults on one attention worker's links, and the frames they hold back.

    The forwarding engine calls `hold_send` before each send and `hold_recv` for each frame it
    receives (True: taken, do nothing more with it), and `pump` from its wait loop to send what is
    due and to get back the received frames that may now be delivered.
    """

    def __init__(self, me: str, clock: Callable[[], float] = time.time) -> None:
        self.me = me
        self.clock = clock  # unix time, to compare with expires_at
        self.faults: list[LinkFault] = []
        self._outgoing: dict[int, deque[_Held]] = {}  # id(link) -> frames to send, in order
        self._incoming: dict[int, deque[_Held]] = {}  # id(link) -> frames received, in order
        self._rng = random.Random(zlib.crc32(me.encode()))
        self.held_frames = 0  # counters, for the worker's stats
        self.retransmits = 0

    def update(self, faults: list[LinkFault]) -> None:
        self.faults = [f for f in faults if f.source in ("", self.me)]

    @property
    def idle(self) -> bool:
        """No fault left and nothing held: the forwarding engine can drop this object."""
        return not self.faults and not self._outgoing and not self._incoming

    def _on(self, target: str) -> list[LinkFault]:
        now = self.clock()
        return [f for f in self.faults if f.target in ("", target) and f.active(now)]

    def _partition_end(self, faults: list[LinkFault]) -> float | None:
        """Monotonic time when the partition among `faults` ends (inf: until removed), None if none."""
        ends = [f.expires_at for f in faults if f.kind == "partition"]
        if not ends:
            return None
        if 0 in ends:
            return math.inf
        return time.monotonic() + max(0.0, max(ends) - self.clock())

    # ---- the hooks ---------------------------------------------------------------------------

    def hold_send(self, owner: object, target: str, link, header, aux=None, tensor=None) -> bool:
        """Decide an outgoing frame's fate: True when it was taken (held to be sent by `pump`)."""
        queue = self._outgoing.get(id(link))
        faults = self._on(target)
        if not faults and queue is None:
            return False
        now = time.monotonic()
        if queue:
            self._lift_healed(now)
        due = now
        end = self._partition_end(faults)
        if end is not None:
            due = end
        for f in faults:
            if f.kind == "delay":
                due += (f.delay_ms + self._rng.uniform(0.0, f.jitter_ms)) / 1000.0
            elif f.kind == "drop" and self._rng.random() < f.drop_rate:
                due += f.retransmit_ms / 1000.0
                self.retransmits += 1
        if queue is not None and queue:
            due = max(due, queue[-1].due)  # FIFO: never overtake a frame held before it
        elif due <= now:
            return False
        held = _Held(due, end is not None, owner, target, link, header, aux, tensor)
        self._outgoing.setdefault(id(link), deque()).append(held)
        self.held_frames += 1
        return True

    def hold_recv(self, owner: object, target: str, link, frame: Frame) -> bool:
        """Decide an arriving frame's fate: True when it was taken (a copy is delivered by `pump`).

        Frames may be views into the link's ring, released after the caller's drain, so a held
        frame is copied."""
        queue = self._incoming.get(id(link))
        end = self._partition_end(self._on(target))
        if end is None and not queue:
            return False
        if queue:
            self._lift_healed(time.monotonic())
        due = end if end is not None else time.monotonic()
        if queue:
            due = max(due, queue[-1].due)
        held = _Held(due, end is not None, owner, target, link, frame=_copy(frame))
        self._incoming.setdefault(id(link), deque()).append(held)
        self.held_frames += 1
        return True

    def pump(self) -> tuple[list[tuple[object, Exception]], list[tuple[object, Frame]]]:
        """Send every held frame that is due. Returns (failed sends as (owner, error), received
        frames now deliverable as (owner, frame))."""
        now = time.monotonic()
        self._lift_healed(now)
        failed: list[tuple[object, Exception]] = []
        for key, queue in list(self._outgoing.items()):
            while queue and queue[0].due <= now:
                held = queue.popleft()
                try:
                    held.link.send(held.header, aux=held.aux, tensor=held.tensor)
                except ConnectionError as e:  # LinkClosed: the owner treats it as a failed send
                    failed.append((held.owner, e))
                    queue.clear()
            if not queue:
                del self._outgoing[key]
        arrived: list[tuple[object, Frame]] = []
        for key, queue in list(self._incoming.items()):
            while queue and queue[0].due <= now:
                held = queue.popleft()
                arrived.append((held.owner, held.frame))
            if not queue:
                del self._incoming[key]
        return failed, arrived

    def _lift_healed(self, now: float) -> None:
        """Frames a partition held go at once when it was removed before its planned end."""
        for queue in (*self._outgoing.values(), *self._incoming.values()):
            if queue and queue[0].partitioned and queue[0].due > now:
                if not any(f.kind == "partition" for f in self._on(queue[0].target)):
                    for held in queue:
                        if held.partitioned:
                            held.due = min(held.due, now)

    def timeout(self, default_s: float) -> float:
        """How long the owner may sleep before `pump` has work: at most `default_s`."""
        heads = [q[0].due for q in (*self._outgoing.values(), *self._incoming.values()) if q]
        if not heads:
            return default_s
        return max(0.0, min(default_s, min(heads) - time.monotonic()))


def _copy(frame: Frame) -> Frame:
    """A frame whose tensors and body own their memory."""
    return Frame(frame.header, None if frame.aux is None else frame.aux.clone(),
                 None if frame.tensor is None else frame.tensor.clone(), memoryview(bytes(frame.body)))
