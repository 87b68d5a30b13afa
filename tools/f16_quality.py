"""F16 at sigma=25 with the engine: PSNR of the result against the clean image every 100 steps.

    python tools/f16_quality.py --image PATH/F16_GT.png --seeds 0,1 --precision tf32 --json OUT.json

The noise is drawn with numpy's default_rng(0) (shared with the side-by-side run of the original code).
The seeds are fitted together in one batch. With ``--output ema`` (the default) the trace is the output
average and the final PSNR is the saved image: the generator distilled onto that average (what the .onnx
renders); ``--distill-steps 0`` saves the average itself.
"""
import argparse
import json
import time

import numpy as np
from PIL import Image


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--precision", default="tf32")
    ap.add_argument("--output", default="ema")
    ap.add_argument("--distill-steps", type=int, default=None, help="default: the config's")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json")
    a = ap.parse_args()
    from pipeline.api import make_problem, fit_problems
    gt = np.asarray(Image.open(a.image).convert("RGB"), dtype=np.float32) / 255
    noisy = np.clip(gt + np.random.default_rng(0).normal(0, 25 / 255, gt.shape), 0, 1).astype(np.float32)
    probs = [make_problem(noisy, "denoise", reference=gt, seed=int(s), steps=a.steps, precision=a.precision,
                          output=a.output, distill_steps=a.distill_steps, name=f"F16-seed{s}") for s in a.seeds.split(",")]
    t0 = time.time()
    rows = []
    for p, r in fit_problems(probs, device=a.device, slots=len(probs), trace_every=100):
        if isinstance(r, Exception):
            raise r
        tr = r.extra.get("psnr_trace", [])
        best = max(tr, key=lambda x: x[1]) if tr else None
        rows.append({"seed": p.seed, "precision": a.precision, "output": a.output, "final_psnr": r.metrics["psnr"],
                     "best_step": best[0] if best else None, "best_psnr": best[1] if best else None,
                     "fit_seconds": round(r.seconds, 1), "ms_per_step_batch": round(1e3 * r.seconds / r.steps, 2),
                     "slots": len(probs), "distill": r.extra.get("distill"), "trace": tr})
    wall = time.time() - t0
    for row in rows:
        print(f"F16 seed {row['seed']} {row['precision']} {row['output']}: final {row['final_psnr']:.2f} dB, "
              f"best {row['best_psnr']} dB at step {row['best_step']}, {row['ms_per_step_batch']} ms/step "
              f"for the batch of {row['slots']}"
              + (f"; distilled {row['distill']['steps']} steps onto the average (last traced "
                 f"{tr[-1][1] if (tr := row['trace']) else '-'} dB)" if row["distill"] else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "wall_s": wall}, f, indent=1)


if __name__ == "__main__":
    main()
