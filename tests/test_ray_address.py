"""`--ray-address` against a Ray cluster started the way operators start one: `ray start --head` and
`ray start --address` as separate processes (here three nodes on this host, on loopback, with Ray's
token authentication), not `ray.cluster_utils`. `resilient-moe generate --launcher ray` joins it and
gives the same tokens as the colocated engine.

Loopback only: the head listens on 127.0.0.1, and a joining node is kept from swapping that address
for the host's own (Ray does so for any "localhost" address when multi-node clusters are enabled) by
a wrapper around Ray's CLI. Every process of the test cluster is ended by PID afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import pid_alive

pytest.importorskip("ray")

JOIN = ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
        "from ray.scripts.scripts import main; sys.argv = ['ray'] + sys.argv[1:]; main()")


def _cluster_pids(temp_dir: str) -> list[int]:
    """Every process whose command line names this cluster's temp directory (its raylets, GCS, workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if temp_dir.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture
def ray_started(tmp_path):
    # Ray's socket paths (temp_dir/session_<time>_<pid>/sockets/plasma_store) must fit AF_UNIX's 107 bytes;
    # pytest's tmp_path grows with its run number, so the cluster gets a short directory of its own
    temp_dir = tempfile.mkdtemp(prefix="rmoe-ray-", dir="/tmp")
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    loopback = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        subprocess.run(["ray", "start", "--head", "--port=0", "--include-dashboard=false", *common], env=loopback,
                       check=True, capture_output=True, timeout=120)
        with open(os.path.join(temp_dir, "ray_current_cluster")) as f:
            address = f.read().strip()
        for _ in range(2):
            subprocess.run([sys.executable, "-c", JOIN, "start", f"--address={address}", *common],
                           env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}, check=True, capture_output=True,
                           timeout=120)
        yield address, loopback
    finally:
        for _ in range(20):  # bounded: processes a raylet starts while being stopped are caught next round
            pids = [p for p in _cluster_pids(temp_dir) if p != os.getpid()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        survivors = [p for p in _cluster_pids(temp_dir) if pid_alive(p)]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, "a process of the test Ray cluster survived"


def test_generate_joins_a_cluster_started_with_ray_start(ray_started, tiny_model):
    address, env = ray_started
    args = ["--model", str(tiny_model), "--prompt-ids", "1,5,9,13", "--prompt-ids", "1,7,7", "--max-tokens", "8",
            "--json"]
    local = subprocess.run(["resilient-moe", "generate", *args], capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    joined = subprocess.run(["resilient-moe", "generate", *args, "--launcher", "ray", "--ray-address", address,
                             "--attention-workers", "1", "--expert-workers", "2"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert [r["token_ids"] for r in json.loads(joined.stdout)] == [r["token_ids"] for r in json.loads(local.stdout)]
