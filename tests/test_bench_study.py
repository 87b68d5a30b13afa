"""dip bench study (pipeline/bench/study.py): a smoke test on two tiny crops, and its resume."""
from __future__ import annotations

import json

import pytest

from pipeline.bench import study, variants
from pipeline.cli import main


def test_the_split_keeps_tuning_and_held_out_images_apart():
    from pipeline.bench.quality import PAPER
    for suite, parts in study.SPLIT.items():
        assert not set(parts["tune"]) & set(parts["held"])
        assert sorted(parts["tune"] + parts["held"]) == sorted(PAPER[suite])  # every image, once


def test_study_smoke_two_tiny_crops_then_resume(tmp_path, capsys):
    pytest.importorskip("bm3d")
    out = tmp_path / "study.jsonl"
    args = ["bench", "study", "--suite", "denoise", "--part", "tune", "--images", "F16,baboon", "--crop", "32",
            "--variants", "paper,w32,bm3d", "--max-steps", "60", "--margin", "0", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["variant"], r["image"]) for r in rows) == sorted(
        (v, i) for v in ("paper", "w32", "bm3d") for i in ("F16", "baboon"))
    for r in rows:
        assert r["part"] == "tune" and r["crop"] == 32
        if r["variant"] == "bm3d":
            assert 15 < r["psnr"] < 45 and r["cpu_s"] > 0
            continue
        assert r["steps"] == 60 + 6  # the cap, and the distillation a real run would add (a tenth)
        assert r["gflop"] == pytest.approx(r["gflop_per_step"] * r["steps"], rel=1e-3)
        assert r["auto_psnr"] and r["oracle_psnr"] and r["cpu_s"] > 0
        assert r["rule"] == variants.variant_rule("denoise", variants.variants_for("denoise", [r["variant"]])[0])
        m = r["members"][0]  # what a rule on the data term can be replayed on: the loss at every check
        assert [s for s, _l in m["loss_trace"]] == [s for s, *_ in m["metric_trace"]] and m["sigma_est"] > 0.05
        assert m["loss_trace"] and all(0 < x < 0.1 for _s, x in m["loss_trace"])  # an MSE of [0, 1] images
    paper = {r["image"]: r for r in rows if r["variant"] == "paper"}
    light = {r["image"]: r for r in rows if r["variant"] == "w32"}
    assert all(light[i]["gflop"] < paper[i]["gflop"] / 10 for i in paper)  # 32 channels: ~1/16 of the work
    table = capsys.readouterr().out
    assert "== denoise, 32^2 crops, tune images" in table and "w32" in table
    # resume: the same command measures nothing again
    assert main(args) == 0
    assert len(out.read_text().splitlines()) == len(rows)
    s = {x["variant"]: x for x in study.summarize(rows)}
    assert s["w32"]["gflop_ratio"] < 0.1 and s["w32"]["vs_paper_on"] == 2 and "d_anchor" in s["w32"]


@pytest.mark.parametrize("preset, variant", [("denoise-lite", "d-w24ex6l0fs"), ("inpaint-lite", "i-w32lx2c"),
                                             ("sr4-lite", "l-w32x2")])
def test_each_light_preset_is_the_study_variant_it_came_from(preset, variant):
    """A light preset, fitted as `dip restore` fits it (config and auto-stop rule), is exactly the study's
    variant that was chosen on the tuning images and reported on the held-out ones (docs/efficiency.md)."""
    from pipeline.bench.quality import SUITE_PRESETS
    from pipeline.config import PRESETS, make_config
    from pipeline.stopping import stop_config_for
    suite = PRESETS[preset].task  # the suites are named after their tasks
    (v,) = variants.variants_for(suite, [variant])
    base = PRESETS[SUITE_PRESETS[suite]]
    measured = make_config(suite, preset=base.preset, scale=base.scale, **v.over)  # as the study's fit makes it
    shipped = PRESETS[preset]
    assert shipped.ensemble == v.k
    for f in ("net", "lr", "steps", "reg_noise_std", "optimizer", "ema", "ema_warmup", "input_kind", "output"):
        assert getattr(shipped, f) == getattr(measured, f), f
    if shipped.auto_stop:
        assert stop_config_for(shipped) == stop_config_for(base, **v.stop)  # the rule the study ran it with
    else:  # fixed steps: the study ran it with a rule that never fires
        assert v.stop == variants.TO_THE_CAP
    assert shipped.tile in (0, 64)  # a tiling preset cuts at the study's crop size, so each fit is as measured
    (pv,) = variants.variants_for(suite, [preset])  # the preset by name, as the study runs it
    assert pv.preset == preset and pv.k == shipped.ensemble and pv.over == {"ensemble": 1}
    assert pv.stop == ({} if shipped.auto_stop else variants.TO_THE_CAP)


def test_the_cpu_defaults_are_the_light_presets():
    from pipeline.job import JobOptions
    cfg = JobOptions(task="denoise").config_for("cpu")
    assert cfg.preset == "denoise-lite" and cfg.ensemble == 6
    assert JobOptions(task="denoise", ensemble=1).config_for("cpu").ensemble == 1  # --ensemble 1: a sixth of the work
    assert JobOptions(task="denoise").config_for("cuda").preset == "denoise"  # the paper's on a GPU
    sr8 = JobOptions(task="sr", scale=8).config_for("cpu")
    assert (sr8.preset, sr8.scale, sr8.steps, sr8.net.channels_down, sr8.ensemble) == ("sr8-lite", 8, 4000,
                                                                                     (32,) * 5, 2)
    assert JobOptions(task="sr").config_for("cpu").preset == "sr4-lite"


def test_a_tiling_preset_on_a_larger_crop_is_fitted_as_the_product_fits_it():
    """A variant whose config tiles (FitConfig.tile) and a crop larger than the tile: the row comes from
    pipeline.fit.fit_tiled (every tile and member its own fit), with its work and no oracle."""
    from pipeline.bench.quality import load_cases, paper_dir
    (case,) = load_cases("denoise", paper_dir(None), crop=40, only=["F16"])
    tiny = {"input_depth": 8, "channels_down": (8, 16, 32, 32), "channels_up": (8, 16, 32, 32)}
    v = variants.Variant("t", "fast", {"tile": 24, "net": tiny, "steps": 3}, k=2)
    assert study._tiles_of("denoise", case, v) == 24
    assert study._tiles_of("denoise", case, variants.Variant("w", "fast", {"tile": 64})) == 0  # fits in one tile
    row = study._tiled_row("denoise", case, v, seed0=0)
    assert row["tile"] == 24 and row["fits"] == 2 * 4 == len(row["unit_steps"])  # 2x2 tiles, 2 members
    assert row["oracle_psnr"] is None and 5 < row["auto_psnr"] < 40
    assert row["gflop"] == pytest.approx(row["gflop_per_step"] * row["steps"], rel=1e-3) and row["cpu_s"] > 0
    # a full-size row goes beside the paper's published numbers for its image
    full = {"suite": "denoise", "sigma": None, "crop": 0, "variant": "t", "image": "F16", "part": "tune", **row}
    md = study.markdown_tables([full])
    assert "| F16 | " in md and "| 33.69 | 32.67 |" in md and "the paper's CBM3D" in md and "mean of 1" in md


def test_a_variant_of_one_task_s_preset_is_not_run_on_another_suite():
    assert "dl-whole" in {v.name for v in variants.variants_for("denoise", None)}
    assert "dl-whole" not in {v.name for v in variants.variants_for("sr", None)}
    with pytest.raises(ValueError, match="not for sr"):
        variants.variants_for("sr", ["dl-whole"])


def test_ensemble_members_are_reused_from_the_cache_and_flipped_members_see_flipped_images(tmp_path):
    """With --cache, a member fitted before with everything the same (here the first two members of an
    ensemble of 3, after one of 2) is read back, not refitted, and the ensemble's score is the same as
    fitted fresh; a flipped variant's member k sees the image in orientation k and is flipped back."""
    import numpy as np
    from pipeline.bench.cases import load_cases, paper_dir
    (case,) = load_cases("inpaint", paper_dir(None), crop=32, only=["barbara"])
    k2 = variants.Variant("x2", over={"net": variants._w(16), "lr": 0.01, "steps": 60}, k=2)
    k3 = variants.Variant("x3", over=k2.over, k=3)
    cache = tmp_path / "cache"
    a = study._fit_row("inpaint", case, k2, 0, 0, cache=cache)
    b = study._fit_row("inpaint", case, k3, 0, 0, cache=cache)
    assert [m.get("cached", False) for m in b["members"]] == [True, True, False]
    assert b["members"][:2] == [{**m, "cached": True} for m in a["members"]]
    fresh = study._fit_row("inpaint", case, k3, 0, 0)  # no cache: all three fitted again, the same score
    assert fresh["auto_psnr"] == b["auto_psnr"] and not any(m.get("cached") for m in fresh["members"])
    assert len(list(cache.glob("*.npz"))) == 3
    img = np.arange(2 * 3 * 1).reshape(2, 3, 1)
    assert [variants.flipped(img, k)[0, 0, 0] for k in range(4)] == [0, 2, 3, 5]
    assert all((variants.flipped(variants.flipped(img, k), k) == img).all() for k in range(4))
    flip = variants.Variant("f", over=k2.over, k=2, flip=True)
    assert study._member_key("inpaint", case, flip, 1, 0, 1, None) != study._member_key("inpaint", case, k2, 1, 0, 1, None)
