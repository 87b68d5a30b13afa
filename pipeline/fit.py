"""Fit whole images, tiles and ensemble members through one engine, within a memory budget.

    from pipeline.fit import fit_tiled
    for problem, result in fit_tiled(problems, device="cuda", tile=512, overlap=64, max_memory=20 << 30):
        result.save(out)          # one PNG + one JSON per *image* (the JSON carries the tile layout)

Each source problem becomes its *units*: itself (a whole-image fit), or its tiles (pipeline.tiling.split:
when a side is above ``tile``, the caller's or else the config's ``FitConfig.tile``, or its whole fit
is estimated above the memory budget, pipeline.memory),
or its ensemble members (``FitConfig.ensemble`` K: the whole image K times, from K seeds, as one box
of tiles). All units go through one :func:`pipeline.batching.fit_problems`, so the tiles of one big image
fill a batch by themselves, and each image is merged (pipeline.tiling.Merger) and yielded as soon as its
last unit ends.
"""
from __future__ import annotations

import gc
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count

from pipeline.batching import Feed, Ready, as_feed, fit_problems
from pipeline.memory import estimate_fit_bytes, memory_budget, slots_for
from pipeline.problem import Problem, Result, canvas_for, check_canvas_policy, policy_canvas
from pipeline.tiling import Merger, TiledResult, input_tile, split

log = logging.getLogger("dip.tiling")

DEFAULT_TILE_OUT = 512  # default tile side in OUTPUT pixels when dip picks the tile itself


class TileError(RuntimeError):
    pass


class TilesPending(RuntimeError):
    """A ``tile_part`` run of an image has fitted its share; the image's other fits are other parts'. Not a
    failure: its fits went to ``on_tile``, and a run without a part, given them all, merges the image."""


def _canvas(cfg, h: int, w: int) -> tuple[int, int]:
    """The canvas of an h x w input (output pixels)."""
    return canvas_for(cfg, h * cfg.factor, w * cfg.factor)


def needs_tiling(problem: Problem, tile: int | None = None, max_memory_bytes: int | None = None,
                 device="cpu", canvas_policy: str = "bucket") -> bool:
    """Whether to fit ``problem`` as tiles: with an explicit ``tile``, when a side is longer than it;
    otherwise when one whole-image fit (on the canvas the policy gives it) is estimated above the budget
    (:func:`pipeline.memory.memory_budget`)."""
    h, w = problem.image.shape
    if tile:
        return h > tile or w > tile
    budget = memory_budget(device, max_memory_bytes)
    if budget is None:
        return False
    canvas = policy_canvas(problem.cfg, problem.canvas, canvas_policy)
    return estimate_fit_bytes(problem.cfg, canvas, problem.image.channels, device) > budget


def choose_tile(problem: Problem, max_memory_bytes: int | None = None, device="cpu") -> int:
    """A tile side (input pixels) for an image that needs tiling: ``DEFAULT_TILE_OUT / factor``, halved
    until one fit of it is estimated within the budget. Raises MemoryError when even 32 output pixels
    do not fit."""
    budget = memory_budget(device, max_memory_bytes)
    t_out = DEFAULT_TILE_OUT
    while True:
        t_in = input_tile(problem, t_out)
        c = _canvas(problem.cfg, t_in, t_in)
        if budget is None or estimate_fit_bytes(problem.cfg, c, problem.image.channels, device) <= budget:
            return t_in
        if t_out <= 32:
            raise MemoryError(f"the memory budget of {budget / 2**30:.2f} GiB is below one fit of a "
                              f"{t_out}x{t_out} tile; raise --max-memory")
        t_out //= 2


@dataclass
class _Image:
    """A tiled image (or an ensemble) while its units are fitted."""

    problem: Problem
    merger: Merger | None
    oom: int | None = None  # the forced tile side after running out of memory
    t0: float | None = None  # when its first unit started (from the units' own times)
    failed: bool = False
    started: bool = False  # on_start was called for it
    units: int = 0  # units handed out whose result has not come back
    others: int = 0  # fits left to the image's other parts (Problem.tile_part)


@dataclass
class _Final:
    """A result that passes straight through the engine's stream (a bad input, an image with no unit to
    fit, an out-of-memory that tiles cannot fix): never retried."""

    result: object


def fit_tiled(problems, device="auto", slots: int | None = None, tile: int | None = None,
              overlap: int | None = None, max_memory: int | None = None, auto: bool = True,
              canvas_policy: str = "bucket", use_kernels: bool | None = None, keep_weights: bool = False,
              stopper_factory=None, on_step: Callable[[int], None] | None = None,
              on_start: Callable[[Problem], None] | None = None,
              on_tile: Callable[[Problem, int, bytes], None] | None = None,
              ) -> Iterator[tuple[Problem, Result | Exception]]:
    """Fit problems, tiling those that need it; yields (original problem, Result | Exception) per image.

    ``tile``: tile side in input pixels (images with a longer side are tiled; default: each problem's
    ``cfg.tile``, where a preset sets one). ``max_memory``: a byte
    budget for the fits on the device: images whose whole fit is estimated above it are tiled, and every
    bucket's slot count is ``min(slots, budget // per-fit estimate)``. With neither, ``auto`` tiles only
    images whose whole fit is above the automatic budget (CUDA: 80% of the free memory). A failed tile
    fails its image (the exception names the tile); the image's other tiles are not merged. ``problems``
    may be a :class:`pipeline.batching.Feed` (more problems later), as for fit_problems. ``on_start(p)``
    is called once per source problem, when its first unit starts fitting.

    Resume: ``on_tile(p, index, blob)`` is called as each tile (or ensemble member) of a cut image ends, with
    the tile's result as bytes (pipeline.tiling.encode_tile) for the caller to keep (pipeline.tiling.TileStore);
    a source problem's ``kept_tiles`` (such bytes, from a stopped run) are merged instead of fitted where
    their key matches the tile (pipeline.tiling.tile_key), so the image goes on from where it stopped. With
    ``keep_weights`` a kept tile is reused only if it has its weights. A custom ``stopper_factory`` keeps
    resume only if it carries its rule as ``factory.config`` (a StopConfig, as
    pipeline.stopping.make_stopper_factory's do): the keys then hold that rule. Without one, resume is
    off (the key could not see the rule).

    Out of memory: fit_problems first halves the batch; an image that still runs out of memory with one
    slot (the memory model underestimated it) is fitted again as tiles of half its longer side, then of
    half that, down to 32 output pixels, and its JSON says so (``oom_fallback``). The job never dies of it.
    """
    from pipeline.engine import pick_device
    check_canvas_policy(canvas_policy)
    rule = getattr(stopper_factory, "config", None)  # a custom factory's rule, for the kept tiles' keys
    resume = stopper_factory is None or rule is not None
    tiler = _Tiler(as_feed(problems), pick_device(device), tile, overlap, int(max_memory) if max_memory else None,
                   auto, canvas_policy, on_start, on_tile if resume else None, keep_weights, resume,
                   rule.to_dict() if rule is not None else None)
    slot_fn = ((lambda cfg, canvas, C, d, n: slots_for(cfg, canvas, C, tiler.dev, tiler.budget, slots, n))
               if tiler.budget else slots)
    results = fit_problems(tiler, device=tiler.dev, slots=slot_fn, canvas_policy=canvas_policy,
                           use_kernels=use_kernels, keep_weights=keep_weights, stopper_factory=stopper_factory,
                           on_step=on_step, on_start=tiler.started)
    for q, r in results:
        yield from tiler.back(q, r)


class _Tiler(Feed):
    """The engine's feed: the source's problems expanded into units, and the retries; and what comes back,
    merged into images."""

    def __init__(self, source: Feed, dev, tile, overlap, budget, auto, policy, on_start, on_tile=None,
                 weights: bool = False, resume: bool = True, rule: dict | None = None):
        self.source, self.live = source, source.live
        self.dev, self.tile, self.overlap, self.budget, self.auto, self.policy = dev, tile, overlap, budget, auto, policy
        self.on_start, self.on_tile, self.weights, self.resume = on_start, on_tile, weights, resume
        self.rule = rule  # the stopping rule of the caller's stopper factory (None: each config's own)
        self.images: dict[int, _Image] = {}  # image number (a tile problem's meta["image"]) -> its state
        self.numbers = count()
        self.queue: deque = deque()  # units (whole problems, tiles, Ready) waiting to go into the engine
        self.outstanding = 0  # units handed to the engine whose result has not come back
        self.source_ended = False

    # ---- out: units -----------------------------------------------------------------------------------
    def get(self, wait: bool):
        while True:
            if self.queue:
                x = self.queue.popleft()
                if not isinstance(x, Ready):
                    self.outstanding += 1
                return x
            if self.source_ended:
                if self.outstanding and wait:  # cannot happen: fit_problems only waits with nothing in flight
                    raise RuntimeError("fit_tiled: waiting for work with units still in flight")
                return None if self.outstanding else Feed.END
            x = self.source.get(wait)
            if x is Feed.END:
                self.source_ended = True
            elif x is None:
                return None
            elif isinstance(x, Ready):
                return Ready(x.problem, _Final(x.result))
            else:
                self.queue.extend(self.expand(x))

    def expand(self, p: Problem, forced: int | None = None) -> list:
        """The units of one image: itself, or its tiles (a Ready when it fails or is all copied)."""
        try:
            tile = self.tile or p.cfg.tile  # the caller's --tile, else the preset's
            if forced is None:
                if not (tile or self.budget or self.auto) or not needs_tiling(
                        p, tile, self.budget, self.dev, self.policy):
                    if p.cfg.ensemble == 1 and not p.cfg.cuts(*p.image.shape):
                        return [p]
                    # one box, the whole image: an ensemble's members, or an image under the caller's tile
                    # that its preset would have cut (the box's fit is whole)
                    t = max(p.image.shape)
                else:
                    t = tile or choose_tile(p, self.budget, self.dev)
            else:
                t = forced
            if self.budget:
                c = policy_canvas(p.cfg, _canvas(p.cfg, min(t, p.image.shape[0]), min(t, p.image.shape[1])),
                                  self.policy)
                per = estimate_fit_bytes(p.cfg, c, p.image.channels, self.dev)
                if per > self.budget:
                    raise MemoryError(f"one {t}x{t} tile needs about {per / 2**30:.2f} GiB, above the memory "
                                      f"budget of {self.budget / 2**30:.2f} GiB: use a smaller --tile")
            tps, lay = split(p, t, self.overlap)
        except Exception as e:  # noqa: BLE001
            return [Ready(p, _Final(e))]
        img = _Image(p, Merger(lay), oom=forced)
        kept = self.kept(p, tps)
        p.kept_tiles = []  # consumed: a big scan's kept tiles are not held twice
        for r in kept:
            img.merger.add(r)
        if kept:
            img.merger.kept = len(kept)
            tps = [q for q in tps if q.meta["tile"] in img.merger.pending]
        fits = len(kept) + len(tps)  # the image's fits, all parts'
        if p.tile_part is not None:
            i, n = p.tile_part
            mine = [q for q in tps if q.meta["tile"] % n == i]
            img.others = len(tps) - len(mine)
            tps = mine
        log.info("%s: %d tiles of %d px (overlap %d; %d fits each), %d copied%s", p.source or p.name,
                 len(lay.tiles) // lay.ensemble, t, lay.overlap, lay.ensemble, len(lay.copied),
                 f", {len(kept)} of {fits} fits kept from a stopped run" if kept else "")
        if not tps:
            return [Ready(p, _Final(self.pending(img) if img.others else self.finish(img)))]
        n = next(self.numbers)
        self.images[n] = img
        img.units = len(tps)
        for q in tps:
            q.meta["image"] = n
        return tps

    def kept(self, p: Problem, tps: list[Problem]) -> list[Result]:
        """The results of ``p``'s kept tiles (``p.kept_tiles``) that are fits of tiles in ``tps``."""
        if not (self.resume and p.kept_tiles):
            return []
        from pipeline.tiling import decode_tile
        by_index = {q.meta["tile"]: q for q in tps}
        out = {}
        for blob in p.kept_tiles:
            try:
                i = _blob_index(blob)
            except Exception:  # noqa: BLE001 - a damaged file: its tile is fitted again
                continue
            if i in by_index and i not in out:
                r = decode_tile(blob, by_index[i], weights=self.weights, rule=self.rule)
                if r is not None:
                    out[i] = r
        return [out[i] for i in sorted(out)]

    def retry(self, p: Problem, t_out: int) -> list:
        """After out of memory: ``p`` again as tiles of about ``t_out`` output pixels."""
        t_in = input_tile(p, t_out)
        if t_out < 32:
            return [Ready(p, _Final(MemoryError(f"{p.source or p.name}: out of memory even with tiles of "
                                                f"{2 * t_out} output pixels")))]
        log.warning("%s: out of memory; fitting it again as tiles of %d px", p.source or p.name, t_in)
        gc.collect()  # the failed fit's tensors
        if self.dev.type == "cuda":
            import torch
            torch.cuda.empty_cache()
        return self.expand(p, forced=t_in)

    def started(self, q: Problem) -> None:
        """A unit took a slot: the first unit of an image starts the image."""
        if self.on_start is None:
            return
        img = self.images.get(q.meta.get("image")) if "image" in q.meta else None
        if img is None:
            self.on_start(q)
        elif not img.started:
            img.started = True
            self.on_start(img.problem)

    # ---- back: results ---------------------------------------------------------------------------------
    def back(self, q: Problem, r):
        """What the engine gave for unit ``q``: the image's result when it is complete (0 or 1 yielded)."""
        from pipeline.engine import drop_tracebacks, is_oom
        if isinstance(r, _Final):
            yield q, r.result
            return
        self.outstanding -= 1
        if "image" not in q.meta:  # a whole image
            if isinstance(r, Exception) and is_oom(r):
                drop_tracebacks(r)
                self.queue.extend(self.retry(q, max(q.out_shape) // 2))
                return
            yield q, r
            return
        img = self.images[q.meta["image"]]
        img.units -= 1
        if not img.units:  # its last unit: nothing more will come back for it
            self.images.pop(q.meta["image"])
        if self.on_tile is not None and not isinstance(r, Exception):
            self.keep(img.problem, q, r)  # also after another tile failed: the image's next try needs it
        if img.failed:
            return
        lay = img.merger.layout
        if isinstance(r, Exception):
            img.failed, img.merger = True, None  # the rest of its tiles are dropped as they come back
            if is_oom(r) and len(lay.tiles) > 1:  # its tiles are too big: the whole image again, smaller
                drop_tracebacks(r)
                self.queue.extend(self.retry(img.problem, lay.tile * img.problem.factor // 2))
                return
            err = TileError(f"tile {q.meta.get('tile')} of {len(lay.tiles)} failed: {r}")
            err.__cause__ = r
            yield img.problem, err
            return
        now = time.perf_counter()  # the image's time: from its first tile's start to its last tile's end
        img.t0 = min(img.t0 if img.t0 is not None else now, now - r.seconds)
        img.merger.add(r)
        if img.merger.done:
            yield img.problem, self.finish(img)
        elif not img.units and img.others:
            yield img.problem, self.pending(img)

    def keep(self, p: Problem, q: Problem, r: Result) -> None:
        """Hand a finished tile to ``on_tile`` (before the merge, which drops its pixels)."""
        from pipeline.tiling import encode_tile
        try:
            self.on_tile(p, int(q.meta["tile"]), encode_tile(r, self.rule))
        except Exception as e:  # noqa: BLE001 - keeping a tile is a convenience; the fit goes on
            log.warning("%s: tile %s could not be kept for resume: %s", p.source or p.name, q.meta["tile"], e)

    def pending(self, img: _Image) -> TilesPending:
        """The end of a ``tile_part`` run of an image: its share is fitted, the rest is other parts'."""
        i, n = img.problem.tile_part
        lay = img.merger.layout
        img.merger = None
        return TilesPending(f"part {i + 1} of {n} done: {len(lay.fitted) - img.others} of {len(lay.fitted)} "
                            f"fits kept, {img.others} left to the other parts; a run without a part merges them")

    def finish(self, img: _Image) -> TiledResult:
        r = img.merger.finish(0.0 if img.t0 is None else time.perf_counter() - img.t0, str(self.dev))
        img.merger = None
        if img.oom and "oom_fallback" not in r.extra:
            r.extra["oom_fallback"] = {"tile": img.oom, "why": "the whole image (or larger tiles) ran out of memory"}
        return r


def _blob_index(blob: bytes) -> int:
    """The tile index a kept tile's bytes are of (its header), without decoding the arrays."""
    import io
    import json

    import numpy as np
    with np.load(io.BytesIO(blob)) as z:
        return int(json.loads(z["head"].tobytes().decode())["tile"])
