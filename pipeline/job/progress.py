"""What the job shows while it runs: a progress bar (tqdm) with the counts, the rate and the time left."""
from __future__ import annotations

import sys
import time


def fmt_s(s: float) -> str:
    """Seconds as H:MM:SS ('?' when unknown)."""
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """The bar over a job's images: done, failed (and skipped), what remains, images per hour, ETA."""

    def __init__(self, total: int, quiet: bool):
        from tqdm import tqdm
        self.total = total
        self.t0 = time.time()
        self.bar = tqdm(total=total, unit="img", disable=quiet, file=sys.stderr, mininterval=1.0,
                        dynamic_ncols=True)

    def image(self, counts, fitted: int, msg: str | None = None) -> None:
        """One image came to an end (``counts``: per status, ``fitted``: how many were fitted in this run)."""
        self.bar.update(1)
        self.postfix(counts, fitted)
        if msg:
            self.bar.write(msg)

    def postfix(self, counts, fitted: int) -> None:
        el = max(time.time() - self.t0, 1e-6)
        rate = fitted / el * 3600
        remaining = self.total - sum(counts.values())
        eta = remaining / (rate / 3600) if rate > 0 else float("nan")
        self.bar.set_postfix_str(f"done={counts['done']} failed={counts['failed'] + counts['skipped']} "
                                 f"remaining={remaining} {rate:.0f} img/h ETA {fmt_s(eta)}", refresh=False)

    def refresh(self, counts, fitted: int) -> None:
        self.postfix(counts, fitted)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
