"""Accelerator specs the roofline plans with, the source of every figure, and hourly prices a user may
override (`--prices FILE`, YAML or JSON: {name: price per accelerator-hour}).

Figures are per accelerator (one GPU), in bytes and bytes/s and FLOP/s; link bandwidths are one
direction. Datasheet compute is dense (no 2:4 sparsity). Where no datasheet gives a figure (NICs and
host memory of a typical 8-GPU server, prices) the source says it is an assumption. This CPU host is
not in the table: its profile measures it (profile.py), see `host_accelerator`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from resilient_moe.planner import PlanError

GB = 1e9
TB = 1e12
HOST = "host"  # this CPU host, measured by its profile


@dataclass(frozen=True)
class Accelerator:
    """One kind of accelerator as the plan sees it (a GPU, or for the host: the whole CPU host).

    `per_node`: accelerators in one node (a failure domain on a cluster). `host_memory_bytes`: a node's
    host RAM (the KV store lives there). `sources`: field name -> where the figure comes from.
    """

    name: str
    title: str
    memory_bytes: float
    memory_bw: float  # device memory bandwidth, bytes/s
    bf16_flops: float  # dense peak, FLOP/s
    fp8_flops: float | None  # dense peak; None: no FP8 tensor cores
    intra_node_bw: float  # GPU-to-GPU in a node (NVLink, or PCIe where there is none), bytes/s each way
    nic_bw: float  # network per GPU, bytes/s each way
    pcie_bw: float  # to host memory (KV checkpoints), bytes/s each way
    per_node: int
    host_memory_bytes: float
    price_per_hour: float  # USD per accelerator-hour
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def peak_flops(self, precision: str) -> float:
        if precision == "fp8":
            return self.fp8_flops or self.bf16_flops  # no FP8 units: FP8 weights run at BF16 rate
        return self.bf16_flops


_NVIDIA = "https://www.nvidia.com/en-us/data-center"

HARDWARE: dict[str, Accelerator] = {
    "h100": Accelerator(
        "h100", "NVIDIA H100 SXM5 80GB", 80 * GB, 3.35 * TB, 989e12, 1979e12, 450 * GB, 50 * GB, 64 * GB, 8, 2 * TB, 3.29,
        sources={
            "memory_bytes, memory_bw, bf16_flops, fp8_flops, intra_node_bw, pcie_bw":
                f"NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column ({_NVIDIA}/h100/): 80 GB HBM3, 3.35 TB/s, "
                "989 TFLOPS BF16 and 1,979 TFLOPS FP8 dense (the datasheet's figures with sparsity are twice these), "
                "NVLink 900 GB/s and PCIe Gen5 128 GB/s, both directions together",
            "nic_bw, per_node, host_memory_bytes":
                "NVIDIA DGX H100 datasheet: 8 GPUs, 8x ConnectX-7 400 Gb/s compute fabric (one per GPU), 2 TB system memory",
            "price_per_hour": "RunPod on-demand H100 SXM (Secure Cloud), $3.29/GPU-hour on 2026-08-19, as tabulated in "
                              "https://huggingface.co/datasets/privum/ai-compute-prices; prices move, override with --prices",
        }),
    "h200": Accelerator(
        "h200", "NVIDIA H200 SXM 141GB", 141 * GB, 4.8 * TB, 989e12, 1979e12, 450 * GB, 50 * GB, 64 * GB, 8, 2 * TB, 3.49,
        sources={
            "memory_bytes, memory_bw, bf16_flops, fp8_flops, intra_node_bw, pcie_bw":
                f"NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column ({_NVIDIA}/h200/): 141 GB HBM3e, 4.8 TB/s, "
                "989 TFLOPS BF16 and 1,979 TFLOPS FP8 dense, NVLink 900 GB/s, PCIe Gen5 128 GB/s (both directions)",
            "nic_bw, per_node, host_memory_bytes":
                "NVIDIA DGX H200 datasheet: 8 GPUs, 8x ConnectX-7 400 Gb/s, 2 TB system memory",
            "price_per_hour": "Lambda on-demand H200 SXM, $3.49/GPU-hour on 2026-09-20, as tabulated in "
                              "https://huggingface.co/datasets/gemmozero/ai-energy-futures-2026; override with --prices",
        }),
    "h20": Accelerator(
        "h20", "NVIDIA H20 96GB", 96 * GB, 4.0 * TB, 148e12, 296e12, 450 * GB, 50 * GB, 64 * GB, 8, 2 * TB, 1.60,
        sources={
            "memory_bytes, memory_bw, bf16_flops, fp8_flops, intra_node_bw":
                "NVIDIA publishes no H20 datasheet; figures as reported for the H20-96G in the table 'H20 vs H800' of "
                "https://www.winzheng.com/en/review/deploy-deepseek-r1-on-h20 (Ant Group's DeepSeek-R1-on-H20 write-up): "
                "96 GB, 4,000 GB/s, 148 TFLOPS BF16, 296 TFLOPS FP8, NVLink 900 GB/s",
            "pcie_bw": "assumption: PCIe Gen5 x16 like the other Hopper parts (64 GB/s each way)",
            "nic_bw, per_node, host_memory_bytes":
                "assumption: an 8-GPU HGX server with one 400 Gb/s NIC per GPU and 2 TB host memory, like a DGX H100",
            "price_per_hour": "estimate: no public per-hour list price found; set to about half an H100's; "
                              "override with --prices",
        }),
    "l40s": Accelerator(
        "l40s", "NVIDIA L40S 48GB", 48 * GB, 864 * GB, 362.05e12, 733e12, 32 * GB, 12.5 * GB, 32 * GB, 8, 1 * TB, 0.99,
        sources={
            "memory_bytes, memory_bw, bf16_flops, fp8_flops, pcie_bw":
                f"NVIDIA L40S datasheet ({_NVIDIA}/l40s/): 48 GB GDDR6, 864 GB/s, 362.05 TFLOPS BF16 and 733 TFLOPS "
                "FP8 dense (the datasheet's 733 / 1,466 are with sparsity), PCIe Gen4 x16 64 GB/s both directions",
            "intra_node_bw": "L40S has no NVLink: GPU-to-GPU goes over PCIe Gen4 x16 (32 GB/s each way)",
            "nic_bw, per_node, host_memory_bytes":
                "assumption: an 8-GPU PCIe server with 100 Gb/s of network per GPU and 1 TB host memory",
            "price_per_hour": "RunPod on-demand L40S, $0.99/GPU-hour on 2026-09-20, as tabulated in "
                              "https://huggingface.co/datasets/gemmozero/ai-energy-futures-2026; override with --prices",
        }),
    "a100": Accelerator(
        "a100", "NVIDIA A100 SXM4 80GB", 80 * GB, 2.039 * TB, 312e12, None, 300 * GB, 25 * GB, 32 * GB, 8, 2 * TB, 1.59,
        sources={
            "memory_bytes, memory_bw, bf16_flops, fp8_flops, intra_node_bw, pcie_bw":
                f"NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column ({_NVIDIA}/a100/): 80 GB HBM2e, "
                "2,039 GB/s, 312 TFLOPS BF16 dense, no FP8, NVLink 600 GB/s, PCIe Gen4 64 GB/s (both directions)",
            "nic_bw, per_node, host_memory_bytes":
                "NVIDIA DGX A100 datasheet (640 GB version): 8 GPUs, 8x ConnectX-6 200 Gb/s, 2 TB system memory",
            "price_per_hour": "RunPod on-demand A100 SXM 80GB (Secure Cloud), $1.59/GPU-hour on 2026-08-19, as "
                              "tabulated in https://huggingface.co/datasets/privum/ai-compute-prices; override with --prices",
        }),
}

# A CPU host's price when none is given: per core-hour, about a general-purpose cloud vCPU's.
HOST_PRICE_PER_CORE_HOUR = 0.04


def host_accelerator(host: dict[str, Any], price_per_hour: float | None = None) -> Accelerator:
    """This CPU host as its profile measured it (`host`: the profile's "host" record): the whole host is
    one accelerator and one node; worker processes are its failure domains."""
    cores = int(host["cores"])
    price = price_per_hour if price_per_hour is not None else HOST_PRICE_PER_CORE_HOUR * cores
    return Accelerator(
        HOST, f"this CPU host ({host.get('cpu', 'CPU')}, {cores} cores)", float(host["memory_bytes"]),
        float(host["stream_bw"]), float(host["fma_flops"]), None, float(host["stream_bw"]), float(host["stream_bw"]),
        float(host["stream_bw"]), 1, float(host["memory_bytes"]), price,
        sources={
            "memory_bytes": "measured: MemTotal of /proc/meminfo",
            "memory_bw": "measured by the profiler: a STREAM-like triad over arrays far larger than the caches",
            "bf16_flops": "measured by the profiler: float32 GEMM rate of one thread times the cores",
            "price_per_hour": f"assumption: ${HOST_PRICE_PER_CORE_HOUR}/core-hour unless --prices names '{HOST}'",
        })


def load_prices(path: str | Path) -> dict[str, float]:
    """Read a price file: a YAML or JSON mapping of hardware name -> USD per accelerator-hour (for
    `host`: per hour of the whole host)."""
    import yaml

    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PlanError(f"--prices {source}: cannot read it ({e.strerror or e})") from None
    try:
        raw = json.loads(text) if source.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise PlanError(f"--prices {source}: not valid {'JSON' if source.endswith('.json') else 'YAML'} ({e})") from None
    if not isinstance(raw, dict):
        raise PlanError(f"--prices {source}: expected a mapping of hardware name to price per hour")
    known = sorted([*HARDWARE, HOST])
    prices = {}
    for name, value in raw.items():
        if name not in known:
            raise PlanError(f"--prices {source}: unknown hardware {name!r} (known: {', '.join(known)})")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise PlanError(f"--prices {source}: the price of {name} must be a positive number, got {value!r}")
        prices[name] = float(value)
    return prices


def resolve(names: list[str], prices: dict[str, float] | None = None, host: Accelerator | None = None
            ) -> dict[str, Accelerator]:
    """The named accelerators with price overrides applied; an unknown name is a PlanError."""
    prices = prices or {}
    out = {}
    for name in names:
        key = name.strip().lower()
        if key == HOST:
            if host is None:
                raise PlanError("hardware 'host' needs a profile of this host: run plan with --profile first")
            chosen = host
        elif key in HARDWARE:
            chosen = HARDWARE[key]
        else:
            raise PlanError(f"unknown hardware {name!r} (known: {', '.join(sorted([*HARDWARE, HOST]))})")
        if key in prices:
            chosen = replace(chosen, price_per_hour=prices[key],
                             sources={**chosen.sources, "price_per_hour": "--prices"})
        out[key] = chosen
    return out
