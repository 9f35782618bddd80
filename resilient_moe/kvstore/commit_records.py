"""Commit records: what a request's checkpoint says is durable, as kept in Redis (keys.py names the
keys), written by the owner only (Lua scripts that check it), and read back by a restore.

A record is a hash: `n` (positions [0, n) are complete in the store), `blocks` and `gens` (JSON lists:
the store block of each logical block, and the generation it is stamped with), `gaps` (spans whose
sliding-window rows were skipped), `block_size`, `store` (the primary store's incarnation), `owner`
and `incarnation` (the writer), `time`, and one `replica:{store}` field per replica store: how many
leading blocks it holds. The request's output tokens so far sit in a list beside it (`tokens_key`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

# Commit only if the record is absent or ours: KEYS = commit key, tokens key; ARGV = owner,
# incarnation, ttl, position of the first new token, then field/value pairs of the commit record,
# then "|", then the new tokens (appended only where the list ends at that position).
COMMIT_SCRIPT = """
local owner = redis.call('HGET', KEYS[1], 'owner')
local inc = redis.call('HGET', KEYS[1], 'incarnation')
if owner and (owner ~= ARGV[1] or inc ~= ARGV[2]) then return 0 end
local i = 5
while i <= #ARGV and ARGV[i] ~= '|' do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
if i < #ARGV and redis.call('LLEN', KEYS[2]) == tonumber(ARGV[4]) then
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i + 1, #ARGV))
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""

# Record how many blocks a replica holds, on each record that is still this incarnation's: KEYS = commit
# keys; ARGV = owner, incarnation, field, then one value per key. Returns {records changed} (a list, so
# that `_execute` never counts it as a commit).
REPLICA_SCRIPT = """
local changed = 0
for k = 1, #KEYS do
  local owner = redis.call('HGET', KEYS[k], 'owner')
  local inc = redis.call('HGET', KEYS[k], 'incarnation')
  if owner and owner == ARGV[1] and inc == ARGV[2] then
    redis.call('HSET', KEYS[k], ARGV[3], ARGV[3 + k])
    changed = changed + 1
  end
end
return {changed}
"""


def record_fields(n: int, blocks: list[int], gens: list[int], gaps: list[tuple[int, int]], block_size: int,
                  store: int, owner: str, incarnation: int) -> list[str]:
    """The field/value pairs COMMIT_SCRIPT writes for one commit."""
    return ["n", str(n), "gaps", json.dumps(gaps), "blocks", json.dumps(blocks), "gens", json.dumps(gens),
            "block_size", str(block_size), "store", str(store), "time", f"{time.time():.3f}", "owner", owner,
            "incarnation", str(incarnation)]


def takeover_fields(owner: str, incarnation: int) -> dict[str, str]:
    """What a restore writes over a record it takes over, so that a woken predecessor can no longer
    commit to it (COMMIT_SCRIPT checks the owner) and nothing of its blocks is claimed any more."""
    return {"owner": owner, "incarnation": str(incarnation), "n": "0", "blocks": "[]", "gens": "[]"}


def replica_fields(record: dict) -> list:
    """The `replica:{store}` fields of a raw record (its keys as Redis returned them)."""
    return [k for k in record if (k.decode() if isinstance(k, bytes) else k).startswith("replica:")]


@dataclass(frozen=True)
class CommitRecord:
    """A commit record, parsed and checked."""

    n: int  # positions [0, n) are complete
    blocks: list[int]  # store block of each logical block
    gens: list[int]  # generation each block is stamped with
    writer: int  # the writer's incarnation (the stamps name it)
    gaps: list[tuple[int, int]]  # spans whose sliding-window rows were skipped
    holders: list[tuple[int, int, str]]  # (store incarnation, leading blocks it holds, "local"|"replica"), primary first
    block_size: int


def parse_record(record: dict) -> CommitRecord | None:
    """A raw record (bytes or str keys and values, as Redis returns them); None when it is empty.
    Raises ValueError naming what is wrong with a malformed one."""
    if not record:
        return None
    try:
        fields = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                  for k, v in record.items()}
        blocks = [int(b) for b in json.loads(fields["blocks"])]
        holders = [(int(fields["store"]), len(blocks), "local")]
        holders += sorted(((int(k.split(":", 1)[1]), int(v), "replica") for k, v in fields.items()
                           if k.startswith("replica:")), key=lambda h: -h[1])
        return CommitRecord(
            n=int(fields["n"]), blocks=blocks, gens=[int(g) for g in json.loads(fields["gens"])],
            writer=int(fields["incarnation"]),
            gaps=[(int(start), int(end)) for start, end in json.loads(fields.get("gaps", "[]"))],
            holders=holders, block_size=int(fields["block_size"]))
    except KeyError as e:
        raise ValueError(f"field {e.args[0]!r} is missing") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(str(e)) from None
