"""A fixed against an elastic batch on a draining queue: one long fit and many short ones.

    python tools/elastic_bench.py --device cpu --size 48 --slots 4 --images 8 --long 400 --short 40
    python tools/elastic_bench.py --device cuda --size 256 --slots 16 --images 16 --long 600 --short 60

A fixed batch keeps computing its empty slots while the long fit runs on alone; an elastic one
(fit_problems' default) shrinks to the fits still loaded. Both runs fit the same problems; each is
timed twice, alternating, after a warm-up. Prints one line per run and the medians; --json writes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/elastic_bench.py")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--long", type=int, default=400)
    ap.add_argument("--short", type=int, default=40)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from pipeline.api import fit_problems, make_problem
    from pipeline.engine import pick_device
    dev = pick_device(a.device)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:a.size, 0:a.size] / a.size
    imgs = [np.clip(np.stack([0.5 + 0.3 * np.sin((5 + i) * x + k) * np.cos(4 * y) for k in range(3)], -1)
                    + rng.normal(0, 0.1, (a.size, a.size, 3)), 0, 1).astype(np.float32) for i in range(a.images)]

    def problems():
        return [make_problem(im, preset=a.preset, steps=a.long if i == 0 else a.short, seed=i, name=f"p{i}")
                for i, im in enumerate(imgs)]

    for _ in fit_problems(problems()[:2], device=dev, slots=2):  # warm-up (threads, cuDNN autotuning)
        pass
    times: dict[str, list[float]] = {"fixed": [], "elastic": []}
    for _ in range(a.repeats):
        for name in ("fixed", "elastic"):
            if dev.type == "cuda":
                import torch
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = [r for _p, r in fit_problems(problems(), device=dev, slots=a.slots, elastic=name == "elastic")]
            times[name].append(time.perf_counter() - t)
            occ = statistics.fmean(r.extra["batch"]["occupancy"] for r in out)
            print(f"{name:8s} {times[name][-1]:7.2f} s  mean batch occupancy {occ:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"device": str(dev), "size": a.size, "slots": a.slots, "images": a.images, "long": a.long,
           "short": a.short, "preset": a.preset, "seconds": times, "median_s": med,
           "elastic_over_fixed": round(med["elastic"] / med["fixed"], 3)}
    print(f"elastic/fixed {res['elastic_over_fixed']:.2f} (medians {med['elastic']:.2f} / {med['fixed']:.2f} s, "
          f"{a.images} images {a.size}², {a.slots} slots, {str(dev)})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
