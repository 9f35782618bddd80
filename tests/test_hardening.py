"""Local hardening (issue 22 item 4): no process of a live cluster has the cluster secret in its
environment, and every role process (and the fork server) is non-dumpable, so that another process of
the same user cannot read its memory, environment or file descriptors (the KV store's memfd).

Non-dumpable is shown two ways:
- every live role, the controller and the fork server report their own flag (PR_GET_DUMPABLE answers
  only for oneself): heartbeats, the controller's state, the fork server's hello;
- what the flag does, as an unprivileged user (`nobody`), the way the threat is stated: a process that
  ran `procs.harden_process` (the function every role calls first) refuses a second `nobody` process its
  /proc/PID/mem, environ and fd; the same process without it does not (the control: the probe can
  read). The live cluster runs as root here, and root passes every such check, so the probe cannot be
  pointed at it; a root probe without CAP_SYS_PTRACE is no substitute (on this kernel it still read the
  environ and fd of a non-dumpable root process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_until, worker_load
from resilient_moe import auth
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.launch import make_cluster

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
SETPRIV = shutil.which("setpriv")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc and prctl(PR_SET_DUMPABLE) are Linux's")

# Tries what an intruder of the same uid would: prints, per path, "ok" or the error's name.
PROBE = r"""
import json, os, sys
out = {}
for pid in json.loads(sys.argv[1]):
    tries = {}
    for what in ("environ", "mem", "fd"):
        path = f"/proc/{pid}/{what}"
        try:
            if what == "fd":
                os.listdir(path)
            else:
                with open(path, "rb") as f:
                    f.read(1) if what == "environ" else None
            tries[what] = "ok"
        except OSError as e:
            tries[what] = type(e).__name__
    out[str(pid)] = tries
print(json.dumps(out))
"""

# A role-like process: it starts the way every role does (procs.harden_process) when told to, then waits.
TARGET = r"""
import sys
from resilient_moe.procs import harden_process
if sys.argv[1] == "harden":
    harden_process()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def cluster(tiny_model, fork_server, tmp_path_factory):
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=1, expert_workers=1)
    with make_cluster(dep, log_dir=tmp_path_factory.mktemp("hardening"), fork_server=fork_server) as cluster:
        yield cluster


def cluster_pids(cluster) -> dict[str, int]:
    """Every process of the cluster on this host: its roles, redis-server, and the fork server."""
    pids = dict(cluster.pids)
    pids["fork-server"] = cluster.fork_server.pid
    return pids


def test_no_process_of_the_cluster_has_the_secret_in_its_environment(cluster):
    secret = auth.secret().hex().encode()
    pids = cluster_pids(cluster)
    assert {"controller", "aw-0", "ew-0", "kv-store", "redis", "fork-server"} <= set(pids), pids
    assert (auth.SECRET_ENV + "=") not in "".join(f"{k}=" for k in os.environ)  # nor this, the launcher's
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                block = f.read()
        except PermissionError:
            assert os.geteuid() != 0, name  # not root: non-dumpable hides it from us too, which is the point
            continue
        assert block, f"{name} (pid {pid}) has an empty environment (gone?)"
        assert secret not in block, f"{name}'s environment holds the secret"
        assert (auth.SECRET_ENV + "=").encode() not in block, f"{name}'s environment names {auth.SECRET_ENV}"
        assert (auth.SECRET_FILE_ENV + "=").encode() not in block, name
        # The fork server's block names the pipe it read the secret from (a number; its forked roles show
        # the same block): nothing else.
        env = dict(e.split(b"=", 1) for e in block.split(b"\0") if b"=" in e)
        assert env.get(auth.HANDOVER_FD_ENV.encode(), b"0").isdigit(), name


def test_every_role_reports_itself_non_dumpable(cluster):
    """Each role's own word (prctl(PR_GET_DUMPABLE) is only for oneself): heartbeats, the controller's
    state and the fork server's hello."""
    for name in ("aw-0", "ew-0", "kv-store"):
        wait_until(lambda: any(w.name == name and "dumpable" in w.load for w in cluster.state().workers), 60,
                   f"{name}'s heartbeat with its dumpable flag")
        assert worker_load(cluster, name, "dumpable") == 0.0, name
    assert cluster.state().counters["dumpable"] == 0.0, "the controller"
    assert cluster.fork_server.dumpable == 0, "the fork server"


def test_cold_workers_get_the_secret_through_a_pipe_and_harden_themselves(tiny_model, fork_server, tmp_path):
    """A cold worker is exec'd (a fresh interpreter): the one kind of role with an environment block of its
    own. Killing one in the restart-everything baseline restarts every worker cold; they register (so
    they hold the secret), show none of it in their environment, and report themselves non-dumpable
    (execve reset the flag the fork server's fork had)."""
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=1, expert_workers=1, resilience=False,
                           baseline_restart="cold")
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        before = {name: cluster.pids[name] for name in ("aw-0", "ew-0")}
        cluster.kill("ew-0")
        wait_until(lambda: cluster.restarts and cluster.restarts[-1][1] > 0, 180, "a cold restart of every worker")
        secret = auth.secret().hex().encode()
        for name, old in before.items():
            pid = cluster.pids[name]
            assert pid != old, name
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"--cold" in f.read(), name
            with open(f"/proc/{pid}/environ", "rb") as f:
                block = f.read()
            assert secret not in block and (auth.SECRET_ENV + "=").encode() not in block, name
            assert (auth.HANDOVER_FD_ENV + "=").encode() in block, name  # the pipe's number, all it was told
            wait_until(lambda: any(w.name == name and w.pid == pid and w.load.get("dumpable") == 0.0
                                   for w in cluster.state().workers), 120, f"cold {name} reporting dumpable 0")


def as_nobody(argv: list[str]) -> list[str]:
    """`argv` run as uid/gid 65534 with no supplementary groups. Through setpriv, not Popen(user=...):
    the test process has threads (a cluster's launcher, gRPC), and switching uid in the forked child of a
    threaded process before exec crashed it here."""
    return [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def _python_for_nobody() -> str:
    """An interpreter that uid 65534 may run (this one may live in root's 0700 home), or skip."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            out = subprocess.run(as_nobody([python, "-c", "import resilient_moe.procs"]), env={"PYTHONPATH": str(REPO)},
                                 capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            return python
    pytest.skip(f"no Python that uid {NOBODY} can run and that imports {REPO}/resilient_moe")


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None,
                    reason="needs root and setpriv (util-linux) to run processes as another uid (nobody)")
def test_harden_process_refuses_another_process_of_the_same_unprivileged_user():
    python = _python_for_nobody()
    env = {"PYTHONPATH": str(REPO), "MARKER": "not-for-others"}
    targets = {}
    try:
        for mode in ("harden", "control"):
            targets[mode] = subprocess.Popen(as_nobody([python, "-c", TARGET, mode]), stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True, env=env)
            assert targets[mode].stdout.readline().strip() == "ready", mode
        out = subprocess.run(as_nobody([python, "-c", PROBE, json.dumps([p.pid for p in targets.values()])]),
                             capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        seen = json.loads(out.stdout)
    finally:
        for p in targets.values():
            p.kill()
            p.wait()
    hardened, control = seen[str(targets["harden"].pid)], seen[str(targets["control"].pid)]
    assert control == {"environ": "ok", "mem": "ok", "fd": "ok"}, control  # the probe can read a plain process
    assert hardened == {"environ": "PermissionError", "mem": "PermissionError", "fd": "PermissionError"}, hardened
