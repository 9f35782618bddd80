"""The KV checkpoint store's memory: its layout, its ownership words, and how processes map it.

The store process (workers/kv_store.py) keeps one anonymous shared-memory file (memfd: it vanishes
with the last process that maps it, so nothing can leak in /dev/shm) and publishes where to find it
through the controller as `memfd:@{socket}:{region bytes};tcp:{host}:{port}`. Attention workers on its
node ask a `MemfdServer` on that abstract Unix socket for a region, proving the cluster secret
(`MappedStore`), map it and write into it directly: one-sided, no request to the store process per
write. The same memory is served over TCP (kvstore/remote.py) to attention workers that keep a replica
of their checkpoints in this store, and to restores that read a replica; the server applies the rules
below itself (`claim_region`, `write_blocks`, `read_stamped` are the one statement of them, for both paths).

The store grows, one region per attention worker. Region r (attention worker index r, "aw-r") lies at
offset r * region_bytes of the memfd and is self-contained; every offset and size is a pure function of
the model and the deployment (`StoreLayout.for_deployment`), so every process computes the same ones:

    region start             owner   uint64 [1] (64 bytes)         incarnation owning the region (0: none)
    + 64                     stamps  int64  [region_blocks, 2]      (writer incarnation, generation) per block
    + header_bytes (a page)  rows    dtype  [L, region_blocks * bs, W]  every layer's KV rows (W = model.kv_row_width)

Blocks are numbered across the store: region r holds blocks [r * region_blocks, (r+1) * region_blocks),
so a commit record's block numbers name their region (`StoreLayout.region_of`), and a restore by
another worker reads the dead worker's region. Regions are made on demand: the first request that
needs one (a same-node worker's hand-over, a replica shipper's CLAIM over TCP, a restore's read of a
region not yet made) grows the memfd with ftruncate and maps the new range; nothing that exists moves.

Why one memfd grown by ftruncate and not one memfd per region: one fd per store to hand over, one
name in /proc/PID/maps, one `fstat` for the resident bytes, and a region is a fixed offset of it, so
growing never remaps, moves or copies a region in use (ftruncate that grows a file leaves its pages
and every mapping of them as they are; the store never shrinks it, which would fault the mappers).
Pages are allocated as they are first written, so a region costs nothing until its worker writes.

What `kv_store_bytes` means: each region is kv_store_bytes // attention_workers (the start count), so
a store holds kv_store_bytes while the deployment runs as started, and one region more per attention
worker index scaling ever reaches (at most `max_attention_workers` of them when that cap is set, else
REGION_LIMIT, the bound /admin/scale has too).

Because writes are one-sided, ownership is enforced by the writers and verified by the readers: a
worker claims its region by writing its incarnation into the region's owner word and checks it before
every write (a fenced predecessor that wakes up sees its successor's incarnation and stops); each
block's stamp is set to (incarnation, odd generation) before its rows are written and to the next even
generation after, and a restore accepts a block only if the stamp equals what the commit record
names, before and after its copy. So a late write by a fenced worker into a block its successor reused
is always detected.

Handing a region over proves the cluster secret both ways (DESIGN.md: every KV-store connection is
authenticated), on a SOCK_SEQPACKET connection, one message each way:

    request  {"who": name, "auth": Credential("kv-store", context=who), "region": r}            (JSON)
    reply    {"auth_answer": auth.answer(...), "region": r, "offset": o, "bytes": b,
              "layout": StoreLayout.key} + the memfd as SCM_RIGHTS (the store made region r if needed) (JSON)
             or {"error": "..."} (authentication failed, or no such region) and no fd

A requester without the secret gets no fd (counted in `auth.REFUSED["kv-store"]`, logged
rate-limited); a requester checks the answer, and that the store's layout is its own, before it maps
anything.
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
from resilient_moe.deployment import ATTENTION_WORKERS_LIMIT, WorkerConfig
from resilient_moe.model.config import ModelConfig
from resilient_moe.errors import ConfigError
from resilient_moe.model.weights import torch_dtype

log = logging.getLogger(__name__)

_PAGE = 4096
_OWNER_BYTES = 64  # the owner word, alone on its cache line
PURPOSE = "kv-store"
REGION_LIMIT = ATTENTION_WORKERS_LIMIT  # regions a store makes at most without max_attention_workers
HANDOFF_TIMEOUT_S = 5.0  # a requester waits this long for the store's answer
REQUEST_TIMEOUT_S = 1.0  # the store waits this long for a request (one silent peer holds up the others)
_MAX_MESSAGE = 1 << 14


def _pages(nbytes: int) -> int:
    return -(-nbytes // _PAGE) * _PAGE


def _header_bytes(region_blocks: int) -> int:
    return _pages(_OWNER_BYTES + 16 * max(0, region_blocks))


@dataclass(frozen=True)
class StoreLayout:
    """Where everything lies in the store's memory (see the module docstring)."""

    num_layers: int
    row_width: int  # elements one token keeps per layer (K and V, or a latent)
    dtype: torch.dtype
    block_size: int
    region_blocks: int  # blocks of one attention worker's region
    max_regions: int = REGION_LIMIT  # regions the store makes at most

    @classmethod
    def for_deployment(cls, model: ModelConfig, store_bytes: int, block_size: int, dtype: torch.dtype,
                       attention_workers: int, max_attention_workers: int | None = None) -> "StoreLayout":
        """Regions of store_bytes // attention_workers each (the start count: see the module docstring)."""
        row = model.num_layers * model.kv_row_width * dtype.itemsize  # bytes per token, every layer
        budget = store_bytes // attention_workers
        blocks = (budget - _header_bytes(budget // (row * block_size))) // (row * block_size)
        while blocks > 0 and _pages(_header_bytes(blocks) + blocks * block_size * row) > budget:
            blocks -= 1  # the page rounding of the rows pushed it over
        if blocks < 1:
            raise ConfigError(f"kv_store_bytes ({store_bytes}) gives each of the {attention_workers} attention "
                              f"workers a region of {budget} bytes: not one block of {block_size} tokens "
                              f"({row} bytes per token, plus a {_header_bytes(1)}-byte header)")
        return cls(model.num_layers, model.kv_row_width, dtype, block_size, blocks,
                   max_attention_workers or REGION_LIMIT)

    @property
    def key(self) -> list:
        """What two processes must agree on to share the store (checked at every hand-over and HELLO)."""
        return [self.num_layers, self.row_width, str(self.dtype), self.block_size, self.region_blocks]

    @property
    def region_rows(self) -> int:
        return self.region_blocks * self.block_size

    @property
    def header_bytes(self) -> int:
        return _header_bytes(self.region_blocks)

    @property
    def region_bytes(self) -> int:
        return _pages(self.header_bytes + self.num_layers * self.region_rows * self.row_width * self.dtype.itemsize)

    @property
    def max_blocks(self) -> int:
        """Blocks of a store that made every region it may."""
        return self.max_regions * self.region_blocks

    def check_region(self, index: int) -> None:
        """ValueError naming the problem unless region `index` may exist."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.max_regions:
            raise ValueError(f"no KV store region {index!r}: regions are 0 to {self.max_regions - 1} "
                             f"(one per attention worker index)")

    def region(self, index: int) -> range:
        """The (store-wide) block numbers of region `index`: attention worker `index`'s blocks."""
        self.check_region(index)
        return range(index * self.region_blocks, (index + 1) * self.region_blocks)

    def region_of(self, block: int) -> int:
        return block // self.region_blocks

    def offset(self, index: int) -> int:
        return index * self.region_bytes

    def views(self, buffer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(owner [1] int64, stamps [region_blocks, 2] int64, rows [L, region_rows, W]) over one region's memory."""
        owner = torch.frombuffer(buffer, dtype=torch.int64, count=1)
        stamps = torch.frombuffer(buffer, dtype=torch.int64, count=2 * self.region_blocks,
                                  offset=_OWNER_BYTES).view(self.region_blocks, 2)
        rows = torch.frombuffer(buffer, dtype=self.dtype, count=self.num_layers * self.region_rows * self.row_width,
                                offset=self.header_bytes).view(self.num_layers, self.region_rows, self.row_width)
        return owner, stamps, rows


class Region:
    """One region as a process maps it. Blocks and rows are named by their store-wide numbers, as
    commit records and the TCP protocol name them; the views hold the region's own."""

    def __init__(self, layout: StoreLayout, index: int, mapping) -> None:
        self.index = index
        self.first_block = index * layout.region_blocks
        self.first_row = self.first_block * layout.block_size
        self.block_size = layout.block_size
        self.mapping = mapping
        self.owner, self.stamps, self.rows = layout.views(mapping)  # [1], [P, 2], [L, P * bs, W]

    def stamps_of(self, blocks: torch.Tensor) -> torch.Tensor:
        """[k, 2] stamps of store blocks `blocks` [k] (all in this region)."""
        return self.stamps[blocks - self.first_block]

    def release(self) -> None:
        """Unmap (no view may outlive it; one still held elsewhere leaves the unmap to the collector)."""
        self.owner = self.stamps = self.rows = None
        mapping, self.mapping = self.mapping, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:  # a tensor over it is still alive somewhere: it goes with that tensor
                log.debug("KV store region %d: a view outlives its release", self.index)


def claim_region(region: Region, incarnation: int) -> str | None:
    """Make `incarnation` the owner of `region` unless a newer one owns it; the refusal otherwise."""
    current = int(region.owner[0])
    if current > incarnation:
        return f"region {region.index} belongs to incarnation {current}"
    region.owner[0] = incarnation  # the predecessor's writes stop here
    return None


def write_blocks(region: Region, incarnation: int, blocks: torch.Tensor, gens: torch.Tensor,
                 parts: list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]) -> str | None:
    """Write rows of `region` as `incarnation`, stamps odd while the rows are copied and `gens`
    (even) after; the refusal when the region is no longer this incarnation's. `blocks` [k] and the
    parts' rows are store-wide numbers inside the region; `parts`: (layers, store rows [m], their KV
    rows [len(layers), m, W])."""
    owner = int(region.owner[0])
    if owner != incarnation:
        return f"region {region.index} now belongs to incarnation {owner}"
    local = blocks - region.first_block
    region.stamps[local, 0] = incarnation
    region.stamps[local, 1] = gens - 1  # odd: being written
    for layers, rows, data in parts:
        rows = rows - region.first_row
        for i, layer in enumerate(layers):
            region.rows[layer].index_copy_(0, rows, data[i])
    region.stamps[local, 1] = gens
    return None


def block_rows(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """[k * block_size] the rows of `blocks` [k], block by block."""
    return (blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)


def read_stamped(region: Region, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(stamps [k, 2], rows [L, k * block_size, W]) of `blocks` [k] (store-wide, in `region`): every
    layer's rows, and each block's stamp where it was the same before and after the copy ((-1, -1)
    where it changed)."""
    local = blocks - region.first_block
    before = region.stamps[local].clone()
    data = region.rows.index_select(1, block_rows(local, region.block_size))
    changed = (region.stamps[local] != before).any(dim=1)
    before[changed] = -1
    return before, data


def stamped_prefix(region: Region, blocks: torch.Tensor, expected: torch.Tensor) -> int:
    """How many leading `blocks` [k] (store-wide, in `region`) carry exactly the stamps `expected` [k, 2]
    (their commit record's)."""
    ok = (region.stamps_of(blocks) == expected).all(dim=1)  # [k]
    bad = (~ok).nonzero()
    return int(bad[0]) if bad.numel() else blocks.numel()


class StoreMemory:
    """The store process's memory: one memfd that grows a region at a time (see the module docstring).
    Thread-safe: the hand-over thread and the TCP server's threads make regions alike."""

    def __init__(self, layout: StoreLayout, name: str) -> None:
        self.layout = layout
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)  # the name shows in /proc/PID/maps
        self.nbytes = 0  # the memfd's size: every region made so far
        self._regions: dict[int, Region] = {}
        self._lock = threading.Lock()

    def region(self, index: int) -> Region:
        """Region `index`, made (the memfd grown to hold it) if it is new; ValueError if it may not exist."""
        self.layout.check_region(index)
        region = self._regions.get(index)
        if region is not None:
            return region
        with self._lock:
            if index not in self._regions:
                layout = self.layout
                end = layout.offset(index) + layout.region_bytes
                if end > self.nbytes:
                    os.ftruncate(self.fd, end)  # zero-filled and sparse; what is mapped stays where it is
                    self.nbytes = end
                mapping = mmap.mmap(self.fd, layout.region_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                    offset=layout.offset(index))
                self._regions[index] = Region(layout, index, mapping)
                log.info("KV store region %d made (%.1f MiB, the store now spans %.1f MiB)", index,
                         layout.region_bytes / 2**20, self.nbytes / 2**20)
            return self._regions[index]

    @property
    def regions(self) -> int:
        return len(self._regions)

    def resident_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        with self._lock:
            for region in self._regions.values():
                region.release()
            self._regions.clear()
        os.close(self.fd)


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
    """`memfd:@{socket}:{region bytes}` (or a store address that has one) -> ('@socket', bytes);
    ValueError naming the problem otherwise."""
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
    """Hands the store's memfd, and where a region lies in it, to requesters that prove the cluster
    secret (see the module docstring), on an abstract Unix socket, from a daemon thread; makes the
    region first if it is new. `address` is what the store publishes."""

    def __init__(self, memory: StoreMemory, name: str) -> None:
        if not name.startswith("@"):
            raise ValueError(f"KV store socket name must be abstract ('@name'), got {name!r}")
        self.memory = memory
        self.address = f"memfd:{name}:{memory.layout.region_bytes}"
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
        index = request.get("region", 0)
        try:
            self.memory.region(index)
        except (ValueError, OSError) as e:  # a bad index, or no memory left to grow into
            log.warning("KV store region %r refused to %s: %s", index, who, e)
            conn.send(json.dumps({"error": str(e)}).encode())
            return
        layout = self.memory.layout
        reply = json.dumps({"auth_answer": auth.answer(credential, PURPOSE, who), "region": index,
                            "offset": layout.offset(index), "bytes": layout.region_bytes, "layout": layout.key})
        socket.send_fds(conn, [reply.encode()], [self.memory.fd])

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(2)

    def __enter__(self) -> "MemfdServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fetch_store_fd(address: str, who: str, region: int = 0, timeout_s: float = HANDOFF_TIMEOUT_S) -> tuple[int, dict]:
    """(fd, the store's reply: offset, bytes and layout of `region`) from the store at `address`, after
    both sides proved the cluster secret. Raises AuthError (this process lacks the secret, or the store
    does), OSError or ValueError naming the problem (a refusal of the region included)."""
    name, _ = parse_address(address)
    credential = auth.Credential.make(PURPOSE, who)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        sock.connect(_abstract(name))
        sock.send(json.dumps({"who": who, "auth": credential.to_json(), "region": region}).encode())
        data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 1, socket.MSG_CMSG_CLOEXEC)
    try:
        reply = _json_object(data)
        if reply is None:
            raise ValueError(f"KV store at {address} sent no valid reply ({len(data)} bytes)")
        if "error" in reply:
            error = str(reply["error"])
            if error.startswith("authentication failed"):
                raise auth.AuthError(f"KV store at {address} refused: {error}")
            raise ValueError(f"KV store at {address} refused region {region}: {error}")
        auth.check_answer(credential, reply.get("auth_answer"), PURPOSE, who)
        if len(fds) != 1:
            raise ValueError(f"KV store at {address} sent {len(fds)} fds, expected 1")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds[0], reply


class MappedStore:
    """A same-node store's regions as one process maps them, each asked for once (see the module
    docstring). Not thread-safe: the checkpoint thread alone uses it."""

    def __init__(self, address: str, layout: StoreLayout, who: str = "") -> None:
        parse_address(address)  # ValueError now rather than at the first region
        self.address = address
        self.layout = layout
        self.who = who or f"pid-{os.getpid()}"
        self._regions: dict[int, Region] = {}

    def region(self, index: int) -> Region:
        """Region `index`, mapped (the store makes it if it is new). Raises AuthError, OSError or
        ValueError naming the problem (a store of another layout included)."""
        region = self._regions.get(index)
        if region is not None:
            return region
        self.layout.check_region(index)
        layout = self.layout
        handle, grant = fetch_store_fd(self.address, self.who, index)
        try:
            if grant.get("layout") != layout.key:
                raise ValueError(f"the KV store at {self.address} has layout {grant.get('layout')}, this process "
                                 f"expects {layout.key} (another model, block size or kv_store_bytes?)")
            if (grant.get("offset"), grant.get("bytes")) != (layout.offset(index), layout.region_bytes):
                raise ValueError(f"the KV store at {self.address} puts region {index} at {grant.get('offset')} "
                                 f"({grant.get('bytes')} bytes), expected {layout.offset(index)} ({layout.region_bytes})")
            if os.fstat(handle).st_size < layout.offset(index) + layout.region_bytes:
                raise ValueError(f"the KV store at {self.address} is smaller than region {index} it announced")
            mapping = mmap.mmap(handle, layout.region_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                offset=layout.offset(index))
        finally:
            os.close(handle)
        region = self._regions[index] = Region(layout, index, mapping)
        return region

    def close(self) -> None:
        """Unmap every region (the caller holds no view of them any more)."""
        for region in self._regions.values():
            region.release()
        self._regions.clear()


def layout_for(config: WorkerConfig) -> StoreLayout:
    dep = config.deployment
    return StoreLayout.for_deployment(ModelConfig.from_pretrained(dep.model), dep.kv_store_bytes,
                                      dep.engine.block_size, torch_dtype(dep.engine.dtype), dep.attention_workers,
                                      dep.max_attention_workers)
