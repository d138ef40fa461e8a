"""`MoEPruneConfig`: one recipe object for every expert pruning or merging method.

The config is recorded verbatim in the reduced checkpoint's `config.json` (and in the model card), so a
result can be reproduced from the checkpoint alone. Unknown keys are dropped with a warning when loading,
so checkpoints written by a newer version still load.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from . import __version__

logger = logging.getLogger(__name__)


@dataclass
class MoEPruneConfig:
    """What to do to the experts of a Mixture-of-Experts model.

    Give exactly one target: `experts_per_layer` (same count in every MoE layer), `expert_sparsity`
    (share of all experts to remove, methods may spread it unevenly over layers) or `num_experts_total`
    (experts kept over all layers). Unstructured methods (`wanda`, `owl`) need only `weight_sparsity`.

    Example:
        >>> MoEPruneConfig(method="frequency", experts_per_layer=4)
        >>> MoEPruneConfig(method="stun", expert_sparsity=0.25, weight_sparsity=0.4, unstructured="owl")
    """

    method: str = field(metadata={"help": "Registered method name, e.g. frequency, uncurl, stun, reap, wanda."})
    experts_per_layer: int | None = field(
        default=None, metadata={"help": "Experts kept in every MoE layer (uniform result)."}
    )
    expert_sparsity: float | None = field(
        default=None, metadata={"help": "Share of all routed experts to remove, in [0, 1)."}
    )
    num_experts_total: int | None = field(
        default=None, metadata={"help": "Experts kept summed over all MoE layers (global budget)."}
    )
    adaptive: bool = field(
        default=False,
        metadata={"help": "Let the method choose per-layer counts under the global budget (non-uniform)."},
    )
    weight_sparsity: float | None = field(
        default=None, metadata={"help": "Unstructured sparsity, in [0, 1): of the experts' weights for wanda/owl (option "
        "`targets` widens it), of every linear of each decoder layer for STUN's phase 2 (as its reference)."}
    )
    unstructured: str | None = field(
        default=None, metadata={"help": "Unstructured phase after expert pruning: 'wanda' or 'owl'."}
    )
    nm_pattern: tuple[int, int] | None = field(
        default=None, metadata={"help": "N:M semi-structured pattern for the unstructured phase, e.g. (2, 4)."}
    )
    top_k: int | None = field(
        default=None,
        metadata={"help": "New router top-k. Needed only when the target falls below the model's top-k."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for every random choice the method makes."})
    method_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Method-specific options, documented by each method."}
    )
    library_version: str = field(default=__version__, metadata={"help": "hf_moeprune version that ran it."})

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError("MoEPruneConfig.method must be a non-empty method name.")
        self.method = self.method.lower()
        targets = [
            name for name in ("experts_per_layer", "expert_sparsity", "num_experts_total") if getattr(self, name) is not None
        ]
        if len(targets) > 1:
            raise ValueError(f"Give one expert target, not several: {targets}.")
        for name in ("experts_per_layer", "num_experts_total", "top_k", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be a whole number, got {value!r}.")
        for name in ("expert_sparsity", "weight_sparsity"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive must be True or False, got {self.adaptive!r}.")
        if not isinstance(self.method_options, dict):
            raise ValueError(f"method_options must be a dict, got {type(self.method_options).__name__}.")
        if self.experts_per_layer is not None and self.experts_per_layer < 1:
            raise ValueError(f"experts_per_layer must be >= 1, got {self.experts_per_layer}.")
        if self.num_experts_total is not None and self.num_experts_total < 1:
            raise ValueError(f"num_experts_total must be >= 1, got {self.num_experts_total}.")
        for name in ("expert_sparsity", "weight_sparsity"):
            value = getattr(self, name)
            if value is not None and not (0.0 <= value < 1.0 and math.isfinite(value)):
                raise ValueError(f"{name} must be in [0, 1), got {value}.")
        if self.unstructured is not None:
            self.unstructured = self.unstructured.lower()
            if self.unstructured not in ("wanda", "owl"):
                raise ValueError(f"unstructured must be 'wanda' or 'owl', got {self.unstructured!r}.")
        if self.nm_pattern is not None:
            n, m = (int(v) for v in self.nm_pattern)
            if not 0 < n < m:
                raise ValueError(f"nm_pattern must be (N, M) with 0 < N < M, got {self.nm_pattern}.")
            self.nm_pattern = (n, m)
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")

    @property
    def has_expert_target(self) -> bool:
        return any(v is not None for v in (self.experts_per_layer, self.expert_sparsity, self.num_experts_total))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.nm_pattern is not None:
            data["nm_pattern"] = list(self.nm_pattern)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEPruneConfig:
        """Build a config from `to_dict()` output; keys this version does not know are dropped with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring MoEPruneConfig keys unknown to this version: %s", unknown)
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("nm_pattern") is not None:
            kwargs["nm_pattern"] = tuple(kwargs["nm_pattern"])
        return cls(**kwargs)
