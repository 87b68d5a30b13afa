"""Large scans as tiles: the geometry. Cut an image into overlapping tiles, and blend their results
seamlessly. Fitting the tiles (and deciding when to tile) is pipeline.fit; their ONNX files are
pipeline.onnx.

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

Each tile is its own :class:`pipeline.problem.Problem` (same config, a seed derived from the image seed
and the tile index by :func:`tile_seed`, the mask cut with the image). For inpainting a tile whose pixels
are all known is not fitted: it is copied from the input. A tile with no known pixel at all is an error
(the hole is larger than a tile: use a larger ``--tile``). An ensemble (``FitConfig.ensemble`` K) is the
same machinery: every box K times, from K seeds, merged as their mean.

:Examples:

>>> [t.box for t in plan_tiles(40, 56, tile=32, overlap=8)]
[(0, 0, 32, 32), (0, 24, 32, 56), (8, 0, 40, 32), (8, 24, 40, 56)]
>>> w = axis_weights(32, plan_tiles(40, 56, tile=32, overlap=8)[0].wx)   # the first tile, along x
>>> [round(float(v), 3) for v in w[[0, 23, 24, 27, 31]]]   # 1 up to the overlap, then a raised cosine down
[1.0, 1.0, 0.99, 0.598, 0.01]
>>> default_overlap(512), tile_seed(0, 1) == tile_seed(0, 1) != tile_seed(0, 2)
(64, True)
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.io import ImageData, ImageError
from pipeline.problem import Problem, Result, canvas_multiple, check_problem, metrics, output_image
from pipeline.work import add_work

log = logging.getLogger("dip.tiling")

LAYOUT_FORMAT = "dip-tiles"
LAYOUT_VERSION = 1


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


def input_tile(problem: Problem, t_out: int) -> int:
    """The input-pixel tile side for about ``t_out`` output pixels: rounded down to the canvas multiple,
    divided by the SR factor, at least 8."""
    m = canvas_multiple(problem.cfg)
    return max(8, (t_out // m) * m // problem.factor)


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
    cfg = problem.cfg.replace(ensemble=1, tile=0)  # each tile problem is one fit, of its box as it is
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
        self.kept = 0  # of the fitted tiles, those kept from a stopped run (pipeline.fit: resume)
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
        if self.kept:
            tiling["kept"] = self.kept
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
        rule = rs[0].extra.get("stop_rule") if rs else None
        if rule is not None and all(r.extra.get("stop_rule") == rule for r in rs):  # the one rule every fit stopped by
            res.extra["stop_rule"] = rule
        work = add_work([r.extra.get("work") for r in rs])  # every fitted tile and ensemble member
        if work:
            res.extra["work"] = work
        if p.reference is not None:
            res.metrics = metrics(img, p.reference)
        return res


@dataclass
class TiledResult(Result):
    """A :class:`pipeline.problem.Result` for a tiled image. ``image`` is the merged image (the input's size
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


# ---- resume: fitted tiles kept as files ----------------------------------------------------------
TILE_FORMAT = "dip-tile"
TILE_VERSION = 1


def tile_key(q: Problem, rule: dict | None = None) -> str:
    """What decides a tile problem's fit, hashed: its pixels and mask, its config (with the auto-stop rule
    that config gets: pipeline.stopping, or ``rule``, a StopConfig dict, where the caller's stopper factory
    sets another; a floor that follows the noise level as it resolves for this tile), its seed and index,
    and dip's version. A kept tile is reused only when this is the same, so a changed input, option, rule
    or layout (another --tile, an out-of-memory fallback) fits the tile again."""
    from pipeline.config import VERSION
    from pipeline.problem import to_fit_item
    from pipeline.stopping import StopConfig, sigma_of_item, stop_config_for
    h = hashlib.sha256()
    for a in (q.image.pixels, q.mask):
        h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes() + str(a.shape).encode())
    # a caller's factory stops the fits whatever auto_stop says
    sc = StopConfig(**rule) if rule is not None else stop_config_for(q.cfg) if q.cfg.auto_stop else None
    if sc is not None and sc.floor_low:  # the rule this tile's fit runs: its floor follows the tile's noise
        sc = sc.at_sigma(sigma_of_item(to_fit_item(q)))
    rule = sc.identity_dict() if sc is not None else None  # later fields at their neutral value left out
    h.update(json.dumps([q.cfg.identity_dict(), rule, int(q.seed), int(q.meta["tile"]), VERSION],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def encode_tile(r: Result, rule: dict | None = None) -> bytes:
    """One fitted tile's result as the bytes of an .npz file: its pixels, loss curve, generator weights
    (when kept) and a JSON header (steps, seconds, stop reason, work, ...). :func:`decode_tile` reads it.
    ``rule``: the stopping rule it ran under, where not its config's own (:func:`tile_key`)."""
    q = r.problem
    extra = {}
    for k, v in r.extra.items():  # what the merge and the record use; anything not JSON is left out
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        extra[k] = v
    head = {"format": TILE_FORMAT, "version": TILE_VERSION, "key": tile_key(q, rule), "tile": int(q.meta["tile"]),
            "steps": int(r.steps), "seconds": float(r.seconds), "restores": int(r.restores),
            "stop_reason": r.stop_reason, "device": r.device, "bits": r.image.bits, "extra": extra}
    arrays = {"pixels": np.asarray(r.image.pixels, np.float32), "loss": np.asarray(r.loss, np.float64),
              "head": np.frombuffer(json.dumps(head).encode(), np.uint8)}
    if r.weights is not None:
        arrays["weights"] = np.asarray(r.weights.detach().cpu().numpy() if hasattr(r.weights, "detach")
                                       else r.weights, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_tile(blob: bytes, q: Problem, weights: bool = False, rule: dict | None = None) -> Result | None:
    """The Result of tile problem ``q`` from :func:`encode_tile`'s bytes; None when they are not a kept fit of
    this very tile under this rule (another key: :func:`tile_key`), are damaged, or lack the weights asked
    for."""
    try:
        with np.load(io.BytesIO(blob)) as z:
            head = json.loads(z["head"].tobytes().decode())
            if head.get("format") != TILE_FORMAT or head.get("key") != tile_key(q, rule):
                return None
            if weights and "weights" not in z.files:
                return None
            px, loss = z["pixels"], z["loss"]
            w = z["weights"] if "weights" in z.files else None
    except Exception:  # noqa: BLE001 - a damaged or truncated file: the tile is fitted again
        return None
    if px.shape[:2] != q.out_shape or px.shape[2] != q.image.channels:
        return None
    import torch
    return Result(problem=q, image=ImageData(px, None, head["bits"], ""), steps=head["steps"],
                  seconds=head["seconds"], loss=loss.tolist(), restores=head["restores"],
                  stop_reason=head["stop_reason"], device=head["device"], extra=head["extra"],
                  weights=torch.from_numpy(w.copy()) if (weights and w is not None) else None)


class TileStore:
    """A folder of one image's fitted tiles, ``tNNN.npz`` each (written atomically): what lets a stopped run
    of a large scan go on from its last finished tile. The job keeps it under OUT/.tiles/ until the image's
    result is written; the study beside its JSONL file until the row is.

    >>> import tempfile; s = TileStore(Path(tempfile.mkdtemp()) / "img")
    >>> s.save(3, b"x"); s.save(12, b"y"); sorted(s.load())
    [b'x', b'y']
    >>> s.clear(); s.load(), s.folder.exists()
    ([], False)
    """

    def __init__(self, folder):
        self.folder = Path(folder)

    def load(self) -> list[bytes]:
        if not self.folder.is_dir():
            return []
        return [f.read_bytes() for f in sorted(self.folder.glob("t*.npz"))]

    def save(self, index: int, blob: bytes) -> None:
        from pipeline.io import write_bytes
        write_bytes(self.folder / f"t{int(index):04d}.npz", blob)

    def clear(self) -> None:
        """Remove the folder, and its parent when that is left empty (OUT/.tiles/ after the last image)."""
        import shutil
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:
            pass
