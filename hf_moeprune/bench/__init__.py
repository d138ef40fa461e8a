"""Speed and memory benchmarks of original vs reduced MoE checkpoints, expert-parallel across processes.

Entry points: `python -m hf_moeprune.bench` (see `examples/bench.md`) and `python -m hf_moeprune.bench.sweep`.
"""

from .expert_parallel import NativeAllToAllEP, apply_native_expert_parallel, load_for_benchmark, shard_sizes
from .runner import BenchArgs, run_launch

__all__ = [
    "BenchArgs",
    "NativeAllToAllEP",
    "apply_native_expert_parallel",
    "load_for_benchmark",
    "run_launch",
    "shard_sizes",
]
