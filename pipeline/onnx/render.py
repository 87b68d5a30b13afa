"""`dip render`: re-render restored images from their ONNX files with onnxruntime.

    dip render OUT/scan.onnx                  -> OUT/scan.render.png
    dip render OUT/scan.onnx -o again.png     -> again.png
    dip render OUT/                           -> every OUT/**/<stem>.onnx -> beside it, <stem>.render.png
    dip render OUT/ -o RENDERS/               -> RENDERS/<relative dir>/<stem>.render.png

The job's own ``<stem>.png`` is never overwritten by default: renders are written as ``<stem>.render.png``
(an explicit ``-o FILE.png`` for one model writes exactly there). The PNG has the layout and bit depth
recorded in the model (grey/RGB, 8/16 bit, with the alpha plane the file carries for RGBA inputs).

Providers: ``auto`` tries TensorRT, then CUDA, then the CPU, and uses the first whose session really
runs on it (onnxruntime silently falls back to the CPU when a GPU provider cannot load, so the session's
``get_providers()[0]`` is checked). An explicit ``--provider cuda`` / ``tensorrt`` that onnxruntime cannot
use is an error. Exit codes: 0 all rendered, 1 some model failed (each gets a one-line error naming the
file; the others still render), 2 bad usage.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("dip.render")

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")


class RenderError(ValueError):
    """A model that cannot be rendered. ``str(e)`` is '<path>: <reason>'."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


_preloaded = False


def _quiet_ort(verbose: bool):
    import onnxruntime as ort
    ort.set_default_logger_severity(0 if verbose else 4)


def _preload_gpu_libs() -> None:
    """Let onnxruntime find CUDA/cuDNN from the nvidia pip packages (as torch ships them), if any."""
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    import onnxruntime as ort
    if hasattr(ort, "preload_dlls"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001
                pass
        if buf.getvalue().strip():
            log.debug("onnxruntime.preload_dlls: %s", buf.getvalue().strip().replace("\n", "; "))


def make_session(model_bytes: bytes, provider: str = "auto", verbose: bool | None = None, threads: int = 0):
    """An InferenceSession on the provider asked for (``auto``: the best that works). Returns (session, name).

    Raises RuntimeError when an explicitly named provider is not what the session runs on.
    """
    import onnxruntime as ort
    if provider not in ("auto",) + tuple(PROVIDERS):
        raise ValueError(f"unknown provider {provider!r}; choose auto, tensorrt, cuda or cpu")
    verbose = log.isEnabledFor(logging.DEBUG) if verbose is None else verbose
    _quiet_ort(verbose)
    available = set(ort.get_available_providers())
    order = AUTO_ORDER if provider == "auto" else (provider,)
    errors = []
    for name in order:
        want = PROVIDERS[name]
        if want not in available:
            errors.append(f"{name}: not in this onnxruntime build ({', '.join(sorted(available))})")
            continue
        if name != "cpu":
            _preload_gpu_libs()
        so = ort.SessionOptions()
        so.log_severity_level = 0 if verbose else 4
        if threads:
            so.intra_op_num_threads = threads
        providers = [want] if name == "cpu" else [want, "CPUExecutionProvider"]
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                sess = ort.InferenceSession(model_bytes, so, providers=providers)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            errors.append(f"{name}: {first}")
            continue
        finally:
            if verbose and buf.getvalue().strip():
                log.debug("onnxruntime: %s", buf.getvalue().strip())
        used = sess.get_providers()[0]
        if used != want:
            errors.append(f"{name}: onnxruntime could not load {want} on this machine (it fell back to {used})")
            continue
        return sess, used
    if provider == "auto":
        raise RuntimeError("no onnxruntime provider works: " + "; ".join(errors))
    raise RuntimeError(f"--provider {provider} cannot be used: " + "; ".join(errors)
                       + (" (run dip -v render ... for onnxruntime's own log)" if not verbose else ""))


def load_model(path):
    """Read and check a dip ONNX file. Returns (model bytes, metadata dict). Raises RenderError."""
    import onnx
    from pipeline.onnx.export import FORMAT, FORMAT_VERSION
    path = Path(path)
    if not path.is_file():
        raise RenderError(path, "no such file")
    data = path.read_bytes()
    if not data:
        raise RenderError(path, "the file is empty (0 bytes)")
    try:
        model = onnx.load_from_string(data)
    except Exception as e:  # noqa: BLE001 (DecodeError and friends)
        raise RenderError(path, f"not an ONNX file, or truncated/corrupt ({type(e).__name__})") from None
    if not model.graph.node and not model.metadata_props:
        raise RenderError(path, "not an ONNX model (empty graph)")
    meta = {e.key: e.value for e in model.metadata_props}
    if meta.get("dip_format") != FORMAT:
        raise RenderError(path, "not made by dip (no dip_format metadata); dip render only renders dip's own exports")
    try:
        ver = int(meta.get("dip_format_version", ""))
    except ValueError:
        raise RenderError(path, f"bad dip_format_version {meta.get('dip_format_version')!r}") from None
    if ver > FORMAT_VERSION:
        raise RenderError(path, f"written by a newer dip (format version {ver}; this dip reads up to "
                                f"{FORMAT_VERSION}): upgrade dip to render it")
    if ver < 1:
        raise RenderError(path, f"bad dip_format_version {ver}")
    for key in ("bits", "output_size", "channels"):
        if key not in meta:
            raise RenderError(path, f"dip metadata lacks {key!r}")
    return data, meta


def render_model(path, provider: str = "auto"):
    """Render one dip ONNX file. Returns (ImageData, provider used). Raises RenderError / RuntimeError."""
    return render_loaded(path, *load_model(path), provider)


def render_loaded(path, data: bytes, meta: dict, provider: str = "auto"):
    """:func:`render_model` for a file already read and checked by :func:`load_model`."""
    import json
    from pipeline.io import ImageData
    try:
        sess, used = make_session(data, provider)
    except RuntimeError as e:
        if provider != "auto":
            raise RenderError(path, str(e)) from None
        raise RenderError(path, f"onnxruntime cannot load the model: {e}") from None
    outs = [o.name for o in sess.get_outputs()]
    if "image" not in outs:
        raise RenderError(path, "the model has no 'image' output")
    try:
        res = dict(zip(outs, sess.run(None, {})))
    except Exception as e:  # noqa: BLE001
        raise RenderError(path, f"onnxruntime failed to run it on {used}: {str(e).splitlines()[0]}") from None
    img = np.asarray(res["image"], dtype=np.float32)
    if img.ndim == 4:
        img = img[0]
    bits = int(meta["bits"])
    W, H = json.loads(meta["output_size"])
    C = int(meta["channels"])
    if img.shape != (C, H, W):
        raise RenderError(path, f"rendered {img.shape}, but the metadata says {(C, H, W)}")
    pixels = np.ascontiguousarray(np.clip(img.transpose(1, 2, 0), 0.0, 1.0))
    alpha = None
    if "alpha" in res:
        a = np.asarray(res["alpha"])
        alpha = (a.astype(np.float32) / (65535.0 if bits == 16 else 255.0)).reshape(H, W)
    elif meta.get("alpha", "none") != "none":
        raise RenderError(path, "the metadata says there is an alpha plane, but the model has no 'alpha' output")
    return ImageData(pixels, alpha, bits, str(path), source_metadata(path, meta.get("source_metadata"))), used


def source_metadata(path, value: str | None) -> dict:
    """The source's ICC profile, dpi and EXIF as a model or tile layout stores them (``value``), for the
    rendered PNG. Raises RenderError naming ``path`` when they cannot be decoded."""
    from pipeline.io import decode_meta
    try:
        return decode_meta(value)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise RenderError(path, f"bad source_metadata: {e}") from None


def img_note(meta: dict) -> str:
    """A caveat, from a model's metadata (:func:`load_model`), when its render is not the saved image
    (output="ema" with distill_steps=0)."""
    if meta.get("renders_saved_image") == "false":
        return ("this result was fitted with output='ema' and no distillation (--distill-steps 0): its image is "
                "the average of the outputs, which no single network renders; the file holds the last weights, "
                "so this render differs from the job's PNG")
    return ""


def _render_name(m: Path) -> str:
    """<stem>.render.png for <stem>.onnx and for a tiled image's <stem>.tiles.json."""
    stem = m.name[:-len(".tiles.json")] if m.name.endswith(".tiles.json") else m.with_suffix("").name
    return stem + ".render.png"


def _tile_models(layout: Path) -> set[Path]:
    from pipeline.io import read_json
    doc = read_json(layout)
    tiles = doc.get("tiles") if isinstance(doc, dict) else None
    if not isinstance(tiles, list):
        return set()
    return {(layout.parent / t["model"]).resolve() for t in tiles if isinstance(t, dict) and "model" in t}


def _targets(model_arg: Path, out_arg: str | None) -> list[tuple[Path, Path]]:
    if model_arg.is_dir():
        layouts = sorted(p for p in model_arg.rglob("*.tiles.json") if p.is_file())
        parts = set().union(*(_tile_models(p) for p in layouts)) if layouts else set()
        models = sorted([p for p in model_arg.rglob("*.onnx") if p.is_file() and p.resolve() not in parts] + layouts)
        out_root = Path(out_arg) if out_arg else None
        pairs = []
        for m in models:
            name = _render_name(m)
            dest = (out_root / m.parent.relative_to(model_arg) / name) if out_root else m.with_name(name)
            pairs.append((m, dest))
        return pairs
    dest = Path(out_arg) if out_arg else model_arg.with_name(_render_name(model_arg))
    return [(model_arg, dest)]


def main(model: str, output: str | None = None, provider: str = "auto") -> int:
    """`dip render MODEL|DIR [-o OUT] [--provider P]`; returns the exit code."""
    from pipeline.io import ImageError, save_image
    model_arg = Path(model)
    out_arg = output
    provider = provider or "auto"
    if not model_arg.exists():
        print(f"dip: error: {model_arg}: no such file or directory", file=sys.stderr)
        return 2
    if model_arg.is_dir():
        if out_arg and Path(out_arg).suffix.lower() == ".png":
            print(f"dip: error: {model_arg} is a directory: -o must be a directory, not {out_arg}", file=sys.stderr)
            return 2
        if out_arg and Path(out_arg).exists() and not Path(out_arg).is_dir():
            print(f"dip: error: -o {out_arg} exists and is not a directory", file=sys.stderr)
            return 2
    elif out_arg and Path(out_arg).suffix.lower() != ".png":
        print(f"dip: error: -o {out_arg}: the output is written as PNG; name it .png", file=sys.stderr)
        return 2
    pairs = _targets(model_arg, out_arg)
    if not pairs:
        print(f"dip: error: no .onnx files under {model_arg}", file=sys.stderr)
        return 2
    failures = []
    for model, dest in pairs:
        t = time.perf_counter()
        note = ""
        try:
            if model.name.endswith(".tiles.json"):  # a tiled image: one model per tile, blended
                img, used = render_tiled(model, provider), f"{provider} (tiles)"
            else:
                data, meta = load_model(model)  # read once: for the render and for its note
                img, used = render_loaded(model, data, meta, provider)
                note = img_note(meta)
            save_image(dest, img)
        except (RenderError, ImageError, OSError) as e:
            failures.append(str(e))
            print(f"dip: {e}", file=sys.stderr)
            continue
        print(f"{model} -> {dest} ({used}, {time.perf_counter() - t:.2f} s)")
        if note:
            print(f"  note: {note}")
    if failures:
        if len(pairs) > 1:
            print(f"dip: {len(failures)} of {len(pairs)} model(s) failed", file=sys.stderr)
        return 1
    return 0


# ---- a tiled image (or an ensemble): its layout file ----------------------------------------------------
def is_layout(path) -> bool:
    return str(path).endswith(".tiles.json")


def render_tiled(layout_path, provider: str = "auto"):
    """Render a tiled image (an ImageData) from ``<stem>.tiles.json``: each tile's model (this module's session code),
    copied tiles from their PNGs, blended with the layout's weights; alpha from the alpha PNG.
    Raises RenderError naming the file."""
    import json
    from pipeline.io import ImageData, ImageError, load_image
    from pipeline.tiling import LAYOUT_FORMAT, LAYOUT_VERSION, Tile
    layout_path = Path(layout_path)
    try:
        doc = json.loads(layout_path.read_text())
    except (OSError, ValueError) as e:
        raise RenderError(layout_path, f"unreadable tile layout: {e}") from None
    if not isinstance(doc, dict) or doc.get("dip_format") != LAYOUT_FORMAT:
        raise RenderError(layout_path, "not a dip tile layout (no dip_format 'dip-tiles')")
    if int(doc.get("dip_format_version", 0)) > LAYOUT_VERSION:
        raise RenderError(layout_path, f"written by a newer dip (tile layout version {doc['dip_format_version']})")
    W, H = doc["output_size"]
    C, bits, f = int(doc["channels"]), int(doc["bits"]), int(doc["factor"])
    acc = np.zeros((H, W, C), np.float32)
    wsum = np.zeros((H, W), np.float32)
    base = layout_path.parent
    for e in doc["tiles"]:
        t = Tile.from_dict(e, f)
        if "model" in e:
            img, _used = render_model(base / e["model"], provider)
        elif "image" in e:
            try:
                img = load_image(base / e["image"])
            except ImageError as err:
                raise RenderError(base / e["image"], err.reason) from None
        else:
            raise RenderError(layout_path, f"tile {t.index} names neither a model nor an image")
        Y0, X0, Y1, X1 = t.out_box
        if img.shape != (Y1 - Y0, X1 - X0) or img.channels != C:
            raise RenderError(layout_path, f"tile {t.index} rendered {img.shape[1]}x{img.shape[0]}x{img.channels}, "
                                           f"the layout says {X1 - X0}x{Y1 - Y0}x{C}")
        wt = t.weights()
        acc[Y0:Y1, X0:X1] += img.pixels * wt[:, :, None]
        wsum[Y0:Y1, X0:X1] += wt
    if not (wsum > 0).all():
        raise RenderError(layout_path, "the tiles do not cover the image")
    alpha = None
    if doc.get("alpha"):
        try:
            a = load_image(base / doc["alpha"])
        except ImageError as err:
            raise RenderError(base / doc["alpha"], err.reason) from None
        alpha = a.pixels[:, :, 0]
    return ImageData(np.clip(acc / wsum[:, :, None], 0.0, 1.0), alpha, bits, str(layout_path),
                     source_metadata(layout_path, doc.get("source_metadata")))
