"""Profiles of this host: the only part of the planner that runs workers.

`profile_host` starts real clusters of one attention worker and one expert worker (as `serve` would:
KV checkpoints on, workers pinned to cores of their own), keeps a decode load running for a short
window per point and reads the workers' heartbeat counters (`pipeline_times`, which
benchmarks/bench_pipeline.py reads too). From the points it fits timing.FittedHost's coefficients by
non-negative least squares, and stores them with the points and the host they were measured on
(`save`/`load`: a small JSON beside the model, or where --profile-path says).

Which point pins which coefficient: batches 1..64 at m = 1 give T_a against b and T_e against the
experts that get rows (few at batch 1, all of them from batch ~16); a longer prompt gives T_a's
context term; m = 2 tells the per-step overhead from the per-micro-batch one, and how late pipelined
replies come back; the TCP cluster gives the second transport's T_c against bytes; two workers on every
core (small hosts only) how much sharing a core slows them beyond taking turns. simulate.py composes
these into a step.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from resilient_moe.planner import PlanError
from resilient_moe.planner.shape import ModelShape
from resilient_moe.planner.timing import FittedHost, LinkFit, active_experts, precision_bytes

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
PROFILE_NAME = "resilient_moe_profile.json"


# ---- reading the workers' counters ------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineTimes:
    """Stage times over a window between two cluster states, from the workers' heartbeat counters.

    T_a: attention-side time per micro-batch per sparse layer (AW step time not spent waiting for
    experts, per expert call). T_e: an expert worker's time per frame (compute + reply). T_c: the mean
    frame round trip minus T_e. `aw_busy_per_step`: AW wall time not spent waiting, per step (includes
    what happens between steps: publishing, checkpoint copies)."""

    T_a: float
    T_e: float
    T_c: float
    aw_idle: float
    ew_idle: float
    steps: float
    wall_s: float
    aw_busy_per_step: float
    step_s: float  # wall time per step of the attention workers

    def to_json(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _load(state, name: str) -> dict[str, float]:
    return next((dict(w.load) for w in state.workers if w.name == name), {})


def pipeline_times(before, after, attention: list[str], experts: list[str]) -> PipelineTimes:
    """Stage times between two ClusterState snapshots (before, after) of a running decode load."""

    def delta(name: str, key: str) -> float:
        return _load(after, name).get(key, 0.0) - _load(before, name).get(key, 0.0)

    def total(names: list[str], key: str) -> float:
        return sum(delta(n, key) for n in names)

    wall = max(1e-9, total(attention, "uptime_s") / len(attention))
    step_s, wait_s = total(attention, "step_s"), total(attention, "expert_wait_s")
    calls = max(1.0, total(attention, "expert_calls"))
    frames = max(1.0, total(attention, "frames_answered"))
    ew_frames = max(1.0, total(experts, "frames"))
    ew_busy = [delta(n, "busy_s") for n in experts]
    t_e = sum(ew_busy) / ew_frames
    rtt = total(attention, "round_trip_s") / frames
    steps = max(1.0, total(attention, "steps"))
    return PipelineTimes(
        T_a=(step_s - wait_s) / calls, T_e=t_e, T_c=max(0.0, rtt - t_e), aw_idle=wait_s / (wall * len(attention)),
        ew_idle=1 - sum(ew_busy) / len(experts) / wall, steps=steps, wall_s=wall,
        aw_busy_per_step=(wall * len(attention) - wait_s) / steps, step_s=wall * len(attention) / steps)


# ---- measuring the host itself ----------------------------------------------------------------------------


def _tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of process `root` and every descendant alive now."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return total


class ForeignLoad:
    """How much of the host's CPU others used over a window: busy time from /proc/stat minus what this
    process and its descendants (the workers it started) used, as a share of every core. A profile or a
    benchmark taken while others load the host measures less than the host can do."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat", encoding="ascii") as f:
            cpu = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(cpu) - cpu[3] - cpu[4]) / tick  # all but idle and iowait
        return time.monotonic(), busy, _tree_cpu_seconds(os.getpid())

    def share(self) -> float:
        """Others' CPU share since this object was made (0: none; 1: every core, all the time)."""
        now = self._sample()
        wall = max(1e-9, now[0] - self.start[0])
        others = (now[1] - self.start[1]) - (now[2] - self.start[2])
        return max(0.0, others / (wall * len(os.sched_getaffinity(0))))



def measure_host(seconds: float = 0.6) -> dict[str, Any]:
    """Cores, memory, one core's float32 GEMM rate (times the cores: the FMA peak the host reaches) and a
    STREAM-like triad bandwidth, each measured for a fraction of a second."""
    import torch

    cores = len(os.sched_getaffinity(0))
    memory = 0
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = torch.randn(512, 512)
        b = torch.randn(512, 512)
        torch.mm(a, b)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            torch.mm(a, b)
            n += 1
        gemm = 2 * 512 ** 3 * n / (time.perf_counter() - start)
        torch.set_num_threads(cores)
        x, y, z = (torch.empty(8 << 20, dtype=torch.float64) for _ in range(3))  # 64 MiB each
        y.fill_(1.0)
        z.fill_(2.0)
        torch.add(y, z, alpha=3.0, out=x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            torch.add(y, z, alpha=3.0, out=x)  # triad: two arrays read, one written
            n += 1
        stream = 3 * x.numel() * 8 * n / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {"hostname": socket.gethostname(), "cpu": cpu, "cores": cores, "memory_bytes": memory,
            "fma_flops": gemm * cores, "stream_bw": stream, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


# ---- the profile run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfilePoint:
    """One measured operating point."""

    transport: str
    micro_batches: int
    attention_workers: int
    expert_workers: int
    batch: int
    prompt_len: int
    context: float  # mean context over the window
    times: PipelineTimes
    foreign_load: float = 0.0  # others' share of the host's CPU over the window (ForeignLoad)

    def to_json(self) -> dict[str, Any]:
        return {"transport": self.transport, "micro_batches": self.micro_batches,
                "attention_workers": self.attention_workers, "expert_workers": self.expert_workers,
                "batch": self.batch, "prompt_len": self.prompt_len, "context": self.context,
                "foreign_load": self.foreign_load, **self.times.to_json()}


@dataclass(frozen=True)
class ProfileRun:
    """One cluster of the profile and the (batch, prompt length) points measured on it. `shared`: as
    many attention and as many expert workers as the host has cores, so every core runs two workers
    (run only on hosts of at most 4 cores; elsewhere sharing is not measured and costs nothing extra)."""

    transport: str
    micro_batches: int
    points: tuple[tuple[int, int], ...]
    shared: bool = False


@dataclass(frozen=True)
class ProfileSettings:
    """What to measure, one cluster per run. Each point decodes for at least `window_s` and `min_steps`
    steps, at most `max_window_s`."""

    runs: tuple[ProfileRun, ...] = (
        ProfileRun("shm", 1, ((1, 16), (2, 16), (4, 16), (8, 16), (16, 16), (32, 16), (64, 16), (16, 320))),
        ProfileRun("shm", 2, ((8, 16), (32, 16), (64, 16))),
        ProfileRun("tcp", 1, ((1, 16), (16, 16), (64, 16))),
        ProfileRun("shm", 1, ((32, 16), (64, 16)), shared=True),
    )
    window_s: float = 1.0
    min_steps: int = 24
    max_window_s: float = 6.0
    dtype: str = "float32"
    max_model_len: int = 768
    # A point measured while others used more than this share of the host's CPU is measured again
    # (at most `retries` times; the least disturbed measurement is kept).
    max_foreign_load: float = 0.2
    retries: int = 2

    @classmethod
    def quick(cls, batches: list[int]) -> "ProfileSettings":
        """A short profile: the given batches at m = 1 (shm, one of them also with a longer prompt and at
        m = 2), the smallest and largest over TCP, the largest on shared cores."""
        batches = sorted(set(batches))
        mid = batches[len(batches) // 2]
        return cls(runs=(
            ProfileRun("shm", 1, tuple((b, 16) for b in batches) + ((mid, 160),)),
            ProfileRun("shm", 2, tuple((b, 16) for b in batches if b >= 2)),
            ProfileRun("tcp", 1, ((batches[0], 16), (batches[-1], 16))),
            ProfileRun("shm", 1, ((max(2, batches[-1]), 16),), shared=True),
        ), window_s=0.5, min_steps=12, max_window_s=3.0, max_model_len=512)


SHARED_PROFILE_MAX_CORES = 4


def profile_host(model_dir: str | Path, settings: ProfileSettings = ProfileSettings(),
                 say: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Measure this host running `model_dir` and return the profile (see `fit` for its "fit")."""
    import torch

    from resilient_moe.deployment import DeploymentConfig
    from resilient_moe.engine.config import EngineConfig, SamplingParams
    from resilient_moe.launch import make_cluster
    from resilient_moe.model.config import ModelConfig
    from resilient_moe.server.frontend import Frontend

    cfg = ModelConfig.from_pretrained(model_dir)
    shape = ModelShape.from_config(cfg)
    largest = max(b for run in settings.runs for b, _ in run.points)
    longest = max(p for run in settings.runs for _, p in run.points)
    if longest + 32 > settings.max_model_len:
        raise PlanError(f"profile prompts of {longest} tokens need max_model_len above {longest + 32}")
    say("measuring this host (GEMM rate, memory bandwidth)")
    host = measure_host()
    points: list[ProfilePoint] = []
    generator = torch.Generator().manual_seed(0)
    vocab = min(cfg.vocab_size, 4096)
    for run in settings.runs:
        workers = host["cores"] if run.shared else 1
        if run.shared and (host["cores"] > SHARED_PROFILE_MAX_CORES or workers > shape.num_experts):
            continue
        dep = DeploymentConfig(model=str(model_dir), attention_workers=workers, expert_workers=workers,
                               micro_batches=run.micro_batches, transport=run.transport, engine=EngineConfig(
                                   dtype=settings.dtype, max_num_seqs=largest, max_model_len=settings.max_model_len))
        names = ([f"aw-{i}" for i in range(workers)], [f"ew-{j}" for j in range(workers)])
        say(f"profiling {workers} AW + {workers} EW, {run.transport}, m={run.micro_batches}: starting the cluster")
        cluster = make_cluster(dep)
        cluster.start()
        try:
            frontend = Frontend(cluster.controller_address).start()
            try:
                warm = frontend.submit([3, 4, 5], SamplingParams(max_tokens=4, ignore_eos=True))
                warm.wait(120)
                for batch, prompt_len in run.points:
                    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=generator).tolist()
                    tries = []
                    for _ in range(1 + settings.retries):
                        load = ForeignLoad()
                        times, context = _window(cluster, frontend, prompts, settings, dep.heartbeat_interval_s,
                                                 *names)
                        tries.append(ProfilePoint(run.transport, run.micro_batches, workers, workers, batch,
                                                  prompt_len, context, times, load.share()))
                        if tries[-1].foreign_load <= settings.max_foreign_load:
                            break
                    points.append(min(tries, key=lambda p: p.foreign_load))
                    say(f"  batch {batch:>3} prompt {prompt_len:>3}: T_a {1e3 * times.T_a:.3f} ms, T_e "
                        f"{1e3 * times.T_e:.3f} ms, T_c {1e3 * times.T_c:.3f} ms, step {1e3 * times.step_s:.2f} ms "
                        f"(others' CPU {points[-1].foreign_load:.0%})")
            finally:
                frontend.close()
        finally:
            cluster.stop()
    profile = {
        "version": PROFILE_VERSION, "model": model_identity(model_dir, cfg), "host": host,
        "settings": {"dtype": settings.dtype, "cores_per_worker": _cores_per_worker(host["cores"]),
                     "kv_checkpoint": True, "window_s": settings.window_s},
        "points": [p.to_json() for p in points],
    }
    profile["fit"] = fit(shape, profile)
    return profile


def _cores_per_worker(cores: int) -> int:
    from resilient_moe.launch.cpus import cpu_plan

    return len(cpu_plan(list(range(cores)), ["aw-0", "ew-0"])["aw-0"])


def _window(cluster, frontend, prompts: list[list[int]], settings: ProfileSettings, heartbeat_s: float,
            attention: list[str], experts: list[str]) -> tuple[PipelineTimes, float]:
    """Run `prompts` as a decode load; the counters over `window_s` once every one of them decodes."""
    from resilient_moe.engine.config import SamplingParams

    longest = max(len(p) for p in prompts)
    params = SamplingParams(max_tokens=settings.max_model_len - longest - 1, ignore_eos=True)
    handles = [frontend.submit(p, params) for p in prompts]
    try:
        deadline = time.monotonic() + 300
        while not all(h.tokens for h in handles):
            if time.monotonic() > deadline or any(h.done for h in handles):
                raise PlanError("profile: the load did not start decoding within 300 s")
            time.sleep(0.01)
        time.sleep(3 * heartbeat_s)  # the next heartbeat counts decode steps only
        before, tokens_before = cluster.state(), sum(len(h.tokens) for h in handles)
        first, start = min(len(h.tokens) for h in handles), time.monotonic()
        # Counters move at step ends (and waits within steps), so a window of many steps keeps the
        # error of cutting one in two small.
        while True:
            time.sleep(heartbeat_s)
            elapsed, steps = time.monotonic() - start, min(len(h.tokens) for h in handles) - first
            if (elapsed >= settings.window_s and steps >= settings.min_steps) or elapsed >= settings.max_window_s:
                break
        time.sleep(2 * heartbeat_s)
        after, tokens_after = cluster.state(), sum(len(h.tokens) for h in handles)
        if any(h.done for h in handles):
            raise PlanError("profile: a request finished inside its window (max_model_len too small for it)")
    finally:
        for h in handles:
            frontend.abort(h.request_id)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the AWs forget the aborted requests before the next point
        state = cluster.state()
        if all(_load(state, a).get("running", 1.0) == 0.0 for a in attention):
            break
        time.sleep(heartbeat_s)
    context = sum(len(p) for p in prompts) / len(prompts) + (tokens_before + tokens_after) / (2 * len(prompts))
    return pipeline_times(before, after, attention, experts), context


# ---- fitting ----------------------------------------------------------------------------------------------


def _nnls(rows: list[list[float]], y: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0: the best of the unconstrained fits over each subset
    of columns whose solution is non-negative (few columns, so trying every subset is cheap)."""
    import numpy as np

    A, b = np.asarray(rows, dtype=float), np.asarray(y, dtype=float)
    scale = np.maximum(np.abs(A).max(axis=0), 1e-30)  # columns differ by orders of magnitude
    best, best_err = np.zeros(A.shape[1]), float(np.sum(b ** 2))
    for k in range(1, A.shape[1] + 1):
        for cols in itertools.combinations(range(A.shape[1]), k):
            sub = A[:, cols] / scale[list(cols)]
            x, *_ = np.linalg.lstsq(sub, b, rcond=None)
            if (x < 0).any():
                continue
            err = float(np.sum((sub @ x - b) ** 2))
            if err < best_err - 1e-18:
                best_err, best = err, np.zeros(A.shape[1])
                best[list(cols)] = x / scale[list(cols)]
    return [float(v) for v in best]


def fit(shape: ModelShape, profile: dict[str, Any]) -> dict[str, Any]:
    """FittedHost's coefficients from the profile's points, with each fit's mean relative error."""
    points = profile["points"]
    alone = [p for p in points if p.get("attention_workers", 1) == 1 and p.get("expert_workers", 1) == 1]
    L, K, E = shape.sparse_layers, shape.top_k, shape.num_experts
    wb = precision_bytes(profile["settings"]["dtype"])

    def n_of(p: dict) -> float:
        return p["batch"] / p["micro_batches"]

    # Step 1: attention side, per step: s0 + L·m·a0 + L·B·a1 + L·B·ctx·a2 (one AW on its own core).
    rows = [[1.0, L * p["micro_batches"], L * p["batch"], L * p["batch"] * p["context"]] for p in alone]
    s0, a0, a1, a2 = _nnls(rows, [p["aw_busy_per_step"] for p in alone])
    # Step 2: expert side, per frame of n = B / m tokens: f0 + c0·(experts with rows) + c1·rows.
    rows = [[1.0, active_experts(n_of(p), E, K, E), n_of(p) * K] for p in alone]
    f0, c0, c1 = _nnls(rows, [p["T_e"] for p in alone])
    # Step 3: each transport's T_c against the bytes one way, from m = 1 only (with more micro-batches
    # the round trip includes the wait behind another micro-batch at the expert worker).
    links = {}
    for transport in sorted({p["transport"] for p in alone}):
        chosen = [p for p in alone if p["transport"] == transport and p["micro_batches"] == 1]
        latency, per_byte = _nnls([[1.0, n_of(p) * K * shape.hidden * wb] for p in chosen], [p["T_c"] for p in chosen])
        links[transport] = {"latency_s": latency, "s_per_byte": per_byte}
    out = {"a0": a0, "a1": a1, "a2": a2, "s0": s0, "f0": f0, "c0": c0, "c1": c1, "links": links,
           "pipeline_lag_s": 0.0, "sharing_slowdown": 1.0}
    # Step 4: what the simulated step needs beyond the stage times, each solved for per point (the step
    # grows with both) and the median kept: the lag of pipelined replies (m >= 2), then the slowdown of
    # workers sharing a core.
    cores = int(profile["host"]["cores"])
    pipelined = [p for p in alone if p["micro_batches"] > 1 and p["transport"] == "shm"]
    out["pipeline_lag_s"] = _median([_solve(shape, profile, out, p, cores, "pipeline_lag_s", 0.0, 0.05)
                                     for p in pipelined], 0.0)
    shared = [p for p in points if p not in alone]
    out["sharing_slowdown"] = _median([_solve(shape, profile, out, p, cores, "sharing_slowdown", 1.0, 4.0)
                                       for p in shared], 1.0)
    times = fitted_times(shape, {**profile, "fit": out})
    err_a = [abs(s0 + L * p["micro_batches"] * times.attention(n_of(p), p["context"]) - p["aw_busy_per_step"])
             / p["aw_busy_per_step"] for p in alone]
    err_e = [abs(times.expert(n_of(p), E) - p["T_e"]) / p["T_e"] for p in alone if p["T_e"] > 0]
    err_s = [abs(_simulated_step(shape, profile, out, p, cores) - p["step_s"]) / p["step_s"] for p in points]
    out["mean_relative_error"] = {"attention": sum(err_a) / len(err_a), "expert": sum(err_e) / max(1, len(err_e)),
                                  "step": sum(err_s) / max(1, len(err_s))}
    return out


def _median(values: list[float], default: float) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else default


def _simulated_step(shape: ModelShape, profile: dict[str, Any], coefficients: dict[str, Any], p: dict,
                    cores: int) -> float:
    """The step time the plan would predict for profile point p."""
    from resilient_moe.planner.hardware import HOST
    from resilient_moe.planner.search import Layout, PlanRequest, Side, evaluate
    from resilient_moe.planner.hardware import host_accelerator

    times = fitted_times(shape, {**profile, "fit": coefficients})
    side = Side(HOST, host_accelerator(profile["host"]), times, cores=cores)
    n_a, n_e = p.get("attention_workers", 1), p.get("expert_workers", 1)
    context = max(2, round(p["context"]))
    req = PlanRequest(context=context, prompt_len=context, survive=0, transport=p["transport"],
                      max_batch_per_worker=max(1, p["batch"]))
    c = evaluate(shape, {HOST: side}, req, Layout(HOST, HOST, 1, 1, n_a, n_e, p["micro_batches"]), p["batch"] / n_a)
    return c.timing.tpot_s


def _solve(shape: ModelShape, profile: dict[str, Any], coefficients: dict[str, Any], p: dict, cores: int,
           name: str, lo: float, hi: float) -> float:
    """The value of coefficient `name` in [lo, hi] at which the simulated step of p is its measured one."""
    def step(value: float) -> float:
        return _simulated_step(shape, profile, {**coefficients, name: value}, p, cores)

    if step(lo) >= p["step_s"]:
        return lo
    if step(hi) <= p["step_s"]:
        return hi
    for _ in range(30):
        mid = (lo + hi) / 2
        if step(mid) < p["step_s"]:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def fitted_times(shape: ModelShape, profile: dict[str, Any]) -> FittedHost:
    f = profile["fit"]
    links = {t: LinkFit(v["latency_s"], v["s_per_byte"]) for t, v in f["links"].items()}
    return FittedHost(shape, f["a0"], f["a1"], f["a2"], f["s0"], f["f0"], f["c0"], f["c1"], links,
                      cores=int(profile["settings"]["cores_per_worker"]), dtype=profile["settings"]["dtype"],
                      pipeline_lag_s=float(f.get("pipeline_lag_s", 0.0)),
                      sharing_slowdown=float(f.get("sharing_slowdown", 1.0)))


# ---- storing --------------------------------------------------------------------------------------------


def model_identity(model_dir: str | Path, cfg=None) -> dict[str, str]:
    """Which model a profile is of: its directory and a hash of its config.json."""
    text = (Path(model_dir) / "config.json").read_bytes()
    return {"dir": str(Path(model_dir).resolve()), "config_sha256": hashlib.sha256(text).hexdigest()}


def default_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / PROFILE_NAME


def save(profile: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    try:
        path.write_text(json.dumps(profile, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        raise PlanError(f"cannot write the profile to {path} ({e.strerror or e})") from None
    return path


_REQUIRED_FIT = ("a0", "a1", "a2", "s0", "f0", "c0", "c1", "links")


def load(path: str | Path, model_dir: str | Path | None = None) -> dict[str, Any]:
    """Read a profile; a missing, unreadable or malformed file, or one of another model, is a PlanError."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"no profile at {path}: run `resilient-moe plan --model DIR --profile` on this host first "
                        "(or give --profile-path)")
    try:
        profile = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PlanError(f"{path}: not a readable profile ({e})") from None
    if not isinstance(profile, dict) or profile.get("version") != PROFILE_VERSION:
        raise PlanError(f"{path}: not a version-{PROFILE_VERSION} profile")
    try:
        f, host, settings = profile["fit"], profile["host"], profile["settings"]
        numbers = [f[k] for k in _REQUIRED_FIT if k != "links"] + [host["cores"], host["memory_bytes"],
                                                                   host["fma_flops"], host["stream_bw"]]
        links = f["links"]
        ok = (all(isinstance(v, (int, float)) and v >= 0 for v in numbers) and isinstance(links, dict) and links
              and all(isinstance(v, dict) and v.get("latency_s", -1) >= 0 and v.get("s_per_byte", -1) >= 0
                      for v in links.values()) and settings["dtype"] in ("float32", "bfloat16")
              and int(settings["cores_per_worker"]) >= 1)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise PlanError(f"{path}: the profile lacks its fit or host record (run --profile again)")
    if model_dir is not None:
        want = model_identity(model_dir)["config_sha256"]
        if profile.get("model", {}).get("config_sha256") != want:
            raise PlanError(f"{path}: a profile of another model ({profile.get('model', {}).get('dir')}); run "
                            "--profile for this one")
    return profile


def current_host_matches(profile: dict[str, Any]) -> str | None:
    """Why the profile may not describe this host (None when it does)."""
    here = socket.gethostname(), len(os.sched_getaffinity(0))
    there = profile["host"].get("hostname"), profile["host"].get("cores")
    if here != there:
        return f"measured on {there[0]} with {there[1]} cores; this is {here[0]} with {here[1]}"
    return None

