"""`dip bench study`: the efficiency study (issue 16): the paper's quality for less work, measured on crops.

An image's cost is its steps times the work of one step (pipeline.work), the same on every device. This
bench fits variants of the presets (a lighter network, another schedule, an ensemble of light fits...)
to the paper's sets, beside the paper's own preset in the same run, and records per variant and image:
the PSNR with auto-stop (no ground truth) and at the oracle step, the steps a real run would take
(auto-stop's stop, plus the distillation), the GFLOP of that run, and its CPU seconds. Classical
anchors run on the same crops: BM3D for denoising (the ``bm3d`` package, an extra: ``pip install
'dip[bench]'``), bicubic for super-resolution, biharmonic inpainting (scikit-image) for inpainting.

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
from dataclasses import dataclass, field
from pathlib import Path

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
ANCHORS = {"denoise": "bm3d", "sr": "bicubic", "inpaint": "biharmonic"}


@dataclass(frozen=True)
class Variant:
    """A preset (None: the suite's paper preset) with config overrides (``net``: NetConfig fields), its
    auto-stop rule's overrides, and K: fits averaged per image."""

    name: str
    preset: str | None = None
    over: dict = field(default_factory=dict)
    stop: dict = field(default_factory=dict)
    k: int = 1
    note: str = ""
    flip: bool = False  # member k fits the image flipped by FLIPS[k % 4] (its result flipped back)


def _w(c: int, scales: int = 5) -> dict:
    return {"channels_down": (c,) * scales, "channels_up": (c,) * scales}


def _v(name, note, preset=None, k=1, stop=None, flip=False, **over) -> Variant:
    return Variant(name, preset, over, dict(stop or {}), k, note, flip)


# (up-down, left-right) of an ensemble's member k in a flipped variant: the members see the image in four
# orientations, so the grid of the network's strides and upsamplings lies differently on it in each
FLIPS = ((False, False), (False, True), (True, False), (True, True))


def _flipped(a, k: int):
    """``a`` (h, w[, C]) flipped as member ``k`` sees it (a flip is its own inverse); None stays None."""
    import numpy as np
    if a is None:
        return None
    ud, lr = FLIPS[k % len(FLIPS)]
    return np.ascontiguousarray(a[::-1 if ud else 1, ::-1 if lr else 1])


# The stopping rule's overrides of the light denoising nets (the rule replayed on the tuning traces: patience 4,
# and a new minimum must fall to 30 %; pipeline.stopping ships it for denoise-lite) and of inpainting at lr 0.01
# (the inpainting rule's time scales, not inpaint-sparse's, which are for lr 0.001).
LIGHT_RULE = {"patience": 4, "rel_tol": 0.7}
INPAINT_RULE = {"patience": 16, "min_steps": 500}
# denoise-lite's rule since stop 28 (four fits averaged): the light rule, each member's image at its minimum
ENSEMBLE_RULE = {**LIGHT_RULE, "lag": 0}
# the noise floor under the rule (StopConfig.floor): denoise-lite's since stop 33 (dl-floor10's choice)
FLOOR = {"floor": 1.0, "floor_wait": 10}
# a rule that never fires: each fit runs to its cap and the result is its last image, as a preset with
# auto_stop off (inpaint-lite since stop 29) fits
TO_THE_CAP = {"patience": 10 ** 6, "min_steps": 500}

# The candidates of issue 16, each alone against the paper preset ("paper"), then combined. Names are
# short: they are the table's rows. Time scales of the stopping rule follow the schedule where it changes.
CANDIDATES = [
    _v("paper", "the suite's paper preset (the baseline)"),
    # the optimiser and its schedule
    _v("lr2x", "learning rate x2", lr=None),  # filled per suite: twice the preset's
    _v("radam", "RAdam, lr 0.1, x0.9 every 300 steps (DIP-SURE)", optimizer="radam", lr=0.1, lr_decay=0.9,
       lr_decay_every=300),
    _v("warmup", "Adam with a 100-step linear warm-up", lr_warmup=100),
    _v("emawarm", "output average with a warm-up of its decay", ema_warmup=True),
    # the network
    _v("w96", "96 channels a scale", net=_w(96)),
    _v("w64", "64 channels a scale", net=_w(64)),
    _v("w48", "48 channels a scale", net=_w(48)),
    _v("w32", "32 channels a scale", net=_w(32)),
    _v("s4", "4 scales", net={**_w(128, 4), "channels_skip": (4,) * 4}),
    _v("zeropad", "zero padding instead of reflection", net={"pad": "zero"}),
    _v("nocatbn", "no BatchNorm after the concatenations", net={"bn_cat": False}),
    _v("no1x1", "no 1x1 convolution after each up block", net={"need1x1_up": False}),
    _v("nearest", "nearest upsampling", net={"upsample": "nearest"}),
    _v("d8", "input depth 8", net={"input_depth": 8}),
    _v("w64x2", "two fits of 64 channels, averaged", k=2, net=_w(64)),
    _v("w48x2", "two fits of 48 channels, averaged", k=2, net=_w(48)),
    _v("w32x2", "two fits of 32 channels, averaged", k=2, net=_w(32)),
    _v("w32x4", "four fits of 32 channels, averaged", k=4, net=_w(32)),
    # the light nets stop at their knee sooner than the paper's rule (8 checks of patience) waits: the rule
    # replayed on the tuning images' recorded traces (docs/efficiency.md) chose patience 4, and for 32
    # channels a new minimum must fall to 30 % (rel_tol 0.7)
    _v("d-w48", "48 channels, patience 4", net=_w(48), stop={"patience": 4}),
    _v("d-w32", "32 channels, rel_tol 0.7, patience 4", net=_w(32), stop=LIGHT_RULE),
    _v("d-w48x2", "two fits of d-w48, averaged", k=2, net=_w(48), stop={"patience": 4}),
    _v("d-w32x2", "two fits of d-w32, averaged", k=2, net=_w(32), stop=LIGHT_RULE),
    _v("d-w32x3", "three fits of d-w32, averaged", k=3, net=_w(32), stop=LIGHT_RULE),
    _v("s-w32", "32 channels, 1500 steps", net=_w(32), steps=1500),
    _v("d-w32e", "d-w32 with the average's warm-up", net=_w(32), stop=LIGHT_RULE,
       ema_warmup=True),
    _v("d-w32ex2", "two fits of d-w32e, averaged", k=2, net=_w(32), stop=LIGHT_RULE,
       ema_warmup=True),
    _v("d-w32ex2n", "d-w32ex2 without the BatchNorm after the concatenations", k=2,
       net={**_w(32), "bn_cat": False}, stop=LIGHT_RULE, ema_warmup=True),
    _v("s-w32e", "s-w32 with the average's warm-up", net=_w(32), steps=1500, ema_warmup=True),
    _v("i-w32e", "i-w32 with the average's warm-up", lr=0.01, steps=3000, net=_w(32), ema_warmup=True,
       stop=INPAINT_RULE),
    # the architecture's candidates alone, each on the light base d-w32 (a tenth of the paper net's cost to
    # measure, and the base the new presets start from)
    *[_v(f"d32-{n}", f"d-w32 with {note}", net={**_w(32, len(net.get("channels_skip", (4,) * 5))), **net},
         stop=LIGHT_RULE)
      for n, note, net in (("zero", "zero padding", {"pad": "zero"}),
                           ("nocatbn", "no BatchNorm after the concatenations", {"bn_cat": False}),
                           ("no1x1", "no 1x1 convolution after each up block", {"need1x1_up": False}),
                           ("nearest", "nearest upsampling", {"upsample": "nearest"}),
                           ("in8", "input depth 8", {"input_depth": 8}),
                           ("s4", "4 scales", {"channels_skip": (4,) * 4}))],
    # a decoder alone (NetConfig.arch="decoder"): ConvDecoder-style (3x3 convolutions) and Deep-Decoder-style
    # (1x1), z at 1/32 of the canvas, on the light denoising rule
    *[_v(n, note, net={"arch": "decoder", "channels_up": (c,) * 5, "filter_up": k},
         stop=LIGHT_RULE)
      for n, note, c, k in (("dec32", "a ConvDecoder-style decoder, 5 x 32 channels, 3x3", 32, 3),
                            ("dec64", "a ConvDecoder-style decoder, 5 x 64 channels, 3x3", 64, 3),
                            ("dd128", "a Deep-Decoder-style decoder, 5 x 128 channels, 1x1", 128, 1))],
    # the image size: denoise-lite fits images above 64^2 as 64^2 tiles (FitConfig.tile); against it, the
    # same preset fitted whole, and as 128^2 tiles (measured at 256^2 and 512^2: docs/efficiency.md)
    _v("dl-whole", "denoise-lite fitted whole, not as 64^2 tiles", preset="denoise-lite", k=2, ensemble=1,
       tile=0),
    _v("dl-t128", "denoise-lite as 128^2 tiles", preset="denoise-lite", k=2, ensemble=1, tile=128),
    # the noise floor under the light rule (StopConfig.floor), chosen by the rule written down before its rows
    # ran: replayed member by member on the tune crops at sigma 15, 25 and 50 (docs/efficiency.md)
    _v("dl-floor10", "denoise-lite whose stop waits for the data term to reach sigma_est^2 (10 checks at most)",
       preset="denoise-lite", k=6, stop=FLOOR, ensemble=1),
    # inpainting's paper preset (lr 0.001, 11000 steps) is ten times slower than the others: its schedule at
    # the others' pace, with the inpainting rule's time scales for lr 0.01 (pipeline.stopping)
    _v("i-fast", "lr 0.01, 3000 steps at most", lr=0.01, steps=3000, stop=INPAINT_RULE),
    _v("i-w48", "48 channels, lr 0.01, 3000 steps", lr=0.01, steps=3000, net=_w(48),
       stop=INPAINT_RULE),
    _v("i-w32", "32 channels, lr 0.01, 3000 steps", lr=0.01, steps=3000, net=_w(32),
       stop=INPAINT_RULE),
    # i-w32 was still improving at its 3000-step cap on two of the four tuning crops (boat, house)
    _v("i-w32l", "32 channels, lr 0.01, 6000 steps", lr=0.01, steps=6000, net=_w(32),
       stop=INPAINT_RULE),
    # SR and inpainting lost 0.26 and 0.47 dB held out with one light fit (stop 25); two fits averaged
    # gained 0.46 dB for denoising (docs/stopping.md), and the SR fits were still improving at their cap
    _v("s-w32x2", "two fits of s-w32, averaged", k=2, net=_w(32), steps=1500),
    _v("l-w32", "32 channels, 3000 steps", net=_w(32), steps=3000),
    _v("w32x3", "three fits of 32 channels, averaged", k=3, net=_w(32)),
    _v("l-w32x2", "two fits of l-w32, averaged", k=2, net=_w(32), steps=3000),
    _v("i-w32x2", "two fits of i-w32, averaged", k=2, lr=0.01, steps=3000, net=_w(32),
       stop=INPAINT_RULE),
    _v("d-w32ex4", "four fits of d-w32e, averaged", k=4, net=_w(32), stop=LIGHT_RULE, ema_warmup=True),
    # inpainting with the 6000-step cap still lost 0.36 dB held out (stop 26): its two light levers combined
    _v("i-w32lx2", "two fits of i-w32l, averaged", k=2, lr=0.01, steps=6000, net=_w(32),
       stop=INPAINT_RULE),
    # held out, the light net's best checked image on couple (30.63, step 3150) was 0.68 under the paper
    # net's (31.31, step 3800): width, not the schedule's length
    _v("i-w48l", "48 channels, lr 0.01, 6000 steps", lr=0.01, steps=6000, net=_w(48),
       stop=INPAINT_RULE),
    # stop 28: on the tuning traces of i-w32l and i-w48l the PSNR flattens or falls a little after step
    # 3000-4000 at lr 0.01 (barbara, boat, peppers256; house still rises): the step size is one lever, the
    # width another (64 channels is 0.26x the paper's work a step, inside the bound at 6000 steps)
    _v("i-w32ld", "i-w32l with lr x0.5 every 1500 steps", lr=0.01, steps=6000, net=_w(32),
       lr_decay=0.5, lr_decay_every=1500, stop=INPAINT_RULE),
    _v("i-w64l", "64 channels, lr 0.01, 6000 steps", lr=0.01, steps=6000, net=_w(64),
       stop=INPAINT_RULE),
    # the paper's schedule is lr 0.001 for 11000 steps: a smaller step than the light fits' 0.01, for longer
    # (the rule's time scales x2, between the light fits' and inpaint-sparse's)
    _v("i-w32s", "32 channels, lr 0.003, 12000 steps", lr=0.003, steps=12000, net=_w(32),
       stop={"patience": 32, "min_steps": 1500}),
    # an average of K fits takes out much of each member's noise, so a member may stop later than a single
    # fit's best step (the light rule was replayed for single fits): the image at the variance minimum
    # (lag 0, not one check before it), and a new minimum that need only halve the last (rel_tol 0.5)
    _v("d-w32ex4l0", "d-w32ex4, each member's image at its minimum (lag 0)", k=4, net=_w(32),
       stop=ENSEMBLE_RULE, ema_warmup=True),
    _v("d-w32ex4r5", "d-w32ex4 with rel_tol 0.5", k=4, net=_w(32), stop={**LIGHT_RULE, "rel_tol": 0.5},
       ema_warmup=True),
    # what `--preset denoise-lite --ensemble 2` fits since stop 28: two members, lag 0
    _v("d-w32ex2l0", "d-w32ex2 with lag 0", k=2, net=_w(32), stop=ENSEMBLE_RULE, ema_warmup=True),
    # stop 29: the light inpainting fits differ by image (barbara peaks by step 1550 and falls 1 dB, house still
    # rises at 6000), which one cap and the variance rule cannot tell apart: self-validation (FitConfig.holdout)
    # holds back some known pixels and stops where their error stops falling, under a longer cap; the rule's
    # time scales are the light inpainting rule's. Two members hold back different pixels.
    _v("i-w32v", "32 channels, lr 0.01, 5 % of the known pixels held back to stop on, 10000 steps", lr=0.01,
       steps=10000, net=_w(32), holdout=0.05, stop=INPAINT_RULE),
    _v("i-w32v10", "i-w32v holding back 10 %", lr=0.01, steps=10000, net=_w(32), holdout=0.1, stop=INPAINT_RULE),
    _v("i-w32vx2", "two fits of i-w32v, averaged", k=2, lr=0.01, steps=10000, net=_w(32), holdout=0.05,
       stop=INPAINT_RULE),
    # stop 29: denoise-lite's four members, each fitting the image in another orientation (flipped up-down,
    # left-right, both), their results flipped back before the average
    _v("d-w32ex4f", "d-w32ex4l0 with member k fitting the image flipped by k", k=4, net=_w(32), stop=ENSEMBLE_RULE,
       ema_warmup=True, flip=True),
    # the paper network's lr x2 had scored +0.11 dB for the same work (stop 25); on denoise-lite's four members
    _v("d-w32ex4lr2", "d-w32ex4l0 at lr 0.02", k=4, net=_w(32), stop=ENSEMBLE_RULE, ema_warmup=True, lr=0.02),
    # i-w32lx2 lost on house where the variance rule stopped a member at step 4500 (its oracle was the best of
    # all): an average of fits run to the cap, where the late detail each member draws is averaged away
    _v("i-w32lx2c", "two fits of i-w32l run to the cap, averaged", k=2, lr=0.01, steps=6000, net=_w(32),
       stop=TO_THE_CAP),
    # stop 30: more, narrower members for about denoise-lite's work (a 24-channel step is 0.59x a 32-channel
    # one, a 16-channel step 0.29x): an average of more fits takes out more of each member's noise, and the
    # narrower single fits had scored no worse (d-w48 under d-w32). ex4's and ex6's members are ex8's first
    # ones (--cache), so the three come from one set of fits. Stop 31 chose d-w24ex6l0 as denoise-lite.
    _v("d-w24ex8l0", "eight fits of 24 channels, lag 0", k=8, net=_w(24), stop=ENSEMBLE_RULE, ema_warmup=True),
    _v("d-w24ex6l0", "six fits of 24 channels, lag 0", k=6, net=_w(24), stop=ENSEMBLE_RULE, ema_warmup=True),
    _v("d-w24ex4l0", "four fits of 24 channels, lag 0", k=4, net=_w(24), stop=ENSEMBLE_RULE, ema_warmup=True),
    # stop 33: the noise floor under the rule (dl-floor10 on the held-out crops: +0.59 dB at sigma 15, +0.09 at
    # 25, the same images at 50): denoise-lite's rule since then, d-w24ex6l0 with the floor
    _v("d-w24ex6l0f", "six fits of 24 channels, lag 0, the noise floor 1.0 (10 checks)", k=6, net=_w(24),
       stop={**ENSEMBLE_RULE, **FLOOR}, ema_warmup=True),
    # after the choice (not part of it): what `--preset denoise-lite --ensemble 2` fits since stop 31
    _v("d-w24ex2l0", "two fits of 24 channels, lag 0", k=2, net=_w(24), stop=ENSEMBLE_RULE, ema_warmup=True),
    # stop 35: an ensemble's members may fit further than a single fit should (their average takes out part
    # of the noise each has begun to fit): a lower floor, scored on the ensemble's image (the tune replay of
    # stop 33 scored members alone: 0.9 was best at sigma 15 and lost at 25 and 50). Chosen on the tune crops
    # by the rule in docs/efficiency.md, written before these rows ran.
    *[_v(f"d-w24ex6l0f{f:02d}", f"six fits of 24 channels, lag 0, the noise floor 0.{f} (20 checks)", k=6,
         net=_w(24), stop={**ENSEMBLE_RULE, "floor": f / 10, "floor_wait": 20}, ema_warmup=True) for f in (9, 8)],
    # stop 37: the sigma-15 rows of the lower floors point to a floor that follows the noise level: 0.9 (20 checks)
    # where the noise estimated from the fit's input is under 20/255 (the midpoint of 15 and 25), else the
    # shipped floor. On the tune crops its fits are f09's at sigma 15 and the shipped rule's at 25 and 50.
    # Held out by the rule written before its rows: +0.34 dB at sigma 15, so denoise-lite's rule since stop 37
    _v("d-w24ex6l0fs", "six fits of 24 channels, lag 0, the noise floor 0.9 (20 checks) under sigma_est 20, "
       "else 1.0 (10 checks)", k=6, net=_w(24),
       stop={**ENSEMBLE_RULE, **FLOOR, "floor_low": 0.9, "floor_low_below": 20 / 255, "floor_low_wait": 20},
       ema_warmup=True),
    # stop 35, after the floor's adoption (not part of a choice): what `--ensemble 2` fits since stop 33
    _v("d-w24ex2l0f", "two fits of 24 channels, lag 0, the noise floor 1.0 (10 checks)", k=2, net=_w(24),
       stop={**ENSEMBLE_RULE, **FLOOR}, ema_warmup=True),
    _v("d-w16ex16l0", "sixteen fits of 16 channels, lag 0", k=16, net=_w(16), stop=ENSEMBLE_RULE,
       ema_warmup=True),
    _v("d-w16ex12l0", "twelve fits of 16 channels, lag 0", k=12, net=_w(16), stop=ENSEMBLE_RULE, ema_warmup=True),
]


def variants_for(suite: str, names: list[str] | None, extra: dict | None = None) -> list[Variant]:
    """The named variants for a suite (all candidates when ``names`` is None), with the suite-dependent
    fields filled in; ``extra``: more variants by name (the study's combinations, the new presets)."""
    from pipeline.bench.quality import SUITE_PRESETS
    from pipeline.config import PRESETS
    base = PRESETS[SUITE_PRESETS[suite]]
    pool = {v.name: v for v in CANDIDATES}
    pool.update(extra or {})
    pool.update(COMBINED.get(suite, {}))
    out = []
    for n in names or [v.name for v in CANDIDATES]:
        if n in ANCHORS.values():  # each suite has its own anchor; the others' are not for it
            if n == ANCHORS[suite]:
                out.append(Variant(n, note="classical anchor"))
            continue
        if n not in pool and n in PRESETS and PRESETS[n].task == base.task:  # a preset, as `dip restore` runs it
            p = PRESETS[n]
            pool[n] = Variant(n, n, {"ensemble": 1}, {} if p.auto_stop else TO_THE_CAP, p.ensemble, f"the {n} preset")
        if n not in pool:
            raise ValueError(f"unknown variant {n!r} for {suite}; known: {', '.join(sorted(pool))}, {ANCHORS[suite]}")
        v = pool[n]
        if v.preset and PRESETS[v.preset].task != base.task:  # a variant of another task's preset
            if names:
                raise ValueError(f"variant {n!r} is of the {v.preset} preset, not for {suite}")
            continue
        if "lr" in v.over and v.over["lr"] is None:
            v = dataclasses.replace(v, over={**v.over, "lr": 2 * base.lr})  # every other field kept (flip too)
        out.append(v)
    return out


# Combinations of the winners, per suite (filled in as the study goes: docs/efficiency.md).
COMBINED: dict[str, dict[str, Variant]] = {}


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


def variant_rule(suite: str, v: Variant) -> dict:
    """The auto-stop rule a variant's fits run under, as a StopConfig dict: its preset's rule (not the
    task's default), with the variant's own overrides, as pipeline.bench.quality.run_suite builds it."""
    from pipeline.bench.cases import SR_SCALE, SUITE_PRESETS, SUITE_TASKS
    from pipeline.config import make_config
    from pipeline.stopping import stop_config_for
    kw = {"scale": SR_SCALE} if suite == "sr" else {}
    kw.update({f: v.over[f] for f in ("output",) if f in v.over})  # "last" has no lag
    return stop_config_for(make_config(SUITE_TASKS[suite], preset=v.preset or SUITE_PRESETS[suite], **kw),
                           **v.stop).identity_dict()


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
            seen = dataclasses.replace(case, image=_flipped(case.image, k), reference=_flipped(case.reference, k),
                                       mask=_flipped(case.mask, k))
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
        imgs[k] = {kind: _flipped(a, k) for kind, a in images[case.name].items()} if v.flip else images[case.name]
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
