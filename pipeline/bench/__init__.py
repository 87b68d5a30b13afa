"""Benchmarks, all in one place: ``dip bench speed|quality|study|prior`` and the tools built on them.

- :mod:`pipeline.bench.speed`: one fit against the batched engine, and the work of a step;
- :mod:`pipeline.bench.quality`: PSNR on the paper's sets, with and without ground-truth stopping;
- :mod:`pipeline.bench.study`: the efficiency study (issue 16), resumable.
"""
