"""The one fitting loop: B independent DIP fits stepped together, with continuous batching.

Every image that dip restores goes through :class:`BatchedFitter`, alone (B=1) or in a batch.
Per step, for every occupied slot s:

    z_s' = z_s + reg_noise_std * n_s            (n_s ~ N(0, 1) from slot s's own generator)
    x_s  = G_s(z_s')                            (one grouped forward for all slots)
    L_s  = sum(M_s * (A x_s - y_s)^2) / (C * sum(M_s))
    backward of sum_s L_s                       (slots share no weights, so each gets its own gradient)
    divergence: if L_s rose by more than divergence_db since the last good step, slot s's step is
                dropped and its last good weights are restored; else those weights are remembered
    Adam with a per-slot step count (a refilled slot restarts at step 1)
    averages: out_ema_s (outputs) or w_ema_s (weights), each slot from its own first step

With ``output="ema"`` and ``distill_steps`` > 0, a slot whose fit has ended is not released at once:
for N = min(distill_steps, ceil(its steps / 10)) more steps it fits its own output average (the result
image, on the output canvas) with z fixed and no input noise, Adam carrying on, and its result is then
the generator's render G_s(z). So the saved
image is one network's output, which its ONNX export re-renders exactly (docs/onnx.md).

Nothing in a step waits for the host: per-slot scalars live on the device and are expanded to the
flat weight layout there. The host only looks at a slot when its step budget is spent (known on the
host) or every ``check_every`` steps when a stopping rule is active.

A finished slot is refilled from the queue at once, so the batch stays full.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from pipeline.config import FitConfig
from pipeline.generator import SkipGenerator, make_input

log = logging.getLogger("dip.engine")


@dataclass
class FitItem:
    """One fitting problem in canvas coordinates (see pipeline.api.prepare).

    target: (C, h, w) float32 measurements on the measurement canvas (low-res for SR).
    mask:   (1, h, w) float32, 1 where a measurement is known (also 0 on the padding).
    reference: optional (C, H, W) clean image on the output canvas, for PSNR traces only.
    """

    key: object
    target: np.ndarray
    mask: np.ndarray
    seed: int = 0
    reference: np.ndarray | None = None
    ref_mask: np.ndarray | None = None  # (1, H, W): where the reference counts (the un-padded region)
    steps: int | None = None  # per-item step budget (default: the config's)


@dataclass
class FitResult:
    key: object
    image: np.ndarray  # (C, H, W) float32 in [0, 1] on the output canvas
    steps: int
    seed: int
    loss: np.ndarray  # per-step data-term loss
    restores: int  # how many times divergence recovery restored the last good weights
    seconds: float  # wall time while the slot was occupied (shared with the other slots)
    weights: torch.Tensor | None = None  # the flat weights of the rendered generator (CPU), for export
    z: torch.Tensor | None = None  # (depth, H, W) the fixed input
    psnr_trace: list = field(default_factory=list)  # [(step, psnr vs reference)] when a reference was given
    stop_reason: str = "steps"
    extra: dict = field(default_factory=dict)


def data_term(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, factor: int,
              use_kernels: bool | None = None) -> torch.Tensor:
    """Per-slot masked data term (B,). Fused CUDA kernels on CUDA (kernels/), torch elsewhere."""
    from kernels import dispatch
    return dispatch.data_term(out, target, mask, factor, use_kernels=use_kernels)


class BatchedFitter:
    """B slots of one architecture on one canvas. Call :meth:`run` with any number of items."""

    def __init__(self, cfg: FitConfig, canvas: tuple[int, int], channels: int, slots: int,
                 device: str | torch.device = "cpu", use_kernels: bool | None = None,
                 stopper_factory: Callable[[], object] | None = None, check_every: int = 50,
                 keep_weights: bool = False, trace_every: int = 0, conv: str = "auto"):
        self._args = dict(cfg=cfg, canvas=canvas, channels=channels, device=device, use_kernels=use_kernels,
                          stopper_factory=stopper_factory, check_every=check_every, keep_weights=keep_weights,
                          trace_every=trace_every, conv=conv)  # for resize()
        self.cfg = cfg
        self.H, self.W = canvas
        m = cfg.net.multiple
        if self.H % m or self.W % m:
            raise ValueError(f"canvas {self.H}x{self.W} is not a multiple of {m}")
        f = cfg.scale if cfg.task == "sr" else 1
        self.factor = f
        self.h, self.w = self.H // f, self.W // f
        self.C = channels
        self.B = slots
        self.device = torch.device(device)
        self.use_kernels = use_kernels
        self.stopper_factory = stopper_factory
        self.check_every = max(1, check_every)
        self.keep_weights = keep_weights
        self.trace_every = trace_every
        net = cfg.net.with_channels(channels)
        self.G = SkipGenerator(net, slots, self.device, conv=conv)
        dev, B, D = self.device, slots, net.input_depth
        self.z = torch.zeros(1, B * D, self.H, self.W, device=dev)
        self.noise = torch.zeros_like(self.z)
        self.target = torch.zeros(B, channels, self.h, self.w, device=dev)
        self.mask = torch.zeros(B, 1, self.h, self.w, device=dev)
        n = self.G.flat.numel()
        self.m = torch.zeros(n, device=dev)
        self.v = torch.zeros(n, device=dev)
        self.good = torch.zeros(n, device=dev)  # last good weights (divergence recovery)
        self.w_ema = torch.zeros(n, device=dev) if cfg.output == "weights_ema" else None
        self.out_ema = torch.zeros(B, channels, self.H, self.W, device=dev) if cfg.output == "ema" else None
        self.distill = distill_steps(cfg, 1) > 0
        self.dtarget = torch.zeros(B, channels, self.H, self.W, device=dev) if self.distill else None
        self.phase = torch.zeros(B, device=dev)  # 1 while a slot is distilling
        self.distilling = [False] * B
        self.main_steps = [0] * B  # the fit's own steps, once it has ended
        self.reasons = [""] * B  # why the fit ended (for a distilling slot)
        self.t = torch.zeros(B, device=dev)  # per-slot step count (float, for bias corrections)
        self.active = torch.zeros(B, device=dev)
        self.lr = torch.zeros(B, device=dev)
        self.last_good = torch.full((B,), math.inf, device=dev)
        self.restores = torch.zeros(B, device=dev)
        self.cap = 0
        self.hist = torch.zeros(B, 1, device=dev)
        self.gens: list[torch.Generator | None] = [None] * B
        self.items: list[FitItem | None] = [None] * B
        self.steps_done = [0] * B
        self.budget = [0] * B
        self.started = [0.0] * B
        self.stoppers: list[object | None] = [None] * B
        self.traces: list[list] = [[] for _ in range(B)]
        self.shared = [0.0] * B  # sum over a slot's steps of the share of the batch that was fitting
        self.ref = None
        self.ref_mask = None
        self.jump = 10.0 ** (cfg.divergence_db / 10.0)
        self.autocast = (torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
                         if cfg.precision == "bf16" else contextlib.nullcontext())
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            allow = cfg.precision != "fp32"
            torch.backends.cudnn.allow_tf32 = allow
            torch.backends.cuda.matmul.allow_tf32 = allow

    # ---- slots ----------------------------------------------------------------------------------
    def _ensure_hist(self, steps: int) -> None:
        if steps > self.cap:
            cap = max(steps, 2 * self.cap)
            h = torch.zeros(self.B, cap, device=self.device)
            h[:, :self.cap] = self.hist[:, :self.cap]
            self.hist, self.cap = h, cap

    def load(self, s: int, item: FitItem) -> None:
        cfg, dev = self.cfg, self.device
        C, h, w = item.target.shape
        if (C, h, w) != (self.C, self.h, self.w):
            raise ValueError(f"item {item.key!r}: target {item.target.shape} does not fit the canvas "
                             f"{(self.C, self.h, self.w)}")
        D = cfg.net.input_depth
        self.G.init_slot(s, item.seed)
        flat_slots = self.G.expand(torch.nn.functional.one_hot(torch.tensor(s, device=dev), self.B).float()) > 0
        with torch.no_grad():
            self.m[flat_slots] = 0
            self.v[flat_slots] = 0
            self.good[flat_slots] = self.G.flat[flat_slots]
            if self.w_ema is not None:
                self.w_ema[flat_slots] = self.G.flat[flat_slots]
            z = make_input(cfg.input_kind, D, self.H, self.W, item.seed, cfg.input_scale)
            self.z[0, s * D:(s + 1) * D] = z.to(dev)
            self.target[s] = torch.from_numpy(item.target).to(dev)
            self.mask[s] = torch.from_numpy(item.mask).to(dev)
            if item.reference is not None:
                if self.ref is None:
                    self.ref = torch.zeros(self.B, self.C, self.H, self.W, device=dev)
                    self.ref_mask = torch.zeros(self.B, 1, self.H, self.W, device=dev)
                self.ref[s] = torch.from_numpy(item.reference).to(dev)
                rm = item.ref_mask if item.ref_mask is not None else np.ones((1, self.H, self.W), np.float32)
                self.ref_mask[s] = torch.from_numpy(rm).to(dev)
        self.t[s] = 0
        self.active[s] = 1
        self.lr[s] = cfg.lr
        self.last_good[s] = math.inf
        self.restores[s] = 0
        g = torch.Generator(device=dev)
        g.manual_seed(int(item.seed) + 1)
        self.gens[s] = g
        self.items[s] = item
        self.steps_done[s] = 0
        self.shared[s] = 0.0
        self.budget[s] = int(item.steps or cfg.steps)
        self._ensure_hist(self.budget[s] + distill_steps(cfg, self.budget[s]))
        self.phase[s] = 0
        self.distilling[s] = False
        self.started[s] = time.perf_counter()
        self.stoppers[s] = self.stopper_factory(item) if self.stopper_factory else None
        self.traces[s] = []

    def unload(self, s: int) -> None:
        self.items[s] = None
        self.active[s] = 0
        self.lr[s] = 0
        self.phase[s] = 0
        self.distilling[s] = False

    @torch.no_grad()
    def resize(self, slots: int) -> None:
        """Continue with ``slots`` slots: the loaded slots move, in their order, into a new batch with
        everything a fit carries (weights, Adam moments, the last good weights, averages, z and the input
        noise, target and masks, step counts, learning rates, random generators, loss history, stopper,
        trace, distillation state). Nothing about a fit changes: on the CPU a resized run equals an
        unresized one bit for bit (tested). Used to shrink a draining batch (an empty slot costs as much
        as a full one) and to grow one that more problems are waiting for."""
        live = [s for s in range(self.B) if self.items[s] is not None]
        if slots < max(1, len(live)):
            raise ValueError(f"cannot fit {len(live)} loaded slots into {slots}")
        if slots == self.B:
            return
        new = BatchedFitter(slots=slots, **self._args)
        D = self.cfg.net.input_depth
        new._ensure_hist(self.cap)
        flats = [(self.G.flat, new.G.flat), (self.m, new.m), (self.v, new.v), (self.good, new.good)]
        if self.w_ema is not None:
            flats.append((self.w_ema, new.w_ema))
        rows = ["target", "mask", "out_ema", "dtarget", "phase", "t", "active", "lr", "last_good", "restores"]
        if self.ref is not None:
            new.ref = torch.zeros((slots,) + tuple(self.ref.shape[1:]), device=self.device)
            new.ref_mask = torch.zeros((slots,) + tuple(self.ref_mask.shape[1:]), device=self.device)
            rows += ["ref", "ref_mask"]
        lists = ["gens", "items", "steps_done", "budget", "started", "stoppers", "traces", "distilling",
                 "main_steps", "reasons", "shared"]
        for j, s in enumerate(live):
            for src, dst in flats:
                new.G.set_slot(j, self.G.get_slot(s, src), dst)
            for name in rows:
                a = getattr(self, name)
                if a is not None:
                    getattr(new, name)[j] = a[s]
            new.hist[j, :self.cap] = self.hist[s, :self.cap]
            new.z[0, j * D:(j + 1) * D] = self.z[0, s * D:(s + 1) * D]
            new.noise[0, j * D:(j + 1) * D] = self.noise[0, s * D:(s + 1) * D]
            for name in lists:
                getattr(new, name)[j] = getattr(self, name)[s]
        log.debug("batch resized from %d to %d slots (%d loaded)", self.B, slots, len(live))
        self.__dict__.update(new.__dict__)

    def begin_distill(self, s: int, reason: str, image: torch.Tensor) -> None:
        """Slot ``s``'s fit has ended with the result ``image`` (C, H, W): fit the generator to it."""
        D = self.cfg.net.input_depth
        self.dtarget[s] = image
        self.noise[0, s * D:(s + 1) * D].zero_()
        self.phase[s] = 1
        self.last_good[s] = math.inf  # a new loss: divergence is judged from its own first step
        self.distilling[s] = True
        self.main_steps[s] = self.steps_done[s]
        self.reasons[s] = reason
        self.budget[s] = self.steps_done[s] + distill_steps(self.cfg, self.steps_done[s])

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> torch.Tensor:
        cfg, G, B = self.cfg, self.G, self.B
        D = cfg.net.input_depth
        if cfg.reg_noise_std > 0:
            for s in range(B):
                if self.items[s] is not None and not self.distilling[s]:
                    self.noise[0, s * D:(s + 1) * D].normal_(generator=self.gens[s])
            zin = self.z + cfg.reg_noise_std * self.noise
        else:
            zin = self.z
        with self.autocast:
            out = G(zin)
        out = out.float()
        loss = data_term(out, self.target, self.mask, self.factor, self.use_kernels)  # (B,)
        if self.distill and any(self.distilling):
            fit_avg = ((out - self.dtarget) ** 2).flatten(1).mean(1)
            loss = torch.where(self.phase > 0, fit_avg, loss)
        G.backward_flat((loss * self.active).sum())
        with torch.no_grad():
            det = loss.detach()
            bad = ~(det <= self.last_good * self.jump) & (self.active > 0)  # NaN counts as diverged
            ok = ~bad
            okx = G.expand(ok.float()) > 0
            # remember the weights that gave this (good) loss; drop the step of a diverged slot
            torch.where(okx, G.flat, self.good, out=self.good)
            G.flat_grad.mul_(okx)
            self.last_good = torch.where(ok & (self.active > 0), det, self.last_good)
            self.restores += bad.float()
            # Adam (or RAdam), per-slot step counts and learning rates
            self.t += self.active
            optimizer_update(cfg, G, self.m, self.v, self.lr, self.t.clamp_min(1))
            torch.where(okx, G.flat, self.good, out=G.flat)
            # averages, each slot from its own first step
            first = (self.t <= 1).float()
            decay = (torch.clamp_max((1 + self.t) / (10 + self.t), cfg.ema) if cfg.ema_warmup
                     else torch.full_like(first, cfg.ema))
            wgt = torch.where(first > 0, torch.zeros_like(first), decay)
            if self.w_ema is not None:
                we = G.expand(wgt)
                self.w_ema.mul_(we).add_(G.flat * (1 - we))
            if self.out_ema is not None:
                wo = torch.where(self.phase > 0, torch.ones_like(wgt), wgt).view(B, 1, 1, 1)  # kept while distilling
                self.out_ema.mul_(wo).add_(out.detach() * (1 - wo))
            idx = (self.t - 1).clamp_min(0).long().clamp_max(self.cap - 1)
            self.hist.scatter_(1, idx.view(B, 1), det.view(B, 1))
        return det

    @torch.no_grad()
    def render(self, slots: list[int] | None = None) -> torch.Tensor:
        """The result image of every slot, (B, C, H, W), as the config's ``output`` defines it."""
        if self.cfg.output == "ema":
            return self.out_ema.clone()
        weights = self.w_ema if self.cfg.output == "weights_ema" else None
        with self.autocast:
            return self.G(self.z, weights=weights).float()

    @torch.no_grad()
    def render_generators(self) -> torch.Tensor:
        """Every slot's generator at its fixed z, (B, C, H, W): the result of a distilled slot."""
        with self.autocast:
            return self.G(self.z).float()

    def result_weights(self, s: int) -> torch.Tensor:
        src = self.w_ema if self.cfg.output == "weights_ema" else self.G.flat
        return self.G.get_slot(s, src).cpu()

    def _trace(self, s_list, step_of, img: torch.Tensor) -> None:
        """Record the PSNR of the rendered images ``img`` against the references (slots in ``s_list``)."""
        err = ((img - self.ref) ** 2 * self.ref_mask).flatten(1).sum(1) / (self.ref_mask.flatten(1).sum(1) * self.C).clamp_min(1)
        psnr = (-10 * torch.log10(err.clamp_min(1e-12))).cpu().tolist()
        for s in s_list:
            if self.items[s] is not None and self.items[s].reference is not None:
                self.traces[s].append((step_of[s], psnr[s]))

    def _finish(self, s: int, reason: str, images: torch.Tensor | None) -> FitResult:
        item = self.items[s]
        distilled = self.distilling[s]
        n = self.main_steps[s] if distilled else self.steps_done[s]
        img = (images if images is not None else self.render())[s].cpu().numpy()
        res = FitResult(key=item.key, image=img, steps=n, seed=item.seed,
                        loss=self.hist[s, :n].cpu().numpy().copy(), restores=int(self.restores[s].item()),
                        seconds=time.perf_counter() - self.started[s], stop_reason=reason,
                        psnr_trace=list(self.traces[s]))
        if self.keep_weights:
            res.weights = self.result_weights(s)
            D = self.cfg.net.input_depth
            res.z = self.z[0, s * D:(s + 1) * D].cpu().clone()
        st = self.stoppers[s]
        if st is not None and hasattr(st, "summary"):
            res.extra["stopping"] = st.summary()
        # the batch while this image was fitted: its slots, and the mean share of them that were working
        # (a drained batch still computes its empty slots), and the canvas it was fitted on (output pixels)
        res.extra["batch"] = {"slots": self.B,
                              "occupancy": round(self.shared[s] / max(1, self.steps_done[s]), 4),
                              "canvas": [self.H, self.W]}
        if distilled:
            err = float(((images[s] - self.dtarget[s]) ** 2).mean().item())
            res.extra["distill"] = {"steps": self.steps_done[s] - n,
                                    "psnr_to_average": round(-10 * math.log10(max(err, 1e-12)), 2)}
        self.unload(s)
        return res

    # ---- continuous batching --------------------------------------------------------------------
    def run(self, items: Iterable[FitItem], progress: Callable[[int], None] | None = None) -> list[FitResult]:
        return list(self.iter_run(items, progress))

    def iter_run(self, items: Iterable[FitItem | None], progress: Callable[[int], None] | None = None,
                 slots_wanted: Callable[[int], int] | None = None):
        """Fit every item, yielding each result as it finishes; finished slots are refilled at once.

        ``items`` may yield None for "nothing now, maybe later" (pipeline.api.fit_problems on a live feed):
        the free slot stays empty and is offered again at every check (every ``check_every`` steps) and
        whenever a slot frees. The run ends when the iterator ends and every slot is done, or when every
        slot is free and the iterator has nothing now.

        ``slots_wanted(n_loaded)``, asked whenever a slot frees and at every check, is the batch size the
        caller wants now (its loaded fits plus what waits for a slot, within its limit): the batch is
        resized (:meth:`resize`) when that is at most half its size (a draining batch: an empty slot costs
        as much as a full one) or at least 1.5 times it (more problems than slots are waiting)."""
        queue = iter(items)
        exhausted = False
        _end = object()

        grow_limit = 1 << 30

        def maybe_resize():
            nonlocal grow_limit
            if slots_wanted is None:
                return
            n = sum(1 for it in self.items if it is not None)
            if n == 0:
                return
            want = max(n, min(int(slots_wanted(n)), grow_limit))
            if 2 * want <= self.B or 2 * want >= 3 * self.B:
                try:
                    self.resize(want)
                except Exception as e:  # noqa: BLE001
                    if not (is_oom(e) and want > self.B):
                        raise
                    drop_tracebacks(e)
                    grow_limit = self.B  # the larger batch does not fit: go on as we are, and stay so
                    log.warning("out of memory growing the batch from %d to %d slots; staying at %d",
                                self.B, want, self.B)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()

        def refill():
            nonlocal exhausted
            for s in range(self.B):
                if self.items[s] is None and not exhausted:
                    nxt = next(queue, _end)
                    if nxt is _end:
                        exhausted = True
                        return
                    if nxt is None:  # nothing now
                        return
                    self.load(s, nxt)

        refill()
        n_steps = 0
        while any(it is not None for it in self.items):
            if n_steps and n_steps % self.check_every == 0:
                maybe_resize()
                if not exhausted and any(it is None for it in self.items):
                    refill()  # a slot left empty for want of work: has some arrived?
            n_steps += 1
            self.step()
            n_live = sum(1 for it in self.items if it is not None)
            for s in range(self.B):
                if self.items[s] is not None:
                    self.steps_done[s] += 1
                    self.shared[s] += n_live / self.B
            if progress:
                progress(n_live)
            done: list[tuple[int, str]] = []
            fitting = [s for s in range(self.B) if self.items[s] is not None and not self.distilling[s]]
            check = self.stopper_factory is not None and any(
                self.steps_done[s] % self.check_every == 0 for s in fitting)
            trace = self.trace_every and any(self.steps_done[s] % self.trace_every == 0 for s in fitting)
            trace = trace and self.ref is not None
            # one render serves the PSNR trace, the stopping rules and the results of this step
            images = self.render() if (trace or check) else None
            if trace:
                self._trace([s for s in fitting if self.steps_done[s] % self.trace_every == 0],
                            self.steps_done, images)
            if check:
                for s in fitting:
                    st = self.stoppers[s]
                    if (st is not None and self.steps_done[s] % self.check_every == 0
                            and st.update(self.steps_done[s], images[s], self.hist[s, :self.steps_done[s]])):
                        done.append((s, "auto"))
            for s in fitting:
                if self.steps_done[s] >= self.budget[s] and all(d[0] != s for d in done):
                    done.append((s, "steps"))
            distilled = [s for s in range(self.B) if self.distilling[s] and self.steps_done[s] >= self.budget[s]]
            if done:
                if images is None:
                    images = self.render()
                for s, reason in done:
                    # the stopper's choice: its rule's image when it fired, or its fallback at the cap
                    st = self.stoppers[s]
                    chosen = st.result_image() if st is not None and hasattr(st, "result_image") else None
                    if chosen is not None:
                        images = images.clone()
                        images[s] = chosen.to(images.device)
                    if self.distill:
                        self.begin_distill(s, reason, images[s])
                    else:
                        yield self._finish(s, reason, images)
            if distilled:
                gen_images = self.render_generators()
                for s in distilled:
                    yield self._finish(s, self.reasons[s], gen_images)
            if done or distilled:
                refill()
                maybe_resize()
                refill()


@torch.no_grad()
def optimizer_update(cfg: FitConfig, G: SkipGenerator, m: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                     t: torch.Tensor) -> None:
    """One optimiser step of every slot's weights (``G.flat``) from ``G.flat_grad``, with the moments
    ``m`` and ``v`` (flat, updated in place), the slots' base learning rates ``lr`` and step numbers ``t``
    (>= 1): Adam as torch.optim.Adam, or RAdam as torch.optim.RAdam (``cfg.optimizer``), each slot with
    its own bias corrections and scheduled learning rate (:func:`lr_schedule`)."""
    b1, b2 = cfg.adam_betas
    step_size = lr_schedule(cfg, lr, t) / (1 - b1 ** t)
    g = G.flat_grad
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    if cfg.optimizer == "radam":
        adaptive, plain = radam_factors(t, b2)
        G.flat.add_(m * G.expand(-step_size) * (G.expand(adaptive) / v.sqrt().add_(cfg.adam_eps) + G.expand(plain)))
    else:
        inv_bc2 = 1.0 / torch.sqrt(1 - b2 ** t)
        denom = (v.sqrt() * G.expand(inv_bc2)).add_(cfg.adam_eps)
        G.flat.addcdiv_(m * G.expand(-step_size), denom)


def lr_schedule(cfg: FitConfig, lr: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The per-slot learning rate at step ``t`` (a tensor of step numbers from 1): ``lr`` times the linear
    warm-up and the step decay of the config (FitConfig.lr_warmup, lr_decay, lr_decay_every)."""
    if cfg.lr_warmup:
        lr = lr * torch.clamp_max(t / cfg.lr_warmup, 1.0)
    if cfg.lr_decay_every and cfg.lr_decay != 1.0:
        lr = lr * cfg.lr_decay ** torch.floor((t - 1) / cfg.lr_decay_every)
    return lr


def radam_factors(t: torch.Tensor, b2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified Adam (Liu et al., ICLR 2020; torch.optim.RAdam), per slot at step ``t``: the update is
    ``step_size * m * (adaptive / (sqrt(v) + eps) + plain)``, i.e. Adam with the rectification
    ``r_t * sqrt(1 - b2^t)`` once the variance's length rho_t exceeds 5, plain momentum before. In float64:
    rho_t is a difference of two numbers near 2 / (1 - b2), which float32 would round by a few percent."""
    t64 = t.double()
    bc2 = 1 - b2 ** t64
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t64 * b2 ** t64 / bc2
    on = rho > 5
    rect = torch.sqrt(((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)).clamp_min(0))
    zero = torch.zeros_like(t64)
    return (torch.where(on, rect * torch.sqrt(bc2), zero).to(t.dtype),
            torch.where(on, zero, torch.ones_like(t64)).to(t.dtype))


def distill_steps(cfg: FitConfig, fit_steps: int) -> int:
    """Steps of the distillation after a fit of ``fit_steps`` steps: the config's, at most a tenth more."""
    if cfg.output != "ema" or cfg.distill_steps <= 0:
        return 0
    return min(cfg.distill_steps, max(1, math.ceil(fit_steps / 10)))


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA when torch sees it, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; anything else
    is a ValueError (see :func:`pipeline.config.check_device`)."""
    from pipeline.config import check_device
    device = check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def estimate_slot_bytes(cfg: FitConfig, canvas: tuple[int, int], channels: int, device,
                        slots: int = 1) -> int:
    """The peak memory of a batch of ``slots`` fits, measured with two steps on the device (CUDA only)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 0
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    f = cfg.scale if cfg.task == "sr" else 1
    fit = BatchedFitter(cfg, canvas, channels, slots, dev)
    h, w = canvas[0] // f, canvas[1] // f
    for s in range(slots):
        fit.load(s, FitItem("probe", np.zeros((channels, h, w), np.float32), np.ones((1, h, w), np.float32), seed=s))
    fit.step()
    fit.step()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del fit
    torch.cuda.empty_cache()
    return int(peak)


def slots_for_memory(budget: float, peak1: int, peak2: int, max_slots: int) -> int:
    """Slots that fit a byte budget, from the measured peaks of 1 and 2 slots.

    The one-slot peak includes what does not grow with the batch (cuDNN's autotuning workspaces, the
    CUDA context's allocations): it is the difference of the two peaks that each further slot costs.
    """
    per = max(peak2 - peak1, peak1 // 8, 1)  # never trust a marginal cost far below the one-slot peak
    fixed = max(peak1 - per, 0)
    return int(max(1, min(max_slots, (budget - fixed) // per)))


def auto_slots(cfg: FitConfig, canvas: tuple[int, int], channels: int, device, n_items: int,
               max_slots: int = 64, margin: float = 0.8) -> int:
    """How many fits to batch: on CUDA from the free memory and the measured peaks of 1 and 2 slots
    (a safety ``margin`` of the free memory is kept; out-of-memory later halves the batch); 1 on a CPU.

    On a CPU batching gains nothing (the convolutions already use every core: 2, 4 slots measured the
    same or slower per fit than one, docs/BENCHMARKS.md), and a batch whose queue has run dry still
    computes its empty slots: the last image of a 4-slot CPU batch took as long as four."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 1
    if n_items <= 1:
        return 1
    peak1 = estimate_slot_bytes(cfg, canvas, channels, dev, 1)
    peak2 = estimate_slot_bytes(cfg, canvas, channels, dev, 2)
    free, _total = torch.cuda.mem_get_info(dev)
    return min(n_items, slots_for_memory(free * margin, peak1, peak2, max_slots))


def drop_tracebacks(e: BaseException | None) -> None:
    """An exception that is handled or kept for later must not keep the failed fit's frames (and their
    tensors) alive."""
    while e is not None:
        e.__traceback__ = None
        e = e.__cause__ or e.__context__


def is_oom(exc: BaseException | None) -> bool:
    """A device running out of memory: CUDA's, or the host's (torch's CPU allocator: ``can't allocate
    memory``; C++ ``std::bad_alloc``; Python's MemoryError), also when it is the cause of ``exc`` (a
    tile's error names its image)."""
    while exc is not None:
        msg = str(exc).lower()
        if (isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in msg
                or "can't allocate memory" in msg or "bad_alloc" in msg):
            return True
        exc = exc.__cause__
    return False
