"""`python -m hf_moeprune.bench` / `accelerate launch -m hf_moeprune.bench` / `torchrun -m hf_moeprune.bench`.

Started plainly (`--processes 1 2`, default 1), it runs one torchrun launch per process count and model, so every
model is measured in fresh processes (a peak RSS is never that of an earlier, bigger model), and merges them.
Inside a launch (torchrun, accelerate launch, mpirun) it measures every model in the launch's own processes.
The JSON is written before the plot, and the plot is optional (`--no-plot`, or matplotlib not installed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

from .args import BenchArgs

LAUNCH_ENV = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def add_bench_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One option per `BenchArgs` field, its help from the field's metadata."""
    for f in dataclasses.fields(BenchArgs):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.name == "model":
            parser.add_argument(flag, required=True, help=help_text)
        elif f.type in ("bool", bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        elif f.name == "compare":
            parser.add_argument(flag, nargs="+", default=[], help=help_text)
        else:
            kind = {"int": int, "str | None": str, "str": str}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)


DESCRIPTION = (
    "Latency, throughput, memory and communication share of MoE checkpoints, expert-parallel across the processes "
    "of a launch."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hf_moeprune.bench", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of the benchmark (also `hf-moeprune bench`)."""
    add_bench_arguments(parser)
    parser.add_argument("--output", default="bench.json", help="JSON file with every measurement.")
    parser.add_argument("--plot", default=None, help="PNG path (default: the output with .png).")
    parser.add_argument("--no-plot", action="store_true", help="Write the JSON and the table only.")
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=None,
        help="Process counts (e.g. 1 2; default 1): one torchrun launch per count and model, merged; only "
        "outside a launch.",
    )
    parser.add_argument(
        "--part", action="store_true", help=argparse.SUPPRESS
    )  # child of --processes: JSON only


def bench_args_from(namespace: argparse.Namespace) -> BenchArgs:
    return BenchArgs(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(BenchArgs)})


def bench_args_to_argv(args: BenchArgs) -> list[str]:
    argv = []
    for f in dataclasses.fields(BenchArgs):
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            if value:
                argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def launched() -> bool:
    return any(int(os.environ.get(name, "1")) > 1 for name in LAUNCH_ENV) or "LOCAL_RANK" in os.environ


def spawn_launches(args: BenchArgs, processes: list[int], timeout: float | None = None) -> list[dict]:
    """One `python -m torch.distributed.run --standalone --nproc_per_node N -m hf_moeprune.bench` per process
    count N and model, each measuring that one model in new processes; their results, count by count, models in
    the order given."""
    results = []
    with tempfile.TemporaryDirectory(prefix="moeprune-bench-") as tmp:
        for count in processes:
            for index, path in enumerate([args.model, *args.compare]):
                part = os.path.join(tmp, f"part{count}-{index}.json")
                alone = dataclasses.replace(args, model=path, compare=[])
                command = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node",
                    str(count),
                    "-m",
                    "hf_moeprune.bench",
                    *bench_args_to_argv(alone),
                    "--output",
                    part,
                    "--part",
                ]
                print(f"[bench] launching {count} process(es): {' '.join(command)}", file=sys.stderr, flush=True)
                subprocess.run(command, check=True, timeout=timeout)
                with open(part) as handle:
                    results += json.load(handle)["results"]
    return results


def write_json(payload: dict, output: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as handle:
        json.dump(payload, handle, indent=2)


def write_outputs(payload: dict, output: str, plot: str | None, draw: bool = True) -> None:
    """The JSON first (so nothing is lost if plotting fails), the table, then the plot where it can be drawn."""
    from .plot import optional_plot, plot_benchmark
    from .report import summary_table

    payload["plot"] = None
    write_json(payload, output)
    print(summary_table(payload["results"]))
    if draw:
        payload["plot"] = optional_plot(plot_benchmark, payload["results"], plot or os.path.splitext(output)[0] + ".png")
        if payload["plot"]:
            write_json(payload, output)
    print(f"\nwrote {output}" + (f" and {payload['plot']}" if payload["plot"] else ""))


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(namespace: argparse.Namespace) -> int:
    """Measure what `namespace` asks for (parsed by `add_arguments`)."""
    args = bench_args_from(namespace)
    if not namespace.part and not launched():
        import time

        processes = namespace.processes or [1]
        results = spawn_launches(args, processes)
        payload = {
            "schema_version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "args": dataclasses.asdict(args),
            "processes": processes,
            "results": results,
        }
        write_outputs(payload, namespace.output, namespace.plot, draw=not namespace.no_plot)
        return 0

    from .runner import run_launch
    from .timing import log, world

    if args.compare and not namespace.part:
        log(
            "WARNING: inside a launch every model is measured in the same processes, so the peak RSS of a "
            "model includes the earlier ones; start without a launcher (--processes N) for fresh processes "
            "per model."
        )
    payload = run_launch(args)
    if world()[0] == 0:
        if namespace.part:
            write_json(payload, namespace.output)
        else:
            write_outputs(payload, namespace.output, namespace.plot, draw=not namespace.no_plot)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0
