"""dip bench speed runs end to end on the CPU and reports every configuration it measured."""
import json

from pipeline.bench.speed import conv_flops
from pipeline.cli import main
from pipeline.config import PRESETS


def test_flop_count_matches_the_measured_original():
    # the profile: 460 GFLOP for forward + backward of the paper's net at 512^2
    assert abs(3 * conv_flops(PRESETS["denoise"], 512, 512) / 1e9 - 465.0) < 1.0


def test_bench_speed_cpu(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--device", "cpu", "--size", "32", "--batch", "2", "--steps", "1",
                 "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    labels = [r["label"] for r in d["rows"]]
    assert labels == ["single fit (original-equivalent)", "batched fp32 B=2"]
    for r in d["rows"]:
        assert r["step_ms"] > 0 and r["fit_steps_per_s"] > 0 and r["images_per_hour"] > 0
    assert d["rows"][1]["speedup"] > 0
    assert "batched fp32 B=2" in capsys.readouterr().out


def test_bench_speed_compares_conv_modes_and_profiles(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--device", "cpu", "--size", "32", "--batch", "2", "--steps", "1",
                 "--conv", "grouped,loop", "--profile", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    rows = {r["label"]: r for r in d["rows"]}
    assert set(rows) == {"single fit (original-equivalent)", "batched fp32 B=2 conv=grouped",
                         "batched fp32 B=2 conv=loop"}
    for label in ("batched fp32 B=2 conv=grouped", "batched fp32 B=2 conv=loop"):
        pr = rows[label]["profile"]
        assert pr["ms_per_step"] > 0 and pr["top"]
        assert abs(sum(v["share"] for v in pr["by_kind"].values()) - 1) < 0.01
        assert pr["by_kind"]["conv"]["ms"] > 0  # the convolutions are found by name
    assert rows["batched fp32 B=2 conv=grouped"]["conv"] == "grouped"
    assert "profile (CPU operator self time" in capsys.readouterr().out
    assert main(["bench", "speed", "--device", "cpu", "--size", "32", "--batch", "2", "--steps", "1",
                 "--conv", "sideways"]) == 2


def test_grouped_and_per_slot_convolutions_compute_the_same_generators():
    import torch
    from pipeline.generator import SkipGenerator
    net = PRESETS["fast"].net.with_channels(3)
    z = torch.rand(1, 3 * net.input_depth, 32, 32, generator=torch.Generator().manual_seed(0))
    outs = []
    for conv in ("grouped", "loop"):
        G = SkipGenerator(net, 3, conv=conv)
        for s in range(3):
            G.init_slot(s, seed=10 + s)
        with torch.no_grad():
            outs.append(G(z))
    assert outs[0].shape == (3, 3, 32, 32)
    # float32 round-off, grown by BatchNorm; mixing up slots would differ by ~0.1
    assert (outs[0] - outs[1]).abs().max() < 1e-4
