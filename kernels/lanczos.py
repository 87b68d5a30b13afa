"""The Lanczos2 downsampler of the original repository (models/downsampler.py) and its exact adjoint.

A separable lanczos kernel with support 2 at phase 1/2 and ``kernel_width = 4*factor + 1``, which at
phase 1/2 is a ``4*factor``-tap array, applied at stride ``factor`` after replication padding of
``(4*factor - factor)/2`` pixels, so that an ``H x W`` image becomes ``H/factor x W/factor``. Plain
numpy/torch: the reference the fused CUDA kernels are tested against, and the CPU path.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


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
