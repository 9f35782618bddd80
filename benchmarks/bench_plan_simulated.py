"""Simulated plans for hardware this host cannot measure: the planner's roofline against a colocated
baseline from the same model, next to MegaScale-Infer's reported gains.

Models (config.json only, no weights): a Mixtral-8x22B-sized and a DeepSeek-V3-sized one, bf16 weights
and KV. Hardware: H100 only, H20 + L40S, H200 + L40S (the search may put either side on either kind,
or both on one). Decode at context 2048 (prompt 512), TPOT SLO 100 ms, at most 128 accelerators.

Colocated baseline: g accelerators of one kind, each running attention for its sequences (data
parallel) and 1/g of the experts (expert parallel), attention then experts with an all-to-all each way
and no overlap; g and the batch chosen like the plan (best objective under the same SLO and memory).
For a heterogeneous pair the baseline is the better of the two kinds.

    python benchmarks/bench_plan_simulated.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resilient_moe.model.config import ModelConfig  # noqa: E402
from resilient_moe.planner.hardware import HARDWARE  # noqa: E402
from resilient_moe.planner.search import PlanRequest, Side, colocated, search  # noqa: E402
from resilient_moe.planner.shape import ModelShape  # noqa: E402
from resilient_moe.planner.timing import Roofline  # noqa: E402

MIXTRAL_8X22B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32768, "hidden_size": 6144,
    "intermediate_size": 16384, "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 65536, "rope_theta": 1e6,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000, "num_nextn_predict_layers": 1,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "tie_word_embeddings": False}
SETUPS = (("H100 only", ("h100",)), ("H20 + L40S", ("h20", "l40s")), ("H200 + L40S", ("h200", "l40s")))
PAPER = {"per accelerator": 1.90, "per cost": 1.66}  # MegaScale-Infer (arXiv 2504.02263): homogeneous, heterogeneous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slo-tpot-ms", type=float, default=100.0)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    rows = []
    for model_name, raw in (("Mixtral-8x22B", MIXTRAL_8X22B), ("DeepSeek-V3", DEEPSEEK_V3)):
        shape = ModelShape.from_config(ModelConfig.from_hf_dict(raw), model_name)
        for setup, kinds in SETUPS:
            sides = {k: Side(k, HARDWARE[k], Roofline(HARDWARE[k], shape)) for k in kinds}
            homogeneous = len(kinds) == 1
            objective = "accelerator" if homogeneous else "cost"
            base_req = PlanRequest(context=args.context, prompt_len=args.prompt_len, slo_tpot_s=args.slo_tpot_ms / 1e3,
                                   survive=0, objective=objective)
            baselines = [b for b in (colocated(shape, sides[k], base_req) for k in kinds) if b is not None]
            base = max(baselines, key=(lambda b: b.per_accelerator) if homogeneous else (lambda b: b.per_cost),
                       default=None)
            for survive in (0, 1):
                started = time.monotonic()
                result = search(shape, sides, PlanRequest(
                    context=args.context, prompt_len=args.prompt_len, slo_tpot_s=args.slo_tpot_ms / 1e3,
                    survive=survive, objective=objective), top=1)
                took = time.monotonic() - started
                if not result.candidates:
                    rows.append({"model": model_name, "setup": setup, "survive": survive, "plan": "none fits"})
                    continue
                c = result.candidates[0]
                per_acc = c.timing.tokens_per_s / c.accelerators
                per_cost = c.timing.tokens_per_s / c.cost_per_hour
                rows.append({
                    "model": model_name, "setup": setup, "survive": survive, "plan": c.layout.describe(),
                    "batch": c.batch, "accelerators": c.accelerators, "tpot_ms": 1e3 * c.timing.tpot_s,
                    "tokens_per_s": c.timing.tokens_per_s, "per_accelerator": per_acc, "per_cost": per_cost,
                    "T_ms": [1e3 * c.timing.t_a, 1e3 * c.timing.t_e, 1e3 * c.timing.t_c],
                    "baseline": None if base is None else f"{base.accelerators}x {base.hardware}, batch "
                                                          f"{base.batch_per_accelerator}/accel.",
                    "baseline_per_accelerator": base and base.per_accelerator, "baseline_per_cost": base and base.per_cost,
                    "x_per_accelerator": base and per_acc / base.per_accelerator,
                    "x_per_cost": base and per_cost / base.per_cost, "search_s": took,
                    "after_loss": None if c.after_loss is None else c.after_loss.to_json()})
                print(f"{model_name} {setup} survive {survive}: {c.layout.describe()} ({took:.1f} s)", flush=True)

    print(f"\nsimulated decode, bf16, context {args.context} (prompt {args.prompt_len}), TPOT SLO {args.slo_tpot_ms:g} ms; "
          "objective: per accelerator (homogeneous), per $/h (heterogeneous)")
    print(f"{'model':<14} {'setup':<12} {'surv':>4} {'plan':<34} {'accel':>5} {'TPOT':>6} {'tok/s/accel':>11} "
          f"{'tok/s per $/h':>13} {'baseline (colocated)':<30} {'base/accel':>10} {'base/$':>8} {'x accel':>7} "
          f"{'x cost':>7} {'paper':>6}")
    for r in rows:
        if r["plan"] == "none fits":
            print(f"{r['model']:<14} {r['setup']:<12} {r['survive']:>4} none fits")
            continue
        paper = PAPER["per accelerator"] if r["setup"] == "H100 only" else PAPER["per cost"]
        print(f"{r['model']:<14} {r['setup']:<12} {r['survive']:>4} {r['plan']:<34} {r['accelerators']:>5} "
              f"{r['tpot_ms']:>6.1f} {r['per_accelerator']:>11.0f} {r['per_cost']:>13.0f} {str(r['baseline']):<30} "
              f"{r['baseline_per_accelerator'] or 0:>10.0f} {r['baseline_per_cost'] or 0:>8.0f} "
              f"{r['x_per_accelerator'] or 0:>7.2f} {r['x_per_cost'] or 0:>7.2f} {paper:>5.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
