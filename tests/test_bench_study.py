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
