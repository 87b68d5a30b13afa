"""The Ray actor of `dip restore`: one long-lived fitting process per GPU (or per share of a node's cores).

The actor protocol is a Ray streaming generator. ``FitWorker.fit(batch)`` is called with
``num_returns="streaming"``; it first yields a ``started`` event (ids, pid, node), then a ``fitting`` event
per image when its fit takes a slot of the engine, a ``tile`` event per finished tile of an image fitted
as tiles (its result as bytes, for the driver to keep under OUT/.tiles/ until the image is done, so that
a stopped job goes on from its last tile), one ``done`` or ``error`` event per image *as each image
finishes* (the engine yields results in finishing order), and, while it waits, a ``progress`` event every
``DIP_PROGRESS_EVERY`` seconds (default 5) with the fit-steps the actor's engine has done. The
actor runs its calls at once (``max_concurrency``: up to three calls and the driver's pings) and they all
feed the one engine thread of the actor, through its :class:`Inbox`: a new call's images take the slots
the earlier calls' images free, so the batch stays full from one call to the next. Each call waits for
its own images' results, encodes them (PNG, JSON record, ONNX bytes: never arrays, never paths on its own
node) while the engine goes on, and streams them back.
"""
from __future__ import annotations

import collections
import logging
import os
import socket
from pathlib import Path

from pipeline.batching import Feed
from pipeline.job.manifest import now_iso, one_line

log = logging.getLogger("dip.job")

_FITTING = object()  # in a call's result queue: "this image's fit has started"


class _Tile(collections.namedtuple("_Tile", "index blob")):
    """In a call's result queue: a tile of this image ended (pipeline.tiling.encode_tile's bytes)."""


def progress_every() -> float:
    """Seconds between a waiting call's progress events (DIP_PROGRESS_EVERY, default 5)."""
    return max(0.1, float(os.environ.get("DIP_PROGRESS_EVERY", 5)))


def cpu_threads(given: int | None) -> int | None:
    """torch's intra-op threads for a CPU actor: the CPUs Ray gave it, never more than the CPUs this process
    may run on (its affinity: ``taskset``, a cgroup's cpuset), and never the machine's total."""
    if not given:
        return None
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    return max(1, min(int(given), allowed))


class Inbox(Feed):
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
        self.threads = cpu_threads(threads)
        if self.threads:
            torch.set_num_threads(self.threads)
        self.tile, self.tile_overlap, self.max_memory = tile, tile_overlap, max_memory
        self.device = device
        self.slots = slots
        self.use_kernels = use_kernels
        self.keep_weights = keep_weights
        self.onnx_dtype = onnx_dtype
        self._lock = threading.Lock()
        self._engine = None  # the engine thread
        self._inbox: Inbox | None = None
        self._owners: dict[int, tuple] = {}  # id(problem) -> (the call's result queue, image id, the problem)
        self._steps = 0  # fit-steps done by this actor's engine (one per loaded slot and step)

    def info(self) -> dict:
        import ray
        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node": ctx.get_node_id(), "host": socket.gethostname(), "device": self.device,
                "gpus": [str(g) for g in ray.get_gpu_ids()], "threads": self.threads, "nice": os.nice(0)}

    def _start_engine(self) -> None:
        """(Under the lock.) A new inbox and engine thread, unless one is running."""
        import threading
        if self._engine is not None and self._engine.is_alive():
            return
        self._inbox = Inbox()
        self._engine = threading.Thread(target=self._run_engine, args=(self._inbox,), name="dip-engine",
                                        daemon=True)
        self._engine.start()

    def _run_engine(self, inbox: Inbox) -> None:
        from pipeline.engine import pick_device
        from pipeline.fit import fit_tiled
        try:
            dev = pick_device(self.device)
            # the batched engine; images too large for one fit (or above --tile / --max-memory) go as tiles
            for p, res in fit_tiled(inbox, device=dev, slots=self.slots, tile=self.tile,
                                    overlap=self.tile_overlap, max_memory=self.max_memory,
                                    keep_weights=self.keep_weights, use_kernels=self.use_kernels,
                                    on_step=self._on_step, on_start=self._on_start, on_tile=self._on_tile):
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
            for q, _key, _p in owners.values():
                q.put((None, e))

    def _on_step(self, n_live: int) -> None:  # the engine thread, after every step
        self._steps += n_live

    def _on_start(self, p) -> None:  # the engine thread: an image's fit took a slot
        with self._lock:
            owner = self._owners.get(id(p))
        if owner is not None:
            owner[0].put((owner[1], _FITTING))

    def _on_tile(self, p, index: int, blob: bytes) -> None:  # the engine thread: a tile of a cut image ended
        with self._lock:
            owner = self._owners.get(id(p))
        if owner is not None:
            owner[0].put((owner[1], _Tile(index, blob)))

    def fit(self, batch: list):
        """batch: [(id, Problem)]. Yields a 'started' event, then per image a 'fitting' and a 'done' or
        'error' event, and 'progress' events while it waits (see the module docstring)."""
        import queue
        info = self.info()
        yield {"kind": "started", "ids": [k for k, _ in batch], "time": now_iso(), "worker": info}
        results: queue.Queue = queue.Queue()
        with self._lock:
            self._start_engine()
            for k, p in batch:
                self._owners[id(p)] = (results, k, p)  # the problem is held, so its id is not reused
            self._inbox.put([p for _, p in batch])
        left = len(batch)
        while left:
            try:
                key, res = results.get(timeout=progress_every())
            except queue.Empty:
                yield {"kind": "progress", "steps": self._steps, "time": now_iso()}
                continue
            if res is _FITTING:
                yield {"kind": "fitting", "id": key, "time": now_iso()}
                continue
            if isinstance(res, _Tile):  # for the driver to keep until the image is done (resume)
                yield {"kind": "tile", "id": key, "index": res.index, "blob": res.blob}
                continue
            left -= 1
            if key is None:
                raise RuntimeError(f"the fitting engine stopped: {one_line(res)}") from res
            if isinstance(res, Exception):
                yield {"kind": "error", "id": key, "error": one_line(res), "time": now_iso()}
                continue
            try:
                yield {"kind": "done", "id": key, "time": now_iso(), **self._encode(key, res)}
            except Exception as e:  # noqa: BLE001
                yield {"kind": "error", "id": key, "error": f"encoding the result: {one_line(e)}", "time": now_iso()}

    def _encode(self, key: str, res) -> dict:
        """The result's files as bytes, for the driver to write (nothing is written here)."""
        from pipeline.io import encode_png
        ev = {"png": encode_png(res.image), "record": res.record(), "onnx": None, "onnx_error": None}
        if self.keep_weights:
            try:
                from pipeline.onnx import export
                from pipeline.tiling import TiledResult
                if isinstance(res, TiledResult):  # one model per tile + <stem>.tiles.json
                    ev["onnx_files"] = export.tiled_files(res, Path(key).name, self.onnx_dtype)
                else:
                    ev["onnx"] = export.to_onnx_model(res, dtype=self.onnx_dtype).SerializeToString()
            except ImportError:
                pass
            except Exception as e:  # noqa: BLE001
                ev["onnx_error"] = one_line(e)
        return ev
