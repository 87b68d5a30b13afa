"""ONNX export (pipeline/onnx/export.py) and `dip render` (pipeline/onnx/render.py): parity with the torch generator
and with the PNGs `dip restore` writes, on real onnxruntime CPU sessions; and the bad-input errors.

Small images, the "fast" preset and 20 steps keep this file well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from pipeline import cli  # noqa: E402
from pipeline.onnx import export, render  # noqa: E402
from pipeline.api import Problem, restore  # noqa: E402
from pipeline.config import NetConfig, make_config  # noqa: E402
from pipeline.generator import SkipGenerator, build_specs, init_slot_vector, make_input  # noqa: E402
from pipeline.io import ImageData, load_image, save_image  # noqa: E402

STEPS = "20"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny convolutions: one thread is faster, and far faster on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _smooth(h, w, c, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(3 * xx + k) * np.cos(2 * yy - k) for k in range(c)], -1) * 0.4 + 0.5
    return np.clip(base + 0.05 * rng.standard_normal((h, w, c)), 0, 1).astype(np.float32)


def _torch_render(result) -> np.ndarray:
    """What the engine renders: the training-mode-BN SkipGenerator at z, cropped; (H, W, C)."""
    p = result.problem
    G = SkipGenerator(p.cfg.net.with_channels(p.image.channels), 1)
    G.set_slot(0, result.weights)
    with torch.no_grad():
        y = G(result.z.unsqueeze(0))[0]
    H, W = p.out_shape
    return y[:, :H, :W].numpy().transpose(1, 2, 0)


@functools.lru_cache(maxsize=None)
def _srgb_icc() -> bytes:
    """An sRGB profile (made once: its header holds the time it was made)."""
    from PIL import ImageCms
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _levels(a: ImageData, b: ImageData) -> int:
    from pipeline.io import to_uint
    assert a.bits == b.bits and a.pixels.shape == b.pixels.shape
    return int(np.abs(to_uint(a.pixels, a.bits).astype(np.int64) - to_uint(b.pixels, b.bits).astype(np.int64)).max())


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """A fitted 37x45 RGB result (not a multiple of 16/32), its PNG and its fp32/fp16 exports; the default
    output (the output average, distilled into the generator)."""
    d = tmp_path_factory.mktemp("rgb")
    res = restore(_smooth(37, 45, 3), preset="fast", steps=int(STEPS), seed=3, keep_weights=True, device="cpu")
    assert res.problem.cfg.output == "ema" and res.problem.cfg.distill_steps > 0
    png, _ = res.save(d, "img")
    m32 = export.export_result(res, d / "img.onnx")
    m16 = export.export_result(res, d / "img16.onnx", dtype="fp16")
    return SimpleNamespace(res=res, dir=d, png=png, m32=m32, m16=m16)


# ---- environment -----------------------------------------------------------------------------------
def test_exactly_one_onnxruntime_distribution():
    names = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-training",
             "onnxruntime-silicon", "onnxruntime-qnn", "onnxruntime-cann", "ort-nightly", "ort-nightly-gpu",
             "ort-nightly-directml", "onnxruntime-rocm", "onnxruntime-migraphx"}
    present = set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in names:
            present.add(name)
    assert len(present) == 1, f"onnxruntime distributions installed: {sorted(present)} (they overwrite each other)"


# ---- parity ----------------------------------------------------------------------------------------
def test_float_parity_with_torch_generator(rgb):
    img, used = render.render_model(rgb.m32, "cpu")
    assert used == "CPUExecutionProvider"
    ref = _torch_render(rgb.res)
    assert img.pixels.shape == (37, 45, 3) == ref.shape
    assert np.abs(img.pixels - ref).max() <= 1e-4
    assert np.abs(img.pixels - rgb.res.image.pixels).max() <= 1e-4  # the result's own float image


def test_png_parity_and_fp16(rgb):
    saved = load_image(rgb.png)
    img32, _ = render.render_model(rgb.m32, "cpu")
    img16, _ = render.render_model(rgb.m16, "cpu")
    assert _levels(img32, saved) <= 1
    assert _levels(img16, saved) <= 2
    s32, s16 = rgb.m32.stat().st_size, rgb.m16.stat().st_size
    assert s16 < 0.55 * s32


def test_file_holds_the_generator(rgb):
    """A re-renderable network, not a stored picture: every weight by name and value, z, metadata."""
    from onnx import numpy_helper
    m = onnx.load(str(rgb.m32))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    p = rgb.res.problem
    specs = build_specs(p.cfg.net.with_channels(3), 1)
    w = rgb.res.weights.numpy()
    i = 0
    for sp in specs:
        np.testing.assert_array_equal(inits[sp.name].reshape(-1), w[i:i + sp.numel])
        i += sp.numel
    np.testing.assert_array_equal(inits["z"], rgb.res.z.numpy()[None])
    assert [i.name for i in m.graph.input] == ["z"]
    ops = {n.op_type for n in m.graph.node}
    assert {"Conv", "BatchNormalization", "Pad", "Resize", "Sigmoid", "Slice"} <= ops
    meta = export.read_metadata(m)
    assert meta["dip_format"] == "dip-onnx" and meta["dip_format_version"] == "1"
    assert meta["task"] == "denoise" and meta["preset"] == "fast" and meta["seed"] == "3"
    assert json.loads(meta["output_size"]) == [45, 37] and json.loads(meta["canvas"]) == [48, 48]
    assert meta["bits"] == "8" and meta["mode"] == "RGB" and meta["alpha"] == "none"
    assert meta["renders_saved_image"] == "true" and meta["output"] == "ema"
    cfg = json.loads(meta["config"])
    assert cfg["steps"] == int(STEPS) and cfg["net"]["out_channels"] == 3
    assert meta["dip_version"]
    # the embedded z can be overridden: feeding the same z gives the same image
    s = ort.InferenceSession(rgb.m32.read_bytes(), providers=["CPUExecutionProvider"])
    a = s.run(None, {})[0]
    b = s.run(None, {"z": inits["z"]})[0]
    assert a.shape == (1, 3, 37, 45) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("net", [
    NetConfig(input_depth=2, channels_down=(8, 16), channels_up=(8, 16), channels_skip=(0, 0), upsample="nearest",
              out_channels=1),
    NetConfig(input_depth=4, channels_down=(8, 8, 16), channels_up=(8, 8, 16), channels_skip=(2, 0, 2),
              upsample="nearest", need1x1_up=False, filter_skip=3, out_channels=3),
    NetConfig(input_depth=4, channels_down=(8, 16, 16), channels_up=(8, 16, 16), channels_skip=(4, 4, 4),
              pad="zero", bn_cat=False, out_channels=3),
    NetConfig(input_depth=4, channels_up=(8, 16, 16), channels_down=(8, 8, 8), channels_skip=(0, 0, 0),
              arch="decoder", out_channels=3),  # ConvDecoder style: 3x3, bilinear, reflection
    NetConfig(input_depth=4, channels_up=(8, 8), channels_down=(8, 8), channels_skip=(0, 0), arch="decoder",
              filter_up=1, upsample="nearest", out_channels=1),  # Deep Decoder style: 1x1
])
def test_other_architectures_random_weights(net, tmp_path):
    """Nearest upsampling, no skips, 3x3 skips, no 1x1, zero padding, no BN after the concatenation: parity
    on untrained weights (no fit needed)."""
    kind = "meshgrid" if net.input_depth == 2 else "noise"
    cfg = make_config("inpaint", preset="inpaint-object").replace(net=net, input_kind=kind)
    specs = build_specs(net, 1)
    w = init_slot_vector(specs, 7)
    H, W = 2 ** net.scales * 3, 2 ** net.scales * 2
    z = make_input(kind, net.input_depth, H, W, 7)
    h, wd = H - 3, W - 1
    p = Problem(image=ImageData(np.zeros((h, wd, net.out_channels), np.float32), None, 8), cfg=cfg, seed=7)
    res = SimpleNamespace(problem=p, weights=w, z=z, image=p.image, steps=0)
    path = export.export_result(res, tmp_path / "m.onnx")
    img, _ = render.render_model(path, "cpu")
    assert np.abs(img.pixels - _torch_render(res)).max() <= 1e-4


def test_undistilled_output_average_is_flagged(tmp_path, capsys):
    """--distill-steps 0 saves the output average itself: the file says it does not render the PNG, and
    dip render says so; the default (distilled) does render it."""
    res = restore(_smooth(21, 19, 3), preset="fast", steps=int(STEPS), keep_weights=True, device="cpu",
                  distill_steps=0)
    path = export.export_result(res, tmp_path / "avg.onnx")
    assert export.read_metadata(onnx.load(str(path)))["renders_saved_image"] == "false"
    assert "differs from the job's PNG" in render.img_note(render.load_model(path)[1])
    img, _ = render.render_model(path, "cpu")
    assert np.abs(img.pixels - _torch_render(res)).max() <= 1e-4  # the last generator, not the average
    assert np.abs(img.pixels - res.image.pixels).max() > 1e-3
    assert cli.main(["render", str(path), "--provider", "cpu"]) == 0
    assert "differs from the job's PNG" in capsys.readouterr().out


def test_sr_x2(tmp_path):
    lr = ImageData(_smooth(19, 23, 3, seed=1), None, 8, "", {"dpi": (150.0, 150.0), "icc_profile": _srgb_icc()})
    res = restore(lr, task="sr", scale=2, preset="fast", steps=int(STEPS), keep_weights=True, device="cpu", output="weights_ema")
    png, js = res.save(tmp_path, "sr")
    path = export.export_result(res, tmp_path / "sr.onnx")
    img, _ = render.render_model(path, "cpu")
    assert img.pixels.shape == (38, 46, 3)
    # the source's profile and resolution reach the PNG, the JSON and the render; twice the pixels on the
    # same paper: twice the dpi
    for d in (load_image(png).meta, img.meta):
        assert d["icc_profile"] == lr.meta["icc_profile"] and d["dpi"] == pytest.approx((300, 300), abs=0.01)
    assert json.loads(js.read_text())["source_metadata"]["dpi"] == [300, 300]
    assert np.abs(img.pixels - _torch_render(res)).max() <= 1e-4
    assert _levels(img, load_image(png)) <= 1
    meta = export.read_metadata(onnx.load(str(path)))
    assert meta["task"] == "sr" and json.loads(meta["output_size"]) == [46, 38]


# ---- the CLI: dip restore writes the .onnx, dip render re-renders it --------------------------------
@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """`dip restore` on a grey 16-bit image and an RGBA image (both odd sizes), fp32 exports."""
    src = tmp_path_factory.mktemp("in")
    out = tmp_path_factory.mktemp("out")
    g = _smooth(33, 40, 1, seed=2)
    save_image(src / "grey16.png", ImageData(g, None, 16))
    a = _smooth(26, 21, 3, seed=4)
    alpha = np.linspace(0, 1, 26 * 21, dtype=np.float32).reshape(26, 21)
    save_image(src / "sub" / "rgba.png", ImageData(a, alpha, 8, "", {"icc_profile": _srgb_icc(), "dpi": (400.0, 400.0)}))
    import os
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # for the job's worker processes
    try:
        rc = cli.main(["restore", str(src), "--out", str(out), "--preset", "fast", "--steps", STEPS,
                       "--device", "cpu", "--quiet"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert rc == 0
    return out


def test_cli_restore_writes_onnx_and_render_dir_matches(job, capsys):
    models = sorted(job.rglob("*.onnx"))
    assert [m.relative_to(job).as_posix() for m in models] == ["grey16.onnx", "sub/rgba.onnx"]
    before = {p: p.read_bytes() for p in job.rglob("*.png")}
    assert cli.main(["render", str(job), "--provider", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "CPUExecutionProvider" in printed
    for p, data in before.items():
        assert p.read_bytes() == data  # the job's own PNGs are untouched
    g16 = load_image(job / "grey16.render.png")
    g16_job = load_image(job / "grey16.png")
    assert g16.bits == 16 and g16.channels == 1 and g16.alpha is None
    assert _levels(g16, g16_job) <= 2  # 16-bit levels: float parity 1e-4 would allow 6
    rgba = load_image(job / "sub" / "rgba.render.png")
    rgba_job = load_image(job / "sub" / "rgba.png")
    assert rgba.alpha is not None and rgba.bits == 8
    assert _levels(rgba, rgba_job) <= 1
    np.testing.assert_array_equal(rgba.alpha, rgba_job.alpha)  # alpha is carried in the file, exactly
    for d in (rgba.meta, rgba_job.meta):  # so are the source's colour profile and resolution, through Ray
        assert d["icc_profile"] == _srgb_icc() and d["dpi"] == pytest.approx((400, 400), abs=0.01)
    assert g16.meta == g16_job.meta == {}
    meta = export.read_metadata(onnx.load(str(job / "sub" / "rgba.onnx")))
    assert meta["mode"] == "RGBA" and meta["alpha"] == "embedded"


def test_render_single_model_and_output_dir(job, tmp_path):
    dest = tmp_path / "x" / "again.png"
    assert cli.main(["render", str(job / "grey16.onnx"), "-o", str(dest)]) == 0
    assert load_image(dest).bits == 16
    outdir = tmp_path / "renders"
    assert cli.main(["render", str(job), "-o", str(outdir)]) == 0
    assert (outdir / "grey16.render.png").is_file() and (outdir / "sub" / "rgba.render.png").is_file()
    assert cli.main(["render", str(job), "-o", str(tmp_path / "one.png")]) == 2  # a DIR needs an -o directory
    assert cli.main(["render", str(tmp_path / "missing.onnx")]) == 2


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_models(rgb, tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "good.onnx").write_bytes(rgb.m32.read_bytes())
    (d / "text.onnx").write_text("this is not a model\n")
    data = rgb.m32.read_bytes()
    (d / "cut.onnx").write_bytes(data[: len(data) // 2])
    (d / "empty.onnx").write_bytes(b"")
    from onnx import TensorProto, helper
    gr = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                           [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(gr, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(d / "foreign.onnx"))
    m = onnx.load(str(rgb.m32))
    for e in m.metadata_props:
        if e.key == "dip_format_version":
            e.value = "99"
    onnx.save(m, str(d / "future.onnx"))

    capsys.readouterr()
    assert cli.main(["render", str(d), "--provider", "cpu"]) == 1
    err = capsys.readouterr().err
    assert (d / "good.render.png").is_file()
    for name, words in [("text.onnx", "not an ONNX file"), ("cut.onnx", "truncated"), ("empty.onnx", "empty"),
                        ("foreign.onnx", "not made by dip"), ("future.onnx", "newer dip")]:
        lines = [ln for ln in err.splitlines() if name in ln]
        assert len(lines) == 1 and words in lines[0], (name, err)
        assert not (d / name.replace(".onnx", ".render.png")).exists()
    # a single bad file: exit 1 too
    assert cli.main(["render", str(d / "future.onnx")]) == 1
    with pytest.raises(render.RenderError, match="foreign.onnx"):
        render.render_model(d / "foreign.onnx")


def test_explicit_gpu_provider_that_does_not_run(rgb, capsys):
    """--provider cuda must not silently render on the CPU."""
    try:
        _s, used = render.make_session(rgb.m32.read_bytes(), "cuda")
    except RuntimeError:
        used = None
    if used == "CUDAExecutionProvider":
        pytest.skip("onnxruntime really runs on CUDA here")
    capsys.readouterr()
    assert cli.main(["render", str(rgb.m32), "-o", str(rgb.dir / "c.png"), "--provider", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "img.onnx" in err[0] and "cuda" in err[0].lower()
    assert not (rgb.dir / "c.png").exists()
    # auto falls back to whatever really runs, and says which
    img, used = render.render_model(rgb.m32, "auto")
    assert used in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
