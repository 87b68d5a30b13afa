"""What the job shows while it runs: the images' counts, the fits in flight, the rate and the time left.

In a terminal it is a progress bar (tqdm), updated about once a second. Without one (a log file, a CI
job, `ray job logs`) it is a plain line every ``DIP_PROGRESS_LOG_EVERY`` seconds (default 30) instead, so
that an hour's job writes a hundred lines, not a bar redrawn every second. Both show the fits inside the
images: the fit-steps done across every worker's batch and their rate, which the actors report while
they fit (pipeline.job.actors), so a job of a few long fits does not look hung.

The counts are the summary's: done, failed and skipped images of this run, and what remains.
"""
from __future__ import annotations

import os
import sys
import time


def fmt_s(s: float) -> str:
    """Seconds as H:MM:SS ('?' when unknown)."""
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """The job's progress display (see the module docstring); ``quiet`` shows nothing."""

    def __init__(self, total: int, quiet: bool, stream=None):
        self.total = total
        self.stream = stream or sys.stderr
        self.t0 = time.time()
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = max(1.0, float(os.environ.get("DIP_PROGRESS_LOG_EVERY", 30)))
        self.last_log = time.time()
        self.steps: dict = {}  # worker -> fit-steps it reported
        self.rate_at: list = []  # [(time, total fit-steps)] over the last minute, for the rate
        self.bar = None
        if not quiet and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="img", file=self.stream, mininterval=1.0, dynamic_ncols=True)

    # ---- what it is told ---------------------------------------------------------------------------
    def image(self, counts, fitted: int, fitting: int, msg: str | None = None) -> None:
        """One image came to an end (``counts`` per status, ``fitted`` in this run, ``fitting`` now)."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self.line(counts, fitted, fitting), refresh=False)
            if msg:
                self.bar.write(msg)
        elif msg:
            print(msg, file=self.stream, flush=True)

    def fit_steps(self, worker, steps: int) -> None:
        """A worker's count of fit-steps so far."""
        self.steps[worker] = max(int(steps), self.steps.get(worker, 0))
        now = time.time()
        self.rate_at.append((now, sum(self.steps.values())))
        while len(self.rate_at) > 2 and now - self.rate_at[0][0] > 60:
            self.rate_at.pop(0)

    def tick(self, counts, fitted: int, fitting: int) -> None:
        """Called about once a second by the driver's loop."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(self.line(counts, fitted, fitting), refresh=False)
            self.bar.refresh()
        elif time.time() - self.last_log >= self.log_every:
            self.last_log = time.time()
            ended = sum(counts.values())
            print(f"dip: {ended}/{self.total} images: {self.line(counts, fitted, fitting)}", file=self.stream,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # ---- what it shows -------------------------------------------------------------------------------
    def step_rate(self) -> float | None:
        if len(self.rate_at) < 2 or self.rate_at[-1][0] - self.rate_at[0][0] < 1e-6:
            return None
        (t0, s0), (t1, s1) = self.rate_at[0], self.rate_at[-1]
        return (s1 - s0) / (t1 - t0)

    def line(self, counts, fitted: int, fitting: int) -> str:
        el = max(time.time() - self.t0, 1e-6)
        rate = fitted / el * 3600
        remaining = self.total - sum(counts.values())
        eta = remaining / (rate / 3600) if rate > 0 else float("nan")
        steps = sum(self.steps.values())
        sr = self.step_rate()
        fits = f"{fitting} fitting, {steps:,} fit-steps" + (f" ({sr:.1f}/s)" if sr is not None else "")
        return (f"done={counts['done']} failed={counts['failed']} skipped={counts['skipped']} "
                f"remaining={remaining}; {fits}; {rate:.0f} img/h, ETA {fmt_s(eta)}")
