"""The driver of `dip restore`: one loop that feeds the workers, records what they send back, and stops.

The driver (this process) expands the inputs (pipeline.job.manifest), reads and decodes every image, mask
and reference itself (so it alone needs the input files: no shared filesystem is assumed), hashes them,
skips what is already done (pipeline.job.resume), and ships the decoded problems to the actors
(pipeline.job.pool) through Ray's object store. It writes every output under ``--out`` on its own
filesystem (pipeline.job.outputs).

Faults: a dead actor's calls raise; their unfinished images go back to the front of the queue. Each failed
call counts against its images: after ``--max-retries`` failures an image is marked failed with its last
error, and the job goes on. A bad input fails at once, in the driver, and is not retried. Ctrl-C (or
SIGTERM, as ``ray job stop`` sends) stops cleanly: finished images stay finished, the manifest is flushed,
exit code 130. A full OUT stops the job at once: exit code 1.

Exit codes: 0 every image done; 1 some failed or were skipped (listed at the end and in the manifest),
or OUT ran out of space; 2 bad usage (no inputs, unreadable manifest, no usable worker, OUT locked); 130
interrupted.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

# Everything the driver runs is imported here, before it joins Ray: inside a Ray job (`ray job submit
# --working-dir`, deploy/submit), Ray removes the job's unpacked working directory, from which this code
# was imported, when the driver connects (seen with Ray 2.60), so an import after ray.init would fail.
from pipeline.job import report
from pipeline.job.manifest import MANIFEST_NAME, Input, JobManifest, UsageError, discover, now_iso, one_line
from pipeline.job.options import JobOptions
from pipeline.job.outputs import NO_SPACE, OutOfSpace, tile_store, write_result
from pipeline.job.pool import MAX_CALLS_PER_ACTOR, Call, Pool, init_ray, joins_cluster, own_node_dying
from pipeline.job.progress import Progress
from pipeline.job.resume import Entry, Outcome, outputs, prepare
from pipeline.work import fmt_gflop

log = logging.getLogger("dip.job")

LOCK_NAME = ".dip-job.lock"


class Interrupted(Exception):
    pass


def run(opts: JobOptions, *, owns_process: bool = False) -> int:
    """Run a whole job (the `dip restore` command, from Python). Returns the exit code.

    ``owns_process``: the caller is the `dip` command, whose process ends with the job. Stopped by SIGTERM
    with a Ray instance of its own, it then ends the process itself, at once (:meth:`Driver.leaves_ray`)."""
    out = Path(opts.out)
    try:  # the job's own options must make a valid config (manifest rows are checked per row)
        opts.check()
    except ValueError as e:
        print(f"dip: error: {e}", file=sys.stderr)
        return 2
    if out.exists() and not out.is_dir():
        print(f"dip: error: --out {out} is not a directory", file=sys.stderr)
        return 2
    try:
        items = discover(opts.inputs, out, opts.glob, opts.task)
    except UsageError as e:
        print(f"dip: error: {e}", file=sys.stderr)
        return 2
    if not items:
        print("dip: error: no input images found", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock(out)
    except OSError as e:
        print(f"dip: error: cannot write to --out {out}: {one_line(e)}", file=sys.stderr)
        return 2
    if lock is None:
        print(f"dip: error: another dip restore is writing to {out} ({out / LOCK_NAME} is locked)", file=sys.stderr)
        return 2
    driver = Driver(opts, out, items, owns_process=owns_process)
    try:
        rc = driver.run()
    finally:
        _unlock(out, lock)
    if driver.left_ray:
        _exit_now(rc)
    return rc


def _exit_now(rc: int) -> None:
    """End the process with ``rc`` without Ray's exit hook (what it would wait on is gone): everything of the
    job is written by now; only the standard streams and the log handlers are flushed."""
    import os
    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    os._exit(rc)


def _lock(out: Path):
    """OUT/.dip-job.lock, locked (flock) by this process; None if another job holds it. The file is
    removed when the job ends (:func:`_unlock`), so a lock is taken only on a file still at that path."""
    import fcntl
    import os
    path = out / LOCK_NAME
    for _ in range(10):
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return None
        try:  # the job before us may have removed the file between our open and our lock: take the new one
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()
    return None


def _unlock(out: Path, lock) -> None:
    """Remove the lock file, then release it (no job is left waiting on the removed file: see _lock)."""
    import os
    with contextlib.suppress(OSError):
        os.unlink(out / LOCK_NAME)
    lock.close()


class Driver:
    """One run of a job over its inputs: see the module docstring."""

    def __init__(self, opts: JobOptions, out: Path, items: list[Input], owns_process: bool = False):
        self.opts = opts
        self.owns_process = owns_process
        self.own_ray: str | None = None  # the address of the Ray instance this run started or joined
        self.left_ray = False  # stopped with its own Ray left to die with the process (leaves_ray)
        self.out = out.resolve()
        self.items = items
        self.max_retries = max(0, int(opts.max_retries if opts.max_retries is not None else 3))
        self.manifest = JobManifest(out)
        self.pool = Pool(opts)
        self.device = "cpu"  # the workers' device type: what each image's config is made for
        self.entries: dict[str, Entry] = {}  # the images being fitted, by id
        self.feed = collections.deque(items)  # inputs not yet looked at
        self.ready: collections.deque[Entry] = collections.deque()  # prepared before the workers started
        self.retry: collections.deque[Entry] = collections.deque()  # images to send again
        self.counts = collections.Counter()
        self.ended: list[tuple[str, str, str | None]] = []  # (id, status, message) of every image of this run
        self.fitted = 0
        self.occupancy = [0.0, 0.0]  # the fitted images' batch occupancy, weighted by their steps: sum, weight
        self.t0 = time.time()
        self.t_ready = time.time()
        self.bar: Progress | None = None
        self.cpu_default_said = False
        self.stop_signal: int | None = None  # set by the signal handler; the loop stops at its next turn

    # ---- the run --------------------------------------------------------------------------------------
    def run(self) -> int:
        import ray
        old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            self.catch_signals()
        run = self.manifest.start_run(argv=sys.argv, ray_address=None, device=None, actors=0,
                                      host=socket.gethostname(), options=_options_record(self.opts))
        self.bar = Progress(len(self.items), self.opts.quiet)
        status, error = "finished", None
        try:
            # what is already done is found before Ray starts: a rerun with nothing to do needs no worker
            local = expected_device(self.opts)
            if local is not None:
                self.device = local
                self.precheck()
            if self.feed or self.ready:
                self.start_workers(run)
                self.loop()
        except (KeyboardInterrupt, Interrupted):
            status = "interrupted"
            print("dip: interrupted; finished images are kept, the rest is redone by the same command",
                  file=sys.stderr)
        except OutOfSpace as e:
            status = "out of space"
            print(f"dip: error: {e}\ndip: stopped: the output folder cannot take more files. Finished images are "
                  f"kept; free space and run the same command again to do the rest.", file=sys.stderr)
        except UsageError as e:
            status, error = "failed", str(e)
            print(f"dip: error: {e}", file=sys.stderr)
        except BaseException as e:  # noqa: BLE001 - recorded as such, then raised: never "finished"
            status, error = "failed", f"{type(e).__name__}: {one_line(e)}"
            raise
        finally:
            if in_main:
                for sig, handler in old.items():
                    signal.signal(sig, handler)
            self.bar.close()
            self.close_run(run, status, error)
            self.left_ray = self.leaves_ray()
            if not self.left_ray:
                self.pool.shutdown()
                if self.own_ray is not None:
                    with contextlib.suppress(Exception):
                        ray.shutdown()
        try:  # OUT/report.html (pipeline.job.report); a report failure never fails the job
            report.build(self.out)
        except Exception as e:  # noqa: BLE001
            log.warning("could not write the report %s: %s", self.out / "report.html", one_line(e))
        if status == "interrupted":
            return 130
        if error is not None:
            return 2
        rc = self.summary()
        return 1 if status == "out of space" else rc

    def catch_signals(self) -> None:
        """SIGINT and SIGTERM (`ray job stop`) stop the job at the loop's next turn. The handler only sets a
        flag: raising from it could land inside Ray's C code (the driver waits in ray.wait nearly all the
        time), which then failed with a SystemError instead of stopping. SIGINT too, explicitly: a process
        started in the background of a script inherits SIGINT ignored, and Python then never raises
        KeyboardInterrupt. Installed again after ray.init, whose own SIGTERM handler would crash the
        driver."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self.on_signal)

    def on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def check_stop(self) -> None:
        if self.stop_signal is not None:
            raise Interrupted()

    def leaves_ray(self) -> bool:
        """Whether this run, of the `dip` command, stopped by SIGTERM, leaves the Ray instance it started
        (``local``) to die with the process instead of shutting it down: when that instance's own
        processes had the signal too (one of them has ended, :func:`~pipeline.job.pool.own_node_dying`).

        A SIGTERM is often sent to a whole process group or cgroup (`timeout`, Slurm's scancel, systemd).
        Ray's shutdown then waits seconds on its dying GCS, and when the GCS is gone first, Ray ends the
        process with exit 1 ("Failed to connect to GCS within N seconds", seen in CI), after the run was
        recorded as interrupted. What is left of the instance is bound to this process (Ray's fate sharing
        kills it when this one ends), so the command ends at once. A SIGTERM to dip alone is shut down as
        usual (Ray's agents would outlive a hard exit); a SIGINT never reaches Ray's processes (they block
        it); a joined cluster is not ours."""
        return (self.owns_process and self.stop_signal == signal.SIGTERM and self.own_ray == "local"
                and own_node_dying())

    def start_workers(self, run: dict) -> None:
        """Start or join Ray and the workers; the inputs prepared for another device are prepared again."""
        try:
            started_ray, address = init_ray(self.opts)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"cannot start or join Ray: {one_line(e)}") from None
        if started_ray:
            self.own_ray = address
        self.catch_signals()
        self.check_stop()
        self.pool.start(stopped=lambda: self.stop_signal is not None)
        self.check_stop()
        if self.pool.device != self.device:  # joined a cluster whose device the precheck could not know
            for entry in reversed(self.ready):
                self.feed.appendleft(entry.input)
            self.ready.clear()
        self.device = self.pool.device
        self.t_ready = time.time()
        run.update(ray_address=address, device=self.device, actors=len(self.pool.workers))

    def precheck(self) -> None:
        """Prepare inputs until the first that needs a fit: what is done (or bad) ends here."""
        while self.feed and not self.ready:
            self.check_stop()
            it = self.feed.popleft()
            got = self.prepare(it)
            if got is not None:
                self.ready.append(got)

    def loop(self) -> None:
        """Feed the workers, wait for their events, record them, until every image has an end."""
        import ray
        pool = self.pool
        while True:
            self.check_stop()
            # workers that failed: ping them; give up when none has worked for too long
            self.check_workers()
            # backpressure: round-robin, each worker gets a call before any gets two
            for _round in range(MAX_CALLS_PER_ACTOR):
                for w in pool.workers:
                    if pool.has_room(w):
                        self.submit(w)
            calls = pool.calls()
            pings = [w for w in pool.workers if w.ping is not None]
            if not calls and not self.feed and not self.retry and not self.ready:
                break
            if not calls and not pings:
                time.sleep(0.2)
                continue
            # the next event of any call, or a ping's answer (a signal only sets the flag: at most 1 s)
            ready, _ = ray.wait([c.gen for c in calls] + [w.ping for w in pings], num_returns=1, timeout=1.0)
            for g in ready:
                w = next((w for w in pings if _same(w.ping, g)), None)
                if w is not None:
                    pool.on_ping(w)
                    continue
                self.next_event(next(c for c in calls if _same(c.gen, g)))
            # what the user sees, and the manifest, at most about once a second
            self.bar.tick(self.counts, self.fitted, self.fitting())
            try:
                self.manifest.flush()
            except OSError as e:
                if e.errno in NO_SPACE:
                    raise OutOfSpace(f"{self.manifest.path}: cannot write the manifest: {one_line(e)}") from None
                raise

    def next_event(self, call: Call) -> None:
        import ray
        try:
            ref = next(call.gen)
            self.on_event(call, ray.get(ref))
        except StopIteration:
            for key in list(call.ids):  # should not happen: every image reports
                entry = self.entries.get(key)
                if entry is not None:
                    self.retry_or_fail(entry, "the worker returned no result")
            call.worker.calls.remove(call)
        except ray.exceptions.RayError as e:
            self.on_call_error(call, e)
            call.worker.calls.remove(call)

    def close_run(self, run: dict, status: str, error: str | None = None) -> None:
        """The images still in flight go back to pending; the run's record; the manifest, flushed."""
        for entry in list(self.entries.values()) + list(self.ready):
            self.manifest.update(entry.input.id, status="pending", error=None if status == "finished" else status)
        counts = {k: self.counts[k] for k in ("done", "failed", "skipped")}
        counts.update(fitted=self.fitted, pending=len(self.items) - sum(self.counts.values()))
        run.update(finished=now_iso(), status=status, counts=counts, batch_occupancy=self.batch_occupancy(),
                   seconds=round(time.time() - self.t0, 3), seconds_after_startup=round(time.time() - self.t_ready, 3),
                   **({"error": error} if error else {}),
                   **({"signal": signal.Signals(self.stop_signal).name} if self.stop_signal else {}))
        try:
            self.manifest.flush(force=True)
        except OSError as e:
            print(f"dip: warning: the manifest could not be updated ({one_line(e)}); each image's JSON "
                  f"still marks it done, so the same command will not redo finished images", file=sys.stderr)

    # ---- feeding the workers ----------------------------------------------------------------------------
    def submit(self, w) -> bool:
        n = self.pool.call_size()
        left = len(self.feed) + len(self.retry) + len(self.ready)  # an upper bound: some need no fitting
        n = max(1, min(n, -(-left // max(1, len(self.pool.workers)))))  # share a short queue among the actors
        batch = self.take(n)
        if not batch:
            return False
        for e in batch:  # the tiles that a stopped run (or a failed try) finished: merged, not fitted again
            try:
                e.problem.kept_tiles = tile_store(self.out, e.input.id).load()
            except OSError as err:
                log.warning("%s: its kept tiles cannot be read (%s); they are fitted again", e.input.input,
                            one_line(err))
        try:
            self.pool.submit(w, [(e.input.id, e.problem) for e in batch])
        finally:
            for e in batch:  # shipped (Ray copied the arguments): the driver does not hold them
                e.problem.kept_tiles = []
        return True

    def take(self, n: int) -> list[Entry]:
        """Up to ``n`` images to fit: the retries first, then new inputs (prepared: hashed, decoded)."""
        batch = []
        while len(batch) < n and self.retry:
            batch.append(self.retry.popleft())
        while len(batch) < n and self.ready:
            batch.append(self.ready.popleft())
        while len(batch) < n and self.feed:
            entry = self.prepare(self.feed.popleft())
            if entry is not None:
                batch.append(entry)
        for entry in batch:
            self.entries[entry.input.id] = entry
        return batch

    def prepare(self, it: Input) -> Entry | None:
        """An input's Entry when it is to be fitted; None (and its end counted) when it is not."""
        if not self.cpu_default_said and self.opts.uses_cpu_default(self.device, it.options):
            self.cpu_default_said = True
            o = self.opts.row_options(it.options)
            cfg = self.opts.config_for("cpu", it.options)
            log.info("no GPU: using the light '%s' preset for %s (%s steps at most) so that a CPU fit takes "
                     "minutes, not hours; pass --preset to choose another", cfg.preset, o["task"], cfg.steps)
        got = prepare(it, self.opts, self.manifest, self.device, self.out)
        if isinstance(got, Outcome):
            self.final(it.id, got.status, got.message)
            return None
        return got

    def check_workers(self) -> None:
        """Ping the workers that failed; fail the images when no worker has worked for too long."""
        self.pool.ping_unhealthy()
        limit = float(os.environ.get("DIP_ACTOR_TIMEOUT", 600))
        if self.pool.down_for() > limit:
            for entry in list(self.retry) + list(self.ready):
                self.entries.pop(entry.input.id, None)
                self.fail(entry.input.id, f"{entry.input.input}: no worker has been available for {limit:.0f} s")
            self.retry.clear()
            self.ready.clear()
            while self.feed:
                it = self.feed.popleft()
                self.manifest.update(it.id, input=it.input)
                self.fail(it.id, f"{it.input}: no worker has been available for {limit:.0f} s")

    # ---- what the workers send back ---------------------------------------------------------------------
    def on_event(self, call: Call, ev: dict) -> None:
        kind = ev.get("kind")
        if kind == "started":
            call.started = True
            call.worker.info = ev["worker"]
            return
        if kind == "progress":
            self.bar.fit_steps(id(call.worker), ev.get("steps", 0))
            return
        key = ev["id"]
        entry = self.entries.get(key)
        if kind == "tile":
            if entry is not None:
                self.keep_tile(entry, ev)
            return
        if kind == "fitting":  # its fit took a slot of the worker's engine: an attempt, charged if it fails
            if entry is not None:
                entry.fitting = True
                rec = self.manifest.get(key) or {}
                w = {k: call.worker.info.get(k) for k in ("node", "host", "pid", "device", "threads", "nice")}
                self.manifest.update(key, status="running", started=ev["time"],
                                     attempts=int(rec.get("attempts") or 0) + 1, worker=w)
            return
        if key in call.ids:
            call.ids.remove(key)
        if entry is None:
            return
        entry.fitting = False
        if kind == "done":
            self.write(entry, ev)
        else:
            self.retry_or_fail(entry, ev.get("error", "unknown error"))

    def write(self, entry: Entry, ev: dict) -> None:
        """Write one image's outputs; OUT full: back to pending, and the job stops (OutOfSpace)."""
        key = entry.input.id
        dest = self.out / key
        rec = self.manifest.get(key) or {}
        finished = ev["time"]
        seconds = ev["record"].get("seconds")
        job = {"id": key, "hash": entry.hash, "options_sha256": rec.get("options_sha256"),
               "input_sha256": rec.get("input_sha256"), "started": rec.get("started"), "finished": finished,
               "seconds": seconds, "attempts": rec.get("attempts"), "worker": rec.get("worker"),
               "run": self.manifest.run_no}
        try:
            write_result(dest, ev, job)
        except OSError as e:
            err = f"{dest}: cannot write the outputs: {one_line(e)}"
            self.entries.pop(key, None)
            if e.errno in NO_SPACE:  # not this image's fault: it goes back to pending and the job stops
                self.manifest.update(key, status="pending", error=err)
                raise OutOfSpace(err) from None
            self.manifest.update(key, status="failed", error=err, finished=finished)
            self.final(key, "failed", f"dip: {err}")
            return
        tile_store(self.out, key).clear()  # the result is written: its kept tiles are not needed
        self.manifest.update(key, status="done", error=None, finished=finished, seconds=seconds,
                             outputs=outputs(key, ev.get("onnx") is not None), onnx_error=ev.get("onnx_error"),
                             work=ev["record"].get("work"))
        self.fitted += 1
        b = ev["record"].get("batch")
        if isinstance(b, dict) and isinstance(b.get("occupancy"), (int, float)):
            w = float(ev["record"].get("steps") or 1)
            self.occupancy[0] += b["occupancy"] * w
            self.occupancy[1] += w
        self.entries.pop(key, None)
        msg = None
        if not self.opts.quiet:
            msg = f"{entry.input.input} -> {dest}.png ({ev['record'].get('steps')} steps, {seconds} s"
            m = ev["record"].get("metrics") or {}
            if m:
                msg += f", PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}"
            msg += ")"
        self.final(key, "done", msg)

    def keep_tile(self, entry: Entry, ev: dict) -> None:
        """Keep one finished tile of an image under OUT/.tiles/ (resume); a failure only costs the resume."""
        try:
            tile_store(self.out, entry.input.id).save(ev["index"], ev["blob"])
        except OSError as e:
            if not entry.tile_warned:
                entry.tile_warned = True
                log.warning("%s: its finished tiles cannot be kept for a later run (%s)", entry.input.input,
                            one_line(e))

    def retry_or_fail(self, entry: Entry, err: str) -> None:
        entry.failures.append(err)
        key = entry.input.id
        if len(entry.failures) > self.max_retries:
            self.entries.pop(key, None)
            e = err if entry.input.input in err else f"{entry.input.input}: {err}"
            self.manifest.update(key, failures=len(entry.failures))
            self.fail(key, f"{e} (gave up after {len(entry.failures)} tries)")
        else:
            log.warning("%s: %s; retrying (%d/%d)", entry.input.input, err, len(entry.failures), self.max_retries)
            rec = self.manifest.update(key, status="pending", error=err, failures=len(entry.failures))
            rec["requeued"] = int(rec.get("requeued") or 0) + 1
            self.retry.append(entry)

    def on_call_error(self, call: Call, exc: BaseException) -> None:
        """A call died with its worker: the images it was fitting are charged a failed try; those still
        waiting in the worker's queue go back to the queue uncharged."""
        err = f"worker failed: {type(exc).__name__}: {one_line(exc)}"[:400]
        for key in list(call.ids):
            entry = self.entries.get(key)
            if entry is None:
                continue
            if entry.fitting or entry.lost >= 10:
                entry.fitting = False
                self.retry_or_fail(entry, err)
            else:  # it never started fitting: back to the queue, not charged
                entry.lost += 1
                rec = self.manifest.update(key, status="pending")
                rec["requeued"] = int(rec.get("requeued") or 0) + 1
                self.retry.append(entry)
        call.ids.clear()
        self.pool.on_call_error(call, exc)

    # ---- bookkeeping ------------------------------------------------------------------------------------
    def fitting(self) -> int:
        return sum(1 for e in self.entries.values() if e.fitting)

    def final(self, key: str, status: str, msg: str | None = None) -> None:
        """One image came to an end in this run: count it, show it, remember it for the summary."""
        self.counts[status] += 1
        self.ended.append((key, status, msg))
        self.bar.image(self.counts, self.fitted, self.fitting(), msg)

    def fail(self, key: str, err: str, status: str = "failed") -> None:
        self.manifest.update(key, status=status, error=err, finished=now_iso())
        self.final(key, status, f"dip: {err}" if status == "failed" else f"dip: skipped: {err}")

    def batch_occupancy(self) -> float | None:
        """The mean share of the batch's slots that were fitting while this run's images were fitted."""
        return round(self.occupancy[0] / self.occupancy[1], 3) if self.occupancy[1] else None

    def summary(self) -> int:
        bad = [(k, status, msg) for k, status, msg in self.ended if status in ("failed", "skipped")]
        el = time.time() - self.t0
        occ = self.batch_occupancy()
        work = [r.get("work") for r in self.manifest.images.values()
                if r.get("run") == self.manifest.run_no and r.get("status") == "done" and r.get("work")]
        gflop = sum(w.get("gflop", 0) for w in work)
        log.info("%d done (%d fitted now), %d failed, %d skipped in %.1f s%s%s; manifest: %s", self.counts["done"],
                 self.fitted, self.counts["failed"], self.counts["skipped"], el,
                 f", batch occupancy {occ:.0%}" if occ is not None else "",
                 f", work {fmt_gflop(gflop)} ({fmt_gflop(gflop / len(work))} an image)" if work else "",
                 self.manifest.path)
        if bad:
            print(f"dip: {len(bad)} image(s) not done:", file=sys.stderr)
            for _k, status, msg in bad:
                print(f"  {status}: {(msg or '').removeprefix('dip: skipped: ').removeprefix('dip: ')}",
                      file=sys.stderr)
            return 1
        return 0


def expected_device(opts: JobOptions) -> str | None:
    """The workers' device type when it is known before Ray starts (a local instance, or --device cpu):
    what each image's config, and so its job hash, is made for. None when joining a cluster decides it."""
    if opts.device == "cpu":
        return "cpu"
    if joins_cluster(opts):
        return None
    import torch
    torch.set_num_threads(1)  # the driver computes nothing heavy: one thread, the cores are the workers'
    return "cuda" if torch.cuda.is_available() or opts.device.startswith("cuda") else "cpu"


def _options_record(opts: JobOptions) -> dict:
    """The job's options for the run's record (the inputs are in the images' records)."""
    d = opts.to_dict()
    d.pop("inputs", None)
    return d


def _same(x, g) -> bool:
    return x is g or (type(x) is type(g) and x == g)


__all__ = ["run", "Driver", "MANIFEST_NAME", "LOCK_NAME"]
