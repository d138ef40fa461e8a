"""Calibration: packing user data into batches and collecting per-layer routing statistics."""

from .data import CalibrationData, prepare_calibration, read_text_file
from .statistics import LayerStatistics, StatisticsCollector, collect_statistics, run_calibration

__all__ = [
    "CalibrationData",
    "LayerStatistics",
    "StatisticsCollector",
    "collect_statistics",
    "prepare_calibration",
    "read_text_file",
    "run_calibration",
]
