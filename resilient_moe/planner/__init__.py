"""Deployment-plan search (`resilient-moe plan`), after MegaScale-Infer's Algorithm 1, aware of failures.

- hardware.py: accelerator specs with the source of every figure, prices the user may override, and
  this CPU host as its profile measured it.
- shape.py: what the plan needs of a model's architecture (parameter bytes per side, KV bytes, FLOPs).
- timing.py: T_a, T_e and T_c of one micro-batch, fitted to a profile (this host) or from a roofline
  (hardware you cannot measure here). Pure.
- search.py: the search over worker counts, parallelism, micro-batches and batch size under memory,
  SLO and failure constraints. Pure: values in, values out.
- profile.py: the only part that runs workers: measures this host and fits timing's coefficients.
- output.py: the ranked table, JSON, the plot, the deployment YAML and --explain.
- command.py: `resilient-moe plan`, gluing the above together.
"""

from resilient_moe.errors import ConfigError


class PlanError(ConfigError):
    """Bad input to the planner, or a request no plan can meet (exit status 2); the message names the
    binding constraint."""
