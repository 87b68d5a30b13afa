"""Degradation operators: the physics that the data term compares the generator's output against.

In the deepinv style, an operator is a small ``nn.Module`` whose state lives in buffers, with a forward
operator ``A`` and its adjoint ``A_adjoint``. Here ``A = M * D``: ``D`` is the degradation, ``M`` the mask of
the measurements that are known (1) or not (0), one per fit of a batch:

- denoise / jpeg: ``D`` is the identity, and ``M`` masks out only the canvas padding;
- inpaint: ``D`` is the identity; ``M`` is also 0 in the holes;
- sr: ``D`` is the original repository's Lanczos2 downsampler (:mod:`kernels.lanczos`), ``M`` is on the
  low-res grid.

The engine (pipeline.engine.BatchedFitter) holds one operator per batch, with one mask row per slot, and
asks it for the data term of every slot::

    L_s = sum(M_s * (D x_s - y_s)^2) / (C * sum(M_s))         (operator.data_term(x, y))

computed by fused CUDA kernels on a GPU and by plain torch elsewhere (:mod:`kernels.dispatch`).

:Examples:

>>> import torch
>>> op = make_operator("sr", 2, slots=1, shape=(4, 4))
>>> op.factor, tuple(op.mask.shape)
(2, (1, 1, 4, 4))
>>> op.mask[0] = 1.0
>>> x = torch.full((1, 3, 8, 8), 0.25)
>>> op.A(x).shape, round(float(op.A(x).mean()), 6)  # Lanczos2 maps a constant to itself
(torch.Size([1, 3, 4, 4]), 0.25)
>>> round(float(op.data_term(x, torch.full((1, 3, 4, 4), 0.75))[0]), 6)  # (0.25 - 0.75)^2
0.25
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.lanczos import lanczos2_downsample, lanczos2_pad, lanczos2_taps, lanczos2_upsample_adjoint  # noqa: F401


class Operator(nn.Module):
    """Identity degradation (denoising, JPEG artifact removal, inpainting), with an optional mask.

    ``mask``: (B, 1, h, w) on the measurement grid, 1 = known; None = every measurement is known."""

    factor = 1

    def __init__(self, slots: int | None = None, shape: tuple[int, int] | None = None):
        super().__init__()
        mask = torch.zeros(slots, 1, *shape) if slots is not None else None
        self.register_buffer("mask", mask, persistent=False)

    def D(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def D_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def A(self, x: torch.Tensor) -> torch.Tensor:
        y = self.D(x)
        return y if self.mask is None else y * self.mask

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.D_adjoint(y if self.mask is None else y * self.mask)

    def forward(self, x):
        return self.A(x)

    def data_term(self, x: torch.Tensor, y: torch.Tensor, use_kernels: bool | None = None) -> torch.Tensor:
        """Per-fit ``sum(M (D x - y)^2) / (C sum M)``, (B,): x (B, C, H, W), y on the measurement grid."""
        from kernels import dispatch
        return dispatch.data_term(x, y, self.mask, self.factor, use_kernels=use_kernels)


class Identity(Operator):
    pass


class Lanczos2Downsample(Operator):
    """D: x (B, C, H, W) -> (B, C, H/f, W/f); H and W must be multiples of f."""

    def __init__(self, factor: int, slots: int | None = None, shape: tuple[int, int] | None = None):
        super().__init__(slots, shape)
        if factor not in (2, 4, 8):
            raise ValueError(f"super-resolution factor must be 2, 4 or 8, not {factor}")
        self.factor = factor
        self.register_buffer("taps", torch.tensor(lanczos2_taps(factor), dtype=torch.float32))

    def D(self, x: torch.Tensor) -> torch.Tensor:
        return lanczos2_downsample(x, self.factor, self.taps)

    def D_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return lanczos2_upsample_adjoint(y, self.factor, self.taps)


def make_operator(task: str, factor: int = 1, slots: int | None = None,
                  shape: tuple[int, int] | None = None) -> Operator:
    """The operator of a task (``factor``: the SR scale, FitConfig.factor), with a mask of ``slots`` rows of
    ``shape`` (the measurement grid) when given."""
    if task == "sr":
        return Lanczos2Downsample(factor, slots, shape)
    if task in ("denoise", "jpeg", "inpaint"):
        return Identity(slots, shape)
    raise ValueError(f"unknown task {task!r}")
