"""What a fit costs: parameters, arithmetic and memory traffic of one step, counted from the NetConfig.

An image's cost is its steps times the cost of one step, and both are the same on every device, so they
can be counted (and compared between presets) on any machine. Every result's JSON carries them under
``"work"`` (:func:`work_record`); ``dip bench speed`` prints them per preset and size.

Arithmetic (:func:`step_flops`): 2 FLOPs per multiply-add of every convolution, forward and backward.
The backward of a convolution computes the gradient of its weights (as much as its forward) and of its
input (as much again), except where the input is the fixed network input z (the first scale's
convolutions), which needs no gradient. For super-resolution the Lanczos2 downsampler of the data term
counts too (forward, and the gradient of its input). BatchNorm, activations, padding and the optimiser
are left out: they are memory-bound, and :func:`step_bytes` counts them instead. The count equals
``torch.utils.flop_counter.FlopCounterMode``'s for a step (tested).

Memory traffic (:func:`step_bytes`), a model of what a step reads and writes in DRAM, in float32:

* forward, per operation, the elements it reads and writes: a reflection pad reads its input and writes
  the padded copy; a convolution reads its (padded) input and writes its output; a training-mode
  BatchNorm reads its input twice (statistics, then normalisation) and writes its output; a LeakyReLU,
  the sigmoid, the upsampling and the concatenation read their inputs and write their outputs; plus the
  noisy input z + sigma n and the data term;
* backward: twice the forward's activation traffic (each operation reads its saved input and the
  incoming gradient, and writes the gradient of its input);
* parameters: 16 passes over the flat weights a step (forward and backward reads, the gradient written
  and gathered, Adam's two moments read and written, the weights read and written, the last good
  weights and the averages).

It is a model, not a measurement: eager PyTorch on a GPU moves about this much, a compiled or fused step
less. It says what zero padding (no padded copies) and fewer BatchNorms save, on every device.
"""
from __future__ import annotations

from dataclasses import dataclass

BYTES = 4  # float32
PARAM_PASSES = 16


@dataclass(frozen=True)
class StepCost:
    """One fit's step on one canvas: parameters, FLOPs (forward + backward) and modelled bytes."""

    params: int
    flops: float
    bytes: float

    def record(self, steps: int) -> dict:
        return {"params": self.params, "gflop_per_step": round(self.flops / 1e9, 4),
                "bytes_per_step": int(self.bytes), "steps": int(steps),
                "gflop": round(self.flops * steps / 1e9, 2)}


def n_params(net) -> int:
    """Parameters of one generator (its out_channels as set)."""
    from pipeline.generator import build_specs
    return sum(s.numel for s in build_specs(net, 1))


def step_cost(net, canvas: tuple[int, int], factor: int = 1) -> StepCost:
    """The cost of one step of one fit of ``net`` (out_channels = the image's channels) on ``canvas``
    (output pixels, a multiple of 2**scales); ``factor``: the SR factor of the data term (1: none)."""
    H, W = (int(v) for v in canvas)
    fl = [0.0]  # FLOPs, forward + backward
    el = [0.0]  # forward activation elements read + written

    def conv(cin, cout, k, h, w, stride=1, grad_input=True):
        ho, wo = h // stride, w // stride
        mac = cin * cout * k * k * ho * wo
        fl[0] += 2 * mac * (3 if grad_input else 2)
        p = (k - 1) // 2
        n_in = cin * h * w
        if k > 1 and net.pad == "reflect":
            padded = cin * (h + 2 * p) * (w + 2 * p)
            el[0] += n_in + padded
            n_in = padded
        el[0] += n_in + cout * ho * wo
        return ho, wo

    def bn(c, h, w, act=True):
        el[0] += 3 * c * h * w + (2 * c * h * w if act else 0)

    def level(i, cin, h, w):
        cd, cu, cs = net.channels_down[i], net.channels_up[i], net.channels_skip[i]
        first = i == 0  # its input is z
        h2, w2 = conv(cin, cd, net.filter_down, h, w, 2, grad_input=not first)
        bn(cd, h2, w2)
        conv(cd, cd, net.filter_down, h2, w2)
        bn(cd, h2, w2)
        k = cd
        if i < net.scales - 1:
            level(i + 1, cd, h2, w2)
            k = net.channels_up[i + 1]
        el[0] += k * h2 * w2 + k * h * w  # upsampling
        if cs:
            conv(cin, cs, net.filter_skip, h, w, grad_input=not first)
            bn(cs, h, w)
            el[0] += 2 * (cs + k) * h * w  # concatenation
        if net.bn_cat:
            bn(cs + k, h, w, act=False)
        conv(cs + k, cu, net.filter_up, h, w)
        bn(cu, h, w)
        if net.need1x1_up:
            conv(cu, cu, 1, h, w)
            bn(cu, h, w)

    def decoder(cin):
        f = 2 ** net.scales
        h, w = H // f, W // f
        el[0] += 2 * cin * h * w  # z taken at the coarsest scale
        for i in reversed(range(net.scales)):
            el[0] += cin * h * w + 4 * cin * h * w  # upsampling
            h, w = 2 * h, 2 * w
            conv(cin, net.channels_up[i], net.filter_up, h, w, grad_input=i < net.scales - 1)
            bn(net.channels_up[i], h, w)
            cin = net.channels_up[i]

    D, C = net.input_depth, net.out_channels
    el[0] += 3 * D * H * W  # z + sigma * noise
    if net.arch == "decoder":
        decoder(D)
    else:
        level(0, D, H, W)
    conv(net.channels_up[0], C, 1, H, W)
    el[0] += 2 * C * H * W  # sigmoid
    if factor > 1:  # the Lanczos2 downsampler: replication pad, then the two separable passes
        K, p = 4 * factor, (4 * factor - factor) // 2
        mac = K * C * ((H + 2 * p) * (W // factor) + (H // factor) * (W // factor))
        fl[0] += 2 * mac * 2  # forward, and the gradient of its input (the taps are constants)
        el[0] += C * (H * W + (H + 2 * p) * (W + 2 * p)) + 2 * C * (H + 2 * p) * (W // factor)
        el[0] += 2 * C * (H // factor) * (W // factor)
    el[0] += 4 * C * (H // factor) * (W // factor)  # the data term: residual, mask, square, sum
    params = n_params(net)
    return StepCost(params=params, flops=fl[0], bytes=BYTES * (3 * el[0] + PARAM_PASSES * params))


def cost_for(cfg, canvas: tuple[int, int], channels: int) -> StepCost:
    """:func:`step_cost` of a FitConfig's network for an image with ``channels`` colour channels."""
    return step_cost(cfg.net.with_channels(channels), canvas, cfg.factor)


def work_record(cfg, canvas: tuple[int, int], channels: int, steps: int) -> dict:
    """The ``work`` object of one fit's result: ``params``, ``gflop_per_step``, ``bytes_per_step``,
    ``steps`` (the steps run, distillation included) and ``gflop`` (the total)."""
    return cost_for(cfg, canvas, channels).record(steps)


def add_work(records: list[dict]) -> dict | None:
    """The ``work`` of an image made of several fits (tiles, ensemble members): the steps and GFLOP are
    summed, ``gflop_per_step`` and ``bytes_per_step`` are the means per fit-step, ``fits`` counts them."""
    recs = [r for r in records if r]
    if not recs:
        return None
    steps = sum(r["steps"] for r in recs)
    gflop = sum(r["gflop"] for r in recs)
    byts = sum(r["bytes_per_step"] * r["steps"] for r in recs)
    return {"params": recs[0]["params"], "gflop_per_step": round(gflop / max(steps, 1), 4),
            "bytes_per_step": int(byts / max(steps, 1)), "steps": steps, "gflop": round(gflop, 2),
            "fits": len(recs)}


def fmt_gflop(g: float) -> str:
    """A total of GFLOP for people: '812 GFLOP', '3.4 TFLOP', '1.2 PFLOP'."""
    for unit, scale in (("PFLOP", 1e6), ("TFLOP", 1e3)):
        if g >= scale:
            return f"{g / scale:.{1 if g < 100 * scale else 0}f} {unit}"
    return f"{g:.{1 if 0 < g < 100 else 0}f} GFLOP"

