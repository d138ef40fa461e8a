"""The summary table printed at the end of a benchmark."""

from __future__ import annotations

MIB = 1024 * 1024


def _ms(stats: dict | None, key: str) -> str:
    return f"{stats[key] * 1e3:.2f}" if stats else "-"


def _pct(value) -> str:
    return f"{100 * value:.0f}%" if value is not None else "-"


def summary_table(results: list[dict]) -> str:
    """One row per (model, number of processes): latency (median / p90), throughput, communication and expert
    compute shares (prefill / decode), expert and peak memory per process."""
    header = [
        "model",
        "experts",
        "procs",
        "engine",
        "prefill ms (med/p90)",
        "decode ms/tok (med/p90)",
        "prefill tok/s",
        "decode tok/s",
        "comm % (pre/dec)",
        "expert % (pre/dec)",
        "expert MiB/proc",
        "peak RSS MiB/proc",
    ]
    rows = []
    for r in sorted(results, key=lambda r: (r["label"], r["num_processes"])):
        comm = r.get("communication") or {}
        pre, dec = comm.get("prefill") or {}, comm.get("decode") or {}
        rows.append(
            [
                r["label"],
                f"{r['mean_experts']:g}",
                str(r["num_processes"]),
                r["engine"],
                f"{_ms(r['prefill_latency_s'], 'median')}/{_ms(r['prefill_latency_s'], 'p90')}",
                f"{_ms(r['decode_time_per_token_s'], 'median')}/{_ms(r['decode_time_per_token_s'], 'p90')}",
                f"{r['prefill_tokens_per_s']:.0f}",
                f"{r['decode_tokens_per_s']:.0f}" if r["decode_tokens_per_s"] else "-",
                f"{_pct(pre.get('collective_share'))}/{_pct(dec.get('collective_share'))}",
                f"{_pct(pre.get('expert_compute_share'))}/{_pct(dec.get('expert_compute_share'))}",
                f"{r['memory']['max_expert_param_bytes'] / MIB:.2f}",
                f"{r['memory']['max_peak_rss_bytes'] / MIB:.0f}",
            ]
        )
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)
