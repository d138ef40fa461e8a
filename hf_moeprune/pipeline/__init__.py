"""The calibration pipeline: runs every method's passes, in memory or streamed layer by layer from shards."""

from .observe import Observation
from .units import Unit

__all__ = ["Observation", "Unit"]
