"""Load a MoE checkpoint on every process of a launch, with its experts sharded across the processes.

Three ways to place a model, picked by `load_for_benchmark`:

- `single`: one process, the whole model.
- `replicated`: every process holds the whole model and its own slice of the batch (plain data parallelism,
  no collective in the forward). The baseline that expert parallelism is compared with.
- `transformers`: transformers' own expert parallelism, `DistributedConfig(ep_size=W, fsdp_size=W)`. Every process
  holds E/W experts of each layer and an FSDP shard of the dense weights (all-gathered layer by layer), and tokens
  reach their experts with `all_to_all_single` (`ep_implementation="all_to_all"`). Needs every MoE layer to have
  the same E, divisible by W, and a family whose config carries `base_model_ep_plan`.
- `native`: our own all-to-all dispatch (`NativeAllToAllEP`) for what transformers refuses: expert counts that
  differ per layer (non-uniform pruned checkpoints) or are not divisible by W. Dense weights are replicated; the
  experts of each layer are cut into W contiguous shards whose sizes differ by at most one (uneven shards), and
  the routed (token, expert) pairs travel with two `all_to_all_single` calls (dispatch and combine) with uneven
  splits. A layer with fewer experts than processes is refused with a message naming it.

Both EP engines run the collectives of `torch.distributed` for real (gloo on CPU, NCCL on GPU); nothing is simulated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

ENGINES = ("auto", "transformers", "native")
EXPERT_COMPUTE_EVENT = "moeprune::expert_compute"
TIMED_IMPLEMENTATION = "moeprune_timed"


# --------------------------------------------------------------------------------------------------------------
# Finding the experts


def find_expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every fused experts module of a model: one with 3-D `gate_up_proj` (or `up_proj`) and `down_proj` whose
    first dimension is the expert dimension. This is the layout of transformers 5 for every family that uses
    `@use_experts_implementation` (mixtral, qwen*_moe, olmoe, deepseek_v3, gpt_oss, ...)."""
    found = []
    for name, module in model.named_modules():
        down = module._parameters.get("down_proj")
        up = module._parameters.get("gate_up_proj", module._parameters.get("up_proj"))
        if down is not None and up is not None and down.dim() == 3 and up.dim() == 3:
            found.append((name, module))
    return found


def expert_counts(model: nn.Module) -> dict[str, int]:
    """Global expert count of each MoE layer (DTensor shapes are global, so this holds after sharding too)."""
    return {
        name: int(module._parameters["down_proj"].shape[0]) for name, module in find_expert_modules(model)
    }


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(all parameter bytes, expert parameter bytes) held by THIS process: local shards of DTensors, local slices
    of natively sharded experts."""
    expert_ids = {id(p) for _, m in find_expert_modules(model) for p in m.parameters(recurse=False)}
    total = expert = 0
    for p in model.parameters():
        size = _local(p.data).numel() * p.element_size()
        total += size
        if id(p) in expert_ids:
            expert += size
    return total, expert


def shard_sizes(num_experts: int, world_size: int) -> list[int]:
    """Contiguous shard sizes differing by at most one, the first ranks taking the extra experts.

    Example: 6 experts on 4 processes -> [2, 2, 1, 1]."""
    base, extra = divmod(num_experts, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


def read_moeprune_layers(model_path: str) -> dict | None:
    """The `"moeprune"` section of a checkpoint's config.json (written by hf_moeprune for non-uniform prunes)."""
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file) as handle:
        return json.load(handle).get("moeprune")


# --------------------------------------------------------------------------------------------------------------
# Timing expert compute


def install_timed_experts(model: nn.Module) -> bool:
    """Wrap the model's experts implementation so that every expert GEMM pass shows up in torch.profiler as
    `moeprune::expert_compute`. Returns False when the model runs the class's own (eager) forward, which cannot be
    wrapped through the interface; then expert compute is not reported."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    inner_name = getattr(model.config, "_experts_implementation", None)
    if inner_name in (None, "eager", TIMED_IMPLEMENTATION) or inner_name not in ALL_EXPERTS_FUNCTIONS:
        return inner_name == TIMED_IMPLEMENTATION
    inner = ALL_EXPERTS_FUNCTIONS[inner_name]

    def timed_experts_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        with record_function(EXPERT_COMPUTE_EVENT):
            out = inner(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            if out.is_cuda:
                torch.cuda.synchronize(out.device)  # so the CPU-side range covers the GPU work
            return out

    ALL_EXPERTS_FUNCTIONS.register(TIMED_IMPLEMENTATION, timed_experts_forward)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_experts_implementation", None) == inner_name:
            config._experts_implementation = TIMED_IMPLEMENTATION
    return True


# --------------------------------------------------------------------------------------------------------------
# Native all-to-all expert parallelism (uneven shards)


class NativeAllToAllEP:
    """Expert parallelism for one experts module, with uneven shards.

    Rank r owns the contiguous experts `[start_r, start_r + n_r)`. Each rank routes its own tokens (the router is
    replicated), then:

    1. sorts its (token, expert) pairs by expert, which groups them by owner rank;
    2. exchanges the per-expert counts (`all_to_all_single`, input splits `n_0..n_{W-1}`, output splits `n_r`);
    3. sends the token rows to the owners (`all_to_all_single`, uneven splits) -- the *dispatch*;
    4. runs its local experts on what it received, top-1 with unit weight, through the module's own forward
       (so the family's experts implementation, grouped_mm by default, does the math);
    5. sends the results back (`all_to_all_single`, the splits reversed) -- the *combine*;
    6. un-sorts and sums the k results of each token weighted by its routing weights.

    This is the scheme of transformers' `AllToAllEP`, generalised to shards of different sizes.

    Args:
        experts (`nn.Module`): fused experts module, its weights still whole (`[E, ...]`) on every rank.
        name (`str`): its path in the model, for error messages.
        group: process group (default: the world).
    """

    def __init__(self, experts: nn.Module, name: str, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = int(experts._parameters["down_proj"].shape[0])
        if self.num_experts < self.world_size:
            raise ValueError(
                f"Layer `{name}` has {self.num_experts} experts, fewer than the {self.world_size} processes: "
                "expert parallelism needs at least one expert per process. Launch fewer processes."
            )
        self.sizes = shard_sizes(self.num_experts, self.world_size)
        self.start = sum(self.sizes[: self.rank])
        self.num_local = self.sizes[self.rank]
        self.experts_forward = experts.forward  # class forward: dispatches to the experts implementation
        # keep only this rank's slice of every per-expert tensor; the rest is freed
        for key, param in list(experts._parameters.items()):
            if param is not None and param.dim() >= 1 and param.shape[0] == self.num_experts:
                local = param.data[self.start : self.start + self.num_local].clone()
                experts._parameters[key] = nn.Parameter(local, requires_grad=False)
        experts.num_experts = self.num_local
        experts.forward = self

    @torch.no_grad()
    def __call__(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        num_tokens, top_k = top_k_index.shape
        hidden_dim = hidden_states.shape[-1]
        expert_ids = top_k_index.reshape(-1)
        order = torch.argsort(expert_ids, stable=True)
        send_tokens = hidden_states[order // top_k]
        counts = torch.bincount(expert_ids, minlength=self.num_experts)
        recv_counts = counts.new_empty(self.world_size * self.num_local)
        with record_function("moeprune::all_to_all_counts"):
            dist.all_to_all_single(
                recv_counts, counts, [self.num_local] * self.world_size, self.sizes, group=self.group
            )
        send_sizes = [int(c.sum()) for c in counts.split(self.sizes)]
        recv_sizes = recv_counts.view(self.world_size, self.num_local).sum(dim=1).tolist()
        recv_tokens = send_tokens.new_empty(sum(recv_sizes), hidden_dim)
        with record_function("moeprune::all_to_all_dispatch"):
            dist.all_to_all_single(
                recv_tokens, send_tokens.contiguous(), recv_sizes, send_sizes, group=self.group
            )
        if recv_tokens.shape[0]:
            local_ids = torch.arange(self.num_local, device=recv_tokens.device).repeat(self.world_size)
            local_ids = local_ids.repeat_interleave(recv_counts).unsqueeze(-1)
            unit = torch.ones_like(local_ids, dtype=recv_tokens.dtype)
            expert_out = self.experts_forward(recv_tokens, local_ids, unit).to(hidden_states.dtype)
        else:
            expert_out = recv_tokens
        back = expert_out.new_empty(num_tokens * top_k, hidden_dim)
        with record_function("moeprune::all_to_all_combine"):
            dist.all_to_all_single(back, expert_out.contiguous(), send_sizes, recv_sizes, group=self.group)
        token_out = torch.empty_like(back)
        token_out[order] = back
        token_out = token_out.view(num_tokens, top_k, hidden_dim)
        return (
            (token_out * top_k_weights.unsqueeze(-1).to(token_out.dtype)).sum(dim=1).to(hidden_states.dtype)
        )


def apply_native_expert_parallel(model: nn.Module, group=None) -> dict[str, list[int]]:
    """Shard every experts module of `model` across the processes of `group` with `NativeAllToAllEP`.
    Returns the shard sizes per layer."""
    modules = find_expert_modules(model)
    if not modules:
        raise ValueError(
            "No fused experts module found (3-D `gate_up_proj`/`down_proj`): expert parallelism needs a "
            "transformers 5 MoE family with fused experts."
        )
    layout = {}
    for name, experts in modules:
        layout[name] = NativeAllToAllEP(experts, name, group).sizes
    return layout


# --------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    model: nn.Module
    engine: str
    expert_counts: dict[str, int]
    shards: dict[str, list[int]] = field(default_factory=dict)
    note: str = ""


def load_pretrained(model_path: str, **kwargs) -> nn.Module:
    """The transformers model of a checkpoint, non-uniform hf_moeprune results included."""
    from hf_moeprune.modeling import load_pretrained_model

    return load_pretrained_model(model_path, **kwargs)


def transformers_ep_refusal(model_path: str, world_size: int) -> str | None:
    """Why transformers' own EP cannot take this checkpoint at this world size (None when it can)."""
    from transformers import AutoConfig

    moeprune = read_moeprune_layers(model_path)
    if moeprune is not None and not moeprune.get("uniform", True):
        counts = {name: layer.get("num_experts") for name, layer in moeprune.get("layers", {}).items()}
        return f"expert counts differ per layer ({counts}); transformers shards one count for all layers"
    config = AutoConfig.from_pretrained(model_path)
    if not getattr(config, "base_model_ep_plan", None):
        return f"model type `{config.model_type}` has no `base_model_ep_plan` in transformers"
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        count = getattr(config, key, None)
        if isinstance(count, int):
            if count % world_size:
                return f"{count} experts per layer are not divisible by {world_size} processes"
            return None
    return "no expert count in the config"


def load_for_benchmark(
    model_path: str,
    *,
    expert_parallel: bool,
    engine: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> LoadedModel:
    """Load `model_path` on this process, placed as the launch asks (see the module docstring).

    Args:
        model_path (`str`): checkpoint folder (or Hub id).
        expert_parallel (`bool`): shard experts across the processes of the launch; without it a multi-process
            launch replicates the model (data parallelism).
        engine (`str`): `"auto"` (transformers' EP where it accepts the model, else native), `"transformers"`
            (refuse with the reason otherwise) or `"native"`.
        dtype (`torch.dtype`): weights' dtype.
        device (`torch.device`, *optional*): where the native/replicated/single copies go (cuda:LOCAL_RANK on GPUs).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    device = device or torch.device("cpu")

    if world_size > 1 and expert_parallel and engine in ("auto", "transformers"):
        refusal = transformers_ep_refusal(model_path, world_size)
        if refusal is None:
            from transformers import AutoModelForCausalLM
            from transformers.distributed import DistributedConfig

            config = DistributedConfig(
                ep_size=world_size, fsdp_size=world_size, ep_implementation="all_to_all"
            )
            model = AutoModelForCausalLM.from_pretrained(model_path, distributed_config=config, dtype=dtype)
            model.eval()
            return LoadedModel(
                model,
                "transformers",
                expert_counts(model),
                {n: [c // world_size] * world_size for n, c in expert_counts(model).items()},
            )
        if engine == "transformers":
            raise ValueError(
                f"transformers' expert parallelism cannot shard {model_path} over {world_size} processes: "
                f"{refusal}. Use --ep-engine native (uneven shards) or auto."
            )
        note = f"native all-to-all because {refusal}"
    else:
        note = ""

    model = load_pretrained(model_path, dtype=dtype).to(device)
    model.eval()
    counts = expert_counts(model)
    if world_size == 1:
        return LoadedModel(model, "single", counts)
    if not expert_parallel:
        return LoadedModel(model, "replicated", counts)
    shards = apply_native_expert_parallel(model)
    return LoadedModel(model, "native", counts, shards, note)
