"""PNG plots of a benchmark (latency against experts and processes) and of a sweep (latency, memory, quality).

Axes start at zero so that sizes compare by eye; a panel whose series have one point each is drawn as bars
(one bar per series), since a line through one point shows nothing.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable

BENCH_INSTALL = "pip install 'hf_moeprune[bench]' (matplotlib)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def optional_plot(plot: Callable[..., str], *args) -> str | None:
    """`plot(*args)`, or None with a note on stderr when matplotlib is not installed (results are kept)."""
    try:
        return plot(*args)
    except ModuleNotFoundError as error:
        if error.name != "matplotlib" and not str(error.name).startswith("matplotlib."):
            raise
        print(f"[bench] no plot: matplotlib is not installed ({BENCH_INSTALL}).", file=sys.stderr, flush=True)
        return None


def _draw(ax, series: list[tuple[str, list[float], list[float], list[float]]], xlabel: str) -> None:
    """`series` of (label, xs, ys, upper error bars): lines with markers, or bars when each has one point."""
    series = [s for s in series if s[1]]
    if series and all(len(xs) == 1 for _, xs, _, _ in series):
        positions = range(len(series))
        ax.bar(
            positions,
            [ys[0] for _, _, ys, _ in series],
            yerr=[[0] * len(series), [up[0] for _, _, _, up in series]],
            capsize=3,
            color=[f"C{i}" for i in positions],
        )
        ax.set_xticks(list(positions), [f"{label}\n{xlabel} {xs[0]:g}" for label, xs, _, _ in series], fontsize=8)
    else:
        for label, xs, ys, upper in series:
            ax.errorbar(xs, ys, yerr=[[0] * len(upper), upper], marker="o", capsize=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_xlim(left=0)
        if series:
            ax.legend()
    ax.set_ylim(bottom=0)


def _latency_series(label: str, rows: list[dict], x_key: str, key: str):
    rows = sorted((r for r in rows if r[key]), key=lambda r: r[x_key])
    return (
        label,
        [r[x_key] for r in rows],
        [r[key]["median"] * 1e3 for r in rows],
        [(r[key]["p90"] - r[key]["median"]) * 1e3 for r in rows],
    )


def plot_benchmark(results: list[dict], path: str) -> str:
    """2x2 figure: prefill latency and decode time per token (median, bar up to p90) against the mean number of
    experts per layer (one line per process count) and against the number of processes (one line per model)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    by_procs, by_model = defaultdict(list), defaultdict(list)
    for r in results:
        by_procs[r["num_processes"]].append(r)
        by_model[(r["label"], r["mean_experts"])].append(r)
    for column, key, title in (
        (0, "prefill_latency_s", "prefill latency"),
        (1, "decode_time_per_token_s", "decode time per token"),
    ):
        ax = axes[0][column]
        series = [
            _latency_series(f"{procs} process(es)", rows, "mean_experts", key)
            for procs, rows in sorted(by_procs.items())
        ]
        _draw(ax, series, "experts per MoE layer (mean)")
        ax.set_ylabel("ms")
        ax.set_title(f"{title} vs experts")
        ax = axes[1][column]
        series = [
            _latency_series(f"{label} ({experts:g} experts)", rows, "num_processes", key)
            for (label, experts), rows in sorted(by_model.items(), key=lambda item: -item[0][1])
        ]
        _draw(ax, series, "processes")
        if len(by_procs) > 1:
            ax.set_xticks(sorted(by_procs))
        ax.set_ylabel("ms")
        ax.set_title(f"{title} vs processes")
    first = results[0]
    fig.suptitle(
        f"batch {first['batch_size']} x {first['seq_len']} tokens, {first['decode_tokens']} decode steps, "
        f"{first['device']}, {first['dtype']} (median, bar to p90)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(points: list[dict], path: str, quality_key: str = "perplexity") -> str:
    """The trade-off curve: prefill latency, decode time per token and expert memory per process against quality,
    each point labelled with its expert count; one line per process count."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    by_procs = defaultdict(list)
    for p in points:
        by_procs[p["num_processes"]].append(p)
    panels = (
        (lambda p: p["prefill_latency_s"]["median"] * 1e3, "prefill latency (ms)"),
        (lambda p: p["decode_time_per_token_s"]["median"] * 1e3, "decode ms / token"),
        (lambda p: p["memory"]["max_expert_param_bytes"] / 2**20, "expert MiB per process"),
    )
    xlabel = f"{quality_key} (lower is better)" if quality_key == "perplexity" else quality_key
    # the line runs along the pruning: most experts first
    ordered = {procs: sorted(rows, key=lambda p: -p["mean_experts"]) for procs, rows in sorted(by_procs.items())}
    for ax, (value, ylabel) in zip(axes, panels, strict=True):
        series = [
            (f"{procs} process(es)", [p[quality_key] for p in rows], [value(p) for p in rows], [0.0] * len(rows))
            for procs, rows in ordered.items()
        ]
        _draw(ax, series, quality_key)
        if any(len(rows) > 1 for rows in ordered.values()):
            ax.set_xlabel(xlabel)
            for rows in ordered.values():
                for p in rows:
                    ax.annotate(
                        f"{p['mean_experts']:g}e",
                        (p[quality_key], value(p)),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=8,
                    )
        ax.set_ylabel(ylabel)
    fig.suptitle("expert-count sweep: cost against quality")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
