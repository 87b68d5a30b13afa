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
from pipeline.operators import make_operator
from pipeline.optim import optimizer_update

log = logging.getLogger("dip.engine")


@dataclass
class FitItem:
    """One fitting problem in canvas coordinates (see pipeline.problem.to_fit_item).

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
    # (1, h, w): the known measurements held back from the data term (FitConfig.holdout), which the
    # stopper checks the rendered image against (their values are in ``target``); None = none
    val_mask: np.ndarray | None = None


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


@dataclass
class Slot:
    """The host state of the fit in one slot of a batch; :meth:`BatchedFitter.resize` moves it whole."""

    item: FitItem
    gen: torch.Generator  # the per-step input noise of this fit
    budget: int  # steps of the fit (then of its distillation)
    stopper: object | None
    started: float = field(default_factory=time.perf_counter)
    steps_done: int = 0
    shared: float = 0.0  # sum over its steps of the share of the batch that was fitting
    trace: list = field(default_factory=list)  # [(step, PSNR against the reference)]
    distilling: bool = False
    main_steps: int = 0  # the fit's own steps, once it has ended
    reason: str = ""  # why the fit ended (for a distilling slot)


# where a per-slot tensor keeps slot s: a row of dim 0, a block of input channels of (1, B*D, H, W), or the
# slot's part of the flat weight layout (SkipGenerator.get_slot / set_slot)
ROW, BLOCK, FLAT = "row", "block", "flat"


class BatchedFitter:
    """B slots of one architecture on one canvas. Call :meth:`run` with any number of items.

    The device state of the B fits lives in batch tensors, registered by :meth:`_per_slot` with the layout
    that holds slot ``s`` (``ROW`` / ``BLOCK`` / ``FLAT``), so that :meth:`resize` moves every one of them;
    the host state is one :class:`Slot` per loaded slot. The physics is ``self.op``
    (pipeline.operators), one mask row per slot."""

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
        self.C, self.B = channels, slots
        self.device = dev = torch.device(device)
        self.use_kernels = use_kernels
        self.stopper_factory = stopper_factory
        self.check_every = max(1, check_every)
        self.keep_weights = keep_weights
        self.trace_every = trace_every
        self.slots: list[Slot | None] = [None] * slots
        self._layout: dict[str, str] = {}  # per-slot tensor attribute -> its layout
        net = cfg.net.with_channels(channels)
        self.G = SkipGenerator(net, slots, dev, conv=conv)
        self._layout["G.flat"] = FLAT
        f = cfg.factor
        self.h, self.w = self.H // f, self.W // f
        self.op = make_operator(cfg.task, f, slots, (self.h, self.w)).to(dev)  # the physics, A = M D
        self._layout["op.mask"] = ROW
        B, D, n = slots, net.input_depth, self.G.flat.numel()
        self._per_slot("z", torch.zeros(1, B * D, self.H, self.W, device=dev), BLOCK)
        self._per_slot("noise", torch.zeros(1, B * D, self.H, self.W, device=dev), BLOCK)
        self._per_slot("target", torch.zeros(B, channels, self.h, self.w, device=dev), ROW)
        self._per_slot("m", torch.zeros(n, device=dev), FLAT)  # Adam's moments
        self._per_slot("v", torch.zeros(n, device=dev), FLAT)
        self._per_slot("good", torch.zeros(n, device=dev), FLAT)  # last good weights (divergence recovery)
        self._per_slot("w_ema", torch.zeros(n, device=dev) if cfg.output == "weights_ema" else None, FLAT)
        self._per_slot("out_ema", torch.zeros(B, channels, self.H, self.W, device=dev) if cfg.output == "ema"
                       else None, ROW)
        self.distill = distill_steps(cfg, 1) > 0
        self._per_slot("dtarget", torch.zeros(B, channels, self.H, self.W, device=dev) if self.distill else None,
                       ROW)
        self._per_slot("phase", torch.zeros(B, device=dev), ROW)  # 1 while a slot is distilling
        self._per_slot("t", torch.zeros(B, device=dev), ROW)  # per-slot step count (float, for bias corrections)
        self._per_slot("active", torch.zeros(B, device=dev), ROW)
        self._per_slot("lr", torch.zeros(B, device=dev), ROW)
        self._per_slot("last_good", torch.full((B,), math.inf, device=dev), ROW)
        self._per_slot("restores", torch.zeros(B, device=dev), ROW)
        self._per_slot("hist", torch.zeros(B, 1, device=dev), ROW)  # the loss of every step (grown as needed)
        self._per_slot("ref", None, ROW)  # references and their masks, made at the first item that has one
        self._per_slot("ref_mask", None, ROW)
        self.cap = 1
        self.jump = 10.0 ** (cfg.divergence_db / 10.0)
        self.autocast = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
                         if cfg.precision == "bf16" else contextlib.nullcontext())
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
            allow = cfg.precision != "fp32"
            torch.backends.cudnn.allow_tf32 = allow
            torch.backends.cuda.matmul.allow_tf32 = allow

    # ---- per-slot state -------------------------------------------------------------------------
    def _per_slot(self, name: str, tensor: torch.Tensor | None, layout: str) -> None:
        setattr(self, name, tensor)
        self._layout[name] = layout

    def _tensor(self, name: str) -> torch.Tensor | None:
        obj = self
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def _ensure_hist(self, steps: int) -> None:
        if steps > self.cap:
            cap = max(steps, 2 * self.cap)
            h = torch.zeros(self.B, cap, device=self.device)
            h[:, :self.cap] = self.hist[:, :self.cap]
            self.hist, self.cap = h, cap

    def live(self) -> list[int]:
        return [s for s in range(self.B) if self.slots[s] is not None]

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
            self.op.mask[s] = torch.from_numpy(item.mask).to(dev)
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
        self.phase[s] = 0
        g = torch.Generator(device=dev)
        g.manual_seed(int(item.seed) + 1)
        budget = int(item.steps or cfg.steps)
        self._ensure_hist(budget + distill_steps(cfg, budget))
        self.slots[s] = Slot(item=item, gen=g, budget=budget,
                             stopper=self.stopper_factory(item) if self.stopper_factory else None)

    def unload(self, s: int) -> None:
        self.slots[s] = None
        self.active[s] = 0
        self.lr[s] = 0
        self.phase[s] = 0

    @torch.no_grad()
    def resize(self, slots: int) -> None:
        """Continue with ``slots`` slots: the loaded slots move, in their order, into a new batch with
        everything a fit carries (every registered per-slot tensor: weights, Adam moments, the last good
        weights, averages, z and the input noise, target and masks, step counts, learning rates, loss
        history, references; and its :class:`Slot`: random generator, stopper, trace, distillation state).
        Nothing about a fit changes: on the CPU a resized run equals an unresized one bit for bit (tested).
        Used to shrink a draining batch (an empty slot costs as much as a full one) and to grow one that
        more problems are waiting for."""
        live = self.live()
        if slots < max(1, len(live)):
            raise ValueError(f"cannot fit {len(live)} loaded slots into {slots}")
        if slots == self.B:
            return
        new = BatchedFitter(slots=slots, **self._args)
        new._ensure_hist(self.cap)
        D = self.cfg.net.input_depth
        for name, layout in self._layout.items():
            src = self._tensor(name)
            if src is None:
                continue
            dst = new._tensor(name)
            if dst is None:  # made lazily (the references): as this batch's, with the new size
                dst = torch.zeros((slots,) + tuple(src.shape[1:]), device=self.device)
                setattr(new, name, dst)
            for j, s in enumerate(live):
                if layout == ROW:
                    dst[j] = src[s]
                elif layout == BLOCK:
                    dst[0, j * D:(j + 1) * D] = src[0, s * D:(s + 1) * D]
                else:
                    new.G.set_slot(j, self.G.get_slot(s, src), dst)
        for j, s in enumerate(live):
            new.slots[j] = self.slots[s]
        log.debug("batch resized from %d to %d slots (%d loaded)", self.B, slots, len(live))
        self.__dict__.update(new.__dict__)

    def begin_distill(self, s: int, reason: str, image: torch.Tensor) -> None:
        """Slot ``s``'s fit has ended with the result ``image`` (C, H, W): fit the generator to it."""
        D = self.cfg.net.input_depth
        sl = self.slots[s]
        self.dtarget[s] = image
        self.noise[0, s * D:(s + 1) * D].zero_()
        self.phase[s] = 1
        self.last_good[s] = math.inf  # a new loss: divergence is judged from its own first step
        sl.distilling, sl.main_steps, sl.reason = True, sl.steps_done, reason
        sl.budget = sl.steps_done + distill_steps(self.cfg, sl.steps_done)

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> torch.Tensor:
        cfg, G, B = self.cfg, self.G, self.B
        D = cfg.net.input_depth
        distilling = any(sl is not None and sl.distilling for sl in self.slots)
        if cfg.reg_noise_std > 0:
            for s, sl in enumerate(self.slots):
                if sl is not None and not sl.distilling:
                    self.noise[0, s * D:(s + 1) * D].normal_(generator=sl.gen)
            zin = self.z + cfg.reg_noise_std * self.noise
        else:
            zin = self.z
        with self.autocast:
            out = G(zin)
        out = out.float()
        loss = self.op.data_term(out, self.target, self.use_kernels)  # (B,)
        if self.distill and distilling:
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
    def render(self) -> torch.Tensor:
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

    def _trace(self, s_list: list[int], img: torch.Tensor) -> None:
        """Record the PSNR of the rendered images ``img`` against the references (slots in ``s_list``)."""
        err = ((img - self.ref) ** 2 * self.ref_mask).flatten(1).sum(1) / (self.ref_mask.flatten(1).sum(1) * self.C).clamp_min(1)
        psnr = (-10 * torch.log10(err.clamp_min(1e-12))).cpu().tolist()
        for s in s_list:
            sl = self.slots[s]
            if sl is not None and sl.item.reference is not None:
                sl.trace.append((sl.steps_done, psnr[s]))

    def _finish(self, s: int, reason: str, images: torch.Tensor | None) -> FitResult:
        sl = self.slots[s]
        n = sl.main_steps if sl.distilling else sl.steps_done
        img = (images if images is not None else self.render())[s].cpu().numpy()
        res = FitResult(key=sl.item.key, image=img, steps=n, seed=sl.item.seed,
                        loss=self.hist[s, :n].cpu().numpy().copy(), restores=int(self.restores[s].item()),
                        seconds=time.perf_counter() - sl.started, stop_reason=reason, psnr_trace=list(sl.trace))
        if self.keep_weights:
            res.weights = self.result_weights(s)
            D = self.cfg.net.input_depth
            res.z = self.z[0, s * D:(s + 1) * D].cpu().clone()
        if sl.stopper is not None and hasattr(sl.stopper, "summary"):
            res.extra["stopping"] = sl.stopper.summary()
        rule = getattr(self.stopper_factory, "config", None)  # a job's rule (make_stopper_factory): for resume
        if rule is not None and hasattr(rule, "to_dict"):
            res.extra["stop_rule"] = rule.to_dict()
        # the batch while this image was fitted: its slots, and the mean share of them that were working
        # (a drained batch still computes its empty slots), and the canvas it was fitted on (output pixels)
        res.extra["batch"] = {"slots": self.B, "occupancy": round(sl.shared / max(1, sl.steps_done), 4),
                              "canvas": [self.H, self.W]}
        if sl.distilling:
            err = float(((images[s] - self.dtarget[s]) ** 2).mean().item())
            res.extra["distill"] = {"steps": sl.steps_done - n,
                                    "psnr_to_average": round(-10 * math.log10(max(err, 1e-12)), 2)}
        self.unload(s)
        return res

    # ---- continuous batching --------------------------------------------------------------------
    def run(self, items: Iterable[FitItem], progress: Callable[[int], None] | None = None) -> list[FitResult]:
        return list(self.iter_run(items, progress))

    def iter_run(self, items: Iterable[FitItem | None], progress: Callable[[int], None] | None = None,
                 slots_wanted: Callable[[int], int] | None = None):
        """Fit every item, yielding each result as it finishes; finished slots are refilled at once.

        ``items`` may yield None for "nothing now, maybe later" (pipeline.batching.fit_problems on a live
        feed): the free slot stays empty and is offered again at every check (every ``check_every`` steps)
        and whenever a slot frees. The run ends when the iterator ends and every slot is done, or when every
        slot is free and the iterator has nothing now. ``progress(n_live)`` is called after every step.

        ``slots_wanted(n_loaded)``, asked whenever a slot frees and at every check, is the batch size the
        caller wants now (its loaded fits plus what waits for a slot, within its limit): the batch is
        resized (:meth:`resize`) when that is at most half its size (a draining batch: an empty slot costs
        as much as a full one) or at least 1.5 times it (more problems than slots are waiting)."""
        feed = _Refill(self, items, slots_wanted)
        feed.refill()
        n_steps = 0
        while self.live():
            # a slot left empty for want of work: has some arrived?
            if n_steps and n_steps % self.check_every == 0:
                feed.maybe_resize()
                if not feed.exhausted and len(self.live()) < self.B:
                    feed.refill()
            # one step of every loaded fit
            n_steps += 1
            self.step()
            live = self.live()
            for s in live:
                self.slots[s].steps_done += 1
                self.slots[s].shared += len(live) / self.B
            if progress:
                progress(len(live))
            # the checks: PSNR trace, stopping rules, step budgets
            done, images = self._checks()
            distilled = [s for s in live if self.slots[s].distilling and self.slots[s].steps_done >= self.slots[s].budget]
            # the fits that ended: distil their image, or yield it
            if done:
                if images is None:
                    images = self.render()
                for s, reason in done:
                    chosen = self._chosen(s)  # the stopper's choice: its rule's image, or its fallback at the cap
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
                    yield self._finish(s, self.slots[s].reason, gen_images)
            # free slots take the next items; the batch follows what is wanted
            if done or distilled:
                feed.refill()
                feed.maybe_resize()
                feed.refill()

    def _checks(self) -> tuple[list[tuple[int, str]], torch.Tensor | None]:
        """After a step: the PSNR traces and stopping rules that are due (one render serves them all, and the
        results of this step), and the fits that end now, with why ("auto" or "steps")."""
        fitting = [s for s in self.live() if not self.slots[s].distilling]
        due = lambda s, every: self.slots[s].steps_done % every == 0  # noqa: E731
        check = self.stopper_factory is not None and any(due(s, self.check_every) for s in fitting)
        trace = bool(self.trace_every) and self.ref is not None and any(due(s, self.trace_every) for s in fitting)
        images = self.render() if (trace or check) else None
        if trace:
            self._trace([s for s in fitting if due(s, self.trace_every)], images)
        done: list[tuple[int, str]] = []
        if check:
            for s in fitting:
                sl = self.slots[s]
                if (sl.stopper is not None and due(s, self.check_every)
                        and sl.stopper.update(sl.steps_done, images[s], self.hist[s, :sl.steps_done])):
                    done.append((s, "auto"))
        for s in fitting:
            if self.slots[s].steps_done >= self.slots[s].budget and all(d[0] != s for d in done):
                done.append((s, "steps"))
        return done, images

    def _chosen(self, s: int) -> torch.Tensor | None:
        st = self.slots[s].stopper
        return st.result_image() if st is not None and hasattr(st, "result_image") else None


class _Refill:
    """The item stream of one :meth:`BatchedFitter.iter_run`: fills free slots and resizes the batch."""

    _END = object()

    def __init__(self, fitter: BatchedFitter, items, slots_wanted):
        self.f, self.queue, self.slots_wanted = fitter, iter(items), slots_wanted
        self.exhausted = False
        self.grow_limit = 1 << 30

    def refill(self) -> None:
        f = self.f
        for s in range(f.B):
            if f.slots[s] is None and not self.exhausted:
                nxt = next(self.queue, self._END)
                if nxt is self._END:
                    self.exhausted = True
                    return
                if nxt is None:  # nothing now
                    return
                f.load(s, nxt)

    def maybe_resize(self) -> None:
        f = self.f
        if self.slots_wanted is None:
            return
        n = len(f.live())
        if n == 0:
            return
        want = max(n, min(int(self.slots_wanted(n)), self.grow_limit))
        if 2 * want <= f.B or 2 * want >= 3 * f.B:
            try:
                f.resize(want)
            except Exception as e:  # noqa: BLE001
                if not (is_oom(e) and want > f.B):
                    raise
                drop_tracebacks(e)
                self.grow_limit = f.B  # the larger batch does not fit: go on as we are, and stay so
                log.warning("out of memory growing the batch from %d to %d slots; staying at %d", f.B, want, f.B)
                if f.device.type == "cuda":
                    torch.cuda.empty_cache()


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
