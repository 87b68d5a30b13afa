"""OUT/report.html (pipeline.job.report): built by a real `dip restore` job (on the session's Ray instance) over
tiny images with hostile names and one bad file, checked as text, and in a real headless Chromium
(Debian's /usr/bin/chromium driven by the `playwright` package; skipped when either is missing).

The browser test saves a screenshot to test-artifacts/report.png (git-ignored) and to its tmp folder."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import time
from urllib.parse import unquote

import pytest

from conftest import REPO, write_png
from pipeline.job import report
from pipeline.cli import main as cli_main

CHROMIUM = "/usr/bin/chromium"
# The '/' makes this a folder '<script>alert(1)<' holding 'script>.png': the image id is still the full name.
SCRIPT_NAME = "<script>alert(1)</script>"
IMG_NAME = "<img src=x onerror=alert(1)>"  # one path component: would fire a dialog if inserted as markup
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, ray_session):
    """A real job: 3 good 24x24 images and a text file named bad.png (exit code 1)."""
    root = tmp_path_factory.mktemp("report")
    src = root / "in photos"
    write_png(src / "a.png", seed=1)
    write_png(src / f"{SCRIPT_NAME}.png", seed=2)
    write_png(src / f"{IMG_NAME}.png", seed=3)
    (src / "bad.png").write_text("this is not a PNG\n")
    out = root / "out"
    t = time.perf_counter()
    rc = cli_main(["restore", str(src), "--out", str(out), "--preset", "fast", "--steps", "3", "--device", "cpu",
                   "--quiet", "--no-export-onnx"])
    assert rc == 1, "one input is bad: the job must end with exit code 1"
    print(f"job: {time.perf_counter() - t:.1f} s")
    return root, src, out


def test_job_writes_a_safe_report_and_dip_report_rebuilds_it(job, capsys, tmp_path):
    root, src, out = job
    path = out / "report.html"
    assert path.is_file(), "dip restore must write OUT/report.html at the end of the job"
    text = path.read_text()
    assert text.count("<tr data-id=") == 4
    # hostile names are escaped everywhere (text and attributes); only the report's own script is there
    assert "<script>alert" not in text and "<img src=x" not in text and text.count("<script") == 1
    assert html.escape(SCRIPT_NAME) in text and html.escape(IMG_NAME) in text
    # no path outside OUT is shown or linked: the input folder lies outside OUT
    for p in (str(src), str(root), str(out.resolve())):
        assert p not in text
    assert not re.search(r'(?:href|src)="(?:/|file:|https?:)', text)
    # outputs are linked relatively and exist; inputs are embedded
    links = set(re.findall(r'<a href="([^"#][^"]*)"', text))
    assert len(links) == 3
    for link in links:
        assert (out / unquote(html.unescape(link))).is_file()
    assert "%3Cscript%3Ealert%281%29%3C/script%3E.png" in links  # the folder and the file, percent-encoded
    assert text.count('alt="input" ') == 4 - 1  # 3 inputs embedded; bad.png is unreadable: a placeholder
    assert "bad.png: not an image" in text

    # `dip report OUT` rebuilds it (a moved/copied OUT works: links are relative)
    copy = tmp_path / "copied out"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    capsys.readouterr()
    assert cli_main(["report", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(copy / "report.html")
    assert (copy / "report.html").read_text().count("<tr data-id=") == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["report", str(empty)]) == 2
    assert cli_main(["report", str(tmp_path / "missing")]) == 2


def test_report_from_files(tmp_path):
    """No Ray: a hand-made OUT with an auto-stopped fit, metrics, a failure, an orphan result and a
    manifest entry that tries to point outside OUT."""
    src = tmp_path / "secret" / "photos"
    write_png(src / "deep" / "x.png", seed=4)
    out = tmp_path / "out"
    write_png(out / "x.png", seed=5)
    write_png(out / "orphan.png", seed=6)
    write_png(tmp_path / "outside.png", seed=7)
    loss = [0.05 * 0.995 ** i for i in range(650)]
    rec = {"task": "denoise", "preset": "denoise", "steps": 650, "stop_reason": "auto", "seconds": 12.5,
           "work": {"params": 2217831, "gflop_per_step": 7.19, "bytes_per_step": 393632064, "steps": 715,
                    "gflop": 5140.85},
           "device": "cuda:0", "metrics": {"psnr": 30.1234, "ssim": 0.91234}, "loss": loss,
           "input": str(src / "deep" / "x.png"),
           "psnr_trace": [[s, 20 + s / 100] for s in range(50, 651, 50)],
           "stopping": {"rule": "es-wmv", "reason": "auto", "chosen_step": 250, "stopped_at": 650,
                        "trace": [[s, 1e-2 / s] for s in range(50, 651, 50)]},
           "job": {"id": "x", "seconds": 12.5}}
    (out / "x.json").write_text(json.dumps(rec))
    (out / "orphan.json").write_text(json.dumps({**rec, "stopping": None, "metrics": {}, "seconds": 3.0,
                                                 "job": {"id": "orphan", "seconds": 3.0}}))
    images = {
        "x": {"id": "x", "input": str(src / "deep" / "x.png"), "status": "done", "seconds": 12.5, "attempts": 1,
              "options": {"task": "denoise", "steps": 3000}, "outputs": {"png": "x.png", "json": "x.json"},
              "worker": {"host": "gpu-node-1", "device": "cuda"}},
        "deep/bad": {"id": "deep/bad", "input": str(src / "deep" / "bad.png"), "status": "failed",
                     "error": f"{src}/deep/bad.png: not an image (see '/etc/dip/x.conf')"},
        "evil": {"id": "evil", "input": "/nonexistent/evil.png", "status": "done",
                 "outputs": {"png": "../outside.png", "json": "../../x.json"}},
    }
    (out / "dip-manifest.json").write_text(json.dumps(
        {"format": "dip-manifest/1", "updated": "2025-01-01T00:00:00+00:00", "images": images,
         "runs": [{"run": 1, "status": "finished", "device": "cuda", "actors": 1, "seconds": 36.0,
                   "batch_occupancy": 0.934, "counts": {"done": 2, "failed": 1, "fitted": 2}}]}))
    path = report.build(out)
    text = path.read_text()
    assert text.count("<tr data-id=") == 4  # x, deep/bad, evil, and the orphan result
    assert str(tmp_path) not in text and "/etc/dip" not in text and "outside.png" not in text
    # paths are shown relative to the inputs' common folder (photos/deep); other folders are cut to '…/'
    assert 'class="err">bad.png: not an image (see &#x27;…/x.conf&#x27;)<' in text
    assert 'data-col="chosen_step" data-sort="250.0">250 (variance rule, stopped at 650)<' in text
    assert 'data-col="psnr" data-sort="30.1234">30.12<' in text
    assert 'data-col="steps" data-sort="650.0">650 / 3000<' in text
    assert "input: x.png" in text
    assert "Images / hour</dt><dd>200<" in text  # 2 fitted in 36 s
    assert "Batch occupancy (last run)</dt><dd>93%<" in text
    assert "Work (GFLOP: steps × FLOPs a step)</dt><dd>10.3 TFLOP, 5.1 TFLOP an image<" in text  # x and orphan
    assert text.count("data:image/png;base64,") >= 4  # input + 2 crops + the plot of x, ...
    assert 'alt="loss curve"' in text


def test_report_order_ids_devices_and_reference(tmp_path):
    """What a person found wrong: failed manifest rows carried absolute paths in their data-id, sorted
    '!row10' before '!row9' and came first; 'Device(s) cpu x4' counted images, not workers; the reference
    image was not shown; a run that refused other options rewrote the record as skipped."""
    src = tmp_path / "in"
    out = tmp_path / "out"
    write_png(src / "ref.png", size=(16, 16), seed=3)
    images = {}
    for i in (9, 10, 2):
        images[f"!row{i}:{src}/m.csv:{i}"] = {"id": f"!row{i}:{src}/m.csv:{i}", "input": f"{src}/m.csv:{i}",
                                              "status": "failed", "error": f"{src}/m.csv:{i}: bad row"}
    for k in ("b10", "b9", "a"):
        write_png(out / f"{k}.png", size=(16, 16), seed=1)
        (out / f"{k}.json").write_text(json.dumps({"task": "denoise", "preset": "fast", "steps": 5, "seconds": 1.0,
                                                   "loss": [0.1] * 5, "job": {"id": k}}))
        images[k] = {"id": k, "input": str(src / f"{k}.png"), "reference": str(src / "ref.png"), "status": "done",
                     "outputs": {"png": f"{k}.png", "json": f"{k}.json"}, "seconds": 1.0,
                     "worker": {"host": "h", "pid": 7 if k == "a" else 8, "device": "cpu"}}
    images["b9"]["skipped"] = {"run": 2, "error": "b9.png: exists with different options"}
    (out / "dip-manifest.json").write_text(json.dumps({"format": "dip-manifest/1", "images": images, "runs": [
        {"run": 1, "status": "finished"}, {"run": 2, "status": "finished"}]}))
    text = report.build(out).read_text()
    ids = re.findall(r'<tr data-id="([^"]*)"', text)
    assert ids == ["a", "b9", "b10", "!row2:m.csv:2", "!row9:m.csv:9", "!row10:m.csv:10"]
    assert str(src) not in text
    assert "Device(s)</dt><dd>cpu (2 workers)<" in text and "Skipped</dt><dd>1<" in text
    assert text.count('alt="reference"') == 3 and "reference: ref.png" in text
    assert 'data-id="b9" data-status="done"' in text and "exists with different options" in text


def test_report_shows_the_step_the_stopping_fallback_chose(tmp_path):
    """A fit that ran to its cap: the VAR minimum (not used) is no chosen step; the fallback's image is."""
    out = tmp_path / "out"
    base = {"task": "denoise", "preset": "denoise", "steps": 1200, "stop_reason": "steps", "seconds": 3.0,
            "loss": [0.01] * 1200, "metrics": {}}
    st = {"rule": "es-wmv", "reason": "not triggered", "chosen_step": 400, "stopped_at": None,
          "trace": [[s, 1e-3] for s in range(200, 1201, 50)]}
    for name, stopping in (("fb", {**st, "result_from": "discrepancy",
                                   "fallback": {"rule": "discrepancy", "step": 550, "used": True}}),
                           ("cap", {**st, "result_from": "last"})):
        write_png(out / f"{name}.png", seed=1)
        (out / f"{name}.json").write_text(json.dumps({**base, "stopping": stopping, "job": {"id": name}}))
    text = report.build(out).read_text()
    assert 'data-col="chosen_step" data-sort="550.0">550 (discrepancy fallback, at the cap)<' in text
    assert text.count('data-col="chosen_step" data-sort="400.0"') == 0
    # where the rule did not fire and had no fallback, the cell says so (it was empty)
    assert 'data-col="chosen_step" data-sort="">not triggered: the last image (the cap)<' in text


@pytest.fixture
def browser(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (Debian package 'chromium')")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the 'playwright' Python package is not installed (pip install playwright; no browser "
                    "download is needed: it drives /usr/bin/chromium)")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 900}, timeout=60_000)
        try:
            yield ctx
        finally:
            ctx.close()


def test_report_in_chromium(job, browser, tmp_path):
    root, src, out = job
    page = browser.new_page()
    console, errors, dialogs, requests = [], [], [], []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda r: requests.append(r.url))
    page.goto((out / "report.html").resolve().as_uri(), wait_until="load")
    # every image (lazy ones too) loads: the relative links to the outputs work from file://
    page.evaluate("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=15_000)
    broken = page.evaluate("Array.from(document.images).filter(i => !i.naturalWidth).map(i => i.alt)")
    assert broken == []

    rows = page.locator("#images tbody tr")
    assert rows.count() == 4
    names = page.eval_on_selector_all("#images td[data-col=name]", "tds => tds.map(t => t.textContent)")
    assert SCRIPT_NAME in names and IMG_NAME in names
    body = page.text_content("body")
    assert SCRIPT_NAME in body and IMG_NAME in body
    assert page.locator("script").count() == 1 and page.locator("img[onerror]").count() == 0

    err = page.text_content("#images tr[data-status=failed] td[data-col=error]")
    assert "bad.png" in err and "not an image" in err and str(src) not in err

    def times():
        return page.eval_on_selector_all("#images td[data-col=seconds]", "tds => tds.map(t => t.dataset.sort)")

    page.click("#images th[data-key=seconds]")
    t = times()
    vals = [float(v) for v in t if v]
    assert len(vals) == 3 and vals == sorted(vals) and t[-1] == ""  # the failure (no time) sorts last
    assert page.get_attribute("#images th[data-key=seconds]", "aria-sort") == "ascending"
    page.click("#images th[data-key=seconds]")
    t = times()
    assert [float(v) for v in t if v] == sorted(vals, reverse=True) and t[-1] == ""
    assert page.locator("#images tbody tr").last.get_attribute("data-status") == "failed"

    # the 4x centre crop toggle of the first image
    art = page.locator("article").first
    assert art.locator(".pair.full").is_visible() and not art.locator(".pair.crop").is_visible()
    art.locator("label", has_text="Centre crop").click()
    assert art.locator(".pair.crop").is_visible() and not art.locator(".pair.full").is_visible()
    assert art.locator(".pair.crop img").first.evaluate("i => getComputedStyle(i).imageRendering") == "pixelated"
    page.click("button[data-view=full]")
    assert art.locator(".pair.full").is_visible()

    shots = [tmp_path / "report.png", REPO / "test-artifacts" / "report.png"]
    shots[1].parent.mkdir(exist_ok=True)
    page.screenshot(path=str(shots[0]), full_page=True)
    shutil.copyfile(shots[0], shots[1])
    assert shots[1].stat().st_size > 10_000

    assert dialogs == []
    assert errors == []
    assert [m for m in console if m.startswith("error")] == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


def test_a_report_failure_does_not_fail_the_job(job, tmp_path, monkeypatch, caplog):
    root, src, out = job
    copy = tmp_path / "out"
    shutil.copytree(out, copy)

    def boom(_out):
        raise RuntimeError("no report today")

    monkeypatch.setattr(report, "build", boom)
    rc = cli_main(["restore", str(src), "--out", str(copy), "--preset", "fast", "--steps", "3", "--device", "cpu",
                   "--quiet", "--no-export-onnx"])
    assert rc == 1  # the same as without the report: bad.png fails again, the rest is skipped as done
    assert "no report today" in caplog.text
