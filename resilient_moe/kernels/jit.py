"""`@kernel`: a Triton kernel compiled for the GPU, or run by Triton's CPU interpreter, as
TRITON_INTERPRET says when it is launched.

`triton.jit` decides between the two once, when it decorates a function, so a module of plain
`@triton.jit` kernels is fixed by whatever the environment said when it was first imported. Deciding
at launch instead lets one process hold both (a GPU test and an interpreter test in one pytest run)
and keeps importing this package free of side effects. Kernels here call no other jitted function,
so only the launched function needs the choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import triton
from triton import knobs


class Kernel:
    """A Triton kernel launched as ``kernel[grid](*args)``; options are `triton.jit`'s."""

    def __init__(self, fn: Callable[..., None], **options: Any) -> None:
        self.fn = fn
        self.options = options
        self._variants: dict[bool, Any] = {}  # interpreted? -> the jitted function (it caches its compilations)

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        interpret = bool(knobs.runtime.interpret)
        variant = self._variants.get(interpret)
        if variant is None:
            variant = self._variants[interpret] = triton.jit(self.fn, **self.options)  # reads the knob now
        return variant[grid]


def kernel(fn: Callable[..., None] | None = None, **options: Any) -> Any:
    """Decorator: ``@kernel`` or ``@kernel(do_not_specialize=["M"])``."""
    if fn is None:
        return lambda f: Kernel(f, **options)
    return Kernel(fn, **options)
