"""The Deep Image Prior generator: the original 'skip' encoder-decoder, for B independent fits at once.

B generators with the same architecture are stacked along the channel axis: the activations of
slot ``s`` are channels ``[s*C, (s+1)*C)`` of a ``(1, B*C, H, W)`` tensor, every convolution is a
grouped convolution with ``groups=B``, and BatchNorm normalises each of the ``B*C`` channels over its
own ``H x W`` pixels. So the statistics of one image never mix with another's, and slot ``s`` computes
exactly what a single generator (``slots=1``) with the same weights computes.

All weights live in one flat buffer, layer-major and slot-minor: layer ``l`` occupies
``[offset_l, offset_l + B*n_l)`` and slot ``s`` owns ``[offset_l + s*n_l, offset_l + (s+1)*n_l)``.
Each layer's parameter is a view into that buffer and its gradient a view into a flat gradient
buffer, so the optimiser updates all B fits with a handful of whole-buffer kernels.

Per scale ``i`` (models/skip.py):
    deeper = [conv s2 (filter_down) -> BN -> act -> conv (filter_down) -> BN -> act -> scale i+1] -> up x2
    skip   = conv (filter_skip) -> BN -> act                      (when channels_skip[i] > 0)
    y = BN(concat(skip, deeper)) -> conv (filter_up) -> BN -> act [-> conv 1x1 -> BN -> act]
and the output is ``sigmoid(conv1x1(y_0))``. Convolutions pad by reflection (``NetConfig.pad="zero"``: with
zeros, inside the convolution); ``NetConfig.bn_cat=False`` leaves out the BN after the concatenation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import NetConfig

BN_EPS = 1e-5
CONV_MODES = ("auto", "grouped", "loop")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]  # per slot
    offset: int  # start of this layer's block in the flat buffer
    kind: str  # "conv_w" | "conv_b" | "bn_w" | "bn_b"
    fan_in: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def build_specs(net: NetConfig, slots: int) -> list[ParamSpec]:
    """Parameter layout in forward order; the order also fixes the initialisation order."""
    specs: list[ParamSpec] = []
    offset = 0

    def add(name, shape, kind, fan_in):
        nonlocal offset
        specs.append(ParamSpec(name, tuple(shape), offset, kind, fan_in))
        offset += slots * math.prod(shape)

    def conv(name, cin, cout, k):
        add(f"{name}.w", (cout, cin, k, k), "conv_w", cin * k * k)
        add(f"{name}.b", (cout,), "conv_b", cin * k * k)

    def bn(name, c):
        add(f"{name}.w", (c,), "bn_w", 0)
        add(f"{name}.b", (c,), "bn_b", 0)

    n = net.scales
    cin = net.input_depth
    if net.arch == "decoder":  # coarsest scale first
        for i in reversed(range(n)):
            conv(f"d{i}.conv", cin, net.channels_up[i], net.filter_up)
            bn(f"d{i}.bn", net.channels_up[i])
            cin = net.channels_up[i]
        conv("out", cin, net.out_channels, 1)
        return specs
    for i in range(n):
        cd, cu, cs = net.channels_down[i], net.channels_up[i], net.channels_skip[i]
        k = net.channels_up[i + 1] if i < n - 1 else cd
        if cs:
            conv(f"s{i}.skip", cin, cs, net.filter_skip)
            bn(f"s{i}.skip_bn", cs)
        conv(f"s{i}.down", cin, cd, net.filter_down)
        bn(f"s{i}.down_bn", cd)
        conv(f"s{i}.down2", cd, cd, net.filter_down)
        bn(f"s{i}.down2_bn", cd)
        if net.bn_cat:
            bn(f"s{i}.cat_bn", cs + k)
        conv(f"s{i}.up", cs + k, cu, net.filter_up)
        bn(f"s{i}.up_bn", cu)
        if net.need1x1_up:
            conv(f"s{i}.up1x1", cu, cu, 1)
            bn(f"s{i}.up1x1_bn", cu)
        cin = cd
    conv("out", net.channels_up[0], net.out_channels, 1)
    return specs


def init_slot_vector(specs: list[ParamSpec], seed: int) -> torch.Tensor:
    """One slot's initial weights (float32, CPU), in spec order, from its own seed.

    PyTorch's default initialisation, as the original used: conv weights and biases uniform in
    +-1/sqrt(fan_in), BatchNorm weight 1 and bias 0. Depends only on the seed and the architecture.
    """
    g = torch.Generator().manual_seed(int(seed))
    parts = []
    for sp in specs:
        if sp.kind in ("conv_w", "conv_b"):
            bound = 1.0 / math.sqrt(sp.fan_in)
            parts.append(torch.rand(sp.numel, generator=g, dtype=torch.float64).mul_(2 * bound).sub_(bound).float())
        elif sp.kind == "bn_w":
            parts.append(torch.ones(sp.numel))
        else:
            parts.append(torch.zeros(sp.numel))
    return torch.cat(parts)


class SkipGenerator(nn.Module):
    """B stacked skip generators. Input (1, B*input_depth, H, W) -> output (B, out_channels, H, W)."""

    def __init__(self, net: NetConfig, slots: int = 1, device: torch.device | str = "cpu", conv: str = "auto"):
        super().__init__()
        self.net = net
        self.slots = slots
        self.specs = build_specs(net, slots)
        self.per_slot = sum(sp.numel for sp in self.specs)
        # conv="grouped": one grouped convolution for all slots; "loop": one convolution per slot;
        # "auto": grouped on CUDA, the loop on the CPU (where it rounds exactly like a single fit)
        if conv not in CONV_MODES:
            raise ValueError(f"conv must be one of {CONV_MODES}, not {conv!r}")
        self.grouped = conv == "grouped" or (conv == "auto" and torch.device(device).type != "cpu")
        total = slots * self.per_slot
        device = torch.device(device)
        self.register_buffer("flat", torch.zeros(total, device=device), persistent=False)
        self.register_buffer("flat_grad", torch.zeros(total, device=device), persistent=False)
        self._params: dict[str, nn.Parameter] = {}
        for sp in self.specs:
            n = slots * sp.numel
            shape = (slots * sp.shape[0],) + sp.shape[1:]
            self._params[sp.name] = nn.Parameter(self.flat[sp.offset:sp.offset + n].view(shape))
        # for expanding per-slot scalars to the flat layout: the slot of every weight (value[s] repeated
        # n_l times, layer by layer), made once; int32 halves its memory. One slot needs no table.
        slot_of = None
        if slots > 1:
            counts = torch.tensor([sp.numel for sp in self.specs for _ in range(slots)])
            slot_of = torch.repeat_interleave(torch.arange(slots, dtype=torch.int32).repeat(len(self.specs)),
                                              counts).to(device)
        self.register_buffer("_slot_of", slot_of, persistent=False)

    # ---- weights --------------------------------------------------------------------------------
    def parameters_flat(self) -> torch.Tensor:
        return self.flat

    def backward_flat(self, loss: torch.Tensor) -> torch.Tensor:
        """Gradients of ``loss`` into ``flat_grad`` (the flat layout) with one copy, instead of one
        accumulation kernel per parameter tensor."""
        params = [self._params[sp.name] for sp in self.specs]
        grads = torch.autograd.grad(loss, params)
        torch.cat([g.reshape(-1) for g in grads], out=self.flat_grad)
        return self.flat_grad

    def expand(self, per_slot: torch.Tensor) -> torch.Tensor:
        """(B,) -> (total,) in the flat layout, with no host synchronisation. Read-only: with one slot it is
        a broadcast view.

        One gather through a precomputed table: repeat_interleave, which rebuilt the table on every call,
        took 17% of a CPU step of the paper's net (64², 2 slots), and a batched CPU fit was then slower
        per fit than a single one."""
        if self.slots == 1:
            return per_slot.reshape(1).expand(self.flat.numel())
        return per_slot.index_select(0, self._slot_of)

    def slot_indices(self, s: int) -> list[slice]:
        return [slice(sp.offset + s * sp.numel, sp.offset + (s + 1) * sp.numel) for sp in self.specs]

    @torch.no_grad()
    def get_slot(self, s: int, source: torch.Tensor | None = None) -> torch.Tensor:
        src = self.flat if source is None else source
        return torch.cat([src[sl] for sl in self.slot_indices(s)])

    @torch.no_grad()
    def set_slot(self, s: int, vec: torch.Tensor, target: torch.Tensor | None = None) -> None:
        dst = self.flat if target is None else target
        vec = vec.to(dst.device, dst.dtype)
        i = 0
        for sp, sl in zip(self.specs, self.slot_indices(s)):
            dst[sl].copy_(vec[i:i + sp.numel])
            i += sp.numel

    def init_slot(self, s: int, seed: int) -> None:
        self.set_slot(s, init_slot_vector(self.specs, seed))

    # ---- forward --------------------------------------------------------------------------------
    def _views(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each layer's parameter as a view into another flat buffer laid out like the live one."""
        return {sp.name: weights[sp.offset:sp.offset + self.slots * sp.numel].view(
            (self.slots * sp.shape[0],) + sp.shape[1:]) for sp in self.specs}

    def forward(self, z: torch.Tensor, weights: torch.Tensor | None = None, bn_stats: dict | None = None,
                bn_frozen: dict | None = None) -> torch.Tensor:
        """``weights``: an alternative flat buffer (e.g. the averaged weights); default the live ones.

        BatchNorm runs in training mode (the statistics of the current activations), as DIP does.
        ``bn_stats``: a dict that receives each BN layer's (mean, biased variance), per channel.
        ``bn_frozen``: such a dict; BN then uses these statistics instead (what an export renders).
        """
        P = self._params if weights is None else self._views(weights)
        B = self.slots
        net = self.net
        slope = net.negative_slope

        zero_pad = net.pad == "zero"

        def conv(x, name, stride=1):
            w = P[f"{name}.w"]
            k = w.shape[-1]
            p = (k - 1) // 2 if zero_pad else 0
            if k > 1 and not zero_pad:
                x = F.pad(x, ((k - 1) // 2,) * 4, mode="reflect")
            if B > 1 and not self.grouped:
                # On the CPU a loop of per-slot convolutions costs the same as one grouped convolution
                # and rounds exactly like a single fit, so a batched fit equals B single fits bit for bit.
                # On a GPU each per-slot convolution is an ordinary (ungrouped) one, for which cuDNN
                # has its fastest kernels; whether that beats one grouped launch is measured by
                # `dip bench speed --conv grouped,loop`.
                xs, ws, bs = x.chunk(B, 1), w.chunk(B, 0), P[f"{name}.b"].chunk(B, 0)
                return torch.cat([F.conv2d(xs[s], ws[s], bs[s], stride=stride, padding=p) for s in range(B)], 1)
            return F.conv2d(x, w, P[f"{name}.b"], stride=stride, padding=p, groups=B)

        def bn_act(x, name, act=True):
            if bn_frozen is not None:
                mean, var = bn_frozen[name]
                x = F.batch_norm(x, mean, var, P[f"{name}.w"], P[f"{name}.b"], training=False, eps=BN_EPS)
            else:
                if bn_stats is not None:
                    bn_stats[name] = (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False))
                x = F.batch_norm(x, None, None, P[f"{name}.w"], P[f"{name}.b"], training=True, momentum=0.0,
                                 eps=BN_EPS)
            return F.leaky_relu(x, slope) if act else x

        def concat(a, b):
            h = min(a.shape[-2], b.shape[-2])
            w = min(a.shape[-1], b.shape[-1])
            a, b = _center_crop(a, h, w), _center_crop(b, h, w)
            ca, cb = a.shape[1] // B, b.shape[1] // B
            return torch.cat([a.view(1, B, ca, h, w), b.view(1, B, cb, h, w)], 2).view(1, B * (ca + cb), h, w)

        def up(x):
            if net.upsample == "bilinear":
                return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            return F.interpolate(x, scale_factor=2, mode="nearest")

        def level(i, x):
            d = bn_act(conv(x, f"s{i}.down", stride=2), f"s{i}.down_bn")
            d = bn_act(conv(d, f"s{i}.down2"), f"s{i}.down2_bn")
            if i < net.scales - 1:
                d = level(i + 1, d)
            d = up(d)
            if net.channels_skip[i]:
                s = bn_act(conv(x, f"s{i}.skip"), f"s{i}.skip_bn")
                d = concat(s, d)
            y = bn_act(d, f"s{i}.cat_bn", act=False) if net.bn_cat else d
            y = bn_act(conv(y, f"s{i}.up"), f"s{i}.up_bn")
            if net.need1x1_up:
                y = bn_act(conv(y, f"s{i}.up1x1"), f"s{i}.up1x1_bn")
            return y

        def decoder(x):
            f = 2 ** net.scales
            x = x[..., ::f, ::f]  # z at the coarsest scale: every f-th pixel keeps its distribution
            for i in reversed(range(net.scales)):
                x = bn_act(conv(up(x), f"d{i}.conv"), f"d{i}.bn")
            return x

        y = conv(decoder(z) if net.arch == "decoder" else level(0, z), "out")
        y = torch.sigmoid(y.float())
        return y.view(B, net.out_channels, y.shape[-2], y.shape[-1])


def _center_crop(x, h, w):
    dh, dw = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    if dh == 0 and dw == 0 and x.shape[-2] == h and x.shape[-1] == w:
        return x
    return x[..., dh:dh + h, dw:dw + w]


def make_input(kind: str, depth: int, h: int, w: int, seed: int, scale: float = 0.1) -> torch.Tensor:
    """The fixed input z of one fit, (depth, h, w) float32 on CPU, from the fit's own seed.

    "noise": uniform in [0, scale) (the original's get_noise with var=1/10);
    "meshgrid": two channels, x and y coordinates in [0, 1].
    """
    if kind == "noise":
        g = torch.Generator().manual_seed(int(seed) ^ 0x5EED)
        return torch.rand(depth, h, w, generator=g) * scale
    if kind == "meshgrid":
        if depth != 2:
            raise ValueError("meshgrid input needs depth 2")
        ys = torch.arange(h, dtype=torch.float32) / max(h - 1, 1)
        xs = torch.arange(w, dtype=torch.float32) / max(w - 1, 1)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([xx, yy])
    raise ValueError(f"unknown input kind {kind!r}")
