"""What authentication adds to a link's set-up: connect + accept, both ends in this process, with the
HELLO credential checked and answered (auth on) and with both checks skipped (auth off), same code
otherwise. Rounds alternate on and off so that a busy machine slows both alike.

    python benchmarks/bench_link_auth.py [--rounds 6] [--setups 100]
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resilient_moe import auth  # noqa: E402
from resilient_moe.datapath import handshake  # noqa: E402
from resilient_moe.datapath.frames import FrameKind  # noqa: E402
from resilient_moe.datapath.dial import connect, listen  # noqa: E402
from resilient_moe.datapath.link import PeerInfo  # noqa: E402

REAL = (handshake.Listener._check_hello, handshake.check_listener)


def _check_hello_without_auth(self, conn, data, transport):
    peer, body = handshake.parse_hello(data, FrameKind.HELLO)
    return peer, body, ""


def set_auth(on: bool) -> None:
    """Both ends' checks on (as shipped) or skipped, the rest of the handshake unchanged."""
    if on:
        handshake.Listener._check_hello, handshake.check_listener = REAL
    else:
        handshake.Listener._check_hello = _check_hello_without_auth
        handshake.check_listener = lambda *args: None


def one_setup(listener, identity: PeerInfo) -> float:
    """Seconds from connect() to both ends holding the link."""
    out: dict = {}
    options = {"ring_size": 256 << 10} if listener.address.startswith("shm") else {}
    began = time.perf_counter()
    thread = threading.Thread(target=lambda: out.setdefault("link", connect(listener.address, identity, None,
                                                                             timeout=5, to="ew-1", **options)))
    thread.start()
    accepted = None
    deadline = time.monotonic() + 10
    while accepted is None and time.monotonic() < deadline:
        select.select([listener.fileno()], [], [], 0.05)
        accepted = listener.accept()
    thread.join(10)
    took = time.perf_counter() - began
    if accepted is None or "link" not in out:
        raise RuntimeError("a link did not come up")
    out["link"].close()
    accepted.close()
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--setups", type=int, default=100, help="link set-ups per round, transport and mode")
    args = parser.parse_args()
    auth.ensure_secret()
    me = PeerInfo("aw-0", 1 << 24, 5, os.getpid())
    medians: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            set_auth(mode == "on")
            for transport in ("shm", "tcp"):
                address = f"shm:@rmoe-bench-auth-{os.getpid()}" if transport == "shm" else "tcp:127.0.0.1:0"
                with listen(address, PeerInfo("ew-1", 2 << 24, 1, os.getpid()), None) as listener:
                    times = [one_setup(listener, me) for _ in range(args.setups)]
                medians.setdefault((transport, mode), []).append(statistics.median(times))
    set_auth(True)
    print(f"\nlink set-up, median of {args.setups} per round, {args.rounds} rounds ({os.cpu_count()} CPUs)\n")
    print(f"{'transport':>9} {'auth':>4} {'best round us':>14} {'median round us':>16}")
    for (transport, mode), values in sorted(medians.items()):
        print(f"{transport:>9} {mode:>4} {1e6 * min(values):14.0f} {1e6 * statistics.median(values):16.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
