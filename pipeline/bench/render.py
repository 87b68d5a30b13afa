"""The render benchmark: one render of a generator in torch eager against its ONNX file in onnxruntime.

    python -m pipeline.bench.render --size 256 [--preset denoise] [--threads 1] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def bench_render(size: int = 256, preset: str = "denoise", channels: int = 3, repeats: int = 5,
                 device: str = "auto", seed: int = 0, threads: int = 0, out: str | None = None) -> dict:
    """Time one render of a (randomly initialised) generator: torch eager vs onnxruntime.

    torch eager runs the training-mode-BN SkipGenerator on ``device`` (CUDA when present); onnxruntime
    renders the exported file with the best provider that works (``render.make_session``). Also reports
    the fp32 and fp16 file sizes. ``threads``: torch and onnxruntime CPU threads (0: each one's default). For the GPU machine: ``python -m pipeline.bench.render --size 512``.
    """
    from types import SimpleNamespace

    from pipeline.onnx.export import to_onnx_model
    from pipeline.onnx.render import make_session
    from pipeline.problem import Problem
    from pipeline.config import make_config
    from pipeline.generator import SkipGenerator, build_specs, init_slot_vector, make_input
    from pipeline.io import ImageData

    if threads:
        torch.set_num_threads(threads)
    task = "denoise"
    cfg = make_config(task, preset=preset)
    net = cfg.net.with_channels(channels)
    specs = build_specs(net, 1)
    w = init_slot_vector(specs, seed)
    z = make_input(cfg.input_kind, net.input_depth, size, size, seed, cfg.input_scale)
    p = Problem(image=ImageData(np.zeros((size, size, channels), np.float32), None, 8), cfg=cfg, seed=seed)
    res = SimpleNamespace(problem=p, weights=w, z=z, image=p.image, steps=0)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    G = SkipGenerator(net, 1, dev)
    G.set_slot(0, w)
    zz = z.unsqueeze(0).to(dev)
    info: dict = {"size": size, "preset": preset, "params": int(w.numel()), "torch_device": str(dev),
                  "torch_threads": torch.get_num_threads()}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch.no_grad():
        G(zz)
        sync()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            G(zz)
            sync()
            ts.append(time.perf_counter() - t)
    info["torch_eager_s"] = min(ts)
    for dt in ("fp32", "fp16"):
        t = time.perf_counter()
        model = to_onnx_model(res, dtype=dt)
        info[f"export_{dt}_s"] = time.perf_counter() - t
        data = model.SerializeToString()
        info[f"onnx_{dt}_bytes"] = len(data)
        t = time.perf_counter()
        sess, prov = make_session(data, "auto", threads=threads)
        info[f"ort_{dt}_session_s"] = time.perf_counter() - t
        sess.run(None, {})
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            sess.run(None, {})
            ts.append(time.perf_counter() - t)
        info[f"ort_{dt}_run_s"] = min(ts)
        info[f"ort_{dt}_provider"] = prov
    if out:
        Path(out).write_text(json.dumps(info, indent=1))
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.render", description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--preset", default="denoise")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    info = bench_render(a.size, a.preset, repeats=a.repeats, device=a.device, threads=a.threads, out=a.json)
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
