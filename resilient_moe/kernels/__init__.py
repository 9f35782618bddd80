"""Batch-invariant Triton kernels for the GPU, and the choice of which kernels a model runs.

A request's tokens must not depend on what shares its batch (model/ops.py explains why every
resilience guarantee rests on that). On CPU the native C GEMM (csrc/kernels.c) gives that; on GPUs
cuBLAS and torch pick different kernels, tile shapes and split-K strategies for different batch
sizes, so a row's bits change with its batch. The kernels here fix the reduction order of every
output element by construction:

* `matmul`: persistent, one tile configuration per weight shape (never per batch), K walked in
  fixed BLOCK_K steps from 0 upward in one program: no split-K, no atomics.
* `fused_moe`: a grouped GEMM over rows sorted by expert, with one pinned configuration; a row's
  result depends on its own input and its expert's weights, never on which rows share its tile.
* `rms_norm`: one program per row.
* `paged_attention`: a fixed split SIZE over each row's own keys (the number of splits follows the
  row's length, not the batch), partials combined in split order by one program per row.
* `log_softmax`: one program per row, fixed chunk order.

Which kernels run is the `kernels` setting (EngineConfig, `--kernels`): `auto` (native on CPU,
triton on CUDA), `native` (the C GEMM on CPU in float32, torch with rows padded elsewhere: today's
numerics), `torch` (plain torch ops: fastest to write, NOT batch-invariant), `triton` (these kernels;
on a CPU only through Triton's interpreter, `TRITON_INTERPRET=1`, which is slow and meant for tests,
and correct for float32 and float16 only: it computes bfloat16 wrongly without saying so).

Triton reads TRITON_INTERPRET once, when it is imported: its own library (tl.sum, tl.max, ...) is
decorated for the interpreter or for the compiler then, and the two cannot mix in one process. So the
variable must be set before the process starts (tests run the interpreted kernels in child processes),
and `resolve_kernels` checks what the imported library is, not the variable.

This module imports neither torch nor triton, so configuration can check a choice cheaply.
"""

from __future__ import annotations

from resilient_moe.errors import ConfigError

KERNEL_CHOICES = ("auto", "native", "torch", "triton")
TRITON_INSTALL_HINT = "pip install 'resilient-moe[gpu]' (or pip install triton)"


def interpreted() -> bool:
    """Whether the Triton imported in this process runs kernels through its CPU interpreter (it was
    imported with TRITON_INTERPRET=1). Imports triton; call it only when triton is wanted."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.sum, InterpretedFunction)


def resolve_kernels(choice: str, device_type: str, dtype: str = "float32") -> str:
    """The kernels `choice` (one of KERNEL_CHOICES) means on a device of `device_type` ("cpu", "cuda")
    for a model in `dtype` (a torch dtype name: "float32", "bfloat16", ...).

    Raises ConfigError naming the `kernels` setting when the choice cannot run there.
    """
    if choice not in KERNEL_CHOICES:
        raise ConfigError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    if choice == "auto":
        choice = "triton" if device_type == "cuda" else "native"
    if choice != "triton":
        return choice
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ConfigError(f"kernels: triton needs the triton package, which is not installed ({TRITON_INSTALL_HINT}); "
                          "or choose kernels native or torch") from None
    if device_type == "cpu" and not interpreted():
        raise ConfigError("kernels: triton on a CPU runs only through Triton's interpreter: set TRITON_INTERPRET=1 "
                          "before the process starts (slow, for tests; float32 and float16 only), or use a CUDA "
                          "device, or kernels native")
    if device_type == "cuda" and interpreted():
        raise ConfigError("kernels: triton on CUDA, but this process imported Triton with TRITON_INTERPRET=1, which "
                          "would run every kernel on the CPU; unset it")
    if device_type == "cpu" and dtype == "bfloat16":
        raise ConfigError("kernels: triton on a CPU (Triton's interpreter) computes bfloat16 wrongly without an "
                          "error; use dtype float32 there, or kernels native")
    if device_type not in ("cpu", "cuda"):
        raise ConfigError(f"kernels: triton runs on CUDA devices (or a CPU with TRITON_INTERPRET=1), not {device_type!r}")
    return "triton"
