"""The Redis key schema, in one place. Every key of a cluster starts with `rmoe:{cluster_id}:`.

    rmoe:{cluster}:commit:{request_id}   hash, written by the attention worker that owns the request
        n            positions [0, n) of the request's KV are complete in the store
        block_size   rows per store block
        gaps         JSON list of [start, end) position spans whose sliding-window layers' rows were not
                     written (already outside the window; engine/kv_cache.py, LayerWindows)
        store        incarnation of the writer's primary KV store, which holds every block named
        replica:{incarnation}   one field per replica KV store (that store's incarnation): how many
                     leading blocks of the block list it holds, acked by the store before the field was
                     written (kvstore/replication.py). A restore reads the primary's copy if that store
                     is alive and the stamps check out, else the replica that holds the most.
        owner        attention worker name; incarnation: its incarnation (the blocks' writer)
        time         unix time of the commit
      Expires COMMIT_TTL_S after the last commit, so an abandoned record cannot pin store memory forever.

    rmoe:{cluster}:blocks:{request_id}   list, the request's block list: one "BLOCK:GEN" entry per
      logical block (block_size positions each), the store block that holds it and the generation it
      is stamped with (kvstore/memory_layout.py). A commit appends only the blocks it added (a delta:
      commit_records.py), and only onto a list whose length is the delta's first index; written in the
      same script as the hash; same expiry; deleted with it, and by a restore that takes the record over.

    rmoe:{cluster}:tokens:{request_id}   list, the request's output tokens in position order, up to its
      last commit. Each commit appends only the tokens generated since the one before (a delta, so a
      long request costs linear bytes, not quadratic), and only onto a list whose length is the delta's
      first position (a repeated or out-of-order commit changes nothing). Written with the commit
      record, in the same script; same expiry; both are deleted when the request finishes or is aborted.

    rmoe:{cluster}:prefix:{hash}         string, "STORE:BLOCK:OWNER:INCARNATION:GEN": where a full KV block
      whose chained prefix hash (engine/kv_cache.py block_hashes, hex) is `hash` was checkpointed: the
      store incarnation, the store block, the attention worker and incarnation that wrote it, and the
      generation it is stamped with. Set by that worker's checkpoint thread once the block's rows are in
      the store (the latest writer of a hash wins), read by any attention worker that misses that block
      in its own prefix cache (kvstore/prefix_index.py). The entry is a hint, never trusted: the block
      is freed with its request and may be rewritten; a reader uses it only if the block's stamp equals
      (INCARNATION, GEN) before and after its copy and that incarnation is not fenced, else it prefills.
      Expires PREFIX_TTL_S after it was set, so the index stays bounded by what was written lately.

    rmoe:{cluster}:controller            string, JSON: the controller's state after its latest change
        desired state: desired {attention_workers, expert_workers} (the roster, changed by /admin/scale),
          restart_generation (the restart-everything baseline), active and target placements
          ({workers, entries [[layer, expert, [holder...], [share...]]]}; target null unless a rebalance
          is under way), switch_epoch (the routing epoch the active placement took over at)
        observed state: epoch, next_incarnation, fenced [[name, incarnation]], workers [{name, role,
          index, incarnation, pid, host, node, data_address, state (controller/state.py WorkerState), experts,
          started_at, ert_epoch}], load [[layer, expert, decayed tokens]], events (last 100)
        orders [{id, action, worker, pid, issued_at, generation, floor}] not yet seen carried out, and
          next_order; counters {orders_issued, orders_completed, orders_resumed, orders_expired,
          rebalances, scale_events, drains}
      A restarted controller loads it, carries on with the same incarnations, epoch, roster and
      placement, and sends the outstanding orders again. No expiry; deleted with Redis.

    rmoe:{cluster}:request:{scope}:{key}   hash, a request sent with `Idempotency-Key: key` (scope: a hash of
      the API key it came with; server/idempotency.py): request_id, body (a hash of the request body),
      prompt_ids, params, seed (JSON), stream, worker (the attention worker it runs on, updated when it
      moves), frontend, state ("running", "finished", "failed"), result (the finished non-streaming
      response, JSON), created. Claimed once, atomically (the first frontend to see the key runs it;
      every later one attaches). Expires resume_grace_s + request_timeout_s after its last change while
      running, idempotency_ttl_s after it finished.

    rmoe:{cluster}:delivered:{request_id}   list, one JSON [token, logprob, top] per output position, in
      order, appended by the frontend that delivers the request (only onto a list whose length is the
      first new position) off the request path: what a frontend that resumes a stream can replay, or
      resubmit from, when the one that delivered it died. Same expiry as its request record.

    rmoe:{cluster}:supervisor            string, JSON {pid, host, started, renewed}: the supervisor's lease,
      set with an expiry of supervisor_lease_s and renewed well within it (supervisor.py). Roles exit by
      themselves once it has been missing that long; a second supervisor is refused while it is held by
      a live one, and adopts the cluster when it is held by a dead one.
"""

from __future__ import annotations

COMMIT_TTL_S = 600
PREFIX_TTL_S = 600


def request_key(cluster_id: str, scope: str, key: str) -> str:
    return f"rmoe:{cluster_id}:request:{scope}:{key}"


def delivered_key(cluster_id: str, request_id: str) -> str:
    return f"rmoe:{cluster_id}:delivered:{request_id}"


def supervisor_key(cluster_id: str) -> str:
    return f"rmoe:{cluster_id}:supervisor"


def commit_key(cluster_id: str, request_id: str) -> str:
    return f"rmoe:{cluster_id}:commit:{request_id}"


def blocks_key(cluster_id: str, request_id: str) -> str:
    return f"rmoe:{cluster_id}:blocks:{request_id}"


def tokens_key(cluster_id: str, request_id: str) -> str:
    return f"rmoe:{cluster_id}:tokens:{request_id}"


def prefix_key(cluster_id: str, block_hash: bytes) -> str:
    return f"rmoe:{cluster_id}:prefix:{block_hash.hex()}"


def commit_pattern(cluster_id: str) -> str:
    return f"rmoe:{cluster_id}:commit:*"

