"""PSNR of the three result kinds (`output` = ema | weights_ema | last) on denoising crops.

The three kinds differ only in what is read out of the same optimisation (the fit itself does not depend
on ``output``), so by default every image is fitted once and all three images are taken from that one
trajectory: "ema" = exponential average of the outputs (the paper's), "weights_ema" = the generator with
exponentially averaged weights at z (what the ONNX export renders), "last" = the last generator at z.
``--separate`` instead calls ``pipeline.api.restore(..., output=kind, reference=...)`` three times per image
and reports ``result.metrics['psnr']`` (3x the time; the numbers are identical).

    python tools/measure_output_modes.py                     # F16 + peppers, 128x128 crops, fast, 600 steps
    python tools/measure_output_modes.py --steps 3000 --preset denoise --size 512 --device cuda
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def crop(a: np.ndarray, size: int) -> np.ndarray:
    h, w = a.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(a[y:y + size, x:x + size])


def cases(size: int, sigma: float, seed: int):
    from pipeline.io import load_image
    gt = crop(load_image(DATA / "dip-repo" / "denoising" / "F16_GT.png").pixels, size)
    rng = np.random.RandomState(seed)
    noisy = np.clip(gt + rng.normal(0, sigma, gt.shape), 0, 1).astype(np.float32)
    yield "F16 (synthetic sigma=25)", noisy, gt
    d = DATA / "paper" / "denoise-color-s25"
    yield "peppers (paper's noisy)", crop(load_image(d / "peppers_noisy.png").pixels, size), \
        crop(load_image(d / "peppers_GT.png").pixels, size)


def one_fit(noisy, gt, preset, steps, seed, device):
    """All three result kinds from one fit. Returns {kind: psnr}."""
    import torch
    from pipeline.problem import make_problem, metrics, to_fit_item
    from pipeline.engine import BatchedFitter, pick_device
    from pipeline.io import ImageData
    p = make_problem(noisy, task="denoise", preset=preset, steps=steps, seed=seed, reference=gt, output="ema")
    dev = pick_device(device)
    fit = BatchedFitter(p.cfg, p.canvas, p.image.channels, 1, dev)
    fit.load(0, to_fit_item(p))
    G, ema = fit.G, p.cfg.ema
    w_ema = G.flat.detach().clone()
    for t in range(1, steps + 1):
        fit.step()
        with torch.no_grad():  # the engine's weights_ema update, per slot from its first step
            w = 0.0 if t <= 1 else ema
            w_ema.mul_(w).add_(G.flat * (1 - w))
    H, W = p.out_shape
    with torch.no_grad():
        imgs = {"ema": fit.out_ema[0], "weights_ema": G(fit.z, weights=w_ema)[0], "last": G(fit.z)[0]}
    out = {}
    for k, v in imgs.items():
        px = np.clip(v.float().cpu().numpy()[:, :H, :W].transpose(1, 2, 0), 0, 1)
        out[k] = metrics(ImageData(px, None, 8), p.reference)["psnr"]
    return out


def separate(noisy, gt, preset, steps, seed, device):
    from pipeline.api import restore
    return {k: restore(noisy, preset=preset, steps=steps, seed=seed, device=device, output=k,
                       reference=gt).metrics["psnr"] for k in ("ema", "weights_ema", "last")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--seed", type=int, default=0, help="fit seed (the noise uses numpy seed 0)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--separate", action="store_true", help="three api.restore calls per image")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for name, noisy, gt in cases(a.size, 25 / 255, 0):
        from pipeline.api import metrics
        from pipeline.io import ImageData
        t = time.time()
        r = (separate if a.separate else one_fit)(noisy, gt, a.preset, a.steps, a.seed, a.device)
        r["noisy"] = metrics(ImageData(noisy, None, 8), ImageData(gt, None, 8))["psnr"]
        r.update(image=name, seconds=round(time.time() - t, 1))
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n| image | noisy | ema (output average) | weights_ema (default, = ONNX) | last |  "
          f"({a.size}x{a.size}, preset {a.preset}, {a.steps} steps, seed {a.seed})")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['image']} | {r['noisy']:.2f} | {r['ema']:.2f} | {r['weights_ema']:.2f} | {r['last']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
