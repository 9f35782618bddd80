"""`resilient-moe plan`: profile (optionally), search, print and write (cli.py holds only its flags)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from resilient_moe.planner import PlanError
from resilient_moe.planner import hardware as hw
from resilient_moe.planner import output
from resilient_moe.planner.search import PlanRequest, Side, evaluate, search
from resilient_moe.planner.shape import ModelShape
from resilient_moe.planner.timing import Roofline

KEPT = 64  # candidates the search keeps (the table shows --top of them; the plot all)


def add_arguments(p: argparse.ArgumentParser, positive_int, non_negative_int, positive_float) -> None:
    """The plan subcommand's flags (cli.py passes its argument types)."""
    p.add_argument("--model", required=True, metavar="DIR", help="HF checkpoint directory (config.json is enough "
                   "for hardware other than this host)")
    p.add_argument("--hardware", default=hw.HOST, metavar="LIST",
                   help=f"comma-separated: {', '.join(sorted(hw.HARDWARE))} or {hw.HOST} (this CPU host, from its "
                        "profile); several: homogeneous and heterogeneous plans (default: %(default)s)")
    p.add_argument("--profile", action="store_true", help="measure this host first (runs real workers briefly)")
    p.add_argument("--profile-path", metavar="FILE", help="profile JSON to write or read (default: beside the model)")
    p.add_argument("--profile-batches", metavar="1,8,32", help="with --profile: a short profile at these batches")
    p.add_argument("--prices", metavar="FILE", help="YAML or JSON {hardware: USD per accelerator-hour} ('host': per "
                   "hour of the whole host)")
    p.add_argument("--batch-size", type=positive_int, metavar="B", help="concurrent sequences of the whole "
                   "deployment (default: the largest that meets every constraint)")
    p.add_argument("--max-batch-per-worker", type=positive_int, metavar="N", help="largest batch per attention "
                   "worker searched (default: 1024, on this host 256)")
    p.add_argument("--context", type=positive_int, metavar="N", help="tokens a sequence reaches, prompt included: "
                   "KV is sized for it (default: 2048, at most the model's max_position_embeddings)")
    p.add_argument("--prompt-len", type=positive_int, metavar="N", help="prompt tokens (TTFT; decode is timed at the "
                   "mean of prompt and context; default: a quarter of --context)")
    p.add_argument("--slo-tpot-ms", type=positive_float, metavar="T", help="time per output token limit")
    p.add_argument("--slo-ttft-ms", type=positive_float, metavar="T", help="time to first token limit (estimated)")
    p.add_argument("--survive", type=non_negative_int, default=1, metavar="N", help="keep only plans that still meet "
                   "the SLO, with every expert served, after losing any N failure domains: worker processes on this "
                   "host, nodes on a cluster (default: %(default)s)")
    p.add_argument("--objective", choices=("cost", "accelerator"), default="cost",
                   help="throughput per cost or per accelerator (default: %(default)s)")
    p.add_argument("--max-accelerators", type=positive_int, default=128, metavar="N",
                   help="most accelerators one plan may use (default: %(default)s)")
    p.add_argument("--precision", choices=("bf16", "fp8"), default="bf16",
                   help="weights on simulated hardware (fp8 is simulated only; default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="on this host: the engine dtype (default: the "
                   "profile's)")
    p.add_argument("--top", type=positive_int, default=10, metavar="N", help="plans to show (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the candidates as JSON, best first")
    p.add_argument("--explain", action="store_true", help="say why the winner won")
    p.add_argument("--plot", metavar="PNG", help="plot throughput per cost against TPOT")
    p.add_argument("--out", metavar="YAML", help="write the winner's deployment config (serve --config runs it)")


def _host_side(args: argparse.Namespace, model_dir: Path, shape: ModelShape, prices: dict[str, float]) -> Side:
    from resilient_moe.planner import profile

    path = Path(args.profile_path) if args.profile_path else profile.default_path(model_dir)
    if args.profile:
        settings = profile.ProfileSettings()
        if args.profile_batches:
            try:
                batches = [int(b) for b in args.profile_batches.split(",") if b.strip()]
            except ValueError:
                raise PlanError(f"--profile-batches {args.profile_batches!r}: expected integers like 1,8,32") from None
            if not batches or min(batches) < 1:
                raise PlanError(f"--profile-batches {args.profile_batches!r}: expected positive integers")
            settings = profile.ProfileSettings.quick(batches)
        if args.dtype:
            settings = dataclasses.replace(settings, dtype=args.dtype)
        data = profile.profile_host(model_dir, settings, say=lambda text: print(text, file=sys.stderr, flush=True))
        profile.save(data, path)
        print(f"profile written to {path}", file=sys.stderr)
    else:
        data = profile.load(path, model_dir)
        mismatch = profile.current_host_matches(data)
        if mismatch:
            print(f"warning: {path}: {mismatch}", file=sys.stderr)
    if args.dtype and args.dtype != data["settings"]["dtype"]:
        raise PlanError(f"--dtype {args.dtype}: the profile was measured in {data['settings']['dtype']}; profile again "
                        "with this --dtype")
    acc = hw.host_accelerator(data["host"], prices.get(hw.HOST))
    return Side(hw.HOST, acc, profile.fitted_times(shape, data), cores=int(data["host"]["cores"]))


def run(args: argparse.Namespace) -> int:
    from resilient_moe.model.config import ModelConfig

    model_dir = Path(args.model)
    cfg = ModelConfig.from_pretrained(model_dir)
    shape = ModelShape.from_config(cfg, name=model_dir.resolve().name)
    prices = hw.load_prices(args.prices) if args.prices else {}
    names = [n.strip().lower() for n in args.hardware.split(",") if n.strip()]
    if not names:
        raise PlanError("--hardware: name at least one kind of hardware")
    known = sorted([*hw.HARDWARE, hw.HOST])
    for name in names:
        if name not in known:
            raise PlanError(f"unknown hardware {name!r} (known: {', '.join(known)})")
    if hw.HOST in names and len(names) > 1:
        raise PlanError(f"--hardware: {hw.HOST} plans only with itself (its profile is of this machine alone)")
    host = hw.HOST in names
    if args.profile and not host:
        raise PlanError("--profile measures this host: use it with --hardware host")
    if args.prices:
        for name in prices:
            if name not in names:
                print(f"warning: --prices names {name}, which is not in --hardware", file=sys.stderr)
    sides: dict[str, Side] = {}
    if host:
        sides[hw.HOST] = _host_side(args, model_dir, shape, prices)
    for name, acc in hw.resolve([n for n in names if n != hw.HOST], prices).items():
        sides[name] = Side(name, acc, Roofline(acc, shape, args.precision))
    context = args.context or min(2048, cfg.max_position_embeddings)
    if context > cfg.max_position_embeddings:
        raise PlanError(f"--context {context} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings})")
    prompt = args.prompt_len or max(1, context // 4)
    request = PlanRequest(
        context=context, prompt_len=prompt, batch_size=args.batch_size,
        max_batch_per_worker=args.max_batch_per_worker or (256 if host else 1024),
        slo_tpot_s=args.slo_tpot_ms / 1e3 if args.slo_tpot_ms else None,
        slo_ttft_s=args.slo_ttft_ms / 1e3 if args.slo_ttft_ms else None, survive=args.survive,
        objective=args.objective, max_accelerators=args.max_accelerators)
    result = search(shape, sides, request, top=max(KEPT, args.top))
    if not result.candidates:
        raise PlanError(output.infeasible_message(result))
    dtype = sides[hw.HOST].times.dtype if host else "bfloat16"
    best = result.candidates[0]
    title = f"{shape.name} on {args.hardware}: best {best.layout.describe()}"
    if args.json:
        print(output.dump_json(result, args.top, str(model_dir), dtype, args.precision))
    else:
        output.table(result, args.top)
        for note in output.notes(best, args.precision):
            print(f"note: {note}")
    if args.explain:
        step = 1 if request.batch_size is None else 0
        nxt = evaluate(shape, sides, request, best.layout, best.batch_per_worker + 1) if step else None
        runner_up = result.candidates[1] if len(result.candidates) > 1 else None
        print(output.explain(best, runner_up, nxt, request), file=sys.stderr if args.json else sys.stdout)
    if args.plot:
        output.plot(result, args.plot, title)
        print(f"plot written to {args.plot}", file=sys.stderr)
    if args.out:
        output.write_yaml(best, args.out, str(model_dir.resolve()), request, dtype, args.precision, shape.name)
        print(f"deployment written to {args.out} (run it: resilient-moe serve --config {args.out})", file=sys.stderr)
    return 0
