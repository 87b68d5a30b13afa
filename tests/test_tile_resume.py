"""Resume of an image fitted as tiles: each finished tile kept as a file (pipeline.tiling.encode_tile,
TileStore), merged instead of fitted by the next run (pipeline.fit: ``on_tile``, ``Problem.kept_tiles``);
in the job under OUT/.tiles/ until the image is written, and in the study beside its JSONL file.

CPU only, the fast preset with a tiny net and a few steps, one torch thread.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.api import make_problem
from pipeline.fit import TilesPending, fit_tiled
from pipeline.tiling import TileStore, decode_tile, encode_tile, split

TINY = {"input_depth": 8, "channels_down": (8, 16, 32, 32), "channels_up": (8, 16, 32, 32)}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def scan(seed: int = 3, **over):
    """A 40x56 noisy colour image: 4 boxes of 32 px (overlap 8), two members each: 8 fits."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:40, 0:56].astype(np.float32)
    img = np.stack([0.5 + 0.3 * np.sin(x / 7 + ph) * np.cos(y / 9) for ph in (0, 1, 2)], -1)
    img = np.clip(img + rng.normal(0, 0.1, img.shape), 0, 1).astype(np.float32)
    return make_problem(img, task="denoise", preset="fast", net=TINY, ensemble=2, seed=seed, name="scan",
                        **{"steps": 6, **over})


def fit(p, **kw):
    (_q, r), = list(fit_tiled([p], device="cpu", slots=1, tile=32, overlap=8, auto=False, **kw))
    if isinstance(r, Exception):
        raise r
    return r


class Stop(KeyboardInterrupt):  # as Ctrl-C: the engine does not take it for a failed fit
    pass


def stopped_run(store: TileStore, after: int, **kw) -> None:
    """A run that keeps its tiles in ``store`` and is stopped (as by a signal) once ``after`` are kept."""
    def on_step(_n):
        if len(list(store.folder.glob("t*.npz"))) >= after:
            raise Stop
    with pytest.raises(Stop):
        fit(scan(), on_tile=lambda _p, i, blob: store.save(i, blob), on_step=on_step, **kw)


def test_a_stopped_tiled_fit_goes_on_from_its_last_tile_and_gives_the_same_image(tmp_path):
    whole = fit(scan())
    store = TileStore(tmp_path / "scan")
    stopped_run(store, after=3)
    kept = store.load()
    assert len(kept) == 3
    p = scan()
    p.kept_tiles = kept
    fitted = []
    r = fit(p, on_tile=lambda _p, i, _b: fitted.append(i))
    assert r.extra["tiling"]["kept"] == 3
    assert len(fitted) == 8 - 3 and not set(fitted) & {0, 1, 2}  # tiles end in order at one slot
    np.testing.assert_array_equal(r.image.pixels, whole.image.pixels)
    assert r.extra["work"] == whole.extra["work"]  # the image's cost counts the kept fits too
    assert [t["steps"] for t in r.record()["tiling"]["tiles"]] == [t["steps"] for t in
                                                                    whole.record()["tiling"]["tiles"]]
    assert p.kept_tiles == []  # consumed


def test_an_image_shared_by_two_parts_merges_into_the_same_image(tmp_path):
    """Problem.tile_part: two runs each fit every other fit of the image (as two processes would, side by
    side) and end it with TilesPending; a run given all their kept fits fits nothing and gives the image
    one run gives."""
    whole = fit(scan())
    store = TileStore(tmp_path / "scan")
    for i in (0, 1):
        p = scan()
        p.tile_part = (i, 2)
        fitted = []
        (_q, r), = list(fit_tiled([p], device="cpu", slots=1, tile=32, overlap=8, auto=False,
                                  on_tile=lambda _p, k, blob: (fitted.append(k), store.save(k, blob))))
        assert isinstance(r, TilesPending) and f"part {i + 1} of 2 done" in str(r)
        assert fitted == [k for k in range(8) if k % 2 == i]
    p = scan()
    p.kept_tiles = store.load()
    fitted = []
    r = fit(p, on_tile=lambda _p, k, _b: fitted.append(k))
    assert fitted == [] and r.extra["tiling"]["kept"] == 8
    np.testing.assert_array_equal(r.image.pixels, whole.image.pixels)
    assert r.extra["work"] == whole.extra["work"]


def test_a_part_that_goes_on_from_kept_fits_counts_them_of_the_whole_image(tmp_path, caplog):
    """The log line of a resumed part: "1 of 8 fits kept" (the image's), not of its kept ones plus its own
    share (stop 37: a part of kodim01 said "8 of 382" of 756)."""
    import logging
    store = TileStore(tmp_path / "scan")
    stopped_run(store, after=1)
    p = scan()
    p.kept_tiles, p.tile_part = store.load(), (0, 2)
    with caplog.at_level(logging.INFO, logger="dip.tiling"):
        (_q, r), = list(fit_tiled([p], device="cpu", slots=1, tile=32, overlap=8, auto=False))
    assert isinstance(r, TilesPending)
    assert "1 of 8 fits kept from a stopped run" in caplog.text


def test_kept_tiles_of_another_fit_or_damaged_are_fitted_again(tmp_path):
    store = TileStore(tmp_path / "scan")
    stopped_run(store, after=2)
    blobs = store.load()
    for other in (scan(seed=4), scan(steps=7), scan(lr=0.02)):  # another seed, cap, option: other fits
        other.kept_tiles = list(blobs)
        assert "kept" not in fit(other).extra["tiling"]
    p = scan()
    p.kept_tiles = [blobs[0][:len(blobs[0]) // 2], blobs[1]]  # one truncated (a run killed mid-write)
    assert fit(p).extra["tiling"]["kept"] == 1
    p = scan()
    p.kept_tiles = list(blobs)  # kept without weights: an export needs them, so they are fitted again
    assert "kept" not in fit(p, keep_weights=True).extra["tiling"]


def test_a_factory_that_carries_its_rule_keeps_resume_and_its_rule_is_in_the_key(tmp_path):
    """A custom stopper factory with ``.config`` (make_stopper_factory's): its tiles are kept under keys that
    hold its rule, so a run with the same rule merges them, one under the config's own rule fits them again,
    and a factory without a rule keeps nothing (its key could not see the rule)."""
    from pipeline.stopping import make_stopper_factory
    factory = make_stopper_factory(scan().cfg, floor=0.9, floor_wait=20)
    store = TileStore(tmp_path / "scan")
    stopped_run(store, after=3, stopper_factory=factory)
    blobs = store.load()
    assert len(blobs) == 3
    p = scan()
    p.kept_tiles = list(blobs)
    assert fit(p, stopper_factory=make_stopper_factory(scan().cfg, floor=0.9, floor_wait=20)
               ).extra["tiling"]["kept"] == 3
    p = scan()
    p.kept_tiles = list(blobs)
    assert "kept" not in fit(p).extra["tiling"]  # the preset's own rule: other fits
    p, kept = scan(), []
    p.kept_tiles = list(blobs)
    r = fit(p, stopper_factory=lambda *a, **k: factory(*a, **k), on_tile=lambda _p, i, _b: kept.append(i))
    assert "kept" not in r.extra["tiling"] and kept == []  # no rule to key on: resume is off


def test_a_kept_tile_round_trips_with_its_weights():
    p = scan()
    r = fit(p, keep_weights=True)
    tps, _lay = split(scan(), 32, 8)
    for i, q in enumerate(tps[:2]):
        t = r.tiles[i]
        t.image.pixels = np.full(q.out_shape + (3,), 0.25, np.float32)  # the merge dropped the real ones
        back = decode_tile(encode_tile(t), q, weights=True)
        assert back is not None and back.steps == t.steps and back.stop_reason == t.stop_reason
        assert torch.equal(back.weights, t.weights) and back.extra["work"] == t.extra["work"]
        np.testing.assert_array_equal(back.image.pixels, t.image.pixels)
        assert decode_tile(encode_tile(t), tps[i + 2], weights=True) is None  # not this tile's fit


def test_a_job_stopped_in_a_tiled_image_goes_on_from_its_kept_tiles(tmp_path, ray_session):
    """A real job whose result cannot be written (its PNG path is a folder) fails the image but keeps its
    finished tiles under OUT/.tiles/; once the path is free, the same command merges all of them, fits
    nothing again, and removes the folder."""
    from PIL import Image
    from pipeline.cli import main as cli_main
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    out = tmp_path / "out"
    (out / "big.png").mkdir(parents=True)
    args = ["restore", str(tmp_path / "big.png"), "--out", str(out), "--tile", "32", "--tile-overlap", "8",
            "--preset", "fast", "--steps", "3", "--device", "cpu", "--no-export-onnx", "--quiet"]
    assert cli_main(args) == 1
    kept = list((out / ".tiles").glob("*/t*.npz"))
    assert len(kept) == 4  # every box once
    (out / "big.png").rmdir()
    assert cli_main(args) == 0
    rec = json.loads((out / "big.json").read_text())
    assert rec["tiling"]["kept"] == 4
    assert not (out / ".tiles").exists()


def test_the_study_keeps_a_tiled_rows_tiles_until_the_row_is_written(tmp_path, monkeypatch):
    """`dip bench study` on an image its preset tiles: a stopped run leaves its tiles beside the JSONL file;
    the next run merges them, adds up the CPU seconds of both runs, writes the row and removes them."""
    from pipeline.bench import study, variants
    from pipeline.bench.quality import load_cases, paper_dir
    (case,) = load_cases("denoise", paper_dir(None), crop=40, only=["F16"])
    v = variants.Variant("t", "fast", {"tile": 24, "net": TINY, "steps": 3}, k=2)
    out = tmp_path / "rows.jsonl"
    tiles = tmp_path / "rows.tiles"
    store = TileStore(tiles / study._tiles_key("denoise", case, v, 0))
    first = study._tiled_row("denoise", case, v, 0, tiles)  # a whole run, to compare with
    assert "kept_tiles" not in first and len(store.load()) == 8  # they stay until the caller writes the row
    for f in sorted(store.folder.glob("t*.npz"))[3:]:
        f.unlink()  # as if stopped after three
    (store.folder / "cpu.json").write_text(json.dumps({"cpu_s": 100.0, "runs": 1}))
    monkeypatch.setattr(study, "variants_for", lambda suite, names: [v])
    assert study.run(["denoise"], "tune", None, 40, out, images=["F16"]) == 0
    (row,) = study.read_rows(out)
    assert row["kept_tiles"] == 3 and row["runs"] == 2 and row["cpu_s"] >= 100.0
    assert row["auto_psnr"] == first["auto_psnr"] and row["gflop"] == first["gflop"]
    assert not store.folder.exists() and not tiles.exists()


def test_the_study_shares_a_tiled_row_between_parts_and_merges_it(tmp_path, monkeypatch):
    """`dip bench study --tile-part I/N`: a part keeps its share and its CPU seconds and writes no row (nor
    the rows that are not tiled); the part that finds the other shares kept (here the second, run after the
    first; side by side, a run without a part) merges them into the row a single run gives."""
    from pipeline.bench import study, variants
    from pipeline.bench.quality import load_cases, paper_dir
    (case,) = load_cases("denoise", paper_dir(None), crop=40, only=["F16"])
    v = variants.Variant("t", "fast", {"tile": 24, "net": TINY, "steps": 3}, k=2)
    small = variants.Variant("s", "fast", {"net": TINY, "steps": 3}, k=1)  # 40^2 fitted whole: not tiled
    first = study._tiled_row("denoise", case, v, 0, None)
    out = tmp_path / "rows.jsonl"
    store = TileStore(tmp_path / "rows.tiles" / study._tiles_key("denoise", case, v, 0))
    monkeypatch.setattr(study, "variants_for", lambda suite, names: [v, small])
    assert study.run(["denoise"], "tune", None, 40, out, images=["F16"], margin=0, tile_part=(0, 2)) == 0
    assert study.read_rows(out) == [] and len(store.load()) == 4
    assert [f.name for f in store.folder.glob("cpu*.json")] == ["cpu-0of2.json"]
    assert study.run(["denoise"], "tune", None, 40, out, images=["F16"], margin=0, tile_part=(1, 2)) == 0
    (row,) = study.read_rows(out)
    assert row["variant"] == "t" and row["kept_tiles"] == 4 and row["runs"] == 2
    assert row["rule"] == variants.variant_rule("denoise", v)  # the rule its tiles stopped by
    assert row["auto_psnr"] == first["auto_psnr"] and row["gflop"] == first["gflop"]
    assert not store.folder.exists()
    assert study.run(["denoise"], "tune", None, 40, out, images=["F16"], margin=0) == 0
    assert [r["variant"] for r in study.read_rows(out)] == ["t", "s"]  # the untiled row: the run without a part
    assert study.parse_part("2/3") == (1, 3)
    for bad in ("0/2", "3/2", "x"):
        with pytest.raises(ValueError, match="--tile-part"):
            study.parse_part(bad)


def test_a_tiled_study_row_runs_its_variants_stop_overrides(tmp_path):
    """A variant's own stop overrides reach the fits of a tiled row, as an untiled row runs them: the row
    records that rule, and its kept tiles (under a folder name that does not hold the rule) are not taken
    for another rule's."""
    import shutil
    from pipeline.bench import study, variants
    from pipeline.bench.quality import load_cases, paper_dir
    (case,) = load_cases("denoise", paper_dir(None), crop=40, only=["F16"])
    over = {"tile": 24, "net": TINY, "steps": 3}
    v = variants.Variant("t", "fast", over, stop={"floor": 0.8, "floor_wait": 20}, k=2)
    plain = variants.Variant("t", "fast", over, k=2)
    name = study._tiles_key("denoise", case, v, 0)
    assert name == study._tiles_key("denoise", case, plain, 0)
    row = study._tiled_row("denoise", case, v, 0, tmp_path / "a")
    assert row["rule"] == variants.variant_rule("denoise", v) and row["rule"]["floor"] == 0.8
    assert len(TileStore(tmp_path / "a" / name).load()) == 8
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    other = study._tiled_row("denoise", case, plain, 0, tmp_path / "b")  # v's tiles under plain's folder
    assert "kept_tiles" not in other and other["rule"] == variants.variant_rule("denoise", plain)
    assert study._tiled_row("denoise", case, v, 0, tmp_path / "a")["kept_tiles"] == 8  # its own: merged
