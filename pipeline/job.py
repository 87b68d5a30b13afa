"""`dip restore`: find the inputs, fit them with the batched engine, write every result as it finishes.

Outputs: OUT/<relative dir>/<stem>.png and <stem>.json, written atomically. A bad input gets a one-line
error naming the file; the others go on, and the exit code is 1 if any image failed.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dip.job")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


@dataclass
class InputSpec:
    path: Path
    rel: Path  # output path relative to --out, without suffix
    mask: Path | None = None
    reference: Path | None = None


def discover(inputs: list[str], pattern: str = "*") -> list[InputSpec]:
    specs: list[InputSpec] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob(pattern)):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not _is_mask_name(f):
                    specs.append(InputSpec(f, f.relative_to(p).with_suffix("")))
        else:
            specs.append(InputSpec(p, Path(p.stem)))
    return specs


def _is_mask_name(f: Path) -> bool:
    return f.stem.endswith("_mask")


def safe_output(out: Path, rel: Path) -> Path:
    dest = (out / rel).resolve()
    root = out.resolve()
    if root != dest and root not in dest.parents:
        raise ValueError(f"{rel}: output path would escape --out ({out})")
    return dest


def config_for(args, device_type: str):
    from pipeline.config import make_config
    preset = args.preset
    if preset is None and device_type == "cpu":
        preset = "fast"
        log.info("no GPU: using the small 'fast' preset (4 scales, <=64 channels, %s steps) so that a CPU "
                 "fit takes minutes, not hours; pass --preset to choose another", "600" if args.steps is None else args.steps)
    over = {"steps": args.steps, "seed": args.seed, "output": getattr(args, "output", None),
            "precision": getattr(args, "precision", None)}
    return make_config(args.task, preset=preset, scale=args.scale, **over)


def main(args) -> int:
    from pipeline.api import make_problem, fit_problems
    from pipeline.engine import pick_device
    from pipeline.io import ImageError
    from tqdm import tqdm

    try:
        device = pick_device(args.device)
        cfg = config_for(args, device.type)
    except (ValueError, RuntimeError) as e:
        print(f"dip: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    specs = discover(args.inputs, args.glob)
    if not specs:
        print("dip: error: no input images found", file=sys.stderr)
        return 2
    failures: list[tuple[str, str]] = []
    problems = []
    dests = {}
    for sp in specs:
        try:
            dest = safe_output(out, sp.rel)
            if not args.overwrite and dest.with_suffix(".json").exists() and dest.with_suffix(".png").exists():
                log.info("%s: already done (%s), skipping; --overwrite redoes it", sp.path, dest.with_suffix(".png"))
                continue
            p = make_problem(str(sp.path), task=cfg.task, mask=args.mask or sp.mask, reference=args.reference or sp.reference,
                             seed=args.seed, cfg=cfg)
            problems.append(p)
            dests[id(p)] = dest
        except (ImageError, ValueError) as e:
            failures.append((str(sp.path), str(e)))
            print(f"dip: {e}", file=sys.stderr)
    total_steps = sum(p.cfg.steps for p in problems)
    bar = tqdm(total=total_steps, unit="step", disable=args.quiet or not problems, file=sys.stderr)
    done = 0
    t0 = time.time()
    for p, res in fit_problems(problems, device=device, slots=args.slots, keep_weights=args.export_onnx,
                               use_kernels=False if args.reference_kernels else None,
                               on_step=lambda n: bar.update(n)):
        if isinstance(res, Exception):
            failures.append((p.source, str(res)))
            print(f"dip: {p.source}: {res}", file=sys.stderr)
            continue
        dest = dests[id(p)]
        res.save(dest.parent, dest.name)
        if args.export_onnx:
            try:
                from pipeline import export
                export.export_result(res, dest.with_suffix(".onnx"), dtype=args.onnx_dtype)
            except ImportError:
                pass
        done += 1
        msg = f"{p.source} -> {dest.with_suffix('.png')} ({res.steps} steps, {res.seconds:.1f} s"
        if res.metrics:
            msg += f", PSNR {res.metrics['psnr']:.2f} dB, SSIM {res.metrics['ssim']:.3f}"
        bar.write(msg + ")")
    bar.close()
    log.info("%d done, %d failed in %.1f s", done, len(failures), time.time() - t0)
    if failures:
        print(f"dip: {len(failures)} image(s) failed:", file=sys.stderr)
        for path, err in failures:
            print(f"  {err}", file=sys.stderr)
        return 1
    return 0
