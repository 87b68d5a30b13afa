"""`dip restore` on Ray (in-process, on the session's Ray instance): bad inputs, option conflicts, reruns,
usage errors, and a worker killed mid-job. Images are tiny and use the 'fast' preset with a few steps."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.job.manifest import MANIFEST_NAME, UsageError, discover, safe_rel

from conftest import write_png, write_pngs

FAST = ["--preset", "fast", "--device", "cpu", "--no-export-onnx", "--quiet"]


def restore(*args) -> int:
    return cli_main(["restore", *map(str, args)])


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text())


def check_outputs(out: Path, ids: list[str]) -> None:
    """Every id has exactly one intact PNG and JSON, and no temporary file is left behind."""
    for key in ids:
        png, js = out / f"{key}.png", out / f"{key}.json"
        with Image.open(png) as im:
            im.load()
        rec = json.loads(js.read_text())
        assert rec["job"]["id"] == key
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    pngs = sorted(p.relative_to(out).with_suffix("").as_posix() for p in out.rglob("*.png"))
    assert pngs == sorted(ids)


# ---- inputs, no Ray ------------------------------------------------------------------------------------
def test_discover_dirs_files_and_manifests(tmp_path):
    src = tmp_path / "in"
    write_png(src / "a.png")
    write_png(src / "deep" / "b.png")
    write_png(src / "deep" / "b_mask.png")
    (src / "notes.txt").write_text("x")
    out = tmp_path / "out"
    write_png(src / "restored" / "old.png")  # under --out: ignored
    items = discover([str(src)], src / "restored", task="inpaint")
    assert [i.id for i in items] == ["a", "deep/b"]
    assert items[1].mask.endswith("b_mask.png")

    (tmp_path / "m.csv").write_text("input,steps,out,task\n"
                                    "in/a.png,7,,\n"
                                    "in/deep/b.png,,../../escape,\n"
                                    "in/a.png,x,,\n"
                                    "in/a.png,,other,sr\n"
                                    "in/a.png,,another,paint\n")
    items = discover([str(tmp_path / "m.csv")], out)
    assert items[0].id == "in/a" and items[0].options == {"steps": 7} and not items[0].error
    assert "would escape --out" in items[1].error
    assert "steps must be an integer" in items[2].error
    assert items[3].id == "other" and items[3].options == {"task": "sr"}
    assert "unknown task 'paint'" in items[4].error

    (tmp_path / "m.jsonl").write_text('{"input": "in/a.png", "seed": 3}\n\nnot json\n'
                                      '{"input": "in/a.png", "stpes": 1}\n{"input": "in/a.png"}\n')
    items = discover([str(tmp_path / "m.jsonl")], out)
    assert items[0].options == {"seed": 3} and not items[0].error
    assert "not valid JSON" in items[1].error
    assert "unknown column(s) stpes" in items[2].error
    assert "also the output of" in items[3].error  # same output path as row 1

    with pytest.raises(ValueError):
        safe_rel(out, "/etc/passwd")
    with pytest.raises(UsageError):
        discover([str(tmp_path / "missing")], out)
    (tmp_path / "bad.csv").write_text("path\nx.png\n")
    with pytest.raises(UsageError):
        discover([str(tmp_path / "bad.csv")], out)


# ---- exit code 2 -----------------------------------------------------------------------------------------
def test_usage_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert restore(tmp_path / "empty", "--out", tmp_path / "o", *FAST) == 2
    assert "no input images found" in capsys.readouterr().err
    assert restore(tmp_path / "missing", "--out", tmp_path / "o", *FAST) == 2
    write_png(tmp_path / "x.png")
    assert restore(tmp_path / "x.png", "--out", tmp_path / "o", "--task", "deblur") == 2  # unknown task
    (tmp_path / "m.csv").write_text("file\nx.png\n")
    assert restore(tmp_path / "m.csv", "--out", tmp_path / "o", *FAST) == 2
    (tmp_path / "afile").write_text("")
    assert restore(tmp_path / "x.png", "--out", tmp_path / "afile", *FAST) == 2


# ---- bad inputs: each reported with its reason, the good ones finish, exit 1 -------------------------
def test_bad_inputs_are_reported_and_the_rest_finishes(tmp_path, ray_session, capsys):
    src = tmp_path / "in"
    write_png(src / "good1.png", seed=1)
    write_png(src / "sub" / "good2.png", size=(32, 40), seed=2)
    data = write_png(tmp_path / "full.png", size=(32, 32)).read_bytes()
    (src / "truncated.png").write_bytes(data[: len(data) // 2])
    (src / "text.png").write_text("this is not a PNG\n")
    (src / "zero.png").write_bytes(b"")
    write_png(src / "tiny.png", size=(1, 1))
    rows = tmp_path / "rows"
    write_png(rows / "img.png", size=(32, 32), seed=3)
    write_png(rows / "img_small_mask.png", size=(16, 16), channels=1)
    write_png(rows / "ok.png", size=(24, 24), seed=4)
    (rows / "m.jsonl").write_text(
        json.dumps({"input": "img.png", "mask": "img_small_mask.png", "task": "inpaint", "out": "masked"}) + "\n" +
        json.dumps({"input": "ok.png", "out": "rows/ok", "steps": 4}) + "\n" +
        json.dumps({"input": "ok.png", "out": "../../outside"}) + "\n")
    out = tmp_path / "out"
    rc = restore(src, rows / "m.jsonl", "--out", out, "--steps", 3, *FAST)
    err = capsys.readouterr().err
    assert rc == 1
    m = manifest(out)["images"]
    st = {k: (r["status"], r.get("error") or "") for k, r in m.items()}
    assert st["good1"][0] == "done" and st["sub/good2"][0] == "done" and st["rows/ok"][0] == "done"
    assert st["truncated"][0] == "failed" and "truncated.png: unreadable image" in st["truncated"][1]
    assert st["text"][0] == "failed" and "text.png: not an image" in st["text"][1]
    assert st["zero"][0] == "failed" and "zero.png: the file is empty" in st["zero"][1]
    assert st["tiny"][0] == "failed" and "1x1 is too small" in st["tiny"][1]
    assert st["masked"][0] == "failed" and "mask is 16x16 but the image is 32x32" in st["masked"][1]
    escaped = [r for k, r in m.items() if "would escape --out" in (r.get("error") or "")]
    assert len(escaped) == 1 and escaped[0]["status"] == "failed"
    for name in ("truncated.png", "text.png", "zero.png", "tiny.png", "img_small_mask.png", "would escape"):
        assert name in err
    check_outputs(out, ["good1", "sub/good2", "rows/ok"])
    assert json.loads((out / "rows/ok.json").read_text())["steps"] == 4
    assert manifest(out)["runs"][-1]["counts"]["failed"] == 6
    occ = manifest(out)["runs"][-1]["batch_occupancy"]  # one slot per CPU actor: always full
    b = json.loads((out / "good1.json").read_text())["batch"]
    assert occ == 1.0 and (b["slots"], b["occupancy"]) == (1, 1.0)


# ---- different options don't overwrite each other unless --overwrite --------------------------------
def test_rerun_skips_done_and_refuses_other_options(tmp_path, ray_session, capsys):
    src = tmp_path / "in"
    for i in range(2):
        write_png(src / f"p{i}.png", seed=i)
    out = tmp_path / "out"
    assert restore(src, "--out", out, "--steps", 3, *FAST) == 0
    m1 = manifest(out)["images"]
    before = {k: (out / f"{k}.png").read_bytes() for k in m1}
    # the same command again: nothing is redone, the records (and timestamps) are kept
    assert restore(src, "--out", out, "--steps", 3, *FAST) == 0
    m2 = manifest(out)
    assert {k: (r["status"], r["finished"], r["run"]) for k, r in m2["images"].items()} == \
           {k: ("done", r["finished"], 1) for k, r in m1.items()}
    assert m2["runs"][-1]["counts"]["fitted"] == 0
    capsys.readouterr()
    # other options: refused per image, nothing overwritten, exit 1; the records still say what is on disk
    # (done, with the options it was made with), and the refusal is noted beside them
    assert restore(src, "--out", out, "--steps", 4, *FAST) == 1
    err = capsys.readouterr().err
    assert err.count("exists with different options") >= 2 and "--overwrite" in err
    assert {k: (out / f"{k}.png").read_bytes() for k in m1} == before
    assert all(json.loads((out / f"{k}.json").read_text())["steps"] == 3 for k in m1)
    m3 = manifest(out)
    for k, r in m3["images"].items():
        assert (r["status"], r["options"]["steps"], r["hash"], r["finished"]) == \
               ("done", 3, m1[k]["hash"], m1[k]["finished"])
        assert r["skipped"]["run"] == len(m3["runs"]) and r["skipped"]["options"]["steps"] == 4
        assert "exists with different options" in r["skipped"]["error"]
    assert m3["runs"][-1]["counts"]["skipped"] == 2
    # without --preset (a CPU job begun before its default changed): the refusal names the preset it was made with
    assert restore(src, "--out", out, "--steps", 3, *FAST[2:]) == 1
    assert "it was made with the 'fast' preset: --preset fast goes on with it" in capsys.readouterr().err
    # --overwrite redoes them with the new options
    assert restore(src, "--out", out, "--steps", 4, "--overwrite", *FAST) == 0
    assert all(json.loads((out / f"{k}.json").read_text())["steps"] == 4 for k in m1)
    assert {r["status"] for r in manifest(out)["images"].values()} == {"done"}
    # a changed input file counts as other options too
    write_png(src / "p0.png", seed=99)
    assert restore(src, "--out", out, "--steps", 4, *FAST) == 1
    m = manifest(out)
    assert m["images"]["p0"]["status"] == "done" and m["images"]["p0"]["skipped"]["run"] == len(m["runs"])
    assert m["images"]["p1"]["status"] == "done" and m["runs"][-1]["counts"] == {
        "done": 1, "failed": 0, "skipped": 1, "fitted": 0, "pending": 0}


# ---- a worker killed mid-job: the job still completes, every output exactly once ------------------------
def _fit_workers_of_this_session(ray) -> list[int]:
    """PIDs of this session's actors that are inside FitWorker.fit (Ray sets the process title)."""
    from ray._private import ray_constants
    raylet = ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == raylet and cmd.startswith(b"ray::FitWorker.fit"):
            pids.append(int(d.name))
    return pids


@contextlib.contextmanager
def _kill_a_worker(ray, when, first: float = 0.0):
    """While the block runs, SIGKILL this session's fitting actor once ``when()`` says so; yields the list of
    the pids killed."""
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        time.sleep(first)
        while not stop.is_set():
            pids = _fit_workers_of_this_session(ray)
            if pids and when():
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.03)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        yield killed
    finally:
        stop.set()
        th.join(5)


def test_a_result_made_under_another_auto_stop_rule_is_not_taken_as_done(tmp_path, ray_session, capsys):
    """The stopping rule follows from the config and the code's defaults, so the job hash cannot see it
    change (stop 28 changed denoise-lite's lag): each result records the rule it stopped by, and a rerun
    refuses a result whose rule is not today's. A result without the record counts as done, as before."""
    src = tmp_path / "in"
    write_png(src / "a.png", seed=0)
    out = tmp_path / "out"
    assert restore(src, "--out", out, "--steps", "auto", *FAST) == 0
    rec = json.loads((out / "a.json").read_text())
    from pipeline.config import make_config
    from pipeline.stopping import stop_config_for
    assert rec["stop_rule"] == stop_config_for(make_config("denoise", preset="fast")).to_dict()
    assert restore(src, "--out", out, "--steps", "auto", *FAST) == 0  # the same rule: done
    assert manifest(out)["runs"][-1]["counts"]["fitted"] == 0
    # made before a field was added to the rule (stop 32's floor), at its neutral value: the same rule
    older = {k: v for k, v in rec["stop_rule"].items() if k not in ("floor", "floor_wait")}
    (out / "a.json").write_text(json.dumps({**rec, "stop_rule": older}))
    assert restore(src, "--out", out, "--steps", "auto", *FAST) == 0
    assert manifest(out)["runs"][-1]["counts"]["fitted"] == 0
    (out / "a.json").write_text(json.dumps({**rec, "stop_rule": {**rec["stop_rule"], "lag": 0}}))
    capsys.readouterr()
    assert restore(src, "--out", out, "--steps", "auto", *FAST) == 1
    assert "its auto-stop rule changed since it was made" in capsys.readouterr().err
    (out / "a.json").write_text(json.dumps({k: v for k, v in rec.items() if k != "stop_rule"}))
    assert restore(src, "--out", out, "--steps", "auto", *FAST) == 0  # made before the record: as before
    assert manifest(out)["runs"][-1]["counts"]["fitted"] == 0


def test_killed_worker_is_replaced_and_job_completes(tmp_path, ray_session):
    ids = [f"k{i}" for i in range(4)]
    src = write_pngs(tmp_path / "in", ids, size=(32, 32))
    out = tmp_path / "out"

    def ready():
        time.sleep(0.1)  # let the 'started' event reach the driver
        return True

    with _kill_a_worker(ray_session, ready, first=0.5) as killed:
        rc = restore(src, "--out", out, "--steps", 15, "--slots", 2, *FAST)
    assert killed, "the job ended before a worker could be killed"
    assert rc == 0
    m = manifest(out)["images"]
    assert {m[k]["status"] for k in ids} == {"done"}
    assert sum(m[k]["requeued"] for k in ids) >= 1  # the killed batch went back to the queue
    assert all(m[k]["worker"]["pid"] != killed[0] for k in ids)
    check_outputs(out, ids)


# ---- ONNX export travels back from the actor as bytes ---------------------------------------------------
def test_onnx_bytes_are_written_by_the_driver(tmp_path, ray_session):
    pytest.importorskip("pipeline.onnx.export")
    write_png(tmp_path / "one.png", size=(24, 24))
    out = tmp_path / "out"
    rc = restore(tmp_path / "one.png", "--out", out, "--steps", 2, "--preset", "fast", "--device", "cpu", "--quiet")
    rec = manifest(out)["images"]["one"]
    assert rc == 0, rec
    js = json.loads((out / "one.json").read_text())
    if js["job"].get("onnx_error"):
        pytest.skip(f"ONNX export failed in this environment: {js['job']['onnx_error']}")
    assert rec["outputs"]["onnx"] == "one.onnx"
    assert (out / "one.onnx").stat().st_size > 0


def test_rerun_that_wants_onnx_refits_an_image_done_without_it(tmp_path, ray_session):
    pytest.importorskip("pipeline.onnx.export")
    write_png(tmp_path / "one.png", size=(24, 24))
    out = tmp_path / "out"
    args = [tmp_path / "one.png", "--out", out, "--steps", 2, "--preset", "fast", "--device", "cpu", "--quiet"]
    assert restore(*args, "--no-export-onnx") == 0
    assert not (out / "one.onnx").exists() and manifest(out)["runs"][-1]["counts"]["fitted"] == 1
    assert restore(*args) == 0  # the same options, but now an ONNX is wanted: fitted again, not skipped
    js = json.loads((out / "one.json").read_text())
    if js["job"].get("onnx_error"):
        pytest.skip(f"ONNX export failed in this environment: {js['job']['onnx_error']}")
    assert manifest(out)["runs"][-1]["counts"]["fitted"] == 1
    assert (out / "one.onnx").stat().st_size > 0 and manifest(out)["images"]["one"]["outputs"]["onnx"] == "one.onnx"
    assert restore(*args) == 0  # and then it is done
    assert manifest(out)["runs"][-1]["counts"]["fitted"] == 0


def test_worker_encodes_results_in_memory_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    """The actor hands the driver its PNG and ONNX as bytes; it once made a temporary folder per actor and
    never removed it (hundreds were left in /tmp after a day of test runs)."""
    import tempfile

    import numpy as np

    from pipeline.api import restore as api_restore
    from pipeline.io import ImageData
    from pipeline.job.actors import FitWorker
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    w = FitWorker("cpu", None, None, keep_weights=True, onnx_dtype="fp32")
    img = ImageData(np.full((16, 16, 3), 0.5, np.float32), None, 8, "", {"dpi": (300.0, 300.0)})
    res = api_restore(img, preset="fast", steps=2, keep_weights=True, device="cpu")
    ev = w._encode("a/b", res)
    assert ev["png"].startswith(b"\x89PNG") and b"pHYs" in ev["png"] and ev["record"]["steps"] == res.steps
    onnx = pytest.importorskip("onnx")
    assert ev["onnx_error"] is None
    meta = {e.key: e.value for e in onnx.load_from_string(ev["onnx"]).metadata_props}
    assert meta["dip_format"] == "dip-onnx" and "300" in meta["source_metadata"]
    assert list(scratch.iterdir()) == []


def test_full_output_disk_stops_the_job_and_the_same_command_finishes_it(tmp_path, ray_session, capsys):
    """On a real (tiny tmpfs) file system that fills up: the job stops with a clear message instead of fitting
    every remaining image only to fail writing it; what was done stays done; after space is freed the same
    command does the rest."""
    import subprocess
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        src = tmp_path / "in"
        for i in range(3):
            write_png(src / f"i{i}.png", seed=i)
        out = mnt / "out"
        assert restore(src / "i0.png", "--out", out, "--steps", 2, *FAST) == 0
        filler = mnt / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):  # fill it to the last byte
            while True:
                f.write(b"\0" * 4096)
        capsys.readouterr()
        assert restore(src, "--out", out, "--steps", 2, *FAST) == 1
        err = capsys.readouterr().err
        assert "No space left on device" in err and "free space and run the same command again" in err
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        check_outputs(out, ["i0"])  # the image done before is intact and still the only output
        filler.unlink()
        assert restore(src, "--out", out, "--steps", 2, *FAST) == 0
        check_outputs(out, ["i0", "i1", "i2"])
        m = manifest(out)
        assert m["images"]["i0"]["run"] == 1 and all(m["images"][k]["status"] == "done" for k in ("i0", "i1", "i2"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_an_actors_next_call_joins_the_running_batch(ray_session):
    """The actor's two calls in flight share one engine: an image of the second call takes the slot an
    image of the first frees, instead of waiting for the first call's slowest image (the batch used to
    drain at the end of every call)."""
    import numpy as np

    from pipeline.api import make_problem
    from pipeline.job import JobOptions
    from pipeline.job.pool import start_actor
    ray = ray_session
    opts = JobOptions(slots=2, export_onnx=False)
    actor = start_actor({"num_cpus": 1, "num_gpus": 0, "node": None}, "cpu", opts)
    tiny = {"input_depth": 4, "channels_down": (4, 8), "channels_up": (4, 8), "channels_skip": (2, 2)}
    rng = np.random.default_rng(0)

    def prob(name, steps):
        return name, make_problem(rng.random((32, 32, 3)).astype(np.float32), preset="fast", steps=steps,
                                  name=name, net=tiny)

    try:
        g1 = actor.fit.options(num_returns="streaming").remote([prob("a", 30), prob("b", 900)])
        g2 = actor.fit.options(num_returns="streaming").remote([prob("c", 30)])
        done: list[str] = []
        lock = threading.Lock()

        def drain(gen):
            for ref in gen:
                ev = ray.get(ref)
                if ev["kind"] in ("done", "error"):
                    assert ev["kind"] == "done", ev
                    with lock:
                        done.append(ev["id"])

        threads = [threading.Thread(target=drain, args=(g,)) for g in (g1, g2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert sorted(done) == ["a", "b", "c"]
        assert done.index("c") < done.index("b")  # c ran beside b, in a's slot
    finally:
        ray.kill(actor)


def test_a_dead_engine_fails_its_waiting_calls_and_the_next_call_starts_a_new_one(ray_session, monkeypatch):
    """In the actor's process (here: this one): the engine thread dies of something that is no image's
    fault; every call waiting on it raises (the driver retries their images), and the next call works."""
    import numpy as np

    from pipeline import fit
    from pipeline.api import make_problem
    from pipeline.job.actors import FitWorker
    real = fit.fit_tiled

    def broken(problems, **kw):
        problems.get(True)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield  # pragma: no cover

    monkeypatch.setattr(fit, "fit_tiled", broken)
    w = FitWorker("cpu", 1, None, keep_weights=False, onnx_dtype="fp32")
    img = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    batch = [("x", make_problem(img, preset="fast", steps=3, name="x"))]
    events = w.fit(batch)
    assert next(events)["kind"] == "started"
    with pytest.raises(RuntimeError, match="the fitting engine stopped: CUDA error"):
        next(events)
    monkeypatch.setattr(fit, "fit_tiled", real)
    evs = [e for e in w.fit([("y", make_problem(img, preset="fast", steps=3, name="y"))]) if e["kind"] != "progress"]
    assert [e["kind"] for e in evs] == ["started", "fitting", "done"] and evs[1]["id"] == evs[2]["id"] == "y"


def test_an_actor_gets_a_new_call_once_a_calls_worth_of_its_images_is_done():
    """Backpressure counts images: two calls of 32 whose slowest images are still running (1 + 1 left)
    must not keep the actor waiting for a third call until one of them ends."""
    from pipeline.job.pool import room_for_a_call
    assert room_for_a_call([], 32) and room_for_a_call([32], 32)  # the first two calls go out at once
    assert not room_for_a_call([32, 32], 32) and not room_for_a_call([20, 13], 32)
    assert room_for_a_call([1, 31], 32) and room_for_a_call([1, 1], 32)  # stragglers: refill the batch
    assert not room_for_a_call([1, 1, 1], 32)  # at most three open calls (each holds an actor thread)


# ---- issue 18: what a new user hit ---------------------------------------------------------------------
def test_a_killed_worker_charges_only_the_image_it_was_fitting(tmp_path, ray_session):
    """kill -9 of the actor while it fits one image and holds the others in its queue: only that image is
    charged a failed try (it once charged all six); the queued ones go back uncharged, and all finish."""
    ids = [f"q{i}" for i in range(6)]
    src = write_pngs(tmp_path / "in", ids, size=(24, 24))
    out = tmp_path / "out"

    def fitting():  # once an image of the run is being fitted (the actor said so)
        try:
            m = manifest(out)
        except (OSError, ValueError):
            return False
        return any(r.get("status") == "running" for r in m["images"].values())

    with _kill_a_worker(ray_session, fitting) as killed:
        rc = restore(src, "--out", out, "--steps", 150, "--actors", 1, *FAST)
    assert killed and rc == 0
    m = manifest(out)["images"]
    assert {m[k]["status"] for k in ids} == {"done"}
    charged = [k for k in ids if m[k].get("failures")]
    assert len(charged) == 1 and m[charged[0]]["attempts"] == 2, {k: (m[k].get("failures"), m[k]["attempts"]) for k in ids}
    assert all(m[k]["attempts"] == 1 for k in ids if k not in charged)
    assert sum(m[k].get("requeued", 0) for k in ids) >= 2  # the queued ones went back too, uncharged
    check_outputs(out, ids)


def test_a_rerun_with_nothing_to_do_starts_no_ray_and_outputs_are_readable(tmp_path, ray_session):
    """Outputs keep the umask's mode (0644 under 022: they were 0600); the lock file is gone after the job;
    a rerun with everything done decides it before starting Ray or a worker (it took 13 s)."""
    src = tmp_path / "in"
    for i in range(2):
        write_png(src / f"r{i}.png", seed=i)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert restore(src, "--out", out, "--steps", 3, "--preset", "fast", "--device", "cpu", "--quiet") == 0
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".png", ".json", ".onnx", ".html"}
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o644 for p in files}
    assert not (out / ".dip-job.lock").exists()
    for rec in manifest(out)["images"].values():  # the work of each image: in its JSON and the manifest
        w = json.loads((out / f"{rec['id']}.json").read_text())["work"]
        assert rec["work"] == w and w["steps"] == 3 + 1 and w["gflop"] == pytest.approx(4 * w["gflop_per_step"], rel=1e-2)
    t = time.time()
    assert restore(src, "--out", out, "--steps", 3, "--preset", "fast", "--device", "cpu", "--quiet") == 0
    run = manifest(out)["runs"][-1]
    assert run["status"] == "finished" and run["actors"] == 0 and run["ray_address"] is None
    assert run["counts"] == {"done": 2, "failed": 0, "skipped": 0, "fitted": 0, "pending": 0}
    assert time.time() - t < 10


def test_progress_inside_the_fits_reaches_the_user(tmp_path, monkeypatch):
    """The actor reports its fit-steps while it waits (progress events), and without a terminal the job logs
    a plain line at an interval instead of redrawing a bar every second."""
    import io

    import numpy as np

    from pipeline.api import make_problem
    from pipeline.job.actors import FitWorker
    from pipeline.job.progress import Progress
    monkeypatch.setenv("DIP_PROGRESS_EVERY", "0.2")
    w = FitWorker("cpu", 1, None, keep_weights=False, onnx_dtype="fp32", threads=1)
    img = np.random.default_rng(0).random((24, 24, 3)).astype(np.float32)
    evs = list(w.fit([("p", make_problem(img, preset="fast", steps=300, name="p"))]))
    kinds = [e["kind"] for e in evs]
    assert kinds[0] == "started" and kinds[1] == "fitting" and kinds[-1] == "done" and "progress" in kinds
    steps = [e["steps"] for e in evs if e["kind"] == "progress"]
    assert steps == sorted(steps) and 0 < steps[-1] <= 330
    monkeypatch.setenv("DIP_PROGRESS_LOG_EVERY", "1")
    buf = io.StringIO()
    pr = Progress(3, quiet=False, stream=buf)
    assert pr.bar is None  # not a terminal: no bar
    from collections import Counter
    pr.fit_steps("w", 100)
    time.sleep(1.1)
    pr.fit_steps("w", 250)
    pr.tick(Counter(done=1), 1, 1)
    line = buf.getvalue()
    assert line.startswith("dip: 1/3 images: done=1 failed=0 skipped=0 remaining=2; 1 fitting, 250 fit-steps")
    assert "/s)" in line
    pr.tick(Counter(done=1), 1, 1)
    assert buf.getvalue() == line  # not again before the interval
