"""The bench's view of a fit's trajectory: an oracle that scores every checked image against the reference,
the live auto-stop rule beside it, and replays of other rule settings on the recorded traces.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.bench.cases import psnr

class EvalStopper:
    """Never stops the fit. Runs ES-WMV alongside (notes where and what it would have stopped with),
    scores every checked image against the reference with the suite's metric (the oracle), and keeps
    the whole VAR trace (a never-stopping copy of the rule) so that other rule settings can be replayed
    afterwards (:func:`replay_variants`)."""

    def __init__(self, stop_config, item=None, y_border: int | None = None, keep_images: bool = False,
                 margin: int | None = None):
        from pipeline.stopping import WMVStopper, stopper_for_item
        self.margin = margin  # with a margin: end the fit this many steps after the rule fired (None: never)
        self.rule = stopper_for_item(stop_config, item)
        self.shadow = WMVStopper(stop_config.replace(patience=10 ** 9, rel_tol=0.0, smooth=1))
        self.y_border = y_border
        self.ref = None
        self.hw = None
        if item is not None and getattr(item, "reference", None) is not None:
            self.ref = torch.from_numpy(item.reference)
            rm = item.ref_mask
            if rm is not None:
                self.hw = (int(rm[0].any(axis=1).sum()), int(rm[0].any(axis=0).sum()))
        self.fired = False
        self.auto: dict = {}
        self.trace: list[list] = []  # [step, metric of the image, metric of the window mean or None]
        self.oracle = (None, -math.inf)
        self.keep_images = keep_images  # the auto and oracle images (canvas tensors) go into the summary
        self.images: dict = {}

    def _score(self, img: torch.Tensor) -> float | None:
        if self.ref is None:
            return None
        if self.ref.device != img.device:
            self.ref = self.ref.to(img.device)
        a, b = img, self.ref
        if self.hw is not None:
            a, b = a[:, :self.hw[0], :self.hw[1]], b[:, :self.hw[0], :self.hw[1]]
        return psnr(a, b, self.y_border)

    @torch.no_grad()
    def update(self, step, image, loss_hist=None) -> bool:
        if not self.fired and self.rule.update(step, image, loss_hist):
            self.fired = True
            self.auto = {"stopped_at": int(step), "step": self.rule.best_step,
                         "psnr": self._score(self.rule.best_image)}
            if self.keep_images:
                self.images["auto"] = self.rule.best_image.detach().cpu().clone()
        self.shadow.update(step, image, loss_hist)
        p = self._score(image)
        if p is not None:
            pm = self._score(self.shadow.last_mean) if self.shadow.last_mean is not None else None
            self.trace.append([int(step), round(p, 4), None if pm is None else round(pm, 4)])
            if p > self.oracle[1]:
                self.oracle = (int(step), p)
                if self.keep_images:
                    self.images["oracle"] = image.detach().cpu().clone()
        return self.margin is not None and self.fired and step >= self.auto["stopped_at"] + self.margin

    def summary(self) -> dict:
        if not self.fired and self.rule.fallback_image is not None:  # the rule's fallback at the cap
            self.auto = {"stopped_at": None, "step": self.rule.fallback_step, "from": "discrepancy",
                         "psnr": self._score(self.rule.fallback_image)}
            if self.keep_images:
                self.images["auto"] = self.rule.fallback_image.detach().cpu().clone()
        extra = {"_images": self.images} if self.keep_images else {}
        return {**extra, "fired": self.fired, "auto": self.auto, "oracle_step": self.oracle[0],
                "oracle_psnr": None if self.oracle[0] is None else round(self.oracle[1], 4),
                "metric_trace": self.trace, "var_trace": self.shadow.summary()["trace"],
                "rule": self.rule.config.to_dict()}


# Rule settings replayed on every image's recorded traces (same window; result "last" and "mean"), and
# ``lag``: the image 0, 1 or 2 checks before the minimum (the output average lags the fit).
VARIANTS = [dict(rel_tol=t, patience=p, lag=g) for t in (0.0, 0.1, 0.3, 0.5, 0.7, 0.8) for p in (4, 8, 16)
            for g in (0, 1, 2)]
PRINTED_VARIANTS = 12  # the best ones by mean gap to the oracle, and the current rule


def variant_key(v: dict) -> tuple:
    """(rel_tol, patience, lag) of a variant or a StopConfig dict."""
    return v["rel_tol"], v["patience"], v.get("lag", 0)

def replay_variants(row: dict, stop_cfg, variants=VARIANTS) -> list[dict]:
    """What other (rel_tol, patience, smooth) settings would have chosen, from a row's recorded traces."""
    from pipeline.stopping import choose_from_trace
    by_step = {int(s): (p, pm) for s, p, pm in row.get("metric_trace", [])}
    final = row.get("final_psnr")
    out = []
    for v in variants:
        if v.get("lag", 0) >= stop_cfg.window:  # the live rule keeps only the window's images
            continue
        cfg = stop_cfg.replace(**v)
        chosen, stopped = choose_from_trace(row.get("var_trace", []), cfg)
        if stopped is None or chosen not in by_step:
            last, mean, at = final, final, row.get("steps")
        else:
            last, mean = by_step[chosen]
            if v.get("lag"):
                mean = None  # the window mean is of the window ending at the minimum, not at the lagged image
            at = stopped
        out.append({**v, "chosen": chosen if stopped is not None else None, "stopped_at": at,
                    "psnr_last": last, "psnr_mean": mean})
    return out


# The discrepancy principle, another reference-free rule for Gaussian denoising: stop when the data term
# (the output's MSE to the noisy input) has fallen to about the noise variance, sigma^2, with sigma
# estimated from the noisy image (:func:`pipeline.stopping.estimate_sigma`). Below that the fit is fitting noise.
DISCREPANCY = (0.8, 0.85, 0.9, 0.95, 1.0)  # on 9 CPU crops the hybrid was flat over 0.8-0.95 (docs/stopping.md)
DISCREPANCY_SMOOTH = 50  # steps of the loss averaged (the per-step loss jitters with the input noise)


def replay_discrepancy(row: dict, factors=DISCREPANCY, smooth: int = DISCREPANCY_SMOOTH) -> list[dict]:
    """For each factor c: the first step where the loss, averaged over ``smooth`` steps, is at most
    c * sigma_est^2; scored at the first check at or after it (the final image if never)."""
    loss = np.asarray(row.get("loss") or [], np.float64)
    sigma = row.get("sigma_est")
    checks = [(int(s), p) for s, p, _pm in row.get("metric_trace", [])]
    avg = None
    if sigma and len(loss) >= smooth:
        avg = np.convolve(loss, np.ones(smooth) / smooth, mode="valid")  # avg[i]: steps i+1 .. i+smooth
    out = []
    for c in factors:
        step = None
        if avg is not None:
            hit = np.nonzero(avg <= c * sigma ** 2)[0]
            if hit.size:
                step = int(hit[0]) + smooth
        at = next(((s, p) for s, p in checks if step is not None and s >= step), None)
        out.append({"factor": c, "step": step, "chosen": at[0] if at else None,
                    "psnr": at[1] if at else row.get("final_psnr")})
    return out


def eval_factory(stop_config, y_border, keep_images: bool = False, margin: int | None = None):
    def factory(item=None):
        return EvalStopper(stop_config, item, y_border, keep_images, margin)
    return factory
