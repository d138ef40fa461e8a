"""Result rows as a text table, alone or base model next to the reduced one (`hf-moeprune eval --compare`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def compare_rows(base: Sequence[dict[str, Any]], reduced: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows matched by (task, metric): {"task", "metric", "n", "base", "base_stderr", "value", "stderr",
    "change"} with `change` the relative difference `value / base - 1` (None where base is 0 or missing)."""
    by_key = {(r["task"], r["metric"]): r for r in base}
    out = []
    for row in reduced:
        other = by_key.get((row["task"], row["metric"]), {})
        base_value = other.get("value")
        change = row["value"] / base_value - 1 if base_value else None
        out.append(
            {
                "task": row["task"],
                "metric": row["metric"],
                "n": row.get("n"),
                "base": base_value,
                "base_stderr": other.get("stderr"),
                "value": row["value"],
                "stderr": row.get("stderr"),
                "change": change,
            }
        )
    return out


def _count(n: int | None) -> str:
    """A row's document count, blank where it has none (a compared row carries `n` as None)."""
    return "" if n is None else str(n)


def _number(value: Any, stderr: Any = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(stderr, (int, float)) and not math.isnan(stderr):
        text += f" ± {stderr:.2g}"
    return text


def format_table(rows: Sequence[dict[str, Any]], names: tuple[str, str] = ("base", "reduced")) -> str:
    """A fixed-width table of result rows (from `evaluate_model`) or comparison rows (from `compare_rows`)."""
    compared = any("base" in r for r in rows)
    if compared:
        header = ["task", "metric", "n", names[0], names[1], "change"]
        body = [
            [
                r["task"],
                r["metric"],
                _count(r.get("n")),
                _number(r["base"], r.get("base_stderr")),
                _number(r["value"], r.get("stderr")),
                "-" if r["change"] is None else f"{r['change']:+.1%}",
            ]
            for r in rows
        ]
    else:
        header = ["task", "metric", "n", "value"]
        body = [[r["task"], r["metric"], _count(r.get("n")), _number(r["value"], r.get("stderr"))] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
