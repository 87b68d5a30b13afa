"""The job's workers: Ray, the actors it runs (pipeline.job.actors.FitWorker), their calls and their health.

Ray is always the engine. Without ``--address`` (and without ``RAY_ADDRESS``) the job starts an embedded
local Ray instance with this machine's resources (no dashboard unless ``--dashboard-host`` is given;
Ray's token authentication stays on, as Ray 2.60 sets it by default). With ``--address auto|host:port|
ray://...`` or ``RAY_ADDRESS`` (set by ``ray job submit``) it joins that cluster. One long-lived actor per
GPU (``num_gpus=1``), or on a cluster with no GPU, CPU actors that each take a share of a node's cores
(``--actors`` overrides the count).

Backpressure, by images: the driver keeps up to ``CALLS_PER_ACTOR`` calls' worth of images in flight per
actor (:func:`room_for_a_call`); a new call goes out as soon as the actor's unfinished images are down to
one call's worth, not when a call has ended (a call ends only with its slowest image). If an actor (or
its node) dies, its calls raise; Ray restarts it (``max_restarts``), and an actor Ray gave up on is
replaced; the driver pings an actor that failed until it answers.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

from pipeline.job.actors import FitWorker
from pipeline.job.manifest import UsageError, one_line
from pipeline.job.options import JobOptions

log = logging.getLogger("dip.job")

CALLS_PER_ACTOR = 2  # images in flight per actor: up to this many calls' worth
MAX_CALLS_PER_ACTOR = 3  # open calls per actor (each holds one of the actor's threads while it waits)


def room_for_a_call(unfinished: list[int], call_size: int) -> bool:
    """May an actor whose open calls have these counts of unfinished images take one more call?

    Backpressure by images, not calls: a new call goes out once the actor's unfinished images are down to
    ``CALLS_PER_ACTOR - 1`` calls' worth, so its batch is refilled while an older call still waits for its
    slowest image (a call ends only when that one does), within ``MAX_CALLS_PER_ACTOR`` open calls."""
    return len(unfinished) < MAX_CALLS_PER_ACTOR and sum(unfinished) <= (CALLS_PER_ACTOR - 1) * call_size


@dataclass
class Call:
    """One ``fit`` call on a worker: its stream of events and the ids of its images not yet reported."""

    gen: object
    ids: list
    worker: "Worker"
    started: bool = False


@dataclass
class Worker:
    """The driver's handle on one actor: its open calls and its health."""

    handle: object
    spec: dict
    calls: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    healthy: bool = True
    ping: object = None  # an info() call in flight while the actor is checked after a failure
    ping_after: float = 0.0
    down_since: float = 0.0


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: ``taskset``, a cgroup's cpuset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def joins_cluster(opts: JobOptions) -> bool:
    return bool(opts.address or os.environ.get("RAY_ADDRESS"))


def init_ray(opts: JobOptions) -> tuple[bool, str]:
    """Connect to / start Ray. Returns (we_started_it, address description). A local instance gets the
    CPUs this process may use (``taskset -c 0-3 dip restore …`` gives dip four cores)."""
    import ray
    if ray.is_initialized():
        return False, "existing"
    address = opts.address or os.environ.get("RAY_ADDRESS") or "local"
    kw = {"log_to_driver": True, "configure_logging": False}
    if address == "local":
        # the workers run at the command's own priority: Ray's default, nice 15, left them about a thirtieth
        # of a core beside any busy process (a notebook, another job), and a small job looked hung for
        # minutes; `nice dip restore ...` still makes the whole job yield
        os.environ.setdefault("RAY_worker_niceness", "0")
        kw.update(include_dashboard=bool(opts.dashboard_host), num_cpus=usable_cpus())
        if opts.dashboard_host:
            kw["dashboard_host"] = opts.dashboard_host
    ray.init(address=address, **kw)
    return True, address


def own_node_dying(wait: float = 1.0) -> bool:
    """Whether a process of the Ray instance this process started (its GCS, raylet, ...) has ended, or ends
    within ``wait`` seconds: what a signal to the whole process group does to them. Ray has no public
    call for this; its node object's ``dead_processes`` is read, and any change there reads as False (the
    caller then shuts Ray down as usual). tests/test_cluster.py pins it with a real group signal."""
    try:
        import ray._private.worker as ray_worker
        node = ray_worker._global_node
        deadline = time.monotonic() + wait
        while True:
            if node is not None and node.dead_processes():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
    except Exception:  # noqa: BLE001
        return False


def plan_actors(opts: JobOptions) -> tuple[str, list[dict]]:
    """(device type, [actor resource specs]): one actor per GPU, else CPU actors sharing each node's cores."""
    import ray
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = sum(int(n["Resources"].get("GPU", 0)) for n in nodes)
    want_cuda = opts.device not in ("cpu",) and (gpus > 0 or opts.device.startswith("cuda"))
    if want_cuda:
        n = opts.actors or gpus
        if n < 1:
            raise UsageError("--device cuda was asked for, but the Ray cluster has no GPU (pass --actors N to "
                             "wait for an autoscaler to add GPU nodes)")
        return "cuda", [{"num_gpus": 1, "num_cpus": 1, "node": None} for _ in range(n)]
    cpu_nodes = [(n["NodeID"], int(n["Resources"].get("CPU", 0))) for n in nodes if n["Resources"].get("CPU", 0) >= 1]
    if not cpu_nodes:
        raise UsageError("the Ray cluster has no CPU to run on")
    per_fit = opts.cpus_per_fit or 1
    if opts.actors:
        per_node = {nid: 0 for nid, _ in cpu_nodes}
        order = [nid for nid, _ in cpu_nodes]
        for i in range(opts.actors):
            per_node[order[i % len(order)]] += 1
    else:  # one single-threaded fit per core (docs/BENCHMARKS.md: CPU nodes), or per --cpus-per-fit cores
        per_node = {nid: max(1, c // per_fit) for nid, c in cpu_nodes}
    specs = []
    for nid, c in cpu_nodes:
        k = per_node[nid]
        if opts.actors:  # the actors share the node's cores, or take --cpus-per-fit each
            cpus = opts.cpus_per_fit or max(1, c // k)
        else:
            cpus = min(per_fit, c)
        for _ in range(k):
            specs.append({"num_gpus": 0, "num_cpus": cpus, "node": nid})
    return "cpu", specs


def start_actor(spec: dict, device: str, opts: JobOptions):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    ray_opts = {"num_cpus": spec["num_cpus"], "num_gpus": spec["num_gpus"], "max_restarts": 4,
                "max_task_retries": 0, "max_concurrency": MAX_CALLS_PER_ACTOR + 1}  # its fit calls, and info() pings
    if spec.get("node"):
        ray_opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(spec["node"], soft=True)
    cls = ray.remote(FitWorker)
    return cls.options(**ray_opts).remote(device, opts.slots, False if opts.reference_kernels else None,
                                          bool(opts.export_onnx), opts.onnx_dtype,
                                          threads=spec["num_cpus"] if device == "cpu" else None,
                                          tile=opts.tile, tile_overlap=opts.tile_overlap,
                                          max_memory=opts.max_memory_bytes)


class Pool:
    """The job's workers, started, replaced and pinged as they fail."""

    def __init__(self, opts: JobOptions):
        self.opts = opts
        self.device = "cpu"
        self.workers: list[Worker] = []
        self.replacements = 0

    def start(self, stopped=lambda: False) -> None:
        """One actor per spec of :func:`plan_actors`; UsageError when none starts within DIP_ACTOR_TIMEOUT.
        ``stopped()`` is asked every second while they start (the driver's stop flag)."""
        import ray
        self.device, specs = plan_actors(self.opts)
        started = [Worker(start_actor(s, self.device, self.opts), s) for s in specs]
        refs = {w.handle.info.remote(): w for w in started}
        timeout = float(os.environ.get("DIP_ACTOR_TIMEOUT", 600))
        ready, t0 = [], time.time()
        while len(ready) < len(refs) and time.time() - t0 < timeout and not stopped():
            more, _ = ray.wait([r for r in refs if r not in ready], num_returns=len(refs) - len(ready),
                               timeout=min(1.0, timeout))
            ready += more
        for r in ready:
            try:
                refs[r].info = ray.get(r)
                self.workers.append(refs[r])
            except Exception as e:  # noqa: BLE001
                log.warning("a worker failed to start: %s", one_line(e))
        for w in started:
            if w not in self.workers:
                with contextlib.suppress(Exception):
                    ray.kill(w.handle)
        if not self.workers:
            raise UsageError(f"no worker actor could start within {timeout:.0f} s "
                             f"(resources: {ray.cluster_resources()})")
        log.info("%d %s worker(s): %s", len(self.workers), self.device,
                 ", ".join(f"pid {w.info['pid']} on {w.info['host']}" for w in self.workers))

    def call_size(self) -> int:
        """Images per call: a CPU actor fits one image at a time (one slot), so one image a call, and a short
        queue spreads over all the actors; a GPU actor's batch takes many."""
        return self.opts.slots or (1 if self.device == "cpu" else 32)

    def has_room(self, w: Worker) -> bool:
        return w.healthy and room_for_a_call([len(c.ids) for c in w.calls], self.call_size())

    def submit(self, w: Worker, batch: list) -> Call:
        """One ``fit`` call on ``w`` with ``batch`` ([(id, Problem)])."""
        gen = w.handle.fit.options(num_returns="streaming").remote(batch)
        call = Call(gen=gen, ids=[k for k, _p in batch], worker=w)
        w.calls.append(call)
        return call

    def calls(self) -> list[Call]:
        return [c for w in self.workers for c in w.calls]

    def replace(self, w: Worker) -> None:
        """A new actor for one that Ray gave up on (at most twice the pool's size plus four times a job)."""
        import ray
        if self.replacements >= 2 * len(self.workers) + 4:
            return
        self.replacements += 1
        with contextlib.suppress(Exception):
            ray.kill(w.handle, no_restart=True)
        log.warning("worker pid %s is gone for good; starting a new one", w.info.get("pid"))
        w.handle = start_actor(w.spec, self.device, self.opts)

    def unhealthy(self, w: Worker, delay: float = 1.0) -> None:
        if w.healthy:
            w.down_since = time.time()
        w.healthy = False
        w.ping = None
        w.ping_after = time.time() + delay

    def ping_unhealthy(self) -> None:
        now = time.time()
        for w in self.workers:
            if not w.healthy and w.ping is None and now >= w.ping_after:
                w.ping = w.handle.info.remote()

    def down_for(self) -> float:
        """Seconds since every worker is down (0 while one is healthy)."""
        if self.workers and all(not w.healthy for w in self.workers):
            return time.time() - min(w.down_since for w in self.workers)
        return 0.0

    def on_ping(self, w: Worker) -> None:
        import ray
        ref, w.ping = w.ping, None
        try:
            w.info = ray.get(ref)
            w.healthy = True
            log.info("worker pid %s on %s is up", w.info.get("pid"), w.info.get("host"))
        except ray.exceptions.ActorDiedError:
            self.replace(w)
            self.unhealthy(w, 2.0)
        except ray.exceptions.RayError:
            self.unhealthy(w, 1.0)

    def on_call_error(self, call: Call, exc: BaseException) -> None:
        import ray
        if isinstance(exc, ray.exceptions.ActorDiedError):
            self.replace(call.worker)
        if isinstance(exc, ray.exceptions.RayActorError):
            self.unhealthy(call.worker)

    def shutdown(self) -> None:
        import ray
        for w in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(w.handle, no_restart=True)
