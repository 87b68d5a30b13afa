"""Result designs that one ONNX file can re-render exactly, against the output average, from one fit.

DIP's best result is the running average of the outputs (``output=ema``), which no single generator
reproduces. This measures, on the same trajectory, the designs a re-renderable file could hold:

  ema        the output average (the reference; not re-renderable)
  last       the last generator at the fixed z
  w_ema      the generator with averaged weights at z
  snapK@S    the mean of the last K generators, taken every S steps, each at the fixed z
             (an ONNX file would hold K generators)
  ema_at_target  with --target-step T: the output average at step T (what auto-stop would return)
  distillN@M the last generator, fitted N more steps (Adam, fixed z, no input noise) to the output
             average (of the last step, or of step T) as its target, with the engine itself (one generator;
             exact to re-render);
             M is the learning rate, "warm" = carrying on with the main fit's Adam state

Each row is one image; the fit runs once, the designs are read from it (rendering at z never changes
the fit). The distillation runs after the main fit, from a copy of its last weights.

    python tools/measure_exact_output.py                      # F16 + peppers 128² crops, fast preset
    python tools/measure_exact_output.py --preset denoise --steps 2400 --images F16
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def psnr(img, gt) -> float:
    """PSNR (dB) of a (C, H, W) float image, quantised to 8 bits as saved, against (H, W, C) gt."""
    a = np.round(np.clip(img.transpose(1, 2, 0), 0, 1) * 255) / 255
    return float(-10 * np.log10(np.mean((a - gt) ** 2)))


def run_one(noisy, gt, a):
    import torch
    from pipeline.problem import make_problem, to_fit_item
    from pipeline.engine import BatchedFitter, FitItem, pick_device
    p = make_problem(noisy, task="denoise", preset=a.preset, steps=a.steps, seed=a.seed, output="ema")
    dev = pick_device(a.device)
    fit = BatchedFitter(p.cfg, p.canvas, p.image.channels, 1, dev)
    fit.load(0, to_fit_item(p))
    H, W = p.out_shape
    G = fit.G
    crop = (slice(None), slice(0, H), slice(0, W))
    w_ema = G.flat.detach().clone()
    snaps: list[tuple[int, np.ndarray]] = []  # (step, G_t(z)) every min(spacings) steps
    base = min(a.spacings)
    trace = []
    target_img = None
    for t in range(1, a.steps + 1):
        fit.step()
        with torch.no_grad():
            w = 0.0 if t <= 1 else p.cfg.ema
            w_ema.mul_(w).add_(G.flat * (1 - w))
            if t % base == 0:
                snaps.append((t, G(fit.z)[0].float().cpu().numpy()[crop]))
        if t == a.target_step:
            target_img = fit.out_ema[0].detach().cpu().numpy().copy()
        if t % a.trace_every == 0 or t == a.steps:
            row = {"step": t, "ema": psnr(fit.out_ema[0].cpu().numpy()[crop], gt)}
            for S in a.spacings:
                pool = [im for (st, im) in snaps if st % S == 0]
                for K in a.ks:
                    if len(pool) >= K:
                        row[f"snap{K}@{S}"] = psnr(np.mean(pool[-K:], 0), gt)
            trace.append(row)
            print(json.dumps(row), flush=True)
    with torch.no_grad():
        out = {"ema": psnr(fit.out_ema[0].cpu().numpy()[crop], gt),
               "last": psnr(G(fit.z)[0].cpu().numpy()[crop], gt),
               "w_ema": psnr(G(fit.z, weights=w_ema)[0].cpu().numpy()[crop], gt)}
    out.update({k: v for k, v in trace[-1].items() if k.startswith("snap")})
    # distillation: the engine fits the last generator to the output average (fixed z, no noise); with
    # --target-step, to the average as it was at that step (what auto-stop returns: the generator has
    # gone on fitting the noise since)
    ema_img = fit.out_ema[0].detach().cpu().numpy() if target_img is None else target_img
    if target_img is not None:
        out["ema_at_target"] = psnr(target_img[crop], gt)
    last_w = G.get_slot(0).clone()
    for mode in a.distill_modes:
        warm = mode.startswith("warm")
        lr = float(mode[4:] if warm else mode)
        cfg = p.cfg.replace(reg_noise_std=0.0, lr=lr, steps=max(a.distill), output="last")
        d = BatchedFitter(cfg, p.canvas, p.image.channels, 1, dev)
        item = FitItem("distill", ema_img, np.ones((1,) + ema_img.shape[1:], np.float32), seed=a.seed)
        d.load(0, item)
        d.z.copy_(fit.z)
        d.G.set_slot(0, last_w)
        d.good.copy_(d.G.flat)
        if warm:  # carry on with the main fit's Adam state
            d.m.copy_(fit.m)
            d.v.copy_(fit.v)
            d.t.copy_(fit.t)
        for n in range(1, max(a.distill) + 1):
            d.step()
            if n in a.distill:
                with torch.no_grad():
                    r = d.G(d.z)[0].cpu().numpy()
                out[f"distill{n}@{mode}"] = psnr(r[crop], gt)
                out[f"distill{n}@{mode}_vs_ema"] = psnr(r[crop], ema_img[crop].transpose(1, 2, 0))
    return out, trace


def main(argv=None) -> int:
    from measure_output_modes import cases
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", default="F16,peppers", help="comma list among F16, peppers")
    ap.add_argument("--ks", default="4,8,16", help="snapshot counts K")
    ap.add_argument("--spacings", default="10,25,50", help="snapshot spacings S (steps)")
    ap.add_argument("--distill", default="25,50,100,200", help="distillation step counts")
    ap.add_argument("--distill-modes", default="warm0.01,warm0.001,0.0001",
                    help="learning rates of the distillation; 'warm' carries the main fit's Adam state over")
    ap.add_argument("--trace-every", type=int, default=100)
    ap.add_argument("--target-step", type=int, default=0,
                    help="distil onto the output average of this step instead of the last (as auto-stop does)")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    a.ks = [int(x) for x in a.ks.split(",")]
    a.spacings = [int(x) for x in a.spacings.split(",")]
    a.distill = [int(x) for x in a.distill.split(",")]
    a.distill_modes = a.distill_modes.split(",")
    want = a.images.split(",")
    rows = []
    for name, noisy, gt in cases(a.size, 25 / 255, 0):
        if name.split()[0] not in want:
            continue
        t = time.time()
        out, trace = run_one(noisy, gt, a)
        out.update(image=name, seconds=round(time.time() - t, 1))
        rows.append({"final": out, "trace": trace})
        print(json.dumps(out), flush=True)
    keys = [k for k in rows[0]["final"] if k not in ("image", "seconds") and not k.endswith("_vs_ema")]
    print(f"\n({a.size}x{a.size}, preset {a.preset}, {a.steps} steps, seed {a.seed}; PSNR dB at the last step)")
    print("| design | " + " | ".join(r["final"]["image"] for r in rows) + " | mean - ema |")
    print("|---|" + "---|" * (len(rows) + 1))
    for k in keys:
        vals = [r["final"][k] for r in rows]
        gap = np.mean([r["final"][k] - r["final"]["ema"] for r in rows])
        print(f"| {k} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {gap:+.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
