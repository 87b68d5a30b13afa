"""Choose the data-term implementation: fused Numba CUDA kernels on CUDA, plain torch elsewhere.

``use_kernels``: None = automatic (CUDA kernels when the tensors are on CUDA and numba-cuda works),
False = force the torch reference (for comparison), True = require the CUDA kernels.
"""
from __future__ import annotations

import torch

from kernels.reference import masked_mse_ref, downsampled_mse_ref


def data_term(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, factor: int = 1,
              use_kernels: bool | None = None) -> torch.Tensor:
    if factor == 1:
        return masked_mse_ref(out, target, mask)
    return downsampled_mse_ref(out, target, factor, mask)
