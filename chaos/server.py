"""A `resilient-moe serve` started for one chaos run (when `run` is given no --url), and stopped after.

The server runs as a child process with a fresh admin token and a free port; its banner says where it
listens. It stops with SIGTERM (which stops its whole cluster), SIGKILL after a grace period, and it
dies with the tool (parent-death signal); the cluster's own parent-death chain makes sure no worker
outlives it either way.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
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
        command = [*self.command, "serve", "--port", "0", f"--admin-token={self.token}"]
        config = self._config()
        if config:
            command += ["--config", config]
        if self.log_dir:
            command += ["--log-dir", self.log_dir]
        command += list(self.cluster.args)
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        found = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self._tail.append(line.rstrip())
                match = _URL.search(line)
                if match and not self.url:
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
        return self

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

    def __enter__(self) -> "LaunchedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
