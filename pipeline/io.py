"""Image I/O: the one place images and masks are read and written.

Read: PNG, JPEG, TIFF, BMP, WebP (anything Pillow opens), 8- and 16-bit, grey, grey+alpha, RGB, RGBA.
EXIF orientation is applied. 16-bit colour PNGs go through pypng and 16-bit TIFFs through tifffile,
because Pillow reads both as 8-bit. Palette, bilevel and CMYK images are converted to RGB(A)/grey.

Write: always PNG, in the input's layout (grey/RGB, with alpha if it had one) and bit depth, atomically
(a temporary file in the same folder, then a rename).

Metadata an archive needs is carried from the input to the output (:attr:`ImageData.meta`): the ICC
colour profile (without it a scan in Adobe RGB or ProPhoto would be shown as sRGB, with shifted
colours), the resolution in dots per inch, and the EXIF block (camera, scanner, dates; the orientation
tag is dropped, since the pixels are already turned upright). A profile whose colour space does not
match the output (a CMYK profile on an image converted to RGB) is dropped and the drop is noted.

Every failure raises :class:`ImageError`, whose message names the file and the reason on one line.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import math
import os
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's decompression-bomb guard, set on purpose: images above this many pixels are refused with a
# clear error before they are decoded (Pillow itself only warns up to twice its default of 89 MP).
# Override with the DIP_MAX_PIXELS environment variable.
MAX_PIXELS = int(os.environ.get("DIP_MAX_PIXELS", 150_000_000))
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
MIN_SIDE = 8


class ImageError(ValueError):
    """A bad input file. ``str(e)`` is '<path>: <reason>'."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass
class ImageData:
    pixels: np.ndarray  # (H, W, C) float32 in [0, 1], C = 1 (grey) or 3 (RGB)
    alpha: np.ndarray | None  # (H, W) float32 in [0, 1], passed through unchanged
    bits: int  # 8 or 16
    path: str = ""
    # carried from the source to the output: "icc_profile" (bytes), "dpi" ((x, y) floats), "exif" (bytes),
    # "dropped" (notes on metadata that could not be carried)
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape[0], self.pixels.shape[1]

    @property
    def channels(self) -> int:
        return self.pixels.shape[2]

    @property
    def mode(self) -> str:
        base = "L" if self.channels == 1 else "RGB"
        return base + ("A" if self.alpha is not None else "")


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _png_depth(path) -> tuple[int, int] | None:
    with open(path, "rb") as f:
        head = f.read(29)
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]  # bit depth, colour type


def _from_array(arr: np.ndarray, bits: int, path) -> ImageData:
    scale = 65535.0 if bits == 16 else 255.0
    a = arr.astype(np.float32) / scale
    if a.ndim == 2:
        a = a[:, :, None]
    c = a.shape[2]
    if c == 1:
        return ImageData(a, None, bits, str(path))
    if c == 2:
        return ImageData(a[:, :, :1].copy(), a[:, :, 1].copy(), bits, str(path))
    if c == 3:
        return ImageData(a, None, bits, str(path))
    if c == 4:
        return ImageData(a[:, :, :3].copy(), a[:, :, 3].copy(), bits, str(path))
    raise ImageError(path, f"unsupported channel count {c}")


def _check_size(path, w: int, h: int, max_pixels: int = None) -> None:
    max_pixels = max_pixels or MAX_PIXELS
    if w <= 0 or h <= 0:
        raise ImageError(path, "the image has zero size")
    if w * h > max_pixels:
        raise ImageError(path, f"{w}x{h} = {w * h / 1e6:.0f} megapixels is above the decompression-bomb limit of "
                               f"{max_pixels / 1e6:.0f} MP (set DIP_MAX_PIXELS to raise it)")


def load_image(path) -> ImageData:
    """Read an image file (see the module docstring). Raises :class:`ImageError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "no such file")
    if path.is_dir():
        raise ImageError(path, "is a directory, not an image")
    if path.stat().st_size == 0:
        raise ImageError(path, "the file is empty (0 bytes)")
    data, info = _decode(path)
    data.meta = _carried_meta(info, data.channels)
    return data


def _decode(path: Path) -> tuple[ImageData, dict]:
    """The pixels, and Pillow's ``info`` dict of the file (after EXIF transposition)."""
    try:
        depth = _png_depth(path)
        if depth is not None and depth[0] == 16 and depth[1] in (2, 4, 6):
            import png  # pypng
            r = png.Reader(filename=str(path))
            w, h, rows, info = r.asDirect()
            _check_size(path, w, h)
            planes = info["planes"]
            arr = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(h, w, planes)
            return _from_array(arr, 16, path), _pil_info(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            _check_size(path, *im.size)
            if im.format == "TIFF":
                bps = im.tag_v2.get(258, (8,))
                bps = bps if isinstance(bps, tuple) else (bps,)
                if max(bps) > 8:
                    import tifffile
                    arr = tifffile.imread(str(path))
                    if arr.dtype != np.uint16:
                        raise ImageError(path, f"unsupported TIFF sample type {arr.dtype}")
                    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[2] not in (1, 2, 3, 4):
                        arr = np.moveaxis(arr, 0, -1)
                    return _from_array(arr, 16, path), dict(im.info)
            im.load()
            im = ImageOps.exif_transpose(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (Pillow cannot identify it)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow refuses above twice its limit before dip's own check sees the size: say dip's limit
        import re
        n = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(n.group(1)) / 1e6:.0f} megapixels ({n.group(1)} pixels) is " if n else ""
        raise ImageError(path, f"{size}above the decompression-bomb limit of {MAX_PIXELS / 1e6:.0f} MP "
                               f"(set DIP_MAX_PIXELS to raise it)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(path, f"unreadable image: {e}") from None
    info = dict(im.info)
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return _from_array(np.asarray(im, dtype=np.uint16), 16, path), info
    if mode == "I":
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageError(path, "32-bit integer image with values outside 0..65535")
        return _from_array(arr.astype(np.uint16), 16, path), info
    if mode == "F":
        raise ImageError(path, "floating-point images are not supported")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in mode else "RGB")
    return _from_array(np.asarray(im), 8, path), info


def _pil_info(path) -> dict:
    """Pillow's ``info`` for a file whose pixels another reader decodes (metadata only; {} if it fails)."""
    try:
        with Image.open(path) as im:
            return dict(im.info)
    except Exception:  # noqa: BLE001 - the pixels were read; missing metadata is not an error
        return {}


# ---- metadata carried from the source to the output ------------------------------------------------
_ICC_SPACE = {1: b"GRAY", 3: b"RGB "}


def _icc_space(icc: bytes) -> bytes:
    return bytes(icc[16:20]) if len(icc) >= 128 else b""


def _carried_meta(info: dict, channels: int) -> dict:
    """What of Pillow's ``info`` the output keeps: ICC profile (if its colour space fits), dpi, EXIF."""
    meta: dict = {}
    dropped = []
    icc = info.get("icc_profile")
    if isinstance(icc, bytes) and icc:
        space = _icc_space(icc)
        if space == _ICC_SPACE.get(channels):
            meta["icc_profile"] = icc
        else:
            got = space.decode("latin-1").strip() or "unrecognised"
            dropped.append(f"icc_profile: a {got} profile does not describe the "
                           f"{'grey' if channels == 1 else 'RGB'} output")
    dpi = info.get("dpi")
    try:
        dpi = (float(dpi[0]), float(dpi[1]))
        if all(math.isfinite(v) and v > 0 for v in dpi):
            meta["dpi"] = dpi
    except (TypeError, ValueError, IndexError):
        pass
    exif = info.get("exif")
    if isinstance(exif, bytes) and exif:
        try:
            ex = Image.Exif()
            ex.load(exif)
            ex.pop(0x0112, None)  # orientation: the pixels were already turned upright
            if len(ex):
                meta["exif"] = ex.tobytes()
        except Exception:  # noqa: BLE001 - a corrupt EXIF block is dropped, not fatal
            dropped.append("exif: the EXIF block is corrupt")
    if dropped:
        meta["dropped"] = dropped
    return meta


def scaled_meta(meta: dict, factor: int) -> dict:
    """``meta`` for an output ``factor`` times larger than its source (super-resolution): same physical
    size, so ``factor`` times the dpi."""
    out = dict(meta)
    if factor != 1 and "dpi" in out:
        out["dpi"] = (out["dpi"][0] * factor, out["dpi"][1] * factor)
    return out


def encode_meta(meta: dict) -> str:
    """``meta`` as a JSON string (bytes as base64), for the ONNX metadata and the tile layout."""
    d = {}
    for k, v in meta.items():
        d[k] = {"base64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v
    return json.dumps(d, sort_keys=True)


def decode_meta(s: str | None) -> dict:
    """The inverse of :func:`encode_meta` ({} for None or '')."""
    if not s:
        return {}
    d = json.loads(s)
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and "base64" in v:
            out[k] = base64.b64decode(v["base64"])
        elif k == "dpi":
            out[k] = (float(v[0]), float(v[1]))
        else:
            out[k] = v
    return out


def meta_summary(meta: dict) -> dict:
    """What the result JSON says of the carried metadata (sizes and names, not the bytes)."""
    out: dict = {}
    icc = meta.get("icc_profile")
    if icc:
        desc = ""
        try:
            from PIL import ImageCms
            desc = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip()
        except Exception:  # noqa: BLE001 - no littlecms, or a profile it cannot parse: the size is enough
            pass
        out["icc_profile"] = {"description": desc, "bytes": len(icc)}
    if "dpi" in meta:
        out["dpi"] = [round(v, 3) for v in meta["dpi"]]
    if meta.get("exif"):
        out["exif_bytes"] = len(meta["exif"])
    if meta.get("dropped"):
        out["dropped"] = list(meta["dropped"])
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _with_meta(png_bytes: bytes, meta: dict, channels: int) -> bytes:
    """``png_bytes`` with iCCP, pHYs and eXIf chunks for ``meta`` inserted after IHDR."""
    chunks = b""
    icc = meta.get("icc_profile")
    if icc and _icc_space(icc) == _ICC_SPACE.get(channels):
        chunks += _chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc))
    if "dpi" in meta:
        ppm = [max(1, int(round(v / 0.0254))) for v in meta["dpi"]]  # dots per metre
        chunks += _chunk(b"pHYs", struct.pack(">IIB", ppm[0], ppm[1], 1))
    exif = meta.get("exif")
    if exif:
        chunks += _chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\0\0") else exif)
    if not chunks:
        return png_bytes
    end = 8 + 8 + struct.unpack(">I", png_bytes[8:12])[0] + 4  # signature, then IHDR
    return png_bytes[:end] + chunks + png_bytes[end:]


def load_mask(path, shape: tuple[int, int]) -> np.ndarray:
    """A mask file -> (H, W) float32, 1 = known pixel. Any bright pixel (> half range) counts as known."""
    data = load_image(path)
    if data.shape != tuple(shape):
        raise ImageError(path, f"mask is {data.shape[1]}x{data.shape[0]} but the image is {shape[1]}x{shape[0]}")
    m = (data.pixels.mean(axis=2) > 0.5).astype(np.float32)
    if m.sum() == 0:
        raise ImageError(path, "the mask is all zero: no pixel is known")
    return m


def to_uint(pixels: np.ndarray, bits: int) -> np.ndarray:
    scale = 65535.0 if bits == 16 else 255.0
    dt = np.uint16 if bits == 16 else np.uint8
    return np.clip(np.rint(np.clip(pixels, 0.0, 1.0) * scale), 0, scale).astype(dt)


def _umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status; elsewhere by setting and
    restoring it, which is not thread-safe, so it is read once)."""
    global _UMASK
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    if _UMASK is None:
        _UMASK = os.umask(0o22)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; when the block ends without an error it is renamed onto
    ``path`` (so readers see the old file or the whole new one), otherwise it is removed. The file gets
    the mode a plain ``open()`` would give it (0666 less the umask: 0644 under umask 022), not the 0600
    of a temporary file, so that a web server or a colleague can read what the job wrote."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_image(path, data: ImageData) -> None:
    """Write ``data`` as a PNG with its own layout, bit depth and carried metadata, atomically."""
    write_bytes(path, encode_png(data))


def encode_png(data: ImageData) -> bytes:
    """The PNG file :func:`save_image` writes, as bytes."""
    arr = to_uint(data.pixels, data.bits)
    if data.alpha is not None:
        arr = np.concatenate([arr, to_uint(data.alpha, data.bits)[:, :, None]], axis=2)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    if data.bits == 16 and arr.ndim == 3:
        import png
        h, w, c = arr.shape
        writer = png.Writer(w, h, greyscale=c in (1, 2), alpha=c in (2, 4), bitdepth=16)
        writer.write(buf, arr.reshape(h, w * c).tolist())
    else:
        Image.fromarray(arr).save(buf, format="PNG")
    return _with_meta(buf.getvalue(), data.meta, data.channels)


def write_json(path, obj) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)


def read_json(path):
    """The JSON in ``path``, or None when the file is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
