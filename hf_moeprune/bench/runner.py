"""Benchmark one launch: every model of the comparison at this launch's number of processes."""

from __future__ import annotations

import gc
import os
import platform
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from .args import BenchArgs
from .expert_parallel import install_timed_experts, load_for_benchmark
from .timing import (
    gather_objects,
    local_batch,
    log,
    measure_latency,
    memory_snapshot,
    profile_breakdown,
    reset_peak_rss,
    world,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEMA_VERSION = 1


def init_distributed(cpu: bool) -> torch.device:
    """Join the launch's process group (torchrun, accelerate launch, mpirun) through accelerate, which reads each
    launcher's environment; returns this process's device."""
    launched = int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))) > 1
    use_cpu = cpu or not torch.cuda.is_available()
    if launched and not dist.is_initialized():
        from accelerate import PartialState

        state = PartialState(cpu=use_cpu)
        return state.device
    if use_cpu:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def set_threads(threads: int) -> int:
    if threads <= 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")))
        threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    return threads


def text_token_ids(model_path: str, text_file: str) -> torch.Tensor:
    """The documents of `text_file` (see `evaluate.text.load_text`), joined by blank lines, as one row of the
    checkpoint tokenizer's ids."""
    from transformers import AutoTokenizer

    from ..evaluate.text import load_text

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return tokenizer("\n\n".join(load_text(text_file)["text"]), return_tensors="pt").input_ids[0]


def make_inputs(args: BenchArgs, model_path: str, vocab_size: int) -> torch.Tensor:
    """The global batch [batch_size, seq_len], identical on every process."""
    if args.text:
        ids = text_token_ids(model_path, args.text)
        need = args.batch_size * args.seq_len
        if ids.numel() < need:
            ids = ids.repeat(need // ids.numel() + 1)
        return ids[:need].view(args.batch_size, args.seq_len)
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab_size, (args.batch_size, args.seq_len), generator=generator)


@torch.no_grad()
def _check_logits(args: BenchArgs, model_path: str, loaded_model, input_ids: torch.Tensor, device) -> dict:
    """Max |logits difference| between this launch's placement and one process holding the whole model."""
    mine = loaded_model(input_ids=local_batch(input_ids).to(device)).logits.float().cpu()
    pieces = gather_objects(mine)
    result = {"max_abs_diff": None}
    if world()[0] == 0:
        from .expert_parallel import load_pretrained

        reference = load_pretrained(model_path, dtype=DTYPES[args.dtype]).to(device).eval()
        expected = reference(input_ids=input_ids.to(device)).logits.float().cpu()
        result["max_abs_diff"] = float((torch.cat(pieces) - expected).abs().max())
        del reference
    return gather_objects(result)[0]


def benchmark_model(args: BenchArgs, model_path: str, device: torch.device) -> dict:
    rank, world_size = world()
    label = f"{os.path.basename(os.path.normpath(model_path))} x{world_size}"
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    loaded = load_for_benchmark(
        model_path, expert_parallel=args.expert_parallel, engine=args.ep_engine, dtype=dtype, device=device
    )
    log(f"{label}: loaded with engine `{loaded.engine}` in {time.perf_counter() - start:.1f} s {loaded.note}")
    model = loaded.model
    timed = install_timed_experts(model)
    input_ids = make_inputs(args, model_path, model.config.get_text_config().vocab_size)
    mine = local_batch(input_ids).to(device)
    after_load = memory_snapshot(model, device)
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    latency = measure_latency(
        model,
        mine,
        decode_tokens=args.decode_tokens,
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
        label=label,
    )
    memory = memory_snapshot(model, device)
    memory["rss_after_load_bytes"] = after_load["rss_bytes"]
    per_process_memory = gather_objects(memory)

    communication = None
    if args.profile:
        log(f"{label}: profiling one prefill and {args.decode_tokens} decode steps")
        communication = {
            "per_process": gather_objects(profile_breakdown(model, mine, args.decode_tokens, device))
        }
        communication["expert_compute_timed"] = timed
        for phase in ("prefill", "decode"):
            rows = [p[phase] for p in communication["per_process"]]
            communication[phase] = {
                key: sum(r[key] for r in rows) / len(rows)
                for key in (
                    "wall_s",
                    "collective_s",
                    "expert_compute_s",
                    "collective_share",
                    "expert_compute_share",
                )
            }
    logits_check = _check_logits(args, model_path, model, input_ids, device) if args.check_logits else None

    counts = list(loaded.expert_counts.values())
    prefill_median = latency["prefill_latency_s"]["median"]
    decode = latency["decode_time_per_token_s"]
    result = {
        "model": model_path,
        "label": os.path.basename(os.path.normpath(model_path)),
        "model_type": model.config.model_type,
        "num_experts": loaded.expert_counts,
        "mean_experts": sum(counts) / len(counts) if counts else 0,
        "total_experts": sum(counts),
        "top_k": getattr(model.config, "num_experts_per_tok", None),
        "num_processes": world_size,
        "engine": loaded.engine,
        "engine_note": loaded.note,
        "expert_shards": loaded.shards,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "device": device.type,
        "dtype": args.dtype,
        "threads_per_process": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "decode_tokens": args.decode_tokens,
        "warmup": args.warmup,
        "repeats": args.repeats,
        **latency,
        "prefill_tokens_per_s": args.batch_size * args.seq_len / prefill_median,
        "decode_tokens_per_s": args.batch_size / decode["median"] if decode else None,
        "memory": {
            "per_process": per_process_memory,
            "max_param_bytes": max(m["param_bytes"] for m in per_process_memory),
            "max_expert_param_bytes": max(m["expert_param_bytes"] for m in per_process_memory),
            "max_peak_rss_bytes": max((m["peak_rss_bytes"] or 0) for m in per_process_memory),
        },
        "communication": communication,
        "logits_check": logits_check,
    }
    del model, loaded
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
    return result


def run_launch(args: BenchArgs) -> dict:
    """Measure every model of `args` in this launch; the same dict on every process."""
    device = init_distributed(args.cpu)
    threads = set_threads(args.threads)
    rank, world_size = world()
    log(
        f"{world_size} process(es), {threads} thread(s) each, device {device.type}, "
        f"backend {dist.get_backend() if dist.is_initialized() else 'none'}"
    )
    if args.expert_parallel and world_size == 1:
        log(
            "WARNING: --expert-parallel with ONE process, nothing is sharded. On CPU, `accelerate launch "
            "--num_processes N` without an mpirun hostfile starts a single process: use "
            "`--config_file benchmarks/accelerate_cpu_2proc.yaml` or torchrun (benchmarks/bench.md)."
        )
    results = [benchmark_model(args, path, device) for path in [args.model, *args.compare]]
    return {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        },
        "args": asdict(args),
        "results": results,
    }
