"""Expert-usage histograms per domain of measured testbeds, as one heat map per layer.

Reads `testbed_metrics.json` (written by `python -m hf_moeprune.testbed.report --model DIR`): for each domain, the
share of its held-out tokens' top-k choices that each expert receives. A row per domain, a column per expert
(sorted by overall use), a panel per layer; one figure per model.

    python benchmarks/plot_testbed_usage.py hf_moeprune/testbed/checkpoints/mixtral-8e \
        hf_moeprune/testbed/checkpoints/mixtral-32e --output benchmarks/results/testbed_usage.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_moeprune.testbed import DOMAINS
from hf_moeprune.testbed.report import METRICS_FILE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="Measured testbed folders.")
    parser.add_argument("--output", required=True, help="PNG to write (one row of panels per model).")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    usages = [json.loads((Path(m) / METRICS_FILE).read_text())["routing"]["usage_per_group"] for m in args.models]
    layers = len(usages[0][DOMAINS[0]])
    figure, axes = plt.subplots(len(usages), layers, figsize=(3.6 * layers, 2.6 * len(usages)), squeeze=False)
    for row, (model, usage) in enumerate(zip(args.models, usages, strict=True)):
        for layer in range(layers):
            shares = np.array([usage[domain][layer] for domain in DOMAINS])  # [domains, experts]
            order = np.argsort(-shares.mean(0))
            axis = axes[row][layer]
            image = axis.imshow(shares[:, order], aspect="auto", cmap="viridis", vmin=0)
            axis.set_title(f"{Path(model).name}, layer {layer}", fontsize=9)
            axis.set_yticks(range(len(DOMAINS)), DOMAINS if layer == 0 else [""] * len(DOMAINS), fontsize=7)
            axis.set_xlabel("expert (by overall use)", fontsize=7)
            axis.tick_params(axis="x", labelsize=6)
            figure.colorbar(image, ax=axis, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    figure.suptitle("Share of each domain's held-out top-k choices per expert", fontsize=10)
    figure.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"plot: {args.output}")


if __name__ == "__main__":
    main()
