"""Tiled fitting (pipeline/tiling.py, fit.py, memory.py): the plan, the blend, the driver, the memory budget,
the ONNX layout.

CPU only, the fast preset with a smaller net; one torch thread (on a shared 2-core machine two intra-op
threads made these fits 6x slower).
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import fit, memory, tiling
from pipeline.api import Problem, Result, make_problem
from pipeline.fit import TileError, choose_tile, fit_tiled, needs_tiling
from pipeline.io import ImageData, ImageError
from pipeline.memory import estimate_fit_bytes, slots_for
from pipeline.onnx.export import export_tiled
from pipeline.onnx.render import render_tiled
from pipeline.tiling import TiledResult, merge, plan_tiles, split

TINY = {"input_depth": 8, "channels_down": (8, 16, 32, 32), "channels_up": (8, 16, 32, 32)}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smooth(h, w, c=3):
    """Low-frequency gradient + sines; every column spans whole periods in y and every row in x, so the
    true mean |gradient| is the same at every column / row."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([0.5 + 0.15 * (x / w - 0.5) + 0.25 * np.sin(2 * np.pi * (x / (w / 2) + y / (h / 2)) + ph)
                     for ph in (0, 1, 2)[:c]], -1).astype(np.float32)


def fake_results(layout, tps, image_out):
    """Tile results whose pixels are exact crops of ``image_out`` (output coordinates)."""
    out = []
    for q in tps:
        t = layout.tiles[q.meta["tile"]]
        Y0, X0, Y1, X1 = t.out_box
        img = ImageData(image_out[Y0:Y1, X0:X1].copy(), None, 8)
        out.append(Result(problem=q, image=img, steps=3, seconds=0.1, loss=[1.0, 0.5, 0.25], restores=0,
                          stop_reason="steps", device="cpu"))
    return out


# ---- plan and weights ------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,tile,overlap,f", [(160, 224, 64, 16, 1), (100, 37, 32, 8, 4), (64, 64, 64, 16, 1),
                                                (1000, 777, 128, 42, 2), (50, 50, 16, 7, 1), (33, 90, 24, 11, 8)])
def test_weights_sum_to_one(h, w, tile, overlap, f):
    tiles = plan_tiles(h, w, tile, overlap, f)
    S = np.zeros((h * f, w * f))
    cover = np.zeros((h * f, w * f), int)
    for t in tiles:
        Y0, X0, Y1, X1 = t.out_box
        S[Y0:Y1, X0:X1] += t.weights()
        cover[Y0:Y1, X0:X1] += 1
    np.testing.assert_allclose(S, 1.0, atol=1e-6)
    assert (cover >= 1).all()
    for t in tiles:  # a pixel covered by one tile only has weight 1
        Y0, X0, Y1, X1 = t.out_box
        only = cover[Y0:Y1, X0:X1] == 1
        np.testing.assert_array_equal(t.weights()[only], 1.0)


def test_plan_sr_maps_lr_boxes_exactly():
    lr = plan_tiles(37, 53, 16, 4, factor=1)
    for f in (2, 4, 8):
        hr = plan_tiles(37, 53, 16, 4, factor=f)
        assert [t.box for t in hr] == [t.box for t in lr]
        for t in hr:
            assert t.out_box == tuple(v * f for v in t.box)
            assert t.out_shape == (t.shape[0] * f, t.shape[1] * f)
        # the HR boxes cover the HR grid exactly, ending at the borders
        assert max(t.out_box[2] for t in hr) == 37 * f and max(t.out_box[3] for t in hr) == 53 * f
    assert all(t.shape == (16, 16) for t in lr)  # every tile full size: the last one is flush with the border
    with pytest.raises(ValueError):
        plan_tiles(100, 100, 32, 16)


def test_merge_of_exact_crops_is_exact_and_constant_stays_constant():
    rng = np.random.default_rng(0)
    lr = rng.random((30, 41, 3)).astype(np.float32)
    p = make_problem(lr, task="sr", preset="fast", scale=4)
    hr = rng.random((120, 164, 3)).astype(np.float32)
    tps, lay = split(p, 16, 5)
    assert len(tps) == len(lay.tiles) > 4
    res = merge(lay, reversed(fake_results(lay, tps, hr)))
    assert res.image.shape == (120, 164)
    np.testing.assert_allclose(res.image.pixels, hr, atol=2e-6)
    const = np.full((120, 164, 3), 0.3, np.float32)
    res = merge(lay, fake_results(lay, tps, const))
    np.testing.assert_allclose(res.image.pixels, 0.3, atol=1e-6)
    rec = res.record()
    assert rec["output_size"] == [164, 120] and rec["tiling"]["factor"] == 4
    assert all(t["steps"] == 3 and t["stop_reason"] == "steps" for t in rec["tiling"]["tiles"])
    json.dumps(rec)


def test_tile_seeds_are_distinct_and_derived():
    p = make_problem(np.zeros((40, 40, 3), np.float32), preset="fast", seed=7)
    tps, _lay = split(p, 16, 4)
    seeds = [q.seed for q in tps]
    assert len(set(seeds)) == len(seeds) and seeds == [tiling.tile_seed(7, i) for i in range(len(seeds))]
    assert seeds != [q.seed for q in split(make_problem(np.zeros((40, 40, 3), np.float32), preset="fast", seed=8),
                                             16, 4)[0]]


# ---- real fits ------------------------------------------------------------------------------------
def test_tiled_fit_has_exact_size_and_no_visible_seams():
    H, W = 160, 224
    img = smooth(H, W)
    p = make_problem(img, task="denoise", preset="fast", steps=100, seed=0, net=TINY, ema=0.9, lr=0.02)
    out = list(fit_tiled([p], device="cpu", tile=64, overlap=16))
    assert len(out) == 1 and out[0][0] is p
    r = out[0][1]
    assert isinstance(r, TiledResult), r
    assert r.image.shape == (H, W) and r.image.channels == 3
    px = r.image.pixels
    assert -10 * np.log10(((px - img) ** 2).mean()) > 30  # each tile fits the smooth image
    tiles = r.layout.tiles
    assert len(tiles) == 15
    ex = sorted({t.box[1] for t in tiles if t.box[1] > 0} | {t.box[3] for t in tiles if t.box[3] < W})
    ey = sorted({t.box[0] for t in tiles if t.box[0] > 0} | {t.box[2] for t in tiles if t.box[2] < H})
    gx = np.abs(np.diff(px, axis=1)).mean(axis=(0, 2))  # gx[i]: across the line between columns i and i+1
    gy = np.abs(np.diff(px, axis=0)).mean(axis=(1, 2))

    def near_far(n, edges):
        near = sorted({e + d for e in edges for d in (-1, 0) if 0 <= e + d < n})
        far = [i for i in range(n) if all(abs(i - e) > 4 for e in edges)]
        return near, far

    nx, fx = near_far(W - 1, ex)
    ny, fy = near_far(H - 1, ey)
    border = np.r_[gx[nx], gy[ny]].mean()
    away = np.r_[gx[fx], gy[fy]].mean()
    assert abs(border / away - 1) < 0.10, (border, away)
    rec = r.record()
    assert rec["output_size"] == [W, H] and len(rec["tiling"]["tiles"]) == 15
    for t in rec["tiling"]["tiles"]:
        assert t["steps"] == 100 and t["stop_reason"] == "steps" and t["seconds"] > 0 and not t["copied"]


def test_tiled_sr_fit_of_a_constant_image_is_constant():
    lr = np.full((40, 40, 3), 0.6, np.float32)
    # distill_steps=0: the output average itself, so that only the tiling is judged (6 steps of
    # distillation after a 60-step fit leave the generator's own noise, up to ~0.035 here)
    p = make_problem(lr, task="sr", preset="fast", scale=2, steps=60, seed=1, net=TINY, ema=0.9, lr=0.02,
                     distill_steps=0)
    (_q, r), = list(fit_tiled([p], device="cpu", tile=24, overlap=8))
    assert isinstance(r, TiledResult), r
    assert r.image.shape == (80, 80)
    assert len(r.layout.tiles) == 4
    # Super-resolution leaves high frequencies that the downsampler cannot see, so single pixels of a fit
    # stray from the constant: their worst case depends on how the CPU rounds (0.03 in CI, 0.046 on
    # another Xeon, 2026-12-01). A wrong tile placement or weight would move whole regions.
    err = np.abs(r.image.pixels - 0.6)
    assert float(err.max()) < 0.08 and float(err.mean()) < 0.01, (err.max(), err.mean())


def test_inpainting_known_tiles_are_copied_not_fitted():
    img = smooth(64, 96)
    mask = np.ones((64, 96), np.float32)
    mask[4:14, 6:20] = 0  # a hole in the top-left tile only
    p = make_problem(img, task="inpaint", preset="fast", mask=mask, steps=4, seed=0, net=TINY)
    tps, lay = split(p, 32, 8)
    assert len(lay.copied) == len(lay.tiles) - 1 and [q.meta["tile"] for q in tps] == [0]
    (_q, r), = list(fit_tiled([p], device="cpu", tile=32, overlap=8))
    assert isinstance(r, TiledResult) and r.image.shape == (64, 96)
    recs = r.record()["tiling"]["tiles"]
    assert [t["copied"] for t in recs] == [i != 0 for i in range(len(recs))]
    assert recs[0]["steps"] == 4 and "steps" not in recs[1]
    # where only copied tiles reach, the output is the input exactly
    np.testing.assert_allclose(r.image.pixels[40:, 40:], img[40:, 40:], atol=1e-6)
    # a hole wider than a tile is a clear error, not a fit with no data
    mask2 = np.ones((64, 96), np.float32)
    mask2[:, 20:80] = 0
    p2 = make_problem(img, task="inpaint", preset="fast", mask=mask2, steps=2)
    with pytest.raises(ImageError, match="larger --tile"):
        split(p2, 32, 8)
    (_q2, e2), = list(fit_tiled([p2], device="cpu", tile=32, overlap=8))
    assert isinstance(e2, ImageError)


def test_small_images_pass_straight_through():
    a = make_problem(smooth(24, 24), preset="fast", steps=2, net=TINY, name="small")
    b = make_problem(smooth(24, 48), preset="fast", steps=2, net=TINY, name="wide")
    got = {q.name: r for q, r in fit_tiled([a, b], device="cpu", tile=32, overlap=4)}
    assert type(got["small"]) is Result and isinstance(got["wide"], TiledResult)
    assert got["wide"].image.shape == (24, 48)


# ---- memory budget ---------------------------------------------------------------------------------
def test_memory_model_budget_and_slots():
    p = make_problem(np.zeros((4096, 4096, 3), np.float32)[:8, :8], preset="fast")  # (cheap to build)
    cfg = p.cfg
    e1 = estimate_fit_bytes(cfg, (256, 256), 3, "cpu")
    e2 = estimate_fit_bytes(cfg, (512, 512), 3, "cpu")
    assert e2 > e1 > 0 and (e2 - e1) == pytest.approx(3 * (e1 - estimate_fit_bytes(cfg, (0, 0), 3, "cpu")), rel=1e-6)
    # explicit byte budget -> slots = budget // per-fit estimate, capped by --slots and the item count
    assert slots_for(cfg, (256, 256), 3, "cpu", int(3.5 * e1), None, 100) == 3
    assert slots_for(cfg, (256, 256), 3, "cpu", int(3.5 * e1), 2, 100) == 2
    assert slots_for(cfg, (256, 256), 3, "cpu", int(0.5 * e1), None, 100) == 1
    assert slots_for(cfg, (256, 256), 3, "cpu", None, None, 100) is None
    big = Problem(image=ImageData(np.zeros((2048, 2048, 3), np.float32), None, 8), cfg=cfg)
    whole = estimate_fit_bytes(cfg, big.canvas, 3, "cpu")
    assert needs_tiling(big, max_memory_bytes=whole - 1, device="cpu")
    assert not needs_tiling(big, max_memory_bytes=whole + 1, device="cpu")
    assert needs_tiling(big, tile=1024) and not needs_tiling(big, tile=2048)
    t = choose_tile(big, e2, "cpu")
    assert t == 512 and estimate_fit_bytes(cfg, (t, t), 3, "cpu") <= e2
    assert choose_tile(big, e1, "cpu") == 256
    with pytest.raises(MemoryError):
        choose_tile(big, 1000, "cpu")


def test_fit_tiled_respects_an_explicit_budget(monkeypatch):
    """Budget -> images above it are tiled, and fit_problems gets slots = budget // per-tile estimate."""
    seen = []
    real = fit.fit_problems

    def spy(problems, device="auto", slots=None, **kw):
        def record(cfg, canvas, C, dev, n_waiting):  # the batch size fit_problems gets for a bucket
            k = slots(cfg, canvas, C, dev, n_waiting)
            seen.append((n_waiting, k))
            return k
        return real(problems, device=device, slots=record if callable(slots) else slots, **kw)

    monkeypatch.setattr(fit, "fit_problems", spy)
    monkeypatch.setattr(memory, "FIXED_BYTES", 0)  # so that a tiny image can be above a budget of 2 tiles
    p = make_problem(smooth(96, 96), preset="fast", steps=2, net=TINY)
    per = estimate_fit_bytes(p.cfg, (32, 32), 3, "cpu")
    whole = estimate_fit_bytes(p.cfg, p.canvas, 3, "cpu")
    budget = int(2.5 * per)
    assert budget < whole
    monkeypatch.setattr(fit, "DEFAULT_TILE_OUT", 32)
    (_q, r), = list(fit_tiled([p], device="cpu", max_memory=budget, overlap=4))
    assert isinstance(r, TiledResult) and r.image.shape == (96, 96) and r.layout.tile == 32
    assert seen == [(16, 2)]
    # a tile above the budget is refused clearly
    (_q, e), = list(fit_tiled([p], device="cpu", tile=32, max_memory=per // 2))
    assert isinstance(e, MemoryError) and "budget" in str(e)


# ---- huge inputs -----------------------------------------------------------------------------------
def _png_header_only(path, w, h):
    """A PNG whose IHDR claims w x h (8-bit RGB) with no pixel data: nothing big is ever allocated."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_huge_input_is_refused_clearly(tmp_path, monkeypatch):
    from pipeline import io
    from pipeline.io import load_image
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    # Pillow's own refusal (above twice its limit) names dip's limit, the README's 150 MP, not Pillow's 300
    with pytest.raises(ImageError, match=r"400 megapixels \(400000000 pixels\) is above the decompression-bomb "
                                         r"limit of 150 MP \(set DIP_MAX_PIXELS"):
        load_image(bomb)
    with pytest.raises(ImageError, match="decompression-bomb"):
        make_problem(str(bomb), preset="fast")
    # dip's own check, as with a small DIP_MAX_PIXELS (read at import: patch the value; Pillow's own
    # limit is left alone so that dip's message, not Pillow's, is the one raised)
    from PIL import Image
    Image.fromarray((smooth(40, 40) * 255).astype(np.uint8)).save(tmp_path / "small.png")
    monkeypatch.setattr(io, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError, match="DIP_MAX_PIXELS"):
        load_image(tmp_path / "small.png")


# ---- ONNX: one model per tile + a layout JSON -------------------------------------------------------
def test_tiled_onnx_export_renders_the_merged_image(tmp_path):
    pytest.importorskip("onnxruntime")
    img = smooth(40, 56)
    alpha = np.linspace(0, 1, 40 * 56, dtype=np.float32).reshape(40, 56)
    mask = np.ones((40, 56), np.float32)
    mask[3:9, 3:9] = 0
    data = ImageData(img, alpha, 8)
    p = make_problem(data, task="inpaint", preset="fast", mask=mask, steps=3, net=TINY, name="scan")
    (_q, r), = list(fit_tiled([p], device="cpu", tile=32, overlap=8, keep_weights=True))
    assert isinstance(r, TiledResult) and r.layout.copied and r.layout.fitted
    path = export_tiled(r, tmp_path)
    assert path.name == "scan.tiles.json"
    doc = json.loads(path.read_text())
    assert {("model" in t, "image" in t) for t in doc["tiles"]} == {(True, False), (False, True)}
    assert (tmp_path / "scan.t000.onnx").is_file() and (tmp_path / doc["alpha"]).is_file()
    out = render_tiled(path, "cpu")
    assert out.shape == r.image.shape and out.bits == 8
    np.testing.assert_allclose(out.pixels, r.image.pixels, atol=2e-3)
    np.testing.assert_allclose(out.alpha, r.image.alpha, atol=1 / 255 + 1e-6)


def test_cli_tiles_a_large_image_and_render_reassembles_it(tmp_path, capsys):
    """dip restore --tile: the job fits the tiles, writes one image, its JSON with the layout, a model per
    tile and <stem>.tiles.json; dip render OUT re-renders the whole image (not each tile)."""
    import json
    from PIL import Image
    from pipeline.cli import main as cli_main
    from pipeline.io import load_image
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "big.png", dpi=(300, 300))
    out = tmp_path / "out"
    rc = cli_main(["restore", str(tmp_path / "big.png"), "--out", str(out), "--tile", "32", "--tile-overlap", "8",
                   "--steps", "2", "--device", "cpu", "--quiet"])
    assert rc == 0
    rec = json.loads((out / "big.json").read_text())
    assert len(rec["tiling"]["tiles"]) >= 2
    assert load_image(out / "big.png").shape == (40, 56)
    assert (out / "big.tiles.json").exists() and list(out.glob("big.t*.onnx"))
    assert cli_main(["render", str(out)]) == 0
    rendered = load_image(out / "big.render.png")
    saved = load_image(out / "big.png")
    assert rendered.shape == saved.shape
    assert np.abs(rendered.pixels - saved.pixels).max() * 255 <= 1.5
    assert rendered.meta["dpi"] == saved.meta["dpi"] == pytest.approx((300, 300), abs=0.01)
    assert not list(out.glob("big.t*.render.png"))  # the tiles are not rendered one by one
    assert cli_main(["restore", str(tmp_path / "big.png"), "--out", str(out), "--tile", "4"]) == 2


_OOM_SCRIPT = r"""
import json, resource, sys
import numpy as np, torch
torch.set_num_threads(1)
# oneDNN reports a failed allocation of its own as "could not create a primitive", which could be anything;
# torch's own convolutions allocate through the CPU allocator, whose failure is unambiguous
torch.backends.mkldnn.enabled = False
from pipeline.api import make_problem
from pipeline.io import ImageData
from pipeline.fit import fit_tiled
def vm():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize"):
            return int(line.split()[1]) * 1024
img = ImageData(np.random.default_rng(0).random((512, 512, 3), dtype=np.float32), None, 8)
p = make_problem(img, preset="fast", steps=2, name="big")
# a real limit on this process's memory: the whole 512x512 fit needs more than 400 MB above what is
# mapped now (it fails in the CPU allocator), a 256x256 tile needs less
resource.setrlimit(resource.RLIMIT_AS, (vm() + (400 << 20), resource.RLIM_INFINITY))
out = []
for q, r in fit_tiled([p], device="cpu", auto=False):
    out.append({"kind": type(r).__name__, "error": str(r) if isinstance(r, Exception) else None,
                "shape": None if isinstance(r, Exception) else list(r.image.shape),
                "oom_fallback": None if isinstance(r, Exception) else r.extra.get("oom_fallback"),
                "tiles": None if isinstance(r, Exception) else len(r.record()["tiling"]["tiles"])})
print("RESULT " + json.dumps(out))
"""


def test_an_image_that_runs_out_of_memory_is_fitted_again_as_tiles():
    """Out of memory with one slot is not the end of the image: it is tiled (a real allocator failure,
    under a real address-space limit in a child process)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _OOM_SCRIPT], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stderr[-2000:]
    (res,) = json.loads(line[0][7:])
    assert res["kind"] == "TiledResult", res
    assert res["shape"] == [512, 512] and res["tiles"] >= 4
    assert res["oom_fallback"]["tile"] <= 256
    assert "out of memory; fitting it again as tiles" in r.stderr


@pytest.mark.parametrize("exc,oom", [
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 38044224 bytes"), True),
    (RuntimeError("std::bad_alloc"), True),
    (MemoryError(), True),
    (RuntimeError("could not create a primitive"), False),  # oneDNN: could be anything
    (ValueError("image 7x7 is below the minimum"), False),
])
def test_what_counts_as_out_of_memory(exc, oom):
    from pipeline.engine import is_oom
    assert is_oom(exc) is oom
    wrapped = TileError("tile 3 of 9 failed")
    wrapped.__cause__ = exc
    assert is_oom(wrapped) is oom  # through a tile's error


# ---- ensembles: K fits of the same box from K seeds, blended like tiles -------------------------------
def test_an_ensemble_is_the_mean_of_its_members_and_renders_as_one_image(tmp_path):
    pytest.importorskip("onnxruntime")
    from pipeline.api import fit_problems, restore
    img = smooth(24, 40)
    p = make_problem(img, preset="fast", steps=6, net=TINY, seed=5, name="scan", ensemble=2)
    (_q, r), = list(fit_tiled([p], device="cpu", auto=False, keep_weights=True))
    assert isinstance(r, TiledResult) and r.image.shape == (24, 40)
    lay = r.extra["tiling"]
    assert lay["ensemble"] == 2 and [(t["member"], t["box"]) for t in lay["tiles"]] == [(0, [0, 0, 24, 40]),
                                                                                         (1, [0, 0, 24, 40])]
    # the same two fits made by hand (one fit each, the members' seeds), averaged
    seeds = [tiling.tile_seed(5, i) for i in range(2)]
    assert [t["seed"] for t in lay["tiles"]] == seeds and seeds[0] != seeds[1]
    singles = [res.image.pixels for _q, res in fit_problems(
        [make_problem(img, preset="fast", steps=6, net=TINY, seed=s, name=f"m{s}") for s in seeds], device="cpu")]
    assert np.abs(singles[0] - singles[1]).max() > 0.01  # two different fits
    np.testing.assert_allclose(r.image.pixels, (singles[0] + singles[1]) / 2, atol=1 / 255 + 1e-6)
    # one layout file re-renders the mean
    path = export_tiled(r, tmp_path)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["scan.t000.onnx", "scan.t001.onnx", "scan.tiles.json"]
    np.testing.assert_allclose(render_tiled(path, "cpu").pixels, r.image.pixels, atol=2e-3)
    # restore() splits an ensemble too; fit_problems refuses one rather than fit it as a single fit
    r2 = restore(img, preset="fast", steps=6, net=TINY, seed=5, ensemble=2, device="cpu")
    np.testing.assert_array_equal(r2.image.pixels, r.image.pixels)
    (_q, err), = list(fit_problems([p], device="cpu"))
    assert isinstance(err, ValueError) and "ensemble" in str(err)
    with pytest.raises(ValueError, match="ensemble"):
        make_problem(img, preset="fast", ensemble=0)


def test_the_light_sr_preset_restores_as_the_mean_of_two_upscaled_fits():
    """sr4-lite is an ensemble of two fits (docs/efficiency.md): restore() fits the low-res image twice,
    each member's box scaled by the factor, and returns the upscaled mean with both members' work."""
    from pipeline.api import restore
    from pipeline.config import PRESETS
    assert PRESETS["sr4-lite"].ensemble == 2
    lr = smooth(8, 12)
    r = restore(lr, task="sr", preset="sr4-lite", scale=4, steps=4, seed=3, device="cpu")
    assert r.image.shape == (32, 48)
    lay = r.extra["tiling"]
    assert lay["ensemble"] == 2 and [t["member"] for t in lay["tiles"]] == [0, 1]
    assert r.extra["work"]["fits"] == 2 and r.extra["work"]["steps"] >= 2 * 4


def test_an_ensemble_of_a_tiled_image_fits_every_tile_k_times():
    p = make_problem(smooth(40, 56), preset="fast", steps=3, net=TINY, ensemble=2, name="big")
    tps, lay = split(p, 32, 8)
    assert len(lay.tiles) == 2 * len(plan_tiles(40, 56, 32, 8)) == len(tps)
    assert all(q.cfg.ensemble == 1 for q in tps) and len({q.seed for q in tps}) == len(tps)
    # members share a box and its weights, so the merge of exact crops is still exact
    r = merge(lay, fake_results(lay, tps, smooth(40, 56)))
    np.testing.assert_allclose(r.image.pixels, smooth(40, 56), atol=1 / 255 + 1e-6)


def test_a_config_tile_fits_larger_images_as_tiles_and_smaller_ones_whole():
    from pipeline.api import fit_problems, restore
    big = make_problem(smooth(24, 40), preset="fast", steps=3, net=TINY, tile=16, name="big")
    small = make_problem(smooth(16, 16), preset="fast", steps=3, net=TINY, tile=16, name="small")
    got = {q.name: r for q, r in fit_tiled([big, small], device="cpu", auto=False)}
    assert isinstance(got["big"], TiledResult) and type(got["small"]) is Result
    lay = got["big"].extra["tiling"]
    assert lay["tile"] == 16 and len(lay["tiles"]) == len(plan_tiles(24, 40, 16, 4)) > 1
    assert got["big"].image.shape == (24, 40)
    # the caller's tile wins over the config's, and is not refused for being larger than it
    (_q, r), = list(fit_tiled([big], device="cpu", tile=24, auto=False))
    assert r.extra["tiling"]["tile"] == 24
    (_q, whole), = list(fit_tiled([big], device="cpu", tile=64, auto=False))  # above the image: one box
    assert [t["box"] for t in whole.extra["tiling"]["tiles"]] == [[0, 0, 24, 40]]
    # restore() cuts it as the job does; fit_problems refuses to fit it whole rather than ignore the tile
    assert isinstance(restore(smooth(24, 40), preset="fast", steps=3, net=TINY, tile=16, device="cpu"),
                      TiledResult)
    (_q, err), = list(fit_problems([big], device="cpu"))
    assert isinstance(err, ValueError) and "as tiles" in str(err)
    with pytest.raises(ValueError, match="tile must be 0"):
        make_problem(smooth(16, 16), preset="fast", tile=4)
