"""Commit records: what a request's checkpoint says is durable, as kept in Redis (keys.py names the
keys), written by the owner only (Lua scripts that check it), and read back by a restore.

A record is a hash and a list beside it. The hash: `n` (positions [0, n) are complete in the store),
`gaps` (spans whose sliding-window rows were skipped), `block_size`, `store` (the primary store's
incarnation), `owner` and `incarnation` (the writer), `time`, and one `replica:{store}` field per
replica store: how many leading blocks it holds. The list (`blocks_key`): one "BLOCK:GEN" entry per
logical block of the request, its store block and the generation it is stamped with. The request's
output tokens so far sit in a third key, a list too (`tokens_key`).

A commit sends only what changed (`CommitDelta`): the new list entries, `n` and `time`, `gaps` when
they changed, and the fields that never change (`block_size`, `store`, `owner`, `incarnation`) only
with a new list. So its write costs O(blocks it adds), whatever the request's length; before, every
commit rewrote the whole block list as JSON, and a long request's Redis traffic grew with the square
of its length. A delta applies only onto the list it extends: one that finds the list another length
than its first index (a commit lost in a Redis outage, a Redis that restarted empty) changes nothing
and answers RESEND; the writer's next commit for that request then sends the whole list again
(kvstore/checkpoint.py). Either way the record never names a block the list lacks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

COMMITTED, REFUSED, RESEND = 1, 0, -1  # what COMMIT_SCRIPT answers

# Commit only if the record is absent or ours. KEYS = commit key, blocks key, tokens key. ARGV = owner,
# incarnation, ttl, position of the first new token, index of the first new block entry (0: a new list,
# which also drops the replica fields: they counted blocks of the old one), F (how many field/value
# strings follow), the F strings, B, B block entries, then the new tokens (appended only where the
# list ends at that position). RPUSH goes in slices: unpack has a bound on how many values it returns.
COMMIT_SCRIPT = """
local owner = redis.call('HGET', KEYS[1], 'owner')
local inc = redis.call('HGET', KEYS[1], 'incarnation')
if owner and (owner ~= ARGV[1] or inc ~= ARGV[2]) then return 0 end
local first = tonumber(ARGV[5])
if first == 0 then
  redis.call('DEL', KEYS[2])
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(f, 1, 8) == 'replica:' then redis.call('HDEL', KEYS[1], f) end
  end
elseif redis.call('LLEN', KEYS[2]) ~= first then
  return -1
end
local nf = tonumber(ARGV[6])
local at = 7 + nf
local last = at + tonumber(ARGV[at])
for i = at + 1, last, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, last)))
end
if nf > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 7, 6 + nf)) end
if last < #ARGV and redis.call('LLEN', KEYS[3]) == tonumber(ARGV[4]) then
  for i = last + 1, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[3], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
end
for k = 1, 3 do redis.call('EXPIRE', KEYS[k], tonumber(ARGV[3])) end
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


@dataclass(frozen=True)
class CommitDelta:
    """What one commit changes in a request's record (see the module docstring)."""

    n: int  # positions [0, n) are complete
    first_block: int  # index of blocks[0] in the request's block list; 0: the list starts anew
    blocks: list[int]  # store blocks of the request's logical blocks from first_block on
    gens: list[int]  # the generation each is stamped with
    first_token: int  # position of tokens[0] in the request's output
    tokens: list[int]  # output tokens since the last commit
    fields: dict[str, str] = field(default_factory=dict)  # more hash fields to set (gaps, the constant ones)

    def args(self, owner: str, incarnation: int, ttl_s: int) -> list[str]:
        """COMMIT_SCRIPT's ARGV for this delta."""
        pairs = [s for k, v in self.fields.items() for s in (k, v)]
        pairs += ["n", str(self.n), "time", f"{time.time():.3f}"]
        return [owner, str(incarnation), str(ttl_s), str(self.first_token), str(self.first_block), str(len(pairs)),
                *pairs, str(len(self.blocks)), *(f"{b}:{g}" for b, g in zip(self.blocks, self.gens)),
                *map(str, self.tokens)]


def list_fields(block_size: int, store: int, owner: str, incarnation: int) -> dict[str, str]:
    """The fields a commit that starts a new block list sets besides n and time (they never change
    while the list lives)."""
    return {"block_size": str(block_size), "store": str(store), "owner": owner, "incarnation": str(incarnation)}


def gaps_field(gaps: list[tuple[int, int]]) -> dict[str, str]:
    return {"gaps": json.dumps(gaps)}


def takeover_fields(owner: str, incarnation: int) -> dict[str, str]:
    """What a restore writes over a record it takes over (it deletes the block list too), so that a
    woken predecessor can no longer commit to it (COMMIT_SCRIPT checks the owner) and nothing of its
    blocks is claimed any more."""
    return {"owner": owner, "incarnation": str(incarnation), "n": "0"}


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


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_entries(entries: list) -> tuple[list[int], list[int]]:
    """(blocks, gens) of a block list as Redis returns it; ValueError naming the bad entry."""
    blocks, gens = [], []
    for i, entry in enumerate(entries):
        block, sep, gen = _text(entry).partition(":")
        try:
            if not sep:
                raise ValueError
            blocks.append(int(block))
            gens.append(int(gen))
        except ValueError:
            raise ValueError(f"field 'blocks' (the block list), entry {i}: {_text(entry)!r} is not BLOCK:GEN") from None
    return blocks, gens


def parse_record(record: dict, entries: list) -> CommitRecord | None:
    """A raw record (the hash and its block list: bytes or str, as Redis returns them); None when it
    claims nothing (empty, or taken over and not yet committed to). Raises ValueError naming the field
    that is wrong in a malformed one."""
    fields = {_text(k): _text(v) for k, v in record.items()}
    if not fields or fields.get("n") == "0":
        return None

    def number(name: str, least: int) -> int:
        if name not in fields:
            raise ValueError(f"field {name!r} is missing")
        try:
            value = int(fields[name])
        except ValueError:
            raise ValueError(f"field {name!r} is {fields[name]!r}, not an integer") from None
        if value < least:
            raise ValueError(f"field {name!r} is {value}, below {least}")
        return value

    n, block_size, store, writer = number("n", 0), number("block_size", 1), number("store", 1), number("incarnation", 1)
    blocks, gens = parse_entries(entries)
    if n > len(blocks) * block_size:
        raise ValueError(f"field 'n' ({n}) needs {-(-n // block_size)} blocks of {block_size}, the block list "
                         f"has {len(blocks)}")
    try:
        gaps = [(int(start), int(end)) for start, end in json.loads(fields.get("gaps", "[]"))]
    except (ValueError, TypeError) as e:
        raise ValueError(f"field 'gaps' is {fields['gaps']!r}, not a list of [start, end] ({e})") from None
    holders = [(store, len(blocks), "local")]
    for name in fields:
        if name.startswith("replica:"):
            try:
                holders.append((int(name.split(":", 1)[1]), int(fields[name]), "replica"))
            except ValueError:
                raise ValueError(f"field {name!r} is {fields[name]!r}: not replica:STORE = BLOCKS") from None
    holders[1:] = sorted(holders[1:], key=lambda h: -h[1])
    return CommitRecord(n=n, blocks=blocks, gens=gens, writer=writer, gaps=gaps, holders=holders, block_size=block_size)
