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
from pipeline.work import work_record

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


def canvas_multiple(cfg: FitConfig) -> int:
    """Every canvas side is a multiple of this: 2**scales, or the SR factor if that is larger."""
    return max(cfg.net.multiple, cfg.scale if cfg.task == "sr" else 1)


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
                         "pipeline.tiling.fit_tiled (or restore), which splits it into its members")
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


class Feed:
    """A source of problems for :func:`fit_problems` that may have nothing *now* and more later (the Ray
    actor's inbox, pipeline.job). ``get(wait)`` returns the next problem (or a :class:`Ready`); ``None``
    when nothing is there now and ``wait`` is False; ``Feed.END`` when nothing more will ever come. With
    ``wait`` True it blocks until one of those is available."""

    END = object()
    live = True  # False: everything is there from the start (a plain list behind the interface)

    def get(self, wait: bool):  # pragma: no cover - the interface
        raise NotImplementedError


@dataclass
class Ready:
    """A result made without the engine (a bad input, an image whose tiles are all copied), passed
    through a feed so that it comes out of fit_problems in turn."""

    problem: object
    result: object


class _IterFeed(Feed):
    """A plain iterable as a feed: it never has "nothing now"."""

    live = False

    def __init__(self, it):
        self.it = iter(it)

    def get(self, wait: bool):
        return next(self.it, Feed.END)


def _drain(feed: Feed) -> list:
    out = []
    while (x := feed.get(True)) is not Feed.END:
        if x is not None:
            out.append(x)
    return out


def fit_problems(problems: Iterable[Problem] | Feed, device="auto", slots=None,
                 canvas_policy: str = "bucket", use_kernels: bool | None = None,
                 keep_weights: bool = False, trace_every: int = 0, stopper_factory=None,
                 on_step: Callable[[int], None] | None = None, elastic: bool = True,
                 ) -> Iterator[tuple[Problem, Result | Exception]]:
    """Fit many problems with the batched engine; yields (problem, Result or the exception) as each ends.

    Problems are bucketed by (config, channels, canvas); with ``canvas_policy="ladder"`` each canvas side is
    first rounded up to a coarser ladder (:func:`ladder_side`: rungs at most 25 % apart), so that images of
    nearby sizes share a batch; with ``"common"`` every problem of a (config, channels) group is padded to
    the group's largest canvas. The padding is masked out of the data term and cropped off the result.
    One bucket is fitted at a time, continuously batched: a finished slot takes the next problem of its
    bucket at once. A problem with ``cfg.ensemble > 1`` gets a ValueError: pipeline.tiling.fit_tiled
    splits it into its members.

    ``problems`` is an iterable, or a :class:`Feed` that can have more problems later: a bucket's batch
    then also takes the problems that arrive while it runs (so a Ray actor's batch stays full from one call
    to the next), and when its bucket has nothing left now it drains, and the oldest waiting problem's
    bucket goes next. A bucket that keeps being refilled while another bucket's problem waits hands over
    after ``4 x slots`` more loads. (A plain iterable is read whole first: buckets go in order of their first
    problem, each to its end.) ``canvas_policy="common"`` reads a feed to its end first.

    ``elastic``: a bucket's batch shrinks when it drains (to what is still loaded, once that is half of it
    or less) and grows when more problems wait than it has slots (up to its size), moving the fits' state
    (:meth:`pipeline.engine.BatchedFitter.resize`); False keeps each batch's size fixed.

    ``slots``: the batch size, or None (from the free device memory: pipeline.engine.auto_slots), or a
    function ``(cfg, canvas, channels, device, n_waiting) -> int | None``. Out of memory with more than one slot:
    the bucket's in-flight problems go back to the front of its queue and its batch size is halved;
    with one slot, the problem gets the error (pipeline.tiling retries it as tiles).
    """
    import itertools
    from collections import deque
    import torch
    from pipeline.engine import BatchedFitter, auto_slots, pick_device, is_oom
    dev = pick_device(device) if isinstance(device, str) else device
    feed = problems if isinstance(problems, Feed) else _IterFeed(problems)
    live_feed = feed.live
    check_canvas_policy(canvas_policy)
    common: dict = {}
    if canvas_policy == "common":  # the common canvas is the largest of the group: read everything first
        allp = _drain(feed)
        for x in allp:
            if not isinstance(x, Ready):
                g = (x.cfg.replace(seed=0, steps=1), x.image.channels)
                h, w = common.get(g, (0, 0))
                common[g] = (max(h, x.canvas[0]), max(w, x.canvas[1]))
        feed, live_feed = _IterFeed(allp), False
    pending: dict = {}  # bucket key -> deque[(arrival, Problem)]
    ready: deque = deque()  # (problem, result) to yield in turn
    n_of: dict = {}  # bucket key -> its batch size (halved on out-of-memory)
    arrival = itertools.count()
    ended = False

    def route(x) -> None:
        if isinstance(x, Ready):
            ready.append((x.problem, x.result))
            return
        g = (x.cfg.replace(seed=0, steps=1), x.image.channels)
        canvas = common.get(g) or policy_canvas(x.cfg, x.canvas, canvas_policy)
        pending.setdefault(g + (canvas,), deque()).append((next(arrival), x))

    def poll(wait: bool = False) -> None:
        nonlocal ended
        while not ended:
            x = feed.get(wait)
            if x is Feed.END:
                ended = True
            elif x is None:
                return
            else:
                route(x)
                wait = False

    def oldest_elsewhere(key) -> int | None:
        heads = [q[0][0] for k, q in pending.items() if q and k != key]
        return min(heads) if heads else None

    def run_bucket(key):
        _cfg0, C, canvas = key
        dq = pending[key]
        cfg = dq[0][1].cfg
        factory = stopper_factory
        if factory is None and cfg.auto_stop:
            from pipeline.stopping import make_stopper_factory
            factory = make_stopper_factory(cfg)
        if key not in n_of:  # kept for the bucket's later batches: a live feed's first ones may be small
            waiting = 64 if live_feed else len(dq)
            n = slots(cfg, canvas, C, dev, waiting) if callable(slots) else slots
            n_of[key] = int(n or auto_slots(cfg, canvas, C, dev, waiting))
        n = max(1, min(n_of[key], len(dq)))
        inflight: dict[int, tuple[int, Problem]] = {}
        keys = itertools.count()
        passed_over = 0

        def items():
            nonlocal passed_over
            while True:
                if not dq:
                    poll()
                if dq:
                    if live_feed:  # hand over to a bucket whose problem has waited longer, after a while
                        old = oldest_elsewhere(key)
                        if old is not None and old < dq[0][0]:
                            passed_over += 1
                            if passed_over > 4 * n:
                                return
                    a, p = dq.popleft()
                    try:
                        it = to_fit_item(p, key=next(keys), with_reference=trace_every > 0, canvas=canvas)
                    except Exception as e:  # noqa: BLE001
                        ready.append((p, e))
                        continue
                    it.steps = p.cfg.steps
                    inflight[it.key] = (a, p)
                    yield it
                elif ended:
                    return
                else:
                    yield None  # nothing now: the free slot waits, and the batch drains if nothing comes

        def wanted(n_loaded: int) -> int:  # the batch size for what is loaded and what waits (resizes it)
            if not dq:
                poll()
            return min(n_of[key], n_loaded + len(dq))

        fitter = None
        try:
            fitter = BatchedFitter(cfg, canvas, C, n, dev, use_kernels=use_kernels, keep_weights=keep_weights,
                                   trace_every=trace_every, stopper_factory=factory)
            for fit in fitter.iter_run(items(), on_step, slots_wanted=wanted if elastic else None):
                _a, p = inflight.pop(fit.key)
                yield p, from_fit(p, fit, str(dev))
                while ready:
                    yield ready.popleft()
        except Exception as e:  # noqa: BLE001
            lost = sorted(inflight.values(), key=lambda ap: ap[0])
            inflight.clear()
            size = fitter.B if fitter is not None else n  # an elastic batch may have grown or shrunk
            fitter = None
            if is_oom(e) and size > 1:
                dq.extendleft(reversed(lost))  # back to the front of the queue, in their order
                n_of[key] = max(1, size // 2)
                log.warning("out of memory with %d slots on %s; retrying with %d", size, canvas, n_of[key])
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                return
            if not lost:  # the batch itself could not run: its bucket's waiting problems get the error
                lost = list(dq)
                dq.clear()
            for _a, p in lost:
                yield p, e

    while True:
        poll()
        while ready:
            yield ready.popleft()
        live = [k for k, q in pending.items() if q]
        if not live:
            if ended:
                return
            poll(wait=True)
            continue
        yield from run_bucket(min(live, key=lambda k: pending[k][0][0]))  # the oldest waiting problem's bucket


def restore(image, task: str = "denoise", *, mask=None, reference=None, preset: str | None = None,
            scale: int | None = None, steps: int | None = None, seed: int = 0, device: str = "auto",
            keep_weights: bool = False, use_kernels: bool | None = None, **overrides) -> Result:
    """Restore one image. ``image``: a path, an ImageData, or an array. Returns a :class:`Result`."""
    p = make_problem(image, task=task, mask=mask, reference=reference, preset=preset, scale=scale,
                     seed=seed, steps=steps, **overrides)
    if p.cfg.ensemble > 1:  # its members are fitted like the tiles of one image, and averaged
        from pipeline.tiling import fit_tiled
        fits = fit_tiled([p], device=device, slots=p.cfg.ensemble, auto=False, keep_weights=keep_weights,
                         use_kernels=use_kernels)
    else:
        fits = fit_problems([p], device=device, slots=1, keep_weights=keep_weights, use_kernels=use_kernels)
    for _p, r in fits:
        if isinstance(r, Exception):
            raise r
        return r
    raise RuntimeError("no result")  # pragma: no cover
