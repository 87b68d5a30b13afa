"""Replay the auto-stop rule with other settings on the traces a study recorded (no fit is run).

    python tools/replay_stop.py docs/study/study.jsonl --suite denoise --part tune --variants w32,w48,w64

Every study row keeps, per fit, the raw VAR trace of the rule (every 50 steps) and the PSNR of every checked
image (pipeline.bench.study): the rule's choice under another rel_tol / patience / lag is then exact for a
single fit. An ensemble's mean image is not recorded: ``--members`` replays each member of its rows on its
own (the gap of a member's image, a proxy for the ensemble's). Prints, per variant, the mean gap to the oracle
and the mean stop step of every setting of the grid, best first, and the current rule's. The grid
starts from the rule the variant's fits ran under (its preset's, with its overrides), and the tool
first checks that replaying that rule gives the stop each fit recorded.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def choose(m: dict, cfg) -> tuple[int | None, int | None]:
    """(chosen step, stop step) of ``cfg`` on one fit's recorded traces: with ``cfg.floor`` where the fit
    recorded its data term and noise level (``loss_trace``, ``sigma_est``), else the variance rule alone."""
    from pipeline.stopping import choose_with_floor
    loss = m.get("loss_trace") or []
    return choose_with_floor(m["var_trace"], loss, m.get("sigma_est") if loss else None, cfg)


def replay(row: dict, cfg, member: int = 0) -> tuple[float, float, int]:
    """(PSNR of the image the rule chooses, the oracle PSNR, the step it stops at) of one fit of a row (a
    single fit, or one member of an ensemble: its own image, not the ensemble's mean)."""
    m = row["members"][member]
    by_step = {int(s): p for s, p, _pm in m["metric_trace"]}
    best = max(by_step.values())
    chosen, stopped = choose(m, cfg)
    last = by_step[max(by_step)]
    if stopped is None:  # the rule never fired within the recorded run: the fit went to its end
        return last, best, m["ran"]
    return by_step.get(chosen, last), best, stopped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("--suite", default="denoise")
    ap.add_argument("--part", default="tune")
    ap.add_argument("--variants", required=True)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--members", action="store_true", help="ensemble rows too, each member replayed alone")
    ap.add_argument("--sigma", type=float, help="only the rows of this synthetic noise level (default: the "
                                                "authors' sigma=25 images)")
    a = ap.parse_args(argv)
    from pipeline.bench.variants import variants_for
    rows = [json.loads(x) for f in a.jsonl for x in Path(f).read_text().splitlines() if x.strip()]
    grid = [dict(rel_tol=t, patience=p, lag=g) for t, p, g in
            itertools.product((0.3, 0.5, 0.7, 0.8), (4, 6, 8, 12), (0, 1))]
    for v in variants_for(a.suite, a.variants.split(",")):
        rs = [(r, k) for r in rows if r["suite"] == a.suite and r["part"] == a.part and r["variant"] == v.name
              and r.get("sigma") == a.sigma and "members" in r and (a.members or r.get("k", 1) == 1)
              for k in range(len(r["members"]) if a.members else 1)]
        if not rs:
            print(f"{v.name}: no {'' if a.members else 'single-fit '}rows")
            continue
        base = variant_rule(a.suite, v, [r for r, _k in rs])
        same = sum(agrees(r, base, k) for r, k in rs)
        print(f"{v.name}: the replay of its own rule gives each fit's recorded stop in {same} of {len(rs)} fits")
        res = []
        for g in grid + [{}]:
            cfg = base.replace(**g)
            got = [replay(r, cfg, k) for r, k in rs]
            gap = sum(p - b for p, b, _s in got) / len(got)
            res.append((gap, sum(s for _p, _b, s in got) / len(got), g or "as the variant"))
        cur = res[-1]
        print(f"{v.name} ({len(rs)} fits): the variant's rule: gap {cur[0]:+.3f} dB, stop at {cur[1]:.0f}")
        for gap, st, g in sorted(res[:-1], key=lambda x: -x[0])[:a.top]:
            print(f"    {g}: gap {gap:+.3f} dB, stop at {st:.0f}")
        with_loss = [(r, k) for r, k in rs if r["members"][k].get("loss_trace") and r["members"][k].get("sigma_est")]
        if with_loss:
            print(f"  with the noise floor (StopConfig.floor; {len(with_loss)} fits with a data-term trace):")
            for f, wait in itertools.product(FLOOR_GRID, (10, 20)):
                got = [replay(r, base.replace(floor=f, floor_wait=wait), k) for r, k in with_loss]
                gap = sum(p - b for p, b, _s in got) / len(got)
                print(f"    floor {f:<4} wait {wait:2}: gap {gap:+.3f} dB, stop at {sum(x[2] for x in got) / len(got):.0f}")
    return 0


FLOOR_GRID = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5)


def variant_rule(suite: str, v, rows=()):
    """The StopConfig a study variant's fits ran under: the rule its rows recorded (since stop 33), else its
    preset's rule today with the variant's overrides (pipeline.bench.variants.variant_rule)."""
    from pipeline.bench.variants import variant_rule as today
    from pipeline.stopping import StopConfig
    recorded = {json.dumps(r["rule"], sort_keys=True) for r in rows if r.get("rule")}
    if len(recorded) == 1 and all(r.get("rule") for r in rows):
        return StopConfig(**json.loads(recorded.pop()))
    return StopConfig(**today(suite, v))


def agrees(row: dict, cfg, member: int = 0) -> bool:
    """Whether replaying ``cfg`` on a fit's recorded traces gives the step that fit stopped at and the
    image it chose (``stopped_at``, ``auto_step``): the check that a replay replays what ran."""
    m = row["members"][member]
    chosen, stopped = choose(m, cfg)
    return stopped is not None and (stopped, chosen) == (m["stopped_at"], m["auto_step"])


if __name__ == "__main__":
    sys.exit(main())
