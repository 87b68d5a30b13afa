"""The runnable examples in the docstrings of the pure parts (canvas geometry, tile planning, the physics,
the job's options) are tests too: they must say what the code does."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["pipeline.problem", "pipeline.tiling", "pipeline.operators", "pipeline.job.options", "pipeline.config",
           "pipeline.stopping", "pipeline.bench.variants"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0, f"{name} has no examples"
    assert res.failed == 0
