"""PNG plots of a benchmark (latency against experts and processes) and of a sweep (latency, memory, quality)."""

from __future__ import annotations

from collections import defaultdict


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errorbar(ax, xs, stats, label, marker="o"):
    medians = [s["median"] * 1e3 for s in stats]
    upper = [(s["p90"] - s["median"]) * 1e3 for s in stats]
    ax.errorbar(xs, medians, yerr=[[0] * len(upper), upper], marker=marker, capsize=3, label=label)


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
        for procs, rows in sorted(by_procs.items()):
            rows = sorted((r for r in rows if r[key]), key=lambda r: r["mean_experts"])
            _errorbar(ax, [r["mean_experts"] for r in rows], [r[key] for r in rows], f"{procs} process(es)")
        ax.set_xlabel("experts per MoE layer (mean)")
        ax.set_ylabel("ms")
        ax.set_title(f"{title} vs experts")
        ax.legend()
        ax = axes[1][column]
        for (label, experts), rows in sorted(by_model.items(), key=lambda item: -item[0][1]):
            rows = sorted((r for r in rows if r[key]), key=lambda r: r["num_processes"])
            _errorbar(
                ax,
                [r["num_processes"] for r in rows],
                [r[key] for r in rows],
                f"{label} ({experts:g} experts)",
            )
        ax.set_xlabel("processes")
        ax.set_ylabel("ms")
        ax.set_title(f"{title} vs processes")
        ax.set_xticks(sorted(by_procs))
        ax.legend()
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
    for ax, (value, ylabel) in zip(axes, panels, strict=True):
        for procs, rows in sorted(by_procs.items()):
            rows = sorted(rows, key=lambda p: -p["mean_experts"])  # the line runs along the pruning
            xs, ys = [p[quality_key] for p in rows], [value(p) for p in rows]
            ax.plot(xs, ys, marker="o", label=f"{procs} process(es)")
            for x, y, p in zip(xs, ys, rows, strict=True):
                ax.annotate(
                    f"{p['mean_experts']:g}e", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
        ax.set_xlabel(f"{quality_key} (lower is better)" if quality_key == "perplexity" else quality_key)
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle("expert-count sweep: cost against quality")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
