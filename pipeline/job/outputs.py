"""The job's outputs: what an actor sent back for one image, written under OUT by the driver.

An image fitted as tiles (a large scan, or an ensemble) keeps each finished tile in its
:func:`tile_store` under OUT/.tiles/ while the others are fitted; the next run of the same job merges the
kept tiles instead of fitting them again (pipeline.fit: resume), and the folder is removed once the
image's result is written.

Per image the driver writes ``<stem>.png``, then ``<stem>.onnx`` (or a tiled image's one model per tile and
its ``<stem>.tiles.json``), then ``<stem>.json`` last, each atomically (temporary file + rename, with the
umask's mode: pipeline.io.atomic_path); the JSON is the "done" marker and carries the job hash. When OUT
cannot be written because it is full, over quota or read-only, the job stops at once (every further image
would fail the same way after its fit): :class:`OutOfSpace`.
"""
from __future__ import annotations

import errno
from pathlib import Path

from pipeline.io import write_bytes, write_json

NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class OutOfSpace(Exception):
    """OUT cannot take more files (full, over quota, read-only): the job cannot go on."""


def write_result(dest: Path, ev: dict, job: dict) -> dict:
    """Write one image's files (``dest`` = OUT/<id>, without suffix) from a ``done`` event: the PNG, its ONNX
    file(s), and the JSON record with ``job`` under "job", last. Returns that record. Raises OSError."""
    write_bytes(dest.with_name(dest.name + ".png"), ev["png"])
    if ev.get("onnx") is not None:
        write_bytes(dest.with_name(dest.name + ".onnx"), ev["onnx"])
    for name, data in (ev.get("onnx_files") or {}).items():  # a tiled image: its layout file last
        write_bytes(dest.with_name(name), data)
    record = dict(ev["record"])
    record["job"] = dict(job)
    if ev.get("onnx_error"):
        record["job"]["onnx_error"] = ev["onnx_error"]
    write_json(dest.with_name(dest.name + ".json"), record)  # last: the "done" marker
    return record


def tile_store(out: Path, key: str):
    """The :class:`pipeline.tiling.TileStore` of image ``key`` under OUT/.tiles/, named by a hash of its id (an
    id may hold slashes). One folder per image: each tile's own key (pipeline.tiling.tile_key) tells a tile
    of this input and config from one left by a run with other options, and the folder goes when the
    image's result is written."""
    import hashlib
    from pipeline.tiling import TileStore
    return TileStore(Path(out) / ".tiles" / hashlib.sha256(key.encode()).hexdigest()[:24])
