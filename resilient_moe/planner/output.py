"""What `plan` prints and writes: the ranked table, JSON, the plot, the deployment YAML, --explain, and
the message when no plan meets the request.

The deployment YAML holds only settings the runtime honours (DeploymentConfig and EngineConfig
fields). What a simulated plan decides beyond them (tensor parallelism, FP8) goes into its comments:
the runtime runs each worker on one device, in float32 or bfloat16.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from resilient_moe.planner import PlanError
from resilient_moe.planner.hardware import HOST
from resilient_moe.planner.search import Candidate, PlanRequest, SearchResult, Violation
from resilient_moe.planner.timing import micro_batch_overlap


def deployment(c: Candidate, model_dir: str, req: PlanRequest, dtype: str) -> dict[str, Any]:
    """The deployment settings of candidate `c` (DeploymentConfig.from_dict takes them as they are)."""
    host = c.layout.attention == HOST
    out: dict[str, Any] = {
        "model": str(model_dir),
        "attention_workers": c.layout.n_a,
        "expert_workers": c.layout.n_e,
        "micro_batches": c.layout.m,
        "shadow_budget_bytes": int(c.shadow_budget_bytes),
        "kv_store_bytes": int(max(c.kv_store_bytes, 1 << 20)),
    }
    if host:
        out["transport"] = req.transport
    else:
        out["launcher"] = "ray"  # nodes are failure domains only under Ray
        out["kv_replicas"] = c.kv_replicas
    out["engine"] = {"dtype": dtype, "max_num_seqs": int(c.max_num_seqs), "max_model_len": int(req.context)}
    return out


def notes(c: Candidate, precision: str) -> list[str]:
    """What the plan assumes that the runtime does not do."""
    out = []
    if c.layout.tp_a > 1 or c.layout.tp_e > 1:
        out.append(f"tensor parallelism (attention {c.layout.tp_a}, experts {c.layout.tp_e}) is a hardware-description "
                   "dimension: the runtime runs each worker on one device, so this plan's accelerator counts are "
                   "simulated, not what serve starts")
    if precision == "fp8" and c.layout.attention != HOST:
        out.append("FP8 weights are simulated: the runtime runs bfloat16")
    return out


def write_yaml(c: Candidate, path: str | Path, model_dir: str, req: PlanRequest, dtype: str, precision: str,
               model_name: str) -> Path:
    import yaml

    t = c.timing
    lines = [f"# resilient-moe plan for {model_name}: {c.layout.describe()}, batch {c.batch}",
             f"# predicted decode {t.tokens_per_s:.0f} tokens/s, TPOT {1e3 * t.tpot_s:.1f} ms, "
             f"TTFT ~{1e3 * c.ttft_s:.0f} ms; T_a {1e3 * t.t_a:.3f} ms, T_e {1e3 * t.t_e:.3f} ms, T_c {1e3 * t.t_c:.3f} ms"]
    if c.after_loss is not None:
        a = c.after_loss
        lines.append(f"# after losing {', '.join(a.lost)}: {a.tokens_per_s:.0f} tokens/s, TPOT {1e3 * a.tpot_s:.1f} ms; "
                     "every expert keeps a copy")
    lines += [f"# NOTE: {n}" for n in notes(c, precision)]
    body = yaml.safe_dump(deployment(c, model_dir, req, dtype), sort_keys=False)
    path = Path(path)
    try:
        path.write_text("\n".join(lines) + "\n" + body, encoding="utf-8")
    except OSError as e:
        raise PlanError(f"--out {path}: cannot write it ({e.strerror or e})") from None
    return path


def candidate_json(rank: int, c: Candidate, model_dir: str, req: PlanRequest, dtype: str, precision: str) -> dict:
    t = c.timing
    return {
        "rank": rank,
        "layout": c.layout.describe(),
        "hardware": {"attention": c.layout.attention, "expert": c.layout.expert},
        "tensor_parallel": {"attention": c.layout.tp_a, "expert": c.layout.tp_e},
        "deployment": deployment(c, model_dir, req, dtype),
        "batch": c.batch,
        "predicted_tokens_per_s": t.tokens_per_s,
        "tpot_ms": 1e3 * t.tpot_s,
        "ttft_ms": 1e3 * c.ttft_s,
        "objective": req.objective,
        "score": c.score,
        "cost_per_hour": c.cost_per_hour,
        "accelerators": c.accelerators,
        "nodes": {"attention": c.nodes[0], "expert": c.nodes[1]},
        "stage_ms": {"T_a": 1e3 * t.t_a, "T_e": 1e3 * t.t_e, "T_c": 1e3 * t.t_c},
        "micro_batches_needed": micro_batch_overlap(t.t_a, t.t_e, t.t_c),
        "bottleneck": t.bottleneck,
        "binding": c.binding,
        "memory_bytes": c.memory,
        "after_worst_loss": c.after_loss.to_json() if c.after_loss is not None else None,
        "notes": notes(c, precision),
    }


def score_unit(req: PlanRequest) -> str:
    return "tok/s per $/h" if req.objective == "cost" else "tok/s per accel."


def table(result: SearchResult, rows: int, console=None) -> None:
    """The ranked candidates as a rich table."""
    from rich.console import Console
    from rich.table import Table

    import sys

    console = console or Console(width=None if sys.stdout.isatty() else 220)
    req = result.request
    title = (f"{len(result.candidates)} best plans of {result.examined} layouts examined "
             f"({result.pruned} skipped by bound); survive {req.survive}")
    tab = Table(title=title, show_lines=False)
    for name, justify in (("#", "right"), ("layout", "left"), ("batch", "right"), ("tok/s", "right"),
                          ("TPOT ms", "right"), (score_unit(req), "right"), ("$/h", "right"), ("T_a/T_e/T_c ms", "right"),
                          ("m needed", "right"), ("bottleneck", "left"), ("after worst loss", "left"), ("binding", "left")):
        tab.add_column(name, justify=justify)
    for i, c in enumerate(result.candidates[:rows], 1):
        t = c.timing
        loss = "-" if c.after_loss is None else (
            f"{c.after_loss.tokens_per_s:.0f} tok/s, {1e3 * c.after_loss.tpot_s:.1f} ms ({', '.join(c.after_loss.lost)})")
        tab.add_row(str(i), c.layout.describe(), str(c.batch), f"{t.tokens_per_s:.0f}", f"{1e3 * t.tpot_s:.1f}",
                    f"{c.score:.4g}", f"{c.cost_per_hour:.2f}",
                    f"{1e3 * t.t_a:.2f}/{1e3 * t.t_e:.2f}/{1e3 * t.t_c:.2f}",
                    f"{micro_batch_overlap(t.t_a, t.t_e, t.t_c):.1f}", t.bottleneck, loss, c.binding)
    console.print(tab)


def plot(result: SearchResult, path: str | Path, title: str) -> Path:
    """Throughput per cost (or per accelerator) against TPOT for every candidate, the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    req = result.request
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [1e3 * c.timing.tpot_s for c in result.candidates]
    ys = [c.score for c in result.candidates]
    ax.scatter(xs, ys, s=18, color="tab:blue", alpha=0.7, label="candidates")
    best = result.candidates[0]
    ax.scatter([xs[0]], [ys[0]], s=160, marker="*", color="tab:red", zorder=3, label=f"chosen: {best.layout.describe()}")
    if req.slo_tpot_s is not None:
        ax.axvline(1e3 * req.slo_tpot_s, color="gray", linestyle="--", linewidth=1, label="TPOT SLO")
    ax.set_xlabel("TPOT (ms)")
    ax.set_ylabel(score_unit(req))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise PlanError(f"--plot {path}: cannot write it ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return path


def _format(v: Violation) -> str:
    name = v.constraint
    if name.startswith(("SLO", "failure: TPOT")):
        amounts = f"{1e3 * v.value:.2f} ms > {1e3 * v.limit:.2f} ms"
    elif name.startswith("memory"):
        amounts = f"needs {v.value / 1e9:.2f} GB, {v.limit / 1e9:.2f} GB available"
    elif name.startswith("bandwidth"):
        amounts = f"{v.value / 1e9:.2f} GB/s > {v.limit / 1e9:.2f} GB/s"
    else:
        amounts = f"{v.value:g} > {v.limit:g}" if name in ("accelerators", "micro-batches") else ""
    parts = [p for p in (amounts, v.detail) if p]
    return f"{name} ({'; '.join(parts)})" if parts else name


def infeasible_message(result: SearchResult) -> str:
    """Why no plan was found: the binding constraint of the plan that came closest."""
    req = result.request
    c = result.closest
    if c is None:
        return f"no layout to examine ({result.examined}): check --hardware and --max-accelerators"
    broken = "; ".join(_format(v) for v in c.violations)
    where = f"{c.layout.describe()} at batch {c.batch}"
    if all(v.constraint.startswith("memory") for v in c.violations):
        return (f"the model does not fit: even the closest plan ({where}) breaks {broken}; allow more accelerators "
                "(--max-accelerators), larger ones, or a shorter --context")
    binding = c.violations[0].constraint
    asked = []
    if req.slo_tpot_s is not None:
        asked.append(f"TPOT <= {1e3 * req.slo_tpot_s:g} ms")
    if req.slo_ttft_s is not None:
        asked.append(f"TTFT <= {1e3 * req.slo_ttft_s:g} ms")
    if req.survive:
        asked.append(f"surviving {req.survive} failure domain(s)")
    if req.batch_size is not None:
        asked.append(f"batch {req.batch_size}")
    return (f"no plan meets {', '.join(asked) or 'the constraints'}: binding constraint {binding}; the closest plan "
            f"({where}) breaks {broken}")


def explain(best: Candidate, runner_up: Candidate | None, next_batch: Candidate | None, req: PlanRequest) -> str:
    """Why the winner won: its T_a/T_e/T_c balance, what bounds it, the binding constraint, its failure
    behaviour and the margin over the runner-up."""
    t = best.timing
    need = micro_batch_overlap(t.t_a, t.t_e, t.t_c)
    ratio = t.t_a / t.t_e if t.t_e > 0 else math.inf
    lines = [f"Why {best.layout.describe()} at batch {best.batch} won: {t.tokens_per_s:.0f} tokens/s, TPOT "
             f"{1e3 * t.tpot_s:.2f} ms, {best.score:.4g} {score_unit(req)}",
             f"  balance: T_a {1e3 * t.t_a:.3f} ms, T_e {1e3 * t.t_e:.3f} ms (T_a/T_e {ratio:.2f}), T_c {1e3 * t.t_c:.3f} ms; "
             f"hiding T_c needs m >= (T_a + T_e + T_c) / max(T_a, T_e) = {need:.2f}, it runs m = {best.layout.m}"
             + ("" if best.layout.m >= need else " (fewer: the round trip is not hidden, but more micro-batches cost "
                                                  "more than they save here)"),
             f"  bottleneck: {t.bottleneck}"]
    if next_batch is not None and next_batch.violations:
        lines.append(f"  binding constraint: {_format(next_batch.violations[0])} at batch {next_batch.batch}")
    else:
        lines.append(f"  binding constraint: {best.binding or 'none'}")
    if best.after_loss is not None:
        a = best.after_loss
        lines.append(f"  after losing {', '.join(a.lost)} (the worst {req.survive} failure domain(s)): "
                     f"{a.tokens_per_s:.0f} tokens/s ({a.tokens_per_s / t.tokens_per_s:.2f}x), TPOT {1e3 * a.tpot_s:.2f} ms, "
                     f"{a.attention_workers} AW and {a.expert_workers} EW left, every expert keeps a copy "
                     f"({best.shadow_slots} shadow slots per expert worker per layer)")
    else:
        lines.append("  failures: not planned for (--survive 0)")
    if runner_up is not None:
        lines.append(f"  runner-up: {runner_up.layout.describe()} at batch {runner_up.batch}, "
                     f"{runner_up.score / best.score:.3f}x the score"
                     + (" (equal score: the more balanced T_a/T_e wins)" if runner_up.score == best.score else ""))
    return "\n".join(lines)


def dump_json(result: SearchResult, rows: int, model_dir: str, dtype: str, precision: str) -> str:
    return json.dumps([candidate_json(i, c, model_dir, result.request, dtype, precision)
                       for i, c in enumerate(result.candidates[:rows], 1)], indent=1)
