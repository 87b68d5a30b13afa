"""The engine's own overhead at one slot (issue 16): its step against the plain torch loop's, alternated.

    python tools/engine_overhead.py --preset denoise --size 128 --steps 10 --rounds 5

Both are timed in one process, one after the other (in turn first), ``rounds`` times (pipeline.bench.speed: ``time_plain``
is the original's loop, torch.optim.Adam over the generator's parameters; ``time_config`` with one slot is
the engine as `dip restore` runs it). Prints each round and the median ratio. Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="denoise")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    import torch
    from pipeline.bench.speed import time_config, time_plain
    from pipeline.config import make_config
    cfg = make_config("denoise", preset=a.preset).replace(precision="fp32")
    ratios = []
    print(f"{a.preset} {a.size}x{a.size}, {a.steps} steps a timing, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'round':>5s} {'plain ms':>9s} {'engine ms':>10s} {'engine/plain':>13s}")
    for i in range(a.rounds):
        first_plain = i % 2 == 0  # ABBA: neither is always first (a drifting machine favours one)
        if first_plain:
            p = time_plain(cfg, a.size, a.steps, a.device)["step_ms"]
        e = time_config(cfg, a.size, 1, a.steps, a.device)["step_ms"]
        if not first_plain:
            p = time_plain(cfg, a.size, a.steps, a.device)["step_ms"]
        ratios.append(e / p)
        print(f"{i + 1:5d} {p:9.1f} {e:10.1f} {e / p:13.3f}", flush=True)
    print(f"median engine/plain: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
