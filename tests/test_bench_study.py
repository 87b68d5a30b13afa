"""dip bench study (pipeline/bench/study.py): a smoke test on two tiny crops, and its resume."""
from __future__ import annotations

import json

import pytest

from pipeline.bench import study
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


@pytest.mark.parametrize("preset, variant", [("denoise-lite", "d-w32ex2"), ("inpaint-lite", "i-w32"),
                                             ("sr4-lite", "s-w32")])
def test_each_light_preset_is_the_study_variant_it_came_from(preset, variant):
    """A light preset, fitted as `dip restore` fits it (config and auto-stop rule), is exactly the study's
    variant that was chosen on the tuning images and reported on the held-out ones (docs/efficiency.md)."""
    from pipeline.bench.quality import SUITE_PRESETS
    from pipeline.config import PRESETS, make_config
    from pipeline.stopping import stop_config_for
    suite = PRESETS[preset].task  # the suites are named after their tasks
    (v,) = study.variants_for(suite, [variant])
    base = PRESETS[SUITE_PRESETS[suite]]
    measured = make_config(suite, preset=base.preset, scale=base.scale, **v.over)  # as the study's fit makes it
    shipped = PRESETS[preset]
    assert shipped.ensemble == v.k
    for f in ("net", "lr", "steps", "reg_noise_std", "optimizer", "ema", "ema_warmup", "input_kind", "output"):
        assert getattr(shipped, f) == getattr(measured, f), f
    assert stop_config_for(shipped) == stop_config_for(base, **v.stop)  # the rule the study ran it with
    (pv,) = study.variants_for(suite, [preset])  # the preset by name, as the study runs it
    assert pv.preset == preset and pv.k == shipped.ensemble and pv.over == {"ensemble": 1}


def test_the_cpu_defaults_are_the_light_presets():
    from pipeline.job import JobOptions
    cfg = JobOptions(task="denoise").config_for("cpu")
    assert cfg.preset == "denoise-lite" and cfg.ensemble == 2
    assert JobOptions(task="denoise", ensemble=1).config_for("cpu").ensemble == 1  # --ensemble 1: half the work
    assert JobOptions(task="denoise").config_for("cuda").preset == "denoise"  # the paper's on a GPU
    sr8 = JobOptions(task="sr", scale=8).config_for("cpu")
    assert (sr8.preset, sr8.scale, sr8.steps, sr8.net.channels_down) == ("sr8-lite", 8, 4000, (32,) * 5)
    assert JobOptions(task="sr").config_for("cpu").preset == "sr4-lite"
