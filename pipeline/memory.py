"""The one memory model: how many bytes a fit needs, how many fits a budget holds, CUDA's own probes.

Peak bytes of one fit on a canvas ``H x W`` (output pixels): ``a + b * H * W`` (:func:`fit_model`). On
CUDA, ``a`` and ``b`` are measured once per (config, channels) with two short probes
(:func:`estimate_slot_bytes` at two small canvases); elsewhere (and for planning without a GPU) they
come from the architecture: ``b = k * A(net)``, where ``A`` counts the activation channels autograd keeps
per output pixel (:func:`activation_channels`) and ``k`` is per device/precision (``BYTES_PER_ACT``; see
docs/tiling.md for the measurements and the uncertainty), and ``a = 6 * 4 * params + 64 MiB`` (weights,
gradient, Adam m and v, last-good copy, weight average).

A batch of B fits on CUDA is sized from the measured peaks of 1 and 2 slots (:func:`auto_slots`); a
budget of bytes (``--max-memory``) gives ``budget // per-fit estimate`` slots (:func:`slots_for`). The
device is a ``torch.device``, resolved by the caller's entry point (pipeline.engine.pick_device).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from pipeline.config import FitConfig
from pipeline.work import n_params

MARGIN = 0.8  # fraction of free device memory that an automatic budget uses

# bytes per (activation channel x output pixel), by device type and precision; see docs/tiling.md.
# cpu: measured peak RSS of 1-slot fits at 128^2..384^2 (fast, denoise, jpeg, inpaint, inpaint-object
# presets): 0.79..1.31 x 4 bytes; the upper envelope is used. cuda: from an H100 512^2 denoise-preset
# fit (1.59 GiB in bf16; about 5 GB in fp32/tf32), cuDNN workspaces and allocator caching included.
BYTES_PER_ACT = {("cpu", "fp32"): 5.3, ("cpu", "tf32"): 5.3, ("cpu", "bf16"): 5.3,
                 ("cuda", "fp32"): 8.6, ("cuda", "tf32"): 8.6, ("cuda", "bf16"): 2.9}
STATE_COPIES = 6  # flat weights, gradient, Adam m, Adam v, last good weights, weight average
FIXED_BYTES = 64 << 20


def activation_channels(net) -> float:
    """Activation channels autograd keeps per output pixel for one fit of ``net`` (its out_channels set):
    per scale i (area 4^-i) the padded input, the upsampled deeper branch, skip conv/BN/act, concat and
    its BN, the padded up-conv input, up conv/BN/act and the 1x1 conv/BN/act; the down path's 7 tensors
    at the next scale; plus z, its noise and noisy copy and a few output-sized tensors."""
    C = net.out_channels
    tot = 3 * net.input_depth + 6 * C
    cin, n = net.input_depth, net.scales
    if net.arch == "decoder":  # per scale: the upsampled input (padded), conv, BN, act
        for i in range(n):
            tot += (2 * (net.channels_up[i + 1] if i < n - 1 else cin) + 3 * net.channels_up[i]) / 4 ** i
        return tot
    for i in range(n):
        cd, cu, cs = net.channels_down[i], net.channels_up[i], net.channels_skip[i]
        k = net.channels_up[i + 1] if i < n - 1 else cd
        a = cin + 4 * k + 6 * cs + 3 * cu + (3 * cu if net.need1x1_up else 0)
        tot += a / 4 ** i + 7 * cd / 4 ** (i + 1)
        cin = cd
    return tot


_calibrated: dict = {}


def fit_model(cfg, channels: int, device="cpu", measure: bool = True) -> tuple[float, float, str]:
    """(a, b, source) of the per-fit memory model bytes = a + b * H * W (canvas H x W, output pixels).

    On CUDA with ``measure`` the two coefficients are measured once (two 1-slot probes) and cached;
    otherwise they come from :func:`activation_channels` and ``BYTES_PER_ACT``."""
    dev = torch.device(device)
    net = cfg.net.with_channels(channels)
    if dev.type == "cuda" and measure:
        key = (cfg.replace(seed=0, steps=1), channels, str(dev))
        if key not in _calibrated:
            from pipeline.problem import canvas_multiple
            m = canvas_multiple(cfg)
            s1, s2 = m * math.ceil(128 / m), m * math.ceil(256 / m)
            p1 = estimate_slot_bytes(cfg, (s1, s1), channels, dev)
            p2 = estimate_slot_bytes(cfg, (s2, s2), channels, dev)
            b = max((p2 - p1) / (s2 * s2 - s1 * s1), 1.0)
            a = max(p1 - b * s1 * s1, 0.0)
            _calibrated[key] = (a * 1.1 + FIXED_BYTES, b * 1.1, f"measured on {dev} (+10%)")
        return _calibrated[key]
    k = BYTES_PER_ACT.get((dev.type, cfg.precision), BYTES_PER_ACT[("cuda", "fp32")])
    a = STATE_COPIES * 4 * n_params(net) + FIXED_BYTES
    return float(a), float(k * activation_channels(net)), f"model ({dev.type}, {cfg.precision})"


def estimate_fit_bytes(cfg, canvas: tuple[int, int], channels: int, device="cpu", measure: bool = True) -> int:
    """Peak bytes of ONE fit (one slot) on ``canvas`` (output pixels). See :func:`fit_model`."""
    a, b, _ = fit_model(cfg, channels, device, measure)
    return int(a + b * canvas[0] * canvas[1])


def memory_budget(device, max_memory_bytes: int | None = None) -> int | None:
    """The byte budget: the explicit one, else on CUDA 80% of the free memory, else 50% of the
    available host memory (None when unknown)."""
    if max_memory_bytes:
        return int(max_memory_bytes)
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free * MARGIN)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
    except (ValueError, OSError, AttributeError):
        return None


def slots_for(cfg, canvas, channels: int, device, budget: int | None, slots: int | None = None,
              n_items: int | None = None) -> int | None:
    """Slots for a bucket of fits on ``canvas``: ``budget // estimate`` (at least 1), capped by an
    explicit ``slots`` and the item count. None (no budget, no slots) lets fit_problems decide."""
    if budget is None:
        return slots
    per = estimate_fit_bytes(cfg, canvas, channels, device)
    n = max(1, int(budget // max(per, 1)))
    if slots:
        n = min(n, slots)
    if n_items:
        n = min(n, n_items)
    return max(1, min(n, 64))


def estimate_slot_bytes(cfg: FitConfig, canvas: tuple[int, int], channels: int, device,
                        slots: int = 1) -> int:
    """The peak memory of a batch of ``slots`` fits, measured with two steps on the device (CUDA only)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 0
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    from pipeline.engine import BatchedFitter, FitItem
    f = cfg.factor
    fit = BatchedFitter(cfg, canvas, channels, slots, dev)
    h, w = canvas[0] // f, canvas[1] // f
    for s in range(slots):
        fit.load(s, FitItem("probe", np.zeros((channels, h, w), np.float32), np.ones((1, h, w), np.float32), seed=s))
    fit.step()
    fit.step()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del fit
    torch.cuda.empty_cache()
    return int(peak)


def slots_for_memory(budget: float, peak1: int, peak2: int, max_slots: int) -> int:
    """Slots that fit a byte budget, from the measured peaks of 1 and 2 slots.

    The one-slot peak includes what does not grow with the batch (cuDNN's autotuning workspaces, the
    CUDA context's allocations): it is the difference of the two peaks that each further slot costs.
    """
    per = max(peak2 - peak1, peak1 // 8, 1)  # never trust a marginal cost far below the one-slot peak
    fixed = max(peak1 - per, 0)
    return int(max(1, min(max_slots, (budget - fixed) // per)))


def auto_slots(cfg: FitConfig, canvas: tuple[int, int], channels: int, device, n_items: int,
               max_slots: int = 64, margin: float = MARGIN) -> int:
    """How many fits to batch: on CUDA from the free memory and the measured peaks of 1 and 2 slots
    (a safety ``margin`` of the free memory is kept; out-of-memory later halves the batch); 1 on a CPU.

    On a CPU batching gains nothing (the convolutions already use every core: 2, 4 slots measured the
    same or slower per fit than one, docs/BENCHMARKS.md), and a batch whose queue has run dry still
    computes its empty slots: the last image of a 4-slot CPU batch took as long as four."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 1
    if n_items <= 1:
        return 1
    peak1 = estimate_slot_bytes(cfg, canvas, channels, dev, 1)
    peak2 = estimate_slot_bytes(cfg, canvas, channels, dev, 2)
    free, _total = torch.cuda.mem_get_info(dev)
    return min(n_items, slots_for_memory(free * margin, peak1, peak2, max_slots))
