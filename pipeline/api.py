"""The Python API: turn images into fitting problems, fit them with the one engine, and turn the fits
back into images.

    from pipeline import restore
    result = restore("scan.png", task="denoise", preset="fast", seed=0)
    result.save("out/")            # out/scan.png + out/scan.json

Geometry. The network needs a canvas whose sides are multiples of 2**scales. The image (for SR: the
low-res input) is reflect-padded up to that canvas; the padding is masked out of the data term, and the
result is cropped back, so the output has the input's exact size (times the scale for SR). Nothing is
cropped away.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from pipeline.config import FitConfig, make_config
from pipeline.io import (ImageData, ImageError, MIN_SIDE, file_sha256, load_image, load_mask, meta_summary, save_image,
                         scaled_meta, write_json)

log = logging.getLogger("dip")
VERSION = "0.1.0"


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

    @property
    def factor(self) -> int:
        return self.cfg.scale if self.cfg.task == "sr" else 1

    @property
    def out_shape(self) -> tuple[int, int]:
        h, w = self.image.shape
        return h * self.factor, w * self.factor

    @property
    def canvas(self) -> tuple[int, int]:
        return canvas_for(self.cfg, *self.out_shape)


def canvas_for(cfg: FitConfig, H: int, W: int) -> tuple[int, int]:
    """The network canvas for an H x W output: each side a multiple of 2**scales (and of the SR factor),
    and at least twice that, so that the deepest scale keeps 2x2 pixels (BatchNorm in training mode
    needs more than one value per channel)."""
    f = cfg.scale if cfg.task == "sr" else 1
    m = max(cfg.net.multiple, f)
    return max(math.ceil(H / m), 2) * m, max(math.ceil(W / m), 2) * m


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
    f = p.factor
    H, W = canvas or p.canvas
    hc, wc = H // f, W // f
    h, w = p.image.shape
    known = np.ones((h, w), np.float32) if p.mask is None else p.mask.astype(np.float32)
    target = p.image.pixels * known[:, :, None]  # holes are zeroed: their content is never seen
    target = _pad(target, hc, wc).transpose(2, 0, 1)
    mask = np.zeros((1, hc, wc), np.float32)
    mask[0, :h, :w] = known
    item = FitItem(key=key if key is not None else p.name, target=np.ascontiguousarray(target, dtype=np.float32),
                   mask=mask, seed=p.seed)
    if with_reference and p.reference is not None:
        Hh, Ww = p.out_shape
        item.reference = np.ascontiguousarray(_pad(p.reference.pixels, H, W).transpose(2, 0, 1), dtype=np.float32)
        rm = np.zeros((1, H, W), np.float32)
        rm[0, :Hh, :Ww] = 1
        item.ref_mask = rm
    return item


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
            "config": p.cfg.to_dict(),
            "loss": [float(f"{x:.6g}") for x in self.loss],
            **({"source_metadata": meta_summary(self.image.meta)} if self.image.meta else {}),
            **p.meta,
            **self.extra,
        }

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


def fit_problems(problems: Iterable[Problem], device="auto", slots: int | None = None,
                 canvas_policy: str = "bucket", use_kernels: bool | None = None,
                 keep_weights: bool = False, trace_every: int = 0, stopper_factory=None,
                 on_step: Callable[[int], None] | None = None) -> Iterator[tuple[Problem, Result | Exception]]:
    """Fit many problems with the batched engine; yields (problem, Result or the exception) as each ends.

    Problems are grouped by (config, channels) and then by canvas ("bucket") or padded to the largest
    canvas of their group ("common"). Each group runs continuously batched with ``slots`` slots (default:
    from the free device memory). On CUDA out-of-memory the group is retried with half the slots.
    """
    import torch
    from pipeline.engine import BatchedFitter, auto_slots, pick_device, is_oom
    dev = pick_device(device) if isinstance(device, str) else device
    groups: dict = {}
    for p in problems:
        key = (p.cfg.replace(seed=0, steps=1), p.image.channels)
        groups.setdefault(key, []).append(p)
    for (cfg0, C), plist in groups.items():
        cfg = plist[0].cfg
        group_stopper = stopper_factory
        if group_stopper is None and cfg.auto_stop:
            from pipeline.stopping import make_stopper_factory
            group_stopper = make_stopper_factory(cfg)
        if canvas_policy == "common":
            H = max(p.canvas[0] for p in plist)
            W = max(p.canvas[1] for p in plist)
            buckets = {(H, W): plist}
        else:
            buckets = {}
            for p in plist:
                buckets.setdefault(p.canvas, []).append(p)
        for canvas, bl in buckets.items():
            pending = list(bl)
            n = slots or auto_slots(cfg, canvas, C, dev, len(pending))
            while pending:
                items = []
                for i, p in enumerate(pending):
                    it = to_fit_item(p, key=i, with_reference=trace_every > 0, canvas=canvas)
                    it.steps = p.cfg.steps
                    items.append(it)
                done: set[int] = set()
                try:
                    fitter = BatchedFitter(cfg, canvas, C, min(n, len(pending)), dev, use_kernels=use_kernels,
                                           keep_weights=keep_weights, trace_every=trace_every,
                                           stopper_factory=group_stopper)
                    for fit in fitter.iter_run(items, on_step):
                        i = fit.key
                        done.add(i)
                        yield pending[i], from_fit(pending[i], fit, str(dev))
                    pending = []
                except Exception as e:  # noqa: BLE001
                    if is_oom(e) and n > 1:
                        pending = [p for i, p in enumerate(pending) if i not in done]
                        n = max(1, n // 2)
                        log.warning("out of memory with %d slots on %s; retrying with %d", 2 * n, canvas, n)
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    for i, p in enumerate(pending):
                        if i not in done:
                            yield p, e
                    pending = []


def restore(image, task: str = "denoise", *, mask=None, reference=None, preset: str | None = None,
            scale: int | None = None, steps: int | None = None, seed: int = 0, device: str = "auto",
            keep_weights: bool = False, use_kernels: bool | None = None, **overrides) -> Result:
    """Restore one image. ``image``: a path, an ImageData, or an array. Returns a :class:`Result`."""
    p = make_problem(image, task=task, mask=mask, reference=reference, preset=preset, scale=scale,
                     seed=seed, steps=steps, **overrides)
    for _p, r in fit_problems([p], device=device, slots=1, keep_weights=keep_weights, use_kernels=use_kernels):
        if isinstance(r, Exception):
            raise r
        return r
    raise RuntimeError("no result")  # pragma: no cover
