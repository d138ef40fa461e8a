"""Speed and memory benchmarks of original vs reduced MoE checkpoints, expert-parallel across processes.

Entry points: `hf-moeprune bench`, `python -m hf_moeprune.bench` (see `benchmarks/bench.md`) and
`python -m hf_moeprune.bench.sweep`. The public names load lazily so the CLI's help does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BenchArgs": "args",
    "NativeAllToAllEP": "expert_parallel",
    "apply_native_expert_parallel": "expert_parallel",
    "load_for_benchmark": "expert_parallel",
    "shard_sizes": "expert_parallel",
    "run_launch": "runner",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
