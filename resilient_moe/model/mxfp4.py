"""MXFP4 (OCP Microscaling Formats v1.0): 4-bit E2M1 elements in blocks of 32 that share one power-of-two scale.

GPT-OSS checkpoints store their experts this way, as `*_blocks` and `*_scales` tensors:
blocks [..., G, 16] uint8 hold 32 elements per block, two per byte, the element with the lower index in
the low nibble; scales [..., G] uint8 hold each block's shared exponent as E8M0 (biased by 127). The
element code is a sign bit (8) over an index into `E2M1_VALUES`. A row of G * 32 elements dequantizes to
value * 2 ** (scale - 127), which is exact in float32 and bfloat16.
"""

from __future__ import annotations

import torch

from resilient_moe.model.families import MXFP4_BLOCK

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitudes of codes 0..7
_SCALE_BIAS = 127
_EMAX_E2M1 = 2  # exponent of the largest E2M1 magnitude (6 = 1.5 * 2**2)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> values [..., G * 32] in `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    magnitudes = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    lut = torch.cat([magnitudes, -magnitudes])  # [16], indexed by the 4-bit code
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()  # [..., G, 32]
    exponents = scales.to(torch.int32) - _SCALE_BIAS  # [..., G]
    values = torch.ldexp(lut[codes], exponents.unsqueeze(-1))  # [..., G, 32]
    return values.flatten(-2).to(dtype)


def quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., K] (K a multiple of 32) -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8).

    As the OCP spec sets it: a block's shared exponent is floor(log2(max |x|)) - 2, so its largest element
    lands in [4, 8); elements round to the nearest E2M1 value (ties to the even code) and saturate at 6.
    """
    *prefix, K = values.shape
    if K % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 needs rows of a multiple of {MXFP4_BLOCK} elements, got {K}")
    x = values.float().reshape(*prefix, K // MXFP4_BLOCK, MXFP4_BLOCK)  # [..., G, 32]
    amax = x.abs().amax(dim=-1)  # [..., G]
    tiny = torch.finfo(torch.float32).tiny
    exponent = torch.floor(torch.log2(amax.clamp_min(tiny))) - _EMAX_E2M1
    exponent = exponent.clamp(-_SCALE_BIAS, _SCALE_BIAS).to(torch.int32)
    scaled = torch.ldexp(x, -exponent.unsqueeze(-1))  # [..., G, 32]
    magnitude_codes = _round_to_e2m1(scaled.abs())
    codes = magnitude_codes | ((scaled < 0).to(torch.uint8) << 3)  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., G, 16]
    return blocks.contiguous(), (exponent + _SCALE_BIAS).to(torch.uint8).contiguous()


def _round_to_e2m1(magnitude: torch.Tensor) -> torch.Tensor:
    """|x| -> code 0..7 of the nearest E2M1 magnitude, ties to the even code, saturating at 6."""
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=magnitude.device)
    upper = torch.searchsorted(grid, magnitude.contiguous()).clamp(max=len(E2M1_VALUES) - 1)  # first grid >= x
    lower = (upper - 1).clamp(min=0)
    to_lower = magnitude - grid[lower]
    to_upper = grid[upper] - magnitude
    # Exactly one of two neighbouring codes is even; a tie goes to it.
    pick_lower = (to_lower < to_upper) | ((to_lower == to_upper) & (lower % 2 == 0))
    code = torch.where(pick_lower, lower, upper)
    return torch.where(magnitude >= grid[-1], torch.full_like(code, len(E2M1_VALUES) - 1), code).to(torch.uint8)
