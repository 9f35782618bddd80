"""A chaos scenario: the workload to drive, the faults to inject on a timeline, and the assertions.

Everything is validated when the file is read, before a request is sent or a fault injected; an
error names the file, the field (`faults[2].duration_s`) and the bad value. Example:

    name: ew-crash
    workload:
      concurrency: 4            # closed loop: this many requests in flight (or `rate`: requests/s, Poisson)
      duration_s: 20            # requests start until then
      prompt_tokens: [8, 32]    # a number, or [min, max] drawn per request
      output_tokens: 48
      temperature: 0.0          # 0: greedy; otherwise seeded sampling (a seed per request)
      seed: 1
    faults:
      - {at_s: 5, fault: kill, target: ew-1}
      - {at_s: 10, fault: partition, target: aw-0->ew-2, duration_s: 2}
      - random: {start_s: 12, end_s: 18, every_s: [2, 4],
                 pick: [{fault: hang, target: "random:ew", duration_s: 1}]}
    assertions:
      max_stall_p99_s: 2.0
      zero_lost_requests: true
      zero_token_mismatches: true
      recovery_within_s: 15

Faults (`fault:`) and the fields each takes besides `at_s` and `target`:

    kill, terminate   SIGKILL / SIGTERM                      (interval_s with an every: target)
    hang              SIGSTOP, then SIGCONT after duration_s
    crash-loop        kill `count` times, each time its replacement is ready, `interval_s` apart at least
    slow              `hogs` CPU-busy processes pinned to the worker's core for duration_s
    node-kill         SIGKILL every process of one node in the same instant (a lost node); its target
                      is `node:ID` (the node's id, or its first characters) or `node-of:aw-0`
    frontend-kill     SIGKILL a frontend process (target fe-N, random:fe or every:fe; default random:fe):
                      its clients resume their streams at the other frontends
    supervisor-kill   SIGKILL the supervisor (`serve`); the cluster goes on serving, and when the tool
                      started the server itself the same serve command adopts it `restart_after_s` later
    delay             delay_ms (+ jitter_ms) on each frame of the links, for duration_s
    drop              lose drop_rate of the frames (resent after retransmit_ms), for duration_s
    partition         nothing crosses the links for duration_s

Targets: a worker id from the admin API (`aw-0`, `ew-2`), a service (`controller`, `kv-store`, `redis`),
`random:ew|aw|worker` (picked when injected, seeded), or `every:ew|aw|worker` (each in turn, `interval_s`
apart), or for a node-kill a node. Datapath faults also take a link, `aw-0->ew-1` (`*` for any side); a worker name there means all
of its links.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from resilient_moe.errors import ConfigError

PROCESS_FAULTS = ("kill", "terminate", "hang", "crash-loop", "slow", "node-kill", "frontend-kill", "supervisor-kill")
LINK_FAULTS = ("delay", "drop", "partition")
FAULTS = PROCESS_FAULTS + LINK_FAULTS
SERVICES = ("controller", "kv-store", "redis", "supervisor")
SELECTOR_ROLES = {"aw": ("attention",), "ew": ("expert",), "worker": ("attention", "expert"), "fe": ("frontend",)}

_NAME = r"[a-z][a-z0-9_.]*-[0-9]+"
_SELECTOR = re.compile(r"(random|every):(aw|ew|worker|fe)")
_LINK = re.compile(rf"({_NAME}|\*)->({_NAME}|\*)")
_WORKER = re.compile(_NAME)
_NODE = re.compile(rf"node:[A-Za-z0-9_.-]+|node-of:{_NAME}")

# Extra fields each fault accepts (at_s, fault, target are common), with defaults.
_FAULT_FIELDS: dict[str, dict[str, Any]] = {
    "kill": {"interval_s": 5.0},
    "terminate": {"interval_s": 5.0},
    "hang": {"duration_s": None, "interval_s": 5.0},
    "crash-loop": {"count": 3, "interval_s": 0.0},
    "node-kill": {},
    "frontend-kill": {"interval_s": 5.0},
    "supervisor-kill": {"restart_after_s": 2.0},
    "slow": {"duration_s": None, "hogs": 1, "interval_s": 5.0},
    "delay": {"duration_s": None, "delay_ms": 0.0, "jitter_ms": 0.0, "interval_s": 5.0},
    "drop": {"duration_s": None, "drop_rate": None, "retransmit_ms": 200.0, "interval_s": 5.0},
    "partition": {"duration_s": None, "interval_s": 5.0},
}


class ScenarioError(ConfigError):
    """A scenario file is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class Workload:
    concurrency: int | None  # closed loop (exactly one of concurrency and rate)
    rate: float | None  # open loop, requests per second
    duration_s: float
    prompt_tokens: tuple[int, int]  # [min, max]
    output_tokens: tuple[int, int]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = True
    request_timeout_s: float = 120.0
    token_ids: tuple[int, int] = (3, 256)  # prompt token ids are drawn from [min, max)


@dataclass(frozen=True)
class FaultSpec:
    """One fault on the timeline (a `random:` generator is expanded into these when read)."""

    at_s: float
    fault: str
    target: str
    where: str  # "faults[2]": for messages at run time
    duration_s: float = 0.0
    interval_s: float = 0.0
    count: int = 1
    hogs: int = 1
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    drop_rate: float = 0.0
    retransmit_ms: float = 200.0
    restart_after_s: float = 2.0

    @property
    def is_link_fault(self) -> bool:
        return self.fault in LINK_FAULTS

    def describe(self) -> str:
        extra = ""
        if self.fault == "delay":
            extra = f" {self.delay_ms:g}ms" + (f"±{self.jitter_ms:g}ms" if self.jitter_ms else "")
        elif self.fault == "drop":
            extra = f" {self.drop_rate:.0%}"
        elif self.fault == "crash-loop":
            extra = f" x{self.count}"
        elif self.fault == "slow":
            extra = f" x{self.hogs} hog" + ("s" if self.hogs > 1 else "")
        duration = f" for {self.duration_s:g}s" if self.duration_s else ""
        return f"{self.fault}{extra} {self.target}{duration}"


@dataclass(frozen=True)
class Assertions:
    max_stall_p99_s: float | None = None
    zero_lost_requests: bool = True
    zero_token_mismatches: bool = True
    recovery_within_s: float | None = None


@dataclass(frozen=True)
class ClusterSpec:
    """How to start a server when the run is given no --url: `resilient-moe serve` arguments."""

    config: str | None = None  # deployment YAML, relative to the scenario file
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    workload: Workload
    faults: tuple[FaultSpec, ...]
    assertions: Assertions = field(default_factory=Assertions)
    settle_timeout_s: float = 60.0  # how long to wait for a healthy cluster (before the run, before the replay)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    source: str = "scenario"

    def with_faults(self, faults: list[FaultSpec]) -> "Scenario":
        return replace(self, faults=tuple(sorted(faults, key=lambda f: f.at_s)))


# ---- reading ---------------------------------------------------------------------------------


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file."""
    import yaml

    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{source}: scenario file not found") from None
    except OSError as e:
        raise ScenarioError(f"{source}: cannot read ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ScenarioError(f"{source}: not valid YAML ({e})") from None
    return parse(raw, source=source, default_name=Path(path).stem, base_dir=Path(path).resolve().parent)


def parse(raw: Any, source: str = "scenario", default_name: str = "scenario", base_dir: Path | None = None) -> Scenario:
    """Validate a scenario given as plain data (what YAML gives); `cluster.config` is relative to
    `base_dir` (the scenario file's directory)."""
    top = _Object(raw, source, "")
    top.known("name", "description", "workload", "faults", "assertions", "settle_timeout_s", "cluster")
    workload = _workload(top.object("workload", required=True))
    faults: list[FaultSpec] = []
    for i, item in enumerate(top.list("faults")):
        entry = _Object(item, source, f"faults[{i}]")
        if "random" in entry.raw:
            entry.known("random")
            faults.extend(_random_faults(entry.object("random", required=True), workload))
        else:
            faults.append(_fault(entry, workload))
    assertions = _assertions(top.object("assertions"))
    cluster_raw = top.object("cluster")
    cluster = ClusterSpec()
    if cluster_raw is not None:
        cluster_raw.known("config", "args")
        args = cluster_raw.list("args")
        for i, a in enumerate(args):
            if not isinstance(a, (str, int, float)) or isinstance(a, bool):
                cluster_raw.fail(f"args[{i}]", f"must be a string, got {a!r}")
        config = cluster_raw.str("config", None)
        if config is not None and base_dir is not None and not Path(config).is_absolute():
            config = str(base_dir / config)
        cluster = ClusterSpec(config, tuple(str(a) for a in args))
    return Scenario(
        name=top.str("name", default_name),
        description=top.str("description", ""),
        workload=workload,
        faults=tuple(sorted(faults, key=lambda f: f.at_s)),
        assertions=assertions,
        settle_timeout_s=top.number("settle_timeout_s", 60.0, minimum=1.0),
        cluster=cluster,
        source=source,
    )


def _workload(w: "_Object") -> Workload:
    w.known("concurrency", "rate", "duration_s", "prompt_tokens", "output_tokens", "temperature", "top_p", "seed",
            "ignore_eos", "request_timeout_s", "token_ids")
    concurrency = w.int("concurrency", None, minimum=1, maximum=1024)
    rate = w.number("rate", None, minimum=0.0, exclusive=True)
    if (concurrency is None) == (rate is None):
        w.fail("", "give exactly one of concurrency (requests in flight) and rate (requests per second)")
    token_ids = w.range("token_ids", (3, 256), minimum=0)
    if token_ids[1] <= token_ids[0]:
        w.fail("token_ids", f"must be [min, max) with max > min, got {list(token_ids)}")
    return Workload(
        concurrency=concurrency,
        rate=rate,
        duration_s=w.number("duration_s", required=True, minimum=0.0, exclusive=True),
        prompt_tokens=w.range("prompt_tokens", (8, 32), minimum=1),
        output_tokens=w.range("output_tokens", (32, 64), minimum=1),
        temperature=w.number("temperature", 0.0, minimum=0.0, maximum=2.0),
        top_p=w.number("top_p", 1.0, minimum=0.0, maximum=1.0, exclusive=True),
        seed=w.int("seed", 0, minimum=0),
        ignore_eos=w.bool("ignore_eos", True),
        request_timeout_s=w.number("request_timeout_s", 120.0, minimum=0.0, exclusive=True),
        token_ids=token_ids,
    )


def _fault(entry: "_Object", workload: Workload, at_s: float | None = None) -> FaultSpec:
    kind = entry.str("fault", required=True)
    if kind not in FAULTS:
        entry.fail("fault", f"must be one of {', '.join(FAULTS)}, got {kind!r}")
    extra = _FAULT_FIELDS[kind]
    entry.known("at_s", "fault", "target", *extra)
    if at_s is None:
        at_s = entry.number("at_s", required=True, minimum=0.0)
        if at_s >= workload.duration_s:
            entry.fail("at_s", f"{at_s:g} is not before the workload ends (workload.duration_s {workload.duration_s:g})")
    defaults = {"frontend-kill": "random:fe", "supervisor-kill": "supervisor"}
    target = entry.str("target", required=kind not in defaults) or defaults.get(kind, "")
    _check_target(entry, kind, target)
    values: dict[str, Any] = {}
    for name, default in extra.items():
        required = default is None
        if name in ("count", "hogs"):
            values[name] = entry.int(name, default, minimum=1, maximum=1000 if name == "count" else 16)
        elif name == "drop_rate":
            values[name] = entry.number(name, default, required=required, minimum=0.0, maximum=1.0, exclusive=True)
        elif name == "duration_s":
            values[name] = entry.number(name, default, required=required, minimum=0.0, exclusive=True)
        else:
            values[name] = entry.number(name, default, minimum=0.0)
    if kind == "delay" and values["delay_ms"] == 0 and values["jitter_ms"] == 0:
        entry.fail("delay_ms", "a delay needs delay_ms > 0 or jitter_ms > 0")
    if "interval_s" in entry.raw and kind != "crash-loop" and not target.startswith("every:"):
        entry.fail("interval_s", f"only applies to an every: target or a crash-loop (target is {target!r})")
    return FaultSpec(at_s=at_s, fault=kind, target=target, where=entry.path, **values)


def _check_target(entry: "_Object", kind: str, target: str) -> None:
    selector = _SELECTOR.fullmatch(target)
    if kind == "frontend-kill":
        if (selector and selector.group(2) == "fe") or re.fullmatch(r"fe-[0-9]+", target):
            return
        entry.fail("target", f"a frontend-kill takes a frontend: fe-N, random:fe or every:fe; got {target!r}")
    if kind == "supervisor-kill":
        if target == "supervisor":
            return
        entry.fail("target", f"a supervisor-kill takes no target but the supervisor; got {target!r}")
    if kind == "node-kill":
        if _NODE.fullmatch(target):
            return
        entry.fail("target", f"a node-kill takes a node: node:ID (a node id, or its first characters) or "
                             f"node-of:WORKER (the node aw-0 runs on); got {target!r}")
    if _NODE.fullmatch(target):
        entry.fail("target", f"only a node-kill takes a node; a {kind} takes a worker")
    if kind in LINK_FAULTS:
        if (selector and selector.group(2) != "worker") or _WORKER.fullmatch(target) or _LINK.fullmatch(target):
            return
        entry.fail("target", f"a {kind} takes a link (aw-0->ew-1, *->ew-1), a worker (ew-1: all of its links), "
                             f"random:aw|ew or every:aw|ew; got {target!r}")
    if selector or _WORKER.fullmatch(target) or target in SERVICES:
        return
    entry.fail("target", f"a {kind} takes a worker id (aw-0, ew-2), a service ({', '.join(SERVICES)}), "
                         f"random:aw|ew|worker or every:aw|ew|worker; got {target!r}")


def _assertions(a: "_Object | None") -> Assertions:
    if a is None:
        return Assertions()
    a.known("max_stall_p99_s", "zero_lost_requests", "zero_token_mismatches", "recovery_within_s")
    return Assertions(
        max_stall_p99_s=a.number("max_stall_p99_s", None, minimum=0.0, exclusive=True),
        zero_lost_requests=a.bool("zero_lost_requests", True),
        zero_token_mismatches=a.bool("zero_token_mismatches", True),
        recovery_within_s=a.number("recovery_within_s", None, minimum=0.0, exclusive=True),
    )


def _random_faults(r: "_Object", workload: Workload) -> list[FaultSpec]:
    """Expand a soak generator into a concrete timeline (seeded by workload.seed: the same each run)."""
    r.known("start_s", "end_s", "every_s", "pick")
    start = r.number("start_s", 0.0, minimum=0.0)
    end = r.number("end_s", workload.duration_s, minimum=0.0)
    if end <= start:
        r.fail("end_s", f"must be after start_s ({start:g}), got {end:g}")
    if end > workload.duration_s:
        r.fail("end_s", f"{end:g} is after the workload ends (workload.duration_s {workload.duration_s:g})")
    gap = r.range("every_s", None, minimum=0.1, number=True, required=True)
    picks = r.list("pick", required=True)
    if not picks:
        r.fail("pick", "needs at least one fault to pick from")
    templates = []
    for i, item in enumerate(picks):
        entry = _Object(item, r.source, f"{r.path}.pick[{i}]")
        if "at_s" in entry.raw:
            entry.fail("at_s", "is chosen by the generator; leave it out")
        templates.append((entry, _fault(entry, workload, at_s=0.0)))
    rng = random.Random(workload.seed * 7919 + 17)
    out = []
    t = start + rng.uniform(*gap)
    while t < end:
        entry, template = rng.choice(templates)
        out.append(replace(template, at_s=round(t, 3), where=f"{entry.path} (at {t:.1f}s)"))
        t += template.duration_s + rng.uniform(*gap)
    return out


# ---- typed field access with errors that name the field ---------------------------------------


class _Object:
    def __init__(self, raw: Any, source: str, path: str) -> None:
        if not isinstance(raw, dict):
            where = path or "the top level"
            raise ScenarioError(f"{source}: {where}: expected a mapping of fields, got {_show(raw)}")
        self.raw = raw
        self.source = source
        self.path = path

    def fail(self, name: str, message: str):
        where = ".".join(p for p in (self.path, name) if p) or "the top level"
        raise ScenarioError(f"{self.source}: {where}: {message}")

    def known(self, *names: str) -> None:
        for key in self.raw:
            if key not in names:
                self.fail(str(key), f"unknown field (known here: {', '.join(names)})")

    def _get(self, name: str, default: Any, required: bool) -> Any:
        value = self.raw.get(name)
        if value is None:
            if required:
                self.fail(name, "is required")
            return default
        return value

    def object(self, name: str, required: bool = False) -> "_Object | None":
        value = self._get(name, None, required)
        if value is None:
            return None
        return _Object(value, self.source, ".".join(p for p in (self.path, name) if p))

    def list(self, name: str, required: bool = False) -> list:
        value = self._get(name, [], required)
        if not isinstance(value, list):
            self.fail(name, f"must be a list, got {_show(value)}")
        return value

    def str(self, name: str, default: Any = None, required: bool = False) -> Any:
        value = self._get(name, default, required)
        if value is not None and not isinstance(value, str):
            self.fail(name, f"must be a string, got {_show(value)}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        value = self._get(name, default, False)
        if not isinstance(value, bool):
            self.fail(name, f"must be true or false, got {_show(value)}")
        return value

    def number(self, name: str, default: Any = None, required: bool = False, minimum: float | None = None,
               maximum: float | None = None, exclusive: bool = False) -> Any:
        value = self._get(name, default, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(name, f"must be a number, got {_show(value)}")
        if minimum is not None and (value < minimum or (exclusive and value == minimum)):
            self.fail(name, f"must be {'>' if exclusive else '>='} {minimum:g}, got {value!r}")
        if maximum is not None and value > maximum:
            self.fail(name, f"must be <= {maximum:g}, got {value!r}")
        return float(value)

    def int(self, name: str, default: Any = None, minimum: int | None = None, maximum: int | None = None) -> Any:
        value = self._get(name, default, False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"must be an integer, got {_show(value)}")
        if minimum is not None and value < minimum:
            self.fail(name, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(name, f"must be <= {maximum}, got {value}")
        return value

    def range(self, name: str, default: Any, minimum: float, number: bool = False, required: bool = False) -> Any:
        """A value or [min, max] (integers unless `number`), as a (min, max) tuple."""
        value = self._get(name, default, required)
        if isinstance(value, tuple):
            return value
        kind = (int, float) if number else int
        noun = "number" if number else "integer"
        items = value if isinstance(value, list) else [value, value]
        if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, kind) for v in items):
            self.fail(name, f"must be an {noun} or [min, max], got {_show(value)}")
        lo, hi = items
        if lo < minimum:
            self.fail(name, f"must be >= {minimum:g}, got {_show(value)}")
        if hi < lo:
            self.fail(name, f"[min, max] needs min <= max, got {_show(value)}")
        return (lo, hi)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
