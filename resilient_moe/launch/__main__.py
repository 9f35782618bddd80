"""`python -m resilient_moe.launch --model DIR [...]`: start a cluster, print {"pids": {...}, "controller": ...}
on one line, run until SIGTERM/SIGINT, then stop it (tests of process hygiene use it)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from resilient_moe.deployment import DeploymentConfig
from resilient_moe.launch import make_cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resilient_moe.launch")
    parser.add_argument("--model", required=True)
    parser.add_argument("--attention-workers", type=int, default=1)
    parser.add_argument("--expert-workers", type=int, default=2)
    parser.add_argument("--transport", default="shm")
    args = parser.parse_args(argv)
    dep = DeploymentConfig(model=args.model, attention_workers=args.attention_workers,
                           expert_workers=args.expert_workers, transport=args.transport)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with make_cluster(dep) as cluster:
        pids = dict(cluster.pids, fork_server=cluster.fork_server.proc.pid)
        print(json.dumps({"pids": pids, "controller": cluster.controller_address}), flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
