"""Expert methods: one sub-package per method, each registering itself with `register_method`.

Every sub-package of this folder is imported here, so adding a method means adding one folder.
"""

import importlib
import pkgutil

from .base import ExpertMethod, Needs, UnitResult
from .registry import get_method, register_method, registered_methods

for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ExpertMethod", "Needs", "UnitResult", "get_method", "register_method", "registered_methods"]
