"""The `dip` command line. Only argparse (and pipeline.config, the standard library only) is imported here;
each command imports what it needs."""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import PRESETS, TASKS

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PRESET_NAMES = tuple(PRESETS)


def _steps(v: str):
    if v == "auto":
        return v
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive number, not {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _device(v: str) -> str:
    from pipeline.config import check_device  # stdlib only
    try:
        return check_device(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("unknown device ", "")) from None


def _add_restore(sub):
    p = sub.add_parser("restore", help="restore images with the Deep Image Prior",
                       description="Restore images: files, directories (recursive) or a manifest (.csv/.jsonl). "
                                   "Writes OUT/<relative path>/<stem>.png and .json for every input.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, directories, or manifest files")
    p.add_argument("--task", choices=TASKS, default="denoise")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--mask", metavar="PATH", help="inpainting mask (white = known, black = hole)")
    p.add_argument("--scale", type=int, choices=(2, 4, 8), help="super-resolution factor (default 4)")
    p.add_argument("--reference", metavar="PATH", help="clean image: report PSNR/SSIM against it")
    p.add_argument("--preset", choices=PRESET_NAMES,
                   help="network and schedule (default: the task's own; on a CPU without a GPU, a light preset "
                        "made for that task: pipeline.config.CPU_DEFAULT)")
    p.add_argument("--steps", type=_steps, default=None,
                   help="'auto' (default: stop when the windowed variance of the output stops falling, with the "
                        "preset's step count as the cap) or an exact number of steps")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", type=_device,
                   help="auto | cpu | cuda | cuda:N (default auto: CUDA when present)")
    p.add_argument("--glob", default="*", help="file pattern inside directories (default: all image files)")
    p.add_argument("--slots", type=int, help="fits per batch on one device (default: from the free memory on CUDA, 1 on a CPU)")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16"), help="arithmetic (default fp32 on CPU, "
                                                                          "the fastest that keeps quality on CUDA)")
    p.add_argument("--output", choices=("ema", "weights_ema", "last"),
                   help="which image is the result: ema = average of outputs (default, the paper's, best quality; "
                        "distilled into the generator so that the .onnx re-renders it, see --distill-steps); "
                        "weights_ema = the averaged generator; last = the last generator. A short fit of a "
                        "paper preset (a few hundred steps or fewer) averages in its first, blurry outputs "
                        "(the decay is 0.99: after 100 steps a third of the weight is still on them): use "
                        "--output last there")
    p.add_argument("--distill-steps", type=int, metavar="N",
                   help="with --output ema: steps (default 200, at most a tenth of the fit's) that fit the "
                        "generator to the output average, so that the saved image is the .onnx's render; "
                        "0 saves the average itself, which the .onnx then does not reproduce")
    p.add_argument("--ensemble", type=int, metavar="K",
                   help="fit each image K times from K seeds and save the mean (default: the preset's; "
                        + ", ".join(f"{n} {c.ensemble}" for n, c in PRESETS.items() if c.ensemble > 1)
                        + ", the others 1); exported as K models + <stem>.tiles.json")
    p.add_argument("--tile", type=int, metavar="SIZE",
                   help="fit images with a side above SIZE pixels as overlapping tiles (SR: low-res pixels); "
                        "default: the preset's (denoise-lite: 64, the size its stopping rule was set at), "
                        "else only images whose whole fit would not fit in memory. A SIZE above the image "
                        "fits it whole")
    p.add_argument("--tile-overlap", type=int, metavar="PX", help="overlap between tiles (default SIZE/8)")
    p.add_argument("--max-memory", type=float, metavar="GIB",
                   help="memory budget for the fits (GiB; default 80%% of the free GPU memory): larger images "
                        "are tiled and batches sized within it")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    p.add_argument("--address", help="Ray cluster to join (auto | ray://host:port; default: $RAY_ADDRESS or a "
                                     "local instance)")
    p.add_argument("--actors", type=int, metavar="N",
                   help="worker actors (default: one per GPU in the cluster; without GPUs, one per core of each "
                        "node, or per --cpus-per-fit cores)")
    p.add_argument("--cpus-per-fit", type=int, metavar="N",
                   help="without GPUs: cores (torch threads) per actor (default 1: one single-threaded fit per "
                        "core, which wastes nothing on thread synchronisation and shares a machine well)")
    p.add_argument("--max-retries", type=int, default=3, metavar="N",
                   help="times an image is retried after its worker died or failed (default 3)")
    p.add_argument("--dashboard-host", metavar="HOST",
                   help="start the embedded Ray instance with its dashboard bound to HOST (default: no "
                        "dashboard; 127.0.0.1 keeps it local)")
    p.add_argument("--no-export-onnx", dest="export_onnx", action="store_false",
                   help="do not write <stem>.onnx beside each image")
    p.add_argument("--onnx-dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--reference-kernels", action="store_true",
                   help="use the plain torch data terms even on CUDA (for comparison)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_restore)


def _call(fn, args) -> int:
    """``fn`` with the parsed arguments it names (no module below the CLI sees the Namespace)."""
    import inspect
    names = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in vars(args).items() if k in names})


def job_options(args):
    """The JobOptions of `dip restore`'s parsed arguments (the only place a Namespace becomes options)."""
    import dataclasses
    from pipeline.job import JobOptions
    return JobOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(JobOptions)})


def _run_restore(args) -> int:
    from pipeline.job import run_job
    return run_job(job_options(args), owns_process=True)


def _add_render(sub):
    p = sub.add_parser("render", help="re-render restored images from their ONNX files",
                       description="Render MODEL.onnx (or every .onnx under a job's output DIR) with onnxruntime.")
    p.add_argument("model", metavar="MODEL.onnx|DIR")
    p.add_argument("-o", "--output", metavar="OUT.png", help="output image (default: beside the model)")
    p.add_argument("--provider", choices=("auto", "tensorrt", "cuda", "cpu"), default="auto")
    p.set_defaults(func=_run_render)


def _run_render(args) -> int:
    from pipeline.onnx import render
    return _call(render.main, args)


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks: speed, quality against the paper, the efficiency study, the prior")
    bs = p.add_subparsers(dest="bench", required=True)
    s = bs.add_parser("speed", help="one original-equivalent fit against the batched engine")
    s.add_argument("--device", default="auto", type=_device)
    s.add_argument("--size", type=int, help="image side (default 512 on CUDA, 64 on CPU)")
    s.add_argument("--batch", help="fits in the batch, or a comma list (default 16 on CUDA, 4 on CPU)")
    s.add_argument("--steps", type=int, help="timed steps (default 50 on CUDA, 5 on CPU)")
    s.add_argument("--preset", default=None, help="network (default denoise on CUDA, fast on CPU)")
    s.add_argument("--precision", default=None, choices=("fp32", "tf32", "bf16"))
    s.add_argument("--conv", default="auto", help="how the slots' convolutions run: auto, grouped, loop, or a "
                                                  "comma list to compare them (default auto: grouped on CUDA)")
    s.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile N more steps of each batched configuration: time by kind of kernel")
    s.add_argument("--concurrent", type=int, default=0, metavar="K",
                   help="run the single fit alone, then K copies of it at once (K processes), and report each "
                        "copy's time against the one alone")
    s.add_argument("--threads", type=int, metavar="N", help="with --concurrent: each copy's torch threads "
                                                            "(default: torch's own, every core)")
    s.add_argument("--json", metavar="PATH")
    s.set_defaults(func=_run_bench_speed)
    q = bs.add_parser("quality", help="PSNR on the paper's benchmark sets")
    q.add_argument("--suite", choices=("denoise", "sr", "inpaint", "all"), default="all")
    q.add_argument("--data", default=None, help="folder with the paper sets (default ../shared/data/paper)")
    q.add_argument("--fast", action="store_true", help="tiny crops and the fast preset: a CPU smoke test")
    q.add_argument("--limit", type=int, help="at most this many images per suite")
    q.add_argument("--device", default="auto", type=_device)
    q.add_argument("--json", metavar="PATH")
    q.set_defaults(func=_run_bench_quality)
    pr = bs.add_parser("prior", help="why it works: the same generator fitted to an image, the image with noise, "
                                     "its pixels shuffled and white noise (the paper's Figure 7)")
    pr.add_argument("image", metavar="IMAGE")
    pr.add_argument("--preset", default=None, help="network and schedule (default: denoise on CUDA, the light "
                                                    "CPU default on a CPU)")
    pr.add_argument("--steps", type=int, help="steps of every fit (default: the preset's cap; 600 with the "
                                                  "CPU default)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--device", default="auto", type=_device)
    pr.add_argument("--sigma", type=float, default=25.0, help="noise of the noisy target, on 0..255 (default 25)")
    pr.add_argument("--size", type=int, help="centre crop side (default: 64 on a CPU, the whole image on CUDA)")
    pr.add_argument("--out", default="prior", metavar="DIR", help="where prior.png and prior.json go (default prior/)")
    pr.add_argument("--json", dest="json_path", metavar="PATH", help="also write the JSON here")
    pr.set_defaults(func=_run_bench_prior)
    from pipeline.bench.study import build_parser as study_parser  # stdlib imports only
    st = bs.add_parser("study", help="the efficiency study: variants of the presets against the paper's, "
                                     "PSNR and work per image, resumable")
    study_parser(st)
    st.set_defaults(func=_run_bench_study)


def _run_bench_speed(args) -> int:
    from pipeline.bench import speed
    return _call(speed.speed_main, args)


def _run_bench_prior(args) -> int:
    from pipeline.bench import prior
    return _call(prior.main, args)


def _run_bench_study(args) -> int:
    from pipeline.bench import study
    return _call(study.main, args)


def _run_bench_quality(args) -> int:
    from pipeline.bench import quality
    return _call(quality.main, args)


def _add_report(sub):
    p = sub.add_parser("report", help="rebuild OUT/report.html from a job's outputs")
    p.add_argument("out", metavar="OUT")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from pipeline.job import report
    return _call(report.main, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dip", description="Batch image restoration with the Deep Image Prior.")
    from pipeline.config import VERSION  # the stdlib only
    parser.add_argument("--version", action="version", version=f"dip {VERSION}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_restore(sub)
    _add_render(sub)
    _add_bench(sub)
    _add_report(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else EXIT_USAGE
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
