"""`dip restore` on Ray: find the inputs, fit them on long-lived actors, write every result as it finishes.

Ray is always the engine. Without ``--address`` (and without ``RAY_ADDRESS``) the job starts an embedded
local Ray instance with this machine's resources (no dashboard unless ``--dashboard-host`` is given;
Ray's token authentication stays on, as Ray 2.60 sets it by default). With ``--address auto|host:port|
ray://...`` or ``RAY_ADDRESS`` (set by ``ray job submit``) it joins that cluster.

Who does what
-------------
* The **driver** (this process) expands the inputs (pipeline.manifest), reads and decodes every image,
  mask and reference itself (so it alone needs the input files: no shared filesystem is assumed),
  hashes them, skips what is already done, and ships the decoded :class:`pipeline.api.Problem` s to the
  actors through Ray's object store. It writes every output under ``--out`` on its own filesystem.
* **Actors** (:class:`FitWorker`): one long-lived actor per GPU (``num_gpus=1``), or on a cluster with no
  GPU, CPU actors that each take a share of a node's cores (``--actors`` overrides the count). Each runs
  the batched engine, :func:`pipeline.api.fit_problems`, and sends back per image the encoded PNG bytes,
  the JSON record and the ONNX bytes: never arrays, never paths on its own node.

The actor protocol: a Ray streaming generator
---------------------------------------------
``FitWorker.fit(batch)`` is called with ``num_returns="streaming"``. It first yields a ``started`` event
(ids, pid, node), then one ``done`` or ``error`` event per image *as each image finishes*
(fit_problems yields results in finishing order). The driver keeps up to two calls' worth of images in
flight per actor, counted in images: a new call goes out as soon as the actor's unfinished images are down
to one call's worth, not when a call has ended (a call ends only with its slowest image). The actor runs
its calls at once (``max_concurrency``: up to three calls and the driver's pings) and they all feed the
one engine thread of the actor (:class:`FitWorker`): a new call's images take the slots the earlier
calls' images free, so the batch stays full from one call to the next and never drains at a call's end
(it used to: a call's last slots idled until its slowest image ended).
Streaming lets the driver record every image the moment it is done (one call per image would lose the
batching; one call per batch returning a list would hold finished images hostage to the slowest one;
a submit()/poll() pair would need a thread and a poll interval in the actor). The driver waits on all
calls' generators with ``ray.wait`` (backpressure: a new call is only sent when an actor has room).

Faults
------
If an actor (or its node) dies, its calls raise; their unfinished images go back to the front of the
queue, and Ray restarts the actor (``max_restarts``); an actor that Ray gave up on is replaced. Each
failed call counts against its images: after ``--max-retries`` (default 3) failures an image is marked
failed with its last error, and the job goes on. A bad input fails at once, in the driver, and is not
retried. CUDA out-of-memory halves the batch inside fit_problems. Ctrl-C (or SIGTERM, as ``ray job
stop`` sends) stops cleanly: finished images stay finished, the manifest is flushed, exit code 130.
When OUT cannot be written because it is full, over quota or read-only, the job stops at once (every
further image would fail the same way after its fit): the image being written goes back to pending,
what was written stays done, and the message says to free space and run the same command again;
exit code 1.

Nothing lost, nothing done twice
--------------------------------
Per image the driver writes ``<stem>.png``, then ``<stem>.onnx``, then ``<stem>.json`` last, each
atomically (temporary file + rename); the JSON is the "done" marker and carries the job hash (input,
mask, reference bytes + the full config). A rerun skips images whose JSON has the same hash (their
manifest records and timestamps are kept) and redoes the rest. An existing result with a *different*
hash is not overwritten unless ``--overwrite``: the image is reported as skipped with the error
"exists with different options". A lock file (OUT/.dip-job.lock) keeps two jobs from writing the same
OUT at once. See pipeline.manifest for the manifest format.

Exit codes: 0 every image done; 1 some failed or were skipped (listed at the end and in the manifest),
or OUT ran out of space; 2 bad usage (no inputs, unreadable manifest, no usable worker, OUT locked); 130 interrupted.

``python -m pipeline.job --bench N`` measures images/hour through the Ray actors against calling
fit_problems directly on the same images (see :func:`bench_main`).
"""
from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.api import Feed
from pipeline.io import read_json
from pipeline.manifest import (MANIFEST_NAME, JobManifest, UsageError, WorkItem, canonical_json, discover, now_iso,
                               sha256_text)

log = logging.getLogger("dip.job")

LOCK_NAME = ".dip-job.lock"
CALLS_PER_ACTOR = 2  # images in flight per actor: up to this many calls' worth
MAX_CALLS_PER_ACTOR = 3  # open calls per actor (each holds one of the actor's threads while it waits)


def room_for_a_call(unfinished: list[int], call_size: int) -> bool:
    """May an actor whose open calls have these counts of unfinished images take one more call?

    Backpressure by images, not calls: a new call goes out once the actor's unfinished images are down to
    ``CALLS_PER_ACTOR - 1`` calls' worth, so its batch is refilled while an older call still waits for its
    slowest image (a call ends only when that one does), within ``MAX_CALLS_PER_ACTOR`` open calls."""
    return len(unfinished) < MAX_CALLS_PER_ACTOR and sum(unfinished) <= (CALLS_PER_ACTOR - 1) * call_size


def config_for(args, device_type: str, row: dict | None = None):
    """The FitConfig of one image: the command line's options, overridden by its manifest row."""
    from pipeline.config import PRESETS, make_config
    row = row or {}
    preset = row.get("preset", args.preset)
    if preset is None and device_type == "cpu":
        preset = "fast"
        if not getattr(args, "_fast_logged", False):
            steps = row.get("steps", args.steps)
            log.info("no GPU: using the small 'fast' preset (4 scales, <=64 channels, %s steps) so that a CPU "
                     "fit takes minutes, not hours; pass --preset to choose another",
                     PRESETS["fast"].steps if steps in (None, "auto") else steps)
            with contextlib.suppress(AttributeError):
                args._fast_logged = True
    over = {"steps": row.get("steps", args.steps), "seed": row.get("seed", args.seed),
            "output": getattr(args, "output", None), "precision": getattr(args, "precision", None),
            "distill_steps": getattr(args, "distill_steps", None), "ensemble": getattr(args, "ensemble", None)}
    return make_config(row.get("task", args.task), preset=preset, scale=row.get("scale", args.scale), **over)


# ---- the actor ---------------------------------------------------------------------------------------
class _Inbox(Feed):
    """The actor's feed: the problems of every call, in arrival order. It never ends;
    ``get(wait=False)`` returns None when it is empty, ``get(wait=True)`` blocks until a call adds some."""

    def __init__(self):
        import threading
        self.cv = threading.Condition()
        self.queue: collections.deque = collections.deque()

    def put(self, problems: list) -> None:
        with self.cv:
            self.queue.extend(problems)
            self.cv.notify_all()

    def get(self, wait: bool):
        with self.cv:
            while not self.queue:
                if not wait:
                    return None
                self.cv.wait()
            return self.queue.popleft()


class FitWorker:
    """One long-lived fitting process (one GPU, or a share of a node's cores). See the module docstring.

    It runs one engine thread: :func:`pipeline.tiling.fit_tiled` on an inbox that every ``fit`` call adds
    its problems to, so the batch goes on from one call's images to the next without draining (Ray runs
    the calls in threads: ``max_concurrency`` > 1). Each call waits for its own images' results, encodes
    them (while the engine goes on) and streams them back. If the engine thread dies, every waiting call
    fails (the driver retries its images) and the next call starts a new engine."""

    def __init__(self, device: str, slots: int | None, use_kernels, keep_weights: bool, onnx_dtype: str,
                 threads: int | None = None, tile: int | None = None, tile_overlap: int | None = None,
                 max_memory: int | None = None):
        import threading
        import torch
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.tile, self.tile_overlap, self.max_memory = tile, tile_overlap, max_memory
        self.device = device
        self.slots = slots
        self.use_kernels = use_kernels
        self.keep_weights = keep_weights
        self.onnx_dtype = onnx_dtype
        self._lock = threading.Lock()
        self._engine = None  # the engine thread
        self._inbox: _Inbox | None = None
        self._owners: dict[int, tuple] = {}  # id(problem) -> (the call's result queue, image id)

    def info(self) -> dict:
        import ray
        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node": ctx.get_node_id(), "host": socket.gethostname(), "device": self.device,
                "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def _start_engine(self) -> None:
        """(Under the lock.) A new inbox and engine thread, unless one is running."""
        import threading
        if self._engine is not None and self._engine.is_alive():
            return
        self._inbox = _Inbox()
        self._engine = threading.Thread(target=self._run_engine, args=(self._inbox,), name="dip-engine",
                                        daemon=True)
        self._engine.start()

    def _run_engine(self, inbox: _Inbox) -> None:
        from pipeline.engine import pick_device
        from pipeline.tiling import fit_tiled
        try:
            dev = pick_device(self.device)
            # the batched engine; images too large for one fit (or above --tile / --max-memory) go as tiles
            for p, res in fit_tiled(inbox, device=dev, slots=self.slots, tile=self.tile,
                                    overlap=self.tile_overlap, max_memory=self.max_memory,
                                    keep_weights=self.keep_weights, use_kernels=self.use_kernels):
                with self._lock:
                    owner = self._owners.pop(id(p), None)
                if owner is not None:
                    owner[0].put((owner[1], res))
        except BaseException as e:  # noqa: BLE001 - every waiting call must hear of it
            log.exception("the fitting engine stopped")
            with self._lock:
                if self._inbox is inbox:
                    self._engine, self._inbox = None, None
                owners, self._owners = self._owners, {}
            for q, _key in owners.values():
                q.put((None, e))

    def fit(self, batch: list):
        """batch: [(id, Problem)]. Yields a 'started' event, then one 'done'/'error' event per image."""
        import queue
        info = self.info()
        yield {"kind": "started", "ids": [k for k, _ in batch], "time": now_iso(), "worker": info}
        results: queue.Queue = queue.Queue()
        with self._lock:
            self._start_engine()
            for k, p in batch:
                self._owners[id(p)] = (results, k)
            self._inbox.put([p for _, p in batch])
        for _ in range(len(batch)):
            key, res = results.get()
            if key is None:
                raise RuntimeError(f"the fitting engine stopped: {_one_line(res)}") from res
            if isinstance(res, Exception):
                yield {"kind": "error", "id": key, "error": _one_line(res), "time": now_iso()}
                continue
            try:
                yield {"kind": "done", "id": key, "time": now_iso(), **self._encode(key, res)}
            except Exception as e:  # noqa: BLE001
                yield {"kind": "error", "id": key, "error": f"encoding the result: {_one_line(e)}", "time": now_iso()}

    def _encode(self, key: str, res) -> dict:
        """The result's files as bytes, for the driver to write (nothing is written here)."""
        from pipeline.io import encode_png
        ev = {"png": encode_png(res.image), "record": res.record(), "onnx": None, "onnx_error": None}
        if self.keep_weights:
            try:
                from pipeline import export, tiling
                if isinstance(res, tiling.TiledResult):  # one model per tile + <stem>.tiles.json
                    ev["onnx_files"] = tiling.tiled_files(res, Path(key).name, self.onnx_dtype)
                else:
                    ev["onnx"] = export.to_onnx_model(res, dtype=self.onnx_dtype).SerializeToString()
            except ImportError:
                pass
            except Exception as e:  # noqa: BLE001
                ev["onnx_error"] = _one_line(e)
        return ev


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) < 600 else s[:597] + "..."


# ---- the driver --------------------------------------------------------------------------------------
@dataclass
class Job:
    item: WorkItem
    hash: str = ""
    problem: object = None
    failures: list = field(default_factory=list)  # errors of calls that had started fitting it
    lost: int = 0  # calls that failed before they started (the actor was restarting): not charged


@dataclass
class Call:
    gen: object
    ids: list
    actor: "ActorSlot"
    started: bool = False


@dataclass
class ActorSlot:
    handle: object
    spec: dict
    calls: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    healthy: bool = True
    ping: object = None  # an info() call in flight while the actor is checked after a failure
    ping_after: float = 0.0
    down_since: float = 0.0


class _Interrupted(Exception):
    pass


class _OutOfSpace(Exception):
    """OUT cannot take more files (full, over quota, read-only): the job cannot go on."""


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _init_ray(args) -> tuple[bool, str]:
    """Connect to / start Ray. Returns (we_started_it, address description)."""
    import ray
    if ray.is_initialized():
        return False, "existing"
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    kw = {"log_to_driver": True, "configure_logging": False}
    if address == "local":
        host = getattr(args, "dashboard_host", None)
        kw.update(include_dashboard=bool(host))
        if host:
            kw["dashboard_host"] = host
    ray.init(address=address, **kw)
    return True, address


def _plan_actors(args) -> tuple[str, list[dict]]:
    """(device type, [actor resource specs]): one actor per GPU, else CPU actors sharing each node's cores."""
    import ray
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = sum(int(n["Resources"].get("GPU", 0)) for n in nodes)
    want_cuda = args.device not in ("cpu",) and (gpus > 0 or args.device.startswith("cuda"))
    if want_cuda:
        n = args.actors or gpus
        if n < 1:
            raise UsageError("--device cuda was asked for, but the Ray cluster has no GPU (pass --actors N to "
                             "wait for an autoscaler to add GPU nodes)")
        return "cuda", [{"num_gpus": 1, "num_cpus": 1, "node": None} for _ in range(n)]
    cpu_nodes = [(n["NodeID"], int(n["Resources"].get("CPU", 0))) for n in nodes if n["Resources"].get("CPU", 0) >= 1]
    if not cpu_nodes:
        raise UsageError("the Ray cluster has no CPU to run on")
    if args.actors:
        per_node = {nid: 0 for nid, _ in cpu_nodes}
        order = [nid for nid, _ in cpu_nodes]
        for i in range(args.actors):
            per_node[order[i % len(order)]] += 1
    else:  # one actor per 8 cores of a node (torch's intra-op threads scale well up to about there)
        per_node = {nid: max(1, c // 8) for nid, c in cpu_nodes}
    specs = []
    for nid, c in cpu_nodes:
        k = per_node[nid]
        for _ in range(k):
            specs.append({"num_gpus": 0, "num_cpus": max(1, c // k), "node": nid})
    return "cpu", specs


def _start_actor(spec: dict, device: str, args):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    opts = {"num_cpus": spec["num_cpus"], "num_gpus": spec["num_gpus"], "max_restarts": 4,
            "max_task_retries": 0, "max_concurrency": MAX_CALLS_PER_ACTOR + 1}  # its fit calls, and info() pings
    if spec.get("node"):
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(spec["node"], soft=True)
    cls = ray.remote(FitWorker)
    return cls.options(**opts).remote(device, args.slots, False if args.reference_kernels else None,
                                      bool(args.export_onnx), args.onnx_dtype,
                                      threads=spec["num_cpus"] if device == "cpu" else None,
                                      tile=getattr(args, "tile", None), tile_overlap=getattr(args, "tile_overlap", None),
                                      max_memory=_max_memory_bytes(args))


def main(args) -> int:
    out = Path(args.out)
    try:  # the command line's own options must make a valid config (manifest rows are checked per row)
        config_for(args, "cuda")
        tile, overlap = getattr(args, "tile", None), getattr(args, "tile_overlap", None)
        if tile is not None and tile < 8:
            raise ValueError(f"--tile {tile}: tiles need at least 8 pixels a side")
        if overlap is not None and (tile is None or not 0 <= overlap < tile / 2):
            raise ValueError(f"--tile-overlap {overlap}: needs --tile, and 0 <= overlap < tile/2")
        if getattr(args, "max_memory", None) is not None and args.max_memory <= 0:
            raise ValueError("--max-memory must be positive (GiB)")
    except ValueError as e:
        print(f"dip: error: {e}", file=sys.stderr)
        return 2
    if out.exists() and not out.is_dir():
        print(f"dip: error: --out {out} is not a directory", file=sys.stderr)
        return 2
    try:
        items = discover(args.inputs, out, args.glob, args.task)
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
        print(f"dip: error: cannot write to --out {out}: {_one_line(e)}", file=sys.stderr)
        return 2
    if lock is None:
        print(f"dip: error: another dip restore is writing to {out} ({out / LOCK_NAME} is locked)", file=sys.stderr)
        return 2
    try:
        return _Driver(args, out, items).run()
    finally:
        _unlock(out, lock)


def _lock(out: Path):
    """OUT/.dip-job.lock, locked (flock) by this process; None if another job holds it. The file is
    removed when the job ends (:func:`_unlock`), so a lock is taken only on a file still at that path."""
    import fcntl
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
    with contextlib.suppress(OSError):
        os.unlink(out / LOCK_NAME)
    lock.close()


class _Driver:
    def __init__(self, args, out: Path, items: list[WorkItem]):
        self.args = args
        self.out = out.resolve()
        self.items = items
        self.max_retries = max(0, int(getattr(args, "max_retries", 3) if getattr(args, "max_retries", None)
                                      is not None else 3))
        self.manifest = JobManifest(out)
        self.jobs: dict[str, Job] = {}
        self.feed = collections.deque(items)
        self.retry: collections.deque[Job] = collections.deque()
        self.actors: list[ActorSlot] = []
        self.counts = collections.Counter()
        self.fitted = 0
        self.occupancy = [0.0, 0.0]  # the fitted images' batch occupancy, weighted by their steps: sum, weight
        self.t0 = time.time()
        self.bar = None
        self.device = "cpu"
        self.replacements = 0
        self.t_ready = time.time()

    # -- bookkeeping --
    def _set(self, key: str, **fields):
        return self.manifest.update(key, **fields)

    def _final(self, key: str, status: str, msg: str | None = None):
        self.counts[status] += 1
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()
            if msg:
                self.bar.write(msg)
        elif msg:
            print(msg, file=sys.stderr)

    def _postfix(self):
        el = max(time.time() - self.t0, 1e-6)
        rate = self.fitted / el * 3600
        remaining = len(self.items) - sum(self.counts.values())
        eta = remaining / (rate / 3600) if rate > 0 else float("nan")
        self.bar.set_postfix_str(f"done={self.counts['done']} failed={self.counts['failed'] + self.counts['skipped']} "
                                 f"remaining={remaining} {rate:.0f} img/h ETA {_fmt_s(eta)}", refresh=False)

    def _fail(self, key: str, err: str, status: str = "failed"):
        self._set(key, status=status, error=err, finished=now_iso())
        self._final(key, status, f"dip: {err}" if status == "failed" else f"dip: skipped: {err}")

    # -- preparing work --
    def _prepare(self, it: WorkItem) -> Job | None:
        """Hash, skip-check and decode one item; None when it needs no fitting (done, failed or skipped)."""
        from pipeline.api import make_problem
        from pipeline.io import file_sha256
        if it.error:
            self._set(it.id, input=it.input, status="failed")
            self._fail(it.id, it.error)
            return None
        # --mask / --reference on the command line apply to every input that its manifest row (or a
        # <stem>_mask file beside it) does not give one for
        if it.mask is None and getattr(self.args, "mask", None):
            it.mask = str(Path(self.args.mask).resolve())
        if it.reference is None and getattr(self.args, "reference", None):
            it.reference = str(Path(self.args.reference).resolve())
        prev = dict(self.manifest.get(it.id) or {})
        rec = self._set(it.id, input=it.input, mask=it.mask, reference=it.reference,
                        options={k: it.options.get(k, getattr(self.args, k, None)) for k in
                                 ("task", "preset", "steps", "seed", "scale")})
        try:
            cfg = config_for(self.args, self.device, it.options)
            shas = {"input_sha256": file_sha256(it.input) if Path(it.input).is_file() else None,
                    "mask_sha256": file_sha256(it.mask) if it.mask and Path(it.mask).is_file() else None,
                    "reference_sha256": file_sha256(it.reference) if it.reference and Path(it.reference).is_file()
                    else None}
            conf = cfg.identity_dict()
            tiling_opts = {k: v for k, v in (("tile", getattr(self.args, "tile", None)),
                                             ("tile_overlap", getattr(self.args, "tile_overlap", None)),
                                             ("max_memory", getattr(self.args, "max_memory", None))) if v}
            h = sha256_text(canonical_json({**shas, "config": conf, **({"tiling": tiling_opts} if tiling_opts else {})}))
            rec.update(input_sha256=shas["input_sha256"], options_sha256=sha256_text(canonical_json(conf)), hash=h,
                       options={**rec["options"], "task": cfg.task, "preset": cfg.preset, "steps": cfg.steps,
                                "seed": cfg.seed})
            dest = self.out / it.id
            js, png = dest.with_name(dest.name + ".json"), dest.with_name(dest.name + ".png")
            if js.exists() and png.exists() and not self.args.overwrite:
                old = read_json(js)
                old_job = old.get("job") if isinstance(old, dict) and isinstance(old.get("job"), dict) else {}
                if old_job.get("hash") != h:
                    rec["existing"] = {k: old_job.get(k) for k in ("hash", "options_sha256", "input_sha256",
                                                                   "finished")}
                    self._fail(it.id, f"{png}: exists with different options (input or config changed since it "
                                      f"was made); pass --overwrite to replace it, or use another --out",
                               status="skipped")
                    return None
                has_onnx = dest.with_name(dest.name + ".onnx").exists()
                # done with the same hash, but without the ONNX this run asks for (an earlier run had
                # --no-export-onnx, or the file was removed): fit it again, since the weights are not kept
                if (getattr(self.args, "export_onnx", False) and not old_job.get("onnx_error")
                        and not (has_onnx or dest.with_name(dest.name + ".tiles.json").exists())):
                    log.info("%s: done before without its .onnx; fitting it again to export one", png)
                else:
                    keep = {k: old_job.get(k) for k in ("started", "finished", "seconds", "attempts", "worker")}
                    if prev.get("status") == "done" and prev.get("hash") == h:
                        keep = {k: prev.get(k) for k in keep}
                    self.manifest.put(it.id, {**prev, **rec, **keep, "status": "done", "error": None,
                                              "outputs": _outputs(it.id, has_onnx),
                                              "run": prev.get("run", old_job.get("run", self.manifest.run_no))})
                    self._final(it.id, "done")
                    return None
            p = make_problem(it.input, task=cfg.task, mask=it.mask, reference=it.reference, seed=cfg.seed, cfg=cfg)
        except Exception as e:  # noqa: BLE001  (ImageError, ValueError, OSError, ...: one line, and go on)
            msg = _one_line(e)
            self._fail(it.id, msg if it.input in msg else f"{it.input}: {msg}")
            return None
        attempts = prev.get("attempts", 0) if prev.get("hash") == h else 0
        self._set(it.id, status="pending", error=None, failures=0, requeued=0, attempts=attempts,
                  started=None, finished=None)
        return Job(item=it, hash=h, problem=p)

    def _take(self, n: int) -> list[Job]:
        batch = []
        while len(batch) < n and self.retry:
            batch.append(self.retry.popleft())
        while len(batch) < n and self.feed:
            job = self._prepare(self.feed.popleft())
            if job is not None:
                self.jobs[job.item.id] = job
                batch.append(job)
        return batch

    # -- actors --
    def _start_actors(self) -> None:
        import ray
        self.device, specs = _plan_actors(self.args)
        slots = [ActorSlot(_start_actor(s, self.device, self.args), s) for s in specs]
        refs = {s.handle.info.remote(): s for s in slots}
        timeout = float(os.environ.get("DIP_ACTOR_TIMEOUT", 600))
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for r in ready:
            try:
                refs[r].info = ray.get(r)
                self.actors.append(refs[r])
            except Exception as e:  # noqa: BLE001
                log.warning("a worker failed to start: %s", _one_line(e))
        for s in slots:
            if s not in self.actors:
                with contextlib.suppress(Exception):
                    ray.kill(s.handle)
        if not self.actors:
            raise UsageError(f"no worker actor could start within {timeout:.0f} s "
                             f"(resources: {ray.cluster_resources()})")
        log.info("%d %s worker(s): %s", len(self.actors), self.device,
                 ", ".join(f"pid {a.info['pid']} on {a.info['host']}" for a in self.actors))

    def _call_size(self) -> int:
        return self.args.slots or (4 if self.device == "cpu" else 32)

    def _has_room(self, a: ActorSlot) -> bool:
        return a.healthy and room_for_a_call([len(c.ids) for c in a.calls], self._call_size())

    def _submit(self, a: ActorSlot) -> bool:
        n = self._call_size()
        left = len(self.feed) + len(self.retry)  # an upper bound: some of the feed may need no fitting
        n = max(1, min(n, -(-left // max(1, len(self.actors)))))  # share a short queue among the actors
        batch = self._take(n)
        if not batch:
            return False
        gen = a.handle.fit.options(num_returns="streaming").remote([(j.item.id, j.problem) for j in batch])
        a.calls.append(Call(gen=gen, ids=[j.item.id for j in batch], actor=a))
        return True

    def _replace(self, a: ActorSlot) -> None:
        import ray
        if self.replacements >= 2 * len(self.actors) + 4:
            return
        self.replacements += 1
        with contextlib.suppress(Exception):
            ray.kill(a.handle, no_restart=True)
        log.warning("worker pid %s is gone for good; starting a new one", a.info.get("pid"))
        a.handle = _start_actor(a.spec, self.device, self.args)

    def _unhealthy(self, a: ActorSlot, delay: float = 1.0) -> None:
        if a.healthy:
            a.down_since = time.time()
        a.healthy = False
        a.ping = None
        a.ping_after = time.time() + delay

    def _check_actors(self) -> None:
        """Ping the actors that failed; give up on the images when no actor has worked for too long."""
        now = time.time()
        for a in self.actors:
            if not a.healthy and a.ping is None and now >= a.ping_after:
                a.ping = a.handle.info.remote()
        if self.actors and all(not a.healthy for a in self.actors):
            down = min(a.down_since for a in self.actors)
            limit = float(os.environ.get("DIP_ACTOR_TIMEOUT", 600))
            if now - down > limit:
                for job in list(self.retry):
                    self.retry.remove(job)
                    self.jobs.pop(job.item.id, None)
                    self._fail(job.item.id, f"{job.item.input}: no worker has been available for {limit:.0f} s")
                while self.feed:
                    it = self.feed.popleft()
                    self._set(it.id, input=it.input)
                    self._fail(it.id, f"{it.input}: no worker has been available for {limit:.0f} s")

    def _on_ping(self, a: ActorSlot) -> None:
        import ray
        ref, a.ping = a.ping, None
        try:
            a.info = ray.get(ref)
            a.healthy = True
            log.info("worker pid %s on %s is up", a.info.get("pid"), a.info.get("host"))
        except ray.exceptions.ActorDiedError:
            self._replace(a)
            self._unhealthy(a, 2.0)
        except ray.exceptions.RayError:
            self._unhealthy(a, 1.0)

    # -- events --
    def _on_event(self, call: Call, ev: dict) -> None:
        kind = ev.get("kind")
        if kind == "started":
            call.started = True
            call.actor.info = ev["worker"]
            w = {k: ev["worker"].get(k) for k in ("node", "host", "pid", "device")}
            for key in ev["ids"]:
                rec = self.manifest.get(key) or {}
                self._set(key, status="running", started=ev["time"], attempts=int(rec.get("attempts") or 0) + 1,
                          worker=w)
            return
        key = ev["id"]
        if key in call.ids:
            call.ids.remove(key)
        job = self.jobs.get(key)
        if job is None:
            return
        if kind == "done":
            self._write(job, ev)
        else:
            self._retry_or_fail(job, ev.get("error", "unknown error"))

    def _write(self, job: Job, ev: dict) -> None:
        from pipeline.io import write_bytes, write_json
        key = job.item.id
        dest = self.out / key
        rec = self.manifest.get(key) or {}
        finished = ev["time"]
        try:
            started = rec.get("started")
            write_bytes(dest.with_name(dest.name + ".png"), ev["png"])
            has_onnx = ev.get("onnx") is not None
            if has_onnx:
                write_bytes(dest.with_name(dest.name + ".onnx"), ev["onnx"])
            for name, data in (ev.get("onnx_files") or {}).items():  # a tiled image: its layout file last
                write_bytes(dest.with_name(name), data)
            record = dict(ev["record"])
            seconds = record.get("seconds")
            record["job"] = {"id": key, "hash": job.hash, "options_sha256": rec.get("options_sha256"),
                             "input_sha256": rec.get("input_sha256"), "started": started, "finished": finished,
                             "seconds": seconds, "attempts": rec.get("attempts"), "worker": rec.get("worker"),
                             "run": self.manifest.run_no}
            if ev.get("onnx_error"):
                record["job"]["onnx_error"] = ev["onnx_error"]
            write_json(dest.with_name(dest.name + ".json"), record)  # last: the "done" marker
        except OSError as e:
            err = f"{dest}: cannot write the outputs: {_one_line(e)}"
            if e.errno in _NO_SPACE:  # not this image's fault: it goes back to pending and the job stops
                self._set(key, status="pending", error=err)
                self.jobs.pop(key, None)
                raise _OutOfSpace(err) from None
            self._set(key, status="failed", error=err, finished=finished)
            self._final(key, "failed", f"dip: {err}")
            self.jobs.pop(key, None)
            return
        self._set(key, status="done", error=None, finished=finished, seconds=seconds,
                  outputs=_outputs(key, has_onnx), onnx_error=ev.get("onnx_error"))
        self.fitted += 1
        b = ev["record"].get("batch")
        if isinstance(b, dict) and isinstance(b.get("occupancy"), (int, float)):
            w = float(ev["record"].get("steps") or 1)
            self.occupancy[0] += b["occupancy"] * w
            self.occupancy[1] += w
        self.jobs.pop(key, None)
        msg = None
        if not self.args.quiet:
            msg = f"{job.item.input} -> {dest}.png ({ev['record'].get('steps')} steps, {seconds} s"
            m = ev["record"].get("metrics") or {}
            if m:
                msg += f", PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}"
            msg += ")"
        self._final(key, "done", msg)

    def _retry_or_fail(self, job: Job, err: str) -> None:
        job.failures.append(err)
        key = job.item.id
        if len(job.failures) > self.max_retries:
            self.jobs.pop(key, None)
            e = err if job.item.input in err else f"{job.item.input}: {err}"
            self._set(key, failures=len(job.failures))
            self._fail(key, f"{e} (gave up after {len(job.failures)} tries)")
        else:
            log.warning("%s: %s; retrying (%d/%d)", job.item.input, err, len(job.failures), self.max_retries)
            rec = self._set(key, status="pending", error=err, failures=len(job.failures))
            rec["requeued"] = int(rec.get("requeued") or 0) + 1
            self.retry.append(job)

    def _on_call_error(self, call: Call, exc: BaseException) -> None:
        import ray
        err = f"worker failed: {type(exc).__name__}: {_one_line(exc)}"[:400]
        for key in list(call.ids):
            job = self.jobs.get(key)
            if job is None:
                continue
            if call.started or job.lost >= 10:
                self._retry_or_fail(job, err)
            else:  # never reached the actor: back to the queue, not charged
                job.lost += 1
                rec = self._set(key, status="pending")
                rec["requeued"] = int(rec.get("requeued") or 0) + 1
                self.retry.append(job)
        call.ids.clear()
        if isinstance(exc, ray.exceptions.ActorDiedError):
            self._replace(call.actor)
        if isinstance(exc, ray.exceptions.RayActorError):
            self._unhealthy(call.actor)

    # -- the loop --
    def run(self) -> int:
        import ray
        from tqdm import tqdm
        try:
            started_ray, address = _init_ray(self.args)
        except Exception as e:  # noqa: BLE001
            print(f"dip: error: cannot start or join Ray: {_one_line(e)}", file=sys.stderr)
            return 2
        old_term, old_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        in_main = _is_main_thread()
        if in_main:
            # SIGINT too, explicitly: a process started in the background of a script inherits SIGINT
            # ignored, and Python then never raises KeyboardInterrupt, so `kill -INT` did nothing
            signal.signal(signal.SIGTERM, _raise_interrupt)
            signal.signal(signal.SIGINT, _raise_interrupt)
        run = None
        status = "finished"
        try:
            try:
                self._start_actors()
            except UsageError as e:
                print(f"dip: error: {e}", file=sys.stderr)
                return 2
            self.t_ready = time.time()
            run = self.manifest.start_run(argv=sys.argv, ray_address=address, device=self.device,
                                          actors=len(self.actors), host=socket.gethostname())
            self.bar = tqdm(total=len(self.items), unit="img", disable=self.args.quiet, file=sys.stderr,
                            mininterval=1.0, dynamic_ncols=True)
            self._loop()
        except (KeyboardInterrupt, _Interrupted):
            status = "interrupted"
            print("dip: interrupted; finished images are kept, the rest is redone by the same command",
                  file=sys.stderr)
        except _OutOfSpace as e:
            status = "out of space"
            print(f"dip: error: {e}\ndip: stopped: the output folder cannot take more files. Finished images are "
                  f"kept; free space and run the same command again to do the rest.", file=sys.stderr)
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, old_term)
                signal.signal(signal.SIGINT, old_int)
            if self.bar is not None:
                self.bar.close()
            for job in list(self.jobs.values()):
                self._set(job.item.id, status="pending", error=None if status == "finished" else status)
            counts = {k: self.counts[k] for k in ("done", "failed", "skipped")}
            counts.update(fitted=self.fitted, pending=len(self.items) - sum(self.counts.values()))
            if run is not None:
                run.update(finished=now_iso(), status=status, counts=counts,
                           batch_occupancy=self.batch_occupancy(),
                           seconds=round(time.time() - self.t0, 3),
                           seconds_after_startup=round(time.time() - self.t_ready, 3))
            try:
                self.manifest.flush(force=True)
            except OSError as e:
                print(f"dip: warning: the manifest could not be updated ({_one_line(e)}); each image's JSON "
                      f"still marks it done, so the same command will not redo finished images", file=sys.stderr)
            for a in self.actors:
                with contextlib.suppress(Exception):
                    ray.kill(a.handle, no_restart=True)
            if started_ray:
                with contextlib.suppress(Exception):
                    ray.shutdown()
        try:  # OUT/report.html (pipeline.report); a report failure never fails the job
            from pipeline import report
            report.build(self.out)
        except Exception as e:  # noqa: BLE001
            log.warning("could not write the report %s: %s", self.out / "report.html", _one_line(e))
        if status == "interrupted":
            return 130
        if status == "out of space":
            self._summary()
            return 1
        return self._summary()

    def _loop(self) -> None:
        import ray
        while True:
            self._check_actors()
            for _round in range(MAX_CALLS_PER_ACTOR):  # round-robin: each actor gets a call before any gets two
                for a in self.actors:
                    if self._has_room(a):
                        self._submit(a)
            calls = [c for a in self.actors for c in a.calls]
            pings = [a for a in self.actors if a.ping is not None]
            if not calls and not self.feed and not self.retry:
                break
            if not calls and not pings:
                time.sleep(0.2)
                continue
            ready, _ = ray.wait([c.gen for c in calls] + [a.ping for a in pings], num_returns=1, timeout=1.0)
            for g in ready:
                a = next((a for a in pings if _same(a.ping, g)), None)
                if a is not None:
                    self._on_ping(a)
                    continue
                call = next(c for c in calls if _same(c.gen, g))
                try:
                    ref = next(call.gen)
                    self._on_event(call, ray.get(ref))
                except StopIteration:
                    for key in list(call.ids):  # should not happen: every image reports
                        job = self.jobs.get(key)
                        if job is not None:
                            self._retry_or_fail(job, "the worker returned no result")
                    call.actor.calls.remove(call)
                except ray.exceptions.RayError as e:
                    self._on_call_error(call, e)
                    call.actor.calls.remove(call)
            if self.bar is not None:
                self._postfix()
                self.bar.refresh()
            try:
                self.manifest.flush()
            except OSError as e:
                if e.errno in _NO_SPACE:
                    raise _OutOfSpace(f"{self.manifest.path}: cannot write the manifest: {_one_line(e)}") from None
                raise

    def batch_occupancy(self) -> float | None:
        """The mean share of the batch's slots that were fitting while this run's images were fitted."""
        return round(self.occupancy[0] / self.occupancy[1], 3) if self.occupancy[1] else None

    def _summary(self) -> int:
        bad = [(k, r) for k, r in self.manifest.images.items()
               if r.get("run") == self.manifest.run_no and r.get("status") in ("failed", "skipped")]
        el = time.time() - self.t0
        occ = self.batch_occupancy()
        log.info("%d done (%d fitted now), %d failed, %d skipped in %.1f s%s; manifest: %s", self.counts["done"],
                 self.fitted, self.counts["failed"], self.counts["skipped"], el,
                 f", batch occupancy {occ:.0%}" if occ is not None else "", self.manifest.path)
        if bad:
            print(f"dip: {len(bad)} image(s) not done:", file=sys.stderr)
            for _k, r in bad:
                print(f"  {r.get('status')}: {r.get('error')}", file=sys.stderr)
            return 1
        return 0


def _same(x, g) -> bool:
    return x is g or (type(x) is type(g) and x == g)


def _max_memory_bytes(args) -> int | None:
    gb = getattr(args, "max_memory", None)
    return int(gb * 2 ** 30) if gb else None


def _outputs(key: str, onnx: bool) -> dict:
    return {"png": key + ".png", "json": key + ".json", "onnx": key + ".onnx" if onnx else None}


def _fmt_s(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame):
    raise _Interrupted()


# ---- benchmark -----------------------------------------------------------------------------------------
def bench_main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.job --bench N``: images/hour through the Ray actors vs fit_problems directly.

    Makes N synthetic noisy images (``--size``, default 64 on CPU / 256 on CUDA), fits them with
    ``fit_problems`` in this process, then with ``dip restore`` on an embedded Ray instance (one actor per
    GPU, or CPU actors), and prints both rates as JSON (``--json PATH`` writes it too).
    """
    import argparse
    import shutil
    import numpy as np
    ap = argparse.ArgumentParser(prog="python -m pipeline.job")
    ap.add_argument("--bench", type=int, required=True, metavar="N")
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--preset")
    ap.add_argument("--slots", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    from pipeline.api import make_problem, fit_problems
    from pipeline.engine import pick_device
    from pipeline.io import ImageData, save_image
    from pipeline.cli import build_parser
    dev = pick_device(a.device)
    size = a.size or (256 if dev.type == "cuda" else 64)
    steps = a.steps or (300 if dev.type == "cuda" else 20)
    root = Path(tempfile.mkdtemp(prefix="dip-bench-"))
    try:
        rng = np.random.default_rng(0)
        for i in range(a.bench):
            px = np.clip(rng.random((size, size, 3)) * 0.3 + 0.35 + rng.normal(0, 0.1, (size, size, 3)), 0, 1)
            save_image(root / "in" / f"img{i:04d}.png", ImageData(px.astype(np.float32), None, 8))
        common = ["--steps", str(steps), "--device", a.device] + (["--preset", a.preset] if a.preset else []) + \
                 (["--slots", str(a.slots)] if a.slots else [])
        args = build_parser().parse_args(["restore", str(root / "in"), "--out", str(root / "direct"), "--quiet",
                                          "--no-export-onnx"] + common)
        cfg = config_for(args, dev.type)
        probs = [make_problem(str(f), cfg=cfg, seed=0) for f in sorted((root / "in").glob("*.png"))]
        for _ in fit_problems([make_problem(str(root / "in" / "img0000.png"), cfg=cfg.replace(steps=2))], device=dev):
            pass  # warm-up (threads, cuDNN autotuning), as the actors' first batch also pays it
        t = time.perf_counter()
        n = sum(1 for _p, r in fit_problems(probs, device=dev, slots=a.slots) if not isinstance(r, Exception))
        direct = time.perf_counter() - t
        args = build_parser().parse_args(["restore", str(root / "in"), "--out", str(root / "ray"), "--quiet",
                                          "--no-export-onnx"] + common)
        from pipeline import job as _job  # not __main__'s copy: the actor class must be importable by name
        t = time.perf_counter()
        rc = _job.main(args)
        via_ray = time.perf_counter() - t
        runs = json.loads((root / "ray" / MANIFEST_NAME).read_text())["runs"]
        after = runs[-1].get("seconds_after_startup") or via_ray
        res = {"images": a.bench, "size": size, "steps": steps, "preset": cfg.preset, "device": str(dev),
               "direct_s": round(direct, 2), "direct_img_per_h": round(n / direct * 3600, 1),
               "ray_s_incl_startup": round(via_ray, 2), "ray_s_after_startup": round(after, 2),
               "ray_img_per_h": round(a.bench / after * 3600, 1),
               "ray_img_per_h_incl_startup": round(a.bench / via_ray * 3600, 1),
               "ray_rc": rc, "ratio_after_startup": round(direct / after, 3),
               "ray_batch_occupancy": runs[-1].get("batch_occupancy")}
        print(json.dumps(res, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return 0 if rc == 0 else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(bench_main())
