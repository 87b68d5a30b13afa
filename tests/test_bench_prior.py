"""dip bench prior (pipeline/bench/prior.py): the paper's Figure 7 on a 32x32 crop."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main

DATA = Path(os.environ.get("DIP_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
F16 = DATA / "dip-repo" / "denoising" / "F16_GT.png"


def test_a_natural_image_is_fitted_first_and_noise_last(tmp_path, capsys):
    img = tmp_path / "f16.png"
    Image.open(F16).convert("RGB").crop((200, 200, 232, 232)).save(img)  # a 32x32 crop of F16
    out = tmp_path / "prior"
    assert main(["bench", "prior", str(img), "--preset", "fast", "--steps", "200", "--device", "cpu", "--size",
                 "32", "--out", str(out), "--json", str(tmp_path / "p.json")]) == 0
    rec = json.loads((out / "prior.json").read_text())
    assert rec == json.loads((tmp_path / "p.json").read_text())
    assert set(rec) >= {"image", "preset", "steps", "targets", "steps_to", "noisy"} and rec["steps"] == 200
    assert set(rec["targets"]) == {"natural", "noisy", "shuffled", "noise"}
    assert all(len(t["loss"]) == 200 for t in rec["targets"].values())
    assert all(set(s) == {"0.01", "0.003"} for s in rec["steps_to"].values())
    for step in (50, 200):  # at a fixed step: the prior fits structure first and resists noise
        loss = {k: rec["targets"][k]["loss"][step - 1] for k in rec["targets"]}
        assert loss["natural"] < loss["noisy"] < loss["shuffled"] < loss["noise"], (step, loss)
    n = rec["noisy"]
    assert n["noise_variance"] == pytest.approx((25 / 255) ** 2, rel=1e-4)
    loss = np.array(rec["targets"]["noisy"]["loss"])
    under = n["step_under_noise_variance"]
    assert under is None or (loss[under - 1] < n["noise_variance"] <= loss[:under - 1].min())
    assert "auto_stop" in n
    assert (out / "prior.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "natural" in table and "shuffled" in table and "auto-stop chose" in table


def test_the_cpu_default_runs_one_fit_a_target(tmp_path):
    """With no --preset a CPU takes the light denoising preset, whose two-fit ensemble is for `dip restore`:
    the bench fits each target once (it crashed on the ensemble when the default became denoise-lite)."""
    img = tmp_path / "f16.png"
    Image.open(F16).convert("RGB").crop((200, 200, 216, 216)).save(img)
    assert main(["bench", "prior", str(img), "--steps", "20", "--device", "cpu", "--out", str(tmp_path / "p")]) == 0
    rec = json.loads((tmp_path / "p" / "prior.json").read_text())
    assert rec["preset"] == "denoise-lite" and rec["steps"] == 20 and rec["size"] == [16, 16]
