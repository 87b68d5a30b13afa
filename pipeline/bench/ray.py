"""The Ray bench: images per hour through `dip restore`'s Ray actors against the bare engine, same images.

    python -m pipeline.bench.ray --bench 32 [--size 256] [--steps 300] [--slots N] [--device cuda]
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from pipeline.job.manifest import MANIFEST_NAME


def bench_main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.bench.ray --bench N``: images/hour through the Ray actors vs fit_problems directly.

    Makes N synthetic noisy images (``--size``, default 64 on CPU / 256 on CUDA), fits them with
    ``fit_problems`` in this process, then with ``dip restore`` on an embedded Ray instance (one actor per
    GPU, or CPU actors), and prints both rates as JSON (``--json PATH`` writes it too).
    """
    import argparse
    import shutil
    import numpy as np
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.ray")
    ap.add_argument("--bench", type=int, required=True, metavar="N")
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--preset")
    ap.add_argument("--slots", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    from pipeline.api import fit_problems, make_problem
    from pipeline.engine import pick_device
    from pipeline.io import ImageData, save_image
    from pipeline.job import JobOptions, run_job
    dev = pick_device(a.device)
    size = a.size or (256 if dev.type == "cuda" else 64)
    steps = a.steps or (300 if dev.type == "cuda" else 20)
    root = Path(tempfile.mkdtemp(prefix="dip-bench-"))
    try:
        rng = np.random.default_rng(0)
        for i in range(a.bench):
            px = np.clip(rng.random((size, size, 3)) * 0.3 + 0.35 + rng.normal(0, 0.1, (size, size, 3)), 0, 1)
            save_image(root / "in" / f"img{i:04d}.png", ImageData(px.astype(np.float32), None, 8))
        opts = JobOptions(inputs=[str(root / "in")], out=str(root / "direct"), quiet=True, export_onnx=False,
                          steps=steps, device=a.device, preset=a.preset, slots=a.slots)
        cfg = opts.config_for(dev.type)
        probs = [make_problem(str(f), cfg=cfg, seed=0) for f in sorted((root / "in").glob("*.png"))]
        for _ in fit_problems([make_problem(str(root / "in" / "img0000.png"), cfg=cfg.replace(steps=2))], device=dev):
            pass  # warm-up (threads, cuDNN autotuning), as the actors' first batch also pays it
        t = time.perf_counter()
        n = sum(1 for _p, r in fit_problems(probs, device=dev, slots=a.slots) if not isinstance(r, Exception))
        direct = time.perf_counter() - t
        t = time.perf_counter()
        rc = run_job(opts.replace(out=str(root / "ray")))
        via_ray = time.perf_counter() - t
        runs = json.loads((root / "ray" / MANIFEST_NAME).read_text())["runs"]
        after = runs[-1].get("seconds_after_startup") or via_ray
        res = {"images": a.bench, "size": size, "steps": steps, "preset": cfg.preset, "device": str(dev),
               "direct_s": round(direct, 2), "direct_img_per_h": round(n / direct * 3600, 1),
               "ray_s_incl_startup": round(via_ray, 2), "ray_s_after_startup": round(after, 2),
               "ray_img_per_h": round(a.bench / after * 3600, 1),
               "ray_img_per_h_incl_startup": round(a.bench / via_ray * 3600, 1),
               "ray_rc": rc, "ratio_after_startup": round(direct / after, 3),
               "ray_batch_occupancy": runs[-1].get("batch_occupancy")}
        print(json.dumps(res, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return 0 if rc == 0 else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(bench_main())
