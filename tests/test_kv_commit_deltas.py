"""Commit records carry only what changed (kvstore/commit_records.py), measured where the bytes land:
a real checkpointer writes into a real KV store and commits into a real redis-server, and every
command Redis executes is read back through MONITOR. A commit's record bytes follow the blocks it
adds, not the request's length; a delta Redis lost is sent whole again; restores from the delta
records are token-identical; and malformed records are refused with the field named, then recomputed.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shlex
import socket
import threading

import pytest
import redis
import torch

from conftest import save_hf_model, wait_until
from test_kv_windows import Worker
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.kvstore import keys
from resilient_moe.kvstore.memory_layout import MemfdServer, StoreLayout, StoreMemory
from resilient_moe.model.config import ModelConfig

ENGINE = dict(max_model_len=4096, kv_cache_tokens=8192, max_prefill_tokens_per_step=256)
BS = 16


class Monitor:
    """Every command Redis runs, as MONITOR reports it (args unquoted), from a thread of its own."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.sendall(b"MONITOR\r\n")
        self.commands: list[list[str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\r\n")
            for line in lines:
                if line.startswith(b"+") and b"] " in line:  # +TIME [DB ADDRESS] "CMD" "ARG" ...
                    self.commands.append(shlex.split(line.split(b"] ", 1)[1].decode()))

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)

    def commits(self, request_id: str) -> list[dict]:
        """The COMMIT_SCRIPT calls for `request_id`, decoded by the ARGV layout the script documents."""
        out = []
        for command in self.commands:
            if command[0].upper() != "EVALSHA" or command[2] != "3" or command[3] != keys.commit_key("test", request_id):
                continue
            argv = command[6:]
            fields = int(argv[5])
            count = int(argv[6 + fields])
            tokens = argv[7 + fields + count:]
            out.append({"first_block": int(argv[4]), "blocks": count,
                        "fields": dict(zip(argv[6:6 + fields:2], argv[7:6 + fields:2])),
                        # what the record costs: keys and arguments, without the tokens list's delta
                        "record_bytes": sum(len(a) for a in command[3:]) - sum(len(t) for t in tokens)})
        return out


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    return save_hf_model(tmp_path_factory.mktemp("long-context"), "mixtral", seed=3, max_position_embeddings=4096)


@pytest.fixture
def store(long_model):
    """(layout, address) of a KV store started for 2 attention workers, 3100 tokens a region."""
    cfg = ModelConfig.from_pretrained(long_model)
    layout = StoreLayout.for_deployment(cfg, 2 * 3100 * cfg.kv_bytes_per_token + (1 << 20), BS, torch.float32, 2)
    memory = StoreMemory(layout, "test-kv-store-deltas")
    try:
        with MemfdServer(memory, "@rmoe-test-kv-deltas") as server:
            yield layout, server.address
    finally:
        memory.close()


def workload(model_dir, max_tokens: int = 80):
    rng = random.Random(12)
    vocab = ModelConfig.from_pretrained(model_dir).vocab_size
    prompts = {"long": [rng.randrange(3, vocab) for _ in range(3000)], "shrt": [rng.randrange(3, vocab) for _ in range(20)]}
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    reference = dict(zip(prompts, (r.token_ids for r in LLMEngine(model_dir, EngineConfig(**ENGINE)).generate(
        list(prompts.values()), params))))
    return prompts, params, reference


def run_until(worker: Worker, prompts: dict, tokens: int) -> None:
    for _ in range(2000):
        if min(len(worker.tokens.get(r, [])) for r in prompts) >= tokens:
            return
        worker.step()
    raise AssertionError("did not reach the tokens")


def committed(db, request_id: str) -> int:
    return int(db.hget(keys.commit_key("test", request_id), "n") or 0)


@contextlib.contextmanager
def writer_and_reader(model_dir, store, redis_server, writer_index: int):
    """(Redis client, a writer attention worker at `writer_index`, a reader at index 0), sharing `store`."""
    layout, address = store
    db = redis.Redis(unix_socket_path=redis_server)
    writer = Worker(model_dir, layout, address, db, writer_index, **ENGINE)
    reader = Worker(model_dir, layout, address, db, 0, **ENGINE)
    try:
        yield db, writer, reader
    finally:
        writer.close()
        reader.close()
        db.close()


def checkpointing(worker: Worker, prompts: dict, params, tokens: int) -> dict:
    """Run `prompts` on `worker` until each has `tokens` tokens; the tokens each has (as a frontend saw them)."""
    for request_id, prompt in prompts.items():
        worker.engine.add_request(request_id, prompt, params)
    run_until(worker, prompts, tokens)
    return {r: list(t) for r, t in worker.tokens.items()}


def last_commits_written(writer: Worker, db, prompts: dict):
    """A predicate: every request's record commits the full blocks of the positions it has cached
    (its prompt and every token but the last)."""
    return lambda: writer.ckpt.settled() and all(
        committed(db, r) == (len(p) + len(writer.tokens[r]) - 1) // BS * BS for r, p in prompts.items())


def restore_and_finish(reader: Worker, prompts: dict, params, seen: dict) -> dict:
    """Move every request to `reader` as an adopting attention worker does; its tokens at the end."""
    moved = {r: reader.engine.new_sequence(r, prompts[r], params, output_ids=seen[r]) for r in prompts}
    for seq in moved.values():
        reader.ckpt.request_restore(seq)
    ready = {}
    wait_until(lambda: ready.update({s.request_id: (s, rows, n) for s, rows, n in reader.ckpt.finished_restores()})
               or len(ready) == len(prompts), 20, "the restores")
    for request_id, (seq, rows, n) in ready.items():
        reader.engine.resume(seq, rows, n)
        reader.tokens[request_id] = list(seen[request_id])
    reader.run()
    return reader.tokens


def test_a_commit_writes_only_the_blocks_it_adds_whatever_the_length(long_model, store, redis_server):
    """A 3000-token request and a 20-token one decode side by side on aw-2 (a region above the start
    count of 2). Every commit of either sends only its new blocks (each block once, in order), so the
    long request's decode commits, at 3000+ positions, cost the bytes of the short one's; aw-0 then
    restores both from aw-2's region of the same store, token-identically."""
    prompts, params, reference = workload(long_model)
    monitor = Monitor(redis_server)
    with writer_and_reader(long_model, store, redis_server, 2) as (db, writer, reader):
        seen = checkpointing(writer, prompts, params, 70)
        wait_until(last_commits_written(writer, db, prompts), 20, "the last commits")
        writer.close()
        monitor.close()
        for request_id in prompts:
            commits = monitor.commits(request_id)
            total = -(-committed(db, request_id) // BS)
            # Step 1: each block is sent once, in order: a commit sends the blocks it adds and no others.
            assert [c["first_block"] for c in commits] == [sum(c["blocks"] for c in commits[:i]) for i in range(len(commits))]
            assert sum(c["blocks"] for c in commits) == total == db.llen(keys.blocks_key("test", request_id))
            # Step 2: the fields that never change go with the first commit only.
            assert "owner" in commits[0]["fields"] and not any("owner" in c["fields"] for c in commits[1:])
            # Step 3: a commit's record bytes follow the blocks it adds (a key, a few numbers, 9-ish bytes a block).
            assert all(c["record_bytes"] <= 320 + 16 * c["blocks"] for c in commits), commits
        long_decode = [c["record_bytes"] for c in monitor.commits("long") if c["blocks"] == 1]
        short_decode = [c["record_bytes"] for c in monitor.commits("shrt") if c["blocks"] == 1]
        assert len(long_decode) >= 4 and len(short_decode) >= 4
        # Step 4: at 3000 positions (188 blocks) a one-block commit costs what it costs at 20 (a few
        # digits more); the whole list as JSON would be about 2000 bytes more.
        assert max(long_decode) <= min(short_decode) + 24, (long_decode, short_decode)

        tokens = restore_and_finish(reader, prompts, params, seen)
        assert reader.ckpt.counters["restored_local"] == 2, "both read from aw-2's region, mapped"
        assert reader.ckpt.counters["restored_tokens"] >= 3000
        assert tokens == reference


def test_a_delta_redis_lost_is_sent_whole_again(long_model, store, redis_server):
    """Redis loses every record mid-request (as a restart without persistence does): the next delta
    of each request finds no list to extend and changes nothing (RESEND); the one after sends the
    whole list, and the record is complete again: a restore from it is token-identical."""
    prompts, params, reference = workload(long_model)
    with writer_and_reader(long_model, store, redis_server, 1) as (db, writer, reader):
        checkpointing(writer, prompts, params, 20)
        wait_until(writer.ckpt.settled, 20, "the commits so far")
        db.flushall()
        run_until(writer, prompts, 70)
        seen = {r: list(t) for r, t in writer.tokens.items()}
        wait_until(last_commits_written(writer, db, prompts), 20, "the last commits")
        assert writer.ckpt.counters["commit_resends"] == 2, "one refused delta per request"
        for request_id in prompts:
            assert db.llen(keys.blocks_key("test", request_id)) == -(-committed(db, request_id) // BS), \
                "the whole list is back"
        writer.close()
        assert restore_and_finish(reader, prompts, params, seen) == reference
        assert reader.ckpt.counters["restored_local"] == 2


def test_malformed_delta_records_are_refused_naming_the_field_and_recomputed(long_model, store, redis_server, caplog):
    rng = random.Random(3)
    prompts = {f"r{i}": [rng.randrange(3, 300) for _ in range(40 + 10 * i)] for i in range(5)}
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    reference = dict(zip(prompts, (r.token_ids for r in LLMEngine(long_model, EngineConfig(**ENGINE)).generate(
        list(prompts.values()), params))))
    with writer_and_reader(long_model, store, redis_server, 1) as (db, writer, reader):
        seen = checkpointing(writer, prompts, params, 20)
        wait_until(last_commits_written(writer, db, prompts), 20, "the last commits")
        writer.close()
        blocks = {r: keys.blocks_key("test", r) for r in prompts}
        db.lset(blocks["r0"], 1, "x:y")  # an entry that is not BLOCK:GEN
        db.hset(keys.commit_key("test", "r1"), "n", "many")  # a field that is not a number
        db.delete(blocks["r2"])
        db.set(blocks["r2"], "not a list")  # WRONGTYPE for LRANGE
        db.ltrim(blocks["r3"], 0, 0)  # n names blocks the list lacks
        db.hset(keys.commit_key("test", "r4"), "gaps", "[[1, 2")  # gaps that are not JSON
        with caplog.at_level(logging.WARNING, logger="resilient_moe.kv_checkpoint"):
            tokens = restore_and_finish(reader, prompts, params, seen)
        assert tokens == reference, "every request recomputed, token-identical"
        assert reader.ckpt.counters["restore_malformed_records"] == 5
        assert reader.ckpt.counters["restore_misses"] == 5 and reader.ckpt.counters["restored"] == 0
        text = caplog.text
        for why in ("field 'blocks' (the block list), entry 1: 'x:y' is not BLOCK:GEN",
                    "field 'n' is 'many', not an integer", "WRONGTYPE",
                    "field 'n' (", "field 'gaps' is '[[1, 2'"):
            assert why in text, why
        assert text.count("recomputing") >= 5
