"""Parity and speed of the fused CUDA data-term kernels against the torch reference (needs a CUDA GPU).

    python -m pipeline.bench.kernels [--json PATH] [--batch 16] [--size 512] [--iters 30] [--fit-steps 50]
                            [--step-batch 8] [--step-steps 5] [--no-step] [--no-fit]

1. Parity at B x 3 x size^2 (masked) and SR x4 (size/4 low-res): per-image loss relative error and
   gradient max abs difference, kernels vs the float32 reference, each also against a float64 reference.
2. Timing of forward + backward: the wall time (CUDA events, warmup, median of N), which on these
   small terms is bound by the host's launches; the GPU time alone (torch.profiler: the sum of the
   kernels' device time, what a step pays when the host runs ahead of a busy GPU); and the host's
   enqueue time.
3. Whole engine steps (``--step-batch`` fits at ``--size``, bf16, the default presets of inpainting and
   SR x4) with use_kernels=True vs False: what the kernels change in a real step.
4. A short fit (pipeline.api.restore, preset "fast", fp32) for inpainting and SR x4 with
   use_kernels=True vs False: max relative difference of the loss curves, next to the difference
   between two reference runs (the run-to-run noise of cuDNN and atomics).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _sync():
    import torch
    torch.cuda.synchronize()


def parity(kfn, rfn, out, weights):
    import torch
    res = {}
    x = out.clone().requires_grad_(True)
    a = kfn(x)
    (ga,) = torch.autograd.grad((a * weights).sum(), x)
    x = out.clone().requires_grad_(True)
    b = rfn(x)
    (gb,) = torch.autograd.grad((b * weights).sum(), x)
    x = out.double().requires_grad_(True)
    c = rfn(x)
    (gc,) = torch.autograd.grad((c * weights.double()).sum(), x)
    a, b, c = a.detach().double(), b.detach().double(), c.detach()
    res["loss_rel_vs_ref32"] = ((a - b).abs() / b.abs()).max().item()
    res["loss_rel_kernel_vs_ref64"] = ((a - c).abs() / c.abs()).max().item()
    res["loss_rel_ref32_vs_ref64"] = ((b - c).abs() / c.abs()).max().item()
    res["grad_maxabs_vs_ref32"] = (ga - gb).abs().max().item()
    res["grad_maxabs_kernel_vs_ref64"] = (ga.double() - gc).abs().max().item()
    res["grad_scale"] = gb.abs().max().item()
    return res


def _warm_step(fn, out, warmup: int):
    """A forward + backward of ``fn`` on a copy of ``out``, run ``warmup`` times (then synchronised)."""
    import torch
    x = out.clone().requires_grad_(True)

    def once():
        loss = fn(x)
        torch.autograd.grad(loss.sum(), x)

    for _ in range(warmup):
        once()
    _sync()
    return once


def timing(fn, out, iters: int, warmup: int = 5):
    import torch
    once = _warm_step(fn, out, warmup)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        once()
        e.record()
    _sync()
    ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms)}


def gpu_and_host(fn, out, iters: int, warmup: int = 3) -> dict:
    """GPU kernel time per forward + backward (profiler), the host's enqueue time, and kernels per call."""
    from pipeline.bench.speed import profile_calls
    once = _warm_step(fn, out, warmup)
    t0 = time.perf_counter()
    for _ in range(iters):
        once()
    host_ms = (time.perf_counter() - t0) / iters * 1e3
    _sync()
    pr = profile_calls(once, iters, "cuda")
    return {"gpu_ms": pr["ms_per_step"], "host_enqueue_ms": host_ms,
            "kernels_per_call": sum(t["calls"] for t in pr["top"]), "top": pr["top"][:6]}


def step_compare(size: int, batch: int, steps: int, device: str = "cuda") -> dict:
    """Engine steps with the kernels and with the reference, for inpainting and SR x4 (bf16)."""
    from pipeline.bench.speed import time_config
    from pipeline.config import make_config
    res = {"size": size, "batch": batch, "steps": steps}
    for name, cfg in (("inpaint", make_config("inpaint")), ("sr_x4", make_config("sr", scale=4))):
        cfg = cfg.replace(precision="bf16")
        for label, uk in (("kernels", True), ("reference", False)):
            r = time_config(cfg, size, batch, steps, device, use_kernels=uk, warmup=1)
            res[f"{name}_{label}_step_ms"] = r["step_ms"]
        res[f"{name}_speedup"] = res[f"{name}_reference_step_ms"] / res[f"{name}_kernels_step_ms"]
    return res


def fit_compare(task: str, size: int, steps: int, seed: int = 0):
    import numpy as np
    from pipeline.api import restore
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.5 + 0.4 * np.sin(6 * xx + 3 * yy), 0.5 + 0.4 * np.cos(5 * yy), 0.3 + 0.4 * xx * yy], -1)
    img = np.clip(img + 0.05 * rng.standard_normal(img.shape), 0, 1).astype(np.float32)
    kw = dict(preset="fast", steps=steps, seed=seed, device="cuda", precision="fp32")
    if task == "inpaint":
        kw.update(task="inpaint", mask=(rng.random((size, size)) > 0.5).astype(np.float32))
        image = img
    else:
        kw.update(task="sr", scale=4)
        image = img[::4, ::4].copy()  # the low-res input; the output is size x size
    curves, secs = {}, {}
    for name, uk in (("kernels", True), ("reference", False), ("reference2", False)):
        t0 = time.perf_counter()
        r = restore(image, use_kernels=uk, **kw)
        secs[name] = time.perf_counter() - t0
        curves[name] = np.asarray(r.loss, np.float64)

    def maxrel(a, b):
        return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))

    return {"steps": steps, "max_rel_kernels_vs_reference": maxrel(curves["kernels"], curves["reference"]),
            "max_rel_reference_vs_reference": maxrel(curves["reference2"], curves["reference"]),
            "first_rel_kernels_vs_reference": maxrel(curves["kernels"][:1], curves["reference"][:1]),
            "final_loss_kernels": float(curves["kernels"][-1]), "final_loss_reference": float(curves["reference"][-1]),
            "seconds": secs}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--fit-steps", type=int, default=50)
    ap.add_argument("--fit-size", type=int, default=128)
    ap.add_argument("--no-fit", action="store_true")
    ap.add_argument("--step-batch", type=int, default=8)
    ap.add_argument("--step-steps", type=int, default=5)
    ap.add_argument("--no-step", action="store_true")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("pipeline.bench.kernels needs a CUDA GPU (torch sees none)", file=sys.stderr)
        return 2
    from kernels.autograd import DownsampledMSE, MaskedMSE
    from kernels.dispatch import kernels_available
    from kernels.reference import downsampled_mse_ref, masked_mse_ref

    t_start = time.perf_counter()
    dev = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ok, why = kernels_available(dev)
    results = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "kernels_available": ok}
    try:
        import numba
        import numpy
        results["numba"], results["numpy"] = numba.__version__, numpy.__version__
        from importlib.metadata import version
        results["numba_cuda"] = version("numba-cuda")
    except Exception as e:  # noqa: BLE001
        results["versions_error"] = str(e)
    if not ok:
        print(f"CUDA kernels unavailable: {why}", file=sys.stderr)
        results["error"] = why
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(results, fh, indent=1)
        return 1

    B, S, C, f = a.batch, a.size, 3, 4
    g = torch.Generator(device=dev).manual_seed(0)
    out = torch.rand(B, C, S, S, device=dev, generator=g)
    tgt = torch.rand(B, C, S, S, device=dev, generator=g)
    mask = (torch.rand(B, 1, S, S, device=dev, generator=g) > 0.5).float()
    tlr = torch.rand(B, C, S // f, S // f, device=dev, generator=g)
    mlr = (torch.rand(B, 1, S // f, S // f, device=dev, generator=g) > 0.2).float()
    wts = torch.linspace(0.5, 1.5, B, device=dev)

    terms = {
        "masked": (lambda x: MaskedMSE.apply(x, tgt, mask), lambda x: masked_mse_ref(x, tgt.to(x.dtype), mask.to(x.dtype))),
        "masked_nomask": (lambda x: MaskedMSE.apply(x, tgt, None), lambda x: masked_mse_ref(x, tgt.to(x.dtype), None)),
        f"sr_x{f}": (lambda x: DownsampledMSE.apply(x, tlr, f, mlr),
                     lambda x: downsampled_mse_ref(x, tlr.to(x.dtype), f, mlr.to(x.dtype))),
    }
    for name, (kfn, rfn) in terms.items():
        r = parity(kfn, rfn, out, wts)
        r["kernels"] = timing(kfn, out, a.iters)
        r["reference"] = timing(rfn, out, a.iters)
        r["speedup"] = r["reference"]["median_ms"] / r["kernels"]["median_ms"]
        r["kernels"].update(gpu_and_host(kfn, out, a.iters))
        r["reference"].update(gpu_and_host(rfn, out, a.iters))
        r["gpu_speedup"] = r["reference"]["gpu_ms"] / r["kernels"]["gpu_ms"]
        results[name] = r

    if not a.no_step:
        results["step"] = step_compare(a.size, a.step_batch, a.step_steps)

    if not a.no_fit:
        results["fit_inpaint"] = fit_compare("inpaint", a.fit_size, a.fit_steps)
        results["fit_sr4"] = fit_compare("sr", a.fit_size, a.fit_steps)
    results["bench_seconds"] = time.perf_counter() - t_start

    print_results(results, list(terms), B, C, S, f, a.iters)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


def print_results(results: dict, terms: list[str], B: int, C: int, S: int, f: int, iters: int) -> None:
    """The table of the kernels against torch, the engine's step, and the short fits."""
    print(f"\n{results['device']}  torch {results['torch']}  numba {results.get('numba')}  "
          f"numba-cuda {results.get('numba_cuda')}  numpy {results.get('numpy')}")
    print(f"B={B} C={C} {S}x{S}; SR x{f} -> {S // f}x{S // f}; forward+backward, median of {iters}")
    hdr = f"{'term':<14}{'loss rel':>10}{'k vs f64':>10}{'ref vs f64':>11}{'grad abs':>10}{'grad max':>10}" \
          f"{'kernel ms':>11}{'ref ms':>9}{'speedup':>9}{'GPU k ms':>10}{'GPU ref':>9}{'GPU x':>7}{'host k':>8}{'host ref':>9}"
    print(hdr)
    print("-" * len(hdr))
    for name in terms:
        r = results[name]
        print(f"{name:<14}{r['loss_rel_vs_ref32']:>10.2e}{r['loss_rel_kernel_vs_ref64']:>10.2e}"
              f"{r['loss_rel_ref32_vs_ref64']:>11.2e}{r['grad_maxabs_vs_ref32']:>10.2e}{r['grad_scale']:>10.2e}"
              f"{r['kernels']['median_ms']:>11.3f}{r['reference']['median_ms']:>9.3f}{r['speedup']:>8.2f}x"
              f"{r['kernels']['gpu_ms']:>10.3f}{r['reference']['gpu_ms']:>9.3f}{r['gpu_speedup']:>6.2f}x"
              f"{r['kernels']['host_enqueue_ms']:>8.3f}{r['reference']['host_enqueue_ms']:>9.3f}")
    if "step" in results:
        s = results["step"]
        print(f"engine step, B={s['batch']} {s['size']}x{s['size']} bf16, ms with kernels / reference: "
              f"inpaint {s['inpaint_kernels_step_ms']:.2f} / {s['inpaint_reference_step_ms']:.2f} "
              f"({s['inpaint_speedup']:.3f}x), SR x4 {s['sr_x4_kernels_step_ms']:.2f} / "
              f"{s['sr_x4_reference_step_ms']:.2f} ({s['sr_x4_speedup']:.3f}x)")
    for key in ("fit_inpaint", "fit_sr4"):
        if key in results:
            r = results[key]
            print(f"{key}: {r['steps']} steps, loss curve max rel diff kernels vs ref {r['max_rel_kernels_vs_reference']:.2e} "
                  f"(ref vs ref {r['max_rel_reference_vs_reference']:.2e}; step 1 {r['first_rel_kernels_vs_reference']:.2e}); "
                  f"final {r['final_loss_kernels']:.5f} vs {r['final_loss_reference']:.5f}")
    print(f"total {results['bench_seconds']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
