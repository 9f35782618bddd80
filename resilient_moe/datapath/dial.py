"""Where links come from: which transport a pair of workers uses, and dialing and listening on an
address of either.

Addresses are strings: `shm:@rmoe-c1-ew-2` (an abstract Unix socket name; `shm:/path` for a socket
file) or `tcp:127.0.0.1:5555` (port 0 picks one; the listener's `address` says which). A worker that
peers on other nodes may reach listens on both transports and publishes both addresses,
space-separated; `choose_address` picks one per pair.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from resilient_moe.datapath.handshake import Listener
from resilient_moe.datapath.link import DEFAULT_HANDSHAKE_TIMEOUT, Link, PeerInfo
from resilient_moe.datapath.shm import ShmListener, connect_shm
from resilient_moe.datapath.tcp import TcpListener, connect_tcp

if TYPE_CHECKING:
    from resilient_moe.datapath.poller import Poller


def split_address(address: str) -> tuple[str, str]:
    """'shm:@name' -> ('shm', '@name'); 'tcp:host:port' -> ('tcp', 'host:port')."""
    scheme, sep, rest = address.partition(":")
    if not sep or scheme not in ("shm", "tcp") or not rest:
        raise ValueError(f"link address {address!r} is not 'shm:@name', 'shm:/path' or 'tcp:host:port'")
    return scheme, rest


def choose_address(addresses: str, same_node: bool) -> str:
    """The address to connect to among a listener's published ones (space-separated): shared memory
    when both ends share a node and the listener offers it, else TCP (shm cannot cross nodes); a
    single address is taken as it is."""
    options = addresses.split()
    if not options:
        raise ValueError("the peer publishes no link address")
    by_scheme = {address.partition(":")[0]: address for address in options}
    if same_node and "shm" in by_scheme:
        return by_scheme["shm"]
    return by_scheme.get("tcp", options[0])


def connect(address: str, identity: PeerInfo, poller: Poller | None = None, *,
            timeout: float = DEFAULT_HANDSHAKE_TIMEOUT, to: str = "", **options) -> Link:
    """Open a link to the listener at `address`, blocking at most `timeout` for the handshake.

    The link is added to `poller` (whose doorbell the peer will ring). `to`: the name of the worker
    expected at `address`, which the credential is bound to (handshake.py). Options: shm `ring_size`
    (bytes per direction) and `spin_us` (spin before sleeping while the ring is full); tcp
    `max_frame`.
    """
    scheme, rest = split_address(address)
    connector = connect_shm if scheme == "shm" else connect_tcp
    return connector(rest, identity, poller, timeout=timeout, to=to, **options)


def listen(address: str, identity: PeerInfo, poller: Poller | None = None, **options) -> Listener:
    """Listen for links at `address`; accepted links join `poller`. See ShmListener / TcpListener."""
    scheme, rest = split_address(address)
    listener = ShmListener if scheme == "shm" else TcpListener
    return listener(rest, identity, poller, **options)
