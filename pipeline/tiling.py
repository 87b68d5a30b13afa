"""Large scans: fit an image as overlapping tiles, within a memory budget, and blend them seamlessly.

    from pipeline.tiling import fit_tiled
    for problem, result in fit_tiled(problems, device="cuda", tile=512, overlap=64, max_memory=20 << 30):
        result.save(out)          # one PNG + one JSON per *image* (the JSON carries the tile layout)

Plan (:func:`plan_tiles`). Tiles are cut in measurement coordinates (for SR: the low-res input), each
``tile x tile`` (or the whole side when the image is smaller), ``n = 1 + ceil((L - tile) / (tile - overlap))``
per axis, starts spread evenly (``round(i * (L - tile) / (n - 1))``) so every overlap is at least
``overlap`` and the last tile ends exactly at the border. Output boxes are the input boxes times the SR
factor, so low-res tiles map exactly onto the high-res grid.

Blending (:func:`axis_weights`). Per axis and per pair of neighbours, a raised-cosine (Hann) ramp of
``overlap * factor`` output pixels, centred in the pair's actual overlap: the first tile ramps down
``0.5 + 0.5 cos(pi (i + 1/2) / r)`` while the second ramps up ``0.5 - 0.5 cos(...)`` (they sum to 1),
the first tile is 0 after its ramp and the second 0 before it (so the outermost pixels of a tile, the
ones the convolutions' reflection padding spoils, get no weight when the overlap is wider than the
ramp). A tile's 2-D weight is the product of its row and column weights. The merge divides by the sum
of the weights, so it is a partition of unity whatever the layout; with ``overlap <= tile / 3`` (the
default is tile / 8) the ramps of one tile never meet and the sum is exactly 1 before normalising, and a
pixel covered by one tile only has weight 1.

Each tile is its own :class:`pipeline.api.Problem` (same config, a seed derived from the image seed and
the tile index by :func:`tile_seed`, the mask cut with the image). For inpainting a tile whose pixels are
all known is not fitted: it is copied from the input. A tile with no known pixel at all is an error
(the hole is larger than a tile: use a larger ``--tile``).

Memory (:func:`estimate_fit_bytes`). Peak bytes of one fit on a canvas ``H x W``:
``a + b * H * W``. On CUDA, ``a`` and ``b`` are measured once per (config, channels) with two short
probes (``engine.estimate_slot_bytes`` at two small canvases); elsewhere (and for planning without a
GPU) they come from the architecture: ``b = k * A(net)``, where ``A`` counts the activation channels
autograd keeps per output pixel (:func:`activation_channels`) and ``k`` is per device/precision
(``BYTES_PER_ACT``; see docs/tiling.md for the measurements and the uncertainty), and
``a = 6 * 4 * params + 64 MiB`` (weights, gradient, Adam m and v, last-good copy, weight average).
The slot count for tiles is ``budget // estimate(tile canvas)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.api import VERSION, Problem, Result, canvas_multiple, output_image
from pipeline.api import metrics as _metrics
from pipeline.io import ImageData, ImageError, encode_meta
from pipeline.work import add_work

log = logging.getLogger("dip.tiling")

LAYOUT_FORMAT = "dip-tiles"
LAYOUT_VERSION = 1
DEFAULT_TILE_OUT = 512  # default tile side in OUTPUT pixels when dip picks the tile itself
MARGIN = 0.8  # fraction of free device memory that an automatic budget uses

# bytes per (activation channel x output pixel), by device type and precision; see docs/tiling.md.
# cpu: measured peak RSS of 1-slot fits at 128^2..384^2 (fast, denoise, jpeg, inpaint, inpaint-object
# presets): 0.79..1.31 x 4 bytes; the upper envelope is used. cuda: from an H100 512^2 denoise-preset
# fit (1.59 GiB in bf16; about 5 GB in fp32/tf32), cuDNN workspaces and allocator caching included.
BYTES_PER_ACT = {("cpu", "fp32"): 5.3, ("cpu", "tf32"): 5.3, ("cpu", "bf16"): 5.3,
                 ("cuda", "fp32"): 8.6, ("cuda", "tf32"): 8.6, ("cuda", "bf16"): 2.9}
STATE_COPIES = 6  # flat weights, gradient, Adam m, Adam v, last good weights, weight average
FIXED_BYTES = 64 << 20


# ---- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """One tile. Boxes are (y0, x0, y1, x1), end-exclusive. ``box`` is in input (measurement)
    coordinates; ``out_box`` = ``box`` x factor, in output coordinates. ``wy`` / ``wx``: the blending
    rule of this tile along rows / columns, in output pixels relative to the tile's own origin:
    ``(up_start, up_len, down_start, down_len)``; a ramp of length 0 with start -1 means "no neighbour"."""

    index: int
    row: int
    col: int
    box: tuple[int, int, int, int]
    factor: int = 1
    wy: tuple[int, int, int, int] = (-1, 0, -1, 0)
    wx: tuple[int, int, int, int] = (-1, 0, -1, 0)
    member: int = 0  # an ensemble's member (FitConfig.ensemble): the same box fitted from another seed

    @property
    def out_box(self) -> tuple[int, int, int, int]:
        f = self.factor
        y0, x0, y1, x1 = self.box
        return y0 * f, x0 * f, y1 * f, x1 * f

    @property
    def shape(self) -> tuple[int, int]:
        y0, x0, y1, x1 = self.box
        return y1 - y0, x1 - x0

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.shape[0] * self.factor, self.shape[1] * self.factor

    def weights(self) -> np.ndarray:
        """(h, w) float32 blending weights on the tile's output box."""
        h, w = self.out_shape
        return np.outer(axis_weights(h, self.wy), axis_weights(w, self.wx)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"index": self.index, "row": self.row, "col": self.col, "member": self.member,
                "box": list(self.box), "out_box": list(self.out_box), "wy": list(self.wy), "wx": list(self.wx)}

    @classmethod
    def from_dict(cls, d: dict, factor: int) -> Tile:
        return cls(int(d["index"]), int(d["row"]), int(d["col"]), tuple(int(v) for v in d["box"]), factor,
                   tuple(int(v) for v in d["wy"]), tuple(int(v) for v in d["wx"]), int(d.get("member", 0)))


def hann_up(r: int) -> np.ndarray:
    """The rising half of a raised cosine over ``r`` pixels: 0.5 - 0.5 cos(pi (i + 1/2) / r), in (0, 1)."""
    i = np.arange(r, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(np.pi * (i + 0.5) / r)


def axis_weights(n: int, rule) -> np.ndarray:
    """1-D weights of length ``n`` from a rule (up_start, up_len, down_start, down_len)."""
    a, ra, b, rb = rule
    w = np.ones(n, np.float64)
    if a >= 0:
        w[:a] = 0.0
        w[a:a + ra] *= hann_up(ra)
    if b >= 0:
        w[b:b + rb] *= hann_up(rb)[::-1]
        w[b + rb:] = 0.0
    return w


def _axis(L: int, T: int, o: int, f: int):
    """Starts/ends of the tiles along one axis, and each tile's blending rule (output pixels)."""
    if L <= T:
        return [(0, L)], [(-1, 0, -1, 0)]
    n = 1 + math.ceil((L - T) / (T - o))
    starts = [round(i * (L - T) / (n - 1)) for i in range(n)]
    spans = [(s, s + T) for s in starts]
    rules = []
    ramps = []  # per pair k, k+1: (start in output coords, length)
    for k in range(n - 1):
        ov = (spans[k][1] - spans[k + 1][0]) * f  # actual overlap, output pixels (>= o*f)
        r = min(o * f, ov)
        ramps.append((spans[k + 1][0] * f + (ov - r) // 2, r))
    for k in range(n):
        base = spans[k][0] * f
        up = (ramps[k - 1][0] - base, ramps[k - 1][1]) if k > 0 else (-1, 0)
        down = (ramps[k][0] - base, ramps[k][1]) if k < n - 1 else (-1, 0)
        rules.append((*up, *down))
    return spans, rules


def plan_tiles(h: int, w: int, tile: int, overlap: int, factor: int = 1) -> list[Tile]:
    """Tiles covering an ``h x w`` input (measurement coordinates), row-major. See the module doc."""
    tile, overlap, factor = int(tile), int(overlap), int(factor)
    if tile < 8:
        raise ValueError(f"tile {tile} is too small (at least 8 pixels)")
    if overlap < 0 or 2 * overlap >= tile:
        raise ValueError(f"tile overlap {overlap} must be >= 0 and less than half the tile ({tile})")
    if factor < 1:
        raise ValueError("factor must be >= 1")
    ys, ry = _axis(int(h), tile, overlap, factor)
    xs, rx = _axis(int(w), tile, overlap, factor)
    tiles = []
    for i, ((y0, y1), wy) in enumerate(zip(ys, ry)):
        for j, ((x0, x1), wx) in enumerate(zip(xs, rx)):
            tiles.append(Tile(len(tiles), i, j, (y0, x0, y1, x1), factor, wy, wx))
    return tiles


def default_overlap(tile: int) -> int:
    """tile / 8 (at least 4 pixels, at most tile / 3)."""
    return min(max(4, tile // 8), tile // 3)


def tile_seed(seed: int, index: int) -> int:
    """The seed of tile ``index`` of an image fitted with ``seed``: 31 bits of sha256('dip-tile:seed:index')."""
    d = hashlib.sha256(f"dip-tile:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(d[:4], "big") & 0x7FFFFFFF


# ---- memory ---------------------------------------------------------------------------------------
def activation_channels(net) -> float:
    """Activation channels autograd keeps per output pixel for one fit of ``net`` (its out_channels set):
    per scale i (area 4^-i) the padded input, the upsampled deeper branch, skip conv/BN/act, concat and
    its BN, the padded up-conv input, up conv/BN/act and the 1x1 conv/BN/act; the down path's 7 tensors
    at the next scale; plus z, its noise and noisy copy and a few output-sized tensors."""
    C = net.out_channels
    tot = 3 * net.input_depth + 6 * C
    cin, n = net.input_depth, net.scales
    for i in range(n):
        cd, cu, cs = net.channels_down[i], net.channels_up[i], net.channels_skip[i]
        k = net.channels_up[i + 1] if i < n - 1 else cd
        a = cin + 4 * k + 6 * cs + 3 * cu + (3 * cu if net.need1x1_up else 0)
        tot += a / 4 ** i + 7 * cd / 4 ** (i + 1)
        cin = cd
    return tot


def n_params(net) -> int:
    from pipeline.generator import build_specs
    return sum(s.numel for s in build_specs(net, 1))


_calibrated: dict = {}


def _dev(device):
    import torch

    from pipeline.engine import pick_device
    return pick_device(device) if isinstance(device, str) else torch.device(device)


def fit_model(cfg, channels: int, device="cpu", measure: bool = True) -> tuple[float, float, str]:
    """(a, b, source) of the per-fit memory model bytes = a + b * H * W (canvas H x W, output pixels).

    On CUDA with ``measure`` the two coefficients are measured once (two 1-slot probes) and cached;
    otherwise they come from :func:`activation_channels` and ``BYTES_PER_ACT``."""
    dev = _dev(device)
    net = cfg.net.with_channels(channels)
    if dev.type == "cuda" and measure:
        key = (cfg.replace(seed=0, steps=1), channels, str(dev))
        if key not in _calibrated:
            from pipeline.engine import estimate_slot_bytes
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
    dev = _dev(device)
    if dev.type == "cuda":
        import torch
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free * MARGIN)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
    except (ValueError, OSError, AttributeError):
        return None


def _canvas(cfg, h: int, w: int) -> tuple[int, int]:
    """The canvas of an h x w input (output pixels): pipeline.api.canvas_for."""
    from pipeline.api import canvas_for
    f = cfg.scale if cfg.task == "sr" else 1
    return canvas_for(cfg, h * f, w * f)


def needs_tiling(problem: Problem, tile: int | None = None, max_memory_bytes: int | None = None,
                 device="cpu", canvas_policy: str = "bucket") -> bool:
    """Whether to fit ``problem`` as tiles: with an explicit ``tile``, when a side is longer than it;
    otherwise when one whole-image fit (on the canvas the policy gives it) is estimated above the budget
    (:func:`memory_budget`)."""
    h, w = problem.image.shape
    if tile:
        return h > tile or w > tile
    budget = memory_budget(device, max_memory_bytes)
    if budget is None:
        return False
    from pipeline.api import policy_canvas
    canvas = policy_canvas(problem.cfg, problem.canvas, canvas_policy)
    return estimate_fit_bytes(problem.cfg, canvas, problem.image.channels, device) > budget


def input_tile(problem: Problem, t_out: int) -> int:
    """The input-pixel tile side for about ``t_out`` output pixels: rounded down to the canvas multiple,
    divided by the SR factor, at least 8."""
    m = canvas_multiple(problem.cfg)
    return max(8, (t_out // m) * m // problem.factor)


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


# ---- split and merge ------------------------------------------------------------------------------
@dataclass
class Layout:
    """How one image was cut: its tiles, which are copied (not fitted), and the tile problems' seeds."""

    problem: Problem  # the original image
    tile: int
    overlap: int
    tiles: list[Tile]
    seeds: list[int]
    copied: set[int] = field(default_factory=set)

    @property
    def factor(self) -> int:
        return self.problem.factor

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.problem.out_shape

    @property
    def ensemble(self) -> int:
        return 1 + max(t.member for t in self.tiles)

    @property
    def fitted(self) -> list[int]:
        return [t.index for t in self.tiles if t.index not in self.copied]

    def to_dict(self) -> dict:
        H, W = self.out_shape
        h, w = self.problem.image.shape
        return {"tile": self.tile, "overlap": self.overlap, "factor": self.factor,
                "input_size": [w, h], "output_size": [W, H], "rows": 1 + max(t.row for t in self.tiles),
                "cols": 1 + max(t.col for t in self.tiles), "ensemble": self.ensemble,
                "weights": "hann: per axis a raised-cosine ramp of overlap*factor output pixels centred in each "
                           "pair's overlap; tile weight = outer(wy, wx); output = sum(w*tile) / sum(w) (an "
                           "ensemble's members share a box and its weights: their mean)",
                "tiles": [{**t.to_dict(), "seed": self.seeds[t.index],
                           "copied": t.index in self.copied} for t in self.tiles]}


def split(problem: Problem, tile: int, overlap: int | None = None) -> tuple[list[Problem], Layout]:
    """Cut ``problem`` into tile problems (fitted tiles only, in tile order) and their :class:`Layout`.

    Each tile problem has the same config, the seed :func:`tile_seed` (image seed, tile index), the
    image and mask cut to its box, no alpha (the merge passes the original's through) and no reference
    (metrics are computed on the merged image); ``meta["tile"]`` is its index. Inpainting tiles that are
    entirely known are not fitted but copied (``layout.copied``). Raises ImageError for an inpainting
    tile with no known pixel."""
    from pipeline.api import check_problem
    check_problem(problem)
    overlap = default_overlap(tile) if overlap is None else int(overlap)
    h, w = problem.image.shape
    tiles = plan_tiles(h, w, tile, overlap, problem.factor)
    K = problem.cfg.ensemble
    if K > 1:  # every box K times, from K seeds: the blend's sum(w * tile) / sum(w) is then their mean
        tiles = [dataclasses.replace(t, index=i * K + k, member=k) for i, t in enumerate(tiles) for k in range(K)]
    seeds = [tile_seed(problem.seed, t.index) for t in tiles]
    layout = Layout(problem=problem, tile=int(tile), overlap=overlap, tiles=tiles, seeds=seeds)
    out: list[Problem] = []
    img = problem.image
    cfg = problem.cfg.replace(ensemble=1)  # each tile problem is one fit
    for t in tiles:
        y0, x0, y1, x1 = t.box
        m = None
        if problem.mask is not None:
            m = np.ascontiguousarray(problem.mask[y0:y1, x0:x1])
            if problem.cfg.task == "inpaint" and m.min() > 0:
                layout.copied.add(t.index)
                continue
            if m.max() <= 0:
                raise ImageError(problem.source or problem.name,
                                 f"tile {t.index} (x {x0}..{x1}, y {y0}..{y1}) has no known pixel: the hole is "
                                 f"larger than a tile; use a larger --tile (now {tile})")
        px = np.ascontiguousarray(img.pixels[y0:y1, x0:x1])
        out.append(Problem(image=ImageData(px, None, img.bits, ""), cfg=cfg, seed=seeds[t.index], mask=m,
                           reference=None, name=f"{problem.name}.t{t.index:03d}", source="",
                           source_sha256="", meta={"tile": t.index}))
    return out, layout


class Merger:
    """Accumulates tiles into the full output as they arrive (sum of w * tile and sum of w)."""

    def __init__(self, layout: Layout):
        self.layout = layout
        H, W = layout.out_shape
        C = layout.problem.image.channels
        self.acc = np.zeros((H, W, C), np.float32)
        self.wsum = np.zeros((H, W), np.float32)
        self.results: dict[int, Result] = {}
        self.pending = set(layout.fitted)
        for i in sorted(layout.copied):
            t = layout.tiles[i]
            y0, x0, y1, x1 = t.box
            self._add(t, layout.problem.image.pixels[y0:y1, x0:x1])

    def _add(self, t: Tile, px: np.ndarray) -> None:
        Y0, X0, Y1, X1 = t.out_box
        if px.shape[:2] != (Y1 - Y0, X1 - X0):
            raise ValueError(f"tile {t.index}: got {px.shape[1]}x{px.shape[0]}, expected {X1 - X0}x{Y1 - Y0}")
        wt = t.weights()
        self.acc[Y0:Y1, X0:X1] += px * wt[:, :, None]
        self.wsum[Y0:Y1, X0:X1] += wt

    def add(self, result: Result) -> None:
        i = int(result.problem.meta["tile"])
        if i not in self.pending:
            raise ValueError(f"tile {i} is not pending")
        self._add(self.layout.tiles[i], result.image.pixels)
        self.pending.discard(i)
        # keep what the record and the export need; drop the pixels and z (z is re-made from the seed)
        result.image = ImageData(np.zeros((0, 0, 0), np.float32), None, result.image.bits, "")
        result.z = None
        self.results[i] = result

    @property
    def done(self) -> bool:
        return not self.pending

    def finish(self, seconds: float | None = None, device: str = "") -> TiledResult:
        if self.pending:
            raise ValueError(f"tiles {sorted(self.pending)} are missing")
        if not (self.wsum > 0).all():
            raise AssertionError("a pixel has no tile weight (plan bug)")
        lay, p = self.layout, self.layout.problem
        img = output_image(p, (self.acc / self.wsum[:, :, None]).astype(np.float32))  # as for a whole image
        self.acc = None
        rs = [self.results[i] for i in sorted(self.results)]
        reasons = sorted({r.stop_reason for r in rs}) or ["copied"]
        losses = [r.loss for r in rs if r.loss]
        n = min((len(x) for x in losses), default=0)
        loss = np.mean([x[:n] for x in losses], axis=0).tolist() if n else []
        tiling = lay.to_dict()
        for td in tiling["tiles"]:
            r = self.results.get(td["index"])
            if r is not None:
                td.update(steps=r.steps, seconds=round(r.seconds, 3), stop_reason=r.stop_reason,
                          restores=r.restores, final_loss=float(f"{r.loss[-1]:.6g}") if r.loss else None)
        res = TiledResult(problem=p, image=img, steps=max((r.steps for r in rs), default=0),
                          seconds=float(seconds if seconds is not None else sum(r.seconds for r in rs)),
                          loss=loss, restores=sum(r.restores for r in rs),
                          stop_reason=reasons[0] if len(reasons) == 1 else "mixed",
                          device=device or (rs[0].device if rs else ""), extra={"tiling": tiling},
                          layout=lay, tiles=self.results)
        work = add_work([r.extra.get("work") for r in rs])  # every fitted tile and ensemble member
        if work:
            res.extra["work"] = work
        if p.reference is not None:
            res.metrics = _metrics(img, p.reference)
        return res


@dataclass
class TiledResult(Result):
    """A :class:`pipeline.api.Result` for a tiled image. ``image`` is the merged image (the input's size
    times the factor); ``extra["tiling"]`` (in the JSON record) holds the layout and each tile's steps,
    seconds and stop reason; ``tiles`` maps tile index -> the tile's own Result (weights kept with
    ``keep_weights``, pixels dropped)."""

    layout: Layout | None = None
    tiles: dict = field(default_factory=dict)


def merge(layout: Layout, results: Iterable[Result], seconds: float | None = None) -> TiledResult:
    """Blend the fitted tiles' results (any order; copied tiles come from the input) into one result."""
    m = Merger(layout)
    for r in results:
        m.add(r)
    return m.finish(seconds)


# ---- the driver -----------------------------------------------------------------------------------
class TileError(RuntimeError):
    pass


def fit_tiled(problems, device="auto", slots: int | None = None, tile: int | None = None,
              overlap: int | None = None, max_memory: int | None = None, auto: bool = True,
              canvas_policy: str = "bucket", use_kernels: bool | None = None, keep_weights: bool = False,
              stopper_factory=None, on_step: Callable[[int], None] | None = None,
              ) -> Iterator[tuple[Problem, Result | Exception]]:
    """Fit problems, tiling those that need it; yields (original problem, Result | Exception) per image.

    ``tile``: tile side in input pixels (images with a longer side are tiled). ``max_memory``: a byte
    budget for the fits on the device: images whose whole fit is estimated above it are tiled, and every
    bucket's slot count is ``min(slots, budget // per-fit estimate)``. With neither, ``auto`` tiles only
    images whose whole fit is above the automatic budget (CUDA: 80% of the free memory). Whole images and
    the tiles of tiled images all go through one :func:`pipeline.api.fit_problems` (bucketed by canvas),
    so one big image fills the batch by itself, and each image is merged and yielded as soon as its last
    tile ends. A failed tile fails its image (the exception names the tile); the image's other tiles are
    not merged. ``problems`` may be a :class:`pipeline.api.Feed` (more problems later), as for fit_problems.

    Out of memory: fit_problems first halves the batch; an image that still runs out of memory with one
    slot (the memory model underestimated it) is fitted again as tiles of half its longer side, then of
    half that, down to 32 output pixels, and its JSON says so (``oom_fallback``). The job never dies of it.
    """
    import gc
    from collections import deque
    from pipeline.api import Feed, Ready, _IterFeed, check_canvas_policy, fit_problems, policy_canvas
    from pipeline.engine import drop_tracebacks, is_oom, pick_device
    dev = pick_device(device) if isinstance(device, str) else device
    check_canvas_policy(canvas_policy)
    budget = int(max_memory) if max_memory else None  # None: fit_problems sizes the batch itself
    source = problems if isinstance(problems, Feed) else _IterFeed(problems)
    owner: dict[int, dict] = {}  # id(tile problem) -> its image's state
    direct: set[int] = set()  # id() of problems whose result passes straight through (a Ready)
    extra: deque = deque()  # units (whole problems, tiles, Ready) waiting to go into the engine
    outstanding = 0  # units handed to the engine whose result has not come back (they may need a retry)

    def finish(st: dict) -> TiledResult:
        t0 = st["t0"]
        r = st["merger"].finish(0.0 if t0 is None else time.perf_counter() - t0, str(dev))
        st["merger"] = None
        if st["oom"] and "oom_fallback" not in r.extra:
            r.extra["oom_fallback"] = {"tile": st["oom"], "why": "the whole image (or larger tiles) ran out of memory"}
        return r

    def expand(p: Problem, forced: int | None = None) -> list:
        """The units of one image: itself, or its tiles (a Ready when it fails or is all copied)."""
        try:
            if forced is None:
                if not (needs_tiling(p, tile, budget, dev, canvas_policy) if (tile or budget or auto) else False):
                    if p.cfg.ensemble == 1:
                        return [p]
                    t = max(p.image.shape)  # an ensemble of the whole image: one box, its members
                else:
                    t = tile or choose_tile(p, budget, dev)
            else:
                t = forced
            if budget:
                c = policy_canvas(p.cfg, _canvas(p.cfg, min(t, p.image.shape[0]), min(t, p.image.shape[1])),
                                  canvas_policy)
                per = estimate_fit_bytes(p.cfg, c, p.image.channels, dev)
                if per > budget:
                    raise MemoryError(f"one {t}x{t} tile needs about {per / 2**30:.2f} GiB, above the memory "
                                      f"budget of {budget / 2**30:.2f} GiB: use a smaller --tile")
            tps, lay = split(p, t, overlap)
        except Exception as e:  # noqa: BLE001
            direct.add(id(p))
            return [Ready(p, e)]
        st = {"problem": p, "merger": Merger(lay), "t0": None, "failed": False, "oom": forced}
        log.info("%s: %d tiles of %d px (overlap %d; %d fits each), %d copied", p.source or p.name,
                 len(lay.tiles) // lay.ensemble, t, lay.overlap, lay.ensemble, len(lay.copied))
        if not tps:
            direct.add(id(p))
            return [Ready(p, finish(st))]
        for q in tps:
            owner[id(q)] = st
        return tps

    def retry(p: Problem, t_out: int) -> list:
        """After out of memory: ``p`` again as tiles of about ``t_out`` output pixels."""
        t_in = input_tile(p, t_out)
        if t_out < 32:
            direct.add(id(p))
            return [Ready(p, MemoryError(f"{p.source or p.name}: out of memory even with tiles of "
                                         f"{2 * t_out} output pixels"))]
        log.warning("%s: out of memory; fitting it again as tiles of %d px", p.source or p.name, t_in)
        gc.collect()  # the failed fit's tensors
        if getattr(dev, "type", None) == "cuda":
            import torch
            torch.cuda.empty_cache()
        return expand(p, forced=t_in)

    class Units(Feed):
        """The engine's feed: the source's problems expanded into units, and the retries."""
        source_ended = False
        live = source.live

        def get(self, wait: bool):
            nonlocal outstanding
            while True:
                if extra:
                    x = extra.popleft()
                    if not isinstance(x, Ready):
                        outstanding += 1
                    return x
                if self.source_ended:
                    if outstanding and wait:  # cannot happen: fit_problems only waits with nothing in flight
                        raise RuntimeError("fit_tiled: waiting for work with units still in flight")
                    return None if outstanding else Feed.END
                x = source.get(wait)
                if x is Feed.END:
                    self.source_ended = True
                elif x is None:
                    return None
                elif isinstance(x, Ready):
                    direct.add(id(x.problem))
                    return x
                else:
                    extra.extend(expand(x))

    slot_fn = (lambda cfg, canvas, C, d, n: slots_for(cfg, canvas, C, dev, budget, slots, n)) if budget else slots
    for q, r in fit_problems(Units(), device=dev, slots=slot_fn, canvas_policy=canvas_policy,
                             use_kernels=use_kernels, keep_weights=keep_weights, stopper_factory=stopper_factory,
                             on_step=on_step):
        if id(q) in direct:
            direct.discard(id(q))
            yield q, r
            continue
        outstanding -= 1
        st = owner.pop(id(q), None)
        if st is None:  # a whole image
            if isinstance(r, Exception) and is_oom(r):
                drop_tracebacks(r)
                extra.extend(retry(q, max(q.out_shape) // 2))
                continue
            yield q, r
            continue
        if st["failed"]:
            continue
        if isinstance(r, Exception) and is_oom(r) and len(st["merger"].layout.tiles) > 1:
            st["failed"] = True  # its tiles are too big: the whole image again, with smaller ones
            drop_tracebacks(r)
            extra.extend(retry(st["problem"], st["merger"].layout.tile * st["problem"].factor // 2))
            continue
        if isinstance(r, Exception):
            st["failed"] = True
            err = TileError(f"tile {q.meta.get('tile')} of {len(st['merger'].layout.tiles)} failed: {r}")
            err.__cause__ = r
            yield st["problem"], err
            continue
        now = time.perf_counter()  # the image's time: from its first tile's start to its last tile's end
        st["t0"] = min(st["t0"] if st["t0"] is not None else now, now - r.seconds)
        st["merger"].add(r)
        if st["merger"].done:
            yield st["problem"], finish(st)


# ---- ONNX: one model per tile + a layout file ------------------------------------------------------
def tiled_files(result: TiledResult, stem: str, dtype: str = "fp32") -> dict[str, bytes]:
    """The files of a tiled image's ONNX export, name -> bytes: ``<stem>.tNNN.onnx`` per fitted tile,
    ``<stem>.tNNN.png`` per copied tile, ``<stem>.tiles.alpha.png`` when the image has alpha, and the
    layout ``<stem>.tiles.json`` (listed last: write it last, it is the one ``dip render`` reads)."""
    from pipeline.export import to_onnx_model
    from pipeline.generator import make_input
    from pipeline.io import encode_png
    lay = result.layout
    p = lay.problem
    files: dict[str, bytes] = {}
    entries = []
    for t in lay.tiles:
        e = {**t.to_dict()}
        if t.index in lay.copied:
            y0, x0, y1, x1 = t.box
            name = f"{stem}.t{t.index:03d}.png"
            files[name] = encode_png(ImageData(p.image.pixels[y0:y1, x0:x1], None, p.image.bits))
            e["image"] = name
        else:
            r = result.tiles[t.index]
            if r.weights is None:
                raise ValueError("the tiles have no generator weights: fit with keep_weights=True")
            cfg = r.problem.cfg
            if r.z is None:
                H, W = r.problem.canvas
                r = dataclasses.replace(r, z=make_input(cfg.input_kind, cfg.net.input_depth, H, W, r.problem.seed,
                                                        cfg.input_scale))
            # the tile's ImageData (pixels dropped after merging) only lends bits/mode to the metadata
            r = dataclasses.replace(r, image=ImageData(np.zeros((1, 1, p.image.channels), np.float32), None,
                                                       p.image.bits))
            name = f"{stem}.t{t.index:03d}.onnx"
            files[name] = to_onnx_model(r, dtype=dtype).SerializeToString()
            e["model"] = name
        entries.append(e)
    alpha_name = None
    if result.image.alpha is not None:
        alpha_name = f"{stem}.tiles.alpha.png"
        a = result.image.alpha
        files[alpha_name] = encode_png(ImageData(a[:, :, None], None, result.image.bits))
    H, W = lay.out_shape
    doc = {"dip_format": LAYOUT_FORMAT, "dip_format_version": LAYOUT_VERSION, "dip_version": VERSION,
           "source": p.source or p.name, "source_sha256": p.source_sha256, "task": p.cfg.task,
           "preset": p.cfg.preset, "seed": p.seed, "bits": result.image.bits, "mode": result.image.mode,
           "channels": p.image.channels, "output_size": [W, H], "factor": lay.factor, "tile": lay.tile,
           "overlap": lay.overlap, "onnx_dtype": dtype, "alpha": alpha_name,
           "renders_saved_image": p.cfg.renders_saved_image,
           "source_metadata": encode_meta(result.image.meta),
           "weights": "per tile: outer(axis_weights(h, wy), axis_weights(w, wx)) where a rule (a, ra, b, rb) "
                      "is 1, times 0.5-0.5cos(pi(i+0.5)/ra) rising on [a, a+ra) and 0 before a (when a >= 0), "
                      "times the falling mirror on [b, b+rb) and 0 after (when b >= 0); "
                      "image = sum(w * tile) / sum(w)",
           "tiles": entries}
    files[f"{stem}.tiles.json"] = json.dumps(doc, indent=1).encode()
    return files


def export_tiled(result: TiledResult, out_dir, stem: str | None = None, dtype: str = "fp32") -> Path:
    """Write :func:`tiled_files` into ``out_dir`` (each atomically, the layout JSON last). Returns its path."""
    from pipeline.io import write_bytes
    out_dir = Path(out_dir)
    stem = stem or Path(result.problem.source or result.problem.name).stem
    path = None
    for name, data in tiled_files(result, stem, dtype).items():
        path = out_dir / name
        write_bytes(path, data)
    return path


def is_layout(path) -> bool:
    return str(path).endswith(".tiles.json")


def render_tiled(layout_path, provider: str = "auto") -> ImageData:
    """Render a tiled image from ``<stem>.tiles.json``: each tile's model (pipeline.render's session code),
    copied tiles from their PNGs, blended with the layout's weights; alpha from the alpha PNG.
    Raises pipeline.render.RenderError naming the file."""
    from pipeline.io import load_image
    from pipeline.render import RenderError, render_model, source_metadata
    layout_path = Path(layout_path)
    try:
        doc = json.loads(layout_path.read_text())
    except (OSError, ValueError) as e:
        raise RenderError(layout_path, f"unreadable tile layout: {e}") from None
    if not isinstance(doc, dict) or doc.get("dip_format") != LAYOUT_FORMAT:
        raise RenderError(layout_path, "not a dip tile layout (no dip_format 'dip-tiles')")
    if int(doc.get("dip_format_version", 0)) > LAYOUT_VERSION:
        raise RenderError(layout_path, f"written by a newer dip (tile layout version {doc['dip_format_version']})")
    W, H = doc["output_size"]
    C, bits, f = int(doc["channels"]), int(doc["bits"]), int(doc["factor"])
    acc = np.zeros((H, W, C), np.float32)
    wsum = np.zeros((H, W), np.float32)
    base = layout_path.parent
    for e in doc["tiles"]:
        t = Tile.from_dict(e, f)
        if "model" in e:
            img, _used = render_model(base / e["model"], provider)
        elif "image" in e:
            try:
                img = load_image(base / e["image"])
            except ImageError as err:
                raise RenderError(base / e["image"], err.reason) from None
        else:
            raise RenderError(layout_path, f"tile {t.index} names neither a model nor an image")
        Y0, X0, Y1, X1 = t.out_box
        if img.shape != (Y1 - Y0, X1 - X0) or img.channels != C:
            raise RenderError(layout_path, f"tile {t.index} rendered {img.shape[1]}x{img.shape[0]}x{img.channels}, "
                                           f"the layout says {X1 - X0}x{Y1 - Y0}x{C}")
        wt = t.weights()
        acc[Y0:Y1, X0:X1] += img.pixels * wt[:, :, None]
        wsum[Y0:Y1, X0:X1] += wt
    if not (wsum > 0).all():
        raise RenderError(layout_path, "the tiles do not cover the image")
    alpha = None
    if doc.get("alpha"):
        try:
            a = load_image(base / doc["alpha"])
        except ImageError as err:
            raise RenderError(base / doc["alpha"], err.reason) from None
        alpha = a.pixels[:, :, 0]
    return ImageData(np.clip(acc / wsum[:, :, None], 0.0, 1.0), alpha, bits, str(layout_path),
                     source_metadata(layout_path, doc.get("source_metadata")))
