"""Fused Numba CUDA kernels for the super-resolution data term (Lanczos2 downsampling).

Forward (``ds_fwd``): for every low-res pixel (i, j) and channel c,

    lr = sum_{u,v} k[u] k[v] x[clamp(i f + u - p), clamp(j f + v - p)]     (p = lanczos2_pad(f))

which is exactly kernels.lanczos.lanczos2_downsample (replication padding, stride f); then
r = lr - target, and per image num_b += m r^2, den_b += m (block reduction, one atomic per block),
and the unnormalised low-res gradient w = 2 m r is stored.

Backward (``ds_bwd``): the exact adjoint, as a gather. The 1-D operator "replication-pad, filter,
subsample" is a (n/f x n) matrix A; its transpose is banded: high-res row y receives from at most
``nb`` consecutive low-res rows starting at ``i0[y]``, with weights ``band[y, :]`` (the border rows
also collect the padded taps: that is the adjoint of replication padding). Then

    grad[b, c, y, x] = s_b * sum_{a, e} band_y[y, a] band_x[x, e] w[b, c, i0_y[y] + a, i0_x[x] + e]

with s_b = (incoming grad_b) / (C * den_b). No atomics, deterministic.

numba is imported lazily inside :func:`get_kernels`.
"""
from __future__ import annotations

import functools

import numpy as np

from kernels.masked import MAX_THREADS
from kernels.lanczos import lanczos2_pad, lanczos2_taps


def lanczos2_matrix(n: int, factor: int) -> np.ndarray:
    """The 1-D downsampling operator as a dense (n/f, n) float64 matrix (padding folded in)."""
    if n % factor:
        raise ValueError(f"size {n} is not a multiple of {factor}")
    k = lanczos2_taps(factor)
    p = lanczos2_pad(factor)
    m = n // factor
    A = np.zeros((m, n), np.float64)
    for i in range(m):
        for u in range(len(k)):
            A[i, min(max(i * factor + u - p, 0), n - 1)] += k[u]
    return A


@functools.lru_cache(maxsize=64)
def band_tables(n: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """(band (n, nb) float32, i0 (n,) int32): row y of A^T is band[y] placed at columns i0[y]..i0[y]+nb-1.

    Entries past the last low-res row are zero (the kernel also bounds-checks them).
    """
    A = lanczos2_matrix(n, factor)
    m = n // factor
    At = A.T  # (n, m)
    nz = At != 0
    first = np.where(nz.any(1), nz.argmax(1), 0)
    last = np.where(nz.any(1), m - 1 - nz[:, ::-1].argmax(1), 0)
    nb = int((last - first).max()) + 1
    band = np.zeros((n, nb), np.float64)
    for y in range(n):
        w = last[y] - first[y] + 1
        band[y, :w] = At[y, first[y]:first[y] + w]
    return band.astype(np.float32), first.astype(np.int32)


@functools.lru_cache(maxsize=None)
def get_kernels():
    """Compile-on-first-call dispatchers: ``{"ds_fwd": ..., "ds_bwd": ...}``.

    Longer than 80 lines on purpose: the two CUDA kernels are defined inside it, so that numba is only
    imported (and the kernels only compiled) when a CUDA data term is first used."""
    # Module globals, not closure variables: the CUDA simulator swaps the global ``cuda`` of a kernel's
    # module for its fake one, so the kernels must look ``cuda`` up as a global.
    global cuda, float32
    from numba import cuda, float32

    MAXT = MAX_THREADS

    @cuda.jit(fastmath=False)
    def ds_fwd(x, t, m, has_mask, k, f, p, w, acc):
        """x: (B, C, H, W); t, w: (B, C, H/f, W/f); m: (Bm, 1, H/f, W/f) (ignored unless has_mask);
        k: (4f,) taps; acc: (B, 2) zero-initialised -> [:, 0] += masked SSE, [:, 1] += mask sum."""
        sn = cuda.shared.array(MAXT, float32)
        sd = cuda.shared.array(MAXT, float32)
        b = cuda.blockIdx.y
        C = x.shape[1]
        H = x.shape[2]
        W = x.shape[3]
        h = t.shape[2]
        wl = t.shape[3]
        L = k.shape[0]
        mb = b if m.shape[0] > 1 else 0
        num = float32(0.0)
        den = float32(0.0)
        tid = cuda.threadIdx.x
        start = cuda.blockIdx.x * cuda.blockDim.x + tid
        stride = cuda.gridDim.x * cuda.blockDim.x
        for q in range(start, h * wl, stride):
            i = q // wl
            j = q - i * wl
            mk = float32(1.0)
            if has_mask:
                mk = m[mb, 0, i, j]
            den += mk
            y0 = i * f - p
            x0 = j * f - p
            for c in range(C):
                lr = float32(0.0)
                for u in range(L):
                    yy = min(max(y0 + u, 0), H - 1)
                    rs = float32(0.0)
                    for v in range(L):
                        xx = min(max(x0 + v, 0), W - 1)
                        rs += k[v] * x[b, c, yy, xx]
                    lr += k[u] * rs
                r = lr - t[b, c, i, j]
                wr = mk * r
                num += wr * r
                w[b, c, i, j] = float32(2.0) * wr
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

    @cuda.jit(fastmath=False)
    def ds_bwd(w, scale, band_y, i0_y, band_x, i0_x, grad):
        """w: (B, C, h, wl) low-res weighted residual; scale: (B,); grad: (B, C, H, W) output.
        Grid: (blocks, B * C); each grid row strides over one (image, channel) plane."""
        C = grad.shape[1]
        H = grad.shape[2]
        W = grad.shape[3]
        h = w.shape[2]
        wl = w.shape[3]
        nby = band_y.shape[1]
        nbx = band_x.shape[1]
        plane = cuda.blockIdx.y  # one (image, channel) plane per grid row: one division per element
        b = plane // C
        c = plane - b * C
        sb = scale[b]
        start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        for q in range(start, H * W, stride):
            yy = q // W
            xx = q - yy * W
            iy = i0_y[yy]
            jx = i0_x[xx]
            acc = float32(0.0)
            for a in range(nby):
                ii = iy + a
                if ii < h:
                    rs = float32(0.0)
                    for e in range(nbx):
                        jj = jx + e
                        if jj < wl:
                            rs += band_x[xx, e] * w[b, c, ii, jj]
                    acc += band_y[yy, a] * rs
            grad[b, c, yy, xx] = acc * sb

    return {"ds_fwd": ds_fwd, "ds_bwd": ds_bwd}


SIGNATURES = {
    "ds_fwd": "void(float32[:,:,:,::1], float32[:,:,:,::1], float32[:,:,:,::1], boolean, float32[::1], "
              "int64, int64, float32[:,:,:,::1], float32[:,::1])",
    "ds_bwd": "void(float32[:,:,:,::1], float32[::1], float32[:,::1], int32[::1], float32[:,::1], int32[::1], "
              "float32[:,:,:,::1])",
}
