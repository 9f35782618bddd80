"""The `resilient-moe-chaos` command.

    resilient-moe-chaos run SCENARIO.yaml [--url URL --token TOKEN] --out DIR
    resilient-moe-chaos inject FAULT TARGET [--duration S] [--url URL --token TOKEN]
    resilient-moe-chaos list [--url URL --token TOKEN]
    resilient-moe-chaos validate SCENARIO.yaml

`run` without --url starts its own `resilient-moe serve` (the scenario's `cluster:` section says how)
and stops it afterwards. Exit status: 0 when every assertion held, 1 when one failed, 2 for bad input
(a scenario, a flag, a target that does not exist), 3 when the run could not be carried out.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import sys
import threading
import time
from pathlib import Path

from chaos import scenario as scenarios
from chaos.scenario import FAULTS, FaultSpec, ScenarioError
from chaos.targets import AdminClient, AdminError, TargetError, check_targets, expand_every
from resilient_moe.errors import ResilientMoeError

TOKEN_ENV = "RESILIENT_MOE_ADMIN_TOKEN"  # the variable `resilient-moe serve` takes its admin token from
URL_ENV = "RESILIENT_MOE_URL"
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_RUN_ERROR = 1, 2, 3


def _number(minimum: float, inclusive: bool):
    """An argparse type: a number above `minimum` (or equal to it, when `inclusive`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum:g}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resilient-moe-chaos",
        description="Inject faults into a live resilient-moe server and measure stall, loss and correctness.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def server_flags(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--url", default=os.environ.get(URL_ENV), required=required and not os.environ.get(URL_ENV),
                       help=f"the server, e.g. http://127.0.0.1:8000 (default: ${URL_ENV})")
        p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                       help=f"the admin token `resilient-moe serve` printed (default: ${TOKEN_ENV})")

    run = sub.add_parser("run", help="run a scenario file and write a report")
    run.add_argument("scenario", metavar="SCENARIO.yaml")
    run.add_argument("--out", required=True, metavar="DIR", help="where report.json, report.md, timeline.png go")
    server_flags(run, required=False)
    run.add_argument("--resilience", choices=("on", "off"),
                     help="without --url: start the server with resilience on, or the restart-everything baseline")
    run.add_argument("--log-dir", metavar="DIR", help="without --url: where the started server's workers log")

    inject = sub.add_parser("inject", help="inject one fault now")
    inject.add_argument("fault", choices=FAULTS, metavar="FAULT", help=", ".join(FAULTS))
    inject.add_argument("target", metavar="TARGET", nargs="?",
                        help="aw-0, ew-2, controller, kv-store, redis, random:ew, every:aw, or a link aw-0->ew-1; "
                             "node-kill: node:ID or node-of:aw-0 (or --node ID)")
    inject.add_argument("--node", metavar="ID", help="node-kill: the node (its id, or the first characters)")
    inject.add_argument("--duration", type=_number(0, inclusive=False), metavar="S", help="hang, slow and datapath faults")
    inject.add_argument("--delay-ms", type=_number(0, inclusive=True), default=0.0)
    inject.add_argument("--jitter-ms", type=_number(0, inclusive=True), default=0.0)
    inject.add_argument("--drop-rate", type=_number(0, inclusive=False))
    inject.add_argument("--count", type=int, help="crash-loop: kills (default 3)")
    inject.add_argument("--interval", type=_number(0, inclusive=True), metavar="S", help="crash-loop / every: spacing")
    inject.add_argument("--hogs", type=int, help="slow: busy processes (default 1)")
    inject.add_argument("--seed", type=int, default=None, help="for random: targets")
    server_flags(inject, required=True)

    lst = sub.add_parser("list", help="show the cluster's workers and the targets they answer to")
    server_flags(lst, required=True)

    validate = sub.add_parser("validate", help="check scenario files without running them")
    validate.add_argument("scenario", nargs="+", metavar="SCENARIO.yaml")
    return parser


# ---- commands --------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    for path in args.scenario:
        s = scenarios.load(path)
        print(f"{path}: ok ({len(s.faults)} faults over {s.workload.duration_s:g}s)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from chaos.runner import run
    from chaos.server import LaunchedServer

    scenario = scenarios.load(args.scenario)  # bad input fails here, before anything starts
    out = Path(args.out)
    if args.url and args.resilience:
        raise ScenarioError("--resilience only applies when the tool starts the server (no --url)")
    if args.url:
        report = run(scenario, args.url, args.token, out)
    else:
        resilience = None if args.resilience is None else args.resilience == "on"
        print(f"starting resilient-moe serve for {scenario.name} ...", flush=True)
        with LaunchedServer(scenario.cluster, resilience, log_dir=args.log_dir) as server:
            print(f"server at {server.url}", flush=True)
            report = run(scenario, server.url, server.token, out, restart_supervisor=server.restart)
    from chaos.report import markdown

    print()
    print(markdown(report))
    print(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'timeline.png'}")
    return 0 if report["passed"] else EXIT_FAILED


_FLAGS = {"fault": "FAULT", "target": "TARGET", "duration_s": "--duration", "delay_ms": "--delay-ms",
          "jitter_ms": "--jitter-ms", "drop_rate": "--drop-rate", "count": "--count", "interval_s": "--interval",
          "hogs": "--hogs"}


def _spec_from_args(args: argparse.Namespace) -> FaultSpec:
    """Build the fault through the scenario validator, so flags get the same checks as files."""
    target = args.target
    if args.node is not None:
        if args.fault != "node-kill" or target is not None:
            raise ScenarioError("--node goes with node-kill, instead of TARGET")
        target = f"node:{args.node}"
    if target is None:
        raise ScenarioError("TARGET: give the fault's target" + (" (or --node ID)" if args.fault == "node-kill" else ""))
    fault: dict = {"at_s": 0, "fault": args.fault, "target": target}
    values = {"duration_s": args.duration, "drop_rate": args.drop_rate, "count": args.count,
              "interval_s": args.interval, "hogs": args.hogs}
    if args.fault == "delay":
        values.update(delay_ms=args.delay_ms, jitter_ms=args.jitter_ms)
    fault.update({k: v for k, v in values.items() if v is not None})
    raw = {"workload": {"concurrency": 1, "duration_s": (args.duration or 0) + 1}, "faults": [fault]}
    try:
        return scenarios.parse(raw, source="command line").faults[0]
    except ScenarioError as e:
        match = re.match(r"command line: faults\[0\]\.(\w+): (.*)", str(e), re.S)
        if match is None:
            raise
        field, message = match.groups()
        raise ScenarioError(f"{_FLAGS.get(field, field)}: {message}") from None


def cmd_inject(args: argparse.Namespace) -> int:
    from chaos.injectors import Injection, Injector

    spec = _spec_from_args(args)
    admin = AdminClient(args.url, args.token)
    stop = threading.Event()
    try:
        view = admin.cluster()
        specs = expand_every([spec], view)
        check_targets(specs, view)
        t0 = time.time()
        injector = Injector(admin, random.Random(args.seed), stop, run_id=f"inject{os.getpid()}",
                            log=lambda line: print(f"[{time.time() - t0:6.2f}s] {line.strip()}", flush=True))
        injections = []
        try:
            for i, s in enumerate(specs):
                if stop.wait(max(0.0, t0 + s.at_s - time.time())):
                    break
                injection = Injection(i, s, planned=time.time())
                injector.inject(injection)
                injections.append(injection)
        except KeyboardInterrupt:
            print("interrupted: undoing the fault", flush=True)
            raise
        finally:
            for problem in injector.cleanup():
                print(f"warning: {problem}", file=sys.stderr)
        failed = [i for i in injections if i.error]
        for i in failed:
            print(f"error: {i.spec.describe()}: {i.error}", file=sys.stderr)
        return EXIT_RUN_ERROR if failed else 0
    finally:
        admin.close()


def cmd_list(args: argparse.Namespace) -> int:
    admin = AdminClient(args.url, args.token)
    try:
        view = admin.cluster()
        faults = admin.faults()
    finally:
        admin.close()
    rows = [("ID", "ROLE", "STATE", "PID", "HOST", "NODE", "INCARNATION")]
    rows += [(w.id, w.role, w.state.lower(), str(w.pid), w.host, w.node[:12], str(w.incarnation))
             for w in view.workers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    roles = {w.role for w in view.workers}
    services = [name for name, role in (("controller", "controller"), ("kv-store", "kv_store"), ("redis", "redis"))
                if role in roles]
    print(f"\nrouting table epoch {view.epoch}; {view.unprotected} (layer, expert) pairs without a live shadow")
    print("targets: worker ids above" + (f", {', '.join(services)}" if services else "")
          + ", random:aw|ew|worker, every:aw|ew|worker; links for delay/drop/partition: aw-0->ew-1 (* = any); "
          "node-kill: node:ID (the NODE column) or node-of:aw-0")
    for f in faults:
        left = f.get("expires_at", 0) - time.time()
        print(f"fault in force: {f.get('id')} {f.get('kind')} {f.get('link')}"
              + (f" ({left:.1f}s left)" if f.get("expires_at") else " (until removed)"))
    return 0


COMMANDS = {"run": cmd_run, "inject": cmd_inject, "list": cmd_list, "validate": cmd_validate}


def interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so stopped workers are resumed and started servers stopped."""

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a shell
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    interrupt_on_sigterm()
    try:
        return COMMANDS[args.command](args)
    except (ScenarioError, TargetError) as e:
        parser.exit(EXIT_BAD_INPUT, f"resilient-moe-chaos {args.command}: error: {e}\n")
    except (AdminError, ResilientMoeError) as e:
        parser.exit(EXIT_RUN_ERROR, f"resilient-moe-chaos {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
