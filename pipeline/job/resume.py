"""Nothing lost, nothing done twice: what an input needs in this run, and the records that say so.

Per image the job hashes the input, mask and reference bytes and the full config (plus the tiling
options when given): the *job hash*. An image whose ``<stem>.json`` (the "done" marker, written last)
carries the same hash is done, and its manifest record and timestamps are kept. An existing result with
another hash is not overwritten unless ``--overwrite``: the image is skipped with the error "exists with
different options". Everything else is decoded (pipeline.problem.make_problem) and becomes an
:class:`Entry` for the driver to fit. See pipeline.job.manifest for the manifest's format.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import file_sha256, read_json
from pipeline.job.manifest import Input, JobManifest, canonical_json, now_iso, one_line, sha256_text
from pipeline.job.options import JobOptions
from pipeline.problem import make_problem

log = logging.getLogger("dip.job")


@dataclass
class Entry:
    """One image while the job fits it: its input, its job hash, its decoded problem, its failed tries."""

    input: Input
    hash: str = ""
    problem: object = None
    failures: list = field(default_factory=list)  # errors of calls that had started fitting it
    lost: int = 0  # calls that failed before its fit started (the actor was restarting): not charged
    fitting: bool = False  # its fit has started in the call it is in (the actor said so)
    tile_warned: bool = False  # keeping its finished tiles failed once (said once)


@dataclass
class Outcome:
    """An input that needs no fit in this run: ``done`` (before, with the same hash), ``failed`` (a bad input
    or row) or ``skipped`` (a result with other options is there); ``message`` for the user, if any."""

    status: str
    message: str | None = None


def outputs(key: str, onnx: bool) -> dict:
    return {"png": key + ".png", "json": key + ".json", "onnx": key + ".onnx" if onnx else None}


def job_hash(it: Input, cfg, opts: JobOptions) -> tuple[str, str, str | None]:
    """(job hash, options hash, input sha256) of one image: see the module docstring."""
    shas = {"input_sha256": file_sha256(it.input) if Path(it.input).is_file() else None,
            "mask_sha256": file_sha256(it.mask) if it.mask and Path(it.mask).is_file() else None,
            "reference_sha256": file_sha256(it.reference) if it.reference and Path(it.reference).is_file()
            else None}
    conf = cfg.identity_dict()
    tiling = opts.tiling
    h = sha256_text(canonical_json({**shas, "config": conf, **({"tiling": tiling} if tiling else {})}))
    return h, sha256_text(canonical_json(conf)), shas["input_sha256"]


def prepare(it: Input, opts: JobOptions, manifest: JobManifest, device: str, out: Path) -> Entry | Outcome:
    """Hash, skip-check and decode one input, recording it in the manifest: an :class:`Entry` to fit, or
    the :class:`Outcome` of an input that needs no fit."""
    if it.error:
        manifest.update(it.id, input=it.input)
        return _failed(manifest, it.id, it.error)
    # --mask / --reference on the command line apply to every input that its manifest row (or a
    # <stem>_mask file beside it) does not give one for
    if it.mask is None and opts.mask:
        it.mask = str(Path(opts.mask).resolve())
    if it.reference is None and opts.reference:
        it.reference = str(Path(opts.reference).resolve())
    prev = dict(manifest.get(it.id) or {})
    rec = {"input": it.input, "mask": it.mask, "reference": it.reference, "options": opts.row_options(it.options)}
    try:
        cfg = opts.config_for(device, it.options)
        h, options_sha, input_sha = job_hash(it, cfg, opts)
        rec.update(input_sha256=input_sha, options_sha256=options_sha, hash=h,
                   options={**rec["options"], "task": cfg.task, "preset": cfg.preset, "steps": cfg.steps,
                            "seed": cfg.seed})
        done = _done_before(it, opts, manifest, out, prev, rec, h, cfg)
        if done is not None:
            return done
        manifest.update(it.id, **rec)
        p = make_problem(it.input, task=cfg.task, mask=it.mask, reference=it.reference, seed=cfg.seed, cfg=cfg)
    except Exception as e:  # noqa: BLE001  (ImageError, ValueError, OSError, ...: one line, and go on)
        msg = one_line(e)
        manifest.update(it.id, **rec)
        return _failed(manifest, it.id, msg if it.input in msg else f"{it.input}: {msg}")
    attempts = prev.get("attempts", 0) if prev.get("hash") == h else 0
    manifest.update(it.id, status="pending", error=None, failures=0, requeued=0, attempts=attempts,
                    started=None, finished=None)
    return Entry(input=it, hash=h, problem=p)


def _stop_rule_changed(old: dict, cfg) -> bool:
    """Whether a result's recorded auto-stop rule (``stop_rule``, recorded since stop 29) is not the rule
    this dip fits ``cfg`` with. The rule follows from the config and the code's defaults
    (pipeline.stopping), so the job hash does not see it change; results without the record count as
    made with it (as before). Only asked when the job hash matches, so auto-stop is on for both."""
    if not isinstance(old, dict) or not isinstance(old.get("stop_rule"), dict):
        return False
    from pipeline.stopping import StopConfig, stop_config_for
    now = stop_config_for(cfg).to_dict()
    neutral = StopConfig().to_dict()  # a field added since (e.g. floor, stop 32) was at its neutral default
    return {**{k: neutral[k] for k in now if k not in old["stop_rule"] and k in neutral}, **old["stop_rule"]} != now


def _done_before(it: Input, opts: JobOptions, manifest: JobManifest, out: Path, prev: dict, rec: dict,
                 h: str, cfg) -> Outcome | None:
    """The outcome when OUT already has this image's result (done, or skipped: other options); None when
    it is to be fitted (no result, --overwrite, or done without the ONNX this run asks for)."""
    dest = out / it.id
    js, png = dest.with_name(dest.name + ".json"), dest.with_name(dest.name + ".png")
    if not (js.exists() and png.exists()) or opts.overwrite:
        return None
    old = read_json(js)
    old_job = old.get("job") if isinstance(old, dict) and isinstance(old.get("job"), dict) else {}
    rule_changed = old_job.get("hash") == h and _stop_rule_changed(old, cfg)
    if old_job.get("hash") != h or rule_changed:
        # the record stays that of the result on disk; this run's refusal is noted beside it
        why = ("its auto-stop rule changed since it was made" if rule_changed
               else "input or config changed since it was made")
        err = (f"{png}: exists with different options ({why}); pass "
               f"--overwrite to replace it, or use another --out")
        made_with = old.get("preset") if isinstance(old, dict) else None
        if made_with and made_with != (rec.get("options") or {}).get("preset"):
            # e.g. a CPU job begun before its default preset changed (fast -> denoise-lite)
            err += f"; it was made with the {made_with!r} preset: --preset {made_with} goes on with it"
        on_disk = prev if prev.get("hash") == old_job.get("hash") and prev.get("status") == "done" else {
            "id": it.id, "input": it.input, "status": "done", "error": None,
            **{k: old_job.get(k) for k in ("hash", "options_sha256", "input_sha256", "started", "finished",
                                           "seconds", "attempts", "worker", "run")},
            "outputs": outputs(it.id, dest.with_name(dest.name + ".onnx").exists())}
        manifest.put(it.id, {**on_disk, "skipped": {"run": manifest.run_no, "error": err, "hash": h,
                                                    "options_sha256": rec.get("options_sha256"),
                                                    "options": rec.get("options")}})
        return Outcome("skipped", f"dip: skipped: {err}")
    has_onnx = dest.with_name(dest.name + ".onnx").exists()
    # done with the same hash, but without the ONNX this run asks for (an earlier run had
    # --no-export-onnx, or the file was removed): fit it again, since the weights are not kept
    if (opts.export_onnx and not old_job.get("onnx_error")
            and not (has_onnx or dest.with_name(dest.name + ".tiles.json").exists())):
        log.info("%s: done before without its .onnx; fitting it again to export one", png)
        return None
    keep = {k: old_job.get(k) for k in ("started", "finished", "seconds", "attempts", "worker")}
    if prev.get("status") == "done" and prev.get("hash") == h:
        keep = {k: prev.get(k) for k in keep}
    manifest.put(it.id, {**prev, "id": it.id, **rec, **keep, "status": "done", "error": None,
                         "outputs": outputs(it.id, has_onnx),
                         "run": prev.get("run", old_job.get("run", manifest.run_no))})
    return Outcome("done")


def _failed(manifest: JobManifest, key: str, err: str, status: str = "failed") -> Outcome:
    manifest.update(key, status=status, error=err, finished=now_iso())
    return Outcome(status, f"dip: {err}" if status == "failed" else f"dip: skipped: {err}")
