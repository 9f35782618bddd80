"""Chaos scenarios against resilience on and the restart-everything baseline (`--resilience off`).

For each scenario and mode it starts a fresh `resilient-moe serve`, runs the scenario with the chaos
tool (load, faults on a timeline, failure-free replay) and prints one row from its report: requests
lost, token mismatches, throughput, detection, stall across the faults (every request in flight
during a fault: its longest wait for a token), and time until redundancy was restored. Reports land
in --out/<scenario>-<mode>/.

    python benchmarks/bench_chaos.py                       # rolling crashes of every worker, on vs off
    python benchmarks/bench_chaos.py --soak                # and the 10-minute soak
    python benchmarks/bench_chaos.py --soak-only --soak-duration 120 --modes on --json bench_chaos.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chaos import runner, scenario  # noqa: E402
from chaos.cli import interrupt_on_sigterm  # noqa: E402
from chaos.report import percentile  # noqa: E402
from chaos.server import LaunchedServer  # noqa: E402

SCENARIOS = Path(__file__).resolve().parents[1] / "chaos" / "scenarios"


def soak_scenario(duration_s: float | None) -> scenario.Scenario:
    path = SCENARIOS / "soak.yaml"
    raw = yaml.safe_load(path.read_text())
    if duration_s is not None:  # a shorter soak: the same mix of faults, over less time
        raw["workload"]["duration_s"] = duration_s
        raw["faults"][0]["random"]["end_s"] = max(raw["faults"][0]["random"]["start_s"] + 1, duration_s - 20)
    return scenario.parse(raw, source=str(path), default_name="soak", base_dir=SCENARIOS)


def row(name: str, mode: str, report: dict) -> dict:
    faults = [f for f in report["faults"] if f.get("started")]
    stalls = [s for f in faults for s in f.get("stalls", [])]
    detections = [f["detection_s"] for f in faults if f.get("detection_s") is not None]
    recoveries = [f["redundancy_restored_s"] for f in faults if f.get("redundancy_restored_s") is not None]
    t = report["totals"]

    return {
        "scenario": name, "resilience": mode, "faults": len(faults), "requests": t["requests"], "lost": t["lost"],
        "mismatches": t["token_mismatches"], "tokens_per_s": t["tokens_per_s"],
        "detect_p50_s": percentile(detections, 50), "stall_p50_s": percentile(stalls, 50), "stall_p99_s": percentile(stalls, 99),
        "stall_max_s": max(stalls) if stalls else None, "recovered": f"{len(recoveries)}/{len(faults)}",
        "recovery_p50_s": statistics.median(recoveries) if recoveries else None,
        "recovery_max_s": max(recoveries) if recoveries else None, "passed": report["passed"],
    }


def show(rows: list[dict]) -> None:
    def s(v, scale=1.0, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v * scale)

    header = (f"{'scenario':<16}{'resil.':<7}{'faults':>7}{'reqs':>6}{'lost':>6}{'mism.':>6}{'tok/s':>7}"
              f"{'detect p50':>11}{'stall p50':>10}{'stall p99':>10}{'stall max':>10}{'recovered':>10}"
              f"{'recov p50':>10}{'recov max':>10}  verdict")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['scenario']:<16}{r['resilience']:<7}{r['faults']:>7}{r['requests']:>6}{r['lost']:>6}"
              f"{r['mismatches']:>6}{r['tokens_per_s']:>7.1f}{s(r['detect_p50_s']):>11}{s(r['stall_p50_s']):>10}"
              f"{s(r['stall_p99_s']):>10}{s(r['stall_max_s']):>10}{r['recovered']:>10}{s(r['recovery_p50_s']):>10}"
              f"{s(r['recovery_max_s']):>10}  {'PASS' if r['passed'] else 'FAIL'}")
    print("times in seconds; stall = longest wait for a token of each request in flight during a fault")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak", action="store_true", help="also run the soak scenario (10 minutes per mode)")
    parser.add_argument("--soak-only", action="store_true", help="run the soak and nothing else")
    parser.add_argument("--soak-duration", type=float, help="shorten the soak to this many seconds of load")
    parser.add_argument("--scenario", action="append", default=[], metavar="YAML",
                        help="scenario files to run (default: chaos/scenarios/rolling-crashes.yaml)")
    parser.add_argument("--modes", default="on,off", help="resilience modes to compare (default: on,off)")
    parser.add_argument("--out", default="bench-chaos", help="where each run's report goes")
    parser.add_argument("--serve-command", help="what runs `resilient-moe` (default: this Python's module)")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args()
    interrupt_on_sigterm()

    runs = [] if args.soak_only else [scenario.load(p) for p in (args.scenario or [SCENARIOS / "rolling-crashes.yaml"])]
    if args.soak or args.soak_only:
        runs.append(soak_scenario(args.soak_duration))
    command = shlex.split(args.serve_command) if args.serve_command else None
    rows = []
    for sc in runs:
        for mode in args.modes.split(","):
            out = Path(args.out) / f"{sc.name}-{mode}"
            print(f"== {sc.name}, resilience {mode}: {len(sc.faults)} faults, {sc.workload.duration_s:g}s of load",
                  flush=True)
            with LaunchedServer(sc.cluster, resilience=mode == "on", log_dir=str(out / "logs"),
                                command=command) as server:
                report = runner.run(sc, server.url, server.token, out, log=lambda line: print(line, flush=True))
            rows.append(row(sc.name, mode, report))
            print(f"   report: {out / 'report.md'}", flush=True)
    print()
    show(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
