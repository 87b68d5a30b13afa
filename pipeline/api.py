"""The Python API: restore an image, or many, or start a whole job; and the names a caller imports.

    from pipeline import restore
    result = restore("scan.png", task="denoise", seed=0)
    result.save("out/")            # out/scan.png + out/scan.json

    from pipeline.api import make_problem, fit_problems          # many images through the batched engine
    for problem, result in fit_problems([make_problem(p) for p in paths], device="cuda"):
        ...                                                      # (an Exception instead of a Result on failure)

    from pipeline.api import JobOptions, run_job                 # a whole job, as `dip restore` runs it
    run_job(JobOptions(inputs=["scans/"], out="restored/"))      # resumable: the same call finishes the rest

Where things live: pipeline.problem (Problem, Result, the canvas geometry), pipeline.batching
(fit_problems, Feed), pipeline.fit (fit_tiled: tiles and ensembles), pipeline.job (the Ray job).
"""
from __future__ import annotations

from pipeline.batching import Feed, Ready, fit_problems  # noqa: F401
from pipeline.fit import fit_tiled  # noqa: F401
from pipeline.problem import Problem, Result, make_problem, metrics  # noqa: F401


def restore(image, task: str = "denoise", *, mask=None, reference=None, preset: str | None = None,
            scale: int | None = None, steps: int | None = None, seed: int = 0, device: str = "auto",
            keep_weights: bool = False, use_kernels: bool | None = None, **overrides) -> Result:
    """Restore one image. ``image``: a path, an ImageData, or an array. Returns a :class:`Result`."""
    p = make_problem(image, task=task, mask=mask, reference=reference, preset=preset, scale=scale,
                     seed=seed, steps=steps, **overrides)
    if p.cfg.ensemble > 1 or p.cfg.cuts(*p.image.shape):  # members and tiles: boxes of one image, merged
        fits = fit_tiled([p], device=device, slots=p.cfg.ensemble, auto=False, keep_weights=keep_weights,
                         use_kernels=use_kernels)
    else:
        fits = fit_problems([p], device=device, slots=1, keep_weights=keep_weights, use_kernels=use_kernels)
    for _p, r in fits:
        if isinstance(r, Exception):
            raise r
        return r
    raise RuntimeError("no result")  # pragma: no cover


def __getattr__(name):
    if name in ("JobOptions", "run_job"):  # the job imports Ray lazily; its options are plain Python
        from pipeline.job import JobOptions, run_job
        return {"JobOptions": JobOptions, "run_job": run_job}[name]
    raise AttributeError(name)
