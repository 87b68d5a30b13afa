"""`dip restore` with real, separate Ray processes:

* a two-node Ray cluster on this machine (`ray start --head` + `ray start --address`), with token
  authentication on, and a 6-image job submitted through deploy/submit (`ray job submit`);
* the driver stopped mid-job by SIGINT, SIGTERM (from a script's background and from `timeout`) and
  SIGKILL, on a busy CPU, and the same command run again.

Lifetimes: every Ray process here is started by this module with its own --temp-dir and free ports,
with `ray start --block` in its own session, and stopped by signalling exactly those process groups.
No test runs `ray stop`, which would kill every Ray process on the machine (the in-process session
fixture's too). The embedded Ray of a `dip` subprocess lives in that subprocess' session and goes with it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, clean_env, dip_cmd, write_pngs
from pipeline.job.manifest import MANIFEST_NAME

RAY = shutil.which("ray") or str(Path(os.sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    args = []
    for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"):
        args += [flag, str(free_port())]
    return args


def stop_group(*procs: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the processes we started (`ray start --block` then stops its node's processes itself, in a
    few seconds), then SIGKILL whatever is left in their process groups."""
    for p in procs:
        if p.poll() is None:
            with _suppress():
                p.send_signal(signal.SIGTERM)
    deadline = time.time() + timeout
    for p in procs:
        with _suppress():
            p.wait(max(0.1, deadline - time.time()))
    for p in procs:
        with _suppress():
            os.killpg(p.pid, signal.SIGKILL)
        with _suppress():
            p.wait(5)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError,
                                                         subprocess.TimeoutExpired))


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text())


def check_outputs(out: Path, ids: list[str]) -> dict:
    recs = {}
    for key in ids:
        with Image.open(out / f"{key}.png") as im:
            im.load()
        recs[key] = json.loads((out / f"{key}.json").read_text())
    assert sorted(p.stem for p in out.rglob("*.png")) == sorted(ids)
    assert not [p for p in out.rglob("*.tmp")]
    return recs


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes (1 CPU each) on this machine, token auth on with a fresh token."""
    tmp = Path(tempfile.mkdtemp(prefix="dipray", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    token = secrets.token_hex(32)
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    port, dport = free_port(), free_port()
    procs = []
    try:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--port", str(port), "--num-cpus", "1", "--num-gpus", "0",
             "--temp-dir", str(tmp), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dport),
             "--ray-client-server-port", str(free_port()), "--node-ip-address", "127.0.0.1", *node_ports()],
            env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(head)
        _wait_nodes(env, port, 1, head)
        worker = subprocess.Popen(
            [RAY, "start", "--block", "--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--num-gpus", "0",
             "--node-ip-address", "127.0.0.1", *node_ports()],
            env=env, stdout=open(tmp / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(worker)
        _wait_nodes(env, port, 2, worker)
        yield {"env": env, "gcs": f"127.0.0.1:{port}", "api": f"http://127.0.0.1:{dport}", "tmp": tmp}
    finally:
        stop_group(*reversed(procs))
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_nodes(env, port, n, proc, timeout=180):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        r = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{port}"], env=env, capture_output=True,
                           text=True, timeout=60)
        if r.returncode == 0 and r.stdout.count(" node_") >= n:
            return
        time.sleep(1)
    raise TimeoutError(f"the Ray cluster did not reach {n} node(s) in {timeout} s")


def test_two_node_cluster_job_submit(cluster, tmp_path):
    ids = [f"s{i}" for i in range(6)]
    src = write_pngs(tmp_path / "in", ids, size=(24, 24))
    out = tmp_path / "out"
    # without the token the cluster refuses the job API: authentication is on
    no_token = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_TOKEN"}
    no_token["HOME"] = str(tmp_path)  # and no ~/.ray/auth_token to fall back on
    r = subprocess.run([RAY, "job", "list", "--address", cluster["api"]], env=no_token, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    r = subprocess.run([str(REPO / "deploy" / "submit"), "--address", cluster["api"], str(src), "--out", str(out),
                        "--steps", "3", "--preset", "fast", "--no-export-onnx", "--quiet"],
                       env=cluster["env"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout + r.stderr
    recs = check_outputs(out, ids)
    m = manifest(out)
    assert {m["images"][k]["status"] for k in ids} == {"done"}
    assert m["runs"][-1]["actors"] == 2 and m["runs"][-1]["ray_address"] != "local"
    assert len({rec["job"]["worker"]["node"] for rec in recs.values()}) == 2  # both nodes fitted images


# ---- a signal while the driver waits on Ray, on a busy machine --------------------------------------------
def _busy_cpu():
    """A second process that keeps the CPU busy (the condition under which signals once crashed the job)."""
    return subprocess.Popen([os.sys.executable, "-c", "while True: pass"], start_new_session=True)


def _wait_fitting(out: Path, ids, p: subprocess.Popen, timeout=300) -> None:
    """Until the manifest says an image of this run is being fitted (the driver then waits in ray.wait)."""
    t = time.time()
    while time.time() - t < timeout and p.poll() is None:
        try:
            m = manifest(out)
        except (OSError, ValueError):
            m = None
        if m and m["runs"] and m["runs"][-1]["status"] == "running" and any(
                r.get("status") == "running" and r.get("run") == len(m["runs"]) for r in m["images"].values()):
            time.sleep(0.5)
            return
        time.sleep(0.1)
    raise AssertionError(f"no image started fitting (rc {p.poll()})")


def _alive_in_session(sid: int, wait: float = 10) -> list[str]:
    """The processes of session ``sid`` still running (not zombies) after up to ``wait`` seconds."""
    deadline = time.time() + wait
    while True:
        ps = subprocess.run(["ps", "-s", str(sid), "-o", "pid=,stat=,args="], capture_output=True, text=True)
        alive = [line.strip() for line in ps.stdout.splitlines() if line.split()[1:2] != ["Z"]]
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


# Ray's GCS client ends its process with exit 1 when the GCS has been unreachable this long (60 s by
# default): short here, so that a driver still waiting on a GCS the signal also stopped fails every time
GCS_GONE_S = "2"


def _interrupt_runs(tmp_path, ways) -> None:
    """Run the same job once per way of stopping it, each stopped while it fits; then once to the end.
    A signal through `timeout` reaches the whole process group, Ray's own processes too."""
    ids = [f"g{i}" for i in range(max(6, 2 * len(ways)))]  # enough that every run has some left to stop
    src = write_pngs(tmp_path / "in", ids, size=(24, 24))
    out = tmp_path / "out"
    cmd = dip_cmd("restore", src, "--out", out, "--steps", 400, "--preset", "fast", "--device", "cpu",
                  "--no-export-onnx", "--quiet")
    busy = _busy_cpu()
    try:
        for sig, via in ways:
            ignore = via == "background"  # a script's background job inherits SIGINT ignored
            argv = (["timeout", "-s", sig.name, "900"] + cmd) if via == "timeout" else cmd
            env = {**clean_env(), "RAY_gcs_rpc_server_reconnect_timeout_s": GCS_GONE_S}
            p = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True,
                                 preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore else None)
            try:
                _wait_fitting(out, ids, p)
                done_before = {k for k in ids if (out / f"{k}.json").exists()}
                report = out / "report.html"
                report_before = report.stat().st_mtime_ns if report.exists() else 0
                p.send_signal(sig)  # to dip, or to `timeout`, which passes it on to dip
                _, err = p.communicate(timeout=120)
                left = _alive_in_session(p.pid) if sig != signal.SIGKILL else []
            finally:
                stop_group(p, timeout=5)  # its embedded Ray went with its session
            m = manifest(out)
            if sig == signal.SIGKILL:  # nothing can be flushed on the way out: the next run says "abandoned"
                assert p.returncode == -9 and m["runs"][-1]["status"] == "running"
                continue
            assert p.returncode == 130, (sig, via, err[-3000:])
            assert not left, (sig, via, left)  # nothing of its Ray outlives it
            assert report.stat().st_mtime_ns > report_before  # written on the way out
            assert "SystemError" not in err and "Traceback" not in err, err[-3000:]
            assert m["runs"][-1]["status"] == "interrupted" and m["runs"][-1]["signal"] == sig.name, m["runs"][-1]
            assert done_before <= {k for k in ids if m["images"].get(k, {}).get("status") == "done"}
    finally:
        stop_group(busy, timeout=1)
    done = {k for k in ids if (out / f"{k}.json").exists()}
    first = {k: json.loads((out / f"{k}.json").read_text())["job"] for k in done}
    r = subprocess.run(dip_cmd("restore", src, "--out", out, "--steps", 400, "--preset", "fast", "--device", "cpu",
                               "--no-export-onnx", "--quiet"), env=clean_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest(out)
    assert m["runs"][-1]["status"] == "finished" and m["runs"][-1]["counts"]["fitted"] == len(ids) - len(done)
    assert [x["status"] for x in m["runs"][:-1]] == [
        "abandoned" if sig == signal.SIGKILL else "interrupted" for sig, _via in ways]
    recs = check_outputs(out, ids)
    assert all(recs[k]["job"] == first[k] for k in done)  # nothing finished before was redone
    for k in ids:  # what finished stays finished, with the record of the run that made it
        assert m["images"][k]["status"] == "done" and recs[k]["job"]["run"] == m["images"][k]["run"]


SIGNAL_WAYS = [(signal.SIGINT, "background"), (signal.SIGTERM, "background"), (signal.SIGINT, "timeout"),
               (signal.SIGTERM, "timeout"), (signal.SIGKILL, "background")]


def test_a_signal_while_the_driver_waits_on_ray_stops_it_cleanly(tmp_path):
    """INT and TERM, to a driver started in a script's background (SIGINT ignored) and under `timeout`,
    each delivered while it waits on Ray for a fit, with a second process keeping the CPU busy: exit 130,
    the run marked interrupted (it once ended in a SystemError from inside Ray's wait, exit 1, "finished"),
    the report written, and no process of its Ray left running. Through `timeout`, Ray's own processes get
    the signal too: the driver then once waited on its stopped GCS, and Ray ended it with exit 1.
    Then SIGKILL: the run cannot say anything, and the next one marks it abandoned. Then the same command
    finishes only the rest, and nothing done before is redone."""
    _interrupt_runs(tmp_path, SIGNAL_WAYS)


@pytest.mark.slow
def test_signals_while_waiting_on_ray_repeated(tmp_path):
    """The same, three times each (`pytest -m slow`)."""
    _interrupt_runs(tmp_path, SIGNAL_WAYS * 3)
