"""`dip bench study`: the efficiency study (issue 16): the paper's quality for less work, measured on crops.

An image's cost is its steps times the work of one step (pipeline.work), the same on every device. This
bench fits variants of the presets (a lighter network, another schedule, an ensemble of light fits...;
:mod:`pipeline.bench.variants`) to the paper's sets, beside the paper's own preset in the same run, and
records per variant and image: the PSNR with auto-stop (no ground truth) and at the oracle step, the
steps a real run would take (auto-stop's stop, plus the distillation), the GFLOP of that run, and its
CPU seconds. Classical anchors run on the same crops: BM3D for denoising (the ``bm3d`` package, an
extra: ``pip install 'dip[bench]'``), bicubic for super-resolution, biharmonic inpainting
(scikit-image) for inpainting.

Resumable. Every (suite, noise level, crop, variant, image) is one row of a JSONL file, appended (and
flushed) as soon as it is measured; a run skips the rows its file already has, so a stopped run loses
at most the image it was fitting, and the same command goes on where it stopped. An image fitted as
tiles (a full-size one, ``--crop 0``) keeps each finished tile in ``<out stem>.tiles/`` (or the
``--cache`` folder's ``tiles/``) until its row is written, so a stopped run loses at most one tile.

Choose on one part, report on the other. Every suite's images are split once, here (``SPLIT``), into a
``tune`` part, on which variants are compared and chosen, and a ``held`` part, which is only fitted with
the chosen presets and the paper's, for the report. ``--part`` picks the part.

How each row is measured. One fit per (image, seed) runs until the auto-stop rule fired plus
``--margin`` steps (default 1000; or to the cap, whichever comes first), without distillation (its
steps are counted, not run): the rule's choice, the best checked image (the oracle, every 50 steps) and
the steps come from the same trajectory (pipeline.bench.quality.EvalStopper). An ensemble of K fits is
scored on the mean of its members' images and costs the sum of their work. CPU seconds are the fit's
process time scaled to the steps a real run takes (run it with one thread: ``--threads 1``, the
default, and one process per core).

    dip bench study --suite denoise --part tune --variants paper,w64 --crop 64 --out docs/study/study.jsonl
    dip bench study --table docs/study/study.jsonl            # the tables, from the file alone
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from pipeline.bench.variants import ANCHORS, FLIPS, Variant, flipped, variant_rule, variants_for

log = logging.getLogger("dip.bench")

# The split, fixed before any variant was measured. Tuning: the four denoising images the earlier knob
# study used (docs/stopping.md), the two Set5 images and two inpainting images of the stopping study, and
# two more inpainting images (house: smooth; peppers256: edges). The rest is held out.
SPLIT = {
    "denoise": {"tune": ["F16", "baboon", "kodim03", "lena"],
                "held": ["hill", "kodim01", "kodim02", "kodim12", "peppers"]},
    "sr": {"tune": ["baby", "bird"], "held": ["butterfly", "head", "woman"]},
    "inpaint": {"tune": ["barbara", "boat", "house", "peppers256"],
                "held": ["Cameraman256", "couple", "fingerprint", "hill", "Lena512", "man", "montage"]},
}


def row_key(r: dict) -> tuple:
    return r["suite"], r.get("sigma"), r["crop"], r["variant"], r["image"]


def read_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    log.warning("%s: a truncated line is ignored (a run was stopped while writing it)", path)
    return rows


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, separators=(",", ":"), default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- one row --------------------------------------------------------------------------------------------
def _anchor_row(suite: str, case, sigma: float | None) -> dict:
    import numpy as np
    import torch
    from pipeline.bench.quality import _ref_tensor, psnr
    t0 = time.process_time()
    ref = _ref_tensor(case.reference)
    if suite == "sr":
        return {"psnr": round(case.baseline, 4), "cpu_s": 0.0}
    img = case.image.astype(np.float64) / 255.0
    if suite == "denoise":
        import bm3d
        s = (sigma or 25.0) / 255.0  # the true noise level, as BM3D is normally given it
        out = bm3d.bm3d_rgb(img, s) if img.ndim == 3 else bm3d.bm3d(img, s)
    else:
        from skimage.restoration import inpaint_biharmonic
        out = inpaint_biharmonic(img, case.mask < 0.5, channel_axis=2 if img.ndim == 3 else None)
    out = np.asarray(out, np.float32)
    cpu = time.process_time() - t0
    t = torch.from_numpy(out if out.ndim == 3 else out[:, :, None]).permute(2, 0, 1)
    return {"psnr": round(psnr(t, ref), 4), "cpu_s": round(cpu, 3)}


def _member_key(suite: str, case, v: Variant, k: int, margin, seed: int, max_steps) -> str:
    """What decides member ``k``'s fit, hashed: the case's pixels, the variant's preset, overrides, rule (the
    whole rule: a preset's own rule changes too) and flip, the seed, margin and cap, and the machine and
    library versions (a fit repeats bit for bit only on one machine with the same torch)."""
    import hashlib
    import torch
    from pipeline.config import VERSION
    h = hashlib.sha256()
    for a in (case.image, case.reference, case.mask):
        h.update(b"-" if a is None else a.tobytes() + str(a.shape).encode())
    h.update(json.dumps([suite, case.name, v.preset, v.over, v.stop, bool(v.flip) and k % len(FLIPS), seed, margin,
                         max_steps, platform.node(), platform.machine(), torch.__version__, VERSION,
                         variant_rule(suite, v)],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _fit_row(suite: str, case, v: Variant, margin: int | None, seed0: int, max_steps: int | None = None,
             cache: Path | None = None) -> dict:
    """Fit ``case`` with the K members of variant ``v``; the row's measurements. With a ``cache`` folder,
    each member's measurements and images are kept there, and a member fitted before with everything the
    same (:func:`_member_key`: e.g. the first member of an ensemble of 3 and of 2) is read back, not refitted
    (its row says ``cached``)."""
    import numpy as np
    import torch
    from pipeline.bench.quality import _ref_tensor, psnr, run_suite
    from pipeline.config import PRESETS
    from pipeline.engine import distill_steps
    y_border = 4 if suite == "sr" else None
    ref = _ref_tensor(case.reference)
    members, imgs = [], {}
    over = {**v.over, "distill_steps": 0}  # counted, not run (it does not change the checked images)
    for k in range(v.k):
        key = _member_key(suite, case, v, k, margin, seed0 + k, max_steps) if cache else None
        if key and (cache / f"{key}.json").is_file() and (cache / f"{key}.npz").is_file():
            kept = json.loads((cache / f"{key}.json").read_text())
            with np.load(cache / f"{key}.npz") as z:
                imgs[k] = {kind: z[kind] for kind in z.files}
            members.append({**kept["member"], "cached": True})
            params, gflop_per_step = kept["params"], kept["gflop_per_step"]
            continue
        images: dict = {}
        seen = case
        if v.flip:
            seen = dataclasses.replace(case, image=flipped(case.image, k), reference=flipped(case.reference, k),
                                       mask=flipped(case.mask, k))
        t0 = time.process_time()
        res = run_suite(suite, [seen], device="cpu", slots=1, seed=seed0 + k, overrides=over, images=images,
                        preset=v.preset, stop_overrides=v.stop, stop_margin=margin, max_steps=max_steps)
        cpu = time.process_time() - t0
        r = res["images"][0]
        if "error" in r:
            raise RuntimeError(r["error"])
        cfg = PRESETS[res["preset"]].replace(**{f: v.over[f] for f in ("output", "distill_steps") if f in v.over})
        stop = int(r["auto_stopped_at"])
        ran = int(r["steps"])
        real = stop + distill_steps(cfg, stop)  # what `dip restore` would run: to the stop, then distil
        per = r["work"]["gflop_per_step"]
        members.append({"seed": seed0 + k, "auto_psnr": r["auto_psnr"], "auto_step": r["auto_step"],
                        "auto_from": r["auto_from"], "stopped_at": stop, "oracle_psnr": r["oracle_psnr"],
                        "oracle_step": r["oracle_step"], "ran": ran, "steps": real,
                        "gflop": round(per * real, 2), "cpu_s_ran": round(cpu, 2),
                        "cpu_s": round(cpu * real / max(ran, 1), 2),
                        "var_trace": r["var_trace"], "metric_trace": r["metric_trace"],
                        **_data_term_trace(r)})
        imgs[k] = {kind: flipped(a, k) for kind, a in images[case.name].items()} if v.flip else images[case.name]
        params, gflop_per_step = r["work"]["params"], per
        if key:
            cache.mkdir(parents=True, exist_ok=True)
            np.savez(cache / f"{key}.npz", **{kind: a for kind, a in imgs[k].items() if a is not None})
            (cache / f"{key}.json").write_text(json.dumps({"member": members[-1], "params": params,
                                                            "gflop_per_step": per}))  # the json last: complete
    row = {"params": params, "gflop_per_step": gflop_per_step, "k": v.k,
           "steps": sum(m["steps"] for m in members), "gflop": round(sum(m["gflop"] for m in members), 2),
           "cpu_s": round(sum(m["cpu_s"] for m in members), 2), "members": members,
           "rule": variant_rule(suite, v)}  # what a replay of its traces must start from
    if v.k == 1:
        row.update(auto_psnr=members[0]["auto_psnr"], oracle_psnr=members[0]["oracle_psnr"])
    else:
        def mean_of(kind):  # None when a member has no such image (a fit shorter than one check)
            if not all(imgs[k].get(kind) is not None for k in imgs):
                return None
            a = np.mean([imgs[k][kind] for k in imgs], axis=0)
            return round(psnr(torch.from_numpy(a).permute(2, 0, 1), ref, y_border), 4)
        row.update(auto_psnr=mean_of("auto"), oracle_psnr=mean_of("oracle"))
    return row


def _data_term_trace(r: dict, smooth: int = 50) -> dict:
    """The data term as the live rule sees it at every check of a run_suite row: the lowest average of
    ``smooth`` consecutive losses among those ending since the previous check (so a level is first reached
    at the same check as pipeline.stopping's discrepancy test finds it), and the noise level estimated from
    the degraded image: what a rule using the discrepancy principle can be replayed on (``loss_trace``
    [[step, loss]], ``sigma_est``)."""
    import numpy as np
    loss = np.asarray(r.get("loss") or [], np.float64)
    trace, prev = [], 0
    avg = np.convolve(loss, np.ones(smooth) / smooth, mode="valid") if len(loss) >= smooth else np.zeros(0)
    for st, *_ in r.get("metric_trace", []):  # avg[i] ends at step i + smooth
        seg = avg[max(prev, smooth) - smooth:max(0, int(st) - smooth + 1)]
        prev = int(st) + 1
        if seg.size:
            trace.append([int(st), float(f"{seg.min():.5g}")])
    return {"loss_trace": trace, **({"sigma_est": r["sigma_est"]} if "sigma_est" in r else {})}


def _tiles_of(suite: str, case, v: Variant) -> int:
    """The tile side the variant's preset fits ``case`` with (0: the whole image, the study's own fit)."""
    from pipeline.config import PRESETS
    from pipeline.bench.quality import SUITE_PRESETS
    cfg = PRESETS[v.preset or SUITE_PRESETS[suite]].replace(**{k: x for k, x in v.over.items() if k == "tile"})
    return cfg.tile if cfg.cuts(*case.image.shape[:2]) else 0


def _tiles_key(suite: str, case, v: Variant, seed: int) -> str:
    """The folder name of a tiled row's kept tiles: the case's pixels, the variant and the seed (not the
    machine: a full-size image may take several sessions; each tile's own key checks the rest)."""
    import hashlib
    h = hashlib.sha256()
    for a in (case.image, case.reference, case.mask):
        h.update(b"-" if a is None else a.tobytes() + str(a.shape).encode())
    h.update(json.dumps([suite, case.name, v.name, v.preset, v.over, v.k, seed], sort_keys=True,
                        default=str).encode())
    return f"{case.name}-{v.name}-{h.hexdigest()[:16]}"


def _tiled_row(suite: str, case, v: Variant, seed0: int, tiles: Path | None = None,
               part: tuple[int, int] | None = None) -> dict | None:
    """Fit ``case`` as the product does when the variant's preset tiles it (FitConfig.tile): through
    pipeline.fit.fit_tiled, every tile and member its own fit and stop, the distillation run. Only the
    auto-stopped PSNR: there is no oracle step (each tile has its own), so ``oracle_psnr`` is None. The
    variant's own stop overrides run as in an untiled row (a factory that carries its rule, so kept tiles
    are keyed on it); the row's ``rule`` is the one the tiles stopped by.

    With ``tiles`` (a folder), each finished tile is kept there (pipeline.tiling.TileStore) with the CPU
    seconds so far, so a stopped run goes on from its last tile; the row's ``cpu_s`` then adds up the runs
    (``runs``, ``kept_tiles``), and the folder is removed once the row is complete.

    With ``part`` (i, n) and ``tiles``: only the fits whose index is i mod n (Problem.tile_part), kept with
    the part's own CPU seconds (``cpu-<i>of<n>.json``); returns None. n such runs side by side share one
    image, and a run without a part then merges every kept fit into the row, adding up all the seconds."""
    import torch
    from pipeline.bench.quality import _problems, _ref_tensor, psnr
    from pipeline.fit import TilesPending, fit_tiled
    from pipeline.stopping import make_stopper_factory, stop_config_for
    from pipeline.tiling import TileStore
    over = {k: x for k, x in v.over.items() if k != "ensemble"}  # the preset's own K members, as tiles
    (p,) = _problems(suite, [case], v.preset, False, None, seed0, {**over, "ensemble": v.k})
    # the variant's own stop overrides on its preset's rule, as an untiled row runs them (a factory that
    # carries its rule, so the kept tiles' keys hold it); none: the product's rule, as dip restore runs it
    factory = make_stopper_factory(p.cfg, **v.stop) if v.stop else None
    rule = factory.config if factory else stop_config_for(p.cfg)
    if part and not tiles:
        raise ValueError("a tile part needs a folder to keep its fits in")
    store = TileStore(tiles / _tiles_key(suite, case, v, seed0)) if tiles else None
    mine = "cpu.json" if part is None else f"cpu-{part[0]}of{part[1]}.json"  # this run's seconds (and its kind's)
    before, others = {"cpu_s": 0.0, "runs": 0}, {"cpu_s": 0.0, "runs": 0}
    if store is not None:
        p.kept_tiles = store.load()
        for f in sorted(store.folder.glob("cpu*.json")) if p.kept_tiles else ():
            got = json.loads(f.read_text())
            into = before if f.name == mine else others
            into["cpu_s"] += got["cpu_s"]
            into["runs"] += got["runs"]
    p.tile_part = part
    t0 = time.process_time()

    def keep(_p, index: int, blob: bytes) -> None:
        store.save(index, blob)  # the tile first, then the seconds that include it
        (store.folder / mine).write_text(json.dumps(
            {"cpu_s": before["cpu_s"] + time.process_time() - t0, "runs": before["runs"] + 1}))

    for _q, r in fit_tiled([p], device="cpu", slots=1, auto=False, on_tile=keep if store else None,
                           stopper_factory=factory):
        if isinstance(r, TilesPending):
            log.info("%s/%s/%s: %s", suite, v.name, case.name, r)
            return None
        if isinstance(r, Exception):
            raise r
    cpu = others["cpu_s"] + before["cpu_s"] + time.process_time() - t0
    kept = int(r.extra["tiling"].get("kept", 0))
    w = r.extra["work"]
    unit_steps = sorted(int(t["steps"]) for t in r.extra["tiling"]["tiles"] if "steps" in t)
    out = torch.from_numpy(r.image.pixels).permute(2, 0, 1)
    return {"params": w["params"], "gflop_per_step": w["gflop_per_step"], "k": v.k, "steps": w["steps"],
            "gflop": w["gflop"], "cpu_s": round(cpu, 2), "tile": p.cfg.tile, "fits": w.get("fits"),
            "unit_steps": unit_steps, "auto_psnr": round(psnr(out, _ref_tensor(case.reference),
                                                          4 if suite == "sr" else None), 4),
            "oracle_psnr": None, "rule": rule.identity_dict(),  # the rule fit_tiled ran
            **({"kept_tiles": kept, "runs": others["runs"] + before["runs"] + 1} if kept else {})}


# ---- the run --------------------------------------------------------------------------------------------
def run(suites, part: str, names, crop: int, out: Path, sigma: float | None = None, margin: int | None = 1000,
        seed: int = 0, data=None, max_steps: int | None = None, images: list[str] | None = None,
        cache: Path | None = None, tile_part: tuple[int, int] | None = None) -> int:
    from pipeline.bench.quality import load_cases, paper_dir
    root = paper_dir(data)
    done = {row_key(r) for r in read_rows(out)}
    tiles = cache / "tiles" if cache else out.with_name(out.stem + ".tiles")  # a tiled row's finished tiles
    failed = 0
    for suite in suites:
        want = SPLIT[suite]["tune"] + SPLIT[suite]["held"] if part == "all" else SPLIT[suite][part]
        if images:
            want = [n for n in want if n in images]
        cases = load_cases(suite, root, crop=crop, only=want, sigma=sigma if suite == "denoise" else None)
        for v in variants_for(suite, names):
            for c in cases:
                key = (suite, sigma if suite == "denoise" else None, crop, v.name, c.name)
                if key in done:
                    continue
                t0 = time.time()
                row = {"suite": suite, "sigma": key[1], "crop": crop, "variant": v.name, "image": c.name,
                       "part": "tune" if c.name in SPLIT[suite]["tune"] else "held", "note": v.note,
                       "preset": v.preset, "over": v.over, "stop": v.stop,
                       **({"flip": True} if v.flip else {})}
                try:
                    tiled = v.name != ANCHORS[suite] and _tiles_of(suite, c, v)
                    if tile_part and not tiled:
                        continue  # not tiled: the run without a part does it, once
                    if v.name == ANCHORS[suite]:
                        row.update(_anchor_row(suite, c, sigma))
                    elif tiled:
                        got = _tiled_row(suite, c, v, seed, tiles, tile_part)
                        if got is None:  # a part's share, kept: the row is the merging run's
                            continue
                        row.update(got)
                    else:
                        row.update(_fit_row(suite, c, v, margin, seed, max_steps, cache))
                except Exception as e:  # noqa: BLE001 - one bad row must not end a study of hours
                    log.error("%s/%s/%s failed: %s", suite, v.name, c.name, e)
                    failed += 1
                    continue
                row.update(margin=margin, seed=seed, max_steps=max_steps, wall_s=round(time.time() - t0, 1),
                           date=time.strftime("%Y-%m-%d %H:%M"), host=platform.node(),
                           threads=_threads())
                append_row(out, row)
                done.add(key)
                if "tile" in row:  # the row is the record now: its kept tiles go
                    from pipeline.tiling import TileStore
                    TileStore(tiles / _tiles_key(suite, c, v, seed)).clear()
                log.info("%s %s %s: auto %.2f dB, oracle %s dB, %s steps, %s GFLOP, %.0f s", suite, v.name, c.name,
                         row.get("auto_psnr", row.get("psnr")), row.get("oracle_psnr"), row.get("steps"),
                         row.get("gflop"), row["wall_s"])
    return 1 if failed else 0


def _threads() -> int:
    import torch
    return torch.get_num_threads()


# ---- the tables -----------------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> list[dict]:
    """Per (suite, sigma, crop, part, variant): means over the images, beside the paper preset's on the
    same images (only images both have), and the GFLOP ratio."""
    from collections import defaultdict
    by = defaultdict(dict)
    for r in rows:
        by[(r["suite"], r.get("sigma"), r["crop"], r["part"], r["variant"])][r["image"]] = r
    out = []
    for (suite, sigma, crop, part, var), imgs in sorted(by.items(), key=lambda kv: tuple(map(str, kv[0]))):
        paper = by.get((suite, sigma, crop, part, "paper"), {})
        names = sorted(imgs)
        both = [n for n in names if n in paper]
        s = {"suite": suite, "sigma": sigma, "crop": crop, "part": part, "variant": var, "n": len(names),
             "images": names}
        if var == ANCHORS.get(suite):
            s.update(psnr=_mean([imgs[n]["psnr"] for n in names]), cpu_s=_mean([imgs[n]["cpu_s"] for n in names]))
        else:
            s.update(auto=_mean([imgs[n]["auto_psnr"] for n in names]),
                     oracle=_mean([imgs[n]["oracle_psnr"] for n in names]),
                     steps=_mean([imgs[n]["steps"] for n in names]), gflop=_mean([imgs[n]["gflop"] for n in names]),
                     cpu_s=_mean([imgs[n]["cpu_s"] for n in names]), params=imgs[names[0]]["params"])
            if both and var != "paper":
                s["d_auto"] = round(_mean([imgs[n]["auto_psnr"] - paper[n]["auto_psnr"] for n in both]), 3)
                s["gflop_ratio"] = round(sum(imgs[n]["gflop"] for n in both) / sum(paper[n]["gflop"] for n in both), 4)
                s["vs_paper_on"] = len(both)
        anchor = by.get((suite, sigma, crop, part, ANCHORS.get(suite)), {})
        if var != ANCHORS.get(suite) and anchor and all(n in anchor for n in names):
            s["d_anchor"] = round(_mean([imgs[n].get("auto_psnr", 0) - anchor[n]["psnr"] for n in names]), 3)
        out.append(s)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 4) if xs else None


def print_tables(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    cur = None
    for s in summarize(rows):
        head = (s["suite"], s["sigma"], s["crop"], s["part"])
        if head != cur:
            cur = head
            sig = f", sigma {s['sigma']:g}" if s["sigma"] is not None else ""
            size = f"{s['crop']}^2 crops" if s["crop"] else "full size"
            print(f"\n== {s['suite']}{sig}, {size}, {s['part']} images\n"
                  f"{'variant':12s}{'n':>3s}{'auto dB':>9s}{'oracle':>8s}{'vs paper':>9s}{'steps':>7s}{'GFLOP':>9s}"
                  f"{'x paper':>8s}{'CPU s':>8s}{'params':>10s}{'vs anchor':>10s}", file=file)
        if "psnr" in s:
            print(f"{s['variant']:12s}{s['n']:3d}{s['psnr']:9.2f}{'':8s}{'':9s}{'':7s}{'':9s}{'':8s}"
                  f"{s['cpu_s']:8.1f}", file=file)
            continue
        def f(x, spec):  # a missing value as a dash in the column's width
            return format(x, spec) if x is not None else format("-", ">" + spec.lstrip("+").split(".")[0])
        print(f"{s['variant']:12s}{s['n']:3d}{f(s['auto'], '9.2f')}{f(s['oracle'], '8.2f')}"
              f"{f(s.get('d_auto'), '+9.2f') if 'd_auto' in s else '':>9s}{f(s['steps'], '7.0f')}"
              f"{f(s['gflop'], '9.0f')}{f(s.get('gflop_ratio'), '8.3f') if 'gflop_ratio' in s else '':>8s}"
              f"{f(s['cpu_s'], '8.1f')}{s['params']:10,d}"
              f"{f(s.get('d_anchor'), '+10.2f') if 'd_anchor' in s else '':>10s}", file=file)


def markdown_tables(rows: list[dict], variants: list[str] | None = None) -> str:
    """The tables of :func:`print_tables` as Markdown (docs/efficiency.md is made from the JSONL with it).
    "vs paper" and "x paper" are on the images both have: "(on k)" says when that is fewer than n."""
    out, cur = [], None
    for s in summarize(rows):
        if variants and s["variant"] not in variants:
            continue
        head = (s["suite"], s["sigma"], s["crop"], s["part"])
        if head != cur:
            cur = head
            sig = f", σ={s['sigma']:g}" if s["sigma"] is not None else ""
            size = f"{s['crop']}² crops" if s["crop"] else "full size"
            out += ["", f"**{s['suite']}{sig}, {size}, {s['part']} images**", "",
                    "| variant | n | auto-stop dB | oracle dB | vs paper | steps | GFLOP/image | × paper | CPU s/image "
                    "| params | vs anchor |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        f = lambda x, spec: format(x, spec) if x is not None else "–"  # noqa: E731
        if "psnr" in s:
            out.append(f"| {s['variant']} | {s['n']} | {s['psnr']:.2f} | | | | | | {s['cpu_s']:.1f} | | |")
            continue
        on = f" (on {s['vs_paper_on']})" if s.get("vs_paper_on", s["n"]) < s["n"] else ""  # fewer images
        out.append(f"| {s['variant']} | {s['n']} | {f(s['auto'], '.2f')} | {f(s['oracle'], '.2f')} | "
                   f"{f(s.get('d_auto'), '+.2f')}{on} | {f(s['steps'], '.0f')} | {f(s['gflop'], '.0f')} | "
                   f"{f(s.get('gflop_ratio'), '.3f')} | {f(s['cpu_s'], '.1f')} | {s['params']:,} | "
                   f"{f(s.get('d_anchor'), '+.2f')} |")
    full = [r for r in rows if not r["crop"] and "auto_psnr" in r and (not variants or r["variant"] in variants)]
    if full:
        out += ["", published_table(full)]
    return "\n".join(out).strip() + "\n"


def published_table(rows: list[dict]) -> str:
    """Full-size rows image by image beside the paper's published numbers for the same image (its DIP
    and its classical baseline, pipeline.bench.cases.PAPER), with the means over the images listed."""
    from pipeline.bench.cases import BASELINE_NAME, PAPER
    out = []
    for (suite, var), rs in sorted(_group(rows, ("suite", "variant")).items()):
        rs = sorted((r for r in rs if r["image"] in PAPER.get(suite, {})), key=lambda r: r["image"])
        if not rs:
            continue
        base = BASELINE_NAME.get(suite, "baseline")
        base = base if base == "bicubic" else base.upper()
        out += [f"**{suite}, full size, `{var}` image by image, beside the paper's published numbers**", "",
                f"| image | {var} dB | the paper's DIP dB | the paper's {base} dB | GFLOP | CPU s |",
                "|---|---|---|---|---|---|"]
        for r in rs:
            dip, cls = PAPER[suite][r["image"]]
            out.append(f"| {r['image']} | {r['auto_psnr']:.2f} | {dip:.2f} | {cls:.2f} | {r['gflop']:.0f} | "
                       f"{r['cpu_s']:.0f} |")
        m = lambda xs: sum(xs) / len(xs)  # noqa: E731 - not _mean: it rounds before the format does
        out.append(f"| mean of {len(rs)} | {m([r['auto_psnr'] for r in rs]):.2f} | "
                   f"{m([PAPER[suite][r['image']][0] for r in rs]):.2f} | "
                   f"{m([PAPER[suite][r['image']][1] for r in rs]):.2f} | {m([r['gflop'] for r in rs]):.0f} | "
                   f"{m([r['cpu_s'] for r in rs]):.0f} |")
        out.append("")
    return "\n".join(out).strip()


def _group(rows: list[dict], keys: tuple) -> dict:
    from collections import defaultdict
    by = defaultdict(list)
    for r in rows:
        by[tuple(r[k] for k in keys)].append(r)
    return by


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="dip bench study", description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="denoise,sr,inpaint", help="comma list of denoise, sr, inpaint")
    p.add_argument("--part", choices=("tune", "held", "all"), default="tune")
    p.add_argument("--variants", help="comma list (default: every candidate); the anchors are bm3d, bicubic, "
                                      "biharmonic")
    p.add_argument("--crop", type=int, default=64, help="centre crop side (default 64)")
    p.add_argument("--sigma", type=float, help="denoising: synthetic noise of this sigma on the ground truth "
                                               "(default: the authors' sigma=25 images)")
    p.add_argument("--margin", type=int, default=1000,
                   help="steps fitted after auto-stop fired (default 1000; 0 = stop there; -1 = to the cap)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, help="cap every variant's steps (a smoke test)")
    p.add_argument("--images", help="comma list: only these images of the part")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one process per core)")
    p.add_argument("--out", default="docs/study/study.jsonl", help="the JSONL file rows are appended to")
    p.add_argument("--table", metavar="JSONL", nargs="+", help="only print the tables of these files")
    p.add_argument("--markdown", action="store_true", help="with --table: as Markdown")
    p.add_argument("--data", default=None)
    p.add_argument("--tile-part", metavar="I/N", help="a tiled row's share for one of N processes (1..N): fit only "
                   "the fits whose index is I-1 mod N, keep them beside --out and write no row; a run without "
                   "it merges the kept fits into the row (rows that are not tiled are left to that run)")
    p.add_argument("--cache", metavar="DIR", help="keep each ensemble member's fit here, and reuse a member fitted "
                   "before with the same everything (on this machine)")
    return p


def main(suite: str = "denoise,sr,inpaint", part: str = "tune", variants: str | None = None, crop: int = 64,
         sigma: float | None = None, margin: int = 1000, seed: int = 0, max_steps: int | None = None,
         images: str | None = None, threads: int = 1, out: str = "docs/study/study.jsonl",
         table: list[str] | None = None, markdown: bool = False, data=None, cache: str | None = None,
         tile_part: str | None = None) -> int:
    """`dip bench study` (the options of :func:`build_parser`). Returns the exit code."""
    if table:
        rows = [r for t in ([table] if isinstance(table, str) else table) for r in read_rows(Path(t))]
        if markdown:
            print(markdown_tables(rows, [v.strip() for v in variants.split(",")] if variants else None))
        else:
            print_tables(rows)
        return 0
    import torch
    torch.set_num_threads(max(1, int(threads)))
    suites = [s.strip() for s in suite.split(",") if s.strip()]
    for s in suites:
        if s not in SPLIT:
            print(f"dip bench study: unknown suite {s!r}", file=sys.stderr)
            return 2
    names = [n.strip() for n in variants.split(",")] if variants else None
    try:
        for s in suites:
            variants_for(s, names)
    except ValueError as e:
        print(f"dip bench study: {e}", file=sys.stderr)
        return 2
    try:
        share = parse_part(tile_part) if tile_part else None
    except ValueError as e:
        print(f"dip bench study: {e}", file=sys.stderr)
        return 2
    path = Path(out)
    rc = run(suites, part, names, crop, path, sigma=sigma, margin=None if margin < 0 else margin, seed=seed,
             data=data, max_steps=max_steps, images=[n.strip() for n in images.split(",")] if images else None,
             cache=Path(cache) if cache else None, tile_part=share)
    print_tables(read_rows(path))
    return rc


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` (1-based, as a user counts processes) -> (I-1, N), fit_tiled's ``Problem.tile_part``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--tile-part takes I/N, e.g. 1/2, not {text!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"--tile-part {text}: I must be 1 to N")
    return i - 1, n


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main(**vars(build_parser().parse_args())))
