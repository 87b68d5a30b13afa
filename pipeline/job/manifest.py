"""Inputs and the job manifest of `dip restore`.

Inputs
------
``discover()`` turns the command line's INPUTs into :class:`Input` s (an input file, its mask and
reference, its row's options and its output id):

* an image file -> one item, written to ``OUT/<stem>.png``;
* a directory -> every image file below it (recursive, filtered by ``--glob``), written to
  ``OUT/<path relative to the directory>.png``. Files named ``<stem>_mask.<ext>`` are masks, not inputs:
  for ``--task inpaint`` such a file beside ``<stem>.<ext>`` is that image's mask. Anything under ``--out``
  itself is ignored, so ``dip restore photos --out photos/restored`` can run twice;
* a manifest, ``*.csv`` (with a header row) or ``*.jsonl`` (one JSON object per line). Each row has an
  ``input`` and optionally ``mask``, ``reference``, ``out`` (the output path relative to --out, default:
  the input's path relative to the manifest's folder, or its stem) and the options ``task``, ``preset``,
  ``steps``, ``seed``, ``scale``. Relative paths are relative to the manifest's folder. An empty CSV cell
  means "not given". Rows are parsed as text / JSON only: nothing in a user file is ever evaluated or
  unpickled.

A bad row (unknown column, bad value, an output path that would escape --out, a duplicate output path)
becomes a failed item with a one-line error; the other rows go on.

The job manifest: OUT/dip-manifest.json
---------------------------------------
One JSON document, rewritten atomically (temporary file + rename) at most about once a second while a
job runs, and always at its end (also on Ctrl-C)::

    {
      "format": "dip-manifest/1",
      "updated": "2025-01-01T12:00:00.123+00:00",
      "runs": [{"run": 1, "started": ..., "finished": ..., "argv": [...], "options": {...JobOptions},
                "status": "finished" | "interrupted" | "out of space" | "failed" | "running" | "abandoned",
                "signal": "SIGINT" (when a signal stopped it), "error": "..." (when it failed),
                "ray_address": ..., "device": "cpu" | "cuda", "actors": 2,
                "counts": {"done": 5, "failed": 1, "skipped": 0, "pending": 0, "running": 0}}, ...],
      "images": {
        "<id>": {                       # id = the output path relative to OUT, without suffix
          "id": "sub/a", "input": "/abs/in/sub/a.png", "mask": null, "reference": null,
          "options": {"task": "denoise", "preset": "fast", "steps": 10, "seed": 0, "scale": null},
          "status": "pending" | "running" | "done" | "failed" | "skipped",
          "error": null | "one line",
          "attempts": 1,                # how many times an actor started fitting it
          "started": iso-8601 | null, "finished": iso-8601 | null, "seconds": 12.3,
          "input_sha256": "...", "options_sha256": "...", "hash": "...",
          "outputs": {"png": "sub/a.png", "json": "sub/a.json", "onnx": "sub/a.onnx" | null},
          "worker": {"node": "...", "host": "...", "pid": 1234, "device": "cpu", "threads": 1, "nice": 0},
          "failures": 0,                # failed tries of this run (worker died / fit raised), <= --max-retries
          "requeued": 0,                # times it went back to the queue in this run
          "run": 1                      # the run that last changed this record
        }, ...
      }
    }

``hash`` = sha256 of the canonical JSON (sorted keys, no spaces) of ``{"input_sha256", "mask_sha256",
"reference_sha256", "config"}``, where ``config`` is the full FitConfig of the fit (task, preset, net,
steps, seed, ...). ``options_sha256`` is the same without the file hashes. Each result's ``<stem>.json``
carries the same fields under ``"job"``; it is written last, so it is the "done" marker: when the manifest
lost a record (the driver was killed between two flushes), the next run rebuilds it from that JSON.

Statuses: ``done`` (outputs written; kept, with their timestamps, by later runs whose hash matches),
``failed`` (error says why; a later run tries again), ``pending`` / ``running`` (not finished when the
manifest was written; a killed or interrupted run leaves these, and the next run redoes them; ``running``
means an actor has started fitting it, and ``attempts`` counts those starts). An image whose output was
made with *other* options, in a run without --overwrite, keeps the record of what is on disk (``done``,
its hash and times) and gets ``"skipped": {"run", "error", "hash", "options_sha256", "options"}``: the run
that refused to replace it, and the options it was asked for. A run still ``running`` when the next one
starts (its driver was killed) is marked ``abandoned``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("dip.job")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
MANIFEST_SUFFIXES = {".csv", ".jsonl"}
MANIFEST_NAME = "dip-manifest.json"
FORMAT = "dip-manifest/1"
ROW_OPTIONS = ("task", "preset", "steps", "seed", "scale")
ROW_COLUMNS = ("input", "mask", "reference", "out") + ROW_OPTIONS


class UsageError(ValueError):
    """Bad usage for the whole job (exit code 2)."""


@dataclass
class Input:
    id: str  # output path relative to OUT, posix, without suffix
    input: str
    mask: str | None = None
    reference: str | None = None
    options: dict = field(default_factory=dict)  # per-row task/preset/steps/seed/scale
    error: str | None = None  # a row error: the item fails without being fitted


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def one_line(e: BaseException) -> str:
    """An exception as one line for a message or a manifest record (at most 600 characters)."""
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) < 600 else s[:597] + "..."


# ---- inputs ----------------------------------------------------------------------------------------
def safe_rel(out: Path, rel) -> str:
    """``rel`` as a posix path inside ``out``; ValueError if it would escape it."""
    rel = Path(rel)
    if rel.is_absolute() or not str(rel) or str(rel) == ".":
        raise ValueError(f"output path {str(rel)!r} must be relative to --out")
    root = out.resolve()
    dest = (root / rel).resolve()
    if root not in dest.parents:
        raise ValueError(f"output path {str(rel)!r} would escape --out ({out})")
    return dest.relative_to(root).as_posix()


def _is_mask_name(f: Path) -> bool:
    return f.stem.endswith("_mask")


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def discover(inputs: list[str], out: Path, pattern: str = "*", task: str = "denoise") -> list[Input]:
    """Expand files, directories and manifests into work items (see the module docstring)."""
    items: list[Input] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob(pattern)):
                if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES or _is_mask_name(f) or _under(f, out):
                    continue
                it = Input(id="", input=str(f.resolve()))
                if task == "inpaint":
                    masks = sorted(f.parent.glob(f"{f.stem}_mask.*"))
                    if masks:
                        it.mask = str(masks[0].resolve())
                _set_id(it, out, f.relative_to(p).with_suffix(""))
                items.append(it)
        elif p.suffix.lower() in MANIFEST_SUFFIXES:
            items.extend(read_manifest(p, out))
        elif p.exists() or p.suffix.lower() in IMAGE_SUFFIXES:
            it = Input(id="", input=str(p.resolve()))
            _set_id(it, out, Path(p.stem))
            items.append(it)
        else:
            raise UsageError(f"{raw}: no such file or directory")
    seen: dict[str, str] = {}
    for it in items:
        if it.error or not it.id:
            continue
        if it.id in seen:  # it fails under an id of its own: the first one's record is not touched
            it.error = f"{it.input}: output {it.id}.png is also the output of {seen[it.id]}"
            it.id = ""
        else:
            seen[it.id] = it.input
    for i, it in enumerate(items):  # failed rows still need a unique record id
        if not it.id:
            it.id = f"!row{i}:{it.input}"
    return items


def _set_id(it: Input, out: Path, rel) -> None:
    try:
        it.id = safe_rel(out, rel)
    except ValueError as e:
        it.error = f"{it.input}: {e}"


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read the manifest: {e}") from None
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "input" not in [c.strip() for c in reader.fieldnames]:
            raise UsageError(f"{path}: a CSV manifest needs a header row with an 'input' column")
        for n, row in enumerate(reader, start=2):
            rows.append((n, {(k or "").strip(): (v.strip() if isinstance(v, str) else v)
                             for k, v in row.items() if v not in (None, "")}))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((n, {"!error": f"not valid JSON ({e.msg})"}))
                continue
            if not isinstance(obj, dict):
                rows.append((n, {"!error": "a row must be a JSON object"}))
                continue
            rows.append((n, {k: v for k, v in obj.items() if v is not None}))
    return rows


def read_manifest(path: Path, out: Path) -> list[Input]:
    base = path.resolve().parent
    items = []
    for n, row in _read_rows(path):
        where = f"{path}:{n}"
        it = Input(id="", input=where)
        items.append(it)
        if "!error" in row:
            it.error = f"{where}: {row['!error']}"
            continue
        unknown = sorted(set(row) - set(ROW_COLUMNS))
        if unknown:
            it.error = f"{where}: unknown column(s) {', '.join(unknown)} (known: {', '.join(ROW_COLUMNS)})"
            continue
        if not isinstance(row.get("input"), str) or not row["input"]:
            it.error = f"{where}: the row has no 'input'"
            continue
        try:
            it.input = str(_resolve(base, row["input"]))
            for k in ("mask", "reference"):
                if row.get(k):
                    setattr(it, k, str(_resolve(base, row[k])))
            it.options = _row_options(row)
        except ValueError as e:
            it.error = f"{where}: {e}"
            continue
        if row.get("out"):
            rel = Path(str(row["out"]))
            rel = rel.with_suffix("") if rel.suffix.lower() in IMAGE_SUFFIXES | {".json"} else rel
        else:
            inp = Path(it.input)
            rel = inp.relative_to(base).with_suffix("") if _under(inp, base) else Path(inp.stem)
        _set_id(it, out, rel)
        if it.error:
            it.error = f"{where}: {it.error}"
    return items


def _resolve(base: Path, p) -> Path:
    if not isinstance(p, str):
        raise ValueError(f"paths must be strings, not {type(p).__name__}")
    q = Path(p).expanduser()
    return (q if q.is_absolute() else base / q).resolve()


def _row_options(row: dict) -> dict:
    from pipeline.config import TASKS
    o = {}
    for k in ("steps", "seed", "scale"):
        if k in row:
            v = row[k]
            try:
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise ValueError
                o[k] = int(v)
            except (TypeError, ValueError):
                raise ValueError(f"{k} must be an integer, not {v!r}") from None
    if "steps" in o and o["steps"] < 1:
        raise ValueError("steps must be at least 1")
    if "task" in row:
        if row["task"] not in TASKS:
            raise ValueError(f"unknown task {row['task']!r} (choose from {', '.join(TASKS)})")
        o["task"] = row["task"]
    if "preset" in row:
        o["preset"] = str(row["preset"])
    return o


# ---- the job manifest ------------------------------------------------------------------------------
class JobManifest:
    """OUT/dip-manifest.json: see the module docstring. Only the driver writes it."""

    def __init__(self, out: Path, min_interval: float = 1.0):
        self.out = Path(out)
        self.path = self.out / MANIFEST_NAME
        self.min_interval = min_interval
        self.data = {"format": FORMAT, "updated": None, "runs": [], "images": {}}
        self._dirty = False
        self._last = 0.0
        if self.path.exists():
            try:
                d = json.loads(self.path.read_text())
                if not isinstance(d, dict) or not isinstance(d.get("images"), dict):
                    raise ValueError("not a dip manifest")
                self.data.update(d)
            except (OSError, ValueError) as e:
                aside = self.path.with_name(f"{MANIFEST_NAME}.bad-{int(time.time())}")
                log.warning("%s: unreadable (%s); moved aside to %s and starting a new one", self.path, e, aside.name)
                os.replace(self.path, aside)

    @property
    def images(self) -> dict:
        return self.data["images"]

    def start_run(self, **info) -> dict:
        """A new run's record. A run still marked "running" ended without a word (killed, or its machine
        lost): the job's lock, which this run holds, says it is not running now, so it is "abandoned"."""
        for r in self.data["runs"]:
            if r.get("status") == "running":
                r["status"] = "abandoned"
        run = {"run": len(self.data["runs"]) + 1, "started": now_iso(), "finished": None, "status": "running", **info}
        self.data["runs"].append(run)
        self._dirty = True
        return run

    @property
    def run_no(self) -> int:
        return len(self.data["runs"])

    def get(self, key: str) -> dict | None:
        return self.images.get(key)

    def put(self, key: str, rec: dict) -> dict:
        self.images[key] = rec
        self._dirty = True
        return rec

    def update(self, key: str, **fields) -> dict:
        rec = self.images.setdefault(key, {"id": key})
        rec.update(fields)
        rec["run"] = self.run_no
        self._dirty = True
        return rec

    def flush(self, force: bool = False) -> None:
        if not self._dirty and not force:
            return
        t = time.monotonic()
        if not force and t - self._last < self.min_interval:
            return
        from pipeline.io import write_json
        self.data["updated"] = now_iso()
        write_json(self.path, self.data)
        self._last = t
        self._dirty = False
