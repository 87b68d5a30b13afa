"""`dip bench quality`: PSNR on the paper's benchmark sets, with and without ground-truth stopping.

For every image of a suite one fit runs to the preset's step cap, and three results are read off it:

- auto:   what ES-WMV early stopping (pipeline.stopping, no ground truth) would have returned: the image
          at its VAR minimum, taken at the check where the rule fires (the final image if it never does);
- oracle: the best image over all checks (every ``check_every`` steps) by the suite's own metric, i.e.
          the step a ground-truth oracle would pick;
- final:  the image after the preset's full schedule (what a fixed step count gives).

These come next to the paper's DIP number and the classical baseline the data README lists (CBM3D for
denoising, CSC for inpainting; bicubic on our own low-res input for SR). One fit per image gives all
three, because the trajectory of a slot does not depend on when it would have stopped.

Protocols (../shared/data/README.md):

- denoise: ``*_noisy.png`` (the authors' own sigma=25 draw) against ``*_GT.png``, RGB, whole image;
  preset ``denoise``.
- sr: Set5, the ground truth cropped to a multiple of 4, reduced 4x with PIL LANCZOS (antialiased, as
  the original does); PSNR on Y (ITU-R BT.601 as MATLAB's rgb2ycbcr) with a 4-pixel border cropped;
  also bicubic (PIL BICUBIC) upscaling of the same input; preset ``sr4``.
- inpaint: ``*_masked.png`` with 50% of the pixels set to 0, grey, whole image; preset ``inpaint-sparse``.
  The set ships no masks: the mask is ``masked != 0``. A pixel whose true value is 0 is then treated as
  missing too; that only removes measurements (it never feeds a wrong one), and it is rare (montage:
  0.4% of its pixels are 0 in the ground truth, the other images have none).

All PSNRs are on the output quantised to 8 bits, as it would be saved.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("dip.bench")

SUITES = ("denoise", "sr", "inpaint")
SUITE_DIRS = {"denoise": "denoise-color-s25", "sr": "set5-x4", "inpaint": "inpaint-50p"}
SUITE_PRESETS = {"denoise": "denoise", "sr": "sr4", "inpaint": "inpaint-sparse"}
SUITE_TASKS = {"denoise": "denoise", "sr": "sr", "inpaint": "inpaint"}
SR_SCALE = 4
SR_BORDER = 4

# The paper's numbers, recomputed from the authors' released outputs (../shared/data/README.md).
PAPER = {
    "denoise": {
        "F16": (33.69, 32.67), "baboon": (24.51, 26.01), "hill": (32.09, 32.72), "kodim01": (28.44, 29.20),
        "kodim02": (32.71, 32.16), "kodim03": (33.79, 34.03), "kodim12": (32.68, 33.14),
        "lena": (32.56, 32.06), "peppers": (31.15, 30.75),
    },
    "sr": {"baby": (31.49, None), "bird": (31.80, None), "butterfly": (26.23, None), "head": (31.04, None),
           "woman": (28.93, None)},
    "inpaint": {
        "barbara": (32.18, 28.13), "boat": (33.04, 31.42), "house": (39.00, 34.52), "Lena512": (36.08, 34.97),
        "peppers256": (33.06, 31.11), "Cameraman256": (29.80, 27.89), "couple": (32.48, 31.15),
        "fingerprint": (32.81, 31.32), "hill": (32.73, 32.32), "man": (32.17, 31.89), "montage": (34.49, 28.06),
    },
}
BASELINE_NAME = {"denoise": "cbm3d", "sr": "bicubic", "inpaint": "csc"}

# --fast: a CPU smoke test of the whole bench.
FAST_CROP = 64
FAST_STEPS = 100
FAST_CHECK = 50
FAST_IMAGES = 2


def default_data_dir() -> Path:
    env = os.environ.get("DIP_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def paper_dir(data: str | os.PathLike | None) -> Path:
    """The folder that holds the paper's sets: DATA/paper, or DATA itself if it holds them."""
    d = Path(data) if data else default_data_dir()
    if (d / "paper").is_dir():
        return d / "paper"
    return d


# ---- metrics --------------------------------------------------------------------------------------------
def _quantise(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.clamp(0, 1) * 255) / 255


def _y(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] -> (1, H, W) luma in [0, 1] as MATLAB's rgb2ycbcr (16..235)/255."""
    r, g, b = x[0], x[1], x[2]
    return ((16.0 + 65.481 * r + 128.553 * g + 24.966 * b) / 255.0).unsqueeze(0)


def psnr(out: torch.Tensor, ref: torch.Tensor, y_border: int | None = None) -> float:
    """PSNR (dB, peak 1) of (C, H, W) ``out`` (quantised to 8 bits here) against ``ref``.

    ``y_border``: None = all channels, whole image; an int = Y channel with that border cropped."""
    a = _quantise(out.float())
    b = ref.float().to(a.device)
    if y_border is not None:
        if a.shape[0] == 3:
            a, b = _y(a), _y(b)
        if y_border > 0:
            a = a[:, y_border:-y_border, y_border:-y_border]
            b = b[:, y_border:-y_border, y_border:-y_border]
    mse = float((a.double() - b.double()).square().mean())
    return 100.0 if mse <= 0 else -10.0 * math.log10(mse)


# ---- the cases ------------------------------------------------------------------------------------------
@dataclass
class Case:
    suite: str
    name: str
    image: np.ndarray  # what the fit sees: (h, w[, C]) uint8
    reference: np.ndarray  # (H, W[, C]) uint8
    mask: np.ndarray | None = None
    baseline: float | None = None  # a number computed here (SR: bicubic)
    meta: dict = field(default_factory=dict)


def _load(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("L" if im.mode in ("L", "LA", "I;16", "I") else "RGB")).copy()


def _crop(a: np.ndarray, size: int | None) -> np.ndarray:
    if not size:
        return a
    h, w = a.shape[:2]
    s0, s1 = min(size, h), min(size, w)
    y, x = (h - s0) // 2, (w - s1) // 2
    return a[y:y + s0, x:x + s1]


def synthetic_noisy(gt: np.ndarray, sigma: float, name: str) -> np.ndarray:
    """``gt`` (uint8) plus Gaussian noise of ``sigma`` (on the 0..255 scale), clipped and rounded to 8 bits
    as the authors' noisy PNGs are; the noise is seeded by the image's name and sigma, so every run and
    every crop of the same image gets the same draw."""
    import zlib
    rng = np.random.default_rng(zlib.crc32(f"dip-noise:{name}:{sigma:g}".encode()))
    noisy = gt.astype(np.float64) + rng.normal(0.0, sigma, gt.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def load_cases(suite: str, root: Path, limit: int | None = None, crop: int | None = None,
               only: list[str] | None = None, sigma: float | None = None) -> list[Case]:
    """The suite's images (sorted by name, case-insensitively); ``only``: just these names.

    ``sigma`` (denoising only): instead of the authors' sigma=25 noisy images, the ground truth (cropped)
    with noise of this sigma (:func:`synthetic_noisy`)."""
    from PIL import Image
    d = root / SUITE_DIRS[suite]
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: the {suite} set is not there (see --data / DIP_DATA)")
    gts = sorted(d.glob("*_GT.png"), key=lambda p: p.name.lower())
    if only:
        want = {n.lower() for n in only}
        gts = [g for g in gts if g.name[:-len("_GT.png")].lower() in want]
    cases = []
    for gt_path in gts:
        name = gt_path.name[:-len("_GT.png")]
        gt = _load(gt_path)
        if suite == "denoise" and sigma is not None:
            ref = _crop(gt, crop)
            cases.append(Case(suite, name, synthetic_noisy(ref, sigma, name), ref, meta={"sigma": sigma}))
        elif suite == "denoise":
            noisy_path = d / f"{name}_noisy.png"
            if not noisy_path.is_file():
                continue
            cases.append(Case(suite, name, _crop(_load(noisy_path), crop), _crop(gt, crop)))
        elif suite == "inpaint":
            m_path = d / f"{name}_masked.png"
            if not m_path.is_file():
                continue
            masked = _crop(_load(m_path), crop)
            ref = _crop(gt, crop)
            if masked.ndim == 3:  # a colour file of a grey set: the mask is where any channel is set
                known = (masked != 0).any(axis=2)
            else:
                known = masked != 0
            cases.append(Case(suite, name, masked, ref, mask=known.astype(np.float32),
                              meta={"known_fraction": round(float(known.mean()), 4)}))
        else:  # sr
            hr = _crop(gt, crop)
            h, w = hr.shape[:2]
            h, w = h - h % SR_SCALE, w - w % SR_SCALE
            hr = np.ascontiguousarray(hr[:h, :w])
            hr_pil = Image.fromarray(hr)
            lr_pil = hr_pil.resize((w // SR_SCALE, h // SR_SCALE), Image.LANCZOS)
            lr = np.asarray(lr_pil).copy()
            bic = np.asarray(lr_pil.resize((w, h), Image.BICUBIC)).astype(np.float32) / 255
            ref_t = torch.from_numpy(hr.astype(np.float32) / 255).permute(2, 0, 1)
            b = psnr(torch.from_numpy(bic).permute(2, 0, 1), ref_t, y_border=SR_BORDER)
            cases.append(Case(suite, name, lr, hr, baseline=b))
        if limit and len(cases) >= limit:
            break
    return cases


def _ref_tensor(a: np.ndarray) -> torch.Tensor:
    a = a.astype(np.float32) / 255
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


# ---- the evaluating stopper -----------------------------------------------------------------------------
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


# ---- running a suite ------------------------------------------------------------------------------------
def run_suite(suite: str, cases: list[Case], device="auto", fast: bool = False, max_steps: int | None = None,
              slots: int | None = None, seed: int = 0, check_every: int = 50,
              overrides: dict | None = None, images: dict | None = None, preset: str | None = None,
              stop_overrides: dict | None = None, stop_margin: int | None = None) -> dict:
    """Fit every case once and score it. ``overrides``: config fields for every problem (e.g.
    ``{"reg_noise_std": 0.0}`` or ``{"net": {"upsample": "nearest"}}``); ``images``: a dict that receives
    each case's images, name -> {"auto": the auto-stopped image, "oracle": the best-scoring checked one,
    "final": the last}, each (H, W, C) float32, for scores computed outside (ensembles). ``preset``:
    another preset than the suite's paper one; ``stop_overrides``: StopConfig fields for the rule;
    ``stop_margin``: end each fit this many steps after its rule fired instead of at the cap (the oracle
    is then the best image up to there)."""
    from pipeline.api import fit_problems, make_problem
    from pipeline.stopping import estimate_sigma, stop_config_for
    preset = preset or ("fast" if fast else SUITE_PRESETS[suite])
    task = SUITE_TASKS[suite]
    over = {}
    if fast:
        over["steps"] = FAST_STEPS
    if max_steps:
        over["steps"] = min(max_steps, over.get("steps", 10 ** 9))
    problems = []
    for i, c in enumerate(cases):
        kw = dict(task=task, preset=preset, seed=seed, name=c.name, reference=c.reference, mask=c.mask)
        if suite == "sr":
            kw["scale"] = SR_SCALE
        if "steps" in over and over["steps"] is not None:
            kw["steps"] = over["steps"]
        kw.update(overrides or {})
        p = make_problem(c.image, **kw)
        p.meta["bench_index"] = i
        problems.append(p)
    cfg = problems[0].cfg
    if check_every != 50:
        log.warning("the engine checks every 50 steps through fit_problems; check_every=%d ignored", check_every)
        check_every = 50
    stop_cfg = stop_config_for(cfg, check_every=check_every, **(stop_overrides or {}))
    if fast:  # a handful of checks: only exercise the machinery
        stop_cfg = stop_cfg.replace(window=2, patience=1, min_steps=0)
    y_border = SR_BORDER if suite == "sr" else None
    factory = eval_factory(stop_cfg, y_border, keep_images=images is not None, margin=stop_margin)
    rows: list[dict | None] = [None] * len(problems)
    t0 = time.perf_counter()
    # trace_every: the engine hands the references to the fit items (and so to the stoppers) only with a
    # trace, which also gives the RGB psnr_trace of every image, for one extra render per check.
    for p, r in fit_problems(problems, device=device, slots=slots, stopper_factory=factory,
                             trace_every=check_every):
        i = p.meta["bench_index"]
        c = cases[i]
        if isinstance(r, Exception):
            log.error("%s/%s failed: %s", suite, c.name, r)
            rows[i] = {"name": c.name, "error": str(r)}
            continue
        ev = r.extra.get("stopping", {})
        kept = ev.pop("_images", {})
        if images is not None:
            H, W = r.image.pixels.shape[:2]
            images[c.name] = {"final": r.image.pixels,
                              **{k: v[:, :H, :W].permute(1, 2, 0).numpy() for k, v in kept.items()}}
            images[c.name].setdefault("auto", r.image.pixels)  # the rule never fired and had no fallback
        final = psnr(torch.from_numpy(r.image.pixels).permute(2, 0, 1), _ref_tensor(c.reference), y_border)
        fired = bool(ev.get("fired"))
        auto = ev.get("auto") or {}
        chose = fired or auto.get("from") == "discrepancy"  # the rule's image, or its fallback at the cap
        dip_paper, base_paper = PAPER[suite].get(c.name, (None, None))
        row = {
            "name": c.name,
            "size": list(c.reference.shape[:2][::-1]),
            "steps": r.steps,
            "seconds": round(r.seconds, 2),
            "auto_psnr": round(auto["psnr"], 4) if chose and auto.get("psnr") is not None else round(final, 4),
            "auto_step": auto.get("step") if chose else r.steps,
            "auto_stopped_at": auto.get("stopped_at") if fired else r.steps,
            "auto_fired": fired,
            "auto_from": "variance" if fired else auto.get("from", "last"),
            "oracle_psnr": ev.get("oracle_psnr"),
            "oracle_step": ev.get("oracle_step"),
            "final_psnr": round(final, 4),
            "paper_dip": None if fast else dip_paper,
            BASELINE_NAME[suite]: (round(c.baseline, 4) if c.baseline is not None
                                   else (None if fast else base_paper)),
            "restores": r.restores,
            "work": r.extra.get("work"),
            "metric_trace": ev.get("metric_trace", []),
            "var_trace": ev.get("var_trace", []),
            "psnr_trace": r.extra.get("psnr_trace", []),
            "loss": [float(f"{x:.5g}") for x in r.loss],
            **c.meta,
        }
        row["variants"] = replay_variants(row, stop_cfg)
        if suite == "denoise":  # the noise level, estimated from the noisy input alone (no reference)
            row["sigma_est"] = round(estimate_sigma(c.image.astype(np.float64) / 255.0), 5)
            row["discrepancy"] = replay_discrepancy(row)
        rows[i] = row
        log.info("%s/%s: auto %.2f (step %s) oracle %s (step %s) final %.2f", suite, c.name, row["auto_psnr"],
                 row["auto_step"], row["oracle_psnr"], row["oracle_step"], final)
    rows = [r for r in rows if r is not None]
    cols = ["auto_psnr", "oracle_psnr", "final_psnr", "paper_dip", BASELINE_NAME[suite], "auto_step",
            "oracle_step"]
    mean = {}
    ok = [r for r in rows if "error" not in r]
    for k in cols:
        vals = [r[k] for r in ok if r.get(k) is not None]
        mean[k] = round(float(np.mean(vals)), 4) if vals and len(vals) == len(ok) else None
    variants = []
    if ok and all(r.get("oracle_psnr") is not None for r in ok):
        per_row = [{variant_key(x): x for x in r["variants"]} for r in ok]
        for v in VARIANTS:
            k = variant_key(v)
            if any(k not in d for d in per_row):
                continue
            vals = [(d[k]["psnr_last"], d[k]["psnr_mean"], r["oracle_psnr"], d[k]["stopped_at"])
                    for d, r in zip(per_row, ok)]
            if any(x[0] is None for x in vals):
                continue
            variants.append({**v, "mean_last": round(float(np.mean([x[0] for x in vals])), 4),
                             "mean_mean": round(float(np.mean([x[1] if x[1] is not None else x[0] for x in vals])), 4),
                             "mean_oracle_gap": round(float(np.mean([x[0] - x[2] for x in vals])), 4),
                             "mean_stopped_at": round(float(np.mean([x[3] for x in vals])), 1)})
    discrepancy = []
    if ok and all(r.get("discrepancy") and r.get("oracle_psnr") is not None for r in ok):
        for j, c in enumerate(DISCREPANCY):
            got = [r["discrepancy"][j] for r in ok]
            # "hybrid": the variance rule where it fired, this rule where it did not (instead of the cap)
            hyb = [r["auto_psnr"] if r.get("auto_fired") else g["psnr"] for g, r in zip(got, ok)]
            discrepancy.append({"factor": c, "mean": round(float(np.mean([g["psnr"] for g in got])), 4),
                                "mean_oracle_gap": round(float(np.mean([g["psnr"] - r["oracle_psnr"]
                                                                        for g, r in zip(got, ok)])), 4),
                                "fired": sum(g["step"] is not None for g in got),
                                "hybrid_mean_oracle_gap": round(float(np.mean([h - r["oracle_psnr"]
                                                                               for h, r in zip(hyb, ok)])), 4)})
    return {
        "suite": suite, "preset": preset, "variants": variants, "discrepancy": discrepancy, "task": task,
        "steps": cfg.steps, "check_every": check_every,
        "stop_config": stop_cfg.to_dict(), "metric": "Y, 4px border" if suite == "sr" else "whole image",
        "images": rows, "mean": mean, "seconds": round(time.perf_counter() - t0, 2),
        "failed": len(rows) - len(ok),
    }


def _fmt(v, w=8, nd=2):
    if v is None:
        return "-".rjust(w)
    if isinstance(v, float):
        return f"{v:{w}.{nd}f}"
    return str(v).rjust(w)


def print_suite(res: dict, out=None) -> None:
    out = out or sys.stdout
    base = BASELINE_NAME[res["suite"]]
    print(f"\n== {res['suite']}  (preset {res['preset']}, {res['steps']} steps, PSNR dB, {res['metric']})",
          file=out)
    hdr = f"{'image':14s}{'auto':>8s}{'@step':>7s}{'oracle':>8s}{'@step':>7s}{'final':>8s}{'paper':>8s}{base:>9s}"
    print(hdr, file=out)
    for r in res["images"]:
        if "error" in r:
            print(f"{r['name']:14s}  failed: {r['error']}", file=out)
            continue
        print(f"{r['name']:14s}{_fmt(r['auto_psnr'])}{_fmt(r['auto_step'], 7)}{_fmt(r['oracle_psnr'])}"
              f"{_fmt(r['oracle_step'], 7)}{_fmt(r['final_psnr'])}{_fmt(r['paper_dip'])}{_fmt(r[base], 9)}",
              file=out)
    m = res["mean"]
    print(f"{'mean':14s}{_fmt(m['auto_psnr'])}{_fmt(m['auto_step'], 7, 0)}{_fmt(m['oracle_psnr'])}"
          f"{_fmt(m['oracle_step'], 7, 0)}{_fmt(m['final_psnr'])}{_fmt(m['paper_dip'])}{_fmt(m[base], 9)}",
          file=out)
    if res.get("variants") and res["preset"] != "fast":
        sc = res["stop_config"]
        print(f"rule variants replayed on the traces (window {sc['window']}; the best {PRINTED_VARIANTS} by gap, "
              f"and * the current rule; all in the JSON): rel_tol patience lag -> mean PSNR (last / window "
              f"mean), gap to the oracle, mean stop step", file=out)
        cur = variant_key(sc)
        ranked = sorted(res["variants"], key=lambda v: -v["mean_oracle_gap"])
        shown = ranked[:PRINTED_VARIANTS] + [v for v in ranked[PRINTED_VARIANTS:] if variant_key(v) == cur]
        for v in shown:
            mark = "*" if variant_key(v) == cur else " "
            print(f" {mark}{v['rel_tol']:4.2f} {v['patience']:3d} {v.get('lag', 0):3d} -> {v['mean_last']:6.2f} / "
                  f"{v['mean_mean']:6.2f}  {v['mean_oracle_gap']:+6.2f}  {v['mean_stopped_at']:7.0f}", file=out)
    if res.get("discrepancy") and res["preset"] != "fast":
        print("discrepancy principle replayed (stop when the loss, averaged over %d steps, reaches c x sigma_est^2): "
              "c -> mean PSNR, gap to the oracle, images where it fired; gap of the hybrid (the variance rule, "
              "this one where that never fired)" % DISCREPANCY_SMOOTH, file=out)
        for d in res["discrepancy"]:
            print(f"  {d['factor']:4.2f} -> {d['mean']:6.2f}  {d['mean_oracle_gap']:+6.2f}  {d['fired']}"
                  f"   hybrid {d['hybrid_mean_oracle_gap']:+6.2f}", file=out)


def main(suite: str = "all", data=None, fast: bool = False, limit: int | None = None, device: str = "auto",
         json: str | None = None, max_steps: int | None = None, crop: int | None = None, slots: int | None = None,
         seed: int = 0, only: str | None = None) -> int:
    """`dip bench quality` (and ``python -m pipeline.bench.quality``). Returns the exit code."""
    from pipeline.engine import pick_device
    from pipeline.io import write_json
    suites = SUITES if (suite or "all") == "all" else (suite,)
    if fast and not limit:
        limit = FAST_IMAGES
    crop = crop or (FAST_CROP if fast else None)
    only = [n.strip() for n in (only or "").split(",") if n.strip()] or None
    try:
        root = paper_dir(data)
        dev = pick_device(device or "auto")
    except Exception as e:  # noqa: BLE001
        print(f"dip bench quality: {e}", file=sys.stderr)
        return 2
    report = {"bench": "quality", "device": str(dev), "fast": fast, "limit": limit, "crop": crop,
              "max_steps": max_steps, "only": only, "data": str(root), "suites": {}}
    if dev.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(dev)
    t0 = time.perf_counter()
    failed = 0
    for s in suites:
        try:
            cases = load_cases(s, root, limit=limit, crop=crop, only=only)
        except FileNotFoundError as e:
            print(f"dip bench quality: {e}", file=sys.stderr)
            return 2
        if not cases:
            if only:
                continue
            print(f"dip bench quality: no images for suite {s} in {root}", file=sys.stderr)
            return 2
        res = run_suite(s, cases, device=dev, fast=fast, max_steps=max_steps, slots=slots, seed=seed or 0)
        failed += res["failed"]
        report["suites"][s] = res
        print_suite(res)
        sys.stdout.flush()
    report["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"\ntotal {report['seconds']:.1f} s on {dev}")
    if json:
        write_json(Path(json), report)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """`python -m pipeline.bench.quality`: the CLI's options plus --max-steps, --crop, --slots, --seed."""
    q = argparse.ArgumentParser(prog="python -m pipeline.bench.quality", description=__doc__.splitlines()[0])
    q.add_argument("--suite", choices=("denoise", "sr", "inpaint", "all"), default="all")
    q.add_argument("--data", default=None)
    q.add_argument("--fast", action="store_true")
    q.add_argument("--limit", type=int)
    q.add_argument("--device", default="auto")
    q.add_argument("--json", metavar="PATH")
    q.add_argument("--max-steps", type=int, help="cap every preset's step count at this")
    q.add_argument("--crop", type=int, help="centre-crop every image to at most this side first")
    q.add_argument("--slots", type=int, help="fits per batch (default: from the free device memory)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--only", metavar="NAMES", help="comma-separated image names (e.g. F16,hill); a suite "
                                                   "with none of them is skipped")
    return q


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main(**vars(build_parser().parse_args())))
