"""fit_problems / fit_tiled on a live feed: problems that arrive while a batch runs join it (the Ray
actor's batch stays full from one call to the next), buckets take turns, out of memory requeues."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.api import Feed, Ready, fit_problems, make_problem
from pipeline.fit import fit_tiled
from pipeline.tiling import TiledResult

TINY = {"input_depth": 4, "channels_down": (4, 8), "channels_up": (4, 8), "channels_skip": (2, 2)}


def _img(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.5 + 0.3 * np.sin(5 * x + k) * np.cos(4 * y) for k in range(3)], -1)
    return np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1).astype(np.float32)


def _problem(name, steps, size=(32, 32), seed=0):
    return make_problem(_img(*size, seed), preset="fast", steps=steps, seed=seed, name=name, net=TINY)


class Waves(Feed):
    """Hands out ``waves`` one after the other: a wave is released once the engine has made ``at`` steps
    (counted by on_step) or when the engine has nothing else to do (get(wait=True))."""

    def __init__(self, waves):
        self.waves = [list(w) for _at, w in waves]
        self.at = [at for at, _w in waves]
        self.steps = 0
        self.waits = 0
        self.out: list = []

    def on_step(self, _live):
        self.steps += 1

    def get(self, wait: bool):
        if self.out:
            return self.out.pop(0)
        if not self.waves:
            return Feed.END
        if self.steps >= self.at[0] or wait:
            self.waits += wait
            self.at.pop(0)
            self.out = self.waves.pop(0)
            return self.out.pop(0) if self.out else None
        return None


def test_problems_arriving_while_a_batch_runs_join_it():
    feed = Waves([(0, [_problem("a", 30), _problem("b", 60)]), (10, [_problem("c", 30, seed=3)])])
    live = []

    def on_step(n):
        feed.on_step(n)
        live.append(n)

    got = {p.name: r for p, r in fit_problems(feed, device="cpu", slots=2, on_step=on_step)}
    assert sorted(got) == ["a", "b", "c"] and all(r.steps in (30, 60) for r in got.values())
    # c took a's slot at step 30: the batch stayed full, and it all took 60 steps (a batch that drained
    # between the waves would have run c alone for 30 more)
    assert set(live) == {2} and len(live) == 66  # 60 steps of b, +6 distilling; a and c: 30 + 3 each
    assert all(r.extra["batch"] == {"slots": 2, "occupancy": 1.0, "canvas": [32, 32]} for r in got.values())
    assert feed.waits == 0


def test_a_bucket_that_keeps_being_fed_hands_over_to_one_that_waits():
    big = _problem("big", 20, size=(64, 64), seed=9)
    smalls = [_problem(f"s{i}", 20, seed=i) for i in range(12)]
    # first the small bucket and the big image, then a stream of small ones, one new wave every 20 steps
    waves = [(0, [smalls[0], big])] + [(20 * i, [smalls[i]]) for i in range(1, 12)]
    feed = Waves(waves)
    order = [p.name for p, _r in fit_problems(feed, device="cpu", slots=1, on_step=feed.on_step)]
    assert sorted(order) == sorted(["big"] + [s.name for s in smalls])
    # the small bucket would have gone on to the end; the big image got its turn after 4 x slots more loads
    assert order.index("big") <= 6


def test_plain_lists_keep_their_order_and_ready_results_pass_through():
    a, b, c = _problem("a", 10), _problem("b", 10, size=(64, 32)), _problem("c", 10, seed=2)
    bad = Ready(_problem("bad", 10), ValueError("bad.png: not an image"))

    class Once(Feed):
        live = False

        def __init__(self, items):
            self.items = list(items)

        def get(self, wait):
            return self.items.pop(0) if self.items else Feed.END

    out = [(p.name, r) for p, r in fit_problems(Once([a, bad, b, c]), device="cpu", slots=2)]
    names = [n for n, _r in out]
    assert names[0] == "bad" and isinstance(out[0][1], ValueError)  # yielded as soon as it is read
    assert names.index("c") < names.index("b")  # a's bucket (a, c) first, to its end, then b's
    assert sorted(n for n, _ in out) == ["a", "b", "bad", "c"]


def test_out_of_memory_requeues_the_batch_with_half_the_slots(monkeypatch, caplog):
    from pipeline import engine
    real_step = engine.BatchedFitter.step
    calls = {"n": 0}

    def step(self):
        calls["n"] += 1
        if self.B > 1 and calls["n"] == 5:  # the batch of 4 runs out of memory at its 5th step
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self)

    monkeypatch.setattr(engine.BatchedFitter, "step", step)
    probs = [_problem(f"p{i}", 12, seed=i) for i in range(6)]
    with caplog.at_level(logging.WARNING, logger="dip"):
        got = [(p.name, r) for p, r in fit_problems(probs, device="cpu", slots=4)]
    assert sorted(n for n, _ in got) == [f"p{i}" for i in range(6)]  # each once, none lost
    assert all(not isinstance(r, Exception) and r.steps == 12 for _n, r in got)
    assert "out of memory with 4 slots" in caplog.text and "retrying with 2" in caplog.text


def test_fit_tiled_streams_whole_images_and_tiles_from_a_feed():
    big = make_problem(_img(64, 96, 5), preset="fast", steps=10, name="big", net=TINY)
    feed = Waves([(0, [_problem("a", 10)]), (5, [big, _problem("b", 10, seed=1)])])
    got = {p.name: r for p, r in fit_tiled(feed, device="cpu", tile=48, overlap=8, on_step=feed.on_step)}
    assert sorted(got) == ["a", "b", "big"]
    assert isinstance(got["big"], TiledResult) and got["big"].image.shape == (64, 96)
    assert not isinstance(got["a"], TiledResult) and got["a"].steps == 10


def test_batch_occupancy_counts_the_idle_slots_of_a_draining_batch():
    probs = [_problem("a", 30), _problem("b", 60)]
    got = {p.name: r for p, r in fit_problems(probs, device="cpu", slots=2, elastic=False)}
    assert got["a"].extra["batch"] == {"slots": 2, "occupancy": 1.0, "canvas": [32, 32]}
    # b: 66 steps (60 + 6 distilling), the first 33 beside a, the last 33 alone in a batch of 2
    assert got["b"].extra["batch"]["occupancy"] == pytest.approx((33 * 2 + 33 * 1) / (66 * 2), abs=1e-4)
    # elastic (the default): the batch shrinks to b's one slot once a is done
    got = {p.name: r for p, r in fit_problems(probs, device="cpu", slots=2)}
    assert got["b"].extra["batch"] == {"slots": 1, "occupancy": 1.0, "canvas": [32, 32]}


def _auto(name, seed, size=(32, 32)):
    """A fit with auto-stop (its stopper moves with it) and a reference (its PSNR trace moves too)."""
    from pipeline.io import ImageData
    img = _img(*size, seed)
    return make_problem(img, preset="fast", seed=seed, name=name, net=TINY,
                        reference=ImageData(np.clip(img + 0.01, 0, 1), None, 8))


def test_an_elastic_batch_gives_every_fit_exactly_the_result_of_a_fixed_one():
    """Shrinking a draining batch and growing one that problems wait for move each fit's whole state:
    on the CPU the results are bit-identical to fixed batches (and so to single fits)."""
    def run(elastic):
        # a first wave of one image, then five more while it runs: the batch starts with 1 slot and grows
        # to 4; the fits end at different steps (auto-stop), so it also drains and shrinks at the end
        feed = Waves([(0, [_auto("p0", 0)]), (20, [_auto(f"p{i}", i) for i in range(1, 6)])])
        out = {p.name: r for p, r in fit_problems(feed, device="cpu", slots=4, elastic=elastic, trace_every=50,
                                                  on_step=feed.on_step)}
        return out

    fixed, elastic = run(False), run(True)
    assert sorted(fixed) == sorted(elastic) == [f"p{i}" for i in range(6)]
    for k in fixed:
        a, b = fixed[k], elastic[k]
        assert np.array_equal(a.image.pixels, b.image.pixels), k
        assert a.steps == b.steps and a.loss == b.loss and a.stop_reason == b.stop_reason
        assert a.extra["stopping"]["trace"] == b.extra["stopping"]["trace"]
        assert a.extra["psnr_trace"] == b.extra["psnr_trace"]
    assert {r.extra["batch"]["slots"] for r in fixed.values()} == {1}  # fixed: the first wave's 1 slot
    slots = {k: r.extra["batch"]["slots"] for k, r in elastic.items()}
    assert max(slots.values()) == 4 and min(slots.values()) < 4  # grew for the second wave, shrank at the end


def test_a_batch_that_cannot_grow_goes_on_at_its_size(monkeypatch, caplog):
    from pipeline import engine
    real = engine.BatchedFitter.resize

    def resize(self, slots):
        if slots > self.B:
            raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(self, slots)

    monkeypatch.setattr(engine.BatchedFitter, "resize", resize)
    feed = Waves([(0, [_problem("p0", 40)]), (10, [_problem(f"p{i}", 40, seed=i) for i in range(1, 4)])])
    with caplog.at_level(logging.WARNING, logger="dip.engine"):
        got = {p.name: r for p, r in fit_problems(feed, device="cpu", slots=4, on_step=feed.on_step)}
    assert sorted(got) == ["p0", "p1", "p2", "p3"] and all(r.steps == 40 for r in got.values())
    assert {r.extra["batch"]["slots"] for r in got.values()} == {1}
    assert caplog.text.count("out of memory growing the batch from 1 to 4 slots") == 1  # tried once only


def test_the_canvas_ladder_rounds_sides_up_by_at_most_a_quarter():
    from pipeline.problem import ladder_side
    assert [ladder_side(k * 32, 32) // 32 for k in range(1, 21)] == \
        [2, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12, 14, 14, 16, 16, 20, 20, 20, 20]
    for m in (4, 32, 64):
        prev = 0
        for k in range(2, 400):
            r = ladder_side(k * m, m)
            assert r % m == 0 and r >= k * m and r >= prev
            assert k < 4 or r <= 1.25 * k * m + 1e-9
            prev = r


def test_the_ladder_policy_puts_nearby_sizes_in_one_batch_and_keeps_each_size():
    probs = [_problem("a", 6, size=(36, 36)), _problem("b", 6, size=(40, 38), seed=1)]
    for policy, slots, canvases in (("bucket", [1, 1], [[36, 36], [40, 40]]),
                                    ("ladder", [2, 2], [[40, 40], [40, 40]])):
        got = {p.name: r for p, r in fit_problems(probs, device="cpu", slots=2, canvas_policy=policy)}
        assert [got[n].extra["batch"]["slots"] for n in "ab"] == slots, policy
        assert [got[n].extra["batch"]["canvas"] for n in "ab"] == canvases, policy
        assert got["a"].image.shape == (36, 36) and got["b"].image.shape == (40, 38)
        assert np.isfinite(got["a"].loss).all()
    with pytest.raises(ValueError, match="canvas policy"):
        next(iter(fit_problems(probs, device="cpu", canvas_policy="largest")))
