"""The optimiser of the batched engine: Adam or RAdam on B fits' flat weights at once, per-slot schedules.

Every slot has its own step count and learning rate (a refilled slot restarts at step 1), so the bias
corrections, the warm-up, the step decay and RAdam's rectification are per-slot scalars, expanded to the
flat weight layout on the device (``SkipGenerator.expand``): a step's optimiser work is a handful of
whole-buffer kernels, with no host synchronisation.
"""
from __future__ import annotations

import torch

from pipeline.config import FitConfig
from pipeline.generator import SkipGenerator


@torch.no_grad()
def optimizer_update(cfg: FitConfig, G: SkipGenerator, m: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                     t: torch.Tensor) -> None:
    """One optimiser step of every slot's weights (``G.flat``) from ``G.flat_grad``, with the moments
    ``m`` and ``v`` (flat, updated in place), the slots' base learning rates ``lr`` and step numbers ``t``
    (>= 1): Adam as torch.optim.Adam, or RAdam as torch.optim.RAdam (``cfg.optimizer``), each slot with
    its own bias corrections and scheduled learning rate (:func:`lr_schedule`)."""
    b1, b2 = cfg.adam_betas
    step_size = lr_schedule(cfg, lr, t) / (1 - b1 ** t)
    g = G.flat_grad
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    if cfg.optimizer == "radam":
        adaptive, plain = radam_factors(t, b2)
        G.flat.add_(m * G.expand(-step_size) * (G.expand(adaptive) / v.sqrt().add_(cfg.adam_eps) + G.expand(plain)))
    else:
        inv_bc2 = 1.0 / torch.sqrt(1 - b2 ** t)
        denom = (v.sqrt() * G.expand(inv_bc2)).add_(cfg.adam_eps)
        G.flat.addcdiv_(m * G.expand(-step_size), denom)


def lr_schedule(cfg: FitConfig, lr: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The per-slot learning rate at step ``t`` (a tensor of step numbers from 1): ``lr`` times the linear
    warm-up and the step decay of the config (FitConfig.lr_warmup, lr_decay, lr_decay_every)."""
    if cfg.lr_warmup:
        lr = lr * torch.clamp_max(t / cfg.lr_warmup, 1.0)
    if cfg.lr_decay_every and cfg.lr_decay != 1.0:
        lr = lr * cfg.lr_decay ** torch.floor((t - 1) / cfg.lr_decay_every)
    return lr


def radam_factors(t: torch.Tensor, b2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified Adam (Liu et al., ICLR 2020; torch.optim.RAdam), per slot at step ``t``: the update is
    ``step_size * m * (adaptive / (sqrt(v) + eps) + plain)``, i.e. Adam with the rectification
    ``r_t * sqrt(1 - b2^t)`` once the variance's length rho_t exceeds 5, plain momentum before. In float64:
    rho_t is a difference of two numbers near 2 / (1 - b2), which float32 would round by a few percent."""
    t64 = t.double()
    bc2 = 1 - b2 ** t64
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t64 * b2 ** t64 / bc2
    on = rho > 5
    rect = torch.sqrt(((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)).clamp_min(0))
    zero = torch.zeros_like(t64)
    return (torch.where(on, rect * torch.sqrt(bc2), zero).to(t.dtype),
            torch.where(on, zero, torch.ones_like(t64)).to(t.dtype))
