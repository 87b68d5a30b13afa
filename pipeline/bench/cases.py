"""The paper's benchmark sets as cases: the images, their references and the paper's numbers, and the
metric (PSNR on the 8-bit output; Y with a border for SR). See pipeline.bench.quality for the protocols.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

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
