"""The KV store's TCP server (kvstore/remote.py) on a real socket: the frame codec, the ownership rules
(equal to the local path's: a fenced writer is refused), bad frames answered with clear errors and
never a crash, and authentication (a peer without the cluster secret is refused, counted)."""

from __future__ import annotations

import json
import socket
import struct
import threading

import pytest
import torch

from resilient_moe import auth
from resilient_moe.kvstore import remote
from resilient_moe.kvstore.remote import HEADER, MAGIC, Op, RemoteStore, RemoteStoreError, StoreServer
from resilient_moe.kvstore.replication import ReplicaWrite, StoreRef, place_stores
from resilient_moe.kvstore.memory_layout import StoreLayout, StoreMemory, split_address

L, W, BS = 3, 8, 4


def make_layout(blocks: int = 8, regions: int = 4) -> StoreLayout:
    """Regions of `blocks` blocks: region 0 is blocks [0, 8), region 1 [8, 16), ..."""
    return StoreLayout(L, W, torch.float32, BS, blocks, regions)


@pytest.fixture
def secret():
    before = auth._secret  # the session's (conftest)
    key = auth.install(auth.new_secret())
    yield key
    auth.forget()
    if before is not None:
        auth.install(before)


@pytest.fixture
def server(secret):
    memory = StoreMemory(make_layout(), "test-kv-store")
    srv = StoreServer(memory, "kv-store-1", 7).start()
    yield srv
    srv.close()
    memory.close()


def rows_for(blocks: list[int]) -> torch.Tensor:
    return (torch.tensor(blocks)[:, None] * BS + torch.arange(BS)).reshape(-1)


def data_for(blocks: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, len(blocks) * BS, W, generator=g)


def write(client: RemoteStore, region: int, incarnation: int, blocks: list[int], gens: list[int], seed: int = 0):
    client.write(region, incarnation, torch.tensor(blocks), torch.tensor(gens),
                 [(tuple(range(L)), rows_for(blocks), data_for(blocks, seed))])


def test_write_then_read_back_bit_identical_with_stamps(server, monkeypatch):
    client = RemoteStore(server.address, server.layout, "aw-0")
    assert (client.store, client.incarnation) == ("kv-store-1", 7)
    client.claim(0, 5)
    write(client, 0, 5, [1, 3], [2, 4], seed=1)
    stamps, rows = client.read(torch.tensor([1, 3]))
    assert stamps.tolist() == [[5, 2], [5, 4]]
    assert torch.equal(rows, data_for([1, 3], seed=1))
    # a block never written reads with a zero stamp: a restore that expects (5, gen) rejects it
    stamps, _ = client.read(torch.tensor([2]))
    assert stamps.tolist() == [[0, 0]]
    assert server.counters["writes"] == 1 and server.counters["blocks_written"] == 2
    monkeypatch.setattr(remote, "READ_BYTES", 1)  # one block a reply: the same rows
    stamps, rows = client.read(torch.tensor([1, 3]))
    assert stamps.tolist() == [[5, 2], [5, 4]] and torch.equal(rows, data_for([1, 3], seed=1))
    client.close()


def test_a_fenced_writer_is_refused_as_on_the_local_path(server):
    old = RemoteStore(server.address, server.layout, "aw-0")
    new = RemoteStore(server.address, server.layout, "aw-0")
    old.claim(0, 5)
    write(old, 0, 5, [1], [2])
    new.claim(0, 9)  # the successor claims the region
    with pytest.raises(RemoteStoreError, match="fenced: region 0 now belongs to incarnation 9"):
        write(old, 0, 5, [2], [4])
    with pytest.raises(RemoteStoreError, match="fenced: region 0 belongs to incarnation 9"):
        old.claim(0, 5)  # and cannot take it back
    write(new, 0, 9, [2], [2])  # the connection stays usable after a refusal
    stamps, _ = new.read(torch.tensor([1, 2]))
    assert stamps.tolist() == [[5, 2], [9, 2]]
    assert server.counters["writes_refused"] == 2


@pytest.mark.parametrize("blocks, gens, why", [
    ([9], [2], "a block outside region 0"),  # region 0 is blocks [0, 8)
    ([1], [3], "generations must be even"),
    ([1, 1], [2, 4], "a block appears twice"),
])
def test_bad_writes_are_answered_with_the_reason_and_the_connection_stays(server, blocks, gens, why):
    client = RemoteStore(server.address, server.layout, "aw-0")
    client.claim(0, 5)
    with pytest.raises(RemoteStoreError, match=why):
        write(client, 0, 5, blocks, gens)
    write(client, 0, 5, [1], [2])  # still served
    assert server.counters["bad_frames"] == 1


def test_truncated_and_mis_sized_bodies_are_refused(server):
    client = RemoteStore(server.address, server.layout, "aw-0")
    client.claim(0, 5)
    body = b"".join(bytes(b) for b in remote.encode_write(0, 5, torch.tensor([1]), torch.tensor([2]),
                                                         [(tuple(range(L)), rows_for([1]), data_for([1]))]))
    with pytest.raises(RemoteStoreError, match="body too short"):
        client._call(Op.WRITE, [body[:-4]])
    with pytest.raises(RemoteStoreError, match="left over"):
        client._call(Op.WRITE, [body + b"xx"])
    with pytest.raises(RemoteStoreError, match="CLAIM body is 3 bytes"):
        client._call(Op.CLAIM, [b"abc"])
    with pytest.raises(RemoteStoreError, match="no KV store region 124: regions are 0 to 3"):
        client._call(Op.READ, [struct.pack("<Iq", 1, 999)])  # past the store's last region
    with pytest.raises(RemoteStoreError, match="blocks of more than one region"):
        client._call(Op.READ, [struct.pack("<Iqq", 2, 1, 9)])
    with pytest.raises(RemoteStoreError, match="only valid as the first frame"):
        client._call(Op.HELLO, [b"{}"])
    client.read(torch.tensor([1]))  # and the connection is still good


def raw_connection(server) -> socket.socket:
    _, host, port = server.address.split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def reply_of(sock: socket.socket) -> tuple[int, bytes]:
    _, status, body = remote.read_frame(sock)
    return status, bytes(body)


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with bytes of ours unread
        return True


def hello_body(client: str, key: bytes | None = None, layout=None) -> bytes:
    cred = auth.Credential.make("kv-store", context=client, key=key)
    return json.dumps({"credential": cred.to_json(), "client": client,
                       "layout": layout or make_layout().key}).encode()


def test_garbage_headers_are_answered_and_the_connection_closed_without_harm(server):
    sock = raw_connection(server)
    sock.sendall(remote.frame(Op.HELLO, hello_body("aw-0")))
    assert reply_of(sock)[0] == remote.OK
    sock.sendall(b"GARBAGE-NOT-A-FRAME")
    status, body = reply_of(sock)
    assert status == remote.ERROR and b"bad magic" in body
    assert closed(sock)
    sock = raw_connection(server)
    sock.sendall(remote.frame(Op.HELLO, hello_body("aw-0")))
    reply_of(sock)
    sock.sendall(HEADER.pack(MAGIC, Op.WRITE, 0, 0, remote.MAX_BODY + 1))
    status, body = reply_of(sock)
    assert status == remote.ERROR and b"over the limit" in body
    sock.close()
    RemoteStore(server.address, server.layout, "aw-1").read(torch.tensor([0]))  # the server carries on


def test_an_unauthenticated_peer_is_refused_and_counted(server, secret):
    refused = auth.REFUSED["kv-store"]
    for first in (remote.frame(Op.READ, struct.pack("<Iq", 1, 0)),  # no HELLO at all
                  remote.frame(Op.HELLO, b"{}"),  # no credential
                  remote.frame(Op.HELLO, hello_body("aw-0", key=auth.new_secret()))):  # the wrong secret
        sock = raw_connection(server)
        sock.sendall(first)
        status, body = reply_of(sock)
        assert status == remote.ERROR and body.startswith(b"authentication failed"), body
        assert closed(sock)
        sock.close()
    sock = raw_connection(server)  # a huge HELLO is refused before anything is allocated for it
    sock.sendall(HEADER.pack(MAGIC, Op.HELLO, 0, 0, remote.MAX_BODY))
    status, body = reply_of(sock)
    assert status == remote.ERROR and b"over the limit" in body
    sock.close()
    assert server.counters["auth_refused"] == 4
    assert auth.REFUSED["kv-store"] >= refused + 1
    # a credential made for another client name is refused too (the proof is bound to its context)
    sock = raw_connection(server)
    cred = auth.Credential.make("kv-store", context="aw-0")
    sock.sendall(remote.frame(Op.HELLO, json.dumps({"credential": cred.to_json(), "client": "aw-1",
                                                    "layout": make_layout().key}).encode()))
    assert reply_of(sock)[0] == remote.ERROR
    # the right secret is accepted
    client = RemoteStore(server.address, server.layout, "aw-0")
    client.read(torch.tensor([0]))


def test_a_client_refuses_a_server_without_the_secret(secret):
    """An imposter that takes any HELLO but cannot answer the proof (no secret) is not trusted."""
    listener = socket.create_server(("127.0.0.1", 0))

    def imposter():
        conn, _ = listener.accept()
        remote.read_frame(conn)
        conn.sendall(remote.frame(Op.HELLO, json.dumps({"answer": "0" * 64, "store": "kv-store"}).encode()))
        conn.close()

    thread = threading.Thread(target=imposter, daemon=True)
    thread.start()
    try:
        with pytest.raises(auth.AuthError, match="did not prove the cluster secret"):
            RemoteStore(f"tcp:127.0.0.1:{listener.getsockname()[1]}", make_layout(), "aw-0")
    finally:
        thread.join(5)
        listener.close()


def test_layout_mismatch_and_unreachable_stores_are_named():
    with pytest.raises(RemoteStoreError, match="unreachable"):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        RemoteStore(f"tcp:127.0.0.1:{port}", make_layout(), "aw-0", timeout_s=1)
    with pytest.raises(RemoteStoreError, match="not a KV store TCP address"):
        RemoteStore("memfd:1:2:3", make_layout(), "aw-0")


def test_layout_mismatch_is_refused(server):
    with pytest.raises(RemoteStoreError, match="layout mismatch"):
        RemoteStore(server.address, make_layout(blocks=32), "aw-0")


def test_store_address_carries_both_paths():
    assert split_address("memfd:@s:3;tcp:127.0.0.1:99") == ("memfd:@s:3", "tcp:127.0.0.1:99")
    assert split_address("memfd:@s:3") == ("memfd:@s:3", "")


def test_place_stores_puts_replicas_on_other_nodes_and_spreads_them():
    stores = [StoreRef(f"kv-{i}", i, 10 + i, "", node) for i, node in enumerate(["a", "a", "b", "c"])]
    primary, replicas = place_stores("a", 0, stores, 1)
    assert primary.name == "kv-0" and [r.node for r in replicas] == ["b"]
    primary, replicas = place_stores("a", 1, stores, 1)
    assert primary.name == "kv-1" and [r.node for r in replicas] == ["c"]
    assert [r.name for r in place_stores("b", 0, stores, 2)[1]] == ["kv-0", "kv-1"]
    # one node (the local launcher): any other store is a replica
    one = [StoreRef(f"kv-{i}", i, 10 + i, "", "h") for i in range(2)]
    assert [(p.name, [r.name for r in rs]) for p, rs in (place_stores("h", i, one, 1) for i in range(2))] == \
        [("kv-0", ["kv-1"]), ("kv-1", ["kv-0"])]
    assert place_stores("h", 0, one[:1], 1) == (one[0], [])
    assert place_stores("z", 0, stores, 0)[0] is None  # no store on its node: no primary


def test_a_big_write_is_split_into_frames_of_whole_blocks():
    blocks, gens = torch.tensor([4, 1, 6, 2]), torch.tensor([2, 4, 6, 8])
    rows = rows_for([4, 1, 6, 2])
    windowed = rows[rows % BS >= 2]  # a sliding layer's part holds fewer rows
    data = data_for([4, 1, 6, 2])
    item = ReplicaWrite(blocks, gens, [((0, 1), rows, data[:2]), ((2,), windowed, data[2:, rows % BS >= 2])],
                        [("r", 0, 4)])
    chunks = item.split(max_bytes=item.nbytes // 3 + 1, block_size=BS)  # three frames
    assert [c.blocks.tolist() for c in chunks] == [[4, 1], [6], [2]]
    assert [c.acks for c in chunks] == [[], [], [("r", 0, 4)]]
    for part in range(2):
        assert torch.equal(torch.cat([c.parts[part][1] for c in chunks]), item.parts[part][1])
        assert torch.equal(torch.cat([c.parts[part][2] for c in chunks], dim=1), item.parts[part][2])
    assert item.split(item.nbytes, BS) == [item]
