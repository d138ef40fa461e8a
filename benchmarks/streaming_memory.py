"""Peak RSS and wall time of reducing synthetic Mixtral checkpoints of 0.5 to 30 GB with the CLI (issue 15).

    python -m benchmarks.streaming_memory --sizes 0.5,3 [--methods frequency,stun] \
        [--extra-args="--streaming --device cpu"] [--workdir /big/disk] [--json out.json] [--keep]

For each size a bf16 Mixtral checkpoint in the Hub's per-expert key layout is generated shard by shard (see
`benchmarks/synthetic_checkpoint.py`), then copied with `cp -r` (the I/O reference) and reduced by each
method through `hf-moeprune` under `/usr/bin/time -v` (or a getrusage wrapper where that is missing). `--extra-args`
are appended to every CLI call. Generated checkpoints and outputs are deleted afterwards, also on failure,
unless `--keep`; free disk is checked before anything is written. Runs are warm-cache: the checkpoint was
just written, so what fits in the page cache is read from memory by `cp` and the CLI alike.

Targets (issue 15), printed, not asserted: peak RSS < 4 GiB on 30 GB; data-free STUN within 2x of `cp`;
calibrated methods dominated by their forward passes, not by I/O.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.synthetic_checkpoint import MixtralShape, shape_for_bytes, write_synthetic_mixtral
from hf_moeprune.commands import build_parser

GNU_TIME = Path("/usr/bin/time")
# the lines of `/usr/bin/time -v` read back; the fallback wrapper prints the same ones
REPORTED = ("Maximum resident set size (kbytes)", "User time (seconds)", "System time (seconds)")
RSS_WRAPPER = """import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"Maximum resident set size (kbytes): {usage.ru_maxrss}", file=sys.stderr)
print(f"User time (seconds): {usage.ru_utime:.2f}\\nSystem time (seconds): {usage.ru_stime:.2f}", file=sys.stderr)
sys.exit(code if code >= 0 else 128 - code)
"""
CLI = [sys.executable, "-m", "hf_moeprune.cli"]
DISK_HEADROOM = 1 << 30
REDUCED_SHARE = 0.6  # of the checkpoint's bytes in one output: half the experts, plus attention and embeddings


@dataclass(frozen=True)
class Method:
    """One timed command, with {model}, {output} and {half} (half the experts) filled in per checkpoint."""

    name: str
    template: tuple[str, ...]
    takes_extra_args: bool = True  # the reduction commands, which the streaming flags are for

    def argv(self, checkpoint: Path, output: Path, half_experts: int, extra: list[str]) -> list[str]:
        fill = {"{model}": str(checkpoint), "{output}": str(output), "{half}": str(half_experts)}
        return [fill.get(arg, arg) for arg in self.template] + (extra if self.takes_extra_args else [])


def _reduce(command: str, *method_args: str) -> tuple[str, ...]:
    return (*CLI, command, "--model", "{model}", *method_args, "--output", "{output}", "--overwrite")


METHODS = {
    method.name: method
    for method in (
        Method("cp", ("cp", "-r", "{model}", "{output}"), takes_extra_args=False),
        # the floor under every CLI row: Python, torch and transformers imported, config read, no weights
        Method("inspect", (*CLI, "inspect", "{model}"), takes_extra_args=False),
        Method("frequency", _reduce("prune", "--method", "frequency", "--experts-per-layer", "{half}")),
        Method("stun", _reduce("prune", "--method", "stun", "--expert-sparsity", "0.5")),
        Method("stun+owl40", _reduce("prune", "--method", "stun", "--expert-sparsity", "0.5", "--weight-sparsity", "0.4")),
        Method("uncurl", _reduce("merge", "--method", "uncurl", "--experts-per-layer", "{half}")),
    )
}


@dataclass(frozen=True)
class Usage:
    """What one command cost. CPU time (user + system) is reported too: on a shared machine it moves less."""

    returncode: int
    peak_rss_bytes: int
    wall_s: float
    cpu_s: float


@dataclass
class Measurement:
    size_gb: float
    layers: int
    checkpoint_bytes: int
    method: str
    command: str
    returncode: int
    peak_rss_bytes: int
    wall_s: float
    cpu_s: float
    rss_over_checkpoint: float
    wall_over_cp: float


def measure(argv: list[str], log: Path) -> Usage:
    """Run `argv` with its output into `log`, under a reporter of peak RSS and CPU time."""
    with log.open("w") as out:
        start = time.perf_counter()
        returncode = subprocess.run([*_peak_rss_reporter(), *argv], stdout=out, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
    rss_kib, user, system = (_last_report(log.read_text(), label) for label in REPORTED)
    return Usage(returncode, int(rss_kib * 1024), wall, user + system)


def _last_report(text: str, label: str) -> float:
    found = re.findall(rf"{re.escape(label)}: ([\d.]+)", text)
    return float(found[-1]) if found else float("nan")


def _peak_rss_reporter() -> list[str]:
    """A small process that runs the command and prints its peak RSS the way `/usr/bin/time -v` does.

    The measuring process must be small: a child's peak RSS starts from its parent's at fork, and this script
    holds torch and a whole shard at times.
    """
    if GNU_TIME.is_file():
        return [str(GNU_TIME), "-v"]
    return [sys.executable, "-S", "-c", RSS_WRAPPER]


def planned_shape(size_gb: float, layers: int | None) -> MixtralShape:
    """The shape of a `size_gb` checkpoint, cut to `layers` decoder layers of the same size when given: peak
    memory depends on one layer, not on the depth, so a shallow copy measures it with a fraction of the disk."""
    shape = shape_for_bytes(size_gb * 1e9)
    return replace(shape, num_hidden_layers=layers) if layers else shape


def check_disk(workdir: Path, sizes: list[float], methods: list[str], keep: bool, layers: int | None = None) -> None:
    """Sizes run one after another, each deleted before the next: the checkpoint and its copy by `cp` (bigger
    than any reduced output) at a time, or with `--keep` every checkpoint with all its outputs."""
    if layers:
        sizes = [planned_shape(size, layers).num_bytes() / 1e9 for size in sizes]
    if keep:
        needed = sum(sizes) * 1e9 * (2 + REDUCED_SHARE * (len(methods) - 1))
    else:
        needed = max(sizes) * 1e9 * 2
    needed += DISK_HEADROOM
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise SystemExit(f"error: {workdir} has {free / 2**30:.1f} GiB free, the benchmark needs "
                         f"{needed / 2**30:.1f} GiB; free space, pass --workdir on a bigger disk, or drop --keep.")


def check_extra_args(methods: list[str], extra: list[str]) -> None:
    """Flags the CLI would refuse fail here, in its own words, not once per run after a checkpoint is written."""
    for name in methods:
        if not METHODS[name].takes_extra_args:
            continue
        argv = METHODS[name].argv(Path("checkpoint"), Path("output"), 1, extra)
        try:
            build_parser("hf-moeprune").parse_args(argv[len(CLI):])
        except SystemExit:
            raise SystemExit(f"error: --extra-args {shlex.join(extra)!r}: `hf-moeprune {argv[len(CLI)]}` refuses "
                             "them (message above).") from None


def bench_size(size_gb: float, methods: list[str], extra: list[str], workdir: Path, shard_gb: float,
               keep: bool, layers: int | None = None) -> Iterator[Measurement]:
    """Generate one checkpoint, yield a measurement per method as it finishes (cp first), delete it."""
    shape = planned_shape(size_gb, layers)
    checkpoint = workdir / f"mixtral-{size_gb:g}gb"
    shard_bytes = int(min(shard_gb * 1e9, shape.num_bytes() / 4))  # at least 4 shards so the index is used
    start = time.perf_counter()
    total = write_synthetic_mixtral(checkpoint, shape, shard_bytes=shard_bytes)
    shards = len(list(checkpoint.glob("model-*.safetensors")))
    print(f"\n{size_gb:g} GB: {total / 1e9:.2f} GB in {shards} shards written in {time.perf_counter() - start:.0f} s; "
          f"{shape}", flush=True)
    cp_wall = float("nan")
    for name in methods:
        output = workdir / f"out-{size_gb:g}gb-{name}"
        argv = METHODS[name].argv(checkpoint, output, shape.num_local_experts // 2, extra)
        log = workdir / f"log-{size_gb:g}gb-{name}.txt"
        usage = measure(argv, log)
        if name == "cp" and usage.returncode == 0:
            cp_wall = usage.wall_s
        status = "ok" if usage.returncode == 0 else f"FAILED (exit {usage.returncode}); log tail:\n{_tail(log)}"
        print(f"  {name:<11} {_size(usage.peak_rss_bytes):>10}  {usage.wall_s:7.1f} s wall  {usage.cpu_s:7.1f} s CPU  "
              f"{status}", flush=True)
        if not keep:
            shutil.rmtree(output, ignore_errors=True)
        yield Measurement(size_gb, shape.num_hidden_layers, total, name, shlex.join(argv), **asdict(usage),
                          rss_over_checkpoint=usage.peak_rss_bytes / total, wall_over_cp=usage.wall_s / cp_wall)
    if not keep:
        shutil.rmtree(checkpoint)


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.0f} MiB"


def _tail(log: Path, lines: int = 8) -> str:
    return "\n".join("    " + line for line in log.read_text().splitlines()[-lines:])


def markdown_table(rows: list[Measurement]) -> str:
    lines = ["| layers of | layers | method | peak RSS | wall time | CPU time | peak RSS / checkpoint | wall time / cp |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        failed = "" if row.returncode == 0 else f" (FAILED, exit {row.returncode})"
        lines.append(f"| {row.size_gb:g} GB | {row.layers} ({row.checkpoint_bytes / 1e9:.2f} GB) | {row.method}{failed} "
                     f"| {_size(row.peak_rss_bytes)} | {row.wall_s:.1f} s | {row.cpu_s:.1f} s | {row.rss_over_checkpoint:.2f} "
                     f"| {row.wall_over_cp:.1f} |")
    return "\n".join(lines)


def _machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    reporter = "/usr/bin/time -v" if GNU_TIME.is_file() else "getrusage(RUSAGE_CHILDREN) wrapper"
    return {"host": platform.node(), "cpus": os.cpu_count(), "memory_bytes": memory, "python": sys.version.split()[0],
            "git_commit": commit, "load_average_at_start": os.getloadavg(), "rss_from": reporter}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5,3,6,30", help="Checkpoint sizes in GB, comma separated.")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Subset of {', '.join(METHODS)}.")
    parser.add_argument("--extra-args", default="",
                        help='Appended to every CLI call, e.g. --extra-args="--streaming --device cuda".')
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="Where checkpoints and outputs are written (a new folder inside it).")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="Largest shard of the generated checkpoints.")
    parser.add_argument("--json", type=Path, default=Path("streaming_memory.json"), help="Results file.")
    parser.add_argument("--keep", action="store_true", help="Keep checkpoints, outputs and logs.")
    parser.add_argument("--layers", type=int, help="Only this many decoder layers, each as big as in the full "
                        "SIZE checkpoint (peak memory is per layer: a shallow checkpoint measures it on less disk).")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1.")
    try:
        args.sizes = [float(size) for size in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes expects numbers of GB separated by commas, e.g. 0.5,3; got {args.sizes!r}.")
    for size in args.sizes:
        try:
            shape_for_bytes(size * 1e9)
        except ValueError as error:
            parser.error(f"--sizes {size:g}: {error}")
    args.methods = args.methods.split(",")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}.")
    if "cp" not in args.methods:
        args.methods.insert(0, "cp")  # every ratio is against cp
    if args.shard_gb <= 0:
        parser.error("--shard-gb must be positive.")
    if not args.workdir.is_dir():
        parser.error(f"--workdir {args.workdir}: no such folder.")
    args.extra_args = shlex.split(args.extra_args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_extra_args(args.methods, args.extra_args)
    check_disk(args.workdir, args.sizes, args.methods, args.keep, args.layers)
    workdir = Path(tempfile.mkdtemp(prefix="moeprune-streaming-bench-", dir=args.workdir))
    machine, rows = _machine(), []
    try:
        for size in args.sizes:
            for row in bench_size(size, args.methods, args.extra_args, workdir, args.shard_gb, args.keep,
                                  args.layers):
                rows.append(row)  # rewritten after every run, so an interrupted benchmark keeps what it measured
                result = {"machine": machine, "extra_args": args.extra_args, "rows": [asdict(row) for row in rows]}
                args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if args.keep:
            print(f"\nkept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nextra CLI args: {shlex.join(args.extra_args) or '(none)'}\n\n{markdown_table(rows)}\n\nwrote {args.json}")


if __name__ == "__main__":
    main()
