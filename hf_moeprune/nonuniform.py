"""Loading checkpoints whose MoE layers have different expert counts.

This module imports only torch and transformers: `save_pretrained` copies its source beside the weights as
`modeling_moeprune.py`, so such a checkpoint also loads with `trust_remote_code=True` where hf_moeprune is
not installed. The per-layer shapes come from the `moeprune.layout` entry of `config.json`, written from the
family spec at save time, so this file needs no knowledge of any family.

A merge with a tied router keeps all E router rows and an `expert_map` (choice e -> merged expert) per
layer: the experts module receives the router's indices through that map (`tie_router`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _resize_leading(owner: nn.Module, name: str, count: int) -> None:
    old = getattr(owner, name)
    new = torch.empty((count, *old.shape[1:]), dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(owner, name, new)


EXPERT_MAP_ATTRIBUTE = "moeprune_expert_map"


def _route_through_map(module: nn.Module, args: tuple) -> tuple:
    hidden_states, top_k_index, *rest = args
    return (hidden_states, getattr(module, EXPERT_MAP_ATTRIBUTE).to(top_k_index.device)[top_k_index], *rest)


def tie_router(experts: nn.Module, expert_map: list[int]) -> None:
    """Send the router's choice e to merged expert `expert_map[e]`. The experts module sums the weighted outputs
    of a token's top-k slots, so members of one merged expert selected together add their weights."""
    if getattr(experts, EXPERT_MAP_ATTRIBUTE, None) is None:
        experts.register_forward_pre_hook(_route_through_map)
    # a plain attribute, not a buffer: the map lives in config.json, the weights stay the family's own
    setattr(experts, EXPERT_MAP_ATTRIBUTE, torch.tensor(expert_map, dtype=torch.long, device="cpu"))  # not meta


def resize_moe_layers(model: nn.Module, layout: dict[str, Any]) -> None:
    """Give every MoE layer named in `layout` its own expert count before weights are loaded."""
    for layer_path, entry in layout.items():
        block = model.get_submodule(layer_path)
        count = int(entry["num_experts"])
        for tensor_path in entry["expert_tensors"]:
            owner_path, _, name = tensor_path.rpartition(".")
            _resize_leading(_submodule(block, owner_path), name, count)
        if entry.get("expert_modules"):
            container = _submodule(block, entry["expert_modules"])
            template = entry["expert_module_name"]
            index = count
            while hasattr(container, template.format(index)):
                delattr(container, template.format(index))
                index += 1
        for owner_path, attr in entry["count_attributes"]:
            setattr(_submodule(block, owner_path), attr, count)
        for owner_path, attr in entry.get("top_k_attributes", []):
            setattr(_submodule(block, owner_path), attr, int(entry["top_k"]))
        router = _submodule(block, entry["router"])
        if entry.get("expert_map") is not None:  # a tied router: E rows, mapped onto the merged experts
            rows = int(entry["router_rows"])
            for tensor_path in entry["router_tensors"]:
                owner_path, _, name = tensor_path.rpartition(".")
                _resize_leading(_submodule(block, owner_path), name, rows)
            for owner_path, attr in entry["router_count_attributes"]:
                setattr(_submodule(block, owner_path), attr, rows)
            tie_router(_submodule(block, entry["experts"]), entry["expert_map"])
            count = rows
        if isinstance(router, nn.Linear):
            router.out_features = count


def with_per_layer_experts(base_class: type) -> type:
    """A subclass of a transformers model class that builds each MoE layer with its recorded expert count."""

    class MoEPrunedModel(base_class):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            record = getattr(config, "moeprune", None) or {}
            resize_moe_layers(self, record.get("layout", {}))

    MoEPrunedModel.__name__ = MoEPrunedModel.__qualname__ = f"MoEPruned{base_class.__name__}"
    return MoEPrunedModel
