"""The local launcher's process hygiene: nothing survives it, even a SIGKILL of the launcher itself."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

import pytest

from conftest import pid_alive, wait_until
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.errors import ConfigError


def _our_shm_entries() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if "rmoe" in n or "resilient" in n}


def test_sigkill_of_the_launcher_leaves_no_process_and_no_shared_memory(tiny_model):
    shm_before = _our_shm_entries()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "resilient_moe.launch", "--model", str(tiny_model), "--attention-workers", "2",
         "--expert-workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    pids: list[int] = []
    try:
        ready, _, _ = select.select([launcher.stdout], [], [], 120)
        assert ready, "the launcher did not report its cluster within 120s"
        info = json.loads(launcher.stdout.readline())
        pids = list(info["pids"].values())
        # controller, 2 expert workers, 2 attention workers, KV store, Redis, fork_server
        assert sorted(info["pids"]) == sorted(["controller", "ew-0", "ew-1", "aw-0", "aw-1", "kv-store", "redis",
                                               "fork_server"])
        assert all(pid_alive(p) for p in pids)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        # Rings and the KV store are memfds, freed with the last process that holds them: the real leak
        # check is that no process survives. Nothing may have left a named segment in /dev/shm either.
        wait_until(lambda: not any(pid_alive(p) for p in pids), 15, "every cluster process to die with the launcher")
        assert _our_shm_entries() == shm_before
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_orderly_stop_on_sigterm(tiny_model):
    launcher = subprocess.Popen(
        [sys.executable, "-m", "resilient_moe.launch", "--model", str(tiny_model), "--expert-workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    pids: list[int] = []
    try:
        ready, _, _ = select.select([launcher.stdout], [], [], 120)
        assert ready
        pids = list(json.loads(launcher.stdout.readline())["pids"].values())
        launcher.send_signal(signal.SIGTERM)
        # A hang catcher: stop() alone may take 5 s (workers' grace) + 2 s (controller) + 5 s (Redis) +
        # 10 s (fork server) on a loaded machine before the interpreter exits.
        assert launcher.wait(60) == 0
        assert not any(pid_alive(p) for p in pids)
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_baseline_restart_setting_is_checked():
    assert DeploymentConfig(baseline_restart="cold").baseline_restart == "cold"
    with pytest.raises(ConfigError, match="baseline_restart must be warm or cold"):
        DeploymentConfig(baseline_restart="parallel")
