"""The deployment: how many workers of each role, how they talk, how failures are detected
(`DeploymentConfig`, from YAML and CLI flags), and what one role process needs to start
(`WorkerConfig`). Read by the launcher, the workers, the controller and the server alike, so it sits low
in the stack; every error names the setting and the bad value.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from resilient_moe.engine.config import EngineConfig
from resilient_moe.errors import ConfigError

TRANSPORTS = ("shm", "tcp")
PLACEMENTS = ("contiguous", "round_robin")
LAUNCHERS = ("local", "ray")
# The most attention workers any deployment runs (a bound on what a request may ask for, not a size:
# the KV store makes a region per attention worker only when one comes; kvstore/memory_layout.py).
ATTENTION_WORKERS_LIMIT = 1024


@dataclass(frozen=True)
class DeploymentConfig:
    """A local cluster: how many workers of each role, how they talk, how failures are detected.

    Loaded from YAML (configs/*.yaml) and overridden by CLI flags; every field is validated here
    and errors name the field.
    """

    model: str = ""
    attention_workers: int = 1
    expert_workers: int = 2
    micro_batches: int = 2
    transport: str = "shm"
    placement: str = "contiguous"
    host: str = "127.0.0.1"
    engine: EngineConfig = field(default_factory=EngineConfig)
    ring_bytes: int = 16 << 20  # per direction per link
    heartbeat_interval_s: float = 0.05
    heartbeat_timeout_s: float = 1.0
    probe_interval_s: float = 0.010
    probe_misses: int = 3
    part_deadline_s: float = 0.25  # least time an expert worker gets to answer a part before it is resent
    startup_timeout_s: float = 120.0
    resilience: bool = True  # False: the restart-everything baseline (no shadows; any death restarts all)
    # How the baseline restarts: "warm" (the fair one) every worker at once, forked from the warm fork
    # server; "cold" (naive, for comparison) fresh interpreters, expert workers first, then attention.
    baseline_restart: str = "warm"
    shadow_budget_bytes: int | None = None  # spare memory per expert worker for shadows; None: one copy of each
    shadow_policy: str = "spread"  # or "load_aware" (EPLB-style: hot experts get more copies, copies share tokens)
    rebalance_interval_s: float = 0.0  # load_aware: re-place experts by observed load this often (0: on demand only)
    load_half_life_s: float = 30.0  # half-life of the controller's decayed per-expert load estimate
    expert_wait_s: float = 15.0  # longest a micro-batch waits for a replacement when an expert has no live copy
    # An optional cap on the attention workers /admin/scale may reach; None: no cap (the KV store grows a
    # region for each attention worker added, kvstore/memory_layout.py).
    max_attention_workers: int | None = None
    drain_timeout_s: float = 30.0  # longest a draining worker (or server) takes to finish or hand over its requests
    kv_checkpoint: bool = True  # checkpoint attention workers' KV into the KV store (needs Redis)
    # Reuse across attention workers: each names the full blocks it checkpoints under their prefix hash
    # (kvstore/prefix_index.py), and a new request whose prefix misses in its worker's prefix cache reads
    # those blocks from the KV store instead of computing them. Needs kv_checkpoint and the engine's
    # enable_prefix_caching; not for sliding-window models (the store keeps only their window).
    prefix_store: bool = True
    # Host memory of each KV store at the start: each attention worker's region is kv_store_bytes //
    # attention_workers, and a store grows by one region per attention worker added (allocated as written).
    kv_store_bytes: int = 256 << 20
    # KV store processes ("kv-store", "kv-store-1", ...); each serves its memory over TCP too. None: the
    # launcher's default: 1 locally; under Ray one on each worker node (at least kv_replicas + 1).
    kv_stores: int | None = None
    # Copies of each checkpoint in stores other than the writer's primary (another node's). None: the
    # launcher's default: 0 locally (the one store outlives any worker); 1 under Ray (it outlives a node).
    kv_replicas: int | None = None
    redis_url: str = ""  # "": the launcher starts a private redis-server when checkpointing is on
    log_level: str = "INFO"
    # "auto": each attention and expert worker runs on cores of its own (launch/cpus.py) with as many
    # torch and native GEMM threads as it has cores; "none": no pinning, engine.threads threads.
    cpu_affinity: str = "auto"
    # "local": every role as a process on this host (launch/local_backend.py); "ray": across the nodes of
    # a Ray cluster (launch/ray_backend.py, needs the `ray` extra). One launcher's policy for both.
    launcher: str = "local"
    ray_address: str = ""  # launcher ray: the cluster to join ("auto", "HOST:PORT"); "": start a local Ray instance
    # Frontend processes `serve` runs (each the HTTP API, a tokenizer and links to every attention worker,
    # all on one port: SO_REUSEPORT); 0: the API in the supervisor's own process (tests, debugging).
    frontends: int = 2
    # A request whose frontend died keeps decoding; nobody resumed it (Idempotency-Key) within this long:
    # it is aborted and its KV freed.
    resume_grace_s: float = 30.0
    # Roles (and their fork servers) exit by themselves when no supervisor renewed its lease in Redis
    # for this long; a new `serve` with the same address adopts the cluster meanwhile.
    supervisor_lease_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("attention_workers", "expert_workers", "probe_misses"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.micro_batches, int) or not 1 <= self.micro_batches <= 8:
            raise ConfigError(f"micro_batches must be an integer between 1 and 8, got {self.micro_batches!r}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if not isinstance(self.ring_bytes, int) or self.ring_bytes < (1 << 16):
            raise ConfigError(f"ring_bytes must be an integer >= 65536, got {self.ring_bytes!r}")
        for name in ("heartbeat_interval_s", "heartbeat_timeout_s", "probe_interval_s", "part_deadline_s",
                     "startup_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s})"
            )
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host must be a non-empty string, got {self.host!r}")
        if self.shadow_policy not in ("spread", "load_aware"):
            raise ConfigError(f"shadow_policy must be spread or load_aware, got {self.shadow_policy!r}")
        if not isinstance(self.frontends, int) or isinstance(self.frontends, bool) or not 0 <= self.frontends <= 64:
            raise ConfigError(f"frontends must be an integer between 0 and 64, got {self.frontends!r}")
        for name in ("load_half_life_s", "expert_wait_s", "drain_timeout_s", "resume_grace_s", "supervisor_lease_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        value = self.rebalance_interval_s
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"rebalance_interval_s must be a number of seconds >= 0, got {value!r}")
        if value > 0 and self.shadow_policy != "load_aware":
            raise ConfigError(f"rebalance_interval_s ({value}) needs shadow_policy: load_aware; the spread placement "
                              "does not depend on load, so there is nothing to rebalance")
        if self.attention_workers > ATTENTION_WORKERS_LIMIT:
            raise ConfigError(f"attention_workers must be at most {ATTENTION_WORKERS_LIMIT}, got {self.attention_workers}")
        value = self.max_attention_workers
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not self.attention_workers <= value <= ATTENTION_WORKERS_LIMIT):
            raise ConfigError(f"max_attention_workers must be empty (no cap) or an integer between attention_workers "
                              f"({self.attention_workers}) and {ATTENTION_WORKERS_LIMIT}, got {value!r}")
        if self.shadow_budget_bytes is not None and (
            not isinstance(self.shadow_budget_bytes, int) or self.shadow_budget_bytes < 0
        ):
            raise ConfigError(f"shadow_budget_bytes must be an integer >= 0, got {self.shadow_budget_bytes!r}")
        if not isinstance(self.kv_store_bytes, int) or isinstance(self.kv_store_bytes, bool) or self.kv_store_bytes < 1 << 20:
            raise ConfigError(f"kv_store_bytes must be an integer >= 1048576, got {self.kv_store_bytes!r}")
        if self.kv_replicas is None:
            object.__setattr__(self, "kv_replicas", 1 if self.launcher == "ray" else 0)
        if self.kv_stores is None:
            replicas = self.kv_replicas if isinstance(self.kv_replicas, int) else 0
            object.__setattr__(self, "kv_stores", replicas + 1 if self.launcher == "ray" else 1)
        for name, least in (("kv_stores", 1), ("kv_replicas", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.kv_replicas >= self.kv_stores:
            raise ConfigError(f"kv_replicas ({self.kv_replicas}) must be below kv_stores ({self.kv_stores}): a replica "
                              "is never kept in the writer's primary store")
        if not isinstance(self.redis_url, str) or (self.redis_url and not self.redis_url.startswith(
                ("redis://", "rediss://", "unix://"))):
            raise ConfigError(f"redis_url must be empty or a redis://, rediss:// or unix:// URL, got {self.redis_url!r}")
        for name in ("resilience", "kv_checkpoint", "prefix_store"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.baseline_restart not in ("warm", "cold"):
            raise ConfigError(f"baseline_restart must be warm or cold, got {self.baseline_restart!r}")
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if not isinstance(self.ray_address, str) or (self.ray_address and self.launcher != "ray"):
            raise ConfigError(f"ray_address ({self.ray_address!r}) needs launcher: ray")
        if self.cpu_affinity not in ("auto", "none"):
            raise ConfigError(f"cpu_affinity must be auto or none, got {self.cpu_affinity!r}")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> "DeploymentConfig":
        """Read a deployment YAML; keyword overrides (CLI flags, None = not given) win over the file."""
        import yaml

        source = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: deployment config not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML ({e})") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of settings at the top level")
        return cls.from_dict(raw, source=source, **overrides)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config", **overrides: Any) -> "DeploymentConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        values = dict(raw)
        engine_raw = values.pop("engine", None) or {}
        if not isinstance(engine_raw, dict):
            raise ConfigError(f"{source}: engine must be a mapping, got {engine_raw!r}")
        engine_known = set(EngineConfig.__dataclass_fields__)
        bad = sorted(set(engine_raw) - engine_known)
        if bad:
            raise ConfigError(f"{source}: unknown engine setting {bad[0]!r} (known: {', '.join(sorted(engine_known))})")
        values.update({k: v for k, v in overrides.items() if v is not None and k != "engine"})
        engine = EngineConfig(**engine_raw)
        if isinstance(overrides.get("engine"), EngineConfig):
            engine = overrides["engine"]
        try:
            return cls(engine=engine, **values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


ROLES = ("controller", "attention", "expert", "kv_store", "frontend")


@dataclass(frozen=True)
class FrontendConfig:
    """One frontend's HTTP tier: where it listens, what it serves, its limits (serve's flags). Every
    frontend of a cluster gets the same one; the admin token and API keys reach them inside it (never on a
    command line)."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = ""
    admin_token: str = ""
    api_keys: tuple[str, ...] = ()
    max_waiting: int = 256  # requests queued for admission; more get 429
    request_timeout_s: float = 120.0  # longest wait for a request's next token before it fails
    header_timeout_s: float = 10.0  # a connection that has not sent a whole request head by then is closed
    body_timeout_s: float = 30.0  # a request body not read whole by then: 408
    keepalive_s: float = 5.0  # an idle keep-alive connection is closed after this long
    max_connections: int = 1024  # open connections per frontend; more are answered 503 and closed
    idempotency_ttl_s: float = 3600.0  # how long a finished request stays resumable under its key

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ConfigError(f"port must be an integer in [0, 65536), got {self.port!r}")
        for name in ("request_timeout_s", "header_timeout_s", "body_timeout_s", "keepalive_s", "idempotency_ttl_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        for name, least in (("max_waiting", 0), ("max_connections", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")


@dataclass(frozen=True)
class WorkerConfig:
    """What one worker process needs to start: who it is, where the controller is, the deployment."""

    name: str  # "controller", "aw-0", "ew-2"
    role: str
    index: int
    cluster_id: str
    controller_address: str
    deployment: DeploymentConfig
    cpus: tuple[int, ...] = ()  # the cores it is pinned to (launch/cpus.py); () = not pinned
    node: str = ""  # its failure domain: the Ray node id (hex) on Ray; "": this host (its hostname)
    # The controller's only: where the launcher puts each worker ((name, node) pairs; empty: one node),
    # so that shadow copies land on other nodes than their primaries (controller/placement.py).
    worker_nodes: tuple[tuple[str, str], ...] = ()
    frontend: FrontendConfig | None = None  # a frontend's only

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        object.__setattr__(self, "cpus", tuple(self.cpus))
        object.__setattr__(self, "worker_nodes", tuple((str(w), str(n)) for w, n in self.worker_nodes))

    @property
    def threads(self) -> int:
        """Torch and native GEMM threads: one per pinned core, else the engine's setting."""
        return len(self.cpus) if self.cpus else self.deployment.engine.threads

    def to_json(self) -> str:
        import dataclasses

        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerConfig":
        raw = json.loads(text)
        deployment = DeploymentConfig.from_dict(raw.pop("deployment"))
        frontend = raw.pop("frontend", None)
        return cls(deployment=deployment, frontend=FrontendConfig(**frontend) if frontend else None, **raw)
