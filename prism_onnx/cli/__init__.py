"""The `prism` command line, by audience: authoring (simulate, export, validate, calibrate, inspect, keys),
board (run, infer, launch, profile: the core install, no torch), measurement (demo, bench, evaluate). Each
command maps its options onto a settings object or a function of the module that does the work; `base`
holds what every command shares (one-line errors, the JSON shape, options built from settings fields)."""

from . import authoring, board, measurement  # noqa: F401 (each registers its commands on `main`)
from .base import main

__all__ = ["main"]
