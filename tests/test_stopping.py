"""ES-WMV early stopping (pipeline.stopping): synthetic curves with a known best step, and real fits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import make_config
from pipeline.engine import BatchedFitter, FitItem
from pipeline.stopping import (StopConfig, WMVStopper, choose_from_trace, estimate_sigma, make_stopper_factory,
                               sigma_of_item, stop_config_for)

CHECK = 50


def _synthetic(best_step: int, steps: int = 4000, seed: int = 0, size: int = 24):
    """A DIP-like trajectory sampled every CHECK steps: x_t = clean + a(t) n_t + b(t) d.

    a(t) n_t: what the iterates still get wrong, a fresh pattern at every check, with a U-shaped size
    a(t)^2 = e_min * (1 + 3 log2(t / best_step)^2) (the model of the paper's analysis: the spread of the
    iterates follows their error); b(t) d: a slow drift of the whole image (a fixed pattern that fades in
    over the run), which adds to the error but barely moves a window. Returns (steps, images, error)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(3, size, size, generator=g)
    d = torch.randn(3, size, size, generator=g)
    ts = np.arange(CHECK, steps + 1, CHECK)
    imgs, errs = [], []
    for t in ts:
        a = math.sqrt(1e-4 * (1 + 3 * math.log2(t / best_step) ** 2))
        b = 0.004 * t / steps
        x = clean + a * torch.randn(3, size, size, generator=g) + b * d
        imgs.append(x)
        errs.append(float((x - clean).square().mean()))
    return ts, imgs, np.array(errs)


def _run(stopper, ts, imgs):
    for t, x in zip(ts, imgs):
        if stopper.update(int(t), x, None):
            return int(t)
    return None


@pytest.mark.parametrize("best", [800, 1500, 2500])
@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_u_curve_chosen_step_near_the_best(best, seed):
    ts, imgs, errs = _synthetic(best, steps=max(4000, 3 * best), seed=seed)
    true_best = int(ts[int(np.argmin(errs))])
    st = WMVStopper(StopConfig(window=6, patience=10, min_steps=200, check_every=CHECK, rel_tol=0.0))
    stopped = _run(st, ts, imgs)
    assert stopped is not None and st.reason == "auto"
    assert st.best_step is not None and stopped == st.best_step + 10 * CHECK
    # the chosen step is close to the known best, and the chosen image is nearly as good as the best one
    assert abs(st.best_step - true_best) <= max(250, 0.2 * true_best), (st.best_step, true_best)
    chosen_err = errs[list(ts).index(st.best_step)]
    assert 10 * math.log10(chosen_err / errs.min()) < 1.0  # within 1 dB of the best PSNR
    # the image kept is the one at the VAR minimum, a clone
    assert torch.equal(st.best_image, imgs[list(ts).index(st.best_step)])
    assert st.best_image.data_ptr() != imgs[list(ts).index(st.best_step)].data_ptr()
    s = st.summary()
    assert s["reason"] == "auto" and s["chosen_step"] == st.best_step and s["stopped_at"] == stopped
    assert len(s["trace"]) == len(ts[:list(ts).index(stopped) + 1]) - 5  # one value per full window
    steps_, vars_ = zip(*s["trace"])
    assert steps_[int(np.argmin(vars_))] == st.best_step
    # replaying the recorded trace gives the live decision
    assert choose_from_trace(s["trace"], st.config) == (st.best_step, stopped)


def _knee(knee_step: int, steps: int = 3000, seed: int = 0, size: int = 24):
    """What the weights-EMA output of a denoising fit does: it moves fast while the image is learnt
    (speed ~ exp(-t/tau)), then creeps (a small constant speed) as the noise is fitted, which costs PSNR.
    Error: the unlearnt part decays, the fitted noise grows linearly after the knee."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(3, size, size, generator=g)
    d = torch.randn(3, size, size, generator=g)
    n = torch.randn(3, size, size, generator=g)
    ts = np.arange(CHECK, steps + 1, CHECK)
    imgs, errs = [], []
    tau = knee_step / 6
    for t in ts:
        x = clean + 0.5 * math.exp(-t / tau) * d + (0.02 + 0.04 * t / steps) * n
        imgs.append(x)
        errs.append(float((x - clean).square().mean()))
    return ts, imgs, np.array(errs)


@pytest.mark.parametrize("knee", [300, 600, 1200])
def test_default_rule_finds_the_knee(knee):
    ts, imgs, errs = _knee(knee)
    best = int(ts[int(np.argmin(errs))])
    st = WMVStopper(stop_config_for(make_config("denoise")))
    stopped = _run(st, ts, imgs)
    assert stopped is not None and stopped < ts[-1]
    chosen_err = errs[list(ts).index(st.best_step)]
    assert 10 * math.log10(chosen_err / errs.min()) < 1.5, (st.best_step, best)
    # the paper's rule (no tolerance) follows the creep: more than 2 dB worse here
    late = WMVStopper(stop_config_for(make_config("denoise"), rel_tol=0.0))
    _run(late, ts, imgs)
    assert 10 * math.log10(errs[list(ts).index(late.best_step)] / chosen_err) > 2.0


def test_min_steps_and_patience():
    ts, imgs, _ = _synthetic(800, steps=4000)
    st = WMVStopper(StopConfig(window=4, patience=5, min_steps=3000, check_every=CHECK, rel_tol=0.0))
    stopped = _run(st, ts, imgs)
    assert stopped is not None and stopped >= 3000
    # a constant sequence: VAR never improves after the first window -> stops after `patience` checks
    st = WMVStopper(StopConfig(window=3, patience=4, min_steps=0, check_every=10, rel_tol=0.0))
    x = torch.zeros(1, 4, 4)
    out = [st.update(s, x + 1e-3 * (s % 2), None) for s in range(10, 200, 10)]
    assert out.index(True) == 2 + 4  # first full window at the 3rd check, then 4 checks without a new min
    # once stopped it stays stopped
    assert st.update(500, x, None) is True


def test_rel_tol_and_smoothing_and_mean_result():
    ts, imgs, errs = _synthetic(1500, steps=5000)
    plain = WMVStopper(StopConfig(window=6, patience=10, min_steps=200, rel_tol=0.0))
    _run(plain, ts, imgs)
    tol = WMVStopper(StopConfig(window=6, patience=10, min_steps=200, rel_tol=0.5))
    _run(tol, ts, imgs)
    assert tol.stopped_at <= plain.stopped_at  # a tolerance can only stop earlier
    sm = WMVStopper(StopConfig(window=6, patience=10, min_steps=200, smooth=3, result="mean", rel_tol=0.0))
    assert _run(sm, ts, imgs) is not None
    # a never-stopping recording replays every setting: here the tolerant and the smoothed ones
    rec = WMVStopper(StopConfig(window=6, patience=10 ** 9, min_steps=200, rel_tol=0.0))
    assert _run(rec, ts, imgs) is None
    for live in (plain, tol, sm):
        assert choose_from_trace(rec.trace, live.config) == (live.best_step, live.stopped_at)
    i = list(ts).index(sm.best_step)
    expect = torch.stack(imgs[i - 5:i + 1]).mean(0)
    assert torch.allclose(sm.best_image, expect, atol=1e-6)


def test_config_validation_and_defaults():
    with pytest.raises(ValueError):
        StopConfig(window=1)
    with pytest.raises(ValueError):
        StopConfig(result="median")
    with pytest.raises(ValueError):
        StopConfig(rel_tol=1.0)
    d = stop_config_for(make_config("denoise"))
    s = stop_config_for(make_config("inpaint", preset="inpaint-sparse"))
    assert s.patience * s.check_every > d.patience * d.check_every  # slower schedule, longer patience
    # another check interval keeps the same time scales in steps
    d10 = stop_config_for(make_config("denoise"), check_every=10)
    assert d10.window * 10 == d.window * 50 and d10.patience * 10 == d.patience * 50
    f = make_stopper_factory(make_config("sr"), patience=3)
    a, b = f(), f("an item")
    assert isinstance(a, WMVStopper) and a is not b and a.config.patience == 3 and f.check_every == 50


def _noisy_item(key, size=32, seed=0, steps=None, sigma=25 / 255, reference=True):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    clean = np.stack([0.5 + 0.4 * np.sin(6 * xx), 0.5 + 0.4 * np.cos(5 * yy), 0.3 + 0.5 * xx * yy]).astype(np.float32)
    noisy = np.clip(clean + sigma * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
    return FitItem(key=key, target=noisy, mask=np.ones((1, size, size), np.float32), seed=seed,
                   reference=clean if reference else None, steps=steps)


def test_real_fit_stops_auto_with_its_trace():
    torch.manual_seed(0)
    cfg = make_config("denoise", preset="fast", steps=150)
    # VAR of a 32x32 fit falls steadily here; a tolerance of 0.8 makes the rule fire early on any machine
    factory = make_stopper_factory(cfg, check_every=10, window=3, patience=3, min_steps=30, rel_tol=0.8)
    fit = BatchedFitter(cfg, (32, 32), 3, 1, "cpu", stopper_factory=factory, check_every=10, trace_every=10)
    (res,) = fit.run([_noisy_item("a")])
    assert res.stop_reason == "auto" and res.steps < 150
    st = res.extra["stopping"]
    assert st["reason"] == "auto" and st["stopped_at"] == res.steps
    assert st["chosen_step"] <= res.steps and st["chosen_step"] % 10 == 0
    assert len(st["trace"]) >= 3 and all(math.isfinite(v) and v >= 0 for _, v in st["trace"])
    assert np.isfinite(res.image).all() and res.image.shape == (3, 32, 32)
    # the saved image is the one at the chosen step: the PSNR trace has that step
    assert any(s == st["chosen_step"] for s, _ in res.psnr_trace)


class _FiresAt:
    def __init__(self, at):
        self.at = at
        self.best_image = None

    def update(self, step, image, hist):
        return step >= self.at

    def summary(self):
        return {"fires_at": self.at}


def test_per_slot_stopping_frees_the_slot_while_others_continue():
    cfg = make_config("denoise", preset="fast", steps=40)
    made = []

    def factory(item=None):  # slot 0 gets an early stopper, slot 1 one that never fires, the refill a WMV rule
        k = len(made)
        st = [_FiresAt(20), _FiresAt(10 ** 9), WMVStopper(StopConfig(window=2, patience=1, min_steps=0,
                                                                     check_every=10))][k]
        made.append(st)
        return st

    items = [_noisy_item("early", seed=1, reference=False), _noisy_item("long", seed=2, reference=False),
             _noisy_item("refill", seed=3, steps=20, reference=False)]
    fit = BatchedFitter(cfg, (32, 32), 3, 2, "cpu", stopper_factory=factory, check_every=10)
    order = []
    res = {}
    for r in fit.iter_run(items):
        order.append(r.key)
        res[r.key] = r
    assert order[0] == "early"
    assert res["early"].stop_reason == "auto" and res["early"].steps == 20
    assert res["early"].extra["stopping"] == {"fires_at": 20}
    assert res["long"].stop_reason == "steps" and res["long"].steps == 40
    assert res["refill"].steps <= 20  # loaded into the freed slot, with its own budget and rule
    assert "trace" in res["refill"].extra["stopping"]
    assert len(made) == 3


@pytest.mark.parametrize("lag", [1, 2])
def test_lag_returns_an_earlier_image_of_the_window_and_replays_the_same(lag):
    ts, imgs, _errs = _synthetic(1500, steps=4000, seed=3)
    cfg = StopConfig(window=4, patience=10, min_steps=200, check_every=CHECK, rel_tol=0.0)
    plain, lagged = WMVStopper(cfg), WMVStopper(cfg.replace(lag=lag))
    stopped = _run(plain, ts, imgs)
    assert _run(lagged, ts, imgs) == stopped is not None  # the decision is the same, only the image differs
    assert lagged.min_step == plain.best_step == plain.min_step
    assert lagged.best_step == plain.best_step - lag * CHECK
    assert torch.equal(lagged.best_image, imgs[list(ts).index(lagged.best_step)])
    s = lagged.summary()
    assert s["chosen_step"] == lagged.best_step and s["min_step"] == plain.best_step
    assert choose_from_trace(s["trace"], lagged.config) == (lagged.best_step, stopped)
    with pytest.raises(ValueError, match="lag"):
        StopConfig(window=4, lag=4)
    with pytest.raises(ValueError, match="lag"):
        StopConfig(result="mean", lag=1)


def test_default_lag_follows_the_output_average():
    d = stop_config_for(make_config("denoise"))
    assert d.lag == 1 and stop_config_for(make_config("jpeg")).lag == 1
    assert stop_config_for(make_config("denoise", output="last")).lag == 0  # nothing averaged, nothing lags
    assert stop_config_for(make_config("inpaint")).lag == 0 and stop_config_for(make_config("sr", scale=4)).lag == 0
    d10 = stop_config_for(make_config("denoise"), check_every=10)
    assert d10.lag * 10 == d.lag * 50  # the same 50 steps
    # the discrepancy fallback: Gaussian denoising only
    assert d.discrepancy == 0.9 and d10.discrepancy == 0.9 and d10.discrepancy_smooth == 50
    assert all(stop_config_for(make_config(t, **kw)).discrepancy == 0.0
               for t, kw in (("jpeg", {}), ("inpaint", {}), ("sr", {"scale": 4})))


def test_noise_level_estimate():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:128] / 128.0
    clean = np.stack([0.5 + 0.3 * np.sin(4 * xx + k) * np.cos(3 * yy) for k in range(3)], -1)
    for sigma in (0.02, 0.1):
        assert abs(estimate_sigma(clean + rng.normal(0, sigma, clean.shape)) - sigma) < 0.1 * sigma
    # a padded canvas: the item's estimate looks at the known region only
    item = _noisy_item("pad", size=32, sigma=0.1)
    canvas = np.zeros((3, 48, 40), np.float32)
    canvas[:, :32, :32] = item.target
    mask = np.zeros((1, 48, 40), np.float32)
    mask[:, :32, :32] = 1
    padded = FitItem(key="pad", target=canvas, mask=mask)
    assert sigma_of_item(padded) == pytest.approx(sigma_of_item(item))
    assert sigma_of_item(item) == pytest.approx(0.1, rel=0.3)
    with pytest.raises(ValueError, match="2x2"):
        estimate_sigma(np.zeros((1, 5)))


@pytest.mark.parametrize("check", [50, 20, 7])
def test_discrepancy_fallback_keeps_the_image_where_the_loss_reaches_the_noise_level(check):
    """The live fallback finds the same first crossing as the bench's replay, whatever the check interval."""
    from pipeline.bench.quality import replay_discrepancy
    sigma, n = 0.1, 600
    rng = np.random.default_rng(1)
    loss = torch.tensor([0.05 * 0.99 ** t + 0.009 + 0.0005 * rng.standard_normal() for t in range(n)])
    cfg = StopConfig(window=3, patience=10 ** 6, min_steps=0, check_every=check, discrepancy=1.0,
                     discrepancy_smooth=25)
    st = WMVStopper(cfg, sigma=sigma)
    imgs = {}
    for t in range(check, n + 1, check):
        imgs[t] = torch.full((3, 4, 4), float(t))
        assert not st.update(t, imgs[t], loss[:t])
    row = {"loss": loss.tolist(), "sigma_est": sigma, "final_psnr": 0.0,
           "metric_trace": [[t, float(t), None] for t in imgs]}
    (want,) = replay_discrepancy(row, factors=(1.0,), smooth=25)
    assert want["chosen"] is not None and st.fallback_step == want["chosen"]
    assert torch.equal(st.fallback_image, imgs[want["chosen"]])
    assert st.stopped_at is None and st.result_from == "discrepancy"
    assert torch.equal(st.result_image(), imgs[want["chosen"]])
    s = st.summary()
    assert s["result_from"] == "discrepancy"
    assert s["fallback"] == {"rule": "discrepancy", "factor": 1.0, "sigma_est": 0.1, "step": want["chosen"],
                             "used": True}
    # a level never reached: no fallback, the fit keeps its last image
    low = WMVStopper(cfg.replace(discrepancy=0.5), sigma=sigma)
    for t in imgs:
        low.update(t, imgs[t], loss[:t])
    assert low.result_image() is None and low.summary()["fallback"]["step"] is None
    # off (the default), or no noise level: nothing kept, nothing synced
    assert WMVStopper(cfg.replace(discrepancy=0.0), sigma=sigma).threshold is None
    assert WMVStopper(cfg).threshold is None and "fallback" not in WMVStopper(cfg).summary()
    with pytest.raises(ValueError, match="discrepancy"):
        StopConfig(discrepancy=-1)


def test_variance_rule_wins_over_the_fallback():
    ts, imgs, _errs = _synthetic(1500, steps=4000, seed=3)
    cfg = StopConfig(window=4, patience=10, min_steps=200, check_every=CHECK, rel_tol=0.0, discrepancy=1.0,
                     discrepancy_smooth=10)
    st = WMVStopper(cfg, sigma=1.0)
    loss = torch.full((4000,), 0.5)  # below sigma^2 from the start: the fallback is the first check
    stopped = None
    for t, x in zip(ts, imgs):
        if st.update(int(t), x, loss[:t]):
            stopped = int(t)
            break
    assert stopped is not None and st.fallback_step == CHECK
    assert st.result_from == "variance" and torch.equal(st.result_image(), st.best_image)
    assert st.summary()["fallback"]["used"] is False


def test_real_fit_returns_the_fallback_image_at_its_cap():
    """A fit whose variance rule never fires returns the image of the discrepancy crossing, not its last."""
    cfg = make_config("denoise", preset="fast", steps=120, distill_steps=0)
    made = []

    def run(**over):
        factory = make_stopper_factory(cfg, check_every=10, window=3, patience=10 ** 6, min_steps=0, **over)

        def keep(item=None):
            made.append(factory(item))
            return made[-1]

        torch.manual_seed(0)
        fit = BatchedFitter(cfg, (32, 32), 3, 1, "cpu", stopper_factory=keep, check_every=10)
        (res,) = fit.run([_noisy_item("a", reference=False)])
        return res, made[-1]

    res, st = run(discrepancy=50.0, discrepancy_smooth=5)  # a generous level, crossed within the run
    assert res.stop_reason == "steps" and res.steps == 120
    assert st.sigma == pytest.approx(25 / 255, rel=0.3)  # estimated from the item's noisy image
    fb = res.extra["stopping"]["fallback"]
    assert fb["used"] and 10 <= fb["step"] < 120 and res.extra["stopping"]["result_from"] == "discrepancy"
    assert np.array_equal(res.image, st.fallback_image.numpy())
    last, st0 = run(discrepancy=0.0)  # no fallback: the same fit keeps its last image
    assert st0.sigma is None and res.extra["stopping"]["result_from"] == "discrepancy"
    assert last.extra["stopping"]["result_from"] == "last" and not np.array_equal(last.image, res.image)


def test_the_bench_stopper_keeps_the_images_it_scored():
    """pipeline.bench.quality.EvalStopper(keep_images=True), which tools/measure_knobs.py averages: the
    auto image is the rule's choice, the oracle image the best-scoring one, and neither is the last."""
    from types import SimpleNamespace
    from pipeline.bench.quality import EvalStopper
    ts, imgs, errs = _synthetic(800, steps=4000, seed=0)
    clean = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))  # _synthetic's, seed 0
    item = SimpleNamespace(reference=clean.numpy(), ref_mask=None)
    cfg = StopConfig(window=6, patience=10, min_steps=200, check_every=CHECK, rel_tol=0.0)
    ev = EvalStopper(cfg, item, keep_images=True)
    assert _run(ev, ts, imgs) is None  # it never stops the fit
    s = ev.summary()
    kept = s.pop("_images")
    assert s["fired"] and torch.equal(kept["auto"], imgs[list(ts).index(s["auto"]["step"])])
    assert torch.equal(kept["oracle"], imgs[list(ts).index(s["oracle_step"])])
    assert s["oracle_step"] == int(ts[int(np.argmin(errs))])
    assert "_images" not in EvalStopper(cfg, item).summary()


# ---- self-validation (FitConfig.holdout) ------------------------------------------------------------------
def test_holdout_leaves_its_pixels_out_of_the_data_term_and_each_seed_holds_back_others():
    from pipeline.api import make_problem
    from pipeline.problem import to_fit_item
    rng = np.random.default_rng(0)
    img = rng.random((40, 48, 3)).astype(np.float32)
    mask = (rng.random((40, 48)) > 0.5).astype(np.float32)
    items = [to_fit_item(make_problem(img, task="inpaint", mask=mask, preset="inpaint-lite", holdout=0.1, seed=s,
                                       ensemble=1))
             for s in (0, 1)]
    plain = to_fit_item(make_problem(img, task="inpaint", mask=mask, preset="inpaint-lite", seed=0, ensemble=1))
    assert plain.val_mask is None
    known = int(mask.sum())
    for it in items:
        v, m = it.val_mask[0], it.mask[0]
        assert int(v.sum()) == round(0.1 * known)
        assert not (v * m).any()  # a held-back pixel is not in the data term
        assert ((v + m) == plain.mask[0]).all()  # and together they are the known pixels, nothing else
        assert (it.target == plain.target).all()  # the target keeps their values, for the check
        assert (v[:40, :48] <= mask).all()  # only known pixels are held back (never the canvas padding)
    assert (items[0].val_mask != items[1].val_mask).any()
    with pytest.raises(ValueError, match="super-resolution"):
        make_config("sr", holdout=0.05)
    with pytest.raises(ValueError, match="holdout"):
        make_config("inpaint", holdout=0.8)
    cfg = make_config("inpaint", preset="inpaint-lite")
    assert "holdout" not in cfg.identity_dict()  # results made before it still count as done
    assert cfg.replace(holdout=0.05).identity_dict()["holdout"] == 0.05


def test_holdout_stopper_stops_where_the_held_back_error_is_lowest():
    from pipeline.stopping import HoldoutStopper, stopper_for_item
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 16, 16, generator=g)
    val = np.zeros((1, 16, 16), np.float32)
    val[0, ::4, ::4] = 1
    cfg = StopConfig(window=4, patience=5, min_steps=100, check_every=CHECK, rel_tol=0.0)
    item = FitItem(key="v", target=clean.numpy(), mask=1 - val, val_mask=val)
    st = stopper_for_item(cfg, item)
    assert isinstance(st, HoldoutStopper) and st.held == 16
    d = torch.randn(3, 16, 16, generator=g)
    best = 1000
    stopped = None
    for t in range(CHECK, 4001, CHECK):  # the error on the held-back pixels is U-shaped around step 1000
        x = clean + 0.01 * (1 + abs(math.log2(t / best))) * d
        if st.update(t, x):
            stopped = t
            break
    assert st.best_step == best and stopped == best + 5 * CHECK
    assert torch.allclose(st.result_image(), clean + 0.01 * d)
    s = st.summary()
    assert s["rule"] == "holdout" and s["chosen_step"] == best and s["stopped_at"] == stopped
    assert s["result_from"] == "holdout" and s["held_out"] == 16 and len(s["trace"]) == stopped // CHECK
    assert isinstance(stopper_for_item(cfg, FitItem(key="p", target=clean.numpy(), mask=np.ones_like(val))),
                      WMVStopper)


def test_a_self_validating_inpainting_fit_stops_on_its_held_back_pixels():
    """A real fit: the engine's stopper for a problem with holdout is the held-out rule, it ends the fit,
    and the saved image is the one at its chosen step (the PSNR trace has that step)."""
    from pipeline.api import make_problem
    from pipeline.batching import fit_problems
    gt = np.random.default_rng(1).random((32, 32, 3)).astype(np.float32) * 0.2 + 0.4
    mask = (np.random.default_rng(2).random((32, 32)) > 0.5).astype(np.float32)
    p = make_problem(gt * mask[:, :, None], task="inpaint", mask=mask, preset="inpaint-lite", steps=400,
                     holdout=0.1, reference=gt, distill_steps=0, seed=3, ensemble=1)
    p.cfg = p.cfg.replace(auto_stop=True)
    factory = make_stopper_factory(p.cfg, patience=2, min_steps=50)
    ((_, r),) = list(fit_problems([p], device="cpu", slots=1, stopper_factory=factory, trace_every=50))
    st = r.extra["stopping"]
    assert st["rule"] == "holdout" and st["held_out"] == round(0.1 * mask.sum())
    assert r.stop_reason == "auto" and r.steps == st["stopped_at"] < 400
    assert st["chosen_step"] == min(st["trace"], key=lambda t: t[1])[0]
    assert any(s == st["chosen_step"] for s, _ in r.extra["psnr_trace"])


@pytest.mark.parametrize("cross,want", [(300, "knee"), (2000, "floor"), (3900, "knee, waited"), (None, "off")])
def test_the_noise_floor_defers_the_stop_to_where_the_data_term_reaches_it_and_replays_the_same(cross, want):
    """``floor``: the variance rule's stop waits (at most ``floor_wait`` checks) until the data term reaches
    floor * sigma^2, and returns that check's image when it comes after the rule's; a recorded study row
    (its ``loss_trace``, pipeline.bench.study) replays to the same choice and stop."""
    from pipeline.bench.study import _data_term_trace
    from pipeline.stopping import choose_with_floor
    ts, imgs, _errs = _synthetic(800, steps=4000, seed=5)
    n = 4000
    at = n + 1 if cross is None else cross
    loss = torch.tensor([1.0 if t < at - 5 else 0.001 for t in range(1, n + 1)])  # reaches sigma^2 at `cross`
    cfg = StopConfig(window=4, patience=6, min_steps=200, check_every=CHECK, rel_tol=0.5, discrepancy_smooth=5,
                     floor=1.0 if cross is not None else 0.0, floor_wait=20)
    st = WMVStopper(cfg, sigma=0.1)
    stopped = None
    for t, x in zip(ts, imgs):
        if st.update(int(t), x, loss[:t]):
            stopped = int(t)
            break
    plain, plain_stop = choose_from_trace(st.trace, cfg.replace(floor=0.0))
    assert plain_stop is not None and 300 < plain_stop < 2000  # the knee comes between the crossings
    if want in ("floor", "knee, waited"):
        assert st.summary()["floor"]["fired_at"] == plain_stop  # where the rule fired and began to wait
    if want == "knee":  # reached before the rule fired: nothing changes
        assert stopped == plain_stop and st.best_step == plain and st.result_from == "variance"
    elif want == "floor":
        assert stopped == 2000 == st.best_step and st.result_from == "floor"
        assert torch.equal(st.result_image(), imgs[list(ts).index(2000)])
    elif want == "knee, waited":  # not within floor_wait checks: the rule's image, 20 checks late
        assert stopped == plain_stop + 20 * CHECK and st.best_step == plain and st.result_from == "variance"
    else:
        assert stopped == plain_stop and "floor" not in st.summary()
    row = {"loss": loss[:stopped].tolist(), "metric_trace": [[int(t), 0.0, None] for t in ts if t <= stopped]}
    trace = _data_term_trace(row, smooth=5)["loss_trace"]
    assert choose_with_floor(st.trace, trace, 0.1, cfg) == (st.best_step, stopped)
    with pytest.raises(ValueError, match="floor"):
        StopConfig(floor=-0.5)


@pytest.mark.parametrize("sigma,floor,wait", [(0.05, 0.5, 20), (0.1, 1.0, 10)])
def test_a_floor_that_follows_the_noise_level_runs_and_replays_as_the_fixed_floor_it_resolves_to(sigma, floor,
                                                                                                 wait):
    """``floor_low``: under ``floor_low_below`` the fit's floor and wait are the low ones, else the shipped
    ones; the stopper runs, records and replays exactly as a stopper given that fixed floor would."""
    from pipeline.bench.study import _data_term_trace
    from pipeline.stopping import choose_with_floor
    ts, imgs, _errs = _synthetic(800, steps=4000, seed=5)
    n = 4000
    # the data term: 1.0 until step 600, then 0.9 sigma^2 (above the low floor), then 0.4 sigma^2 from 2000
    loss = torch.tensor([1.0 if t < 595 else 0.9 * sigma ** 2 if t < 1995 else 0.4 * sigma ** 2
                         for t in range(1, n + 1)])
    base = StopConfig(window=4, patience=6, min_steps=200, check_every=CHECK, rel_tol=0.5, discrepancy_smooth=5,
                      floor=1.0, floor_wait=10)
    cfg = base.replace(floor_low=0.5, floor_low_below=0.08, floor_low_wait=20)
    assert cfg.at_sigma(sigma) == base.replace(floor=floor, floor_wait=wait) and cfg.at_sigma(None) == cfg

    def run(c):
        st = WMVStopper(c, sigma=sigma)
        for t, x in zip(ts, imgs):
            if st.update(int(t), x, loss[:t]):
                return st, int(t)
        return st, None

    st, stopped = run(cfg)
    fixed, fixed_stop = run(base.replace(floor=floor, floor_wait=wait))
    assert st.config == fixed.config and stopped == fixed_stop and st.best_step == fixed.best_step
    assert torch.equal(st.result_image(), fixed.result_image())
    assert st.summary()["config"]["floor"] == floor and st.summary()["floor"]["factor"] == floor
    plain, _ = choose_from_trace(st.trace, base.replace(floor=0.0))
    # the low floor waited for the later level; the shipped one was reached before the rule fired
    assert st.best_step == (2000 if floor == 0.5 else plain) and plain < 2000
    row = {"loss": loss[:stopped].tolist(), "metric_trace": [[int(t), 0.0, None] for t in ts if t <= stopped]}
    trace = _data_term_trace(row, smooth=5)["loss_trace"]
    assert choose_with_floor(st.trace, trace, sigma, cfg) == (st.best_step, stopped)  # the unresolved rule
    with pytest.raises(ValueError, match="floor_low"):
        StopConfig(floor_low=-1)


def test_a_kept_tiles_key_does_not_change_with_stop_fields_added_later_at_their_neutral_value():
    """A tile kept before StopConfig grew ``floor_low`` (its rule dict has no such keys) is still this tile's
    fit after the upgrade: the key leaves later fields out at their neutral value, and keeps them otherwise."""
    from pipeline.api import make_problem
    from pipeline.tiling import tile_key
    q = make_problem(np.full((8, 8, 3), 0.5, np.float32), task="denoise", preset="denoise-lite", seed=1, ensemble=1)
    q.meta["tile"] = 0
    now = StopConfig(patience=4, floor=1.0)
    before = {k: v for k, v in now.to_dict().items() if k not in StopConfig.LATER_FIELDS}
    assert tile_key(q, before) == tile_key(q, now.to_dict()) == tile_key(q, now.identity_dict())
    # a floor that follows the noise level is keyed as the fixed rule it resolves to for the tile's own noise
    low = now.replace(floor_low=0.9, floor_low_below=20 / 255, floor_low_wait=20)
    flat = tile_key(q, low.to_dict())  # sigma_est 0, under 20/255: the low floor
    assert flat == tile_key(q, now.replace(floor=0.9, floor_wait=20).to_dict()) != tile_key(q, before)
    noisy = make_problem(np.random.default_rng(0).random((8, 8, 3)).astype(np.float32), task="denoise",
                         preset="denoise-lite", seed=1, ensemble=1)
    noisy.meta["tile"] = 0
    assert tile_key(noisy, low.to_dict()) == tile_key(noisy, now.to_dict()) != tile_key(noisy, low.replace(
        floor_low_below=0.9).to_dict())


def test_the_replay_tool_replays_the_rule_each_recorded_fit_ran_under():
    """tools/replay_stop.py must start from the rule a variant's fits ran under (denoise-lite's of stop 31:
    patience 4, rel_tol 0.7, lag 0), not the task's default: replayed on a committed study file (six-member
    rows of denoise-lite at sigma 15 and 50, the noise floor's tuning rows), that rule must give every
    member's recorded stop and image. Those rows predate the recorded ``rule``; a row that has it is
    replayed from it."""
    import importlib.util
    import json
    from pathlib import Path
    from pipeline.bench.variants import variant_rule, variants_for
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("replay_stop", root / "tools" / "replay_stop.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rows = [json.loads(x) for x in (root / "docs/study/study_floor_s32a.jsonl").read_text().splitlines()]
    (then,) = variants_for("denoise", ["d-w24ex6l0"])  # denoise-lite's rule until stop 33 (no floor)
    rule = tool.variant_rule("denoise", then)
    assert (rule.patience, rule.rel_tol, rule.lag, rule.floor) == (4, 0.7, 0, 0.0)
    fits = [(r, k) for r in rows for k in range(len(r["members"]))]
    assert len(fits) == 36 and all(tool.agrees(r, rule, k) for r, k in fits)
    task_rule = rule.replace(patience=8, rel_tol=0.5, lag=1)  # what the tool replayed before stop 33
    assert sum(tool.agrees(r, task_rule, k) for r, k in fits) < len(fits) // 2
    (now,) = variants_for("denoise", ["denoise-lite"])
    assert tool.variant_rule("denoise", now, rows).floor == 1.0  # no recorded rule: today's preset's
    recorded = [{**r, "rule": rule.to_dict()} for r in rows]
    assert tool.variant_rule("denoise", now, recorded) == rule
    assert variant_rule("denoise", now) == tool.variant_rule("denoise", now).identity_dict()
