"""Many problems through the one engine: bucketed by canvas, continuously batched, fed live.

:func:`fit_problems` is the scheduler between the problems (pipeline.problem) and the batched engine
(pipeline.engine.BatchedFitter). It buckets problems by (config, channels, canvas) and fits one bucket at
a time, a finished slot taking the bucket's next problem at once. It reads a :class:`Feed`, which can
have more problems later (a Ray actor's inbox), halves a batch that runs out of memory, and yields each
result as its image finishes.
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from pipeline.problem import Problem, Result, check_canvas_policy, from_fit, policy_canvas, to_fit_item

log = logging.getLogger("dip")


class Feed:
    """A source of problems for :func:`fit_problems` that may have nothing *now* and more later (the Ray
    actor's inbox, pipeline.job.actors). ``get(wait)`` returns the next problem (or a :class:`Ready`);
    ``None`` when nothing is there now and ``wait`` is False; ``Feed.END`` when nothing more will ever come.
    With ``wait`` True it blocks until one of those is available."""

    END = object()
    live = True  # False: everything is there from the start (a plain list behind the interface)

    def get(self, wait: bool):  # pragma: no cover - the interface
        raise NotImplementedError


@dataclass
class Ready:
    """A result made without the engine (a bad input, an image whose tiles are all copied), passed
    through a feed so that it comes out of fit_problems in turn."""

    problem: object
    result: object


class IterFeed(Feed):
    """A plain iterable as a feed: it never has "nothing now"."""

    live = False

    def __init__(self, it):
        self.it = iter(it)

    def get(self, wait: bool):
        return next(self.it, Feed.END)


def as_feed(problems) -> Feed:
    return problems if isinstance(problems, Feed) else IterFeed(problems)


def drain(feed: Feed) -> list:
    """Everything a feed will ever give, waiting for it."""
    out = []
    while (x := feed.get(True)) is not Feed.END:
        if x is not None:
            out.append(x)
    return out


def fit_problems(problems: Iterable[Problem] | Feed, device="auto", slots=None,
                 canvas_policy: str = "bucket", use_kernels: bool | None = None,
                 keep_weights: bool = False, trace_every: int = 0, stopper_factory=None,
                 on_step: Callable[[int], None] | None = None, elastic: bool = True,
                 on_start: Callable[[Problem], None] | None = None,
                 ) -> Iterator[tuple[Problem, Result | Exception]]:
    """Fit many problems with the batched engine; yields (problem, Result or the exception) as each ends.

    Problems are bucketed by (config, channels, canvas); with ``canvas_policy="ladder"`` each canvas side is
    first rounded up to a coarser ladder (:func:`pipeline.problem.ladder_side`: rungs at most 25 % apart), so
    that images of nearby sizes share a batch; with ``"common"`` every problem of a (config, channels)
    group is padded to the group's largest canvas. The padding is masked out of the data term and cropped
    off the result. One bucket is fitted at a time, continuously batched: a finished slot takes the next
    problem of its bucket at once. A problem with ``cfg.ensemble > 1`` gets a ValueError:
    pipeline.fit.fit_tiled splits it into its members.

    ``problems`` is an iterable, or a :class:`Feed` that can have more problems later: a bucket's batch
    then also takes the problems that arrive while it runs (so a Ray actor's batch stays full from one call
    to the next), and when its bucket has nothing left now it drains, and the oldest waiting problem's
    bucket goes next. A bucket that keeps being refilled while another bucket's problem waits hands over
    after ``4 x slots`` more loads. (A plain iterable is read whole first: buckets go in order of their first
    problem, each to its end.) ``canvas_policy="common"`` reads a feed to its end first.

    ``elastic``: a bucket's batch shrinks when it drains (to what is still loaded, once that is half of it
    or less) and grows when more problems wait than it has slots (up to its size), moving the fits' state
    (:meth:`pipeline.engine.BatchedFitter.resize`); False keeps each batch's size fixed.

    ``slots``: the batch size, or None (from the free device memory: pipeline.memory.auto_slots), or a
    function ``(cfg, canvas, channels, device, n_waiting) -> int | None``. Out of memory with more than one slot:
    the bucket's in-flight problems go back to the front of its queue and its batch size is halved;
    with one slot, the problem gets the error (pipeline.fit retries it as tiles).

    ``on_start(problem)`` is called when a problem's fit starts (it takes a slot of the engine).
    """
    from pipeline.engine import pick_device
    return Scheduler(as_feed(problems), pick_device(device), slots, canvas_policy, use_kernels, keep_weights,
                     trace_every, stopper_factory, on_step, elastic, on_start).run()


class Scheduler:
    """The state of one :func:`fit_problems` call: the buckets' queues, their batch sizes, what is ready."""

    def __init__(self, feed: Feed, dev, slots, canvas_policy, use_kernels, keep_weights, trace_every,
                 stopper_factory, on_step, elastic, on_start):
        check_canvas_policy(canvas_policy)
        self.feed, self.live = feed, feed.live
        self.dev, self.slots, self.policy = dev, slots, canvas_policy
        self.engine_kw = dict(use_kernels=use_kernels, keep_weights=keep_weights, trace_every=trace_every)
        self.stopper_factory, self.on_step, self.elastic, self.on_start = stopper_factory, on_step, elastic, on_start
        self.with_reference = trace_every > 0
        self.common: dict = {}  # (config, channels) -> the common canvas (canvas_policy "common")
        self.pending: dict = {}  # bucket key -> deque[(arrival, Problem)]
        self.ready: deque = deque()  # (problem, result) to yield in turn
        self.n_of: dict = {}  # bucket key -> its batch size (halved on out-of-memory)
        self.arrival = itertools.count()
        self.ended = False

    # ---- the queues ------------------------------------------------------------------------------------
    def run(self) -> Iterator[tuple[Problem, Result | Exception]]:
        if self.policy == "common":  # the common canvas is the largest of the group: read everything first
            everything = drain(self.feed)
            for x in everything:
                if not isinstance(x, Ready):
                    g = (x.cfg.replace(seed=0, steps=1), x.image.channels)
                    h, w = self.common.get(g, (0, 0))
                    self.common[g] = (max(h, x.canvas[0]), max(w, x.canvas[1]))
            self.feed, self.live = IterFeed(everything), False
        while True:
            self.poll()
            while self.ready:
                yield self.ready.popleft()
            waiting = [k for k, q in self.pending.items() if q]
            if not waiting:
                if self.ended:
                    return
                self.poll(wait=True)
                continue
            yield from self.run_bucket(min(waiting, key=lambda k: self.pending[k][0][0]))  # the oldest's bucket

    def route(self, x) -> None:
        if isinstance(x, Ready):
            self.ready.append((x.problem, x.result))
            return
        g = (x.cfg.replace(seed=0, steps=1), x.image.channels)
        canvas = self.common.get(g) or policy_canvas(x.cfg, x.canvas, self.policy)
        self.pending.setdefault(g + (canvas,), deque()).append((next(self.arrival), x))

    def poll(self, wait: bool = False) -> None:
        """Route what the feed has now (with ``wait``: block for the first of it)."""
        while not self.ended:
            x = self.feed.get(wait)
            if x is Feed.END:
                self.ended = True
            elif x is None:
                return
            else:
                self.route(x)
                wait = False

    def oldest_elsewhere(self, key) -> int | None:
        heads = [q[0][0] for k, q in self.pending.items() if q and k != key]
        return min(heads) if heads else None

    # ---- one bucket ------------------------------------------------------------------------------------
    def batch_size(self, key, cfg) -> int:
        """The bucket's batch size (kept for its later batches: a live feed's first ones may be small)."""
        from pipeline.memory import auto_slots
        _cfg0, C, canvas = key
        if key not in self.n_of:
            waiting = 64 if self.live else len(self.pending[key])
            n = self.slots(cfg, canvas, C, self.dev, waiting) if callable(self.slots) else self.slots
            self.n_of[key] = int(n or auto_slots(cfg, canvas, C, self.dev, waiting))
        return max(1, min(self.n_of[key], len(self.pending[key])))

    def run_bucket(self, key):
        """Fit the bucket's problems (and those that join it) in one continuously batched run."""
        import torch
        from pipeline.engine import BatchedFitter, is_oom
        _cfg0, C, canvas = key
        dq = self.pending[key]
        cfg = dq[0][1].cfg
        factory = self.stopper_factory
        if factory is None and cfg.auto_stop:
            from pipeline.stopping import make_stopper_factory
            factory = make_stopper_factory(cfg)
        n = self.batch_size(key, cfg)
        run = _BucketRun(self, key, canvas, n)
        fitter = None
        try:
            fitter = BatchedFitter(cfg, canvas, C, n, self.dev, stopper_factory=factory, **self.engine_kw)
            for fit in fitter.iter_run(run.items(), self.on_step,
                                       slots_wanted=run.wanted if self.elastic else None):
                _a, p = run.inflight.pop(fit.key)
                yield p, from_fit(p, fit, str(self.dev))
                while self.ready:
                    yield self.ready.popleft()
        except Exception as e:  # noqa: BLE001
            lost = sorted(run.inflight.values(), key=lambda ap: ap[0])
            run.inflight.clear()
            size = fitter.B if fitter is not None else n  # an elastic batch may have grown or shrunk
            fitter = None
            if is_oom(e) and size > 1:
                dq.extendleft(reversed(lost))  # back to the front of the queue, in their order
                self.n_of[key] = max(1, size // 2)
                log.warning("out of memory with %d slots on %s; retrying with %d", size, canvas, self.n_of[key])
                if self.dev.type == "cuda":
                    torch.cuda.empty_cache()
                return
            if not lost:  # the batch itself could not run: its bucket's waiting problems get the error
                lost = list(dq)
                dq.clear()
            for _a, p in lost:
                yield p, e


class _BucketRun:
    """One run of a bucket's batch: the engine's item stream, and the problems it has in flight."""

    def __init__(self, sched: Scheduler, key, canvas, n: int):
        self.s, self.key, self.canvas, self.n = sched, key, canvas, n
        self.dq = sched.pending[key]
        self.inflight: dict[int, tuple[int, Problem]] = {}  # engine key -> (arrival, problem)
        self.keys = itertools.count()
        self.passed_over = 0

    def items(self):
        """The engine's items: None for "nothing now" (the free slot waits), and the end when the bucket
        hands over to a bucket whose problem has waited longer (a live feed, after ``4 x slots`` loads)."""
        s, dq = self.s, self.dq
        while True:
            if not dq:
                s.poll()
            if dq:
                if s.live:
                    old = s.oldest_elsewhere(self.key)
                    if old is not None and old < dq[0][0]:
                        self.passed_over += 1
                        if self.passed_over > 4 * self.n:
                            return
                a, p = dq.popleft()
                try:
                    it = to_fit_item(p, key=next(self.keys), with_reference=s.with_reference, canvas=self.canvas)
                except Exception as e:  # noqa: BLE001
                    s.ready.append((p, e))
                    continue
                it.steps = p.cfg.steps
                self.inflight[it.key] = (a, p)
                if s.on_start is not None:
                    s.on_start(p)
                yield it
            elif s.ended:
                return
            else:
                yield None

    def wanted(self, n_loaded: int) -> int:
        """The batch size for what is loaded and what waits (the engine resizes to it)."""
        if not self.dq:
            self.s.poll()
        return min(self.s.n_of[self.key], n_loaded + len(self.dq))
