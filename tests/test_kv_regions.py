"""A KV store that grows a region per attention worker (kvstore/memory_layout.py), on real memfds,
real SCM_RIGHTS hand-overs and a real TCP server: regions are made on demand, growing the store leaves
the regions in use exactly as they were, and the ownership rules (owner word, stamps checked before
and after a copy, a fenced predecessor refused) hold in a grown store on the mapped and the TCP path."""

from __future__ import annotations

import os

import pytest
import torch

from resilient_moe.kvstore.memory_layout import (MappedStore, MemfdServer, StoreLayout, StoreMemory, block_rows,
                                                 claim_region, read_stamped, stamped_prefix, write_blocks)
from resilient_moe.kvstore.remote import RemoteStore, RemoteStoreError, StoreServer

L, W, BS, P = 3, 8, 4, 6  # layers, row width, block size, blocks per region


def layout(max_regions: int = 8) -> StoreLayout:
    return StoreLayout(L, W, torch.float32, BS, P, max_regions)


@pytest.fixture
def store():
    """(StoreMemory, its MemfdServer, its TCP server), as the store process runs them."""
    memory = StoreMemory(layout(), "test-kv-store-regions")
    handoff = MemfdServer(memory, f"@rmoe-test-kv-regions-{os.getpid()}")
    server = StoreServer(memory, "kv-store", 3).start()
    try:
        yield memory, handoff, server
    finally:
        server.close()
        handoff.close()
        memory.close()


def rows_of(blocks: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(store rows, their data [L, rows, W]) of `blocks`."""
    g = torch.Generator().manual_seed(seed)
    rows = block_rows(torch.tensor(blocks), BS)
    return rows, torch.randn(L, rows.numel(), W, generator=g)


def write(region, incarnation: int, blocks: list[int], gens: list[int], seed: int) -> str | None:
    rows, data = rows_of(blocks, seed)
    return write_blocks(region, incarnation, torch.tensor(blocks), torch.tensor(gens),
                        [(tuple(range(L)), rows, data)])


def test_regions_are_made_on_demand_and_growing_leaves_regions_in_use_alone(store):
    memory, handoff, _ = store
    lay = memory.layout
    assert memory.regions == 0 and memory.nbytes == 0, "nothing is made before anyone asks"
    aw0 = MappedStore(handoff.address, lay, "aw-0")
    region0 = aw0.region(0)  # the hand-over makes region 0
    assert memory.regions == 1 and memory.nbytes == lay.region_bytes
    assert claim_region(region0, 5) is None
    assert write(region0, 5, [1, 4], [2, 4], seed=1) is None
    before_stamps, before_rows = read_stamped(region0, torch.tensor([1, 4]))

    aw2 = MappedStore(handoff.address, lay, "aw-2")  # an attention worker added by scaling
    region2 = aw2.region(2)
    assert memory.regions == 2, "region 1 is not made: no one asked for it"
    assert memory.nbytes == 3 * lay.region_bytes, "the memfd grew to hold region 2 at its fixed offset"
    assert region2.first_block == 2 * P
    assert claim_region(region2, 7) is None
    assert write(region2, 7, [2 * P, 2 * P + 5], [2, 4], seed=2) is None

    # Region 0 is exactly as it was: through aw-0's mapping made before the growth, the store's own,
    # and a mapping made after it.
    for view in (region0, memory.region(0), MappedStore(handoff.address, lay, "reader").region(0)):
        stamps, rows = read_stamped(view, torch.tensor([1, 4]))
        assert torch.equal(stamps, before_stamps) and stamps.tolist() == [[5, 2], [5, 4]]
        assert torch.equal(rows, before_rows) and torch.equal(rows, rows_of([1, 4], seed=1)[1])
        assert int(view.owner[0]) == 5
    # ... and region 2's writes are where its block numbers say, seen by the store too.
    stamps, rows = read_stamped(memory.region(2), torch.tensor([2 * P, 2 * P + 5]))
    assert stamps.tolist() == [[7, 2], [7, 4]] and torch.equal(rows, rows_of([2 * P, 2 * P + 5], seed=2)[1])
    assert memory.resident_bytes() < memory.nbytes, "the regions are sparse until written"
    aw0.close()
    aw2.close()


def test_regions_are_made_over_tcp_and_bad_regions_are_refused_with_the_reason(store):
    memory, handoff, server = store
    lay = memory.layout
    client = RemoteStore(server.address, lay, "aw-3")
    client.claim(3, 11)  # a replica shipper's CLAIM for a worker the store has not seen
    assert memory.regions == 1 and int(memory.region(3).owner[0]) == 11
    rows, data = rows_of([3 * P + 1], seed=4)
    client.write(3, 11, torch.tensor([3 * P + 1]), torch.tensor([2]), [(tuple(range(L)), rows, data)])
    stamps, got = client.read(torch.tensor([3 * P + 1]))
    assert stamps.tolist() == [[11, 2]] and torch.equal(got, data)
    stamps, _ = client.read(torch.tensor([5 * P]))  # a restore reads a region no one wrote: made, all zero
    assert stamps.tolist() == [[0, 0]] and memory.regions == 2
    with pytest.raises(RemoteStoreError, match="no KV store region 8: regions are 0 to 7"):
        client.claim(8, 11)
    with pytest.raises(RemoteStoreError, match="a block outside region 3"):
        client.write(3, 11, torch.tensor([4 * P]), torch.tensor([2]), [])
    # The hand-over refuses the same way, and refuses a layout that is not the store's.
    with pytest.raises(ValueError, match="no KV store region 8"):
        MappedStore(handoff.address, StoreLayout(L, W, torch.float32, BS, P, 16), "aw-8").region(8)
    with pytest.raises(ValueError, match=r"has layout \[3, 8, 'torch.float32', 4, 6\], this process expects"):
        MappedStore(handoff.address, StoreLayout(L, W, torch.float32, BS, P + 1, 8), "aw-0").region(0)
    assert memory.regions == 3, "the refused hand-over of region 8 made nothing"
    client.close()


def test_a_woken_fenced_predecessor_is_refused_and_detected_in_a_grown_store(store):
    """aw-2 (above the start count) checkpoints into region 2, is fenced, and its successor claims
    the region, once over TCP (a replica) and once mapped. The woken predecessor's writes are refused on
    both paths, and a late write that passed its owner check just before the claim is detected by
    the stamps a restore compares, mapped and over TCP."""
    memory, handoff, server = store
    lay = memory.layout
    old = MappedStore(handoff.address, lay, "aw-2/5").region(2)
    assert claim_region(old, 5) is None and write(old, 5, [2 * P], [2], seed=1) is None
    old_tcp = RemoteStore(server.address, lay, "aw-2/5")
    old_tcp.claim(2, 5)
    successor = RemoteStore(server.address, lay, "aw-2/9")
    successor.claim(2, 9)  # over TCP: the same owner word the mapped writers check
    assert write(old, 5, [2 * P + 1], [4], seed=2) == "region 2 now belongs to incarnation 9"
    rows, data = rows_of([2 * P + 1], seed=2)
    with pytest.raises(RemoteStoreError, match="fenced: region 2 now belongs to incarnation 9"):
        old_tcp.write(2, 5, torch.tensor([2 * P + 1]), torch.tensor([4]), [(tuple(range(L)), rows, data)])
    assert claim_region(old, 5) == "region 2 belongs to incarnation 9", "it cannot take the region back"
    mapped_successor = MappedStore(handoff.address, lay, "aw-2/9").region(2)
    assert claim_region(mapped_successor, 9) is None
    assert write(mapped_successor, 9, [2 * P + 1], [2], seed=3) is None
    # The predecessor had passed its check before the claim and now stamps block 2P+1 as it writes.
    old.stamps[1] = torch.tensor([5, 3])
    expected = torch.tensor([[9, 2]])  # what the successor's commit record names
    assert stamped_prefix(mapped_successor, torch.tensor([2 * P + 1]), expected) == 0, "detected, mapped"
    stamps, _ = successor.read(torch.tensor([2 * P + 1]))
    assert not torch.equal(stamps, expected) and stamps.tolist() == [[5, 3]], "detected over TCP"
    assert server.counters["writes_refused"] == 1
    for client in (old_tcp, successor):
        client.close()
