"""`dip restore` on Ray: find the inputs, fit them on long-lived actors, write every result as it finishes.

    from pipeline.job import JobOptions, run_job
    rc = run_job(JobOptions(inputs=["scans/"], out="restored/", task="denoise"))

The rooms of the job, each one concern:

- :mod:`~pipeline.job.options`: :class:`JobOptions`, the one typed object a job is configured by (the CLI
  builds it from `dip restore`'s arguments);
- :mod:`~pipeline.job.manifest`: the inputs (files, folders, CSV/JSONL manifests) and OUT/dip-manifest.json;
- :mod:`~pipeline.job.resume`: the job hash of an image, and what is already done;
- :mod:`~pipeline.job.pool`: Ray, the workers, backpressure, retries of dead actors;
- :mod:`~pipeline.job.actors`: the Ray actor (:class:`~pipeline.job.actors.FitWorker`) and its engine thread;
- :mod:`~pipeline.job.outputs`: an image's files, written atomically, the JSON last;
- :mod:`~pipeline.job.progress`: what the user sees while it runs;
- :mod:`~pipeline.job.driver`: the loop that ties them together, signals, the summary;
- :mod:`~pipeline.job.report`: OUT/report.html.

Ray and torch are imported only when a job runs (``import pipeline.job`` is cheap).
"""
from __future__ import annotations

from pipeline.job.options import JobOptions

__all__ = ["JobOptions", "run_job"]


def run_job(opts: JobOptions, *, owns_process: bool = False) -> int:
    """Run a whole job (what `dip restore` runs); returns its exit code (0 all done, 1 some not, 2 usage,
    130 interrupted). The same call again finishes what is left. ``owns_process`` is for the `dip` command
    only (:func:`pipeline.job.driver.run`)."""
    from pipeline.job.driver import run
    return run(opts, owns_process=owns_process)
