"""dip bench speed runs end to end on the CPU and reports every configuration it measured."""
import json

from pipeline.bench import conv_flops
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
