"""dip: batch image restoration with the Deep Image Prior.

The public API is lazy: ``import pipeline`` does not import torch until a function is used.
"""
from pipeline.config import VERSION as __version__  # noqa: F401  (config imports only the stdlib)


def restore(image, task: str = "denoise", **options):
    """Restore one image; see :func:`pipeline.api.restore`."""
    from pipeline.api import restore as _restore
    return _restore(image, task=task, **options)


def __getattr__(name):
    if name in ("Result", "Problem", "make_problem", "fit_problems"):
        from pipeline import api
        return getattr(api, name)
    if name in ("FitConfig", "NetConfig", "PRESETS", "make_config"):
        from pipeline import config
        return getattr(config, name)
    raise AttributeError(name)
