"""A family-independent view of the MoE layers of a loaded model.

`MoELayer` reads and writes expert weights as `[E, ...]` tensors whatever the storage (fused 3-D parameters
or one module per expert), so scoring, merging and surgery code is written once for every family.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .families import ExpertTensor, FamilySpec
from .nonuniform import EXPERT_MAP_ATTRIBUTE

COUNT_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_ATTRIBUTES = ("top_k", "num_experts_per_tok")


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


@dataclass
class MoELayer:
    """One MoE block of a model: its path, router and experts, read through the family spec."""

    path: str
    block: nn.Module
    spec: FamilySpec

    @property
    def router(self) -> nn.Module:
        return get_submodule(self.block, self.spec.router)

    @property
    def experts(self) -> nn.Module:
        return get_submodule(self.block, self.spec.experts)

    @property
    def router_path(self) -> str:
        return f"{self.path}.{self.spec.router}"

    @property
    def experts_path(self) -> str:
        return f"{self.path}.{self.spec.experts}"

    @property
    def expert_map(self) -> list[int] | None:
        """For a tied router (a merge that kept all router rows): the merged expert each router row feeds."""
        mapping = getattr(self.experts, EXPERT_MAP_ATTRIBUTE, None)
        return None if mapping is None else mapping.tolist()

    @property
    def num_experts(self) -> int:
        mapping = self.expert_map
        if mapping is not None:
            return max(mapping) + 1
        return int(self.router_tensors()["weight"].shape[0])

    @property
    def num_router_rows(self) -> int:
        return int(self.router_tensors()["weight"].shape[0])

    @property
    def top_k(self) -> int:
        for module in (self.block, self.router, self.experts):
            for attr in TOP_K_ATTRIBUTES:
                value = getattr(module, attr, None)
                if isinstance(value, int):
                    return value
        return 1

    @property
    def num_expert_groups(self) -> int:
        """Expert groups of group-limited routing (the family's `expert_groups_key`, e.g. DeepSeek's `n_group`);
        1 when the family routes without groups. Expert j belongs to group `j // (num_experts / groups)`."""
        key = self.spec.expert_groups_key
        if not key:
            return 1
        for module in (self.block, self.router, self.experts):
            config = getattr(module, "config", None)
            if config is not None:
                return int(getattr(config, key, None) or 1)
        return 1

    def router_tensors(self) -> dict[str, torch.Tensor]:
        """Router parameters and buffers with a leading expert axis (weight first)."""
        router = self.router
        found = {}
        for name in self.spec.router_tensors:
            value = getattr(router, name, None)
            if isinstance(value, torch.Tensor):
                found[name] = value
        if "weight" not in found:
            raise ValueError(f"Router {self.router_path} has no `weight`; check the family spec {self.spec.name!r}.")
        return found

    def expert_tensor_specs(self) -> tuple[ExpertTensor, ...]:
        """The family's expert tensors that this layer actually has (biases may be absent)."""
        if self.spec.expert_layout == "fused":
            return tuple(t for t in self.spec.expert_tensors if isinstance(getattr(self.experts, t.name, None), torch.Tensor))
        first = self.expert_module(0)
        return tuple(t for t in self.spec.expert_tensors if _has_tensor(first, t.name))

    def expert_module(self, index: int) -> nn.Module:
        return self.experts.get_submodule(self.spec.expert_module_name.format(index))

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """Every expert weight as one `[E, ...]` tensor (a view for fused layouts, a stacked copy otherwise)."""
        if self.spec.expert_layout == "fused":
            return {t.name: getattr(self.experts, t.name) for t in self.expert_tensor_specs()}
        return {
            t.name: torch.stack([self.expert_module(e).get_parameter(t.name) for e in range(self.num_experts)])
            for t in self.expert_tensor_specs()
        }

    def set_expert_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace every expert weight; the leading axis of `tensors` becomes the new expert count."""
        new_count = next(iter(tensors.values())).shape[0]
        if self.spec.expert_layout == "fused":
            for name, value in tensors.items():
                old = getattr(self.experts, name)
                setattr(self.experts, name, nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=old.requires_grad))
            return
        template = self.expert_module(0)
        old_count = self.num_experts
        new_modules = []
        for e in range(new_count):
            module = copy.deepcopy(template)
            for name, value in tensors.items():
                param = module.get_parameter(name)
                param.data = value[e].to(param.dtype).contiguous().clone()
            new_modules.append(module)
        for e in range(old_count):
            delattr(self.experts, self.spec.expert_module_name.format(e))
        for e, module in enumerate(new_modules):
            self.experts.add_module(self.spec.expert_module_name.format(e), module)

    def set_router_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        router = self.router
        for name, value in tensors.items():
            old = getattr(router, name)
            if isinstance(old, nn.Parameter):
                setattr(router, name, nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=old.requires_grad))
            else:
                setattr(router, name, value.to(old.dtype).contiguous())
        if isinstance(router, nn.Linear):
            router.out_features = int(tensors["weight"].shape[0])

    def set_counts(self, old_count: int, new_count: int, top_k: int | None = None, router: bool = True) -> None:
        """Update the count (and top-k) attributes that the block's modules read at forward time; with
        `router=False` (a tied router keeps its rows) only the experts module's count changes."""
        for rel, attr in self.count_attribute_paths():
            module = get_submodule(self.block, rel)
            if getattr(module, attr) == old_count and (router or rel == self.spec.experts):
                setattr(module, attr, new_count)
        if top_k is not None:
            for rel, attr in self.top_k_attribute_paths():
                setattr(get_submodule(self.block, rel), attr, top_k)

    def count_attribute_paths(self) -> list[tuple[str, str]]:
        """(module path relative to the block, attribute) pairs holding the expert count."""
        return self._attribute_paths(COUNT_ATTRIBUTES)

    def top_k_attribute_paths(self) -> list[tuple[str, str]]:
        return self._attribute_paths(TOP_K_ATTRIBUTES)

    def _attribute_paths(self, names: tuple[str, ...]) -> list[tuple[str, str]]:
        """Integer attributes `names` of the block and of every module on the way to its router and experts
        (Switch keeps the count on `router`, whose `classifier` holds the rows)."""
        pairs = []
        for rel in _modules_on_the_way("", self.spec.router, self.spec.experts):
            module = get_submodule(self.block, rel)
            pairs += [(rel, attr) for attr in names if type(getattr(module, attr, None)) is int]
        return pairs


def _modules_on_the_way(*paths: str) -> list[str]:
    """Each path and every prefix of it, once, in order: "router.classifier" -> "router", "router.classifier"."""
    seen: dict[str, None] = {}
    for path in paths:
        parts = path.split(".") if path else []
        seen.setdefault("", None)
        for end in range(1, len(parts) + 1):
            seen.setdefault(".".join(parts[:end]), None)
    return list(seen)


def _has_tensor(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
    except AttributeError:
        return False
    return True


def _expand_pattern(model: nn.Module, pattern: str) -> Iterator[str]:
    """Module paths matching `pattern` (`*` is a layer index), in numeric layer order."""
    names = [name for name, _ in model.named_modules() if fnmatch.fnmatchcase(name, pattern)]
    matched = [n for n in names if n.count(".") == pattern.count(".")]
    return iter(sorted(matched, key=_numeric_key))


def _numeric_key(path: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in path.split("."))


def find_moe_layers(model: nn.Module, spec: FamilySpec) -> list[MoELayer]:
    """Every MoE block of `model` (dense layers, which lack router or experts, are skipped)."""
    layers = []
    for pattern in spec.moe_block_patterns:
        for path in _expand_pattern(model, pattern):
            block = model.get_submodule(path)
            try:
                get_submodule(block, spec.router)
                get_submodule(block, spec.experts)
            except AttributeError:
                continue
            layers.append(MoELayer(path=path, block=block, spec=spec))
    if not layers:
        raise ValueError(
            f"No MoE layer found for family {spec.name!r} (patterns {spec.moe_block_patterns}); "
            "the model does not match its family spec."
        )
    return layers
