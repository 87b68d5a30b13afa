"""Fused Numba CUDA kernel for the masked data term (identity forward model).

One pass over ``out``, ``target`` and the (channel-shared) mask computes, per image b,

    num_b = sum_{c,y,x} m_b[y,x] * (out - target)^2        den_b = sum_{y,x} m_b[y,x]

(block reduction in shared memory, then one atomic per block and accumulator) and writes the
unnormalised gradient ``g = 2 * m * (out - target)``. The per-image normalisation 1 / (C * den_b)
is applied by the caller together with the incoming gradient (see kernels.autograd).

numba is imported lazily inside :func:`get_kernels`, so importing this module never imports numba.

Launch layout: grid ``(blocks_per_image, B)``, 1-D blocks of ``threads`` (a power of two); every
block strides over the pixels of its own image, so the per-image reduction needs one atomic per block.
"""
from __future__ import annotations

import functools
import math
import os

MAX_THREADS = 1024  # size of the shared reduction buffers; threads per block must be <= this


def simulator_enabled() -> bool:
    """True when numba runs (or will run) CUDA kernels in its Python simulator."""
    import sys
    nb = sys.modules.get("numba")
    if nb is not None and hasattr(nb, "config") and hasattr(nb.config, "ENABLE_CUDASIM"):
        return bool(nb.config.ENABLE_CUDASIM)
    try:
        return int(os.environ.get("NUMBA_ENABLE_CUDASIM", "0") or 0) != 0
    except ValueError:
        return False


def launch_config() -> dict:
    """Threads per block, blocks per image (reduction kernels) and total blocks (elementwise kernels).

    Overridable with DIP_KERNEL_THREADS / DIP_KERNEL_BLOCKS_PER_IMAGE / DIP_KERNEL_BLOCKS. Under the
    simulator every CUDA thread is a Python thread, so the defaults there are tiny.
    """
    if simulator_enabled():
        cfg = {"threads": 32, "blocks_per_image": 2, "blocks": 4}
    else:
        cfg = {"threads": 256, "blocks_per_image": 0, "blocks": 4096}  # 0 = from the work size
    for key, env in (("threads", "DIP_KERNEL_THREADS"), ("blocks_per_image", "DIP_KERNEL_BLOCKS_PER_IMAGE"),
                     ("blocks", "DIP_KERNEL_BLOCKS")):
        if os.environ.get(env):
            cfg[key] = int(os.environ[env])
    t = cfg["threads"]
    if t < 1 or t > MAX_THREADS or t & (t - 1):
        raise ValueError(f"threads per block must be a power of two <= {MAX_THREADS}, not {t}")
    return cfg


def reduction_grid(n_per_image: int, batch: int, cfg: dict | None = None) -> tuple[tuple[int, int], int]:
    """((blocks_per_image, B), threads) for a per-image reduction over ``n_per_image`` items."""
    cfg = cfg or launch_config()
    t = cfg["threads"]
    need = max(1, math.ceil(n_per_image / t))
    bpi = cfg["blocks_per_image"]
    if bpi <= 0:  # enough blocks to fill the GPU, a few items per thread, few atomics
        bpi = max(1, min(need, max(4, 2048 // max(batch, 1)), 256))
    return (min(bpi, need), batch), t


def plane_grid(n_per_plane: int, planes: int, cfg: dict | None = None) -> tuple[tuple[int, int], int]:
    """((blocks_x, planes), threads) for grid-stride loops over ``planes`` planes of ``n_per_plane`` items,
    about ``cfg["blocks"]`` blocks in all."""
    cfg = cfg or launch_config()
    t = cfg["threads"]
    bx = max(1, min(math.ceil(n_per_plane / t), cfg["blocks"] // max(planes, 1)))
    return (bx, planes), t


def flat_grid(n: int, cfg: dict | None = None) -> tuple[int, int]:
    """(blocks, threads) for a grid-stride loop over ``n`` items."""
    cfg = cfg or launch_config()
    t = cfg["threads"]
    return max(1, min(cfg["blocks"], math.ceil(n / t))), t


@functools.lru_cache(maxsize=None)
def get_kernels():
    """Compile-on-first-call dispatchers: ``{"masked_fwd": ...}``."""
    # Module globals, not closure variables: the CUDA simulator swaps the global ``cuda`` of a kernel's
    # module for its fake one, so the kernels must look ``cuda`` up as a global.
    global cuda, float32
    from numba import cuda, float32

    MAXT = MAX_THREADS

    @cuda.jit(fastmath=False)
    def masked_fwd(o, t, m, has_mask, g, acc):
        """o, t, g: (B, C, H, W); m: (Bm, 1, H, W) with Bm in {1, B} (ignored unless has_mask);
        acc: (B, 2) zero-initialised float32 -> [:, 0] += masked SSE, [:, 1] += mask sum."""
        sn = cuda.shared.array(MAXT, float32)
        sd = cuda.shared.array(MAXT, float32)
        b = cuda.blockIdx.y
        C = o.shape[1]
        H = o.shape[2]
        W = o.shape[3]
        mb = b if m.shape[0] > 1 else 0
        num = float32(0.0)
        den = float32(0.0)
        tid = cuda.threadIdx.x
        start = cuda.blockIdx.x * cuda.blockDim.x + tid
        stride = cuda.gridDim.x * cuda.blockDim.x
        for k in range(start, H * W, stride):
            y = k // W
            x = k - y * W
            mk = float32(1.0)
            if has_mask:
                mk = m[mb, 0, y, x]
            den += mk
            for c in range(C):
                d = o[b, c, y, x] - t[b, c, y, x]
                wd = mk * d
                num += wd * d
                g[b, c, y, x] = float32(2.0) * wd
        sn[tid] = num
        sd[tid] = den
        cuda.syncthreads()
        s = cuda.blockDim.x // 2
        while s > 0:
            if tid < s:
                sn[tid] += sn[tid + s]
                sd[tid] += sd[tid + s]
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            cuda.atomic.add(acc, (b, 0), sn[0])
            cuda.atomic.add(acc, (b, 1), sd[0])

    return {"masked_fwd": masked_fwd}


# Numba type signatures of every kernel here, for compile checks (cuda.compile_ptx) without a GPU.
SIGNATURES = {
    "masked_fwd": "void(float32[:,:,:,::1], float32[:,:,:,::1], float32[:,:,:,::1], boolean, "
                  "float32[:,:,:,::1], float32[:,::1])",
}
