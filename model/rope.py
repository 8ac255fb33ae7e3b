"""Rotary position embedding with YaRN, in the released checkpoints' interleaved-pair layout (docs/model.md §3).

The released weights store each RoPE vector as adjacent pairs (x0, x1), (x2, x3), ...; pair i is rotated by
angle position * inv_freq_i (a complex multiplication, GPT-J style). We rotate the pairs in place, so no weight
permutation is needed on load or save. Plain NeoX `rotate_half` on these weights would be wrong.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 * mscale * ln(scale) + 1 (1.0 when not extending)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rotary dimension whose wavelength fits `num_rotations` times into `max_pos`."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(dim: int, theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (dim/2,) in fp32: plain RoPE, or YaRN-blended between original and interpolated."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    base_freq = 1.0 / (theta ** exponents)  # (dim/2,)
    if rope_scaling is None:
        return base_freq
    factor = float(rope_scaling["factor"])
    original = int(rope_scaling["original_max_position_embeddings"])
    beta_fast = float(rope_scaling.get("beta_fast") or 32)
    beta_slow = float(rope_scaling.get("beta_slow") or 1)
    low = _yarn_correction_dim(beta_fast, dim, theta, original)
    high = _yarn_correction_dim(beta_slow, dim, theta, original)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    # ramp=0: keep the original frequency (high-frequency dims extrapolate); ramp=1: interpolate by `factor`.
    return base_freq / factor * ramp + base_freq * (1 - ramp)


def rope_cos_sin_scale(rope_scaling: dict | None) -> float:
    """Factor on cos/sin: mscale(s, mscale) / mscale(s, mscale_all_dim), exactly 1.0 for the released configs."""
    if rope_scaling is None:
        return 1.0
    if rope_scaling.get("attention_factor") is not None:
        return float(rope_scaling["attention_factor"])
    factor = float(rope_scaling["factor"])
    return yarn_get_mscale(factor, rope_scaling.get("mscale") or 1.0) / yarn_get_mscale(
        factor, rope_scaling.get("mscale_all_dim") or 0.0
    )


def softmax_scale(head_dim: int, rope_scaling: dict | None) -> float:
    """The attention logit scale: head_dim^-0.5 times m^2, m = mscale(s, mscale_all_dim) (docs/model.md §2.3:
    0.114721 for V2)."""
    scale = head_dim ** -0.5
    if rope_scaling is not None and rope_scaling.get("mscale_all_dim"):
        m = yarn_get_mscale(float(rope_scaling["factor"]), float(rope_scaling["mscale_all_dim"]))
        scale *= m * m
    return scale


class RotaryEmbedding(torch.nn.Module):
    """The (YaRN) inverse frequencies; `forward(position_ids)` gives cos/sin of shape (B, S, dim/2) in fp32.

    The frequencies are a plain fp32 attribute rather than a buffer, so casting the model to bf16 (or building it on
    the meta device) never degrades or erases them; they follow the positions' device on use.
    """

    def __init__(self, dim: int, config: ModelConfig):
        super().__init__()
        self.dim = dim
        self.inv_freq = inv_frequencies(dim, config.rope_theta, config.rope_scaling)  # (dim/2,) fp32, on CPU
        self.scale = rope_cos_sin_scale(config.rope_scaling)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        angles = position_ids[..., None].float() * self.inv_freq  # (B, S, dim/2)
        return angles.cos() * self.scale, angles.sin() * self.scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim of x (B, H, S, d) by cos/sin (B, S, d/2); math in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, S, d/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, S, d/2)
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
