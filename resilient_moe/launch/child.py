"""A role's process as a Ray actor starts it: `python -m resilient_moe.launch.child ROLE`, with its
WorkerConfig JSON on stdin. Nothing of the config (Redis URL, addresses) goes on the command line,
which any local user can read; the cluster secret comes in the environment (`auth.install` in the actor)."""

from __future__ import annotations

import os
import select
import signal
import sys
import threading

from resilient_moe.config import ROLES


def die_with_actor() -> None:
    """Exit the moment the parent (the actor) is gone, whichever of its threads started us: a thread
    waits on a pidfd of the parent (the parent-death signal alone follows the forking thread)."""
    parent = os.getppid()
    try:
        fd = os.pidfd_open(parent)
    except (AttributeError, OSError):
        return  # an old kernel: the parent-death signal alone
    if os.getppid() != parent:
        os._exit(1)

    def wait() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, name="die-with-actor", daemon=True).start()


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in ROLES:
        sys.exit(f"usage: python -m resilient_moe.launch.child ROLE (one of {', '.join(ROLES)}), config JSON on stdin")
    die_with_actor()
    config_json = sys.stdin.read()
    from resilient_moe.launch.zygote import _cold_main

    return _cold_main(sys.argv[1], config_json)


if __name__ == "__main__":
    sys.exit(main())
