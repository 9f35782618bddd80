"""Launchers: every role as a local process (local.py, the default) or as Ray actors (ray_cluster.py)."""

from __future__ import annotations


def make_cluster(deployment, log_dir=None, fork_server=None):
    """The launcher `deployment.launcher` names, not started. Only a Ray deployment imports Ray."""
    if deployment.launcher == "ray":
        try:
            from resilient_moe.launch.ray_cluster import RayCluster
        except ImportError as e:
            from resilient_moe.errors import ClusterError

            raise ClusterError(f"launcher: ray needs Ray ({e}); install it with pip install 'resilient-moe[ray]'") from None
        return RayCluster(deployment, log_dir=log_dir, fork_server=fork_server)
    from resilient_moe.launch.local import LocalCluster

    return LocalCluster(deployment, log_dir=log_dir, fork_server=fork_server)
