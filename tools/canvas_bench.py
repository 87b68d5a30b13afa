"""Mixed sizes in one job: which canvas policy keeps the device busier (issue 3).

    python tools/canvas_bench.py --device cpu --images 12 --min 40 --max 72 --slots 4 --steps 60
    python tools/canvas_bench.py --device cuda --images 48 --min 192 --max 320 --steps 200

The same problems (sides drawn at random between --min and --max, seeded) are fitted under each policy
of `fit_problems(canvas_policy=...)`:
  bucket  each canvas (sides rounded up to a multiple of 2**scales) is its own batch: no wasted pixels,
          but an archive of many sizes makes many small batches;
  ladder  sides rounded up to a coarser ladder (rungs at most 25 % apart): fewer, fuller batches, some
          padded pixels (masked out of the data term);
  common  every image on the largest canvas: one batch, the most padding.
Each policy is timed --repeats times, alternating, after a warm-up. Prints per run the time, images/hour,
the number of batches (distinct canvases), the mean batch occupancy and the computed pixels per image
pixel; then the medians. --json writes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/canvas_bench.py")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--min", type=int, default=40, help="shortest side drawn")
    ap.add_argument("--max", type=int, default=72, help="longest side drawn")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--slots", type=int, default=None, help="batch size (default: automatic)")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--policies", default="bucket,ladder,common")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from pipeline.api import fit_problems, make_problem
    from pipeline.engine import pick_device
    dev = pick_device(a.device)
    rng = np.random.default_rng(a.seed)
    sizes = [tuple(int(v) for v in rng.integers(a.min, a.max + 1, 2)) for _ in range(a.images)]
    imgs = []
    for i, (h, w) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([0.5 + 0.3 * np.sin((5 + i % 7) * x + k) * np.cos(4 * y) for k in range(3)], -1)
        imgs.append(np.clip(base + rng.normal(0, 0.1, base.shape), 0, 1).astype(np.float32))
    policies = a.policies.split(",")

    def problems():
        return [make_problem(im, preset=a.preset, steps=a.steps, seed=i, name=f"p{i}") for i, im in enumerate(imgs)]

    for _ in fit_problems(problems()[:2], device=dev, slots=2):  # warm-up (threads, cuDNN autotuning)
        pass
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    for _ in range(a.repeats):
        for pol in policies:
            if dev.type == "cuda":
                import torch
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = [r for _p, r in fit_problems(problems(), device=dev, slots=a.slots, canvas_policy=pol)]
            sec = time.perf_counter() - t
            bad = [r for r in out if isinstance(r, Exception)]
            if bad:
                raise SystemExit(f"{pol}: {len(bad)} fits failed: {bad[0]}")
            canv = [tuple(r.extra["batch"]["canvas"]) for r in out]
            run = {"seconds": round(sec, 3), "images_per_hour": round(3600 * len(out) / sec, 1),
                   "batches": len(set(canv)),
                   "occupancy": round(statistics.fmean(r.extra["batch"]["occupancy"] for r in out), 3),
                   "slots": max(r.extra["batch"]["slots"] for r in out),
                   "pixels_per_image_pixel": round(sum(h * w for h, w in canv)
                                                   / sum(r.image.shape[0] * r.image.shape[1] for r in out), 3)}
            runs[pol].append(run)
            print(f"{pol:7s} {sec:8.2f} s  {run['images_per_hour']:9.1f} images/h  {run['batches']:3d} batches  "
                  f"occupancy {run['occupancy']:.2f}  pixels/image pixel {run['pixels_per_image_pixel']:.2f}",
                  flush=True)
    med = {p: statistics.median(r["seconds"] for r in v) for p, v in runs.items()}
    base = med[policies[0]]
    res = {"device": str(dev), "images": a.images, "sides": [a.min, a.max], "steps": a.steps, "slots": a.slots,
           "preset": a.preset, "sizes": sizes, "runs": runs, "median_s": med,
           "over_" + policies[0]: {p: round(m / base, 3) for p, m in med.items()}}
    print("canvas " + "  ".join(f"{p} {m:.2f} s ({m / base:.2f}x)" for p, m in med.items())
          + f"  [{a.images} images {a.min}-{a.max} px, {a.steps} steps, {str(dev)}]")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
