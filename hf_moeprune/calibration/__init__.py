"""Calibration: packing user data into batches and collecting per-layer routing statistics."""

from .data import CalibrationData, prepare_calibration
from .statistics import LayerStatistics, StatisticsCollector, collect_statistics, run_calibration

__all__ = [
    "CalibrationData",
    "LayerStatistics",
    "StatisticsCollector",
    "collect_statistics",
    "prepare_calibration",
    "run_calibration",
]
