"""Problems and results: an image to restore with everything its fit needs, and the restored image with
everything about how it was made; and the geometry between them and the engine.

Geometry. The network needs a canvas whose sides are multiples of 2**scales. The image (for SR: the
low-res input) is reflect-padded up to that canvas; the padding is masked out of the data term, and the
result is cropped back, so the output has the input's exact size (times the scale for SR). Nothing is
cropped away.

:Examples:

>>> from pipeline.config import make_config
>>> cfg = make_config("denoise", preset="denoise")     # 5 scales: sides are multiples of 32
>>> canvas_for(cfg, 100, 40)
(128, 64)
>>> canvas_for(cfg, 10, 10)                             # at least 2 x 32: the deepest scale keeps 2 x 2
(64, 64)
>>> [ladder_side(s, 32) for s in (64, 224, 256, 288, 520)]
[64, 224, 256, 320, 640]
>>> p = make_problem(np.zeros((40, 60, 3), np.float32), task="sr", scale=4, preset="sr4")
>>> p.out_shape, p.canvas
((160, 240), (160, 256))
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import VERSION, FitConfig, make_config
from pipeline.io import (ImageData, ImageError, MIN_SIDE, file_sha256, load_image, load_mask, meta_summary, save_image,
                         scaled_meta, write_json)
from pipeline.work import work_record

log = logging.getLogger("dip")


@dataclass
class Problem:
    """One image to restore, with everything needed to fit it and to write its result."""

    image: ImageData
    cfg: FitConfig
    seed: int = 0
    mask: np.ndarray | None = None  # (h, w) 1 = known (inpainting)
    reference: ImageData | None = None
    name: str = "image"
    source: str = ""  # input path, for the JSON
    source_sha256: str = ""
    meta: dict = field(default_factory=dict)
    # a tiled image's tiles fitted by an earlier, stopped run (pipeline.tiling.encode_tile's bytes, read from
    # a TileStore): fit_tiled merges those whose key still matches instead of fitting them again
    kept_tiles: list = field(default_factory=list, repr=False)
    # (i, n): fit only the fits (tiles and ensemble members) of this image whose index is i mod n, for
    # several processes to share one large image; each hands its fits to fit_tiled's ``on_tile`` and ends
    # the image with TilesPending, and a run without a part merges all the kept fits
    tile_part: tuple[int, int] | None = None

    @property
    def factor(self) -> int:
        return self.cfg.factor

    @property
    def out_shape(self) -> tuple[int, int]:
        h, w = self.image.shape
        return h * self.factor, w * self.factor

    @property
    def canvas(self) -> tuple[int, int]:
        return canvas_for(self.cfg, *self.out_shape)


def canvas_multiple(cfg: FitConfig) -> int:
    """Every canvas side is a multiple of this: 2**scales, or the SR factor if that is larger."""
    return max(cfg.net.multiple, cfg.factor)


def canvas_for(cfg: FitConfig, H: int, W: int) -> tuple[int, int]:
    """The network canvas for an H x W output: each side a multiple of :func:`canvas_multiple`, and at
    least twice that, so that the deepest scale keeps 2x2 pixels (BatchNorm in training mode needs more
    than one value per channel)."""
    m = canvas_multiple(cfg)
    return max(math.ceil(H / m), 2) * m, max(math.ceil(W / m), 2) * m


CANVAS_POLICIES = ("bucket", "ladder", "common")


def ladder_side(side: int, m: int) -> int:
    """``side`` (a multiple of ``m``) rounded up to the canvas ladder: m x 2, 3, 4, 5, 6, 7, then each
    doubling of 4, 5, 6, 7 (8, 10, 12, 14, 16, 20, ...). Neighbouring rungs are at most 25 % apart beyond
    4 m, so a side grows by less than that."""
    k = max(-(-side // m), 2)
    if k <= 7:
        return k * m
    e = 1
    while True:
        for a in (4, 5, 6, 7):
            if a << e >= k:
                return (a << e) * m
        e += 1


def check_canvas_policy(policy: str) -> None:
    if policy not in CANVAS_POLICIES:
        raise ValueError(f"canvas policy must be one of {CANVAS_POLICIES}, not {policy!r}")


def policy_canvas(cfg: FitConfig, canvas: tuple[int, int], policy: str = "bucket") -> tuple[int, int]:
    """The canvas a fit gets under a canvas policy, before ``common`` (which depends on the other images):
    ``bucket`` keeps it, ``ladder`` rounds each side up to the ladder (:func:`ladder_side`), so images of
    nearby sizes share a bucket at the cost of some padded (masked-out) pixels."""
    check_canvas_policy(policy)
    if policy != "ladder":
        return canvas
    m = canvas_multiple(cfg)
    return ladder_side(canvas[0], m), ladder_side(canvas[1], m)


def _pad(a: np.ndarray, H: int, W: int) -> np.ndarray:
    """Reflect-pad (h, w, ...) at the bottom/right up to (H, W)."""
    h, w = a.shape[:2]
    pads = [(0, H - h), (0, W - w)] + [(0, 0)] * (a.ndim - 2)
    mode = "reflect" if min(h, w) > 1 else "edge"
    return np.pad(a, pads, mode=mode)


def check_problem(p: Problem) -> None:
    h, w = p.image.shape
    if min(h, w) < MIN_SIDE:
        raise ImageError(p.source or p.name, f"{w}x{h} is too small: dip needs at least {MIN_SIDE}x{MIN_SIDE} pixels")
    if p.cfg.task == "inpaint" and p.mask is None:
        raise ImageError(p.source or p.name, "inpainting needs a mask (--mask): white = known, black = hole")
    if p.mask is not None and p.mask.shape != (h, w):
        raise ImageError(p.source or p.name, f"mask is {p.mask.shape[1]}x{p.mask.shape[0]} but the image is {w}x{h}")
    if p.mask is not None and p.mask.sum() == 0:
        raise ImageError(p.source or p.name, "the mask is all zero: no pixel is known")
    if p.reference is not None:
        rh, rw = p.reference.shape
        if (rh, rw) != p.out_shape or p.reference.channels != p.image.channels:
            raise ImageError(p.reference.path or "reference",
                             f"reference is {rw}x{rh}x{p.reference.channels} but the output will be "
                             f"{p.out_shape[1]}x{p.out_shape[0]}x{p.image.channels}")


def to_fit_item(p: Problem, key=None, with_reference: bool = False, canvas: tuple[int, int] | None = None):
    """The engine's view of a problem: measurements and mask on the canvas (default: the problem's own;
    a larger one for a batch with a common canvas), holes zeroed, padding masked out."""
    from pipeline.engine import FitItem
    check_problem(p)
    if p.cfg.ensemble > 1:
        raise ValueError(f"{p.source or p.name}: an ensemble of {p.cfg.ensemble} fits is fitted through "
                         "pipeline.fit.fit_tiled (or restore), which splits it into its members")
    if p.cfg.cuts(*p.image.shape):
        raise ValueError(f"{p.source or p.name}: its preset fits images larger than {p.cfg.tile} px as tiles, "
                         "through pipeline.fit.fit_tiled (or restore), which cuts them")
    f = p.factor
    H, W = canvas or p.canvas
    hc, wc = H // f, W // f
    h, w = p.image.shape
    known = np.ones((h, w), np.float32) if p.mask is None else p.mask.astype(np.float32)
    target = p.image.pixels * known[:, :, None]  # holes are zeroed: their content is never seen
    target = _pad(target, hc, wc).transpose(2, 0, 1)
    mask = np.zeros((1, hc, wc), np.float32)
    mask[0, :h, :w] = known
    val_mask = None
    if p.cfg.holdout:
        held = holdout_pixels(known, p.cfg.holdout, p.seed)
        val_mask = np.zeros_like(mask)
        val_mask[0, :h, :w] = held
        mask[0, :h, :w] -= held  # left out of the data term; the target keeps their values for the check
    item = FitItem(key=key if key is not None else p.name, target=np.ascontiguousarray(target, dtype=np.float32),
                   mask=mask, seed=p.seed, val_mask=val_mask)
    if with_reference and p.reference is not None:
        Hh, Ww = p.out_shape
        item.reference = np.ascontiguousarray(_pad(p.reference.pixels, H, W).transpose(2, 0, 1), dtype=np.float32)
        rm = np.zeros((1, H, W), np.float32)
        rm[0, :Hh, :Ww] = 1
        item.ref_mask = rm
    return item


def holdout_pixels(known: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(h, w) float32, 1 on ``round(fraction * known pixels)`` of the known pixels (at least 1), drawn from
    ``seed``: the measurements a self-validating fit leaves out of its data term (FitConfig.holdout). At
    least one known pixel stays in the data term.

    >>> m = holdout_pixels(np.ones((10, 10), np.float32), 0.05, seed=0)
    >>> int(m.sum()), bool((holdout_pixels(np.ones((10, 10)), 0.05, 0) == m).all())
    (5, True)
    >>> int((m * holdout_pixels(np.ones((10, 10)), 0.05, 1)).sum()) < 5   # another seed, other pixels
    True
    """
    idx = np.flatnonzero(np.asarray(known) > 0.5)
    n = min(max(1, round(fraction * idx.size)), idx.size - 1)
    out = np.zeros(np.asarray(known).shape, np.float32)
    if n > 0:
        rng = np.random.default_rng([int(seed), 0x686F6C64])  # "hold": apart from the fit's other draws
        out.flat[rng.choice(idx, size=n, replace=False)] = 1.0
    return out


@dataclass
class Result:
    """A restored image and everything about how it was made."""

    problem: Problem
    image: ImageData  # the restored image, input layout and bit depth (alpha passed through)
    steps: int
    seconds: float
    loss: list[float]
    restores: int
    stop_reason: str
    device: str
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    weights: object = None  # flat CPU tensor of the rendered generator (for ONNX export)
    z: object = None

    @property
    def pixels(self) -> np.ndarray:
        return self.image.pixels

    def record(self) -> dict:
        p = self.problem
        return {
            "dip_version": VERSION,
            "input": p.source or p.name,
            "input_sha256": p.source_sha256,
            "task": p.cfg.task,
            "preset": p.cfg.preset,
            "seed": p.seed,
            "steps": self.steps,
            "stop_reason": self.stop_reason,
            "seconds": round(self.seconds, 3),
            "device": self.device,
            "input_size": list(p.image.shape[::-1]),
            "output_size": list(self.image.shape[::-1]),
            "canvas": list(p.canvas[::-1]),
            "mode": self.image.mode,
            "bits": self.image.bits,
            "restores": self.restores,
            "metrics": self.metrics,
            "config": self._config_dict(),
            "loss": [float(f"{x:.6g}") for x in self.loss],
            **({"source_metadata": meta_summary(self.image.meta)} if self.image.meta else {}),
            **p.meta,
            **self.extra,
        }

    def _config_dict(self) -> dict:
        """The config as it ran: on a CPU the default "tf32" is plain fp32 arithmetic, and says so (the
        job's hash is of the config itself, so results made before this still count as done)."""
        d = self.problem.cfg.to_dict()
        if self.device.startswith("cpu") and d.get("precision") == "tf32":
            d["precision"] = "fp32"
        return d

    def save(self, out_dir, stem: str | None = None) -> tuple[Path, Path]:
        """Write ``<stem>.png`` and ``<stem>.json`` (each atomically; the JSON last)."""
        out_dir = Path(out_dir)
        stem = stem or Path(self.problem.source or self.problem.name).stem
        img_path, json_path = out_dir / f"{stem}.png", out_dir / f"{stem}.json"
        save_image(img_path, self.image)
        write_json(json_path, self.record())
        return img_path, json_path


def metrics(out: ImageData, ref: ImageData) -> dict:
    """PSNR (dB) and SSIM of ``out`` against ``ref``, on the quantised output as saved."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    from pipeline.io import to_uint
    scale = 65535.0 if out.bits == 16 else 255.0
    a = to_uint(out.pixels, out.bits).astype(np.float64) / scale
    b = ref.pixels.astype(np.float64)
    psnr = float(peak_signal_noise_ratio(b, a, data_range=1.0))
    ssim = float(structural_similarity(b, a, data_range=1.0, channel_axis=2))
    return {"psnr": round(psnr, 4), "ssim": round(ssim, 5)}


def output_image(p: Problem, px: np.ndarray) -> ImageData:
    """The result image of ``p`` from its fitted pixels (H, W, C) at the output size: the input's alpha
    (resized for super-resolution), bit depth and carried metadata (dpi times the factor)."""
    H, W = p.out_shape
    alpha = p.image.alpha
    if alpha is not None and p.factor != 1:
        from PIL import Image
        alpha = np.asarray(Image.fromarray(alpha.astype(np.float32), mode="F").resize((W, H), Image.LANCZOS))
        alpha = np.clip(alpha, 0, 1).astype(np.float32)
    return ImageData(np.clip(px, 0, 1), alpha, p.image.bits, "", scaled_meta(p.image.meta, p.factor))


def from_fit(p: Problem, fit, device: str) -> Result:
    H, W = p.out_shape
    px = np.ascontiguousarray(fit.image[:, :H, :W].transpose(1, 2, 0), dtype=np.float32)
    img = output_image(p, px)
    res = Result(problem=p, image=img, steps=fit.steps, seconds=fit.seconds, loss=fit.loss.tolist(),
                 restores=fit.restores, stop_reason=fit.stop_reason, device=device, extra=dict(fit.extra),
                 weights=fit.weights, z=fit.z)
    canvas = tuple(fit.extra.get("batch", {}).get("canvas") or p.canvas)  # the canvas it was fitted on
    ran = fit.steps + int(fit.extra.get("distill", {}).get("steps", 0))
    res.extra["work"] = work_record(p.cfg, canvas, p.image.channels, ran)
    if fit.psnr_trace:
        res.extra["psnr_trace"] = [[int(s), round(float(v), 4)] for s, v in fit.psnr_trace]
    if p.reference is not None:
        res.metrics = metrics(img, p.reference)
    return res


def make_problem(image, task: str = "denoise", mask=None, reference=None, preset: str | None = None,
                 scale: int | None = None, seed: int = 0, name: str | None = None, **overrides) -> Problem:
    """Build a Problem from paths or arrays. Arrays are (H, W[, C]) floats in [0, 1] or uint8/uint16."""
    cfg = overrides.pop("cfg", None) or make_config(task, preset=preset, scale=scale, **overrides)
    src, sha = "", ""
    if isinstance(image, (str, Path)):
        src, sha = str(image), file_sha256(image) if Path(image).is_file() else ""
        img = load_image(image)
    elif isinstance(image, ImageData):
        img = image
    else:
        img = _array_to_image(np.asarray(image))
    m = None
    if mask is not None:
        if isinstance(mask, (str, Path)):
            m = load_mask(mask, img.shape)
        else:
            m = (np.asarray(mask, dtype=np.float32) > 0.5).astype(np.float32)
    ref = None
    if reference is not None:
        ref = load_image(reference) if isinstance(reference, (str, Path)) else (
            reference if isinstance(reference, ImageData) else _array_to_image(np.asarray(reference)))
    p = Problem(image=img, cfg=cfg, seed=int(seed), mask=m, reference=ref,
                name=name or (Path(src).stem if src else "image"), source=src, source_sha256=sha)
    check_problem(p)
    return p


def _array_to_image(a: np.ndarray) -> ImageData:
    if a.dtype == np.uint8:
        bits, a = 8, a.astype(np.float32) / 255
    elif a.dtype == np.uint16:
        bits, a = 16, a.astype(np.float32) / 65535
    else:
        bits, a = 8, a.astype(np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    alpha = None
    if a.shape[2] in (2, 4):
        alpha, a = a[:, :, -1].copy(), a[:, :, :-1].copy()
    return ImageData(np.clip(a, 0, 1), alpha, bits)
