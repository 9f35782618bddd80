"""Rotary position embeddings: inverse frequencies for each supported scaling type, and a cos/sin
table indexed by absolute position (so a token's rotation never depends on its batch)."""

from __future__ import annotations

import math

import torch

from resilient_moe.model.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [d/2] float32, attention scaling applied to cos and sin)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    base_freq = rope.theta**exponents  # [d/2]
    inv_freq = 1.0 / base_freq
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if rope.rope_type == "yarn":
        return _yarn(base_freq, rope, head_dim)
    raise ValueError(f"unsupported rope type {rope.rope_type!r}")


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are interpolated by `factor`, short ones kept, and the band between is blended.
    original = rope.original_max_position_embeddings
    assert original is not None
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original / rope.low_freq_factor
    high_freq_wavelen = original / rope.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    in_band = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context extended `factor` times (1 when not extended)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(base_freq: torch.Tensor, rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    # YaRN (arXiv 2309.00071): per-dimension mix of interpolation and extrapolation, chosen by how
    # many rotations a dimension makes over the original context, plus a cos/sin magnitude fix.
    original = rope.original_max_position_embeddings
    assert original is not None
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def dim_for_rotations(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = dim_for_rotations(rope.beta_fast)
    high = dim_for_rotations(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_share = 1 - ramp
    interpolated = 1.0 / (factor * base_freq)
    extrapolated = 1.0 / base_freq
    inv_freq = interpolated * (1 - extrapolation_share) + extrapolated * extrapolation_share
    return inv_freq, attention_factor


class RotaryTable:
    """cos/sin for every position up to `max_positions`, computed once, in the model dtype."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, dtype: torch.dtype, device: torch.device):
        inv_freq, scaling = inverse_frequencies(rope, head_dim)
        positions = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq[None, :]  # [P, d/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, d]
        self.cos = (angles.cos() * scaling).to(dtype=dtype, device=device)
        self.sin = (angles.sin() * scaling).to(dtype=dtype, device=device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, d]."""
        return self.cos[positions], self.sin[positions]
