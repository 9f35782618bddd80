"""Connections that cannot pin a frontend: the limits a served port needs against slow and idle clients.

uvicorn closes an idle keep-alive connection (`keepalive_s`), but a client that sends its request head
one byte at a time, or opens connections and sends nothing, holds a descriptor and a protocol object
for as long as it likes. `GuardedHttp` is uvicorn's HTTP/1.1 protocol with two more limits:

  - a head deadline: a connection must send a whole request head within `header_timeout_s` of
    connecting (and of its previous response, on a kept-alive connection), else it is closed;
  - a connection cap: past `max_connections` open connections, the connection that has waited longest
    for a request head is closed to make room (a slow or idle client loses its place to a new one);
    when every connection is busy with a request, the new one is answered 503 (OpenAI's error shape)
    and closed at once. Either way the descriptors a frontend holds stay bounded, and a real request,
    which sends its head at once, is served however many slow clients hold connections.

The request body has its own deadline (limits.py, 408). Refusals are counted (`counters`), and real
requests are served meanwhile: the checks cost a timer per connection, nothing per byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

from resilient_moe.server.protocol import error_body


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_connections: int = 1024


def guarded_protocol(limits: ConnectionLimits, counters: dict[str, int]) -> type:
    """A uvicorn `http` protocol class enforcing `limits`; refusals are counted in `counters`
    ("connections_refused", "head_timeouts")."""
    counters.setdefault("connections_refused", 0)
    counters.setdefault("connections_evicted", 0)
    counters.setdefault("head_timeouts", 0)
    refusal = json.dumps(error_body(503, f"this frontend holds its most connections ({limits.max_connections}); "
                                         "retry, or use another connection", code="too_many_connections")).encode()
    busy = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"retry-after: 1\r\ncontent-length: " + str(len(refusal)).encode() + b"\r\n\r\n" + refusal)

    class GuardedHttp(H11Protocol):
        """uvicorn's HTTP/1.1 protocol with a head deadline and a connection cap (see the module doc)."""

        _head_timer = None
        _timed_cycle = None
        _awaiting_since: float | None = None  # loop time it began waiting for a request head; None: busy

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections and not self._evict_one():
                counters["connections_refused"] += 1
                transport.write(busy)
                transport.close()
                return
            self._await_head()

        def _evict_one(self) -> bool:
            """Close the connection that has waited longest for a request head; False when none waits."""
            waiting = [c for c in self.connections if c is not self and getattr(c, "_awaiting_since", None) is not None
                       and not c.transport.is_closing()]
            if not waiting:
                return False
            oldest = min(waiting, key=lambda c: c._awaiting_since)
            counters["connections_evicted"] += 1
            oldest._cancel_head_timer()
            oldest.transport.close()
            return True

        def _await_head(self) -> None:
            self._cancel_head_timer()
            self._timed_cycle = self.cycle
            self._awaiting_since = self.loop.time()
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_late)

        def _cancel_head_timer(self) -> None:
            self._awaiting_since = None
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            self._awaiting_since = None
            if self.cycle is self._timed_cycle and not self.transport.is_closing():
                counters["head_timeouts"] += 1
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not self._timed_cycle:
                self._cancel_head_timer()  # a whole request head arrived: its cycle began

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_head()  # a kept-alive connection owes the next head in time too

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

    return GuardedHttp
