"""Data-term kernels: a plain-torch reference (also the CPU path) and fused Numba CUDA kernels.

Heavy imports (numba) happen lazily inside the CUDA modules; importing this package is cheap.

- kernels.reference: masked_mse_ref, downsampled_mse_ref (torch; CPU path and test oracle)
- kernels.autograd: MaskedMSE, DownsampledMSE (torch.autograd.Function over the Numba CUDA kernels)
- kernels.dispatch: data_term(out, target, mask, factor, use_kernels) picks one of them
"""
from kernels.reference import masked_mse_ref, downsampled_mse_ref  # noqa: F401
from kernels.dispatch import data_term, kernels_available  # noqa: F401
