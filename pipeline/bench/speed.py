"""`dip bench speed`: one original-equivalent fit against the batched engine, same device, same run.

The single fit is the engine with one slot in TF32 (what the original ran: cuDNN convolutions in TF32
are PyTorch's default). The batched runs step B fits at once. Reported per configuration: the time of
one step, fit-steps/s, images/hour for the preset's step count, the ratio to the single fit, the
achieved TFLOP/s against the analytic FLOP count of pipeline.work, and the peak memory per fit. The
header gives the work of one fit-step: parameters, GFLOP and modelled bytes (pipeline.work).

``--conv grouped,loop`` times both ways of running the B slots' convolutions (one grouped convolution,
or one ordinary convolution per slot). ``--profile N`` profiles N more steps of every batched
configuration with torch.profiler and reports where the time goes, by kind of kernel (GPU kernel time on
CUDA, operator self time on the CPU), with the top kernels; all of it goes into the JSON.

``--concurrent K [--threads N]`` runs the bench alone, then K copies of it at once, and reports each
copy's time against the one alone: what sharing a machine costs (two jobs, a job beside a notebook).
"""
from __future__ import annotations

import sys
import time

import numpy as np


# kinds of kernel / operator, matched in this order against the lower-cased name
KINDS = (
    ("pad", ("reflection_pad", "reflect", "constant_pad")),
    ("batchnorm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford", "native_batch_norm")),
    ("layout", ("nchwtonhwc", "nhwctonchw", "nchw", "nhwc", "transpose", "permute", "contiguous", "copy")),
    ("conv", ("conv", "cudnn", "gemm", "xmma", "cutlass", "wgrad", "dgrad", "fprop", "implicit", "winograd",
              "sm80", "sm90", "mkldnn", "mkl", "im2col")),
    ("upsample", ("upsample", "interpolate")),
    ("activation", ("leaky", "sigmoid")),
    ("concat", ("cat", "concat")),
    ("reduce", ("reduce", "sum", "mean", "norm")),
    ("elementwise", ("elementwise", "vectorized", "mul", "add", "sub", "div", "sqrt", "where", "fill", "pow",
                     "repeat_interleave", "index", "scatter", "clamp")),
)


def kind_of(name: str) -> str:
    n = name.lower()
    for kind, keys in KINDS:
        if any(k in n for k in keys):
            return kind
    return "other"


def profile_calls(fn, steps: int, dev) -> dict:
    """Profile ``steps`` calls of ``fn()``: time per call by kind of kernel, and the top kernels.

    On CUDA this is GPU kernel time (what bounds a step once the host runs ahead of the GPU); on the CPU,
    the self time of each operator. The times are per call, in ms."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    dev = torch.device(dev)
    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize(dev)
    rows = []
    for e in prof.key_averages():
        if cuda:
            # kernels are device-side events with self device time; operators carry it only as a total
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0)
            if str(getattr(e, "device_type", "")).endswith("CPU"):
                continue
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((e.key, us / 1e3 / steps, e.count // steps))
    total = sum(ms for _, ms, _ in rows) or 1.0
    kinds: dict[str, float] = {}
    for name, ms, _ in rows:
        k = kind_of(name)
        kinds[k] = kinds.get(k, 0.0) + ms
    top = sorted(rows, key=lambda r: -r[1])[:12]
    return {
        "what": "GPU kernel time" if cuda else "CPU operator self time",
        "steps": steps,
        "ms_per_step": round(total, 3),
        "by_kind": {k: {"ms": round(v, 3), "share": round(v / total, 3)}
                    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n[:120], "kind": kind_of(n), "ms": round(ms, 3), "calls": c} for n, ms, c in top],
    }


def _seconds_per_step(step, steps: int, warmup: int, dev) -> float:
    """``warmup`` calls of ``step()``, then the mean wall time of ``steps`` more (the GPU synchronised)."""
    import torch
    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - t0) / steps


def time_plain(cfg, size: int, steps: int, device, warmup: int = 3) -> dict:
    """One fit as the original's loop runs it: the generator (one slot), its parameters in torch.optim.Adam,
    input noise, the masked MSE, backward, the step, the output average; no divergence check, no flat
    buffers. What the engine at one slot is measured against (its own overhead)."""
    import torch
    from pipeline.generator import SkipGenerator, make_input
    from pipeline.operators import make_operator
    dev = torch.device(device)
    net = cfg.net.with_channels(3)
    G = SkipGenerator(net, 1, dev)
    G.init_slot(0, 0)
    params = [G._params[sp.name] for sp in G.specs]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    h = size // cfg.factor
    op = make_operator(cfg.task, cfg.factor, 1, (h, h)).to(dev)
    op.mask.fill_(1.0)
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, h, h, generator=g).to(dev)
    z = make_input(cfg.input_kind, net.input_depth, size, size, 0, cfg.input_scale).unsqueeze(0).to(dev)
    avg = torch.zeros(1, 3, size, size, device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        out = G(z + cfg.reg_noise_std * torch.randn_like(z))
        loss = op.data_term(out, target).sum()
        loss.backward()
        opt.step()
        with torch.no_grad():
            avg.mul_(cfg.ema).add_(out.detach(), alpha=1 - cfg.ema)

    dt = _seconds_per_step(step, steps, warmup, dev)
    return {"precision": cfg.precision, "size": size, "slots": 1, "conv": "plain", "step_ms": round(dt * 1e3, 3),
            "fit_steps_per_s": round(1 / dt, 2), "images_per_hour": round(3600 / (dt * cfg.steps), 1),
            "tflops": 0.0, "peak_gib_per_fit": 0.0}


def time_config(cfg, size: int, slots: int, steps: int, device, warmup: int = 3, conv: str = "auto",
                profile: int = 0, use_kernels: bool | None = None) -> dict:
    import torch
    from pipeline.engine import BatchedFitter, FitItem
    dev = torch.device(device)
    rng = np.random.default_rng(0)
    f = cfg.factor
    h = size // f
    fit = BatchedFitter(cfg, (size, size), 3, slots, dev, conv=conv, use_kernels=use_kernels)
    for s in range(slots):
        fit.load(s, FitItem(s, rng.random((3, h, h), dtype=np.float32), np.ones((1, h, h), np.float32), seed=s))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    dt = _seconds_per_step(fit.step, steps, warmup, dev)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    from pipeline.work import cost_for
    fl = cost_for(cfg, (size, size), 3).flops * slots  # forward + backward (pipeline.work)
    row = {
        "precision": cfg.precision, "size": size, "slots": slots, "conv": "grouped" if fit.G.grouped else "loop",
        "step_ms": round(dt * 1e3, 3),
        "fit_steps_per_s": round(slots / dt, 2),
        "images_per_hour": round(3600 * slots / (dt * cfg.steps), 1),
        "tflops": round(fl / dt / 1e12, 2),
        "peak_gib_per_fit": round(peak / slots / 2 ** 30, 3),
    }
    if profile:
        row["profile"] = profile_calls(fit.step, profile, dev)
    return row


def concurrent_main(k: int, threads: int | None, args: list[str], json: str | None = None) -> int:
    """``dip bench speed --concurrent K``: the same bench run alone, then K copies at once (K processes, as two
    jobs sharing a machine would be); each copy's ms/step against the one alone. ``threads``: each copy's
    torch threads (OMP_NUM_THREADS; default: torch's, which takes every core of the machine)."""
    import json as _json
    import os
    import subprocess
    import tempfile
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="dip-concurrent-") as tmp:
        def start(name):
            cmd = [sys.executable, "-m", "pipeline.cli", "bench", "speed", *args, "--json", f"{tmp}/{name}.json"]
            return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def single_ms(name) -> float:
            with open(f"{tmp}/{name}.json") as f:
                rows = _json.load(f)["rows"]
            return next(r for r in rows if r["label"].startswith("single fit"))["step_ms"]  # the engine's
        p = start("alone")
        if p.wait() != 0:
            print(p.stderr.read(), file=sys.stderr)
            return 1
        alone = single_ms("alone")
        procs = [start(f"copy{i}") for i in range(k)]
        if any(q.wait() != 0 for q in procs):
            print("a copy failed: " + "".join(q.stderr.read() for q in procs), file=sys.stderr)
            return 1
        copies = [single_ms(f"copy{i}") for i in range(k)]
    print(f"{'run':24s} {'ms/step':>9s} {'x alone':>8s}   (torch threads: {threads or 'default'})")
    print(f"{'alone':24s} {alone:9.2f} {1.0:8.2f}")
    for i, ms in enumerate(copies):
        print(f"{f'copy {i + 1} of {k} at once':24s} {ms:9.2f} {ms / alone:8.2f}")
    if json:
        with open(json, "w") as f:
            _json.dump({"concurrent": k, "threads": threads, "args": args, "alone_ms": alone, "copies_ms": copies,
                        "slowdown": [round(c / alone, 3) for c in copies]}, f, indent=1)
    return 0


def _show(r):  # each row as soon as it is measured, so a time box keeps what finished
    if "error" in r:
        print(f"{r['label']:36s} {r['error']}", flush=True)
    else:
        print(f"{r['label']:36s} {r['step_ms']:9.2f} {r['fit_steps_per_s']:12.1f} {r['images_per_hour']:9.0f} "
              f"{r.get('speedup', 1.0):9.2f} {r['tflops']:8.2f} {r['peak_gib_per_fit']:8.2f}", flush=True)


def _show_profile(pr):
    kinds = ", ".join(f"{k} {v['ms']:.2f} ({100 * v['share']:.0f}%)" for k, v in pr["by_kind"].items())
    print(f"    profile ({pr['what']}, ms/step {pr['ms_per_step']:.2f}): {kinds}", flush=True)


def speed_main(device: str = "auto", size: int | None = None, batch: str | None = None, steps: int | None = None,
               preset: str | None = None, precision: str | None = None, conv: str = "auto", profile: int = 0,
               json: str | None = None, concurrent: int = 0, threads: int | None = None) -> int:
    """`dip bench speed`. Returns the exit code."""
    if concurrent and concurrent > 1:
        args = ["--device", device, "--batch", str(batch or 1)] + [
            x for k, v in (("--size", size), ("--steps", steps), ("--preset", preset), ("--precision", precision))
            if v is not None for x in (k, str(v))]
        return concurrent_main(concurrent, threads, args, json)
    import json as _json
    import torch
    from pipeline.config import make_config
    from pipeline.engine import pick_device, is_oom
    dev = pick_device(device)
    cuda = dev.type == "cuda"
    size = size or (512 if cuda else 64)
    batches = [int(b) for b in str(batch).split(",")] if batch else ([16] if cuda else [4])
    steps = steps or (50 if cuda else 5)
    preset = preset or ("denoise" if cuda else "fast")
    base = make_config("denoise", preset=preset)
    precisions = [precision] if precision else (["tf32", "bf16"] if cuda else ["fp32"])
    convs = [c.strip() for c in str(conv or "auto").split(",")]
    from pipeline.generator import CONV_MODES
    for c in convs:
        if c not in CONV_MODES:
            print(f"dip bench speed: --conv {c!r}: choose from {', '.join(CONV_MODES)}", file=sys.stderr)
            return 2
    n_prof = int(profile or 0)
    rows = []
    from pipeline.work import cost_for
    cost = cost_for(base, (size, size), 3)
    print(f"device {torch.cuda.get_device_name(dev) if cuda else 'cpu'}, preset {preset}, {size}x{size}: "
          f"{cost.params:,} parameters, {cost.flops / 1e9:.2f} GFLOP and {cost.bytes / 1e6:.0f} MB (modelled) "
          f"per fit-step, {cost.flops * base.steps / 1e9:,.0f} GFLOP for the preset's {base.steps} steps")
    print(f"{'configuration':36s} {'ms/step':>9s} {'fit-steps/s':>12s} {'images/h':>9s} {'x single':>9s} "
          f"{'TFLOP/s':>8s} {'GiB/fit':>8s}", flush=True)

    plain = time_plain(base.replace(precision="tf32" if cuda else "fp32"), size, steps, dev)
    plain["label"] = "plain torch loop (the original's)"
    rows.append(plain)
    _show(plain)
    single = time_config(base.replace(precision="tf32" if cuda else "fp32"), size, 1, steps, dev)
    single["label"] = "single fit (original-equivalent)"
    single["engine_overhead"] = round(single["step_ms"] / plain["step_ms"] - 1, 3)
    rows.append(single)
    _show(single)
    print(f"    the engine at one slot against the plain loop: {100 * single['engine_overhead']:+.1f} %", flush=True)
    for prec in precisions:
        for conv in convs:
            for b in batches:
                label = f"batched {prec} B={b}" + (f" conv={conv}" if conv != "auto" else "")
                try:
                    r = time_config(base.replace(precision=prec), size, b, steps, dev, conv=conv, profile=n_prof)
                except Exception as e:  # noqa: BLE001
                    if not is_oom(e):
                        raise
                    if cuda:
                        torch.cuda.empty_cache()
                    rows.append({"label": label, "error": "out of memory"})
                    _show(rows[-1])
                    continue
                r["label"] = label
                r["speedup"] = round(r["fit_steps_per_s"] / single["fit_steps_per_s"], 2)
                rows.append(r)
                _show(r)
                if "profile" in r:
                    _show_profile(r["profile"])
    out = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "preset": preset, "size": size,
           "steps_timed": steps, "preset_steps": base.steps,
           "work": cost.record(base.steps), "rows": rows,
           "torch": torch.__version__}
    if json:
        with open(json, "w") as f:
            _json.dump(out, f, indent=1)
    sys.stdout.flush()
    return 0
