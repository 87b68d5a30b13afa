"""Degradation operators: the forward model A that the data term compares against.

In the deepinv style, an operator is a small ``nn.Module`` whose state lives in buffers, with a
forward operator ``A`` and its adjoint ``A_adjoint``. The engine fits ``|| M * (A(G(z)) - y) ||^2``
where ``M`` is the (per-pixel) mask of known measurements.

- denoise / jpeg: A is the identity.
- inpaint: A is the identity; the mask (1 = known) enters the data term.
- sr: A is the original repository's Lanczos2 downsampler (models/downsampler.py): a separable
  lanczos kernel with support 2 at phase 1/2 and ``kernel_width = 4*factor + 1``, which at phase 1/2
  is a ``4*factor``-tap array, applied at stride ``factor`` after replication padding of
  ``(4*factor - factor)/2`` pixels, so that an ``H x W`` image becomes ``H/factor x W/factor``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def lanczos2_taps(factor: int) -> np.ndarray:
    """The 1-D Lanczos2 taps of the original Downsampler at phase 1/2 (float64, sums to 1).

    The original builds a 2-D kernel whose entries are products of a row and a column term, then
    normalises the whole array; that equals the outer product of these normalised 1-D taps.
    """
    if factor < 1:
        raise ValueError("factor must be >= 1")
    support = 2
    kernel_width = 4 * factor + 1
    n = kernel_width - 1  # phase 1/2 drops one tap
    center = (kernel_width + 1) / 2.0
    taps = np.empty(n, dtype=np.float64)
    for i in range(1, n + 1):
        d = abs(i + 0.5 - center) / factor
        val = 1.0
        if d != 0:
            val = support * math.sin(math.pi * d) * math.sin(math.pi * d / support) / (math.pi ** 2 * d * d)
        taps[i - 1] = val
    return taps / taps.sum()


def lanczos2_pad(factor: int) -> int:
    """Replication padding on each side (the original's preserve_size for an even kernel)."""
    return (4 * factor - factor) // 2


def lanczos2_downsample(x: torch.Tensor, factor: int, taps: torch.Tensor | None = None) -> torch.Tensor:
    """Separable Lanczos2 filter at stride ``factor`` after replication padding: (B,C,H,W) -> (B,C,H/f,W/f)."""
    b, c, h, w = x.shape
    if h % factor or w % factor:
        raise ValueError(f"image {h}x{w} is not a multiple of the factor {factor}")
    if taps is None:
        taps = torch.tensor(lanczos2_taps(factor))
    k = taps.to(device=x.device, dtype=x.dtype)
    p = lanczos2_pad(factor)
    t = F.pad(x.reshape(b * c, 1, h, w), (p,) * 4, mode="replicate")
    t = F.conv2d(t, k.view(1, 1, 1, -1), stride=(1, factor))
    t = F.conv2d(t, k.view(1, 1, -1, 1), stride=(factor, 1))
    return t.reshape(b, c, h // factor, w // factor)


def lanczos2_upsample_adjoint(y: torch.Tensor, factor: int, taps: torch.Tensor | None = None) -> torch.Tensor:
    """The exact adjoint of :func:`lanczos2_downsample`: (B,C,h,w) -> (B,C,h*f,w*f)."""
    b, c, h, w = y.shape
    f, p = factor, lanczos2_pad(factor)
    H, W = h * f, w * f
    if taps is None:
        taps = torch.tensor(lanczos2_taps(factor))
    k = taps.to(device=y.device, dtype=y.dtype)
    t = y.reshape(b * c, 1, h, w)
    t = F.conv_transpose2d(t, k.view(1, 1, -1, 1), stride=(f, 1))
    t = F.conv_transpose2d(t, k.view(1, 1, 1, -1), stride=(1, f))  # now (H + 2p) x (W + 2p)
    # adjoint of replication padding: fold the padded borders back onto the edge pixels
    t = t.clone()
    t[..., p, :] += t[..., :p, :].sum(-2)
    t[..., -p - 1, :] += t[..., -p:, :].sum(-2)
    t[..., :, p] += t[..., :, :p].sum(-1)
    t[..., :, -p - 1] += t[..., :, -p:].sum(-1)
    return t[..., p:-p, p:-p].reshape(b, c, H, W)


class Operator(nn.Module):
    """Identity forward model (denoising, JPEG artifact removal, inpainting)."""

    factor = 1

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def forward(self, x):
        return self.A(x)


class Identity(Operator):
    pass


class Lanczos2Downsample(Operator):
    """x (B, C, H, W) -> (B, C, H/f, W/f); H and W must be multiples of f."""

    def __init__(self, factor: int):
        super().__init__()
        if factor not in (2, 4, 8):
            raise ValueError(f"super-resolution factor must be 2, 4 or 8, not {factor}")
        self.factor = factor
        self.register_buffer("taps", torch.tensor(lanczos2_taps(factor), dtype=torch.float32))

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return lanczos2_downsample(x, self.factor, self.taps)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return lanczos2_upsample_adjoint(y, self.factor, self.taps)


def make_operator(task: str, scale: int = 1) -> Operator:
    if task == "sr":
        return Lanczos2Downsample(scale)
    if task in ("denoise", "jpeg", "inpaint"):
        return Identity()
    raise ValueError(f"unknown task {task!r}")
