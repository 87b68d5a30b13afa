"""dip bench speed runs end to end on the CPU and reports every configuration it measured."""
import json

import pytest

from pipeline.cli import main
from pipeline.config import PRESETS, NetConfig, make_config
from pipeline.work import add_work, cost_for, step_cost


def test_flop_count_matches_the_measured_original():
    # the issue-3 profile of the original: 460 GFLOP for forward + backward of the paper's net at 512^2
    assert abs(cost_for(PRESETS["denoise"], (512, 512), 3).flops / 1e9 - 460.3) < 0.5


def test_flop_count_by_hand_for_a_small_network():
    """One scale, 8x8 canvas: MACs per convolution, x2 FLOPs, x3 with the backward (x2 for the two that read
    z, which needs no gradient)."""
    net = NetConfig(input_depth=2, channels_down=(4,), channels_up=(4,), channels_skip=(2,))
    c = step_cost(net, (8, 8))
    macs = {"down (reads z)": 2 * 4 * 9 * 4 * 4, "down2": 4 * 4 * 9 * 4 * 4, "skip (reads z)": 2 * 2 * 1 * 8 * 8,
            "up": 6 * 4 * 9 * 8 * 8, "up1x1": 4 * 4 * 8 * 8, "out": 4 * 3 * 8 * 8}
    want = sum(2 * m * (2 if "reads z" in k else 3) for k, m in macs.items())
    assert c.flops == want == 113152
    assert c.params == 76 + 8 + 148 + 8 + 6 + 4 + 12 + 220 + 8 + 20 + 8 + 15  # weights, biases, BN affine
    # zero padding and no BN after the concatenation: same arithmetic, fewer bytes
    lean = step_cost(NetConfig(input_depth=2, channels_down=(4,), channels_up=(4,), channels_skip=(2,),
                               pad="zero", bn_cat=False), (8, 8))
    assert lean.flops == c.flops and lean.bytes < c.bytes and lean.params == c.params - 12


def test_flop_count_by_hand_for_a_tiny_decoder():
    """The decoder (arch="decoder") on an 8x8 canvas, 2 scales: z (2 channels) taken at 2x2, up to 4x4, a
    3x3 conv to 4 channels (its input is z: no input gradient), up to 8x8, a 3x3 conv to 4, a 1x1 to 3."""
    net = NetConfig(input_depth=2, channels_down=(4, 4), channels_up=(4, 4), channels_skip=(0, 0), arch="decoder")
    c = step_cost(net, (8, 8))
    macs = {"d1 (reads z)": 2 * 4 * 9 * 4 * 4, "d0": 4 * 4 * 9 * 8 * 8, "out": 4 * 3 * 8 * 8}
    assert c.flops == sum(2 * m * (2 if "reads z" in k else 3) for k, m in macs.items()) == 64512
    assert c.params == (72 + 4 + 8) + (144 + 4 + 8) + 15


@pytest.mark.parametrize("task,preset,scale,side,net", [
    ("denoise", "fast", None, 32, {}), ("sr", "sr4", 4, 64, {}), ("inpaint", "inpaint", None, 64, {}),
    ("denoise", "denoise", None, 64, {"arch": "decoder", "channels_up": (64,) * 5})])
def test_flop_count_equals_torch_flop_counter_on_a_real_step(task, preset, scale, side, net):
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode
    from pipeline.engine import BatchedFitter, FitItem
    cfg = make_config(task, preset=preset, scale=scale, net={"pad": "zero", **net})
    f = scale or 1
    fit = BatchedFitter(cfg, (side, side), 3, 1, "cpu")
    h = side // f
    fit.load(0, FitItem(0, np.random.rand(3, h, h).astype(np.float32), np.ones((1, h, h), np.float32)))
    with FlopCounterMode(display=False) as fc:
        fit.step()
    assert fc.get_total_flops() == cost_for(cfg, (side, side), 3).flops


def test_work_of_an_image_of_several_fits_adds_up():
    a = {"params": 10, "gflop_per_step": 1.0, "bytes_per_step": 100, "steps": 10, "gflop": 10.0}
    b = {"params": 10, "gflop_per_step": 3.0, "bytes_per_step": 300, "steps": 30, "gflop": 90.0}
    w = add_work([a, b, None])
    assert w == {"params": 10, "gflop_per_step": 2.5, "bytes_per_step": 250, "steps": 40, "gflop": 100.0, "fits": 2}


def test_bench_speed_cpu(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--device", "cpu", "--size", "32", "--batch", "2", "--steps", "1",
                 "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    labels = [r["label"] for r in d["rows"]]
    assert labels == ["plain torch loop (the original's)", "single fit (original-equivalent)", "batched fp32 B=2"]
    assert isinstance(d["rows"][1]["engine_overhead"], float)
    for r in d["rows"]:
        assert r["step_ms"] > 0 and r["fit_steps_per_s"] > 0 and r["images_per_hour"] > 0
    assert d["rows"][2]["speedup"] > 0
    assert "batched fp32 B=2" in capsys.readouterr().out


def test_bench_speed_compares_conv_modes_and_profiles(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--device", "cpu", "--size", "32", "--batch", "2", "--steps", "1",
                 "--conv", "grouped,loop", "--profile", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    rows = {r["label"]: r for r in d["rows"]}
    assert set(rows) == {"plain torch loop (the original's)", "single fit (original-equivalent)",
                         "batched fp32 B=2 conv=grouped", "batched fp32 B=2 conv=loop"}
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


def test_bench_speed_concurrent_copies(tmp_path, capsys):
    """K copies at once against one alone (issue 19): every copy is timed and compared."""
    out = tmp_path / "c.json"
    assert main(["bench", "speed", "--device", "cpu", "--size", "32", "--steps", "2", "--concurrent", "2",
                 "--threads", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["concurrent"] == 2 and d["threads"] == 1 and d["alone_ms"] > 0 and len(d["copies_ms"]) == 2
    assert all(x > 0 for x in d["slowdown"])
    assert "copy 2 of 2 at once" in capsys.readouterr().out
