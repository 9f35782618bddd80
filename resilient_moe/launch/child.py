"""A role's process as a Ray actor starts it: `python -m resilient_moe.launch.child ROLE`, with its
WorkerConfig JSON on stdin. Nothing of the config (Redis URL, addresses) goes on the command line,
which any local user can read; the cluster secret comes in the environment (`auth.install` in the actor)."""

from __future__ import annotations

import sys

from resilient_moe.config import ROLES


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in ROLES:
        sys.exit(f"usage: python -m resilient_moe.launch.child ROLE (one of {', '.join(ROLES)}), config JSON on stdin")
    config_json = sys.stdin.read()
    from resilient_moe.launch.zygote import _cold_main

    return _cold_main(sys.argv[1], config_json)


if __name__ == "__main__":
    sys.exit(main())
