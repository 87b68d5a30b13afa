"""Shared test fixtures.

``ray_session``: ONE in-process Ray instance for the whole test session (``ray.init`` takes 4-9 s; Ray 2.60
has no local_mode). It is a private local instance (``address="local"``: it never joins a cluster that
another test or process started with ``ray start``), with 2 CPUs and no dashboard; Ray's token
authentication stays on (its default). Tests that need their own Ray processes (tests/test_cluster.py)
start them as subprocesses with their own temp dirs and ports, and stop exactly those processes: no test
ever runs ``ray stop``, which would kill every Ray process on the machine, this fixture's included.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.setdefault("RAY_worker_niceness", "0")  # as dip's own local instance (pipeline.job.pool)
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


def write_png(path: Path, size=(24, 24), channels: int = 3, seed: int = 0) -> Path:
    from PIL import Image
    rng = np.random.default_rng(seed)
    h, w = size
    shape = (h, w, channels) if channels > 1 else (h, w)
    a = (np.clip(rng.random(shape) * 0.5 + 0.25, 0, 1) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def write_pngs(folder: Path, ids, size=(24, 24)) -> Path:
    """``folder/<id>.png`` for each id, the i-th from seed i (write_png); returns ``folder``."""
    for i, k in enumerate(ids):
        write_png(folder / f"{k}.png", size=size, seed=i)
    return folder


@pytest.fixture
def make_png():
    return write_png


def clean_env(**extra) -> dict:
    """The environment for a `dip` subprocess: its own embedded Ray (no inherited RAY_ADDRESS)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def dip_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)]


def run_dip(*args, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(dip_cmd(*args), env=clean_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, **kw)
