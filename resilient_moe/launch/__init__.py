"""Launching a cluster: one launcher (launcher.py: every policy) over a backend (mechanism): local
processes from a fork server (local_backend.py, the default) or Ray actors across nodes (ray_backend.py)."""

from __future__ import annotations


def make_cluster(deployment, log_dir=None, fork_server=None, frontend=None):
    """The launcher over the backend `deployment.launcher` names, not started. `fork_server`: a running
    one the local backend shares (tests); Ray nodes hold their own. `frontend`: FrontendConfig of the
    deployment's frontend processes (none without it). Only a Ray deployment imports Ray."""
    from resilient_moe.launch.launcher import Launcher

    if deployment.launcher == "ray":
        try:
            from resilient_moe.launch.ray_backend import RayBackend
        except ImportError as e:
            from resilient_moe.errors import ClusterError

            raise ClusterError(f"launcher: ray needs Ray ({e}); install it with pip install 'resilient-moe[ray]'") from None
        return Launcher(deployment, RayBackend(deployment), log_dir, frontend)
    from resilient_moe.launch.local_backend import LocalBackend

    return Launcher(deployment, LocalBackend(deployment, fork_server), log_dir, frontend)
