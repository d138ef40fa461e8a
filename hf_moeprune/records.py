"""The `moeprune` record kept in `config.json`: what was done, and the map from new to original experts.

The record composes across steps (merge, then prune): `groups[j]` always lists indices of the ORIGINAL
model's experts that new expert j came from, with `merge_weights[j]` their share. A layer merged with a tied
router also has `router_rows`: the router kept that many rows (its experts map onto the merged ones).
A recovery fine-tune is a step too (`kind: finetune`): it changes weights, not the expert maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from . import __version__
from .moe_layers import MoELayer
from .surgery import LayerPlan

RECORD_KEY = "moeprune"
FINETUNE_KIND = "finetune"


def initial_record(model_name: str, family: str, layers: Sequence[MoELayer], model: nn.Module) -> dict[str, Any]:
    """The record of an unmodified model: identity maps and the parameter/byte totals to compare against."""
    params, nbytes = count_parameters(model)
    return {
        "library_version": __version__,
        "base_model": hub_id_or_none(model_name),
        "family": family,
        "uniform": True,
        "steps": [],
        "layers": {
            layer.path: {
                "original_num_experts": layer.num_experts,
                "num_experts": layer.num_experts,
                "top_k": layer.top_k,
                "groups": [[e] for e in range(layer.num_experts)],
                "merge_weights": [[1.0] for _ in range(layer.num_experts)],
            }
            for layer in layers
        },
        "parameters": {"before": params, "after": params},
        "bytes": {"before": nbytes, "after": nbytes},
    }


def looks_like_hub_repo_id(name: str | None) -> bool:
    """True for `org/name` or `name` Hub ids; False for local paths (absolute, `./x`, `~/x`, existing folders)."""
    import os
    from pathlib import Path

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or os.path.isabs(name) or name.startswith((".", "~")) or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_id_or_none(name: str | None) -> str | None:
    """`name` when it names a Hub model, None for a local folder: a card must not publish a machine's path
    as the base model (the CLI's `--base-model` names the Hub id such a folder came from)."""
    return name if looks_like_hub_repo_id(name) else None


def compose_layer(entry: dict[str, Any], plan: LayerPlan, top_k: int) -> dict[str, Any]:
    """Apply a layer plan to a layer's record, mapping new experts back to original ones."""
    groups, weights = entry["groups"], entry["merge_weights"]
    new_groups, new_weights = [], []
    for group, group_weights in zip(plan.groups, plan.normalised_weights(), strict=True):
        merged: dict[int, float] = {}
        for current, share in zip(group, group_weights, strict=True):
            for original, inner in zip(groups[current], weights[current], strict=True):
                merged[original] = merged.get(original, 0.0) + share * inner
        originals = sorted(merged)
        new_groups.append(originals)
        new_weights.append([round(merged[o], 6) for o in originals])
    tied = {"router_rows": entry["num_experts"]} if plan.tied_router else {}
    return {**entry, "num_experts": len(plan.groups), "top_k": top_k, "groups": new_groups,
            "merge_weights": new_weights, **tied}


def finetune_step(
    args: dict[str, Any], data: dict[str, Any], tokens_seen: int, teacher: str | None, train_loss: float
) -> dict[str, Any]:
    """The record of a fine-tune: its arguments, the data as calibration sets are recorded (description, sizes,
    SHA-256 of the token ids), the tokens trained on, and the teacher distilled from (None: no distillation)."""
    return {"kind": FINETUNE_KIND, "method": FINETUNE_KIND, "config": args, "calibration": data,
            "tokens_seen": tokens_seen, "teacher": teacher, "train_loss": round(train_loss, 6)}


def is_finetune_step(step: dict[str, Any]) -> bool:
    return step.get("kind") == FINETUNE_KIND


def is_uniform(record: dict[str, Any]) -> bool:
    return len({entry["num_experts"] for entry in record["layers"].values()}) <= 1


def has_tied_router(record: dict[str, Any]) -> bool:
    return any("router_rows" in entry for entry in record.get("layers", {}).values())


def needs_loader(record: dict[str, Any]) -> bool:
    """Whether the checkpoint needs the per-layer loader (`nonuniform.py`): its family's own class builds
    one expert count and as many router rows as experts."""
    return not record.get("uniform", True) or has_tied_router(record)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of the model's weights, shared tensors counted once."""
    seen: set[int] = set()
    params = nbytes = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        params += tensor.numel()
        nbytes += tensor.numel() * tensor.element_size()
    return params, nbytes
