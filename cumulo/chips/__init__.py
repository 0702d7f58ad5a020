"""Chip catalog and performance model: specs with sources, roofline predictions, export-control metrics.

`load_catalog()` reads the catalog (plus the calibrated `local` chip), `predict()` gives a `Prediction`,
`classify()` the TPP / 3A090 estimate. Torch and matplotlib load only inside calibrate.py and plot.py.
"""

from cumulo.chips.catalog import Catalog, Chip, Figure, Source, get_chip, load_catalog
from cumulo.chips.export import ExportClass, classify
from cumulo.chips.predict import Assumptions, Prediction, predict
from cumulo.chips.presets import PRESETS, ModelShape, resolve_model

__all__ = [
    "PRESETS",
    "Assumptions",
    "Catalog",
    "Chip",
    "ExportClass",
    "Figure",
    "ModelShape",
    "Prediction",
    "Source",
    "classify",
    "get_chip",
    "load_catalog",
    "predict",
    "resolve_model",
]
