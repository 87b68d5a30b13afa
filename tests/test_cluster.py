"""`dip restore` with real, separate Ray processes:

* a two-node Ray cluster on this machine (`ray start --head` + `ray start --address`), with token
  authentication on, and a 6-image job submitted through deploy/submit (`ray job submit`);
* the driver killed with SIGKILL mid-job, and the same command run again.

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

from conftest import REPO, clean_env, dip_cmd, write_png
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
    src = tmp_path / "in"
    ids = [f"s{i}" for i in range(6)]
    for i, k in enumerate(ids):
        write_png(src / f"{k}.png", size=(24, 24), seed=i)
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


def _wait_done(p: subprocess.Popen, out: Path, ids: list[str], more_than: set, timeout=400) -> set:
    """Wait until the running job `p` has finished an image beyond `more_than`; return the done set."""
    t = time.time()
    while time.time() - t < timeout and p.poll() is None:
        done = {k for k in ids if (out / f"{k}.json").exists()}
        if done - more_than:
            return done
        time.sleep(0.1)
    raise AssertionError(f"the job ended (rc {p.poll()}) or stalled before it could be stopped")


def test_interrupted_and_killed_driver_then_rerun_finishes_only_the_rest(tmp_path):
    src = tmp_path / "in"
    ids = [f"d{i}" for i in range(6)]
    for i, k in enumerate(ids):
        write_png(src / f"{k}.png", size=(24, 24), seed=i)
    out = tmp_path / "out"
    cmd = dip_cmd("restore", src, "--out", out, "--steps", 6, "--slots", 1, "--preset", "fast", "--device", "cpu",
                  "--no-export-onnx", "--quiet")

    def start():
        # started with SIGINT ignored, as a script's background job (`dip restore … &`) is: the driver must
        # still stop cleanly on it (it once ignored it there: CI run from such a shell, 2026-11-27)
        return subprocess.Popen(cmd, env=clean_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))

    # run 1: Ctrl-C (SIGINT) after the first image: a clean stop, exit 130, the manifest flushed
    p = start()
    try:
        _wait_done(p, out, ids, set())
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130, err[-2000:]
    finally:
        stop_group(p, timeout=5)
    done1 = {k for k in ids if (out / f"{k}.json").exists()}
    m = manifest(out)
    assert m["runs"][-1]["status"] == "interrupted"
    assert {k for k, r in m["images"].items() if r["status"] == "done"} == done1
    assert all(m["images"][k]["status"] == "pending" for k in set(ids) - done1 if k in m["images"])

    # run 2: SIGKILL after one more image: nothing can be flushed on the way out
    p = start()
    try:
        _wait_done(p, out, ids, done1)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        stop_group(p, timeout=5)  # the embedded Ray went with the driver's session
    done = {k for k in ids if (out / f"{k}.json").exists()}
    assert done1 < done < set(ids)
    first = {k: json.loads((out / f"{k}.json").read_text())["job"] for k in done}

    # run 3: the same command finishes only the rest
    r = subprocess.run(cmd, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = check_outputs(out, ids)
    m = manifest(out)
    assert m["runs"][-1]["counts"]["fitted"] == len(ids) - len(done)
    for k in done:  # earlier runs' results were kept, not redone
        assert recs[k]["job"] == first[k]
        assert m["images"][k]["status"] == "done" and m["images"][k]["finished"] == first[k]["finished"]
    for k in set(ids) - done:
        assert recs[k]["job"]["run"] == len(m["runs"])
        assert m["images"][k]["status"] == "done"
