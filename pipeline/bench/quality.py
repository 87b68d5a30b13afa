"""`dip bench quality`: PSNR on the paper's benchmark sets, with and without ground-truth stopping.

For every image of a suite one fit runs to the preset's step cap, and three results are read off it:

- auto:   what ES-WMV early stopping (pipeline.stopping, no ground truth) would have returned: the image
          at its VAR minimum, taken at the check where the rule fires (the final image if it never does);
- oracle: the best image over all checks (every ``check_every`` steps) by the suite's own metric, i.e.
          the step a ground-truth oracle would pick;
- final:  the image after the preset's full schedule (what a fixed step count gives).

These come next to the paper's DIP number and the classical baseline the data README lists (CBM3D for
denoising, CSC for inpainting; bicubic on our own low-res input for SR). One fit per image gives all
three, because the trajectory of a slot does not depend on when it would have stopped.

Protocols (../shared/data/README.md):

- denoise: ``*_noisy.png`` (the authors' own sigma=25 draw) against ``*_GT.png``, RGB, whole image;
  preset ``denoise``.
- sr: Set5, the ground truth cropped to a multiple of 4, reduced 4x with PIL LANCZOS (antialiased, as
  the original does); PSNR on Y (ITU-R BT.601 as MATLAB's rgb2ycbcr) with a 4-pixel border cropped;
  also bicubic (PIL BICUBIC) upscaling of the same input; preset ``sr4``.
- inpaint: ``*_masked.png`` with 50% of the pixels set to 0, grey, whole image; preset ``inpaint-sparse``.
  The set ships no masks: the mask is ``masked != 0``. A pixel whose true value is 0 is then treated as
  missing too; that only removes measurements (it never feeds a wrong one), and it is rare (montage:
  0.4% of its pixels are 0 in the ground truth, the other images have none).

All PSNRs are on the output quantised to 8 bits, as it would be saved.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.cases import (BASELINE_NAME, FAST_CROP, FAST_IMAGES, FAST_STEPS, PAPER, SR_BORDER,  # noqa: F401
                                  SR_SCALE, SUITE_PRESETS, SUITE_TASKS, SUITES, Case, _ref_tensor, load_cases,
                                  paper_dir, psnr)
from pipeline.bench.oracle import (DISCREPANCY, DISCREPANCY_SMOOTH, PRINTED_VARIANTS, VARIANTS, EvalStopper,  # noqa: F401
                                   eval_factory, replay_discrepancy, replay_variants, variant_key)

log = logging.getLogger("dip.bench")


# ---- running a suite ------------------------------------------------------------------------------------
def run_suite(suite: str, cases: list[Case], device="auto", fast: bool = False, max_steps: int | None = None,
              slots: int | None = None, seed: int = 0, check_every: int = 50,
              overrides: dict | None = None, images: dict | None = None, preset: str | None = None,
              stop_overrides: dict | None = None, stop_margin: int | None = None) -> dict:
    """Fit every case once and score it. ``overrides``: config fields for every problem (e.g.
    ``{"reg_noise_std": 0.0}`` or ``{"net": {"upsample": "nearest"}}``); ``images``: a dict that receives
    each case's images, name -> {"auto": the auto-stopped image, "oracle": the best-scoring checked one,
    "final": the last}, each (H, W, C) float32, for scores computed outside (ensembles). ``preset``:
    another preset than the suite's paper one; ``stop_overrides``: StopConfig fields for the rule;
    ``stop_margin``: end each fit this many steps after its rule fired instead of at the cap (the oracle
    is then the best image up to there)."""
    from pipeline.api import fit_problems
    from pipeline.stopping import stop_config_for
    preset = preset or ("fast" if fast else SUITE_PRESETS[suite])
    problems = _problems(suite, cases, preset, fast, max_steps, seed, overrides)
    cfg = problems[0].cfg
    if check_every != 50:
        log.warning("the engine checks every 50 steps through fit_problems; check_every=%d ignored", check_every)
        check_every = 50
    stop_cfg = stop_config_for(cfg, check_every=check_every, **(stop_overrides or {}))
    if fast:  # a handful of checks: only exercise the machinery
        stop_cfg = stop_cfg.replace(window=2, patience=1, min_steps=0)
    factory = eval_factory(stop_cfg, SR_BORDER if suite == "sr" else None, keep_images=images is not None,
                           margin=stop_margin)
    rows: list[dict | None] = [None] * len(problems)
    t0 = time.perf_counter()
    # trace_every: the engine hands the references to the fit items (and so to the stoppers) only with a
    # trace, which also gives the RGB psnr_trace of every image, for one extra render per check.
    for p, r in fit_problems(problems, device=device, slots=slots, stopper_factory=factory,
                             trace_every=check_every):
        i = p.meta["bench_index"]
        c = cases[i]
        if isinstance(r, Exception):
            log.error("%s/%s failed: %s", suite, c.name, r)
            rows[i] = {"name": c.name, "error": str(r)}
            continue
        rows[i] = _row(suite, c, r, stop_cfg, fast, images)
        log.info("%s/%s: auto %.2f (step %s) oracle %s (step %s) final %.2f", suite, c.name, rows[i]["auto_psnr"],
                 rows[i]["auto_step"], rows[i]["oracle_psnr"], rows[i]["oracle_step"], rows[i]["final_psnr"])
    rows = [r for r in rows if r is not None]
    ok = [r for r in rows if "error" not in r]
    return {
        "suite": suite, "preset": preset, "variants": _variant_means(ok), "discrepancy": _discrepancy_means(ok),
        "task": SUITE_TASKS[suite], "steps": cfg.steps, "check_every": check_every,
        "stop_config": stop_cfg.to_dict(), "metric": "Y, 4px border" if suite == "sr" else "whole image",
        "images": rows, "mean": _means(suite, ok), "seconds": round(time.perf_counter() - t0, 2),
        "failed": len(rows) - len(ok),
    }


def _problems(suite, cases, preset, fast, max_steps, seed, overrides) -> list:
    """One problem per case, with the suite's task (and scale), the preset and the overrides."""
    from pipeline.api import make_problem
    steps = FAST_STEPS if fast else None
    if max_steps:
        steps = min(max_steps, steps or 10 ** 9)
    problems = []
    for i, c in enumerate(cases):
        kw = dict(task=SUITE_TASKS[suite], preset=preset, seed=seed, name=c.name, reference=c.reference, mask=c.mask)
        if suite == "sr":
            kw["scale"] = SR_SCALE
        if steps is not None:
            kw["steps"] = steps
        kw.update(overrides or {})
        p = make_problem(c.image, **kw)
        p.meta["bench_index"] = i
        problems.append(p)
    return problems


def _row(suite: str, c: Case, r, stop_cfg, fast: bool, images: dict | None) -> dict:
    """One case's row: auto-stop, oracle and final PSNR, the traces, and the replays of other rules."""
    from pipeline.stopping import estimate_sigma
    y_border = SR_BORDER if suite == "sr" else None
    ev = r.extra.get("stopping", {})
    kept = ev.pop("_images", {})
    if images is not None:
        H, W = r.image.pixels.shape[:2]
        images[c.name] = {"final": r.image.pixels, **{k: v[:, :H, :W].permute(1, 2, 0).numpy() for k, v in kept.items()}}
        images[c.name].setdefault("auto", r.image.pixels)  # the rule never fired and had no fallback
    final = psnr(torch.from_numpy(r.image.pixels).permute(2, 0, 1), _ref_tensor(c.reference), y_border)
    fired = bool(ev.get("fired"))
    auto = ev.get("auto") or {}
    chose = fired or auto.get("from") == "discrepancy"  # the rule's image, or its fallback at the cap
    dip_paper, base_paper = PAPER[suite].get(c.name, (None, None))
    row = {
        "name": c.name,
        "size": list(c.reference.shape[:2][::-1]),
        "steps": r.steps,
        "seconds": round(r.seconds, 2),
        "auto_psnr": round(auto["psnr"], 4) if chose and auto.get("psnr") is not None else round(final, 4),
        "auto_step": auto.get("step") if chose else r.steps,
        "auto_stopped_at": auto.get("stopped_at") if fired else r.steps,
        "auto_fired": fired,
        "auto_from": "variance" if fired else auto.get("from", "last"),
        "oracle_psnr": ev.get("oracle_psnr"),
        "oracle_step": ev.get("oracle_step"),
        "final_psnr": round(final, 4),
        "paper_dip": None if fast else dip_paper,
        BASELINE_NAME[suite]: (round(c.baseline, 4) if c.baseline is not None else (None if fast else base_paper)),
        "restores": r.restores,
        "work": r.extra.get("work"),
        "metric_trace": ev.get("metric_trace", []),
        "var_trace": ev.get("var_trace", []),
        "psnr_trace": r.extra.get("psnr_trace", []),
        "loss": [float(f"{x:.5g}") for x in r.loss],
        **c.meta,
    }
    row["variants"] = replay_variants(row, stop_cfg)
    if suite == "denoise":  # the noise level, estimated from the noisy input alone (no reference)
        row["sigma_est"] = round(estimate_sigma(c.image.astype(np.float64) / 255.0), 5)
        row["discrepancy"] = replay_discrepancy(row)
    return row


def _means(suite: str, ok: list[dict]) -> dict:
    cols = ["auto_psnr", "oracle_psnr", "final_psnr", "paper_dip", BASELINE_NAME[suite], "auto_step", "oracle_step"]
    mean = {}
    for k in cols:
        vals = [r[k] for r in ok if r.get(k) is not None]
        mean[k] = round(float(np.mean(vals)), 4) if vals and len(vals) == len(ok) else None
    return mean


def _variant_means(ok: list[dict]) -> list[dict]:
    """Per replayed rule variant: the mean PSNR (last / window mean), gap to the oracle and stop step."""
    variants = []
    if not ok or any(r.get("oracle_psnr") is None for r in ok):
        return variants
    per_row = [{variant_key(x): x for x in r["variants"]} for r in ok]
    for v in VARIANTS:
        k = variant_key(v)
        if any(k not in d for d in per_row):
            continue
        vals = [(d[k]["psnr_last"], d[k]["psnr_mean"], r["oracle_psnr"], d[k]["stopped_at"])
                for d, r in zip(per_row, ok)]
        if any(x[0] is None for x in vals):
            continue
        variants.append({**v, "mean_last": round(float(np.mean([x[0] for x in vals])), 4),
                         "mean_mean": round(float(np.mean([x[1] if x[1] is not None else x[0] for x in vals])), 4),
                         "mean_oracle_gap": round(float(np.mean([x[0] - x[2] for x in vals])), 4),
                         "mean_stopped_at": round(float(np.mean([x[3] for x in vals])), 1)})
    return variants


def _discrepancy_means(ok: list[dict]) -> list[dict]:
    """Per discrepancy factor: the mean PSNR, its gap to the oracle, and that of the hybrid rule."""
    discrepancy = []
    if not ok or not all(r.get("discrepancy") and r.get("oracle_psnr") is not None for r in ok):
        return discrepancy
    for j, c in enumerate(DISCREPANCY):
        got = [r["discrepancy"][j] for r in ok]
        # "hybrid": the variance rule where it fired, this rule where it did not (instead of the cap)
        hyb = [r["auto_psnr"] if r.get("auto_fired") else g["psnr"] for g, r in zip(got, ok)]
        discrepancy.append({"factor": c, "mean": round(float(np.mean([g["psnr"] for g in got])), 4),
                            "mean_oracle_gap": round(float(np.mean([g["psnr"] - r["oracle_psnr"]
                                                                    for g, r in zip(got, ok)])), 4),
                            "fired": sum(g["step"] is not None for g in got),
                            "hybrid_mean_oracle_gap": round(float(np.mean([h - r["oracle_psnr"]
                                                                           for h, r in zip(hyb, ok)])), 4)})
    return discrepancy


def _fmt(v, w=8, nd=2):
    if v is None:
        return "-".rjust(w)
    if isinstance(v, float):
        return f"{v:{w}.{nd}f}"
    return str(v).rjust(w)


def print_suite(res: dict, out=None) -> None:
    out = out or sys.stdout
    base = BASELINE_NAME[res["suite"]]
    print(f"\n== {res['suite']}  (preset {res['preset']}, {res['steps']} steps, PSNR dB, {res['metric']})",
          file=out)
    hdr = f"{'image':14s}{'auto':>8s}{'@step':>7s}{'oracle':>8s}{'@step':>7s}{'final':>8s}{'paper':>8s}{base:>9s}"
    print(hdr, file=out)
    for r in res["images"]:
        if "error" in r:
            print(f"{r['name']:14s}  failed: {r['error']}", file=out)
            continue
        print(f"{r['name']:14s}{_fmt(r['auto_psnr'])}{_fmt(r['auto_step'], 7)}{_fmt(r['oracle_psnr'])}"
              f"{_fmt(r['oracle_step'], 7)}{_fmt(r['final_psnr'])}{_fmt(r['paper_dip'])}{_fmt(r[base], 9)}",
              file=out)
    m = res["mean"]
    print(f"{'mean':14s}{_fmt(m['auto_psnr'])}{_fmt(m['auto_step'], 7, 0)}{_fmt(m['oracle_psnr'])}"
          f"{_fmt(m['oracle_step'], 7, 0)}{_fmt(m['final_psnr'])}{_fmt(m['paper_dip'])}{_fmt(m[base], 9)}",
          file=out)
    if res.get("variants") and res["preset"] != "fast":
        sc = res["stop_config"]
        print(f"rule variants replayed on the traces (window {sc['window']}; the best {PRINTED_VARIANTS} by gap, "
              f"and * the current rule; all in the JSON): rel_tol patience lag -> mean PSNR (last / window "
              f"mean), gap to the oracle, mean stop step", file=out)
        cur = variant_key(sc)
        ranked = sorted(res["variants"], key=lambda v: -v["mean_oracle_gap"])
        shown = ranked[:PRINTED_VARIANTS] + [v for v in ranked[PRINTED_VARIANTS:] if variant_key(v) == cur]
        for v in shown:
            mark = "*" if variant_key(v) == cur else " "
            print(f" {mark}{v['rel_tol']:4.2f} {v['patience']:3d} {v.get('lag', 0):3d} -> {v['mean_last']:6.2f} / "
                  f"{v['mean_mean']:6.2f}  {v['mean_oracle_gap']:+6.2f}  {v['mean_stopped_at']:7.0f}", file=out)
    if res.get("discrepancy") and res["preset"] != "fast":
        print("discrepancy principle replayed (stop when the loss, averaged over %d steps, reaches c x sigma_est^2): "
              "c -> mean PSNR, gap to the oracle, images where it fired; gap of the hybrid (the variance rule, "
              "this one where that never fired)" % DISCREPANCY_SMOOTH, file=out)
        for d in res["discrepancy"]:
            print(f"  {d['factor']:4.2f} -> {d['mean']:6.2f}  {d['mean_oracle_gap']:+6.2f}  {d['fired']}"
                  f"   hybrid {d['hybrid_mean_oracle_gap']:+6.2f}", file=out)


def main(suite: str = "all", data=None, fast: bool = False, limit: int | None = None, device: str = "auto",
         json: str | None = None, max_steps: int | None = None, crop: int | None = None, slots: int | None = None,
         seed: int = 0, only: str | None = None) -> int:
    """`dip bench quality` (and ``python -m pipeline.bench.quality``). Returns the exit code."""
    from pipeline.engine import pick_device
    from pipeline.io import write_json
    suites = SUITES if (suite or "all") == "all" else (suite,)
    if fast and not limit:
        limit = FAST_IMAGES
    crop = crop or (FAST_CROP if fast else None)
    only = [n.strip() for n in (only or "").split(",") if n.strip()] or None
    try:
        root = paper_dir(data)
        dev = pick_device(device or "auto")
    except Exception as e:  # noqa: BLE001
        print(f"dip bench quality: {e}", file=sys.stderr)
        return 2
    report = {"bench": "quality", "device": str(dev), "fast": fast, "limit": limit, "crop": crop,
              "max_steps": max_steps, "only": only, "data": str(root), "suites": {}}
    if dev.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(dev)
    t0 = time.perf_counter()
    failed = 0
    for s in suites:
        try:
            cases = load_cases(s, root, limit=limit, crop=crop, only=only)
        except FileNotFoundError as e:
            print(f"dip bench quality: {e}", file=sys.stderr)
            return 2
        if not cases:
            if only:
                continue
            print(f"dip bench quality: no images for suite {s} in {root}", file=sys.stderr)
            return 2
        res = run_suite(s, cases, device=dev, fast=fast, max_steps=max_steps, slots=slots, seed=seed or 0)
        failed += res["failed"]
        report["suites"][s] = res
        print_suite(res)
        sys.stdout.flush()
    report["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"\ntotal {report['seconds']:.1f} s on {dev}")
    if json:
        write_json(Path(json), report)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """`python -m pipeline.bench.quality`: the CLI's options plus --max-steps, --crop, --slots, --seed."""
    q = argparse.ArgumentParser(prog="python -m pipeline.bench.quality", description=__doc__.splitlines()[0])
    q.add_argument("--suite", choices=("denoise", "sr", "inpaint", "all"), default="all")
    q.add_argument("--data", default=None)
    q.add_argument("--fast", action="store_true")
    q.add_argument("--limit", type=int)
    q.add_argument("--device", default="auto")
    q.add_argument("--json", metavar="PATH")
    q.add_argument("--max-steps", type=int, help="cap every preset's step count at this")
    q.add_argument("--crop", type=int, help="centre-crop every image to at most this side first")
    q.add_argument("--slots", type=int, help="fits per batch (default: from the free device memory)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--only", metavar="NAMES", help="comma-separated image names (e.g. F16,hill); a suite "
                                                   "with none of them is skipped")
    return q


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main(**vars(build_parser().parse_args())))
