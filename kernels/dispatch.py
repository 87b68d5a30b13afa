"""Choose the data-term implementation: fused Numba CUDA kernels on CUDA, plain torch elsewhere.

``use_kernels``: None = automatic (CUDA kernels when the tensors are on CUDA and numba-cuda works),
False = force the torch reference (for comparison), True = require the CUDA kernels (under the Numba
CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``, True also runs them on CPU tensors).

"numba-cuda works" is checked once per device (import, tiny launch, comparison with the reference);
if it fails, the automatic mode falls back to the reference with one logged warning.
"""
from __future__ import annotations

import logging

import torch

from kernels.reference import masked_mse_ref, downsampled_mse_ref

log = logging.getLogger("dip.kernels")

_checked: dict[str, tuple[bool, str]] = {}  # device -> (works, reason)
_warned: set[str] = set()


def simulator_enabled() -> bool:
    from kernels.masked import simulator_enabled as sim
    return sim()


def kernels_available(device: torch.device | str) -> tuple[bool, str]:
    """(True, "") when the CUDA kernels run correctly on ``device``; else (False, why). Cached per device."""
    dev = torch.device(device)
    key = str(dev)
    if key not in _checked:
        if dev.type != "cuda" and not (dev.type == "cpu" and simulator_enabled()):
            _checked[key] = (False, f"the CUDA kernels need a CUDA device, not {key}")
        else:
            try:
                from kernels.autograd import self_test
                self_test(dev)
                _checked[key] = (True, "")
            except Exception as e:  # noqa: BLE001 - any import/driver/compile failure means "not usable"
                _checked[key] = (False, f"{type(e).__name__}: {e}")
    return _checked[key]


def unsupported_reason(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                       factor: int = 1) -> str:
    """Why the kernels cannot compute this data term ("" when they can)."""
    if out.dim() != 4:
        return f"out must be (B, C, H, W), not {tuple(out.shape)}"
    B, C, H, W = out.shape
    if out.dtype != torch.float32 or target.dtype != torch.float32:
        return f"the kernels take float32 (out {out.dtype}, target {target.dtype})"
    if target.device != out.device or (mask is not None and mask.device != out.device):
        return "out, target and mask must be on one device"
    if target.requires_grad or (mask is not None and mask.requires_grad):
        return "the kernels differentiate only with respect to out"
    if factor < 1 or H % factor or W % factor:
        return f"image {H}x{W} is not a multiple of the factor {factor}"
    h, w = H // factor, W // factor
    if tuple(target.shape) != (B, C, h, w):
        return f"target must be {(B, C, h, w)}, not {tuple(target.shape)}"
    if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (h, w)
                             or mask.shape[0] not in (1, B)):
        return f"mask must be (B or 1, 1, {h}, {w}) shared by the channels, not {tuple(mask.shape)}"
    return ""


def reference_term(out, target, mask, factor: int = 1) -> torch.Tensor:
    if factor == 1:
        return masked_mse_ref(out, target, mask)
    return downsampled_mse_ref(out, target, factor, mask)


def kernel_term(out, target, mask, factor: int = 1) -> torch.Tensor:
    from kernels.autograd import DownsampledMSE, MaskedMSE
    if factor == 1:
        return MaskedMSE.apply(out, target, mask)
    return DownsampledMSE.apply(out, target, factor, mask)


def data_term(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, factor: int = 1,
              use_kernels: bool | None = None) -> torch.Tensor:
    """Per-image masked data term (B,). ``mask=None`` means every value is known."""
    if use_kernels is False:
        return reference_term(out, target, mask, factor)
    why = unsupported_reason(out, target, mask, factor)
    if use_kernels is None:
        if why or out.device.type != "cuda":
            return reference_term(out, target, mask, factor)
        ok, reason = kernels_available(out.device)
        if not ok:
            key = str(out.device)
            if key not in _warned:
                _warned.add(key)
                log.warning("CUDA data-term kernels unavailable on %s (%s); using the torch reference", key, reason)
            return reference_term(out, target, mask, factor)
        return kernel_term(out, target, mask, factor)
    # use_kernels is True: the kernels or a clear error
    if why:
        raise ValueError(f"use_kernels=True, but the CUDA kernels cannot compute this data term: {why}")
    if out.device.type != "cuda" and not simulator_enabled():
        raise RuntimeError(f"use_kernels=True needs CUDA tensors, not {out.device} "
                           "(or NUMBA_ENABLE_CUDASIM=1 to run the kernels in the Numba simulator on CPU)")
    ok, reason = kernels_available(out.device)
    if not ok:
        raise RuntimeError(f"use_kernels=True, but the CUDA data-term kernels do not work on {out.device}: {reason}")
    return kernel_term(out, target, mask, factor)
