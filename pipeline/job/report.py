"""OUT/report.html: a job report a person can open in a browser (``dip report OUT``).

``build(out)`` reads the job manifest (OUT/dip-manifest.json) and every result's ``<stem>.json`` and
writes ONE self-contained HTML file, OUT/report.html (inline CSS and JS, no CDN, no server):

* a summary: images done / failed / skipped, wall time of the job's runs, fit time per image,
  images per hour, the device(s) and hosts;
* a sortable table of the images (click a header; numbers sort as numbers): status, task, preset, steps,
  the auto-stop step, time, PSNR / SSIM when a reference was given, attempts, and the error of a failure;
* per image: the input and the output side by side, switchable to a 4x zoomed centre crop (pixelated),
  and the loss curve with the stopping rule's VAR trace, its chosen step and where it stopped (matplotlib,
  Agg canvas, embedded as a PNG data: URI).

The report never shows or links a path outside OUT. Outputs are linked by relative URLs (the report sits
at OUT's root, so OUT can be moved or copied as a whole); inputs, which usually live outside OUT, are
embedded as small thumbnails (data: URIs) made here from the input file when it is readable. Input paths
are shown relative to the inputs' common folder, and absolute paths in error messages are shortened the
same way. Every string that comes from a file name, a JSON file or an error is HTML-escaped (in attributes
too); the script only moves table rows and never parses HTML; a Content-Security-Policy lets only this
report's own script (by its hash) run. The page itself is pipeline.job.report_page; this module collects
what it shows.

``dip restore`` rebuilds the report at the end of every job (a report failure never fails the job);
``dip report OUT`` rebuilds it by hand, e.g. after copying results around. Per-image detail sections are
written for the first ``DIP_REPORT_MAX_DETAILS`` (default 500) images; the table always lists them all.
"""
from __future__ import annotations

import logging
import os
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import quote

from pipeline.io import read_json
from pipeline.job.manifest import MANIFEST_NAME
from pipeline.job.report_page import fallback_step, num, render

log = logging.getLogger("dip.report")

REPORT_NAME = "report.html"
STATUS_ORDER = ("done", "failed", "skipped", "running", "pending")


# ---- collecting ------------------------------------------------------------------------------------------
def _inside(out: Path, rel) -> Path | None:
    """OUT/rel when it is a file inside OUT (symlinks resolved), else None."""
    if not isinstance(rel, str) or not rel:
        return None
    try:
        root = out.resolve()
        p = (root / rel).resolve()
        p.relative_to(root)
    except (ValueError, OSError):
        return None
    return p if p != root and p.is_file() else None


def _rel_url(out: Path, p: Path) -> str:
    return "/".join(quote(part, safe="") for part in p.relative_to(out.resolve()).parts)


def _chosen_step(stopping) -> float | None:
    """The step of the saved image when the stopping rule chose it: where it fired, or its fallback."""
    if not isinstance(stopping, dict) or not stopping:
        return None
    if num(stopping.get("stopped_at")) is not None:
        return num(stopping.get("chosen_step"))
    return fallback_step(stopping)


def _scan_records(out: Path) -> dict[str, dict]:
    """Every result JSON under OUT (``{id: record}``): the "done" markers, also those the manifest lacks."""
    recs = {}
    root = out.resolve()
    for p in sorted(root.rglob("*.json")):
        rel = p.relative_to(root)
        if rel.parts[0] in ("report_files",) or p.name == MANIFEST_NAME or p.name.startswith("."):
            continue
        d = read_json(p)
        if isinstance(d, dict) and isinstance(d.get("job"), dict) and "task" in d:
            recs[rel.with_suffix("").as_posix()] = d
    return recs


class _Redactor:
    """Shortens absolute paths: the inputs' common folder and OUT are cut off; other folders become '…/'."""

    _ABS = re.compile(r"(?<![^\s'\"(\[=,:])/(?:[^\s/'\"]+/)+")

    def __init__(self, out: Path, inputs: list[str]):
        self.out = out.resolve()
        absolute = [os.path.dirname(i) for i in inputs if isinstance(i, str) and os.path.isabs(i)]
        existing = [d for d in absolute if os.path.isdir(d)]  # a stale or odd entry must not widen the root
        absolute = existing or absolute
        root = None
        if absolute:
            try:
                root = os.path.commonpath(absolute)
            except ValueError:
                root = None
        self.root = root if root and root != os.sep else None
        pre = [(str(self.out) + os.sep, "OUT/"), (str(out) + os.sep, "OUT/")]
        if self.root:
            pre.append((self.root.rstrip(os.sep) + os.sep, ""))
        self.prefixes = sorted({p for p in pre if len(p[0]) > 1}, key=lambda p: -len(p[0]))

    def path(self, p) -> str:
        """A path as shown: relative to the inputs' common folder (or just its name)."""
        if not isinstance(p, str) or not p:
            return ""
        if not os.path.isabs(p):
            return self.text(p)
        for pre, rep in self.prefixes:
            if p.startswith(pre):
                return rep + p[len(pre):]
        return os.path.basename(p)

    def text(self, s) -> str:
        if s is None:
            return ""
        s = str(s)
        for pre, rep in self.prefixes:
            s = re.sub(r"(?<![^\s'\"(\[=,:])" + re.escape(pre), rep.replace("\\", r"\\"), s)
        return self._ABS.sub("…/", s)


def collect(out) -> dict:
    """Everything the report shows, from OUT's manifest and result JSONs (no HTML here)."""
    out = Path(out)
    man = read_json(out / MANIFEST_NAME)
    if not isinstance(man, dict) or not isinstance(man.get("images"), dict):
        man = None
    scanned = _scan_records(out)
    images = dict(man["images"]) if man else {}
    for key, rec in scanned.items():  # results the manifest does not know (a killed driver, or no manifest)
        if key not in images:
            job = rec.get("job") or {}
            images[key] = {"id": key, "input": rec.get("input"), "status": "done", "seconds": job.get("seconds"),
                           "attempts": job.get("attempts"), "worker": job.get("worker"),
                           "options": {"task": rec.get("task"), "preset": rec.get("preset")},
                           "outputs": {"png": key + ".png", "json": key + ".json"}}
    red = _Redactor(out, [r.get("input") for r in images.values() if isinstance(r, dict)]
                    + [r.get("input") for r in scanned.values()])
    rows = []
    last_run = len((man or {}).get("runs", []))
    for key in sorted(images, key=lambda k: _order(images[k], k)):
        m = images[key] if isinstance(images[key], dict) else {}
        outputs = m.get("outputs") if isinstance(m.get("outputs"), dict) else {}
        status = str(m.get("status") or "unknown")
        rec = None
        js = _inside(out, outputs.get("json")) or _inside(out, f"{key}.json")
        if status == "done" and js is not None:
            rec = scanned.get(js.relative_to(out.resolve()).with_suffix("").as_posix()) or read_json(js)
        rec = rec if isinstance(rec, dict) else {}
        png = _inside(out, outputs.get("png")) if status == "done" else None
        if status == "done" and png is None:
            png = _inside(out, f"{key}.png")
        opts = m.get("options") if isinstance(m.get("options"), dict) else {}
        stopping = rec.get("stopping") if isinstance(rec.get("stopping"), dict) else None
        metrics = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}
        seconds = num(m.get("seconds")) if status == "done" else None
        if status == "done" and seconds is None:
            seconds = num(rec.get("seconds"))
        worker = m.get("worker") if isinstance(m.get("worker"), dict) else {}
        inp = m.get("input") if isinstance(m.get("input"), str) else rec.get("input")
        ref = m.get("reference") if isinstance(m.get("reference"), str) else None
        error = red.text(m.get("error")) or ""
        skipped = m.get("skipped") if isinstance(m.get("skipped"), dict) else None
        if skipped and skipped.get("run") == last_run:  # the last run left it as it is: other options
            error = red.text(skipped.get("error")) or "skipped"
        rows.append({
            "id": key, "name": red.text(key), "status": status, "error": error,
            "skipped_now": bool(skipped and skipped.get("run") == last_run),
            "task": rec.get("task") or opts.get("task") or "", "preset": rec.get("preset") or opts.get("preset") or "",
            "steps": num(rec.get("steps")) if rec else None,
            "max_steps": num(opts.get("steps")),
            "stop_reason": rec.get("stop_reason") or "",
            # the auto-stop step only when the rule fired or its fallback chose the image at the cap (else the
            # fit ran to its cap and kept the last image)
            "chosen_step": _chosen_step(stopping),
            "stop_rule": str(stopping.get("reason") or "") if stopping else "",
            "stopping": stopping, "seconds": seconds,
            "psnr": num(metrics.get("psnr")), "ssim": num(metrics.get("ssim")),
            "attempts": num(m.get("attempts")), "device": rec.get("device") or worker.get("device") or "",
            "host": worker.get("host") or "",
            "input": inp if isinstance(inp, str) else None, "input_shown": red.path(inp),
            "reference": ref, "reference_shown": red.path(ref),
            "worker": (worker.get("host"), worker.get("pid")) if worker.get("pid") else None,
            "output": png, "output_url": _rel_url(out, png) if png else None,
            "output_shown": png.relative_to(out.resolve()).as_posix() if png else "",
            "record": rec,
        })
    runs = [r for r in (man or {}).get("runs", []) if isinstance(r, dict)]
    return {"out": out, "manifest": man is not None, "updated": (man or {}).get("updated"), "runs": runs,
            "rows": rows, "redactor": red}


_STATUS_RANK = {"done": 0, "skipped": 1, "failed": 2, "running": 3, "pending": 4}


def _order(m, key) -> tuple:
    """Rows by status (done first, then skipped, failed, unfinished), then by id in natural order
    (row9 before row10)."""
    status = m.get("status") if isinstance(m, dict) else None
    natural = [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(key))]
    return _STATUS_RANK.get(status, 5), [(0, t) if isinstance(t, int) else (1, t) for t in natural]


def summarize(data: dict) -> dict:
    rows, runs = data["rows"], data["runs"]
    counts = Counter(r["status"] for r in rows)
    counts["skipped"] += sum(1 for r in rows if r.get("skipped_now"))
    secs = [r["seconds"] for r in rows if r["status"] == "done" and r["seconds"] is not None]
    wall = sum(num(r.get("seconds")) or 0.0 for r in runs)
    fitted_runs = [r for r in runs if isinstance(r.get("counts"), dict) and (num(r["counts"].get("fitted")) or 0) > 0
                   and num(r.get("seconds"))]
    if fitted_runs:
        n = sum(r["counts"]["fitted"] for r in fitted_runs)
        rate = n / sum(r["seconds"] for r in fitted_runs) * 3600
    elif wall > 0 and counts["done"]:
        rate = counts["done"] / wall * 3600
    else:
        rate = None
    # devices by the workers that fitted (one worker fits many images): {device: number of workers}
    workers = {(r["device"], r["worker"]) for r in rows if r["status"] == "done" and r["device"] and r["worker"]}
    devices = Counter(d for d, _w in workers) or Counter({r["device"]: 0 for r in rows if r["device"]})
    hosts = sorted({r["host"] for r in rows if r["host"]})
    work = [num((r["record"].get("work") or {}).get("gflop")) for r in rows if r["status"] == "done"]
    work = [w for w in work if w is not None]
    last = runs[-1] if runs else {}
    return {"counts": counts, "gflop": sum(work) if work else None, "gflop_mean": sum(work) / len(work) if work else None, "total": len(rows), "wall": wall if runs else None, "runs": len(runs),
            "mean": statistics.fmean(secs) if secs else None, "median": statistics.median(secs) if secs else None,
            "fit_sum": sum(secs) if secs else None, "rate": rate, "devices": devices, "hosts": hosts,
            "run_devices": sorted({str(r.get("device")) for r in runs if r.get("device")}),
            "actors": last.get("actors"), "last_status": last.get("status"), "last_finished": last.get("finished"),
            "occupancy": num(last.get("batch_occupancy"))}



def build(out_dir, announce: bool = True) -> Path:
    """Write OUT/report.html (atomically) from the manifest and the results; return its path."""
    out = Path(out_dir)
    data = collect(out)
    text = render(data, summarize(data))
    path = out / REPORT_NAME
    from pipeline.io import write_bytes
    write_bytes(path, text.encode("utf-8"))
    if announce:
        log.info("report: %s", path)
    return path


def main(out) -> int:
    """``dip report OUT``: rebuild OUT/report.html; exit 2 when OUT has no manifest and no results."""
    out = Path(out)
    if not out.is_dir():
        print(f"dip: error: {out}: no such directory", file=sys.stderr)
        return 2
    if not (out / MANIFEST_NAME).is_file() and not _scan_records(out):
        print(f"dip: error: {out} has no job manifest ({MANIFEST_NAME}) and no results: nothing to report",
              file=sys.stderr)
        return 2
    try:
        path = build(out, announce=False)
    except OSError as e:
        print(f"dip: error: cannot write the report: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
