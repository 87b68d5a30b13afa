"""The page of OUT/report.html: the summary cards, the sortable table, the per-image views and plots, as one
self-contained HTML string (inline CSS and JS, images as data: URIs). pipeline.job.report collects the
data it shows; everything here is presentation. Every string that comes from a file name, a JSON file
or an error is HTML-escaped (attributes too); the script only moves table rows and never parses HTML; a
Content-Security-Policy lets only this page's own script (by its hash) run.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import io
import logging
import math
import os
from pathlib import Path

log = logging.getLogger("dip.report")

THUMB = 320  # largest side of the displayed full view, CSS px
CROP = 64  # side of the centre crop, in output pixels
ZOOM = 4


def esc(x) -> str:
    """HTML-escape anything (quotes too, so the result is safe in attribute values)."""
    return html.escape("" if x is None else str(x), quote=True)


def num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def fallback_step(stopping: dict) -> float | None:
    """The step of the image the stopping rule's fallback chose at the cap (None if it did not)."""
    fb = stopping.get("fallback") if isinstance(stopping, dict) else None
    if isinstance(fb, dict) and fb.get("used") is True:
        return num(fb.get("step"))
    return None


# ---- images ----------------------------------------------------------------------------------------------
def _data_uri(im, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.convert("RGB").save(buf, format="JPEG", quality=90)
        mime = "image/jpeg"
    else:
        im.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _small_uri(im) -> str:
    """PNG, or JPEG when the PNG would be large (noisy photos)."""
    png = _data_uri(im, "PNG")
    if len(png) < 64_000:
        return png
    jpg = _data_uri(im, "JPEG")
    return jpg if len(jpg) * 1.5 < len(png) else png


def _load8(path):
    """An image file as an 8-bit PIL image (L or RGB; alpha dropped), or None when unreadable."""
    from PIL import Image
    from pipeline.io import load_image, to_uint
    try:
        d = load_image(path)
    except Exception:  # noqa: BLE001
        return None
    a = to_uint(d.pixels, 8)
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)


def _crop_boxes(in_size, out_size):
    """Centre crop boxes (left, top, right, bottom) of the output and the same region of the input."""
    wo, ho = out_size
    wi, hi = in_size
    cw, ch = min(CROP, wo), min(CROP, ho)
    lo, to = (wo - cw) // 2, (ho - ch) // 2
    ob = (lo, to, lo + cw, to + ch)
    sx, sy = wi / wo, hi / ho
    ib = (int(round(lo * sx)), int(round(to * sy)), max(int(round(lo * sx)) + 1, int(round((lo + cw) * sx))),
          max(int(round(to * sy)) + 1, int(round((to + ch) * sy))))
    return ob, ib


def _thumb_uri(img, size) -> str:
    """``img`` fitted into ``size`` (only ever made smaller than the original), as a data URI."""
    from PIL import Image
    t = img.copy()
    if t.width > size[0] or t.height > size[1]:
        t.thumbnail(size, Image.LANCZOS)
    return _small_uri(t)


def _views(row: dict) -> dict:
    """Data URIs: input (and reference) thumbnail, input, output (and reference) centre crops; and the
    display sizes."""
    res = {"in_full": None, "in_crop": None, "out_crop": None, "size": None, "crop_size": None, "ref_full": None,
           "ref_crop": None}
    inp = _load8(row["input"]) if row["input"] and os.path.isfile(row["input"]) else None
    outp = _load8(row["output"]) if row["output"] else None
    shown = outp or inp  # what sets the display size
    if shown is None:
        return res
    w, h = shown.size
    scale = min(THUMB / max(w, h), float(ZOOM))
    res["size"] = (max(1, round(w * scale)), max(1, round(h * scale)))
    res["pixelated"] = scale > 1
    if inp is not None:
        res["in_full"] = _thumb_uri(inp, res["size"])
    if outp is not None:
        ob, ib = _crop_boxes(inp.size if inp is not None else outp.size, outp.size)
        res["out_crop"] = _data_uri(outp.crop(ob))
        res["crop_size"] = ((ob[2] - ob[0]) * ZOOM, (ob[3] - ob[1]) * ZOOM)
        if inp is not None:
            res["in_crop"] = _data_uri(inp.crop(ib))
    elif inp is not None:
        ob, _ = _crop_boxes(inp.size, inp.size)
        res["in_crop"] = _data_uri(inp.crop(ob))
        res["crop_size"] = ((ob[2] - ob[0]) * ZOOM, (ob[3] - ob[1]) * ZOOM)
    refp = row.get("reference")
    ref = _load8(refp) if refp and os.path.isfile(refp) else None
    if ref is not None and ref.size == shown.size:  # the reference is the output's size
        res["ref_full"] = _thumb_uri(ref, res["size"])
        ob, _ = _crop_boxes(ref.size, ref.size)
        res["ref_crop"] = _data_uri(ref.crop(ob))
    return res


def _plot(rec: dict) -> str | None:
    """The loss curve (+ the stopping rule's VAR trace, chosen step, stop step; + PSNR trace) as a data URI."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, NullFormatter
    loss = [x for x in (rec.get("loss") or []) if num(x) is not None] if isinstance(rec.get("loss"), list) else []
    st = rec.get("stopping") if isinstance(rec.get("stopping"), dict) else None
    trace = [t for t in (st or {}).get("trace") or [] if isinstance(t, (list, tuple)) and len(t) == 2
             and num(t[0]) is not None and num(t[1]) is not None]
    psnr = [t for t in rec.get("psnr_trace") or [] if isinstance(t, (list, tuple)) and len(t) == 2
            and num(t[0]) is not None and num(t[1]) is not None] if isinstance(rec.get("psnr_trace"), list) else []
    if not loss and not trace:
        return None
    holdout = (st or {}).get("rule") == "holdout"
    fig = Figure(figsize=(6.4, 5.0 if psnr else 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2 if psnr else 1, 1, 1)
    handles = []
    if loss:
        y = np.asarray(loss, dtype=float)
        handles += ax.plot(np.arange(1, len(y) + 1), y, lw=1, color="C0", label="loss")
        if (y > 0).all() and y.max() > 10 * y.min():
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.tick_params(labelsize=7)
    if trace:
        ax2 = ax.twinx()
        t = np.asarray(trace, dtype=float)
        name = "error on held-back pixels" if holdout else "VAR (ES-WMV)"
        handles += ax2.plot(t[:, 0], t[:, 1], color="C1", lw=1, marker=".", ms=3, label=name)
        if (t[:, 1] > 0).all() and t[:, 1].max() > 10 * t[:, 1].min():
            ax2.set_yscale("log")
            ax2.yaxis.set_minor_formatter(NullFormatter())
        ax2.tick_params(labelsize=7)
        ax2.set_ylabel("held-out MSE" if holdout else "VAR", fontsize=8)
    if st:
        chosen, stopped = num(st.get("chosen_step")), num(st.get("stopped_at"))
        fb = fallback_step(st)
        if fb is not None:  # the rule did not fire; its fallback chose the image at the cap
            handles.append(ax.axvline(fb, color="C2", ls="--", lw=1.2, label=f"chosen step {fb:.0f} (discrepancy)"))
        if chosen is not None and stopped is not None:
            handles.append(ax.axvline(chosen, color="C2", ls="--", lw=1.2, label=f"chosen step {chosen:.0f}"))
        elif chosen is not None:  # the rule did not fire: the fit ran to its cap, its minimum was not used
            handles.append(ax.axvline(chosen, color="0.5", ls="--", lw=1, label=f"{'held-out error' if holdout else 'VAR'} minimum {chosen:.0f} (not used)"))
        if stopped is not None and stopped != chosen:
            handles.append(ax.axvline(stopped, color="C3", ls=":", lw=1.2, label=f"stopped at {stopped:.0f}"))
    if handles:  # below the axes, never over the curves
        ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22),
                  ncol=min(3, len(handles)), frameon=False)
    reason = str(rec.get("stop_reason") or "").replace("$", "")[:40]
    if reason:
        ax.set_title(f"stop reason: {reason}", fontsize=8)
    if psnr:
        bx = fig.add_subplot(2, 1, 2, sharex=ax)
        p = np.asarray(psnr, dtype=float)
        bx.plot(p[:, 0], p[:, 1], color="C4", lw=1)
        bx.set_ylabel("PSNR (dB)", fontsize=8)
        bx.set_xlabel("step", fontsize=8)
        bx.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---- HTML --------------------------------------------------------------------------------------------------
CSS = """
:root{--fg:#1d232a;--mut:#5b6670;--bd:#d5dbe1;--bg:#fff;--alt:#f5f7f9;--ok:#1a7f37;--bad:#c62828;--warn:#9a6700}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg);
margin:0 auto;padding:1rem 1.5rem 3rem;max-width:1200px}
h1{font-size:1.5rem;margin:.2rem 0}h2{font-size:1.15rem;margin:1.8rem 0 .6rem;border-bottom:1px solid var(--bd)}
.meta{color:var(--mut);margin:.2rem 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.6rem;margin:0}
.cards div{border:1px solid var(--bd);border-radius:6px;padding:.5rem .7rem;background:var(--alt)}
.cards dt{color:var(--mut);font-size:.8rem}.cards dd{margin:0;font-size:1.15rem;font-weight:600}
.note{padding:.5rem .8rem;border-left:4px solid var(--warn);background:#fff8e1}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid var(--bd);padding:.3rem .45rem;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
thead th{position:sticky;top:0;background:var(--alt);cursor:pointer;user-select:none;white-space:nowrap}
thead th:hover{background:#e8edf2}
thead th[aria-sort=ascending]::after{content:" \\25B2"}thead th[aria-sort=descending]::after{content:" \\25BC"}
tbody tr:nth-child(even){background:var(--alt)}
.err{color:var(--bad);max-width:32rem;overflow-wrap:anywhere}
.st{font-weight:600}.st-done{color:var(--ok)}.st-failed{color:var(--bad)}.st-skipped,.st-pending,.st-running{color:var(--warn)}
.name{overflow-wrap:anywhere}
article{border:1px solid var(--bd);border-radius:6px;padding:.6rem .9rem;margin:.9rem 0}
article h3{margin:.1rem 0 .4rem;font-size:1rem;overflow-wrap:anywhere}
.facts{color:var(--mut);margin:.2rem 0 .5rem}
.views input{margin-left:.6rem}
.pairs{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start;margin-top:.5rem}
.pair{display:flex;gap:.8rem;flex-wrap:wrap}
figure{margin:0;display:table}figcaption{display:table-caption;caption-side:bottom;color:var(--mut);font-size:12px;
overflow-wrap:anywhere}
figure img{display:block;border:1px solid var(--bd);background:repeating-conic-gradient(#eee 0 25%,#fff 0 50%) 0 0/16px 16px}
img.px{image-rendering:pixelated}
.ph{display:flex;align-items:center;justify-content:center;color:var(--mut);border:1px dashed var(--bd);
width:160px;height:120px;font-size:12px;text-align:center}
.views .crop{display:none}
.views input.vcrop:checked~.pairs .crop{display:flex}.views input.vcrop:checked~.pairs .full{display:none}
.toolbar button{font:inherit;margin-right:.4rem}
.plot img{border:0;background:none}
"""

JS = """
(function () {
  "use strict";
  function key(row, col, num) {
    var c = row.cells[col];
    var v = c.hasAttribute("data-sort") ? c.getAttribute("data-sort") : c.textContent;
    if (num) { var f = parseFloat(v); return isNaN(f) ? null : f; }
    return v.toLowerCase();
  }
  function sortBy(th) {
    var table = th.closest("table"), body = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var num = th.getAttribute("data-type") === "num";
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    var rows = Array.prototype.slice.call(body.rows).map(function (r, i) { return [key(r, col, num), i, r]; });
    rows.sort(function (a, b) {
      if (a[0] === null || b[0] === null) {  // empty cells last, in either direction
        return a[0] === null && b[0] === null ? a[1] - b[1] : (a[0] === null ? 1 : -1);
      }
      if (a[0] < b[0]) return -dir;
      if (a[0] > b[0]) return dir;
      return a[1] - b[1];
    });
    var ths = th.parentNode.children;
    for (var i = 0; i < ths.length; i++) ths[i].removeAttribute("aria-sort");
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    rows.forEach(function (r) { body.appendChild(r[2]); });
  }
  document.querySelectorAll("table.sortable thead th").forEach(function (th) {
    th.tabIndex = 0;
    th.addEventListener("click", function () { sortBy(th); });
    th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(th); } });
  });
  document.querySelectorAll("button[data-view]").forEach(function (b) {
    b.addEventListener("click", function () {
      var cls = b.getAttribute("data-view") === "crop" ? "input.vcrop" : "input.vfull";
      document.querySelectorAll(cls).forEach(function (r) { r.checked = true; });
    });
  });
})();
"""


def _fmt(x, nd: int = 1) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def _fmt_dur(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d} min"


def auto_stop_text(r) -> str:
    """What auto-stop did, in words: the rule that chose the saved image and its step, or why none did."""
    st = r.get("stopping")
    if not st:
        return "off (fixed steps)" if r.get("status") == "done" else ""
    chosen, stopped, fb = num(st.get("chosen_step")), num(st.get("stopped_at")), fallback_step(st)
    if stopped is not None and chosen is not None:
        rule = "held-out pixels" if st.get("rule") == "holdout" else "variance rule"
        return f"{chosen:.0f} ({rule}, stopped at {stopped:.0f})"
    if fb is not None:
        return f"{fb:.0f} (discrepancy fallback, at the cap)"
    return "not triggered: the last image (the cap)"


def _steps_cell(r) -> str:
    if r["steps"] is None:
        return ""
    s = f"{r['steps']:.0f}"
    if r["max_steps"] is not None and r["max_steps"] != r["steps"]:
        s += f" / {r['max_steps']:.0f}"
    return s


def _summary_html(s: dict, data: dict) -> str:
    c = s["counts"]
    cards = [("Images", s["total"]), ("Done", c["done"]), ("Failed", c["failed"]), ("Skipped", c["skipped"])]
    other = sum(v for k, v in c.items() if k not in ("done", "failed", "skipped"))
    if other:
        cards.append(("Not finished", other))
    if s["wall"] is not None:
        cards.append((f"Wall time ({s['runs']} run{'s' if s['runs'] != 1 else ''})", _fmt_dur(s["wall"])))
    cards += [("Fit time per image (mean)", _fmt_dur(s["mean"])), ("Fit time per image (median)", _fmt_dur(s["median"])),
              ("Images / hour", "–" if s["rate"] is None else f"{s['rate']:.0f}")]
    if s.get("gflop") is not None:
        from pipeline.work import fmt_gflop
        cards.append(("Work (GFLOP: steps × FLOPs a step)", f"{fmt_gflop(s['gflop'])}, {fmt_gflop(s['gflop_mean'])} an image"))
    dev = ", ".join(f"{d} ({n} worker{'s' if n != 1 else ''})" if n else d
                    for d, n in sorted(s["devices"].items())) or ", ".join(s["run_devices"]) or "–"
    cards.append(("Device(s)", dev))
    if s["actors"]:
        cards.append(("Workers (last run)", s["actors"]))
    if s["occupancy"] is not None:
        cards.append(("Batch occupancy (last run)", f"{s['occupancy']:.0%}"))
    if s["hosts"]:
        cards.append(("Host(s)", ", ".join(s["hosts"][:6]) + (" …" if len(s["hosts"]) > 6 else "")))
    parts = ['<dl class="cards">']
    for k, v in cards:
        parts.append(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>")
    parts.append("</dl>")
    if s["last_status"] and s["last_status"] != "finished":
        parts.append(f'<p class="note">The last run is <b>{esc(s["last_status"])}</b>: images it did not finish '
                     f"are redone by running the same command again.</p>")
    if not data["manifest"]:
        parts.append('<p class="note">No job manifest (dip-manifest.json) was found: this report was rebuilt '
                     "from the result files alone, so failed images are not listed.</p>")
    if s["rate"] is not None:
        parts.append('<p class="meta">Images / hour: images fitted per hour of the runs\' wall time (Ray start-up '
                     "included). Fit time: each image's own fit, which runs batched with others. Batch occupancy: "
                     "the mean share of a batch's slots that were fitting (an idle slot still costs its share of "
                     "each step).</p>")
    return "\n".join(parts)


COLUMNS = [  # (header, key, numeric, css class)
    ("#", "idx", True, "n"), ("Image", "name", False, "name"), ("Status", "status", False, ""),
    ("Task", "task", False, ""), ("Preset", "preset", False, ""), ("Steps", "steps", True, "n"),
    ("Auto-stop step", "chosen_step", True, "n"), ("Time (s)", "seconds", True, "n"),
    ("PSNR (dB)", "psnr", True, "n"), ("SSIM", "ssim", True, "n"), ("Attempts", "attempts", True, "n"),
    ("Error", "error", False, "err"),
]


def _table_html(rows: list[dict], detail_ids: set) -> str:
    out = ['<table id="images" class="sortable"><thead><tr>']
    for head, k, num, cls in COLUMNS:
        extra = ' data-type="num"' if num else ""
        extra += ' class="n"' if cls == "n" else ""
        out.append(f'<th data-key="{k}"{extra}>{esc(head)}</th>')
    out.append("</tr></thead><tbody>")
    for i, r in enumerate(rows):
        vals = {"idx": (i + 1, str(i + 1)), "steps": (r["steps"], _steps_cell(r)),
                "chosen_step": (r["chosen_step"], auto_stop_text(r)),
                "seconds": (r["seconds"], _fmt(r["seconds"], 2)), "psnr": (r["psnr"], _fmt(r["psnr"], 2)),
                "ssim": (r["ssim"], _fmt(r["ssim"], 4)), "attempts": (r["attempts"], _fmt(r["attempts"], 0))}
        out.append(f'<tr data-id="{esc(r["name"])}" data-status="{esc(r["status"])}">')
        for _head, k, num, cls in COLUMNS:
            ca = f' class="{cls}"' if cls else ""
            if num:
                v, text = vals[k]
                sort = "" if v is None else repr(float(v))
                out.append(f'<td{ca} data-col="{k}" data-sort="{esc(sort)}">{esc(text)}</td>')
            elif k == "name":
                label = esc(r["name"])
                cell = f'<a href="#img-{i}">{label}</a>' if i in detail_ids else label
                out.append(f'<td{ca} data-col="name" data-sort="{label}">{cell}</td>')
            elif k == "status":
                out.append(f'<td data-col="status"><span class="st st-{esc(r["status"])}">{esc(r["status"])}</span></td>')
            else:
                out.append(f'<td{ca} data-col="{k}">{esc(r[k])}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _img(uri, size, caption, pixelated, alt, link=None) -> str:
    if uri is None or size is None:
        return (f'<figure><div class="ph">{esc(alt)}: not available</div>'
                f"<figcaption>{esc(caption)}</figcaption></figure>")
    w, h = size
    px = ' class="px"' if pixelated else ""
    im = f'<img src="{esc(uri)}" alt="{esc(alt)}" width="{int(w)}" height="{int(h)}" loading="lazy"{px}>'

    if link:
        im = f'<a href="{esc(link)}">{im}</a>'
    return f"<figure>{im}<figcaption>{esc(caption)}</figcaption></figure>"


def _detail_html(i: int, r: dict) -> str:
    v = _views(r)
    facts = [f"status: {r['status']}"]
    for label, k in (("task", "task"), ("preset", "preset"), ("device", "device")):
        if r[k]:
            facts.append(f"{label}: {r[k]}")
    if r["steps"] is not None:
        facts.append(f"steps: {_steps_cell(r)}" + (f" (stop: {r['stop_reason']})" if r["stop_reason"] else ""))
    if r["stopping"] or r["status"] == "done":
        facts.append(f"auto-stop: {auto_stop_text(r)}")
    sizes = [r["record"].get(k) for k in ("input_size", "output_size")]
    if all(isinstance(z, list) and len(z) == 2 and all(num(q) is not None for q in z) for z in sizes):
        facts.append(f"{sizes[0][0]:.0f}×{sizes[0][1]:.0f} → {sizes[1][0]:.0f}×{sizes[1][1]:.0f} px")
    if r["seconds"] is not None:
        facts.append(f"time: {r['seconds']:.2f} s")
    if r["psnr"] is not None:
        facts.append(f"PSNR {r['psnr']:.2f} dB, SSIM {_fmt(r['ssim'], 4)}")
    parts = [f'<article id="img-{i}" class="image st-{esc(r["status"])}" data-id="{esc(r["name"])}">',
             f'<h3>{esc(r["name"])}</h3>', f'<p class="facts">{esc(" · ".join(facts))}</p>']
    if r["error"]:
        parts.append(f'<p class="err">{esc(r["error"])}</p>')
    in_cap = "input" + (f": {r['input_shown']}" if r["input_shown"] else "")
    out_cap = "output" + (f": {r['output_shown']}" if r["output_shown"] else "")
    size = v["size"]
    px = bool(v.get("pixelated"))
    full = [_img(v["in_full"], size, in_cap, px, "input")]
    if r["output_url"]:
        full.append(_img(r["output_url"], size, out_cap, px, "output", link=r["output_url"]))
    else:
        full.append(_img(None, None, out_cap, False, "output"))
    crop = [_img(v["in_crop"], v["crop_size"], f"input, centre crop ×{ZOOM}", True, "input crop"),
            _img(v["out_crop"], v["crop_size"], f"output, centre crop ×{ZOOM}", True, "output crop")]
    if v.get("ref_full"):
        ref_cap = "reference" + (f": {r['reference_shown']}" if r.get("reference_shown") else "")
        full.append(_img(v["ref_full"], size, ref_cap, px, "reference"))
        crop.append(_img(v["ref_crop"], v["crop_size"], f"reference, centre crop ×{ZOOM}", True, "reference crop"))
    parts.append('<div class="views">'
                 f'<input type="radio" class="vfull" name="view-{i}" id="view-{i}-full" checked>'
                 f'<label for="view-{i}-full">Full</label>'
                 f'<input type="radio" class="vcrop" name="view-{i}" id="view-{i}-crop">'
                 f'<label for="view-{i}-crop">Centre crop ×{ZOOM}</label>'
                 '<div class="pairs">'
                 f'<div class="pair full">{"".join(full)}</div><div class="pair crop">{"".join(crop)}</div>')
    try:
        plot = _plot(r["record"]) if r["record"] else None
    except Exception as e:  # noqa: BLE001
        log.warning("%s: cannot plot the loss curve: %s", r["name"], e)
        plot = None
    if plot:
        parts.append(f'<figure class="plot"><img src="{esc(plot)}" alt="loss curve" width="640" loading="lazy">'
                     "<figcaption>loss per step"
                     + ("; VAR of the stopping rule, its chosen step and where it stopped" if r["stopping"] else "")
                     + ("; PSNR against the reference" if r["record"].get("psnr_trace") else "")
                     + "</figcaption></figure>")
    parts.append("</div></div></article>")
    return "".join(parts)


def render(data: dict, s: dict) -> str:
    """The whole page for the collected ``data`` and its summary ``s`` (pipeline.job.report)."""
    rows = data["rows"]
    limit = int(os.environ.get("DIP_REPORT_MAX_DETAILS", 500))
    detail = list(range(min(len(rows), max(0, limit))))
    name = Path(data["out"]).resolve().name
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    script_hash = base64.b64encode(hashlib.sha256(JS.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src 'self' data: file:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">',
             '<meta name="viewport" content="width=device-width,initial-scale=1">',
             f"<title>dip report: {esc(name)}</title><style>{CSS}</style></head><body>",
             f"<header><h1>dip report: {esc(name)}</h1>",
             f'<p class="meta">generated {esc(now)}'
             + (f" · manifest updated {esc(data['updated'])}" if data.get("updated") else "")
             + (f" · last run {esc(s['last_status'])}" if s["last_status"] else "") + "</p></header>",
             '<section id="summary"><h2>Summary</h2>', _summary_html(s, data), "</section>",
             '<section id="table"><h2>Images</h2><p class="meta">Click a column header to sort.</p>',
             _table_html(rows, set(detail)), "</section>"]
    if detail:
        parts.append('<section id="details"><h2>Per image</h2>')
        parts.append('<p class="toolbar">All images: <button type="button" data-view="full">Full</button>'
                     f'<button type="button" data-view="crop">Centre crop ×{ZOOM}</button></p>')
        if len(detail) < len(rows):
            parts.append(f'<p class="note">Details for the first {len(detail)} of {len(rows)} images '
                         "(set DIP_REPORT_MAX_DETAILS to change).</p>")
        for i in detail:
            parts.append(_detail_html(i, rows[i]))
        parts.append("</section>")
    parts.append(f"<script>{JS}</script></body></html>\n")
    return "\n".join(parts)
