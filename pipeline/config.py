"""Configuration: one dataclass for the generator, one for a fit, and the named presets.

The presets come from the original Deep Image Prior notebooks (Ulyanov et al., CVPR 2018,
github.com/DmitryUlyanov/deep-image-prior): denoising.ipynb (F16 and snail),
super-resolution.ipynb, inpainting.ipynb (kate, vase) and restoration.ipynb (barbara).
Every result's JSON carries the full config it was fitted with (``asdict(FitConfig)``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, asdict

VERSION = "0.1.0"  # the one place: pyproject.toml reads it (tool.setuptools.dynamic), dip --version prints it
TASKS = ("denoise", "jpeg", "inpaint", "sr")
SR_FACTORS = (2, 4, 8)


def check_device(device: str) -> str:
    """``device`` if dip can run on it (auto, cpu, cuda, cuda:N); a ValueError naming the choices otherwise
    (a misspelt or foreign device must not silently run on the CPU)."""
    d = str(device).strip().lower()
    if d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()):
        return d
    raise ValueError(f"unknown device {device!r}: choose auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class NetConfig:
    """The original 'skip' encoder-decoder (models/skip.py), or (``arch="decoder"``) a decoder alone in the
    style of ConvDecoder / Deep Decoder (Heckel & Hand; Darestani & Heckel): the input z taken at
    1/2**scales of the canvas, then per scale an upsampling x2, a ``filter_up`` convolution to
    ``channels_up`` (coarsest scale last in the tuple), BN and the activation; no encoder, no skips
    (``channels_down``, ``channels_skip``, ``filter_down``, ``need1x1_up`` and ``bn_cat`` are unused)."""

    input_depth: int = 32
    channels_down: tuple[int, ...] = (128, 128, 128, 128, 128)
    channels_up: tuple[int, ...] = (128, 128, 128, 128, 128)
    channels_skip: tuple[int, ...] = (4, 4, 4, 4, 4)
    filter_down: int = 3
    filter_up: int = 3
    filter_skip: int = 1
    upsample: str = "bilinear"  # or "nearest"
    need1x1_up: bool = True
    negative_slope: float = 0.2
    out_channels: int = 3  # set from the image at fit time
    # "reflect" (the original's reflection padding before every k>1 convolution) or "zero" (the
    # convolution's own zero padding: no padded copy of the activations is made)
    pad: str = "reflect"
    bn_cat: bool = True  # the BatchNorm (no activation) after each scale's concatenation, as the original
    arch: str = "skip"  # or "decoder" (above)

    # fields added after results were first made, at the value that means "as before" (FitConfig.identity_dict)
    LATER_FIELDS = {"pad": "reflect", "bn_cat": True, "arch": "skip"}

    def __post_init__(self):
        n = len(self.channels_down)
        if not (len(self.channels_up) == len(self.channels_skip) == n) or n == 0:
            raise ValueError("channels_down, channels_up and channels_skip need the same non-zero length")
        if self.upsample not in ("bilinear", "nearest"):
            raise ValueError(f"upsample must be 'bilinear' or 'nearest', not {self.upsample!r}")
        if self.pad not in ("reflect", "zero"):
            raise ValueError(f"pad must be 'reflect' or 'zero', not {self.pad!r}")
        if self.arch not in ("skip", "decoder"):
            raise ValueError(f"arch must be 'skip' or 'decoder', not {self.arch!r}")
        for k in (self.filter_down, self.filter_up, self.filter_skip):
            if k % 2 != 1:
                raise ValueError("filter sizes must be odd")

    @property
    def scales(self) -> int:
        return len(self.channels_down)

    @property
    def multiple(self) -> int:
        """The canvas side must be a multiple of this (one stride-2 conv per scale)."""
        return 2 ** self.scales

    def with_channels(self, out_channels: int) -> "NetConfig":
        return dataclasses.replace(self, out_channels=out_channels)


MAX_ENSEMBLE = 8


@dataclass(frozen=True)
class FitConfig:
    """Everything that decides a fit, apart from the image itself."""

    preset: str = "denoise"
    task: str = "denoise"
    net: NetConfig = field(default_factory=NetConfig)
    input_kind: str = "noise"  # "noise" (uniform x input_scale) or "meshgrid" (needs input_depth 2)
    input_scale: float = 0.1
    lr: float = 0.01
    steps: int = 3000  # with auto_stop: the hard cap
    auto_stop: bool = True  # stop without ground truth (pipeline/stopping.py); --steps auto
    reg_noise_std: float = 1.0 / 30.0
    ema: float = 0.99  # exponential average of the outputs (or of the weights, see `output`)
    # What the result is: "ema" = the exponential average of the outputs (the paper's; the default:
    # on F16 at 512^2 it reached 32.58 dB where "weights_ema" reached 31.67, docs/BENCHMARKS.md),
    # "weights_ema" = the generator with averaged weights evaluated at z, "last" = the generator's last
    # output at z.
    output: str = "ema"
    # With output "ema": after the fit, the generator is fitted this many more steps (at most a tenth of
    # the fit's own; z fixed, no input noise, Adam carried on) to the output average, and the saved image
    # is that generator's render at z, so the ONNX export re-renders the saved image exactly
    # (docs/onnx.md). 0: the saved image is the average itself, which no single generator renders.
    distill_steps: int = 200
    divergence_db: float = 5.0  # restore the last good weights when the loss PSNR drops by more
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    scale: int = 1  # super-resolution factor
    seed: int = 0
    # "tf32" (the original's default: cuDNN convolutions in TF32) | "fp32" | "bf16" (autocast, fp32 master
    # weights). Only matters on CUDA.
    precision: str = "tf32"
    # Fits per image, each from its own seed, their results averaged (an ensemble: on four 64^2 CPU
    # denoising crops two fits gave +0.46 dB over one, for twice the work; docs/stopping.md). The members
    # are fitted together, like the tiles of one image (pipeline.tiling), and exported as one model each.
    ensemble: int = 1
    # The optimiser and its schedule. "adam" (the original's) or "radam" (rectified Adam: plain momentum
    # SGD until the variance estimate is reliable). The learning rate of a step t (1, 2, ...) is
    # lr * min(1, t / lr_warmup) * lr_decay ** floor((t - 1) / lr_decay_every) (no warm-up when
    # lr_warmup is 0, no decay when lr_decay_every is 0).
    optimizer: str = "adam"
    lr_warmup: int = 0
    lr_decay: float = 1.0
    lr_decay_every: int = 0
    # With ema_warmup the output average's decay is min(ema, (1 + t) / (10 + t)) at step t, so a short fit's
    # average is not dominated by its first, blurry outputs (0.99 ** 100 = 0.37 of the weight is still on
    # the first 100 steps after 100 steps); False: the constant ema, as the original.
    ema_warmup: bool = False
    # Images with a side above ``tile`` input pixels are fitted as overlapping tiles of that side
    # (pipeline.tiling), each tile its own fit with its own stop; 0 = whole images (tiles only when memory
    # asks for them). A preset whose schedule and stopping rule were set at one size keeps every fit near
    # it: the light net stops a 256^2 or 512^2 fit long before it has fitted the image
    # (docs/efficiency.md). The job's --tile overrides it.
    tile: int = 0
    # Self-validation: this fraction of the known measurements (drawn from the fit's seed, so every
    # ensemble member and tile holds back its own) is left out of the data term, and the fit stops where
    # their error stops falling (pipeline.stopping.HoldoutStopper) instead of by the variance rule; 0 =
    # off. For the tasks measured on the image's own grid (denoise, jpeg, inpaint). Tried for inpainting,
    # where the held-back pixels are noise-free and scattered like the holes, and lost (stop 29: 5 % of
    # the known pixels of a 64^2 crop, about 100, are too few to follow the holes' error, and the fit
    # without them is worse; docs/efficiency.md, "Tried and lost"); no preset uses it.
    holdout: float = 0.0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")
        if self.task == "sr" and self.scale not in SR_FACTORS:
            raise ValueError(f"super-resolution scale must be one of {SR_FACTORS}, not {self.scale}")
        if self.task != "sr" and self.scale != 1:
            raise ValueError(f"--scale only applies to super-resolution (task {self.task!r})")
        if self.input_kind not in ("noise", "meshgrid"):
            raise ValueError(f"input_kind must be 'noise' or 'meshgrid', not {self.input_kind!r}")
        if self.input_kind == "meshgrid" and self.net.input_depth != 2:
            raise ValueError("a meshgrid input needs input_depth 2")
        if self.output not in ("ema", "weights_ema", "last"):
            raise ValueError(f"output must be 'ema', 'weights_ema' or 'last', not {self.output!r}")
        if self.precision not in ("fp32", "tf32", "bf16"):
            raise ValueError(f"precision must be fp32, tf32 or bf16, not {self.precision!r}")
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        if not 1 <= self.ensemble <= MAX_ENSEMBLE:
            raise ValueError(f"ensemble must be 1 to {MAX_ENSEMBLE} fits per image, not {self.ensemble}")
        if self.distill_steps < 0:
            raise ValueError("distill_steps must be >= 0")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError("ema must be in [0, 1)")
        if self.optimizer not in ("adam", "radam"):
            raise ValueError(f"optimizer must be 'adam' or 'radam', not {self.optimizer!r}")
        if self.lr_warmup < 0 or self.lr_decay_every < 0 or not 0.0 < self.lr_decay <= 1.0:
            raise ValueError("lr_warmup and lr_decay_every must be >= 0 and lr_decay in (0, 1]")
        if self.tile and self.tile < 8:
            raise ValueError(f"tile must be 0 (whole images) or at least 8 pixels a side, not {self.tile}")
        if not 0.0 <= self.holdout <= 0.5:
            raise ValueError(f"holdout must be a fraction of the known pixels in [0, 0.5], not {self.holdout}")
        if self.holdout and self.task == "sr":
            raise ValueError("holdout (self-validation) is for tasks measured on the output grid, not super-resolution")

    def cuts(self, h: int, w: int) -> bool:
        """Whether an h x w input (input pixels) is fitted as tiles of this config's own ``tile``."""
        return bool(self.tile) and max(h, w) > self.tile

    @property
    def factor(self) -> int:
        """The data term's downsampling factor: the SR scale, 1 for every other task."""
        return self.scale if self.task == "sr" else 1

    @property
    def renders_saved_image(self) -> bool:
        """Whether the result is one generator's render at z, which its ONNX export re-renders exactly
        (every output kind but a plain, undistilled output average)."""
        return self.output != "ema" or self.distill_steps > 0

    def to_dict(self) -> dict:
        return asdict(self)

    # Fields added after results were first made, with the value that means "as before": the job's hash
    # of a config leaves them out at that value, so a rerun after an upgrade still skips what is done.
    LATER_FIELDS = {"ensemble": 1, "optimizer": "adam", "lr_warmup": 0, "lr_decay": 1.0, "lr_decay_every": 0,
                    "ema_warmup": False, "tile": 0, "holdout": 0.0}

    def identity_dict(self) -> dict:
        """:meth:`to_dict` less the later fields (also the network's) at their neutral value: what the job
        hashes."""
        d = self.to_dict()
        for fields, values in ((d, self.LATER_FIELDS), (d["net"], NetConfig.LATER_FIELDS)):
            for k, v in values.items():
                if fields.get(k) == v:
                    fields.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FitConfig":
        d = dict(d)
        net = d.pop("net", {})
        net = NetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in net.items()})
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(net=net, **d)

    def replace(self, **kw) -> "FitConfig":
        return dataclasses.replace(self, **kw)


_F16_NET = NetConfig()  # get_net(32, 'skip', skip_n33d=128, skip_n33u=128, skip_n11=4, num_scales=5, bilinear)
_LIGHT_NET = NetConfig(channels_down=(32,) * 5, channels_up=(32,) * 5)  # ours: the same net at 32 channels
_DENOISE_LIGHT_NET = NetConfig(channels_down=(24,) * 5, channels_up=(24,) * 5)  # and at 24 (denoise-lite)

PRESETS: dict[str, FitConfig] = {
    # denoising.ipynb, F16: 3000 steps, lr 0.01, reg noise 1/30.
    "denoise": FitConfig(preset="denoise", task="denoise", net=_F16_NET, lr=0.01, steps=3000,
                         reg_noise_std=1 / 30),
    # denoising.ipynb, snail.jpg (real JPEG artifacts): a light net with a 3-channel input, 2400 steps.
    "jpeg": FitConfig(preset="jpeg", task="jpeg",
                      net=NetConfig(input_depth=3, channels_down=(8, 16, 32, 64, 128),
                                    channels_up=(8, 16, 32, 64, 128), channels_skip=(0, 0, 0, 4, 4)),
                      lr=0.01, steps=2400, reg_noise_std=1 / 30),
    # inpainting.ipynb, kate.png: 128-channel skips, nearest upsampling, 6000 steps.
    "inpaint": FitConfig(preset="inpaint", task="inpaint",
                         net=NetConfig(channels_skip=(128,) * 5, upsample="nearest"),
                         lr=0.01, steps=6000, reg_noise_std=0.03),
    # inpainting.ipynb, vase.png (object removal): meshgrid input, no skips.
    "inpaint-object": FitConfig(preset="inpaint-object", task="inpaint",
                                net=NetConfig(input_depth=2, channels_skip=(0,) * 5, upsample="nearest"),
                                input_kind="meshgrid", lr=0.01, steps=5000, reg_noise_std=0.03),
    # restoration.ipynb, barbara with 50% of the pixels missing: F16 net, lr 0.001, 11000 steps.
    "inpaint-sparse": FitConfig(preset="inpaint-sparse", task="inpaint", net=_F16_NET,
                                lr=0.001, steps=11000, reg_noise_std=0.03),
    # super-resolution.ipynb: x4 = 2000 steps, reg 0.03; x8 = 4000 steps, reg 0.05.
    # x2 was not in the paper; it uses the x4 settings.
    "sr2": FitConfig(preset="sr2", task="sr", scale=2, net=_F16_NET, lr=0.01, steps=2000, reg_noise_std=0.03),
    "sr4": FitConfig(preset="sr4", task="sr", scale=4, net=_F16_NET, lr=0.01, steps=2000, reg_noise_std=0.03),
    "sr8": FitConfig(preset="sr8", task="sr", scale=8, net=_F16_NET, lr=0.01, steps=4000, reg_noise_std=0.05),
    # Ours: inpainting on a CPU. The fast net (4 scales) leaves a hole's centre at its initial grey (a 16x16
    # hole in a dark 48x48 image came out at 97/255 against 15 around it); 5 scales of 32 channels reach
    # across it (hole MAE 0.5/255). Two fits from two seeds, each a fixed 6000 steps at lr 0.01, averaged
    # (the study's i-w32lx2c, stop 29, docs/efficiency.md): on the four tuning 64^2 crops 34.55 dB against
    # one fit stopped by the inpainting rule (stop 26-28's preset, i-w32l) 34.02 and inpaint-sparse's 34.66,
    # for 0.078 of its work. No early stop: the variance rule stopped fits that were still improving (house:
    # 36.24 dB at step 4500, 37.38 at 6000), and the average takes out the detail each fit draws late
    # (barbara). Holding back 5 % of the known pixels to stop on (FitConfig.holdout) lost: 33.82.
    "inpaint-lite": FitConfig(preset="inpaint-lite", task="inpaint",
                              net=_LIGHT_NET,
                              lr=0.01, steps=6000, reg_noise_std=0.03, ensemble=2, auto_stop=False),
    # Ours, from the efficiency study (docs/efficiency.md; chosen on its tuning images, reported on the
    # others): the paper's network at 24 channels a scale (1/25 of its parameters), six fits from six seeds
    # averaged, each with the output average's warm-up and stopped by the denoising rule on the light net's
    # time scales (pipeline.stopping; as a member of an ensemble, each takes the image at its variance
    # minimum). On the 4 tuning 64^2 crops of the authors' sigma=25 images: +1.12 dB over the `denoise`
    # preset for 0.150 of its work, +0.26 over BM3D (stop 31, the study's d-w24ex6l0; eight such fits scored
    # 30.07 against six's 30.00, within 0.1 dB, so the cheaper; stops 28-30 shipped four fits of 32 channels,
    # d-w32ex4l0: 29.96 for 0.175, held out +0.87 and -0.50 against BM3D).
    # Since stop 33 each member's stop also waits for its data term to reach the noise level (the rule's noise
    # floor, pipeline.stopping; d-w24ex6l0f): held out +0.59 dB at sigma 15, +0.09 at 25, the same at 50.
    # Since stop 37 that floor is 0.9 where the estimated noise is under 20/255 (d-w24ex6l0fs): held out
    # +0.34 dB at sigma 15 (31.37 against 31.03) for 1.29x the steps there, the same fits at 25 and 50.
    # Larger images are fitted as 64^2 tiles, the size it was chosen at: whole, the rule stopped 256^2 crops
    # of two tuning images 4.3-5.1 dB below their 64^2 tiles' 27.11 and 30.80 dB (128^2 tiles: 25.69 on
    # baboon), and a whole 512^2 baboon under its noisy input (docs/efficiency.md, "Image size").
    "denoise-lite": FitConfig(preset="denoise-lite", task="denoise",
                              net=_DENOISE_LIGHT_NET,
                              lr=0.01, steps=3000, reg_noise_std=1 / 30, ensemble=6, ema_warmup=True,
                              tile=64),
    # Ours, from the same study: super-resolution at 32 channels a scale, two fits from two seeds averaged,
    # 3000 steps each. At x4 on the 2 tuning 64^2 crops of Set5: +0.61 dB over `sr4` for 0.207 of its work
    # (stop 25 shipped one fit of 1500 steps, +0.10 for 0.053, which lost 0.26 dB held out; three fits of
    # 2000 steps: +0.62 for 0.213, within 0.1 dB, so the cheaper). The SR fits are still improving at their
    # cap, and single light fits vary by up to 1.2 dB between seeds, which the average takes out. x2 takes
    # x4's settings, as the paper's presets do; x8 keeps the paper's x8 schedule (4000 steps, reg 0.05)
    # with the same two fits: only x4 was measured.
    **{f"sr{f}-lite": FitConfig(preset=f"sr{f}-lite", task="sr", scale=f,
                                net=_LIGHT_NET, lr=0.01,
                                steps=steps, reg_noise_std=reg, ensemble=2)
       for f, steps, reg in ((2, 3000, 0.03), (4, 3000, 0.03), (8, 4000, 0.05))},
    # Ours: small enough for a 2-core CPU (a 128x128 image in a few minutes). 4 scales of at most 64
    # channels, about 1/20 of the paper net's arithmetic.
    "fast": FitConfig(preset="fast", task="denoise",
                      net=NetConfig(input_depth=16, channels_down=(16, 32, 64, 64),
                                    channels_up=(16, 32, 64, 64), channels_skip=(4, 4, 4, 4)),
                      lr=0.01, steps=600, reg_noise_std=1 / 30),
}

DEFAULT_PRESET = {"denoise": "denoise", "jpeg": "jpeg", "inpaint": "inpaint", "sr": "sr4"}
# What a CPU uses when no preset is asked for: a network that works for the task and finishes in minutes.
CPU_DEFAULT = {"denoise": "denoise-lite", "jpeg": "fast", "inpaint": "inpaint-lite", "sr": "sr{scale}-lite"}


def cpu_default_preset(task: str, scale: int | None = None) -> str:
    """The preset a CPU job uses for ``task`` (and an SR ``scale``, 4 when None) when none is given.

    >>> cpu_default_preset("denoise"), cpu_default_preset("sr", 8)
    ('denoise-lite', 'sr8-lite')
    """
    return CPU_DEFAULT[task].format(scale=scale or 4)


def make_config(task: str = "denoise", preset: str | None = None, scale: int | None = None,
                **overrides) -> FitConfig:
    """The config for a task: its default preset (or the named one), with overrides applied.

    ``preset="fast"`` keeps the small network but takes the task (and scale) asked for.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    if task == "sr":
        scale = 4 if scale is None else int(scale)
        if scale not in SR_FACTORS:
            raise ValueError(f"super-resolution scale must be one of {SR_FACTORS}, not {scale}")
        name = preset or f"sr{scale}"
    else:
        if scale not in (None, 1):
            raise ValueError(f"--scale only applies to super-resolution (task {task!r})")
        scale = 1
        name = preset or DEFAULT_PRESET[task]
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[name]
    if base.task != task and name != "fast":
        raise ValueError(f"preset {name!r} is for task {base.task!r}, not {task!r}")
    cfg = dataclasses.replace(base, task=task, scale=scale)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    steps = overrides.get("steps")
    if steps == "auto":
        overrides.pop("steps")
        overrides["auto_stop"] = True
    elif steps is not None:
        try:
            overrides["steps"] = int(steps)
        except (TypeError, ValueError):
            raise ValueError(f"steps must be a positive number or 'auto', not {steps!r}") from None
        overrides.setdefault("auto_stop", False)  # an explicit step count means: run exactly that many
    net_over = overrides.pop("net", None)
    if net_over:
        cfg = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, **net_over))
    return dataclasses.replace(cfg, **overrides)
