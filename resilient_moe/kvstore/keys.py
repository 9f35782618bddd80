"""The Redis key schema, in one place. Every key of a cluster starts with `rmoe:{cluster_id}:`.

    rmoe:{cluster}:commit:{request_id}   hash, written by the attention worker that owns the request
        n            positions [0, n) of the request's KV are complete in the store
        blocks       JSON list: store block of each logical block of the request (block_size rows each)
        block_size   rows per store block
        store        incarnation of the KV store process that holds the blocks
        owner        attention worker name; incarnation: its incarnation
        time         unix time of the commit
      Expires COMMIT_TTL_S after the last commit, so an abandoned record cannot pin store memory forever.

    rmoe:{cluster}:request:{request_id}  hash, the request record, written at admission and per commit
        prompt_ids   JSON list;  params: JSON object (sampling parameters);  seed: integer
        output_ids   JSON list of the tokens generated up to the last commit
        aw           attention worker serving it
      Same expiry as the commit record; both are deleted when the request finishes or is aborted.

    rmoe:{cluster}:controller            string, JSON: the controller's state after its latest change
        desired state: desired {attention_workers, expert_workers} (the roster, changed by /admin/scale),
          restart_generation (the restart-everything baseline), active and target placements
          ({workers, entries [[layer, expert, [holder...], [share...]]]}; target null unless a rebalance
          is under way), switch_epoch (the routing epoch the active placement took over at)
        observed state: epoch, next_incarnation, fenced [[name, incarnation]], workers [{name, role,
          index, incarnation, pid, host, data_address, state (controller/state.py WorkerState), experts,
          started_at, ert_epoch}], load [[layer, expert, decayed tokens]], events (last 100)
        orders [{id, action, worker, pid, issued_at, generation, floor}] not yet seen carried out, and
          next_order; counters {orders_issued, orders_completed, orders_resumed, orders_expired,
          rebalances, scale_events, drains}
      A restarted controller loads it, carries on with the same incarnations, epoch, roster and
      placement, and sends the outstanding orders again. No expiry; deleted with Redis.
"""

from __future__ import annotations

COMMIT_TTL_S = 600


def commit_key(cluster_id: str, request_id: str) -> str:
    return f"rmoe:{cluster_id}:commit:{request_id}"


def request_key(cluster_id: str, request_id: str) -> str:
    return f"rmoe:{cluster_id}:request:{request_id}"


def commit_pattern(cluster_id: str) -> str:
    return f"rmoe:{cluster_id}:commit:*"

