"""`dip bench quality --fast`: the quality bench end to end on tiny crops (a CPU smoke test)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.bench import quality as bq
from pipeline.cli import main

ROOT = bq.paper_dir(None)
needs_data = pytest.mark.skipif(not (ROOT / "denoise-color-s25").is_dir(), reason=f"no benchmark data in {ROOT}")


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


@needs_data
def test_fast_denoise_end_to_end(tmp_path, capsys):
    out = tmp_path / "q.json"
    rc = main(["bench", "quality", "--suite", "denoise", "--fast", "--limit", "2", "--device", "cpu",
               "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["fast"] is True and rep["device"] == "cpu" and set(rep["suites"]) == {"denoise"}
    s = rep["suites"]["denoise"]
    assert s["preset"] == "fast" and s["failed"] == 0 and len(s["images"]) == 2
    for row in s["images"]:
        assert row["size"] == [bq.FAST_CROP, bq.FAST_CROP]
        for k in ("auto_psnr", "oracle_psnr", "final_psnr", "auto_step", "oracle_step"):
            assert _finite(row[k]), (k, row[k])
        assert row["oracle_psnr"] >= row["final_psnr"] - 0.01  # the oracle sees the final check too
        assert row["metric_trace"] and all(_finite(p) for _, p, _m in row["metric_trace"])
        # every variant the fast rule's window of 2 can replay: all but those lagging 2 checks
        assert len(row["variants"]) == sum(v["lag"] < 2 for v in bq.VARIANTS)
        assert row["psnr_trace"] and row["var_trace"]
        assert row["steps"] == bq.FAST_STEPS
    for k in ("auto_psnr", "oracle_psnr", "final_psnr"):
        assert _finite(s["mean"][k])
    assert s["variants"] and all(_finite(v["mean_last"]) for v in s["variants"])
    printed = capsys.readouterr().out
    assert "== denoise" in printed and "mean" in printed


@needs_data
def test_fast_sr_and_inpaint_cases():
    """The SR and inpainting protocols without fitting: sizes, masks and the bicubic baseline."""
    sr = bq.load_cases("sr", ROOT, limit=2, crop=64)
    assert [c.name for c in sr] == ["baby", "bird"]
    for c in sr:
        assert c.reference.shape == (64, 64, 3) and c.image.shape == (16, 16, 3)
        assert _finite(c.baseline) and 15 < c.baseline < 60
    full = bq.load_cases("sr", ROOT, limit=1)[0]
    assert full.image.shape[0] * 4 == full.reference.shape[0]
    inp = bq.load_cases("inpaint", ROOT, limit=2, crop=64)
    for c in inp:
        assert c.mask is not None and c.mask.shape == c.image.shape[:2]
        assert 0.3 < c.mask.mean() < 0.7
        assert np.all(c.image[c.mask == 0] == 0)
        assert np.all(c.image[c.mask > 0] == c.reference[c.mask > 0])


def test_metrics():
    ref = torch.rand(3, 20, 20)
    assert bq.psnr(ref, torch.round(ref * 255) / 255) == 100.0
    noisy = ref + 0.1
    p_rgb = bq.psnr(noisy, ref)
    assert 15 < p_rgb < 25
    # Y with a border: a constant shift of 0.1 in RGB is 0.1 * (65.481+128.553+24.966)/255 in Y
    shift = 0.1 * (65.481 + 128.553 + 24.966) / 255
    flat = torch.full((3, 20, 20), 0.4)
    assert abs(bq.psnr(flat + 0.1, flat, y_border=4) - (-20 * math.log10(shift))) < 0.2
    # grey images ignore the Y conversion
    g = torch.rand(1, 20, 20)
    assert _finite(bq.psnr(g, g * 0.9, y_border=4))


def test_missing_data_is_a_usage_error(tmp_path):
    assert main(["bench", "quality", "--suite", "sr", "--fast", "--data", str(tmp_path)]) == 2


def test_replayed_lag_scores_the_image_checks_before_the_minimum():
    """replay_variants on a recorded trace whose VAR minimum (with rel_tol 0.5) is at step 400: lag 1 and 2
    score the images of steps 350 and 300."""
    from pipeline.stopping import StopConfig
    var = {200: 1.0, 250: 0.4, 300: 0.1, 350: 0.04, 400: 0.01, 450: 0.009, 500: 0.008, 550: 0.008, 600: 0.007}
    row = {"var_trace": sorted(var.items()), "metric_trace": [[s, 20.0 + s / 100, None] for s in range(50, 650, 50)],
           "final_psnr": 26.0, "steps": 600}
    cfg = StopConfig(window=4, patience=4, min_steps=0, rel_tol=0.5)
    got = {v["lag"]: v for v in bq.replay_variants(row, cfg, [dict(rel_tol=0.5, patience=4, lag=g) for g in (0, 1, 2)])}
    assert [got[g]["chosen"] for g in (0, 1, 2)] == [400, 350, 300]
    assert [got[g]["psnr_last"] for g in (0, 1, 2)] == [24.0, 23.5, 23.0]
    assert all(got[g]["stopped_at"] == 600 for g in (0, 1, 2))


def test_replayed_discrepancy_principle_stops_where_the_loss_reaches_the_noise_variance():
    sigma = 0.1
    loss = [0.05 * 0.99 ** t + 0.009 for t in range(400)]  # falls through sigma^2 = 0.01 near step 230
    row = {"loss": loss, "sigma_est": sigma, "final_psnr": 20.0,
           "metric_trace": [[s, 20.0 + s / 100, None] for s in range(50, 450, 50)]}
    got = {d["factor"]: d for d in bq.replay_discrepancy(row, factors=(0.5, 1.0, 1.2), smooth=10)}
    first = next(t for t in range(10, 401) if sum(loss[t - 10:t]) / 10 <= 0.01 + 1e-15)
    assert got[1.0]["step"] == first and got[1.0]["chosen"] == -(-first // 50) * 50
    assert got[1.0]["psnr"] == 20.0 + got[1.0]["chosen"] / 100
    assert got[1.2]["step"] < got[1.0]["step"]  # a looser level is reached earlier
    assert got[0.5]["step"] is None and got[0.5]["psnr"] == 20.0  # never reached: the final image


@needs_data
def test_run_suite_takes_overrides_and_hands_back_the_scored_images():
    """What tools/measure_knobs.py builds on: a config override changes the fit, and the kept auto-stopped
    and best checked images score exactly what the bench reported for them."""
    cases = bq.load_cases("denoise", ROOT, limit=1, crop=bq.FAST_CROP)
    plain = bq.run_suite("denoise", cases, device="cpu", fast=True)["images"][0]
    imgs: dict = {}
    row = bq.run_suite("denoise", cases, device="cpu", fast=True, overrides={"reg_noise_std": 0.0},
                       images=imgs)["images"][0]
    assert row["final_psnr"] != plain["final_psnr"]  # no input noise: another fit
    kept = imgs[cases[0].name]
    ref = bq._ref_tensor(cases[0].reference)
    for k, col in (("auto", "auto_psnr"), ("oracle", "oracle_psnr"), ("final", "final_psnr")):
        assert kept[k].shape == cases[0].reference.shape
        got = bq.psnr(torch.from_numpy(np.ascontiguousarray(kept[k])).permute(2, 0, 1), ref)
        assert got == pytest.approx(row[col], abs=1e-3), k
