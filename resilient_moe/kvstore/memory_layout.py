"""The KV checkpoint store's memory: its layout, its ownership words, and how attention workers map it.

The store process (workers/kv_store.py) creates one anonymous shared-memory file (memfd: it vanishes
with the last process that maps it, so nothing can leak in /dev/shm) and publishes where to find it
through the controller as `memfd:@{socket}:{bytes};tcp:{host}:{port}`. Attention workers on its node
get the fd from a `MemfdServer` on that abstract Unix socket, proving the cluster secret (`map_store`),
map it and write into it directly: one-sided, no request to the store process per write. The same
memory is served over TCP (kvstore/remote.py) to attention workers that keep a replica of their
checkpoints in this store, and to restores that read a replica; the server applies the rules below
itself (`claim_region`, `write_blocks`, `read_stamped` are the one statement of them, for both paths).
The layout is a pure function of the model and the deployment, so every worker computes the same one:

    offset 0                 owners  uint64 [attention_workers]  incarnation owning each region (0: none)
    OWNERS_BYTES aligned     stamps  uint64 [num_blocks, 2]     (writer incarnation, generation) per block
    header_bytes             rows    dtype  [L, rows, W]        every layer's KV rows (W = model.kv_row_width)

Attention worker i owns blocks [i * per_worker, (i+1) * per_worker); there is a region for every
attention worker the deployment may run (`max_attention_workers`, for scaling), used or not. Because writes are one-sided,
ownership is enforced by the writers and verified by the readers: a worker claims its region by
writing its incarnation into `owners[i]` and checks it before every write (a fenced predecessor that
wakes up sees its successor's incarnation and stops); each block's stamp is set to (incarnation,
odd generation) before its rows are written and to the next even generation after, and a restore
accepts a block only if the stamp equals what the commit record names, before and after its copy.
So a late write by a fenced worker into a block its successor reused is always detected.

Handing the fd over proves the cluster secret both ways (DESIGN.md: every KV-store connection is
authenticated), on a SOCK_SEQPACKET connection, one message each way:

    request  {"who": name, "auth": Credential("kv-store", context=who)}           (JSON)
    reply    {"auth_answer": auth.answer(...)} + the memfd as SCM_RIGHTS           (JSON)
             or {"error": "authentication failed: ..."} and no fd

A requester without the secret gets no fd (counted in `auth.REFUSED["kv-store"]`, logged
rate-limited); a requester checks the answer before it maps anything.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import socket
import threading
from dataclasses import dataclass

import torch

from resilient_moe import auth
from resilient_moe.deployment import WorkerConfig
from resilient_moe.model.config import ModelConfig
from resilient_moe.errors import ConfigError
from resilient_moe.model.weights import torch_dtype

log = logging.getLogger(__name__)

_PAGE = 4096
PURPOSE = "kv-store"
HANDOFF_TIMEOUT_S = 5.0  # a requester waits this long for the store's answer
REQUEST_TIMEOUT_S = 1.0  # the store waits this long for a request (one silent peer holds up the others)
_MAX_MESSAGE = 1 << 14


@dataclass(frozen=True)
class StoreLayout:
    """Where everything lies in the store's memory (see the module docstring)."""

    num_layers: int
    row_width: int  # elements one token keeps per layer (K and V, or a latent)
    dtype: torch.dtype
    block_size: int
    num_blocks: int
    attention_workers: int

    @classmethod
    def for_deployment(cls, model: ModelConfig, store_bytes: int, block_size: int, dtype: torch.dtype,
                       attention_workers: int) -> "StoreLayout":
        row = model.num_layers * model.kv_row_width * dtype.itemsize
        header = _header_bytes(attention_workers, store_bytes // (row * block_size))
        blocks = (store_bytes - header) // (row * block_size)
        if blocks < attention_workers:
            raise ConfigError(f"kv_store_bytes ({store_bytes}) holds {blocks} blocks of {block_size} tokens "
                              f"({row} bytes per token): fewer than one per attention worker")
        return cls(model.num_layers, model.kv_row_width, dtype, block_size, blocks, attention_workers)

    @property
    def rows(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def header_bytes(self) -> int:
        return _header_bytes(self.attention_workers, self.num_blocks)

    @property
    def nbytes(self) -> int:
        return self.header_bytes + self.num_layers * self.rows * self.row_width * self.dtype.itemsize

    @property
    def per_worker(self) -> int:
        return self.num_blocks // self.attention_workers

    def region(self, worker_index: int) -> range:
        start = (worker_index % self.attention_workers) * self.per_worker
        return range(start, start + self.per_worker)

    def views(self, buffer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(owners [A] int64, stamps [num_blocks, 2] int64, rows [L, rows, W]) over the store's memory."""
        owners = torch.frombuffer(buffer, dtype=torch.int64, count=self.attention_workers)
        stamps = torch.frombuffer(buffer, dtype=torch.int64, count=2 * self.num_blocks,
                                  offset=_owners_bytes(self.attention_workers)).view(self.num_blocks, 2)
        rows = torch.frombuffer(buffer, dtype=self.dtype, count=self.num_layers * self.rows * self.row_width,
                                offset=self.header_bytes).view(self.num_layers, self.rows, self.row_width)
        return owners, stamps, rows


def _owners_bytes(attention_workers: int) -> int:
    return -(-8 * attention_workers // 64) * 64


def _header_bytes(attention_workers: int, num_blocks: int) -> int:
    return -(-(_owners_bytes(attention_workers) + 16 * max(0, num_blocks)) // _PAGE) * _PAGE


def claim_region(owners: torch.Tensor, index: int, incarnation: int) -> str | None:
    """Make `incarnation` the owner of region `index` unless a newer one owns it; the refusal otherwise."""
    current = int(owners[index])
    if current > incarnation:
        return f"region {index} belongs to incarnation {current}"
    owners[index] = incarnation  # the predecessor's writes stop here
    return None


def write_blocks(owners: torch.Tensor, stamps: torch.Tensor, table: torch.Tensor, index: int, incarnation: int,
                 blocks: torch.Tensor, gens: torch.Tensor,
                 parts: list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]) -> str | None:
    """Write rows of region `index` as `incarnation`, stamps odd while the rows are copied and `gens`
    (even) after; the refusal when the region is no longer this incarnation's. `parts`: (layers, store
    rows [m], their KV rows [len(layers), m, W])."""
    owner = int(owners[index])
    if owner != incarnation:
        return f"region {index} now belongs to incarnation {owner}"
    stamps[blocks, 0] = incarnation
    stamps[blocks, 1] = gens - 1  # odd: being written
    for layers, rows, data in parts:
        for i, layer in enumerate(layers):
            table[layer].index_copy_(0, rows, data[i])
    stamps[blocks, 1] = gens
    return None


def read_stamped(stamps: torch.Tensor, table: torch.Tensor, blocks: torch.Tensor,
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(stamps [k, 2], rows [L, k * block_size, W]) of `blocks` [k]: every layer's rows, and each
    block's stamp where it was the same before and after the copy ((-1, -1) where it changed)."""
    before = stamps[blocks].clone()
    rows = (blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)  # [k * bs]
    data = table.index_select(1, rows)
    changed = (stamps[blocks] != before).any(dim=1)
    before[changed] = -1
    return before, data


def stamped_prefix(stamps: torch.Tensor, blocks: torch.Tensor, expected: torch.Tensor) -> int:
    """How many leading `blocks` [k] carry exactly the stamps `expected` [k, 2] (their commit record's)."""
    ok = (stamps[blocks] == expected).all(dim=1)  # [k]
    bad = (~ok).nonzero()
    return int(bad[0]) if bad.numel() else blocks.numel()


def split_address(address: str) -> tuple[str, str]:
    """A store's published address -> (its `memfd:` part, its `tcp:` part); either may be ""."""
    memfd = tcp = ""
    for part in address.split(";"):
        if part.startswith("memfd:"):
            memfd = part
        elif part.startswith("tcp:"):
            tcp = part
    return memfd, tcp


def parse_address(address: str) -> tuple[str, int]:
    """`memfd:@{socket}:{bytes}` (or a store address that has one) -> ('@socket', bytes); ValueError
    naming the problem otherwise."""
    if ";" in address:
        address = split_address(address)[0]
    scheme, _, rest = address.partition(":")
    name, _, size = rest.rpartition(":")
    if scheme != "memfd" or not name.startswith("@") or len(name) < 2 or not size.isdigit():
        raise ValueError(f"not a KV store address (memfd:@SOCKET:BYTES): {address!r}")
    return name, int(size)


def _abstract(name: str) -> str:
    return "\0" + name[1:]


def _json_object(data: bytes) -> dict | None:
    """A hand-over message as a JSON object; None when it is anything else."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


class MemfdServer:
    """Hands the store's memfd to requesters that prove the cluster secret (see the module docstring),
    on an abstract Unix socket, from a daemon thread. `address` is what the store publishes."""

    def __init__(self, fd: int, nbytes: int, name: str) -> None:
        if not name.startswith("@"):
            raise ValueError(f"KV store socket name must be abstract ('@name'), got {name!r}")
        self.fd = fd
        self.address = f"memfd:{name}:{nbytes}"
        self._verifier = auth.Verifier(PURPOSE)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(_abstract(name))
            self._sock.listen(64)
            self._sock.settimeout(0.5)  # how often the thread looks at `_stop`
        except BaseException:
            self._sock.close()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kv-store-handoff", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.settimeout(REQUEST_TIMEOUT_S)
                    self._hand_over(conn)
                except Exception as e:  # whatever a requester does, the store goes on
                    log.warning("KV store hand-over failed: %s: %s", type(e).__name__, e)

    def _hand_over(self, conn: socket.socket) -> None:
        request = _json_object(conn.recv(_MAX_MESSAGE)) or {}
        who = request.get("who")
        who = who if isinstance(who, str) else ""
        try:
            credential = self._verifier.verify_json(request.get("auth"), who)
        except auth.AuthError as e:
            auth.log_refusal(log, PURPOSE, f"refused the KV store to {who or 'an unnamed requester'}: {e}")
            conn.send(json.dumps({"error": f"authentication failed: {e}"}).encode())
            return
        reply = json.dumps({"auth_answer": auth.answer(credential, PURPOSE, who)}).encode()
        socket.send_fds(conn, [reply], [self.fd])

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(2)

    def __enter__(self) -> "MemfdServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fetch_store_fd(address: str, who: str, timeout_s: float = HANDOFF_TIMEOUT_S) -> tuple[int, int]:
    """(fd, bytes) of the store at `address`, after both sides proved the cluster secret. Raises
    AuthError (this process lacks the secret, or the store does), OSError or ValueError naming the problem."""
    name, size = parse_address(address)
    credential = auth.Credential.make(PURPOSE, who)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        sock.connect(_abstract(name))
        sock.send(json.dumps({"who": who, "auth": credential.to_json()}).encode())
        data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 1, socket.MSG_CMSG_CLOEXEC)
    try:
        reply = _json_object(data)
        if reply is None:
            raise ValueError(f"KV store at {address} sent no valid reply ({len(data)} bytes)")
        if "error" in reply:
            raise auth.AuthError(f"KV store at {address} refused: {reply['error']}")
        auth.check_answer(credential, reply.get("auth_answer"), PURPOSE, who)
        if len(fds) != 1:
            raise ValueError(f"KV store at {address} sent {len(fds)} fds, expected 1")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds[0], size


def map_store(address: str, who: str = "") -> mmap.mmap:
    """Map the store published at `address` (same host), fetched from its MemfdServer."""
    handle, size = fetch_store_fd(address, who or f"pid-{os.getpid()}")
    try:
        if os.fstat(handle).st_size < size:
            raise ValueError(f"the KV store at {address} is smaller than the {size} bytes it announced")
        return mmap.mmap(handle, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(handle)


def layout_for(config: WorkerConfig) -> StoreLayout:
    dep = config.deployment
    return StoreLayout.for_deployment(ModelConfig.from_pretrained(dep.model), dep.kv_store_bytes,
                                      dep.engine.block_size, torch_dtype(dep.engine.dtype), dep.attention_regions)
