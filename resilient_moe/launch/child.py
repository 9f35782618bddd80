"""A role's process as a Ray actor starts it: `python -m resilient_moe.launch.child ROLE [--background]`,
with its WorkerConfig JSON on stdin (--background: a replacement, whose imports run at the lowest CPU
priority). Nothing of the config (Redis URL, addresses) goes on the command line,
which any local user can read; the cluster secret comes in the environment (`auth.install` in the actor)."""

from __future__ import annotations

import os
import select
import signal
import sys
import threading

from resilient_moe.deployment import ROLES


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
    args = sys.argv[1:]
    background = "--background" in args  # a replacement joining a serving cluster
    args = [a for a in args if a != "--background"]
    if len(args) != 1 or args[0] not in ROLES:
        sys.exit(f"usage: python -m resilient_moe.launch.child ROLE [--background] (ROLE one of {', '.join(ROLES)}), "
                 "config JSON on stdin")
    die_with_actor()
    config_json = sys.stdin.read()
    if background:  # the imports (torch: seconds of CPU) must not take cores from the survivors' serving
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    from resilient_moe.deployment import WorkerConfig
    from resilient_moe.launch.fork_server import _role_mains

    role_main = _role_mains()[args[0]]
    if background and os.geteuid() == 0:  # raising it again needs CAP_SYS_NICE; the role lowers its load itself
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    return role_main(WorkerConfig.from_json(config_json)) or 0


if __name__ == "__main__":
    sys.exit(main())
