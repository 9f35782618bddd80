"""A `resilient-moe serve` started for one chaos run (when `run` is given no --url), and stopped after.

The server runs as a child process with a fresh admin token and a free port of its own (so that the
same command run again after a supervisor-kill adopts the cluster: `restart`); its banner says where it
listens. It stops with SIGTERM (which stops its whole cluster), SIGKILL after a grace period, and it
dies with the tool (parent-death signal); a cluster whose supervisor died stops by itself once its
lease lapses, so no worker outlives it for long either way.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import yaml

from chaos.injectors import die_with_parent
from chaos.scenario import ClusterSpec
from resilient_moe.errors import ResilientMoeError

_URL = re.compile(r"OpenAI API\s+(http://\S+)/v1")


class ServerError(ResilientMoeError):
    """The server did not start; the message has the end of its output."""


class LaunchedServer:
    """`resilient-moe serve --port 0` with the scenario's arguments; `url` and `token` once started."""

    def __init__(self, cluster: ClusterSpec, resilience: bool | None = None, startup_timeout_s: float = 300.0,
                 log_dir: str | None = None, command: list[str] | None = None) -> None:
        """`command`: what runs `resilient-moe` (default: this Python's resilient_moe.cli)."""
        self.cluster = cluster
        self.command = command or [sys.executable, "-m", "resilient_moe.cli"]
        self.resilience = resilience
        self.startup_timeout_s = startup_timeout_s
        self.log_dir = log_dir
        self.token = secrets.token_urlsafe(18)
        self.url = ""
        self.proc: subprocess.Popen | None = None
        self._tail: deque[str] = deque(maxlen=40)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._tmp_state: tempfile.TemporaryDirectory | None = None
        self.port = 0
        self.serve_command: list[str] = []
        self._starter: concurrent.futures.ThreadPoolExecutor | None = None

    def _config(self) -> str | None:
        """The deployment YAML to pass, with `resilience` overridden when asked."""
        if self.resilience is None:
            return self.cluster.config
        raw = {}
        if self.cluster.config:
            try:
                raw = yaml.safe_load(Path(self.cluster.config).read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as e:
                raise ServerError(f"cannot read the deployment config {self.cluster.config}: {e}") from None
        raw["resilience"] = self.resilience
        self._tmp = tempfile.TemporaryDirectory(prefix="rmoe-chaos-")
        path = Path(self._tmp.name) / "deployment.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    def start(self) -> "LaunchedServer":
        with socket.socket() as s:  # a port of its own (not 0): the same command again adopts the cluster
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._tmp_state = tempfile.TemporaryDirectory(prefix="rmoe-chaos-state-")
        command = [*self.command, "serve", "--port", str(self.port), f"--admin-token={self.token}",
                   "--state-dir", self._tmp_state.name]
        config = self._config()
        if config:
            command += ["--config", config]
        if self.log_dir:
            command += ["--log-dir", self.log_dir]
        command += list(self.cluster.args)
        self.serve_command = command
        self._launch()
        return self

    def restart(self) -> None:
        """Run the same serve command again (its predecessor was killed): it adopts the running cluster.
        Started from a thread of its own that lives as long as this object: the parent-death signal
        fires when the *thread* that started a process ends, and the caller's (a fault's) soon does."""
        if self._starter is None:
            self._starter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="serve-starter")
        self._starter.submit(self._launch).result()

    def _launch(self) -> None:
        command = self.serve_command
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        found = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self._tail.append(line.rstrip())
                match = _URL.search(line)
                if match:
                    self.url = match.group(1)
                    found.set()

        threading.Thread(target=read, name="serve-output", daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not found.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with code {self.proc.returncode}" if self.proc.poll() is not None else \
                    f"did not start within {self.startup_timeout_s:g}s"
                self.stop()
                raise ServerError(f"resilient-moe serve {why}:\n" + "\n".join(self._tail))

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self._tmp_state is not None:
            self._tmp_state.cleanup()
            self._tmp_state = None
        if self._starter is not None:
            self._starter.shutdown(wait=False)
            self._starter = None

    def __enter__(self) -> "LaunchedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
