"""Replay the auto-stop rule with other settings on the traces a study recorded (no fit is run).

    python tools/replay_stop.py docs/study/study.jsonl --suite denoise --part tune --variants w32,w48,w64

Every study row keeps, per fit, the raw VAR trace of the rule (every 50 steps) and the PSNR of every checked
image (pipeline.bench.study): the rule's choice under another rel_tol / patience / lag is then exact for a
single fit. An ensemble's mean image is not recorded: ``--members`` replays each member of its rows on its
own (the gap of a member's image, a proxy for the ensemble's). Prints, per variant, the mean gap to the oracle
and the mean stop step of every setting of the grid, best first, and the current rule's.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def replay(row: dict, cfg, member: int = 0) -> tuple[float, float, int]:
    """(PSNR of the image the rule chooses, the oracle PSNR, the step it stops at) of one fit of a row (a
    single fit, or one member of an ensemble: its own image, not the ensemble's mean)."""
    from pipeline.stopping import choose_from_trace
    m = row["members"][member]
    by_step = {int(s): p for s, p, _pm in m["metric_trace"]}
    best = max(by_step.values())
    chosen, stopped = choose_from_trace(m["var_trace"], cfg)
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
    from pipeline.bench.study import variants_for
    from pipeline.config import make_config
    from pipeline.stopping import stop_config_for
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
        base = stop_config_for(make_config({"sr": "sr", "inpaint": "inpaint"}.get(a.suite, "denoise")), **v.stop)
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
            print(f"  the discrepancy principle ({len(with_loss)} fits with a data-term trace): the image where "
                  f"the data term first reaches d * sigma_est^2, or the variant's rule's if that is later")
            for d in DISCREPANCY_GRID:
                got = [discrepancy_replay(r, base, k, d) for r, k in with_loss]
                for j, name in ((0, "alone"), (1, "or later")):
                    gap = sum(g[j][0] - g[j][1] for g in got) / len(got)
                    print(f"    d={d:<4} {name:8}: gap {gap:+.3f} dB, stop at {sum(g[j][2] for g in got) / len(got):.0f}")
    return 0


DISCREPANCY_GRID = (0.9, 1.0, 1.1, 1.2, 1.3, 1.5)


def discrepancy_replay(row: dict, cfg, member: int, d: float):
    """((psnr, oracle, stop) of the discrepancy principle alone, and of the later of it and the rule's choice)
    for one fit: the first check whose data term (``loss_trace``) is at most d * sigma_est^2 (the fit's end
    when it never is)."""
    m = row["members"][member]
    by_step = {int(s): p for s, p, _pm in m["metric_trace"]}
    best, last_step = max(by_step.values()), max(by_step)
    thr = d * m["sigma_est"] ** 2
    hit = next((int(s) for s, loss in m["loss_trace"] if loss <= thr and int(s) in by_step), last_step)
    rule_psnr, _b, rule_stop = replay(row, cfg, member)
    from pipeline.stopping import choose_from_trace
    chosen, _st = choose_from_trace(m["var_trace"], cfg)
    later = max(hit, chosen or 0)
    return ((by_step[hit], best, hit),
            (by_step.get(later, rule_psnr), best, max(rule_stop, hit)))


if __name__ == "__main__":
    sys.exit(main())
