"""Plain-torch data terms. They are the CPU path and the reference the CUDA kernels are tested against.

Shapes: ``out`` (B, C, H, W); ``target`` (B, C, H, W) or, for the downsampled term, (B, C, H/f, W/f);
``mask`` (B, 1, h, w) shared by the channels, 1 = known (any float in [0, 1] works as a weight).
Both return per-image losses (B,): the masked sum of squared errors divided by each image's count of
known values (known pixels times C). An image with no known pixel gets loss 0.
"""
from __future__ import annotations

import torch
from kernels.lanczos import lanczos2_downsample


def masked_mse_ref(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    b, c = out.shape[:2]
    d = (out - target) ** 2
    if mask is None:
        return d.reshape(b, -1).mean(1)
    mask = mask.expand(b, 1, *mask.shape[2:])  # one mask may serve the whole batch
    num = (d * mask).reshape(b, -1).sum(1)
    den = mask.reshape(b, -1).sum(1) * c
    return num / den.clamp_min(1e-12)


def lanczos2_downsample_ref(x: torch.Tensor, factor: int) -> torch.Tensor:
    return lanczos2_downsample(x, factor)


def downsampled_mse_ref(out: torch.Tensor, target_lr: torch.Tensor, factor: int,
                        mask_lr: torch.Tensor | None = None) -> torch.Tensor:
    return masked_mse_ref(lanczos2_downsample(out, factor), target_lr, mask_lr)
