"""Knowing when to stop without ground truth: the running-variance rule of ES-WMV.

Wang, Li, Zhuang, Chen, Liang, Sun, "Early Stopping for Deep Image Prior" (TMLR 2023). DIP's output
first moves quickly (the structure is learned), then settles near the clean image, then starts to
drift again as the network fits the noise. The variance of the recent outputs,

    VAR_t = 1/W * sum_{i in window} || x_i - mean(window) ||^2      (here per pixel: / (C*H*W))

is therefore U-shaped, and its minimum sits close to the PSNR peak. ES-WMV stops once VAR has not
reached a new minimum for ``patience`` checks and returns the image at the minimum.

Our engine only renders the result image every ``check_every`` steps (rendering costs a forward pass),
so the window holds the last ``window`` *rendered* images, ``check_every`` steps apart, i.e. it spans
``window * check_every`` steps (the paper: 100 consecutive iterates). The images the engine renders
are already averaged (the weights EMA), so a window of sparse samples behaves like the paper's dense
window of raw iterates.

Everything runs with torch ops on the image's own device; the only host sync is one scalar per check.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

RESULTS = ("last", "mean")


def estimate_sigma(img: np.ndarray) -> float:
    """The noise level of an (H, W[, C]) image in [0, 1]: Donoho and Johnstone's median absolute deviation
    of the finest diagonal wavelet coefficients, median(|HH|) / 0.6745, with the Haar wavelet (so no
    PyWavelets, which scikit-image's estimate_sigma needs), averaged over the channels. Texture inflates
    it a little (baboon, sigma 25: 27.9); on the paper's 9 noisy images it gave 24.2-27.9."""
    a = np.asarray(img, np.float64)
    a = a if a.ndim == 3 else a[:, :, None]
    a = a[:a.shape[0] // 2 * 2, :a.shape[1] // 2 * 2]
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"estimate_sigma needs an image of at least 2x2 pixels, not {img.shape}")
    hh = (a[0::2, 0::2] - a[0::2, 1::2] - a[1::2, 0::2] + a[1::2, 1::2]) / 2.0
    return float(np.mean([np.median(np.abs(hh[:, :, k])) / 0.6745 for k in range(a.shape[2])]))


@dataclass(frozen=True)
class StopConfig:
    """The ES-WMV rule, in units of the engine's checks (one check every ``check_every`` steps).

    window:    rendered images in the variance window (spans window*check_every steps)
    patience:  checks without a new VAR minimum before stopping
    min_steps: never stop before this step (the VAR of the first windows is meaningless)
    check_every: the engine's check interval in steps (BatchedFitter(check_every=...)); the stopper
               works from the step numbers it is given, this is recorded and used for the defaults
    rel_tol:   a VAR value counts as a new minimum only if it is below (1 - rel_tol) * the best one
               (0 = the paper's rule). With a tolerance the rule finds the knee of the VAR curve: where
               its fast fall ends and the plateau begins (see docs/stopping.md)
    smooth:    VAR is averaged over this many consecutive checks before the minimum is tracked
               (1 = no smoothing)
    result:    "last" = the newest image of the window at the minimum (the paper's),
               "mean" = the mean of that window (less noise, a little lag)
    lag:       with result "last", take the image this many checks before the newest one of the window
               at the minimum (0 = the newest). The default output is an average of the outputs, which
               lags the fit: on CPU crops the rule chose 50-150 steps after the best image
               (docs/stopping.md); ``lag`` takes an earlier image of the same window. Its step is
               ``chosen_step``; the minimum's own step is ``min_step``.
    discrepancy: the fallback for fits where the variance rule never fires (0 = none): the discrepancy
               principle. At each check, if the data term averaged over ``discrepancy_smooth`` consecutive
               steps has reached ``discrepancy * sigma^2`` (sigma: the noise level estimated from the
               degraded image, :func:`estimate_sigma`), the image of that check is kept once; a fit that
               reaches its cap without the variance rule firing returns that image instead of its last.
               Gaussian noise only (denoising); see docs/stopping.md.
    discrepancy_smooth: steps of the data term averaged (it jitters from step to step with the input noise)
    floor:     a noise-aware floor under the variance rule (0 = off): its stop waits until the data term
               (averaged as for ``discrepancy``) has reached ``floor * sigma^2``; when that happens after the
               image the rule chose, the image of that check is returned instead. On a lightly noisy image the
               variance knee comes before the fit has taken all the detail it can (docs/efficiency.md,
               "Across noise levels"); on a noisy one the level is reached earlier and changes nothing.
               Gaussian noise only, like ``discrepancy``.
    floor_wait: the most checks the stop waits for the floor after the rule fired; then the rule's image
    floor_low: the floor at low noise (0 = off: ``floor`` at every noise level): where the estimated sigma
               is under ``floor_low_below``, the floor is ``floor_low`` and the wait ``floor_low_wait``
               (:meth:`at_sigma`). A lower floor lets a lightly noisy fit take more detail; at higher noise
               it takes noise (docs/efficiency.md, "A floor that follows the noise level")
    floor_low_below: the sigma (in [0, 1]) under which ``floor_low`` holds
    floor_low_wait: ``floor_wait`` where ``floor_low`` holds
    """

    window: int = 4
    patience: int = 8
    min_steps: int = 200
    check_every: int = 50
    rel_tol: float = 0.5
    smooth: int = 1
    result: str = "last"
    lag: int = 0
    discrepancy: float = 0.0
    discrepancy_smooth: int = 50
    floor: float = 0.0
    floor_wait: int = 20
    floor_low: float = 0.0
    floor_low_below: float = 20 / 255
    floor_low_wait: int = 20

    # fields added after rules were first recorded, at the value that means "as before": a kept tile's key
    # (pipeline.tiling.tile_key) leaves them out at that value, so an upgrade does not refit kept tiles
    LATER_FIELDS = {"floor_low": 0.0, "floor_low_below": 20 / 255, "floor_low_wait": 20}

    def __post_init__(self):
        if self.window < 2:
            raise ValueError("window must hold at least 2 images")
        if self.patience < 1:
            raise ValueError("patience must be at least 1 check")
        if self.check_every < 1:
            raise ValueError("check_every must be at least 1")
        if self.min_steps < 0:
            raise ValueError("min_steps must be >= 0")
        if not 0.0 <= self.rel_tol < 1.0:
            raise ValueError("rel_tol must be in [0, 1)")
        if self.smooth < 1:
            raise ValueError("smooth must be at least 1")
        if self.result not in RESULTS:
            raise ValueError(f"result must be one of {RESULTS}, not {self.result!r}")
        if not 0 <= self.lag < self.window:
            raise ValueError(f"lag must be in [0, window), not {self.lag}")
        if self.lag and self.result != "last":
            raise ValueError("lag applies to result 'last' only")
        if not (self.discrepancy >= 0.0 and math.isfinite(self.discrepancy)):
            raise ValueError(f"discrepancy must be a factor >= 0 (0 = off), not {self.discrepancy}")
        if self.discrepancy_smooth < 1:
            raise ValueError("discrepancy_smooth must be at least 1 step")
        if not (self.floor >= 0.0 and math.isfinite(self.floor)):
            raise ValueError(f"floor must be a factor >= 0 (0 = off), not {self.floor}")
        if self.floor_wait < 0:
            raise ValueError("floor_wait must be >= 0 checks")
        if not (self.floor_low >= 0.0 and math.isfinite(self.floor_low)):
            raise ValueError(f"floor_low must be a factor >= 0 (0 = off), not {self.floor_low}")
        if not (self.floor_low_below >= 0.0 and math.isfinite(self.floor_low_below)):
            raise ValueError(f"floor_low_below must be a noise level >= 0, not {self.floor_low_below}")
        if self.floor_low_wait < 0:
            raise ValueError("floor_low_wait must be >= 0 checks")

    def replace(self, **kw) -> "StopConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity_dict(self) -> dict:
        """:meth:`to_dict` less the later fields at their neutral value (what a kept tile's key holds)."""
        return {k: v for k, v in self.to_dict().items()
                if not (k in self.LATER_FIELDS and v == self.LATER_FIELDS[k])}

    def at_sigma(self, sigma: float | None) -> "StopConfig":
        """The rule a fit of noise level ``sigma`` runs: with ``floor_low`` and sigma under
        ``floor_low_below``, floor and wait are the low ones; the low fields are then spent (at their
        neutral value), so the result is one fixed rule that replays as it ran.

        >>> StopConfig(floor=1.0, floor_wait=10, floor_low=0.9).at_sigma(15 / 255).floor
        0.9
        >>> StopConfig(floor=1.0, floor_wait=10, floor_low=0.9).at_sigma(25 / 255).floor
        1.0
        """
        if not self.floor_low or sigma is None:
            return self
        fixed = self.replace(**self.LATER_FIELDS)  # the low floor's fields spent: back to their neutral value
        if sigma < self.floor_low_below:
            return fixed.replace(floor=self.floor_low, floor_wait=self.floor_low_wait)
        return fixed


class _Rule:
    """The decision part of ES-WMV on a stream of VAR values (shared by the live stopper and replays)."""

    def __init__(self, config: StopConfig):
        self.config = config
        self.raw: list[float] = []
        self.best_var = math.inf
        self.best_step: int | None = None
        self.since_best = 0  # checks since the last new minimum
        self.stopped_at: int | None = None

    def feed(self, step: int, var: float) -> tuple[bool, bool]:
        """One VAR value (of the window ending at ``step``) -> (a new minimum?, stop now?)."""
        cfg = self.config
        self.raw.append(var)
        k = min(cfg.smooth, len(self.raw))
        v = sum(self.raw[-k:]) / k
        new_best = False
        if math.isfinite(v) and (not math.isfinite(self.best_var) or v < (1.0 - cfg.rel_tol) * self.best_var):
            self.best_var, self.best_step, self.since_best = v, step, 0
            new_best = True
        else:
            self.since_best += 1
        stop = step >= cfg.min_steps and self.best_step is not None and self.since_best >= cfg.patience
        if stop:
            self.stopped_at = step
        return new_best, stop


def choose_from_trace(trace, config: StopConfig) -> tuple[int | None, int | None]:
    """Replay the rule on a recorded VAR trace [(step, var)] (``summary()["trace"]``, which holds the raw,
    un-smoothed values for the window it was recorded with): (chosen step, step it stops at). The stop
    step is None where the rule would not have fired; the chosen step is then the VAR minimum so far.
    The chosen step is the step of the image the rule returns (``lag`` checks before the minimum's)."""
    rule = _Rule(config)
    steps = []
    for step, var in trace:
        steps.append(int(step))
        _new, stop = rule.feed(int(step), float(var))
        if stop:
            return _lagged(steps, rule.best_step, config.lag), rule.stopped_at
    return _lagged(steps, rule.best_step, config.lag), None


def choose_with_floor(trace, loss_trace, sigma: float | None, config: StopConfig) -> tuple[int | None, int | None]:
    """:func:`choose_from_trace` with ``config.floor``, on a recorded data-term trace [(step, loss)] (at every
    check: the lowest ``discrepancy_smooth``-step average of the losses ending since the previous check, as
    the live stopper sees it): (chosen step, stop step), as :class:`WMVStopper` would give them."""
    config = config.at_sigma(sigma)
    chosen, stopped = choose_from_trace(trace, config)
    if not config.floor or sigma is None or stopped is None:
        return chosen, stopped
    thr = config.floor * sigma ** 2
    hit = next((int(s) for s, x in loss_trace if x <= thr), None)
    if hit is not None and hit <= stopped:
        return (hit if hit > chosen else chosen), stopped
    last = stopped + config.floor_wait * config.check_every
    if hit is not None and hit <= last:
        return hit, hit
    return chosen, last


def _lagged(steps: list[int], step: int | None, lag: int) -> int | None:
    """The check ``lag`` checks before ``step`` among the recorded ``steps``."""
    if step is None or not lag:
        return step
    i = steps.index(step)
    return steps[max(i - lag, 0)]


def _reached(loss_hist: torch.Tensor, thr: float | None, k: int, checked: int) -> tuple[bool, int]:
    """(Has an average of ``k`` consecutive losses ending after step ``checked`` reached ``thr``?, the steps now
    looked at.) A host sync, only until the first crossing."""
    n = int(loss_hist.shape[0])
    new = n - checked
    if thr is None or n < k or new <= 0:
        return False, n
    seg = loss_hist[-(min(new, n - k + 1) + k - 1):].detach().double()
    c = torch.cat([seg.new_zeros(1), seg.cumsum(0)])
    means = (c[k:] - c[:-k]) / k
    return bool((means <= thr).any()), n


class WMVStopper:
    """One slot's ES-WMV state. The engine calls :meth:`update` every ``check_every`` steps.

    ``best_image`` is the image at the VAR minimum so far (a clone, on the image's device); the engine
    saves it as the result when this stopper ends the fit (reason "auto"). ``last_mean`` is the mean of
    the current window (None until the window is full).

    With ``config.discrepancy`` > 0 and a noise level ``sigma`` (of the degraded image, in [0, 1]), the
    stopper also keeps ``fallback_image``: the image of the first check where the data term, averaged over
    ``discrepancy_smooth`` steps, reached ``discrepancy * sigma^2``. :meth:`result_image` is what the
    engine saves when a fit ends: the rule's image if it fired, else that fallback, else None (the last).
    """

    def __init__(self, config: StopConfig | None = None, sigma: float | None = None, **overrides):
        config = config or StopConfig()
        config = config.replace(**overrides) if overrides else config
        if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be a noise level >= 0, not {sigma}")
        self.config = config.at_sigma(sigma)  # the rule this fit runs (a floor that follows sigma, resolved)
        self.sigma = sigma
        self.fallback_image: torch.Tensor | None = None
        self.fallback_step: int | None = None
        self._checked_loss = 0  # steps of the data term already looked at by the discrepancy test
        self.floor_step: int | None = None  # the check where the data term reached config.floor * sigma^2
        self._floor_image: torch.Tensor | None = None
        self._floor_checked = 0
        self._fired_at: int | None = None  # the variance rule fired here, and waits for the floor
        self._floor_used = False  # the result is the floor's image
        self._stopped_at: int | None = None
        self._rule = _Rule(self.config)
        self._window: list[torch.Tensor] = []
        self.trace: list[tuple[int, float]] = []  # [(step, VAR)], raw (before any smoothing)
        self.best_image: torch.Tensor | None = None
        self._best_image_step: int | None = None
        self._steps: list[int] = []  # the steps of the images in the window
        self.last_mean: torch.Tensor | None = None
        self.last_step = 0
        self.reason = "running"

    @property
    def best_step(self) -> int | None:
        """The step of ``best_image`` (``lag`` checks before the VAR minimum's own step)."""
        return self._best_image_step

    @property
    def min_step(self) -> int | None:
        """The step of the check where VAR reached its (tolerated) minimum."""
        return self._rule.best_step

    @property
    def best_var(self) -> float:
        return self._rule.best_var

    @property
    def stopped_at(self) -> int | None:
        return self._stopped_at

    @torch.no_grad()
    def update(self, step: int, image: torch.Tensor, loss_hist: torch.Tensor | None = None) -> bool:
        """Feed the image rendered at ``step``; True = stop now (``best_image`` is the result)."""
        cfg = self.config
        if self.stopped_at is not None:
            return True
        self.last_step = int(step)
        x = image.detach().float().clone()  # the window's copy; also the fallback's (neither is changed in place)
        if loss_hist is not None and self.fallback_image is None and self._discrepancy_reached(loss_hist):
            self.fallback_image = x
            self.fallback_step = self.last_step
        if loss_hist is not None and self.floor_step is None and self.floor_level is not None:
            reached, self._floor_checked = _reached(loss_hist, self.floor_level, cfg.discrepancy_smooth,
                                                    self._floor_checked)
            if reached:
                self.floor_step, self._floor_image = self.last_step, x
        if self._fired_at is not None:  # the rule fired before the floor: wait for it, at most floor_wait checks
            if self.floor_step is not None:
                self._use_floor()
                return self._stop()
            if self.last_step >= self._fired_at + cfg.floor_wait * cfg.check_every:
                return self._stop()
            return False
        self._window.append(x)
        self._steps.append(self.last_step)
        if len(self._window) > cfg.window:
            self._window.pop(0)
            self._steps.pop(0)
        if len(self._window) < cfg.window:
            return False
        stack = torch.stack(self._window)  # (W, C, H, W)
        mean = stack.mean(0)
        self.last_mean = mean
        var = float((stack - mean).square().mean())  # the one host sync of a check
        self.trace.append((self.last_step, var))
        new_best, stop = self._rule.feed(self.last_step, var)
        if new_best:
            k = len(self._window) - 1 - cfg.lag
            self.best_image = (mean if cfg.result == "mean" else self._window[k]).clone()
            self._best_image_step = self._steps[k]
        if not stop:
            return False
        if self.floor_level is not None and self.floor_step is None:
            self._fired_at = self.last_step
            self._window = []  # not needed while it waits
            return cfg.floor_wait == 0 and self._stop()
        if self.floor_step is not None and self.floor_step > (self._best_image_step or 0):
            self._use_floor()
        return self._stop()

    def _use_floor(self) -> None:
        self.best_image, self._best_image_step, self._floor_used = self._floor_image, self.floor_step, True

    def _stop(self) -> bool:
        self._stopped_at, self.reason = self.last_step, "auto"
        self._floor_image = None
        return True

    @property
    def floor_level(self) -> float | None:
        """The data-term level ``floor * sigma^2`` the stop waits for (None when the floor is off)."""
        if not self.config.floor or self.sigma is None:
            return None
        return self.config.floor * self.sigma ** 2

    @property
    def threshold(self) -> float | None:
        """The discrepancy threshold ``discrepancy * sigma^2`` (None when the fallback is off)."""
        if not self.config.discrepancy or self.sigma is None:
            return None
        return self.config.discrepancy * self.sigma ** 2

    def _discrepancy_reached(self, loss_hist: torch.Tensor) -> bool:
        """Has any average of ``discrepancy_smooth`` consecutive losses, among those ending after the
        previous call, reached the threshold? (So the first crossing is found whatever the check interval.)"""
        reached, self._checked_loss = _reached(loss_hist, self.threshold, self.config.discrepancy_smooth,
                                               self._checked_loss)
        return reached

    def result_image(self) -> torch.Tensor | None:
        """The image the fit returns: the rule's if it fired (or the floor's), else the discrepancy fallback,
        else None."""
        if self.stopped_at is not None or self._fired_at is not None:
            return self.best_image
        return self.fallback_image

    @property
    def result_from(self) -> str:
        if self.stopped_at is not None or self._fired_at is not None:
            return "floor" if self.floor_step is not None and self._best_image_step == self.floor_step \
                and self._floor_used else "variance"
        return "discrepancy" if self.fallback_image is not None else "last"

    def summary(self) -> dict:
        """What goes into the result JSON under "stopping"."""
        bv = self.best_var
        out = {
            "rule": "es-wmv",
            "reason": self.reason if self.stopped_at is not None else "not triggered",
            "chosen_step": self.best_step,
            "min_step": self.min_step,
            "stopped_at": self.stopped_at,
            "last_step": self.last_step,
            "best_var": float(f"{bv:.6g}") if math.isfinite(bv) else None,
            "result_from": self.result_from,
            "config": self.config.to_dict(),
            "trace": [[int(s), float(f"{v:.6g}")] for s, v in self.trace],
        }
        if self.floor_level is not None:
            out["floor"] = {"factor": self.config.floor, "sigma_est": round(float(self.sigma), 6),
                            "step": self.floor_step, "fired_at": self._fired_at, "used": self._floor_used}
        if self.threshold is not None:
            out["fallback"] = {"rule": "discrepancy", "factor": self.config.discrepancy,
                               "sigma_est": round(float(self.sigma), 6), "step": self.fallback_step,
                               "used": self.result_from == "discrepancy"}
        return out


class HoldoutStopper:
    """Self-validation: one slot's stop on the error of the measurements its fit holds back.

    A fit with ``FitConfig.holdout`` leaves some known measurements out of its data term
    (pipeline.problem.holdout_pixels); the FitItem carries them as ``val_mask`` (their values are in its
    ``target``). At every check the rendered image's mean squared error on them,

        VAL_t = sum(V * (x_t - y)^2) / (C * sum(V)),

    is what the fit would score on pixels it has not seen. For inpainting with scattered holes those
    pixels are a sample of the same kind as the holes, and noise-free, so VAL follows the error in the
    holes: it falls while the image is learnt and rises once the fit starts to draw detail that is not
    there. The rule is ES-WMV's on VAL instead of the variance (``patience``, ``min_steps``,
    ``rel_tol`` of the StopConfig; ``window``, ``lag`` and the discrepancy fallback do not apply): stop
    once VAL has not reached a new minimum for ``patience`` checks, and return the image at the minimum.
    The interface is :class:`WMVStopper`'s.
    """

    def __init__(self, config: StopConfig, target, val_mask):
        self.config = config
        self._y = torch.as_tensor(np.asarray(target, np.float32))
        self._v = torch.as_tensor(np.asarray(val_mask, np.float32))
        self.held = int(self._v.sum())
        if self.held < 1:
            raise ValueError("a holdout stopper needs at least one held-back measurement")
        self._rule = _Rule(config.replace(smooth=1))
        self.trace: list[tuple[int, float]] = []  # [(step, VAL)]
        self.best_image: torch.Tensor | None = None
        self.fallback_image = None  # the interface of WMVStopper: no fallback
        self.fallback_step = None
        self.last_mean = None
        self.last_step = 0
        self.reason = "running"

    best_step = property(lambda self: self._rule.best_step)
    min_step = best_step
    stopped_at = property(lambda self: self._rule.stopped_at)
    best_val = property(lambda self: self._rule.best_var)

    @torch.no_grad()
    def update(self, step: int, image: torch.Tensor, loss_hist: torch.Tensor | None = None) -> bool:
        """Feed the image rendered at ``step``; True = stop now (``best_image`` is the result)."""
        if self.stopped_at is not None:
            return True
        if self._y.device != image.device:
            self._y, self._v = self._y.to(image.device), self._v.to(image.device)
        self.last_step = int(step)
        x = image.detach().float()
        val = float(((x - self._y) ** 2 * self._v).sum() / (self.held * x.shape[0]))  # one host sync
        self.trace.append((self.last_step, val))
        new_best, stop = self._rule.feed(self.last_step, val)
        if new_best:
            self.best_image = x.clone()
        if stop:
            self.reason = "auto"
        return stop

    def result_image(self) -> torch.Tensor | None:
        """The image the fit returns: the one at the VAL minimum if the rule fired, else None (the last)."""
        return self.best_image if self.stopped_at is not None else None

    @property
    def result_from(self) -> str:
        return "holdout" if self.stopped_at is not None else "last"

    def summary(self) -> dict:
        bv = self.best_val
        return {"rule": "holdout", "reason": self.reason if self.stopped_at is not None else "not triggered",
                "chosen_step": self.best_step, "min_step": self.min_step, "stopped_at": self.stopped_at,
                "last_step": self.last_step, "held_out": self.held,
                "best_val": float(f"{bv:.6g}") if math.isfinite(bv) else None, "result_from": self.result_from,
                "config": self.config.to_dict(), "trace": [[int(s), float(f"{v:.6g}")] for s, v in self.trace]}


# Defaults, in checks of ``check_every`` = 50 steps (docs/stopping.md has the measurements).
#
# Noise tasks (denoise, jpeg): the rendered (weights-EMA) output moves fast while the image is being
# learnt, then barely moves; its VAR falls by orders of magnitude and then flattens (and rises a little
# as the noise is fitted, or keeps creeping down). The PSNR peak sits at the knee, so the rule looks for
# the knee: a new minimum must halve VAR (rel_tol 0.5); the paper's rel_tol 0 follows the slow creep and
# stops 2-4 dB too late on our measurements.
# Inpainting: the PSNR keeps rising to the end of the schedule (there is no noise to fit), so the rule is
# the paper's (rel_tol 0) with a long patience: it only stops a fit that has really stopped moving.
# Super-resolution (no noise in the input): on our measurements the PSNR still creeps up at the end of
# the schedule, so only a small tolerance (0.1) and a long patience: it stops plateaued fits only.
# lag 1 (noise tasks, averaged outputs): the output average (decay 0.99 a step, ~100 steps of memory)
# lags the fit by a fixed number of steps whatever the image size, so the image one check before the
# minimum is the better one: on 9 CPU crops with the paper's net the mean gap to the oracle went from
# 0.58 to 0.46 dB (0.21 to 0.08 dB without the one crop where the rule never fired), better on 7 of 9.
# discrepancy 0.9 (denoise: Gaussian noise): where the variance rule never fires (kodim01 of those 9), the
# image where the loss reached 0.9 sigma_est^2 instead of the cap's last: the 9-crop mean gap went from
# 0.46 to 0.08 dB (kodim01 -3.50 -> -0.08; c 0.8-0.95 all gave 0.07-0.08). Not for jpeg: its artefacts are
# not Gaussian noise, and the estimate would mean nothing.
_TASK_DEFAULTS: dict[str, dict] = {
    "denoise": dict(window=4, patience=8, min_steps=200, rel_tol=0.5, lag=1, discrepancy=0.9),
    "jpeg": dict(window=4, patience=8, min_steps=200, rel_tol=0.5, lag=1),
    "sr": dict(window=4, patience=12, min_steps=500, rel_tol=0.1),
    "inpaint": dict(window=4, patience=16, min_steps=500, rel_tol=0.0),
}
# Presets with slower schedules keep the same rule on longer time scales.
_PRESET_DEFAULTS: dict[str, dict] = {
    "sr8": dict(patience=16, min_steps=800),
    "inpaint": dict(patience=20, min_steps=1000),
    "inpaint-object": dict(patience=20, min_steps=1000),
    "inpaint-sparse": dict(patience=40, min_steps=2000),  # lr 0.001: 10x slower than the others
    # The light denoising net reaches its best image sooner and leaves it faster than the paper's: the rule
    # replayed on the study's recorded traces of its tuning images (tools/replay_stop.py,
    # docs/efficiency.md) chose half the patience, and a new minimum that must fall to 30 % of the last.
    # As an average of several fits (four since stop 28, six of 24 channels since stop 31) each member may
    # stop later than a single fit's best step: the image at the variance minimum itself (lag 0) scored
    # 0.10 dB more on the tuning crops for the same work (four fits of 32 channels).
    # Since stop 33 the stop also waits (at most 10 checks) for the data term to reach the noise level
    # estimated from the input (floor 1.0): chosen on the tune crops at sigma 15, 25 and 50 by a rule written
    # before the data, then refitted on the held-out crops: +0.59 dB at sigma 15, +0.09 at 25, the same at 50.
    # Since stop 37 the floor follows the noise level: 0.9 (20 checks) where sigma_est is under 20/255, the
    # midpoint of the levels measured (chosen on the tune crops, then held out: +0.34 dB at sigma 15 for
    # 1.29x its steps there; at 25 and 50 the same fits; the study's d-w24ex6l0fs).
    "denoise-lite": dict(patience=4, rel_tol=0.7, lag=0, floor=1.0, floor_wait=10,
                         floor_low=0.9, floor_low_below=20 / 255, floor_low_wait=20),
}


def stop_config_for(cfg=None, check_every: int = 50, **overrides) -> StopConfig:
    """The StopConfig for a FitConfig (its task's and preset's defaults), with overrides applied.

    The defaults are set for check_every=50; another check_every keeps the same time scales in steps."""
    task = getattr(cfg, "task", None) or "denoise"
    base = dict(_TASK_DEFAULTS.get(task, _TASK_DEFAULTS["denoise"]))
    base.update(_PRESET_DEFAULTS.get(getattr(cfg, "preset", None) or "", {}))
    if getattr(cfg, "output", "ema") == "last":
        base["lag"] = 0  # no average, no lag
    if check_every != 50:
        f = 50.0 / check_every
        base["window"] = max(2, round(base["window"] * f))
        base["patience"] = max(1, round(base["patience"] * f))
        base["lag"] = round(base.get("lag", 0) * f)
    base["check_every"] = check_every
    over = {k: v for k, v in overrides.items() if v is not None}
    base.update(over)
    if "lag" not in over:  # a default lag never exceeds a window given by the caller
        base["lag"] = min(base.get("lag", 0), base["window"] - 1)
    return StopConfig(**base)


def sigma_of_item(item) -> float | None:
    """The noise level of a FitItem's degraded image, on its known region (the mask's bounding box: a
    padded canvas's padding is left out). None where that region is under 2x2 pixels."""
    t = np.asarray(item.target, np.float32)  # (C, h, w)
    m = getattr(item, "mask", None)
    if m is not None:
        known = np.asarray(m)[0] > 0
        rows, cols = np.nonzero(known.any(axis=1))[0], np.nonzero(known.any(axis=0))[0]
        if rows.size == 0:
            return None
        t = t[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    if t.shape[1] < 2 or t.shape[2] < 2:
        return None
    return estimate_sigma(np.moveaxis(t, 0, -1))


def stopper_for_item(config: StopConfig, item=None) -> WMVStopper | HoldoutStopper:
    """A fresh stopper for one FitItem: a :class:`HoldoutStopper` when the item holds measurements back
    (``val_mask``, FitConfig.holdout), else a WMVStopper; with ``config.discrepancy``, the latter's
    fallback noise level (and ``config.floor``'s) is estimated from the item's degraded image."""
    if item is not None and getattr(item, "val_mask", None) is not None:
        return HoldoutStopper(config, item.target, item.val_mask)
    sigma = None
    if (config.discrepancy or config.floor or config.floor_low) and item is not None \
            and getattr(item, "target", None) is not None:
        sigma = sigma_of_item(item)
    return WMVStopper(config, sigma=sigma)


def make_stopper_factory(cfg=None, check_every: int = 50, **overrides) -> Callable[..., WMVStopper]:
    """A ``stopper_factory`` for BatchedFitter / fit_problems: one fresh WMVStopper per loaded slot.

        fit_problems(problems, stopper_factory=make_stopper_factory(cfg))

    ``check_every`` must match the engine's (BatchedFitter's default: 50). The factory carries its
    StopConfig as ``factory.config`` and ``factory.check_every``. It takes the FitItem the engine passes
    (optional): with ``config.discrepancy`` its degraded image gives the noise level of the fallback.
    """
    config = stop_config_for(cfg, check_every=check_every, **overrides)

    def factory(item=None, *_args, **_kw) -> WMVStopper:
        return stopper_for_item(config, item)

    factory.config = config
    factory.check_every = config.check_every
    return factory
