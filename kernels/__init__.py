"""Data-term kernels: a plain-torch reference (also the CPU path) and fused Numba CUDA kernels.

Heavy imports (numba) happen lazily inside the CUDA modules; importing this package is cheap.
"""
from kernels.reference import masked_mse_ref, downsampled_mse_ref  # noqa: F401
