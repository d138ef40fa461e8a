"""Benchmarks: expert-parallel logits match one process, the JSON has every field, pruning shrinks the experts
each process holds. The multi-process tests spawn 2 processes through torch.distributed.run (gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY_CONFIGS, VOCAB, save_tiny_model

from hf_moeprune.bench.cli import bench_args_from, bench_args_to_argv, build_parser
from hf_moeprune.bench.expert_parallel import shard_sizes, transformers_ep_refusal
from hf_moeprune.bench.report import summary_table
from hf_moeprune.bench.timing import summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5
LAUNCH_TIMEOUT = 900  # six launches (one per model and process count) on a shared 2-core machine
RESULT_FIELDS = {
    "model",
    "label",
    "model_type",
    "num_experts",
    "mean_experts",
    "total_experts",
    "top_k",
    "num_processes",
    "engine",
    "engine_note",
    "expert_shards",
    "backend",
    "device",
    "dtype",
    "threads_per_process",
    "batch_size",
    "seq_len",
    "decode_tokens",
    "warmup",
    "repeats",
    "prefill_latency_s",
    "decode_time_per_token_s",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "memory",
    "communication",
    "logits_check",
}
STAT_FIELDS = {"median", "p90", "mean", "min", "max", "n", "samples"}
MEMORY_FIELDS = {
    "rank",
    "pid",
    "param_bytes",
    "expert_param_bytes",
    "rss_bytes",
    "peak_rss_bytes",
    "rss_after_load_bytes",
}
PHASE_FIELDS = {
    "wall_s",
    "collective_s",
    "collective_by_kind_s",
    "expert_compute_s",
    "collective_share",
    "expert_compute_share",
}


def _env() -> dict:
    env = dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore"
    )
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """tiny Mixtral with 8 experts, and frequency-pruned copies with 4 (2x reduced) and 3 (not divisible by 2)."""
    from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig

    root = tmp_path_factory.mktemp("bench-models")
    base = save_tiny_model("mixtral", root / "mixtral-8e", num_local_experts=8)
    calibration = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    paths = {"base": str(base)}
    for count in (4, 3):
        model = AutoMoEPruneModelForCausalLM.from_pretrained(str(base))
        model.prune_experts(
            MoEPruneConfig(method="frequency", experts_per_layer=count), calibration=calibration
        )
        model.save_pretrained(root / f"mixtral-{count}e")
        paths[count] = str(root / f"mixtral-{count}e")
    return paths


def test_shard_sizes_are_contiguous_and_uneven():
    assert shard_sizes(8, 2) == [4, 4]
    assert shard_sizes(3, 2) == [2, 1]
    assert shard_sizes(6, 4) == [2, 2, 1, 1]
    assert sum(shard_sizes(13, 5)) == 13


def test_summarize_median_p90():
    stats = summarize([float(x) for x in range(1, 11)])
    assert stats["median"] == 5.5 and stats["p90"] == 9.0 and stats["n"] == 10


def test_transformers_refusal_names_the_counts(checkpoints):
    assert transformers_ep_refusal(checkpoints["base"], 2) is None
    assert "3 experts per layer are not divisible by 2" in transformers_ep_refusal(checkpoints[3], 2)


def test_arguments_round_trip():
    argv = ["--model", "m", "--compare", "a", "b", "--expert-parallel", "--batch-size", "3", "--no-profile"]
    args = bench_args_from(build_parser().parse_args(argv))
    assert bench_args_from(build_parser().parse_args(bench_args_to_argv(args))) == args


@pytest.mark.multiprocess
def test_benchmark_one_and_two_processes(checkpoints, tmp_path):
    output = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "hf_moeprune.bench", "--processes", "1", "2",
        "--model", checkpoints["base"], "--compare", checkpoints[4], checkpoints[3],
        "--expert-parallel", "--check-logits", "--batch-size", "2", "--seq-len", "16", "--decode-tokens", "2",
        "--warmup", "1", "--repeats", "2", "--output", str(output),
    ]  # fmt: skip
    done = subprocess.run(
        command, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "prefill ms (med/p90)" in done.stdout  # the summary table
    assert "[bench]" in done.stderr  # progress
    payload = json.loads(output.read_text())
    assert os.path.isfile(payload["plot"])
    results = {(os.path.basename(r["model"]), r["num_processes"]): r for r in payload["results"]}
    assert len(results) == 6

    for r in results.values():
        assert RESULT_FIELDS <= set(r), RESULT_FIELDS - set(r)
        assert STAT_FIELDS <= set(r["prefill_latency_s"]) and STAT_FIELDS <= set(r["decode_time_per_token_s"])
        assert r["prefill_latency_s"]["median"] > 0 and r["decode_tokens_per_s"] > 0
        assert len(r["memory"]["per_process"]) == r["num_processes"]
        for m in r["memory"]["per_process"]:
            assert MEMORY_FIELDS <= set(m)
        for phase in ("prefill", "decode"):
            assert PHASE_FIELDS <= set(r["communication"]["per_process"][0][phase])
        assert r["communication"]["prefill"]["expert_compute_s"] > 0
        assert r["logits_check"]["max_abs_diff"] <= TOLERANCE, (r["model"], r["engine"], r["logits_check"])

    assert results[("mixtral-8e", 1)]["engine"] == "single"
    assert results[("mixtral-8e", 2)]["engine"] == "transformers"
    assert results[("mixtral-4e", 2)]["engine"] == "transformers"
    assert results[("mixtral-3e", 2)]["engine"] == "native"
    assert results[("mixtral-3e", 2)]["expert_shards"]["model.layers.0.mlp.experts"] == [2, 1]
    for name in ("mixtral-8e", "mixtral-4e", "mixtral-3e"):
        assert results[(name, 2)]["communication"]["prefill"]["collective_s"] > 0
        assert results[(name, 1)]["communication"]["prefill"]["collective_s"] == 0

    def expert_bytes(name, procs):
        return results[(name, procs)]["memory"]["max_expert_param_bytes"]

    for procs in (1, 2):
        assert expert_bytes("mixtral-4e", procs) < expert_bytes("mixtral-8e", procs)
    assert expert_bytes("mixtral-8e", 2) * 2 == expert_bytes("mixtral-8e", 1)
    assert expert_bytes("mixtral-4e", 2) * 2 == expert_bytes("mixtral-4e", 1)
    assert summary_table(payload["results"]).count("\n") == 7


def _fake_result(label: str, experts: float, procs: int, median: float) -> dict:
    """The fields the table and the plots read, with a made-up latency."""
    stats = {"median": median, "p90": median * 1.2}
    return {
        "label": label, "mean_experts": experts, "num_processes": procs, "engine": "single",
        "prefill_latency_s": stats, "decode_time_per_token_s": stats, "prefill_tokens_per_s": 1.0,
        "decode_tokens_per_s": 1.0, "communication": None, "batch_size": 1, "seq_len": 8, "decode_tokens": 2,
        "device": "cpu", "dtype": "float32", "perplexity": 10.0 + experts,
        "memory": {"max_expert_param_bytes": 2**20 * experts, "max_peak_rss_bytes": 2**27},
    }  # fmt: skip


def test_each_model_gets_its_own_launch(monkeypatch, tmp_path):
    """Peak RSS is per process: two models in one process would give the second the first one's peak."""
    from hf_moeprune.bench import cli

    commands = []

    def fake_run(command, check, timeout):
        commands.append(command)
        part = command[command.index("--output") + 1]
        model = command[command.index("--model") + 1]
        with open(part, "w") as handle:
            json.dump({"results": [{"model": model, "procs": command[command.index("--nproc_per_node") + 1]}]}, handle)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    args = bench_args_from(build_parser().parse_args(["--model", "base", "--compare", "a", "b"]))
    results = cli.spawn_launches(args, [1, 2])
    assert [(r["model"], r["procs"]) for r in results] == [
        ("base", "1"), ("a", "1"), ("b", "1"), ("base", "2"), ("a", "2"), ("b", "2"),
    ]  # fmt: skip
    assert all("--compare" not in command for command in commands)


def test_json_is_kept_without_matplotlib(monkeypatch, tmp_path, capsys):
    from hf_moeprune.bench import plot
    from hf_moeprune.bench.cli import write_outputs

    def missing():
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(plot, "_pyplot", missing)
    output = tmp_path / "bench.json"
    payload = {"results": [_fake_result("m-8e", 8, 1, 0.01), _fake_result("m-4e", 4, 1, 0.006)]}
    write_outputs(payload, str(output), None)
    saved = json.loads(output.read_text())
    assert saved["results"] == payload["results"] and saved["plot"] is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "bench.png").exists()


def test_plots_start_at_zero_and_single_points_are_bars():
    pytest.importorskip("matplotlib")
    from hf_moeprune.bench.plot import _draw, _pyplot

    plt = _pyplot()
    fig, (bars, lines) = plt.subplots(1, 2)
    _draw(bars, [("8e", [1], [5.0], [1.0]), ("4e", [1], [3.0], [0.5])], "processes")
    _draw(lines, [("1 process(es)", [4, 8], [3.0, 5.0], [0.5, 1.0])], "experts")
    assert [round(p.get_height(), 6) for p in bars.patches] == [5.0, 3.0]
    assert [t.get_text().split("\n")[0] for t in bars.get_xticklabels()] == ["8e", "4e"]
    assert not lines.patches and lines.get_xlim()[0] == 0
    assert bars.get_ylim()[0] == 0 and lines.get_ylim()[0] == 0
    plt.close(fig)


def test_benchmark_and_sweep_plots_draw_from_fake_results(tmp_path):
    pytest.importorskip("matplotlib")
    from hf_moeprune.bench.plot import plot_benchmark, plot_sweep

    results = [_fake_result("m-8e", 8, 1, 0.01), _fake_result("m-4e", 4, 1, 0.006)]
    assert os.path.getsize(plot_benchmark(results, str(tmp_path / "b.png"))) > 0
    assert os.path.getsize(plot_sweep(results, str(tmp_path / "s.png"))) > 0


# The workers run under torch.distributed.run, whose path does not hold tests/ (conftest's builder):
# they get conftest's tiny Mixtral config as JSON and keep transformers' default init (only equality matters).
WORKER = textwrap.dedent(
    """
    import copy, json, sys
    import torch, torch.distributed as dist, transformers
    from hf_moeprune.bench.expert_parallel import apply_native_expert_parallel

    def shrink(model, layer, keep):
        mlp = model.model.layers[layer].mlp
        mlp.gate.weight = torch.nn.Parameter(mlp.gate.weight.data[keep].clone())
        mlp.gate.num_experts = len(keep)
        for name in ("gate_up_proj", "down_proj"):
            setattr(mlp.experts, name, torch.nn.Parameter(getattr(mlp.experts, name).data[keep].clone()))
        mlp.experts.num_experts = len(keep)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**dict(json.loads(sys.argv[1]), num_local_experts=8))
    model = transformers.MixtralForCausalLM(config).eval()
    shrink(model, 0, [0, 2, 5])          # 3 experts: shards [2, 1]
    shrink(model, 1, [1, 3, 4, 6, 7])    # 5 experts: shards [3, 2]
    ids = torch.randint(0, config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        sharded = copy.deepcopy(model)
        layout = apply_native_expert_parallel(sharded)
        mine = torch.tensor_split(ids, 2)[rank]
        diff = (sharded(input_ids=mine).logits - torch.tensor_split(reference, 2)[rank]).abs().max().item()
    out = {"rank": rank, "diff": diff, "layout": layout,
           "local": [m.down_proj.shape[0] for m in (l.mlp.experts for l in sharded.model.layers)]}
    tiny = transformers.MixtralForCausalLM(transformers.MixtralConfig(**dict(json.loads(sys.argv[1]),
                                           num_experts_per_tok=1, num_local_experts=2)))
    shrink(tiny, 1, [0])
    try:
        apply_native_expert_parallel(tiny)
        out["refusal"] = None
    except ValueError as error:
        out["refusal"] = str(error)
    results = [None, None]
    dist.all_gather_object(results, out)
    if rank == 0:
        json.dump(results, open(sys.argv[2], "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.multiprocess
def test_native_uneven_nonuniform_matches_one_process(tmp_path):
    script, output = tmp_path / "worker.py", tmp_path / "out.json"
    script.write_text(WORKER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(script), json.dumps(TINY_CONFIGS["mixtral"]), str(output),
    ]  # fmt: skip
    done = subprocess.run(
        command, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = json.loads(output.read_text())
    for out in ranks:
        assert out["diff"] <= TOLERANCE, out
        assert out["layout"] == {"model.layers.0.mlp.experts": [2, 1], "model.layers.1.mlp.experts": [3, 2]}
        assert "model.layers.1.mlp.experts" in out["refusal"] and "1 experts" in out["refusal"]
    assert ranks[0]["local"] == [2, 3] and ranks[1]["local"] == [1, 2]


def test_sweep_reads_text_files_paragraph_by_paragraph(tmp_path):
    """`--eval-text` and `--text` files: blank-line paragraphs joined by one blank line, cut into full rows."""
    from transformers import AutoTokenizer

    from hf_moeprune.bench.sweep import token_ids
    from hf_moeprune.testbed import testbed_path

    model = str(testbed_path())
    paragraphs = ["The river rose in the night.", "By morning the bridge was gone, and the town woke to water."]
    text = tmp_path / "held.txt"
    text.write_text(f"\n\n{paragraphs[0]}\n\n\n{paragraphs[1]}\n", encoding="utf-8")
    expected = AutoTokenizer.from_pretrained(model)("\n\n".join(paragraphs), return_tensors="pt").input_ids[0]
    ids = token_ids(model, str(text), vocab_size=0, count=3, seq_len=4, seed=0)
    assert torch.equal(ids, expected[: 3 * 4].view(3, 4))
    with pytest.raises(ValueError, match=f"holds fewer than {expected.numel() + 1} tokens"):
        token_ids(model, str(text), vocab_size=0, count=1, seq_len=expected.numel() + 1, seed=0)
