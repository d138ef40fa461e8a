"""Timed prefill and decode, statistics over ranks and repeats, memory and a profiled communication breakdown.

Every timed step runs between barriers on all processes; its time is the slowest process's (an all-reduce MAX),
since a step of an expert-parallel model ends only when every process is done.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .expert_parallel import EXPERT_COMPUTE_EVENT, parameter_bytes

COLLECTIVE_PREFIXES = ("gloo:", "nccl:")


def world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def log(message: str) -> None:
    """Progress on rank 0, on stderr so stdout stays the summary."""
    if world()[0] == 0:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def reduce_max(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def summarize(samples: list[float]) -> dict:
    """median, p90 (nearest rank), mean, min, max and the samples themselves, in seconds."""
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, max(0, int(round(0.9 * len(ordered))) - 1))]
    return {
        "median": statistics.median(ordered),
        "p90": p90,
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
        "samples": samples,
    }


def local_batch(input_ids: torch.Tensor) -> torch.Tensor:
    """This process's rows of the global batch (contiguous, sizes differing by at most one)."""
    rank, world_size = world()
    if input_ids.shape[0] < world_size:
        raise ValueError(f"batch size {input_ids.shape[0]} is smaller than the {world_size} processes")
    return torch.tensor_split(input_ids, world_size)[rank]


@torch.no_grad()
def prefill_and_decode(
    model: nn.Module, input_ids: torch.Tensor, decode_tokens: int, device: torch.device
) -> tuple[float, list[float]]:
    """One prefill of `input_ids` then `decode_tokens` greedy steps with the KV cache; returns the slowest
    process's prefill time and per-step decode times. Every process runs the same number of steps (no early stop:
    each step holds collectives)."""
    _barrier()
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True)
    _sync(device)
    prefill = reduce_max(time.perf_counter() - start, device)
    cache = out.past_key_values
    next_ids = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(decode_tokens):
        _barrier()
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
        next_ids = out.logits[:, -1:].argmax(-1)
        _sync(device)
        steps.append(reduce_max(time.perf_counter() - start, device))
        cache = out.past_key_values
    return prefill, steps


def measure_latency(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    decode_tokens: int,
    warmup: int,
    repeats: int,
    device: torch.device,
    label: str = "",
) -> dict:
    """Prefill latency and decode time per token over `repeats` runs after `warmup` runs."""
    for index in range(warmup):
        log(f"{label}: warm-up {index + 1}/{warmup}")
        prefill_and_decode(model, input_ids, min(decode_tokens, 2), device)
    prefills, decodes = [], []
    for index in range(repeats):
        prefill, steps = prefill_and_decode(model, input_ids, decode_tokens, device)
        prefills.append(prefill)
        decodes.extend(steps)
        log(
            f"{label}: run {index + 1}/{repeats} prefill {prefill * 1e3:.1f} ms, "
            f"decode {statistics.median(steps) * 1e3 if steps else float('nan'):.2f} ms/token"
        )
    return {
        "prefill_latency_s": summarize(prefills),
        "decode_time_per_token_s": summarize(decodes) if decodes else None,
    }


def _event_time_us(event, use_device: bool) -> float:
    if use_device:
        return float(getattr(event, "device_time_total", 0.0) or 0.0)
    return float(event.cpu_time_total)


@torch.no_grad()
def profile_breakdown(
    model: nn.Module, input_ids: torch.Tensor, decode_tokens: int, device: torch.device
) -> dict:
    """Share of wall time spent inside collectives and inside expert compute, from one profiled prefill and one
    profiled decode, per process.

    Collectives are the backend's own events (`gloo:all_to_all`, `gloo:all_gather`, ...; on GPUs the NCCL kernels'
    device time). They include the time spent waiting for slower peers, and may overlap compute where the engine
    prefetches (FSDP all-gathers). Expert compute is the `moeprune::expert_compute` range around the experts
    implementation (see `install_timed_experts`)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    result = {}
    for phase in ("prefill", "decode"):
        out = model(input_ids=input_ids, use_cache=True) if phase == "decode" else None
        _barrier()
        _sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            if phase == "prefill":
                model(input_ids=input_ids, use_cache=True)
            else:
                cache, next_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
                for _ in range(max(1, decode_tokens)):
                    step = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
                    cache, next_ids = step.past_key_values, step.logits[:, -1:].argmax(-1)
            _sync(device)
            wall = time.perf_counter() - start
        kinds: dict[str, float] = {}
        expert_us = 0.0
        for event in prof.events():
            name = event.name
            if (
                device.type == "cuda"
                and "nccl" in name.lower()
                and getattr(event, "device_type", None) is not None
                and str(event.device_type).endswith("CUDA")
            ):
                kind = "all_to_all" if "alltoall" in name.lower().replace("_", "") else "other"
                kinds[kind] = kinds.get(kind, 0.0) + _event_time_us(event, True)
            elif device.type != "cuda" and name.startswith(COLLECTIVE_PREFIXES):
                kind = name.split(":", 1)[1]
                kinds[kind] = kinds.get(kind, 0.0) + _event_time_us(event, False)
            elif name == EXPERT_COMPUTE_EVENT:
                expert_us += _event_time_us(event, False)
        collective = sum(kinds.values()) / 1e6
        expert = expert_us / 1e6
        result[phase] = {
            "wall_s": wall,
            "collective_s": collective,
            "collective_by_kind_s": {k: v / 1e6 for k, v in sorted(kinds.items())},
            "expert_compute_s": expert,
            "collective_share": min(1.0, collective / wall) if wall else None,
            "expert_compute_share": min(1.0, expert / wall) if wall else None,
        }
    return result


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the peak covers inference, not loading. Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def memory_snapshot(model: nn.Module, device: torch.device) -> dict:
    """This process's memory: parameter bytes (local shards), expert parameter bytes, current and peak RSS and,
    on GPUs, peak allocated device memory."""
    params, experts = parameter_bytes(model)
    rss_kb = _read_status_kb("VmRSS")
    peak_kb = _read_status_kb("VmHWM")
    if peak_kb is None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    snapshot = {
        "rank": world()[0],
        "pid": os.getpid(),
        "param_bytes": params,
        "expert_param_bytes": experts,
        "rss_bytes": rss_kb * 1024 if rss_kb else None,
        "peak_rss_bytes": peak_kb * 1024 if peak_kb else None,
    }
    if device.type == "cuda":
        snapshot["peak_device_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return snapshot


def run_phase(label: str, fn: Callable, *args, **kwargs):
    log(f"{label} ...")
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    log(f"{label} done in {time.perf_counter() - start:.1f} s")
    return out
