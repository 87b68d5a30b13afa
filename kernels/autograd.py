"""torch.autograd wrappers around the fused Numba CUDA data-term kernels.

``MaskedMSE.apply(out, target, mask)`` and ``DownsampledMSE.apply(out, target_lr, factor, mask_lr)``
return per-image losses (B,), equal to kernels.reference.masked_mse_ref / downsampled_mse_ref.
Only ``out`` gets a gradient (target and mask are data).

The forward pass is one kernel launch (plus a zero-fill of a (B, 2) accumulator and a few (B,)-sized
torch ops); it stores the unnormalised gradient, so the masked backward is one elementwise multiply
and the downsampled backward one gather kernel (the adjoint). Kernels launch on torch's current CUDA
stream and nothing here waits for the device.

Under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) CPU tensors are accepted: the kernels then
run (slowly, one Python thread per CUDA thread) on ``tensor.numpy()`` views.
"""
from __future__ import annotations

import torch

from kernels import downsample as _ds
from kernels import masked as _mk

_CONST_CACHE: dict = {}
_STREAMS: dict = {}  # torch stream handle -> numba stream object


def _sim() -> bool:
    return _mk.simulator_enabled()


class _Launcher:
    """Converts tensors to Numba arrays and launches kernels on the right stream."""

    def __init__(self, device: torch.device):
        from numba import cuda
        self.cuda = cuda
        self.sim = _sim()
        if self.sim:
            if device.type != "cpu":
                raise RuntimeError("under the Numba CUDA simulator the kernels take CPU tensors")
            self.stream = None
        else:
            if device.type != "cuda":
                raise RuntimeError(f"the CUDA data-term kernels need CUDA tensors, not {device.type} "
                                   "(set NUMBA_ENABLE_CUDASIM=1 to run them on CPU tensors in the simulator)")
            ptr = torch.cuda.current_stream(device).cuda_stream
            self.stream = _STREAMS.get(ptr)
            if self.stream is None:
                self.stream = _STREAMS[ptr] = cuda.external_stream(ptr) if ptr else cuda.legacy_default_stream()

    def arr(self, t: torch.Tensor):
        t = t.detach()
        if self.sim:
            return t.numpy()
        return self.cuda.as_cuda_array(t, sync=False)

    def launch(self, kern, grid, threads, *args):
        if self.stream is None:
            kern[grid, threads](*args)
        else:
            kern[grid, threads, self.stream](*args)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _mask_arg(mask: torch.Tensor | None, B: int, h: int, w: int, device) -> tuple[torch.Tensor, bool]:
    if mask is None:
        return _dummy(device), False
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != (h, w) or mask.shape[0] not in (1, B):
        raise ValueError(f"mask must be (B or 1, 1, {h}, {w}), not {tuple(mask.shape)}")
    return _f32(mask), True


def _dummy(device) -> torch.Tensor:
    key = ("dummy", str(device))
    if key not in _CONST_CACHE:
        _CONST_CACHE[key] = torch.ones(1, 1, 1, 1, dtype=torch.float32, device=device)
    return _CONST_CACHE[key]


def _taps(factor: int, device) -> torch.Tensor:
    key = ("taps", factor, str(device))
    if key not in _CONST_CACHE:
        from kernels.lanczos import lanczos2_taps
        _CONST_CACHE[key] = torch.tensor(lanczos2_taps(factor), dtype=torch.float32).to(device)
    return _CONST_CACHE[key]


def _band(n: int, factor: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    key = ("band", n, factor, str(device))
    if key not in _CONST_CACHE:
        band, i0 = _ds.band_tables(n, factor)
        _CONST_CACHE[key] = (torch.from_numpy(band).to(device), torch.from_numpy(i0).to(device))
    return _CONST_CACHE[key]


def _finish(acc: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image loss and 1 / (C * sum mask), as the reference clamps it."""
    den = (acc[:, 1] * C).clamp_min(1e-12)
    return acc[:, 0] / den, 1.0 / den


class MaskedMSE(torch.autograd.Function):
    """sum_{c,y,x} m (out - target)^2 / (C sum m), per image. mask: (B or 1, 1, H, W) or None."""

    @staticmethod
    def forward(ctx, out, target, mask=None):
        if out.dim() != 4 or target.shape != out.shape:
            raise ValueError(f"out {tuple(out.shape)} and target {tuple(target.shape)} must be equal (B, C, H, W)")
        B, C, H, W = out.shape
        dev = out.device
        L = _Launcher(dev)
        o, t = _f32(out), _f32(target)
        m, has_mask = _mask_arg(mask, B, H, W, dev)
        g = torch.empty_like(o)
        acc = torch.zeros(B, 2, dtype=torch.float32, device=dev)
        grid, threads = _mk.reduction_grid(H * W, B)
        kern = _mk.get_kernels()["masked_fwd"]
        L.launch(kern, grid, threads, L.arr(o), L.arr(t), L.arr(m), has_mask, L.arr(g), L.arr(acc))
        loss, inv = _finish(acc, C)
        ctx.save_for_backward(g, inv)
        ctx.out_dtype = out.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        g, inv = ctx.saved_tensors
        s = (grad_loss.to(torch.float32) * inv).view(-1, 1, 1, 1)
        return (g * s).to(ctx.out_dtype), None, None


class DownsampledMSE(torch.autograd.Function):
    """Masked MSE between lanczos2_downsample(out, factor) and target_lr, per image (exact adjoint backward)."""

    @staticmethod
    def forward(ctx, out, target_lr, factor, mask_lr=None):
        factor = int(factor)
        if out.dim() != 4:
            raise ValueError(f"out must be (B, C, H, W), not {tuple(out.shape)}")
        B, C, H, W = out.shape
        if factor < 1 or H % factor or W % factor:
            raise ValueError(f"image {H}x{W} is not a multiple of the factor {factor}")
        h, w = H // factor, W // factor
        if tuple(target_lr.shape) != (B, C, h, w):
            raise ValueError(f"target_lr must be {(B, C, h, w)}, not {tuple(target_lr.shape)}")
        dev = out.device
        L = _Launcher(dev)
        x, t = _f32(out), _f32(target_lr)
        m, has_mask = _mask_arg(mask_lr, B, h, w, dev)
        wres = torch.empty_like(t)
        acc = torch.zeros(B, 2, dtype=torch.float32, device=dev)
        from kernels.lanczos import lanczos2_pad
        grid, threads = _mk.reduction_grid(h * w, B)
        kern = _ds.get_kernels()["ds_fwd"]
        L.launch(kern, grid, threads, L.arr(x), L.arr(t), L.arr(m), has_mask, L.arr(_taps(factor, dev)),
                 factor, lanczos2_pad(factor), L.arr(wres), L.arr(acc))
        loss, inv = _finish(acc, C)
        ctx.save_for_backward(wres, inv)
        ctx.shape = (B, C, H, W)
        ctx.factor = factor
        ctx.out_dtype = out.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        wres, inv = ctx.saved_tensors
        B, C, H, W = ctx.shape
        dev = wres.device
        L = _Launcher(dev)
        s = (grad_loss.to(torch.float32) * inv).contiguous()
        by, iy = _band(H, ctx.factor, dev)
        bx, ix = _band(W, ctx.factor, dev)
        grad = torch.empty(B, C, H, W, dtype=torch.float32, device=dev)
        blocks, threads = _mk.plane_grid(H * W, B * C)
        kern = _ds.get_kernels()["ds_bwd"]
        L.launch(kern, blocks, threads, L.arr(wres), L.arr(s), L.arr(by), L.arr(iy), L.arr(bx), L.arr(ix),
                 L.arr(grad))
        return grad.to(ctx.out_dtype), None, None, None


def masked_mse(out, target, mask=None):
    return MaskedMSE.apply(out, target, mask)


def downsampled_mse(out, target_lr, factor, mask_lr=None):
    return DownsampledMSE.apply(out, target_lr, factor, mask_lr)


def self_test(device) -> None:
    """Run both kernels once on tiny inputs on ``device`` and compare with the reference; raise on mismatch.

    This waits for the device (once); dispatch calls it the first time it picks the kernels.
    """
    from kernels.reference import downsampled_mse_ref, masked_mse_ref
    g = torch.Generator().manual_seed(0)
    dev = torch.device(device)
    out = torch.rand(2, 3, 8, 8, generator=g).to(dev).requires_grad_(True)
    tgt = torch.rand(2, 3, 8, 8, generator=g).to(dev)
    msk = (torch.rand(2, 1, 8, 8, generator=g) > 0.3).float().to(dev)
    tlr = torch.rand(2, 3, 4, 4, generator=g).to(dev)
    mlr = (torch.rand(2, 1, 4, 4, generator=g) > 0.3).float().to(dev)
    for fn, ref, args in ((MaskedMSE.apply, masked_mse_ref, (tgt, msk)),
                          (lambda o, t, m: DownsampledMSE.apply(o, t, 2, m),
                           lambda o, t, m: downsampled_mse_ref(o, t, 2, m), (tlr, mlr))):
        a = fn(out, *args)
        (ga,) = torch.autograd.grad(a.sum(), out)
        b = ref(out, *args)
        (gb,) = torch.autograd.grad(b.sum(), out)
        if not (torch.allclose(a, b, rtol=1e-4, atol=1e-6) and torch.allclose(ga, gb, rtol=1e-3, atol=1e-6)):
            raise RuntimeError(f"CUDA data-term kernel self-test mismatch: loss {a.tolist()} vs {b.tolist()}")
