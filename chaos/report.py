"""What a chaos run measured, per fault and overall, and the verdict on the scenario's assertions.

Definitions (times are unix seconds; a fault's window runs from when it took effect to when it was
lifted, plus STALL_TAIL_S for the recovery that follows):

- detection: first cluster event (suspect, dead, fenced) about the fault's target at or after the fault;
  for targets no event names (the controller, Redis), the first admin snapshot showing it not ready.
- stall of a request: its longest wait for a token (from the request's start for the first) that
  overlaps the window. Requests in flight during the window are split into *affected* (stall above
  AFFECTED_FACTOR x the failure-free replay's median inter-token gap, and at least AFFECTED_MIN_S)
  and *unaffected*: the API does not say which workers served a request, so the symptom decides.
- lost: requests that did not complete (an error, a stream that ended early, a timeout).
- token mismatch: a completed request whose token ids differ from the failure-free replay's.
- redundancy restored: first admin snapshot after the fault was lifted in which every worker of the
  starting roster is READY (a killed one under a new pid), no more experts are unprotected than at
  the start, and no injected datapath fault is in force.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from chaos.injectors import Injection
from chaos.scenario import Scenario
from chaos.targets import ClusterView, Event
from chaos.workload import RequestResult

STALL_TAIL_S = 1.0
AFFECTED_FACTOR = 5.0
AFFECTED_MIN_S = 0.05
DETECT_KINDS = ("suspect", "dead", "fenced")


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(position), math.ceil(position)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


def summary(values: list[float]) -> dict[str, Any]:
    return {"count": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": max(values) if values else None}


def token_gaps(r: RequestResult) -> list[float]:
    return [b - a for a, b in zip(r.arrivals, r.arrivals[1:])]


def stall_in(r: RequestResult, start: float, end: float) -> float | None:
    """The request's longest wait that overlaps [start, end] (None if it was not in flight then)."""
    times = [r.start, *r.arrivals] + ([r.end] if r.error is not None else [])
    gaps = [b - a for a, b in zip(times, times[1:]) if b > start and a < end]
    return max(gaps) if gaps else None


def healthy(view: ClusterView, baseline: ClusterView, killed: set[tuple[str, int]] = frozenset()) -> bool:
    """Every worker of the starting roster serving again (killed ones under a new pid), redundancy
    back to where it started, and no injected datapath fault in force."""
    for start in baseline.workers:
        if not start.live:
            continue
        now = view.worker(start.id)
        if now is None or now.state != "READY":
            return False
    for name, pid in killed:
        now = view.worker(name)
        if now is None or now.pid == pid:
            return False
    return view.unprotected <= baseline.unprotected and not view.faults


DETECT_GRACE_S = 10.0


def _detected(injection: Injection, events: list[Event],
              snapshots: list[tuple[float, ClusterView | None]]) -> float | None:
    """From the first event about the target; for a target no event names (the controller, Redis),
    from the first admin snapshot that shows it not ready."""
    names, sources = set(), set()
    for target in injection.targets:
        if "->" in target:
            source, dest = target.split("->", 1)
            if dest != "*":
                names.add(dest)
            if source != "*":
                sources.add(source)
        else:
            names.add(target)
    # Only while the fault acts (and a grace period after): a later, unrelated fault's events about
    # the same worker are not this fault's detection (a slowed worker may never be detected at all).
    window_end = max(injection.ended, injection.started) + DETECT_GRACE_S
    for e in events:
        if e.time < injection.started - 0.05 or e.time > window_end or e.kind not in DETECT_KINDS:
            continue
        if names:
            hit = e.worker in names
        else:  # every link of an attention worker (or of all): its reports about any expert worker count
            hit = not sources or any(f"by {s}" in e.detail for s in sources)
        if hit:
            return max(0.0, e.time - injection.started)
    for t, view in snapshots:
        if injection.started <= t <= window_end and view is not None and any(
                (w := view.worker(name)) is not None and w.state != "READY" for name in names):
            return t - injection.started
    return None


def _restored(injection: Injection, snapshots: list[tuple[float, ClusterView | None]], baseline: ClusterView) -> float | None:
    killed = {(name, pid) for _, name, pid in injection.killed}
    for t, view in snapshots:
        if t >= injection.ended and view is not None and healthy(view, baseline, killed):
            return max(0.0, t - injection.started)
    return None


def analyse(
    scenario: Scenario,
    injections: list[Injection],
    results: list[RequestResult],
    reference: list[RequestResult],
    snapshots: list[tuple[float, ClusterView | None]],
    events: list[Event],
    baseline: ClusterView,
    t0: float,
) -> dict[str, Any]:
    """The whole report as plain data (report.json)."""
    ref = {r.spec.index: r for r in reference}
    replay_gaps = [g for r in reference if r.ok for g in token_gaps(r)]
    threshold = max(AFFECTED_MIN_S, AFFECTED_FACTOR * (percentile(replay_gaps, 50) or 0.0))
    mismatched = {r.spec.index: _first_difference(r.tokens, ref[r.spec.index].tokens)
                  for r in results if r.ok and r.spec.index in ref and ref[r.spec.index].ok
                  and r.tokens != ref[r.spec.index].tokens}
    unverified = [r.spec.index for r in results if r.ok and (r.spec.index not in ref or not ref[r.spec.index].ok)]
    lost = [r for r in results if not r.ok]

    faults = []
    for inj in injections:
        entry: dict[str, Any] = {**inj.to_dict(), "at_s": (inj.started or inj.planned) - t0}
        if not inj.started:
            faults.append(entry)
            continue
        end = inj.ended + STALL_TAIL_S
        in_flight = [r for r in results if r.start < end and r.end > inj.started]
        stalls = {r.spec.index: s for r in in_flight if (s := stall_in(r, inj.started, end)) is not None}
        affected = [s for s in stalls.values() if s > threshold]
        unaffected = [s for s in stalls.values() if s <= threshold]
        entry.update(
            detection_s=_detected(inj, events, snapshots),
            in_flight=len(in_flight),
            stall_all=summary(list(stalls.values())),
            stalls=sorted(round(v, 4) for v in stalls.values()),
            stall_affected=summary(affected),
            stall_unaffected=summary(unaffected),
            lost=sum(1 for r in in_flight if not r.ok),
            token_mismatches=sum(1 for r in in_flight if r.spec.index in mismatched),
            redundancy_restored_s=_restored(inj, snapshots, baseline),
        )
        faults.append(entry)

    ok = [r for r in results if r.ok]
    all_gaps = [g for r in ok for g in token_gaps(r)]
    tokens = sum(len(r.tokens) for r in results)
    span = (max((r.end for r in results), default=t0) - t0) or 1.0
    totals = {
        "requests": len(results), "completed": len(ok), "lost": len(lost), "token_mismatches": len(mismatched),
        "unverified": len(unverified), "tokens": tokens, "duration_s": span, "tokens_per_s": tokens / span,
        "ttft": summary([r.arrivals[0] - r.start for r in ok if r.arrivals]),
        "inter_token": summary(all_gaps), "replay_inter_token": summary(replay_gaps),
        "affected_threshold_s": threshold,
    }
    report = {
        "scenario": scenario.name, "description": scenario.description, "source": scenario.source,
        "workload": _workload_dict(scenario), "started": t0, "totals": totals, "faults": faults,
        "lost_requests": [{"index": r.spec.index, "error": r.error, "tokens_received": len(r.tokens)} for r in lost],
        "mismatched_requests": [{"index": i, "first_difference": d} for i, d in sorted(mismatched.items())],
        "unverified_requests": unverified,
        "events": [{"time": e.time, "kind": e.kind, "worker": e.worker, "detail": e.detail} for e in events],
    }
    report["assertions"] = check(scenario, report)
    report["passed"] = all(a["passed"] for a in report["assertions"])
    return report


def _first_difference(got: list[int], want: list[int]) -> int:
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return i
    return min(len(got), len(want))


def _workload_dict(scenario: Scenario) -> dict[str, Any]:
    w = scenario.workload
    return {"concurrency": w.concurrency, "rate": w.rate, "duration_s": w.duration_s,
            "prompt_tokens": list(w.prompt_tokens), "output_tokens": list(w.output_tokens),
            "temperature": w.temperature, "seed": w.seed}


def check(scenario: Scenario, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each assertion with its limit, the measured value and whether it held."""
    a = scenario.assertions
    totals, faults = report["totals"], report["faults"]
    out = []
    failed = [f for f in faults if f["error"] or not f["started"]]
    out.append({"name": "every fault injected", "limit": 0, "value": len(failed), "passed": not failed,
                "detail": "; ".join(f"{f['where']}: {f['error'] or 'not started'}" for f in failed)})
    if a.zero_lost_requests:
        out.append({"name": "zero lost requests", "limit": 0, "value": totals["lost"], "passed": totals["lost"] == 0,
                    "detail": ""})
    if a.zero_token_mismatches:
        bad = totals["token_mismatches"] + totals["unverified"]
        detail = f"{totals['unverified']} could not be replayed" if totals["unverified"] else ""
        out.append({"name": "zero token mismatches", "limit": 0, "value": totals["token_mismatches"],
                    "passed": bad == 0, "detail": detail})
    if a.max_stall_p99_s is not None:
        worst = max((f["stall_all"]["p99"] or 0.0 for f in faults if "stall_all" in f), default=0.0)
        out.append({"name": "max stall p99 (s)", "limit": a.max_stall_p99_s, "value": worst,
                    "passed": worst <= a.max_stall_p99_s, "detail": ""})
    if a.recovery_within_s is not None:
        times = [f.get("redundancy_restored_s") for f in faults if f["started"]]
        never = sum(1 for t in times if t is None)
        worst = max((t for t in times if t is not None), default=0.0)
        out.append({"name": "recovery within (s)", "limit": a.recovery_within_s, "value": None if never else worst,
                    "passed": never == 0 and worst <= a.recovery_within_s,
                    "detail": f"{never} fault(s) never recovered" if never else ""})
    return out


# ---- writing --------------------------------------------------------------------------------


def _fmt(value: Any, unit: str = "s") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value * 1000:.0f} ms" if unit == "s" and value < 1 else f"{value:.2f}{' ' + unit if unit else ''}"
    return str(value)


def _stall(s: dict[str, Any]) -> str:
    if not s["count"]:
        return "-"
    return f"{_fmt(s['p50'])} / {_fmt(s['p99'])} / {_fmt(s['max'])} ({s['count']})"


def markdown(report: dict[str, Any]) -> str:
    t = report["totals"]
    lines = [f"# Chaos report: {report['scenario']}", ""]
    if report["description"]:
        lines += [report["description"].strip(), ""]
    verdict = "PASS" if report["passed"] else "FAIL"
    failed = [a["name"] for a in report["assertions"] if not a["passed"]]
    lines += [f"**Result: {verdict}**" + (f" (failed: {', '.join(failed)})" if failed else ""), ""]
    lines += ["| requests | completed | lost | token mismatches | tokens | tokens/s | TTFT p50 | inter-token p50 / p99 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |",
              f"| {t['requests']} | {t['completed']} | {t['lost']} | {t['token_mismatches']} | {t['tokens']} | "
              f"{t['tokens_per_s']:.1f} | {_fmt(t['ttft']['p50'])} | {_fmt(t['inter_token']['p50'])} / "
              f"{_fmt(t['inter_token']['p99'])} |", ""]
    lines += ["## Faults", "",
              f"Stall = a request's longest wait for a token across the fault (p50 / p99 / max (requests)); "
              f"affected = stalled over {_fmt(t['affected_threshold_s'])}.", "",
              "| # | at | fault | target | detection | stall, affected | stall, unaffected | lost | mismatches "
              "| redundancy restored |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in report["faults"]:
        targets = ", ".join(f["targets"]) or f["target"]
        if not f["started"] or "stall_all" not in f:
            lines.append(f"| {f['index']} | {f['at_s']:.1f}s | {f['describe']} | {targets} | not injected: "
                         f"{f['error']} | | | | | |")
            continue
        lines.append(f"| {f['index']} | {f['at_s']:.1f}s | {f['describe']} | {targets} | {_fmt(f['detection_s'])} | "
                     f"{_stall(f['stall_affected'])} | {_stall(f['stall_unaffected'])} | {f['lost']} | "
                     f"{f['token_mismatches']} | {_fmt(f['redundancy_restored_s'])} |")
    lines += ["", "## Assertions", "", "| assertion | limit | measured | result |", "| --- | --- | --- | --- |"]
    for a in report["assertions"]:
        result = "pass" if a["passed"] else "**FAIL**" + (f": {a['detail']}" if a["detail"] else "")
        lines.append(f"| {a['name']} | {a['limit']} | {_fmt(a['value'], '')} | {result} |")
    if report["lost_requests"]:
        lines += ["", "## Lost requests", ""]
        lines += [f"- request {r['index']}: {r['error']}" for r in report["lost_requests"][:50]]
    if report["mismatched_requests"]:
        lines += ["", "## Token mismatches", ""]
        lines += [f"- request {m['index']}: first differs at token {m['first_difference']}"
                  for m in report["mismatched_requests"][:50]]
    return "\n".join(lines) + "\n"


def timeline(report: dict[str, Any], results: list[RequestResult], path: Path, bin_s: float = 0.5) -> None:
    """Throughput and inter-token latency over time, with each fault's span and recovery marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = report["started"]
    span = max(report["totals"]["duration_s"], bin_s)
    bins = max(1, math.ceil(span / bin_s))
    counts = [0] * bins
    gaps: list[list[float]] = [[] for _ in range(bins)]
    for r in results:
        previous = r.start
        for t in r.arrivals:
            b = min(bins - 1, max(0, int((t - t0) / bin_s)))
            counts[b] += 1
            if t > previous:  # tokens that came in one chunk are one delivery
                gaps[b].append(t - previous)
                previous = t
    x = [i * bin_s for i in range(bins)]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 6), constrained_layout=True)
    top.step(x, [c / bin_s for c in counts], where="post", color="tab:blue")
    top.set_ylabel("tokens/s")
    top.set_title(f"{report['scenario']}: {'PASS' if report['passed'] else 'FAIL'}")
    for q, style in ((50, "-"), (99, "--")):
        ys = [percentile(g, q) if g else float("nan") for g in gaps]
        bottom.step(x, ys, where="post", ls=style, color="tab:gray",
                    label=f"gap between deliveries, p{q} per {bin_s:g}s")
    bottom.step(x, [max(g) if g else float("nan") for g in gaps], where="post", color="tab:purple",
                lw=0.8, label="longest gap")
    bottom.set_yscale("log")
    bottom.set_ylabel("token latency (s)")
    bottom.set_xlabel("time since start (s)")
    for f in report["faults"]:
        if not f["started"]:
            continue
        start, end = f["started"] - t0, max(f["ended"], f["started"]) - t0
        for ax in (top, bottom):
            ax.axvline(start, color="tab:red", lw=1)
            if end - start > 0.05:
                ax.axvspan(start, end, color="tab:red", alpha=0.12)
            if f.get("redundancy_restored_s") is not None:
                ax.axvline(start + f["redundancy_restored_s"], color="tab:green", lw=0.8, ls="--")
        label = f"{f['fault']} {', '.join(f['targets']) or f['target']}"
        top.annotate(label, (start, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top",
                     ha="right", fontsize=7, color="tab:red")
    bottom.plot([], [], color="tab:red", label="fault (shaded: while in force)")
    bottom.plot([], [], color="tab:green", ls="--", label="redundancy restored")
    bottom.legend(loc="upper right", fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict[str, Any], results: list[RequestResult], reference: list[RequestResult], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    (out / "requests.json").write_text(json.dumps({"chaos": [r.to_dict() for r in results],
                                                   "replay": [r.to_dict() for r in reference]}) + "\n")
    timeline(report, results, out / "timeline.png")
