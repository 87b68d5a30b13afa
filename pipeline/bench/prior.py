"""`dip bench prior`: why the Deep Image Prior works, on your own image (the paper's Figure 7).

The same generator, from the same seed, is fitted to four targets made from one image:

- ``natural``: the image itself;
- ``noisy``: the image plus Gaussian noise (sigma 25/255 unless ``--sigma``);
- ``shuffled``: the image's pixels in a fixed random order (the same values, no structure);
- ``noise``: uniform white noise of the image's size and channels.

All four go through the batched engine as one batch of four slots, with no stopping and no input noise
taken away: the data-term MSE of every step is recorded. A natural image is fitted much faster than the
same pixels scrambled, and noise is resisted: that is the prior, and the reason a fit must stop before it
learns the noise. For the noisy target it also says when the loss first falls under the noise variance
(sigma^2: from there on the fit is learning the noise), beside the step that auto-stop chooses for the
same image.

Writes ``prior.png`` (the four curves on log-log axes), ``prior.json`` and a table on stdout::

    dip bench prior photo.png --out prior/                     # CPU default: a 64x64 crop, the light preset, 600 steps
    dip bench prior photo.png --size 256 --preset denoise --steps 2400 --device cuda
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

TARGETS = ("natural", "noisy", "shuffled", "noise")
CPU_STEPS = 600  # the CPU default's steps (the light preset's four 64x64 fits: about a minute on 2 cores)
THRESHOLDS = (0.01, 0.003)


def make_targets(img: np.ndarray, sigma: float, seed: int) -> dict[str, np.ndarray]:
    """The four (H, W, C) float32 targets in [0, 1] of :mod:`this bench <pipeline.bench.prior>`, from one
    seed: the noise, the permutation and the white noise are the same for the same image size and seed.

    >>> t = make_targets(np.linspace(0, 1, 48, dtype=np.float32).reshape(4, 4, 3), 25 / 255, 0)
    >>> sorted(t), t["shuffled"].shape, bool(np.allclose(np.sort(t["shuffled"], None), np.sort(t["natural"], None)))
    (['natural', 'noise', 'noisy', 'shuffled'], (4, 4, 3), True)
    """
    rng = np.random.default_rng(seed)
    h, w, c = img.shape
    noisy = np.clip(img + rng.normal(0.0, sigma, img.shape), 0, 1)
    perm = rng.permutation(h * w)
    shuffled = img.reshape(h * w, c)[perm].reshape(h, w, c)
    noise = rng.random(img.shape)
    return {k: np.ascontiguousarray(v, dtype=np.float32)
            for k, v in (("natural", img), ("noisy", noisy), ("shuffled", shuffled), ("noise", noise))}


def steps_to(loss: list[float], thresholds=THRESHOLDS) -> dict[str, int | None]:
    """The first step (from 1) at which the loss is at or under each threshold, or None.

    >>> steps_to([0.1, 0.02, 0.009, 0.002])
    {'0.01': 3, '0.003': 4}
    """
    out = {}
    for t in thresholds:
        hit = next((i + 1 for i, v in enumerate(loss) if v <= t), None)
        out[f"{t:g}"] = hit
    return out


class _Watch:
    """A stopper for the noisy slot that never stops the fit: it runs the live auto-stop rule beside it and
    notes what that rule would have chosen (the other slots get None: no stopper)."""

    def __init__(self, cfg, item):
        from pipeline.stopping import make_stopper_factory
        self.rule = make_stopper_factory(cfg)(item)
        self.fired = None

    def update(self, step, image, loss_hist=None) -> bool:
        if self.fired is None and self.rule.update(step, image, loss_hist):
            self.fired = {"chosen_step": self.rule.best_step, "stopped_at": self.rule.stopped_at}
        return False

    def summary(self) -> dict:
        if self.fired is not None:
            return {"rule": "variance", **self.fired}
        if self.rule.fallback_step is not None:
            return {"rule": "discrepancy", "chosen_step": self.rule.fallback_step, "stopped_at": None}
        return {"rule": None, "chosen_step": None, "stopped_at": None}


def load_image_crop(path, size: int | None) -> np.ndarray:
    """The image (H, W, C) float32, centre-cropped to at most ``size`` a side (None: whole)."""
    from pipeline.io import load_image
    px = load_image(path).pixels
    if size:
        h, w = px.shape[:2]
        s0, s1 = min(size, h), min(size, w)
        y, x = (h - s0) // 2, (w - s1) // 2
        px = px[y:y + s0, x:x + s1]
    return np.ascontiguousarray(px, dtype=np.float32)


def run_prior(img: np.ndarray, preset: str | None = None, steps: int | None = None, seed: int = 0,
              device: str = "auto", sigma: float = 25.0, name: str = "image") -> dict:
    """Fit the four targets of ``img`` in one batch; the record :func:`main` writes as prior.json."""
    from pipeline.config import cpu_default_preset, make_config
    from pipeline.engine import BatchedFitter, pick_device
    from pipeline.problem import make_problem, to_fit_item
    dev = pick_device(device)
    if preset is None and dev.type != "cuda":  # the CPU's light preset, for about a minute
        preset, steps = cpu_default_preset("denoise"), steps or CPU_STEPS
    preset = preset or "denoise"
    cfg = make_config("denoise", preset=preset, steps=steps, seed=seed, distill_steps=0, ensemble=1, tile=0)  # one fit a target
    targets = make_targets(img, sigma / 255.0, seed)
    items = []
    for i, k in enumerate(TARGETS):  # the same seed for all: the same z, the same initial weights
        it = to_fit_item(make_problem(targets[k], cfg=cfg, seed=seed, name=k), key=k)
        it.steps = cfg.steps
        items.append(it)
    p0 = make_problem(targets["natural"], cfg=cfg, seed=seed)

    def watch(item):
        return _Watch(cfg, item) if item.key == "noisy" else None

    fitter = BatchedFitter(cfg, p0.canvas, img.shape[2], len(items), dev, stopper_factory=watch)
    t0 = time.perf_counter()
    results = {r.key: r for r in fitter.run(items)}
    seconds = time.perf_counter() - t0
    var = (sigma / 255.0) ** 2
    loss = {k: [float(f"{v:.6g}") for v in results[k].loss] for k in TARGETS}
    under = next((i + 1 for i, v in enumerate(loss["noisy"]) if v < var), None)
    auto = (results["noisy"].extra.get("stopping") or {})
    return {"image": name, "size": list(img.shape[:2][::-1]), "preset": cfg.preset, "steps": cfg.steps,
            "seed": seed, "device": str(dev), "sigma": sigma, "seconds": round(seconds, 2),
            "targets": {k: {"loss": loss[k]} for k in TARGETS},
            "steps_to": {k: steps_to(loss[k]) for k in TARGETS},
            "noisy": {"noise_variance": round(var, 8), "step_under_noise_variance": under,
                      "auto_stop": auto}}


def plot(rec: dict, path: Path) -> None:
    """The four loss curves on log-log axes, as the paper's Figure 7."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"natural": "#1b7837", "noisy": "#2166ac", "shuffled": "#d6604d", "noise": "#777777"}
    for k in TARGETS:
        y = rec["targets"][k]["loss"]
        ax.plot(range(1, len(y) + 1), y, label=k, color=colors[k], lw=1.6)
    n = rec["noisy"]
    ax.axhline(n["noise_variance"], color=colors["noisy"], ls=":", lw=1, label="noise variance σ²")
    if n["step_under_noise_variance"]:
        ax.axvline(n["step_under_noise_variance"], color=colors["noisy"], ls="--", lw=1,
                   label=f"noisy under σ² (step {n['step_under_noise_variance']})")
    chosen = (n.get("auto_stop") or {}).get("chosen_step")
    if chosen:
        ax.axvline(chosen, color="#b2182b", ls="-.", lw=1, label=f"auto-stop's choice (step {chosen})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE to the target")
    w, h = rec["size"]
    ax.set_title(f"{rec['image']} ({w}×{h}), preset {rec['preset']}: the same generator fitted to four targets",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)


def table(rec: dict) -> str:
    hdr = f"{'target':10s}{'loss@10':>10s}{'@100':>10s}{'@last':>10s}{'<=0.01':>9s}{'<=0.003':>9s}"
    lines = [hdr]
    for k in TARGETS:
        y = rec["targets"][k]["loss"]
        at = lambda i: f"{y[i - 1]:10.5f}" if len(y) >= i else f"{'-':>10s}"  # noqa: E731
        s = rec["steps_to"][k]
        lines.append(f"{k:10s}{at(10)}{at(100)}{y[-1]:10.5f}{str(s['0.01'] or '-'):>9s}{str(s['0.003'] or '-'):>9s}")
    n = rec["noisy"]
    auto = n.get("auto_stop") or {}
    lines.append(f"noisy: under the noise variance ({n['noise_variance']:.5f}) from step "
                 f"{n['step_under_noise_variance'] or '-'}; auto-stop chose step {auto.get('chosen_step') or '-'}"
                 + (f" ({auto['rule']} rule)" if auto.get("rule") else ""))
    return "\n".join(lines)


def main(image: str, preset: str | None = None, steps: int | None = None, seed: int = 0, device: str = "auto",
         out: str = "prior", json_path: str | None = None, sigma: float = 25.0, size: int | None = None) -> int:
    """`dip bench prior IMAGE`. Returns the exit code."""
    from pipeline.engine import pick_device
    from pipeline.io import ImageError, write_json
    try:
        dev = pick_device(device)
        size = size if size is not None else (None if dev.type == "cuda" else 64)
        img = load_image_crop(image, size)
    except (ImageError, ValueError, RuntimeError) as e:
        print(f"dip bench prior: {e}", file=sys.stderr)
        return 2
    rec = run_prior(img, preset, steps, seed, str(dev), sigma, Path(image).name)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "prior.json", rec)
    if json_path:
        write_json(Path(json_path), rec)
    plot(rec, out_dir / "prior.png")
    print(table(rec))
    print(f"{rec['steps']} steps of 4 fits in {rec['seconds']:.1f} s on {rec['device']}; wrote {out_dir / 'prior.png'} "
          f"and {out_dir / 'prior.json'}")
    return 0

