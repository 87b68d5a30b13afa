"""The options of a job: one typed object, which the CLI builds from `dip restore`'s arguments and Python
can build too (``pipeline.api.run_job(JobOptions(...))``). It is written into the manifest's run record.

:Examples:

>>> o = JobOptions(inputs=["scans/"], out="restored/", steps="auto", max_memory=20)
>>> o.check()
>>> o.max_memory_bytes == 20 * 2 ** 30
True
>>> o.config_for("cuda").preset, o.config_for("cpu").preset      # a CPU without --preset: the light one
('denoise', 'denoise-lite')
>>> JobOptions(inputs=["a.png"], out="o", tile=4).check()
Traceback (most recent call last):
...
ValueError: --tile 4: tiles need at least 8 pixels a side
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ROW_FIELDS = ("task", "preset", "steps", "seed", "scale")  # what a manifest row may set per image


@dataclass
class JobOptions:
    """Everything `dip restore` takes. Paths are strings; ``steps`` is "auto", a number, or None."""

    inputs: list[str] = field(default_factory=list)
    out: str = "out"
    task: str = "denoise"
    mask: str | None = None
    scale: int | None = None
    reference: str | None = None
    preset: str | None = None
    steps: int | str | None = None
    seed: int = 0
    device: str = "auto"
    glob: str = "*"
    slots: int | None = None
    precision: str | None = None
    output: str | None = None
    distill_steps: int | None = None
    ensemble: int | None = None
    tile: int | None = None
    tile_overlap: int | None = None
    max_memory: float | None = None  # GiB
    overwrite: bool = False
    address: str | None = None
    actors: int | None = None
    cpus_per_fit: int | None = None  # CPU actors: cores (torch threads) per actor; default 1
    max_retries: int = 3
    dashboard_host: str | None = None
    export_onnx: bool = True
    onnx_dtype: str = "fp32"
    reference_kernels: bool = False
    quiet: bool = False

    @property
    def max_memory_bytes(self) -> int | None:
        return int(self.max_memory * 2 ** 30) if self.max_memory else None

    @property
    def tiling(self) -> dict:
        """The tiling options that were given (they are part of each image's job hash)."""
        return {k: v for k, v in (("tile", self.tile), ("tile_overlap", self.tile_overlap),
                                  ("max_memory", self.max_memory)) if v}

    def replace(self, **kw) -> "JobOptions":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """ValueError for options that cannot make a job (a manifest row's own options are checked per row)."""
        self.config_for("cuda")
        if self.tile is not None and self.tile < 8:
            raise ValueError(f"--tile {self.tile}: tiles need at least 8 pixels a side")
        if self.tile_overlap is not None and (self.tile is None or not 0 <= self.tile_overlap < self.tile / 2):
            raise ValueError(f"--tile-overlap {self.tile_overlap}: needs --tile, and 0 <= overlap < tile/2")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError("--max-memory must be positive (GiB)")
        if self.cpus_per_fit is not None and self.cpus_per_fit < 1:
            raise ValueError("--cpus-per-fit must be at least 1")
        if self.actors is not None and self.actors < 1:
            raise ValueError("--actors must be at least 1")

    def row_options(self, row: dict | None = None) -> dict:
        """task, preset, steps, seed and scale of one image: its manifest row's, else the job's."""
        row = row or {}
        return {k: row.get(k, getattr(self, k)) for k in ROW_FIELDS}

    def uses_cpu_default(self, device_type: str, row: dict | None = None) -> bool:
        """Whether an image gets the CPU's light default preset (no preset asked for, on a CPU)."""
        return device_type == "cpu" and self.row_options(row)["preset"] is None

    def config_for(self, device_type: str, row: dict | None = None):
        """The FitConfig of one image on a device type: the options, overridden by its manifest row."""
        from pipeline.config import cpu_default_preset, make_config
        o = self.row_options(row)
        preset = cpu_default_preset(o["task"], o["scale"]) if self.uses_cpu_default(device_type, row) else o["preset"]
        over = {"steps": o["steps"], "seed": o["seed"], "output": self.output, "precision": self.precision,
                "distill_steps": self.distill_steps, "ensemble": self.ensemble}
        return make_config(o["task"], preset=preset, scale=o["scale"], **over)
