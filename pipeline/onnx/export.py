"""ONNX export of a fitted generator: one self-contained ``<stem>.onnx`` per restored image.

The file is the network itself, not a stored picture: the fitted weights of the one generator that
produced the image (``Result.weights``: the averaged weights for ``output="weights_ema"``; for the
default ``output="ema"`` the generator distilled onto the output average, whose render *is* the saved
image (pipeline/engine.py); the last weights otherwise), its fixed input ``z`` and the BatchNorm
statistics at ``z``. Rendering it needs no
input and no other file::

    image (1, C, H, W) float32 in [0, 1] = crop(sigmoid(G(z)))     [+ alpha (H, W) uint8/uint16]

Graph (opset 17, IR version 8; built node by node with ``onnx.helper`` by :class:`_GraphBuilder`, which
walks the same architecture as :class:`RenderGenerator`; the tests hold both to the engine's generator):

- ``z`` is a graph *input* whose default value (an initializer of the same name) is the fit's input,
  so a plain ``session.run(None, {})`` renders the image. Keeping it an input (rather than a constant)
  stops onnxruntime from constant-folding the whole network into a picture at session creation (on the
  CPU, whatever provider was asked for), so the network really is evaluated by the chosen provider.
  Feeding another ``z`` is possible but is *not* a DIP render: the BN statistics stay those at the
  embedded ``z``.
- BatchNorm: DIP runs BatchNorm in training mode, on the statistics of the current activations. At the
  fixed ``z`` those statistics are constants, so the export runs the generator once at ``z`` in torch,
  records every BN layer's mean and biased variance, and writes a plain inference ``BatchNormalization``
  node with them as its running statistics (``s0.down_bn.mean`` / ``.var``). The weights are stored
  unchanged under their spec names (``s0.down.w`` ...); onnxruntime fuses BN into the conv at load.
  (torch.onnx would export training-mode ``F.batch_norm`` as eval-mode BN with no statistics; and its
  TorchScript path (deprecated since torch 2.9) folds BN into the convolutions under new names,
  de-duplicates equal-valued initializers and emits a shape sub-graph for every reflection pad, while the
  dynamo path takes seconds per file and also rewrites the weights. Hence the direct builder.)
- reflection padding (``F.pad(mode="reflect")``) is ``Pad(mode="reflect")`` with constant int64 pads;
  convolutions then run with ``pads=0``. A network with ``pad="zero"`` has no Pad nodes: its convolutions
  pad with zeros themselves (``pads=[p, p, p, p]``).
- upsampling: bilinear is ``Resize(mode="linear", coordinate_transformation_mode="half_pixel")`` (= torch
  ``align_corners=False``); nearest is ``Resize(mode="nearest", "asymmetric", nearest_mode="floor")``.
- the crop from the canvas (a multiple of 2**scales, padded at the bottom/right) to the output size
  (for SR: the high-resolution size) is one ``Slice`` after the ``Sigmoid``.
- alpha: DIP never fits alpha (it is passed through unchanged). For RGBA / grey+alpha inputs the
  quantised alpha plane, exactly as the PNG holds it, is stored as an initializer and returned as a
  second output ``alpha``, so ``dip render`` reproduces the whole PNG from the file alone.

``dtype="fp16"`` stores the weights, ``z`` and BN affine parameters as float16 (about half the file)
and casts them to float32 inside the graph: arithmetic stays float32. The BN statistics are computed
with the fp16-rounded weights and ``z`` (so the network is self-consistent) and stored as float32.

Metadata (``model.metadata_props``, all strings): ``dip_format="dip-onnx"``, ``dip_format_version``,
``dip_version``, ``task``, ``preset``, ``config`` (the full FitConfig JSON, ``net.out_channels`` = the
image's colour channels), ``seed``, ``steps``, ``source``, ``source_sha256``, ``bits``, ``mode``,
``channels``, ``output_size`` (``[W, H]`` JSON), ``canvas`` (``[W, H]``), ``output`` (the config's
output kind), ``renders_saved_image`` (``"true"`` unless ``output="ema"`` with ``distill_steps=0``), ``alpha``
(``"none"`` | ``"embedded"``), ``source_metadata`` (the ICC profile, dpi and EXIF carried from the source,
as :func:`pipeline.io.encode_meta` writes them: ``dip render`` puts them in its PNG as the job does),
``dtype``, ``weights_sha256``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import VERSION, FitConfig, NetConfig
from pipeline.generator import BN_EPS, SkipGenerator, build_specs
from pipeline.io import ImageData, encode_meta

FORMAT = "dip-onnx"
FORMAT_VERSION = 1
OPSET = 17
IR_VERSION = 8  # onnxruntime >= 1.10 reads it; onnx 1.23's default (14) is newer than onnxruntime 1.31 reads


def _pname(name: str) -> str:
    return name.replace(".", "_")


class RenderGenerator(nn.Module):
    """One skip generator (a single slot) with frozen BatchNorm statistics, rendering at its own ``z``.

    The computation is the engine's own :class:`pipeline.generator.SkipGenerator` (``slots=1``): with
    ``bn_stats`` it records the training-mode statistics at ``z``, with ``bn_frozen`` it renders with them.
    This module holds the weights and statistics under their spec names for the graph builder.
    ``forward(z)`` with ``z`` of shape (1, D, H, W) returns (1, C, out_h, out_w).
    """

    def __init__(self, net: NetConfig, weights: torch.Tensor, out_shape: tuple[int, int]):
        super().__init__()
        self.net = net
        self.specs = build_specs(net, 1)
        self.out_shape = tuple(int(v) for v in out_shape)
        weights = weights.detach().to("cpu", torch.float32).reshape(-1)
        n = sum(sp.numel for sp in self.specs)
        if weights.numel() != n:
            raise ValueError(f"the weights have {weights.numel()} values but the network needs {n}")
        self.gen = SkipGenerator(net, 1, "cpu")
        self.gen.set_slot(0, weights)
        i = 0
        for sp in self.specs:
            self.register_buffer(_pname(sp.name), weights[i:i + sp.numel].view(sp.shape).clone())
            i += sp.numel
            if sp.kind == "bn_w":
                self.register_buffer(_pname(sp.name[:-2]) + "_mean", torch.zeros(sp.shape[0]))
                self.register_buffer(_pname(sp.name[:-2]) + "_var", torch.ones(sp.shape[0]))

    def param(self, name: str) -> torch.Tensor:
        return getattr(self, _pname(name))

    def _stats(self) -> dict:
        return {sp.name[:-2]: (getattr(self, _pname(sp.name[:-2]) + "_mean"), getattr(self, _pname(sp.name[:-2]) + "_var"))
                for sp in self.specs if sp.kind == "bn_w"}

    @torch.no_grad()
    def freeze_statistics(self, z: torch.Tensor) -> None:
        """Set every BN layer's statistics to those of the activations at ``z`` (training-mode BN)."""
        stats: dict = {}
        self.gen(z, bn_stats=stats)
        for name, (mean, var) in stats.items():
            getattr(self, _pname(name) + "_mean").copy_(mean)
            getattr(self, _pname(name) + "_var").copy_(var)

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.gen(z, bn_frozen=self._stats())
        h, w = self.out_shape
        return y[:, :, :h, :w]


def build_render_generator(cfg: FitConfig, channels: int, weights: torch.Tensor, z: torch.Tensor,
                           out_shape: tuple[int, int], fp16: bool = False) -> tuple[RenderGenerator, torch.Tensor]:
    """The renderable generator with its BN statistics frozen at ``z``; returns (module, z as (1,D,H,W))."""
    net = cfg.net.with_channels(channels)
    w = torch.as_tensor(weights).detach().float().cpu()
    z = torch.as_tensor(z).detach().float().cpu()
    if z.dim() == 3:
        z = z.unsqueeze(0)
    if fp16:  # the stored values: compute the statistics with exactly them
        w, z = w.half().float(), z.half().float()
    g = RenderGenerator(net, w, out_shape)
    g.freeze_statistics(z)
    return g, z


def _metadata(result, cfg: FitConfig, channels: int, dtype: str, canvas, out_hw, weights_sha: str) -> dict:
    p = result.problem
    img = result.image
    net = cfg.net.with_channels(channels)
    conf = cfg.replace(net=net).to_dict()
    return {
        "dip_format": FORMAT,
        "dip_format_version": str(FORMAT_VERSION),
        "dip_version": VERSION,
        "task": cfg.task,
        "preset": cfg.preset,
        "config": json.dumps(conf, sort_keys=True),
        "seed": str(p.seed),
        "steps": str(getattr(result, "steps", "")),
        "source": str(p.source or p.name),
        "source_sha256": p.source_sha256 or "",
        "bits": str(img.bits),
        "mode": img.mode,
        "channels": str(channels),
        "output_size": json.dumps([int(out_hw[1]), int(out_hw[0])]),
        "canvas": json.dumps([int(canvas[1]), int(canvas[0])]),
        "output": cfg.output,
        "renders_saved_image": "true" if cfg.renders_saved_image else "false",
        "alpha": "embedded" if img.alpha is not None else "none",
        "source_metadata": encode_meta(img.meta),
        "dtype": dtype,
        "weights_sha256": weights_sha,
    }


def _to_fp16(model, names: set[str]) -> None:
    """Store the float32 initializers ``names`` as float16 and cast them back to float32 in the graph."""
    from onnx import TensorProto, helper, numpy_helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    casts = []
    for name in sorted(names):
        t = inits[name]
        arr = numpy_helper.to_array(t).astype(np.float16)
        t.CopyFrom(numpy_helper.from_array(arr, name))
        f32 = name + "__f32"
        for node in g.node:
            for k, inp in enumerate(node.input):
                if inp == name:
                    node.input[k] = f32
        casts.append(helper.make_node("Cast", [name], [f32], to=TensorProto.FLOAT, name=f"cast_{name}"))
        for vi in g.input:
            if vi.name == name:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    for c in reversed(casts):
        g.node.insert(0, c)


class _GraphBuilder:
    """Emits the ONNX graph of :class:`RenderGenerator` node by node, with static shapes.

    Written out by hand rather than traced: the TorchScript exporter (deprecated in torch 2.9+) fuses
    BN into the convolutions under new names, de-duplicates equal-valued initializers (all BN weights of
    1) and emits a shape sub-graph for every reflection pad; the dynamo exporter takes seconds and also
    rewrites the weights. Here every stored weight keeps its spec name (``s0.down.w`` ...) and value.
    """

    def __init__(self, g: RenderGenerator):
        from onnx import helper, numpy_helper
        self.h, self.nh = helper, numpy_helper
        self.g = g
        self.nodes = []
        self.inits = {}
        self.n = 0

    def const(self, name, arr):
        if name not in self.inits:
            self.inits[name] = self.nh.from_array(np.asarray(arr), name)
        return name

    def tensor(self, name):
        return self.const(name, getattr(self.g, _pname(name)).detach().cpu().numpy().astype(np.float32))

    def node(self, op, inputs, **attrs):
        self.n += 1
        out = f"{op.lower()}_{self.n}"
        self.nodes.append(self.h.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x, shape, name, stride=1):
        w = getattr(self.g, _pname(f"{name}.w"))
        cout, _cin, k, _ = w.shape
        C, H, W = shape
        p = (k - 1) // 2
        zero = self.g.net.pad == "zero"
        if k > 1 and not zero:
            pads = self.const(f"pads_{p}", np.array([0, 0, p, p, 0, 0, p, p], np.int64))
            x = self.node("Pad", [x, pads], mode="reflect")
        H, W = H + 2 * p, W + 2 * p  # padded, by the Pad node or by the convolution itself
        y = self.node("Conv", [x, self.tensor(f"{name}.w"), self.tensor(f"{name}.b")],
                      kernel_shape=[k, k], strides=[stride, stride], pads=[p] * 4 if zero else [0, 0, 0, 0],
                      group=1)
        return y, (cout, (H - k) // stride + 1, (W - k) // stride + 1)

    def bn_act(self, x, name, act=True):
        y = self.node("BatchNormalization", [x, self.tensor(f"{name}.w"), self.tensor(f"{name}.b"),
                                             self.tensor(f"{name}.mean"), self.tensor(f"{name}.var")],
                      epsilon=BN_EPS)
        return self.node("LeakyRelu", [y], alpha=float(self.g.net.negative_slope)) if act else y

    def crop(self, x, shape, h, w, center=True):
        C, H, W = shape
        if (H, W) == (h, w):
            return x
        dh, dw = ((H - h) // 2, (W - w) // 2) if center else (0, 0)
        n = self.n + 1
        st = self.const(f"crop_start_{n}", np.array([dh, dw], np.int64))
        en = self.const(f"crop_end_{n}", np.array([dh + h, dw + w], np.int64))
        ax = self.const("axes_hw", np.array([2, 3], np.int64))
        return self.node("Slice", [x, st, en, ax])

    def upsample(self, x, shape):
        scales = self.const("scales_x2", np.array([1, 1, 2, 2], np.float32))
        if self.g.net.upsample == "bilinear":  # torch align_corners=False
            y = self.node("Resize", [x, "", scales], mode="linear", coordinate_transformation_mode="half_pixel")
        else:  # torch "nearest": src = floor(dst / 2)
            y = self.node("Resize", [x, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric",
                          nearest_mode="floor")
        C, H, W = shape
        return y, (C, 2 * H, 2 * W)

    def level(self, i, x, shape):
        net = self.g.net
        d, ds = self.conv(x, shape, f"s{i}.down", stride=2)
        d = self.bn_act(d, f"s{i}.down_bn")
        d, ds = self.conv(d, ds, f"s{i}.down2")
        d = self.bn_act(d, f"s{i}.down2_bn")
        if i < net.scales - 1:
            d, ds = self.level(i + 1, d, ds)
        d, ds = self.upsample(d, ds)
        if net.channels_skip[i]:
            s, ss = self.conv(x, shape, f"s{i}.skip")
            s = self.bn_act(s, f"s{i}.skip_bn")
            h, w = min(ss[1], ds[1]), min(ss[2], ds[2])
            d = self.node("Concat", [self.crop(s, ss, h, w), self.crop(d, ds, h, w)], axis=1)
            ds = (ss[0] + ds[0], h, w)
        y = self.bn_act(d, f"s{i}.cat_bn", act=False) if net.bn_cat else d
        y, ys = self.conv(y, ds, f"s{i}.up")
        y = self.bn_act(y, f"s{i}.up_bn")
        if net.need1x1_up:
            y, ys = self.conv(y, ys, f"s{i}.up1x1")
            y = self.bn_act(y, f"s{i}.up1x1_bn")
        return y, ys

    def decoder(self, x, shape):
        net = self.g.net
        f = 2 ** net.scales
        D, H, W = shape
        n = self.n + 1
        st = self.const(f"sub_start_{n}", np.array([0, 0], np.int64))
        en = self.const(f"sub_end_{n}", np.array([H, W], np.int64))
        ax = self.const("axes_hw", np.array([2, 3], np.int64))
        step = self.const(f"sub_step_{n}", np.array([f, f], np.int64))
        x = self.node("Slice", [x, st, en, ax, step])
        xs = (D, -(-H // f), -(-W // f))
        for i in reversed(range(net.scales)):
            x, xs = self.upsample(x, xs)
            x, xs = self.conv(x, xs, f"d{i}.conv")
            x = self.bn_act(x, f"d{i}.bn")
        return x, xs

    def build(self, z_shape):
        D, H, W = z_shape
        if self.g.net.arch == "decoder":
            y, ys = self.decoder("z", (D, H, W))
        else:
            y, ys = self.level(0, "z", (D, H, W))
        y, ys = self.conv(y, ys, "out")
        y = self.node("Sigmoid", [y])
        h, w = self.g.out_shape
        y = self.crop(y, ys, h, w, center=False)
        self.nodes.append(self.h.make_node("Identity", [y], ["image"], name="image"))
        return ys[0], h, w


def to_onnx_model(result, dtype: str = "fp32"):
    """Build the ONNX ModelProto of a :class:`pipeline.api.Result` (see the module doc)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from pipeline.io import to_uint

    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"dtype must be 'fp32' or 'fp16', not {dtype!r}")
    if result.weights is None or result.z is None:
        raise ValueError("the result has no generator weights: fit it with keep_weights=True")
    p = result.problem
    cfg = p.cfg
    C = p.image.channels
    out_hw = p.out_shape
    canvas = tuple(int(v) for v in result.z.shape[-2:])
    if canvas[0] < out_hw[0] or canvas[1] < out_hw[1]:
        raise ValueError(f"z is {canvas[1]}x{canvas[0]}, smaller than the output {out_hw[1]}x{out_hw[0]}")
    fp16 = dtype == "fp16"
    g, z = build_render_generator(cfg, C, result.weights, result.z, out_hw, fp16=fp16)

    b = _GraphBuilder(g)
    c, h, w = b.build(tuple(z.shape[1:]))
    inits = list(b.inits.values())
    inits.append(numpy_helper.from_array(z.numpy().astype(np.float32), "z"))
    outputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, c, h, w])]
    img = result.image
    if img.alpha is not None:  # passed through, stored quantised exactly as the PNG holds it
        q = to_uint(img.alpha, img.bits)
        inits.append(numpy_helper.from_array(q, "alpha_q"))
        b.nodes.append(helper.make_node("Identity", ["alpha_q"], ["alpha"], name="alpha"))
        outputs.append(helper.make_tensor_value_info("alpha", TensorProto.UINT16 if img.bits == 16 else TensorProto.UINT8,
                                                     list(q.shape)))
    graph = helper.make_graph(
        b.nodes, "dip_skip_generator",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, list(z.shape))], outputs, initializer=inits,
        doc_string="Deep Image Prior generator: image = crop(sigmoid(G(z))) with the BatchNorm statistics "
                   "frozen at the embedded z. Run it with no inputs.")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="dip", producer_version=VERSION)
    if fp16:
        _to_fp16(model, {sp.name for sp in g.specs} | {"z"})
    wsha = hashlib.sha256(torch.as_tensor(result.weights).detach().float().cpu().numpy().tobytes()).hexdigest()
    for k, v in _metadata(result, cfg, C, dtype, canvas, out_hw, wsha).items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(model)
    return model


def export_result(result, path, dtype: str = "fp32") -> Path:
    """Write ``result``'s generator to ``path`` (atomically) as a self-contained ONNX file."""
    from pipeline.io import write_bytes
    path = Path(path)
    write_bytes(path, to_onnx_model(result, dtype=dtype).SerializeToString())
    return path


def read_metadata(model) -> dict:
    return {e.key: e.value for e in model.metadata_props}


# ---- a tiled image (or an ensemble): one model per tile + a layout file ------------------------------
def tiled_files(result, stem: str, dtype: str = "fp32") -> dict[str, bytes]:
    """The files of a tiled image's ONNX export, name -> bytes: ``<stem>.tNNN.onnx`` per fitted tile,
    ``<stem>.tNNN.png`` per copied tile, ``<stem>.tiles.alpha.png`` when the image has alpha, and the
    layout ``<stem>.tiles.json`` (listed last: write it last, it is the one ``dip render`` reads)."""
    from pipeline.generator import make_input
    from pipeline.io import encode_png
    from pipeline.tiling import LAYOUT_FORMAT, LAYOUT_VERSION
    lay = result.layout
    p = lay.problem
    files: dict[str, bytes] = {}
    entries = []
    for t in lay.tiles:
        e = {**t.to_dict()}
        if t.index in lay.copied:
            y0, x0, y1, x1 = t.box
            name = f"{stem}.t{t.index:03d}.png"
            files[name] = encode_png(ImageData(p.image.pixels[y0:y1, x0:x1], None, p.image.bits))
            e["image"] = name
        else:
            r = result.tiles[t.index]
            if r.weights is None:
                raise ValueError("the tiles have no generator weights: fit with keep_weights=True")
            cfg = r.problem.cfg
            if r.z is None:
                H, W = r.problem.canvas
                r = dataclasses.replace(r, z=make_input(cfg.input_kind, cfg.net.input_depth, H, W, r.problem.seed,
                                                        cfg.input_scale))
            # the tile's ImageData (pixels dropped after merging) only lends bits/mode to the metadata
            r = dataclasses.replace(r, image=ImageData(np.zeros((1, 1, p.image.channels), np.float32), None,
                                                       p.image.bits))
            name = f"{stem}.t{t.index:03d}.onnx"
            files[name] = to_onnx_model(r, dtype=dtype).SerializeToString()
            e["model"] = name
        entries.append(e)
    alpha_name = None
    if result.image.alpha is not None:
        alpha_name = f"{stem}.tiles.alpha.png"
        a = result.image.alpha
        files[alpha_name] = encode_png(ImageData(a[:, :, None], None, result.image.bits))
    H, W = lay.out_shape
    doc = {"dip_format": LAYOUT_FORMAT, "dip_format_version": LAYOUT_VERSION, "dip_version": VERSION,
           "source": p.source or p.name, "source_sha256": p.source_sha256, "task": p.cfg.task,
           "preset": p.cfg.preset, "seed": p.seed, "bits": result.image.bits, "mode": result.image.mode,
           "channels": p.image.channels, "output_size": [W, H], "factor": lay.factor, "tile": lay.tile,
           "overlap": lay.overlap, "onnx_dtype": dtype, "alpha": alpha_name,
           "renders_saved_image": p.cfg.renders_saved_image,
           "source_metadata": encode_meta(result.image.meta),
           "weights": "per tile: outer(axis_weights(h, wy), axis_weights(w, wx)) where a rule (a, ra, b, rb) "
                      "is 1, times 0.5-0.5cos(pi(i+0.5)/ra) rising on [a, a+ra) and 0 before a (when a >= 0), "
                      "times the falling mirror on [b, b+rb) and 0 after (when b >= 0); "
                      "image = sum(w * tile) / sum(w)",
           "tiles": entries}
    files[f"{stem}.tiles.json"] = json.dumps(doc, indent=1).encode()
    return files


def export_tiled(result, out_dir, stem: str | None = None, dtype: str = "fp32") -> Path:
    """Write :func:`tiled_files` into ``out_dir`` (each atomically, the layout JSON last). Returns its path."""
    from pipeline.io import write_bytes
    out_dir = Path(out_dir)
    stem = stem or Path(result.problem.source or result.problem.name).stem
    path = None
    for name, data in tiled_files(result, stem, dtype).items():
        path = out_dir / name
        write_bytes(path, data)
    return path
