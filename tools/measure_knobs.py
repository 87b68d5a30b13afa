"""Issue 7's quality knobs on the denoising crops: an ensemble of two fits, the input noise level, and
the upsampling mode, each against the preset as it is, on the same crops and with the same auto-stop.

Every variant is one `dip bench quality` run (`pipeline.bench.quality.run_suite`) with a config override
or another seed; the ensemble is the mean of the seed-0 and seed-1 result images (each at its own
auto-stopped step), which is what fitting an image twice and averaging would give; its "oracle" is the
mean of the two fits' best checked images. Results are written
to --json after every variant, so an interrupted run keeps what it measured.

    python tools/measure_knobs.py --crop 64 --max-steps 1200 --only F16,kodim03,lena,baboon --json k.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (seed, config overrides); "base" is the preset as shipped (the paper's denoising settings)
VARIANTS = {
    "base": (0, {}),
    "seed1": (1, {}),
    "noise0": (0, {"reg_noise_std": 0.0}),
    "nearest": (0, {"net": {"upsample": "nearest"}}),
    "noise2x": (0, {"reg_noise_std": 1.0 / 15.0}),
}


def main(argv=None) -> int:
    from pipeline.bench.quality import _ref_tensor, load_cases, paper_dir, psnr, run_suite
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=1200)
    ap.add_argument("--only", default="F16,kodim03,lena,baboon")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--slots", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    names = [n for n in a.variants.split(",") if n]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    cases = load_cases("denoise", paper_dir(a.data), crop=a.crop, only=a.only.split(","))
    out = {"command": " ".join(sys.argv), "crop": a.crop, "max_steps": a.max_steps, "device": a.device,
           "date": time.strftime("%Y-%m-%d"), "variants": {}, "ensemble": None}
    imgs: dict[str, dict] = {}
    for v in names:
        seed, over = VARIANTS[v]
        imgs[v] = {}
        t0 = time.perf_counter()
        res = run_suite("denoise", cases, device=a.device, max_steps=a.max_steps, slots=a.slots, seed=seed,
                        overrides=over, images=imgs[v])
        rows = {r["name"]: {k: r.get(k) for k in ("auto_psnr", "auto_step", "auto_from", "oracle_psnr",
                                                   "oracle_step", "final_psnr")} for r in res["images"]}
        for c in cases:  # the kept auto image must score what the bench scored
            got = imgs[v].get(c.name, {}).get("auto")
            want = rows.get(c.name, {}).get("auto_psnr")
            if got is not None and want is not None:
                mine = psnr(torch.from_numpy(np.ascontiguousarray(got)).permute(2, 0, 1), _ref_tensor(c.reference))
                if abs(mine - want) > 0.01:
                    print(f"WARNING {v}/{c.name}: kept auto image scores {mine:.4f}, the bench {want:.4f}")
        out["variants"][v] = {"seed": seed, "overrides": over, "seconds": round(time.perf_counter() - t0, 1),
                              "images": rows, "mean": res["mean"]}
        print(f"{v:8s} auto {res['mean'].get('auto_psnr')}  oracle {res['mean'].get('oracle_psnr')}  "
              f"({out['variants'][v]['seconds']} s)", flush=True)
        if "base" in imgs and "seed1" in imgs and imgs["seed1"] and out["ensemble"] is None:
            ens: dict = {"auto": {}, "oracle": {}}
            for c in cases:
                if c.name in imgs["base"] and c.name in imgs["seed1"]:
                    for k in ens:  # each fit at its own auto-stopped (or best checked) step
                        m = (imgs["base"][c.name][k] + imgs["seed1"][c.name][k]) / 2
                        ens[k][c.name] = round(psnr(torch.from_numpy(np.ascontiguousarray(m)).permute(2, 0, 1),
                                                    _ref_tensor(c.reference)), 4)
            out["ensemble"] = {"images": ens["auto"], "mean": round(float(np.mean(list(ens["auto"].values()))), 4),
                               "oracle_images": ens["oracle"],
                               "oracle_mean": round(float(np.mean(list(ens["oracle"].values()))), 4)}
            print(f"ensemble (base + seed1): auto {out['ensemble']['mean']}  oracle {out['ensemble']['oracle_mean']}",
                  flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))
    # the table: auto-stopped PSNR per crop and variant
    cols = list(out["variants"]) + (["ensemble"] if out["ensemble"] else [])
    print("crop      " + "".join(f"{c:>10s}" for c in cols))
    for c in cases:
        vals = [out["variants"][v]["images"].get(c.name, {}).get("auto_psnr") for v in out["variants"]]
        if out["ensemble"]:
            vals.append(out["ensemble"]["images"].get(c.name))
        print(f"{c.name:10s}" + "".join(f"{x:10.2f}" if x is not None else f"{'-':>10s}" for x in vals))
    means = [out["variants"][v]["mean"].get("auto_psnr") for v in out["variants"]]
    if out["ensemble"]:
        means.append(out["ensemble"]["mean"])
    print(f"{'mean':10s}" + "".join(f"{x:10.2f}" if x is not None else f"{'-':>10s}" for x in means))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
