"""`dip bench speed`: one original-equivalent fit against the batched engine, same device, same run.

The single fit is the engine with one slot in TF32 (what the original ran: cuDNN convolutions in TF32
are PyTorch's default). The batched runs step B fits at once. Reported per configuration: the time of
one step, fit-steps/s, images/hour for the preset's step count, the ratio to the single fit, the
achieved TFLOP/s against an analytic FLOP count, and the peak memory per fit.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def conv_flops(cfg, h: int, w: int, channels: int = 3) -> float:
    """Forward FLOPs of one generator at h x w (2 per multiply-add, convolutions only)."""
    from pipeline.generator import build_specs
    flops = 0.0
    res = {}
    # resolution of each conv: scale i works at h/2**i (input side), down convs output h/2**(i+1)
    for sp in build_specs(cfg.net.with_channels(channels), 1):
        if sp.kind != "conv_w":
            continue
        cout, cin, k, _ = sp.shape
        name = sp.name.split(".")[0]
        if name == "out":
            oh, ow = h, w
        else:
            i = int(name[1:])
            part = sp.name.split(".")[1]
            if part in ("down", "down2"):
                oh, ow = h // 2 ** (i + 1), w // 2 ** (i + 1)
            else:
                oh, ow = h // 2 ** i, w // 2 ** i
        res[sp.name] = (oh, ow)
        flops += 2.0 * cin * cout * k * k * oh * ow
    return flops


def time_config(cfg, size: int, slots: int, steps: int, device, warmup: int = 3) -> dict:
    import torch
    from pipeline.engine import BatchedFitter, FitItem
    dev = torch.device(device)
    rng = np.random.default_rng(0)
    f = cfg.scale if cfg.task == "sr" else 1
    h = size // f
    fit = BatchedFitter(cfg, (size, size), 3, slots, dev)
    for s in range(slots):
        fit.load(s, FitItem(s, rng.random((3, h, h), dtype=np.float32), np.ones((1, h, h), np.float32), seed=s))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup):
        fit.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        fit.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    fl = 3.0 * conv_flops(cfg, size, size) * slots  # forward + backward (2x forward)
    return {
        "precision": cfg.precision, "size": size, "slots": slots, "step_ms": round(dt * 1e3, 3),
        "fit_steps_per_s": round(slots / dt, 2),
        "images_per_hour": round(3600 * slots / (dt * cfg.steps), 1),
        "tflops": round(fl / dt / 1e12, 2),
        "peak_gib_per_fit": round(peak / slots / 2 ** 30, 3),
    }


def speed_main(args) -> int:
    import torch
    from pipeline.config import make_config
    from pipeline.engine import pick_device, is_oom
    dev = pick_device(args.device)
    cuda = dev.type == "cuda"
    size = args.size or (512 if cuda else 64)
    batches = [int(b) for b in str(args.batch).split(",")] if args.batch else ([16] if cuda else [4])
    steps = args.steps or (50 if cuda else 5)
    preset = args.preset or ("denoise" if cuda else "fast")
    base = make_config("denoise", preset=preset)
    precisions = [args.precision] if args.precision else (["tf32", "bf16"] if cuda else ["fp32"])
    rows = []
    print(f"device {torch.cuda.get_device_name(dev) if cuda else 'cpu'}, preset {preset}, {size}x{size}, "
          f"{3 * conv_flops(base, size, size) / 1e9:.1f} GFLOP/step/fit")
    print(f"{'configuration':36s} {'ms/step':>9s} {'fit-steps/s':>12s} {'images/h':>9s} {'x single':>9s} "
          f"{'TFLOP/s':>8s} {'GiB/fit':>8s}", flush=True)

    def show(r):  # each row as soon as it is measured, so a time box keeps what finished
        if "error" in r:
            print(f"{r['label']:36s} {r['error']}", flush=True)
        else:
            print(f"{r['label']:36s} {r['step_ms']:9.2f} {r['fit_steps_per_s']:12.1f} {r['images_per_hour']:9.0f} "
                  f"{r.get('speedup', 1.0):9.2f} {r['tflops']:8.2f} {r['peak_gib_per_fit']:8.2f}", flush=True)

    single = time_config(base.replace(precision="tf32" if cuda else "fp32"), size, 1, steps, dev)
    single["label"] = "single fit (original-equivalent)"
    rows.append(single)
    show(single)
    for prec in precisions:
        for b in batches:
            try:
                r = time_config(base.replace(precision=prec), size, b, steps, dev)
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                if cuda:
                    torch.cuda.empty_cache()
                rows.append({"label": f"batched {prec} B={b}", "error": "out of memory"})
                show(rows[-1])
                continue
            r["label"] = f"batched {prec} B={b}"
            r["speedup"] = round(r["fit_steps_per_s"] / single["fit_steps_per_s"], 2)
            rows.append(r)
            show(r)
    out = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "preset": preset, "size": size,
           "steps_timed": steps, "preset_steps": base.steps,
           "gflop_per_step_per_fit": round(3 * conv_flops(base, size, size) / 1e9, 1), "rows": rows,
           "torch": torch.__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    sys.stdout.flush()
    return 0
