"""Calibration: reading user data (files, folders, Hub datasets), packing it into batches, and collecting
per-layer routing statistics."""

from .data import CalibrationData, prepare_calibration
from .sources import read_calibration_source
from .statistics import LayerStatistics, StatisticsCollector, collect_statistics, run_calibration

__all__ = [
    "CalibrationData",
    "LayerStatistics",
    "StatisticsCollector",
    "collect_statistics",
    "prepare_calibration",
    "read_calibration_source",
    "run_calibration",
]
