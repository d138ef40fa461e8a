"""Streaming a checkpoint layer by layer from its shards gives the in-memory path's checkpoint, tensor for
tensor, holds one decoder layer at a time, never touches the input, and resumes after an interruption."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_tiny_model
from safetensors import safe_open

from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig
from hf_moeprune.calibration import sequential
from hf_moeprune.cli import main
from hf_moeprune.pipeline import shards, sources, streaming
from hf_moeprune.pipeline.streaming import reduce_checkpoint

CALIB = torch.randint(3, 96, (4, 24), generator=torch.Generator().manual_seed(5))
DECODER_FAMILIES = [f for f in FAMILIES if f != "switch_transformers"]
METHOD_RECIPES = {
    "frequency": dict(experts_per_layer=4),
    "frequency-adaptive": dict(method="frequency", expert_sparsity=0.4, adaptive=True),
    "random": dict(experts_per_layer=4),
    "reap": dict(experts_per_layer=4),
    "naee": dict(experts_per_layer=4),
    "stun": dict(expert_sparsity=0.25),
    "stun-owl": dict(method="stun", expert_sparsity=0.5, weight_sparsity=0.4),
    "uncurl": dict(experts_per_layer=3, method_options={"alignment": "activations"}),
    "mc-smoe": dict(experts_per_layer=3),
    "hc-smoe": dict(experts_per_layer=3),
    "hc-smoe-tied": dict(method="hc-smoe", experts_per_layer=3, method_options={"router": "tied"}),
    "wanda": dict(weight_sparsity=0.5),
    "owl": dict(weight_sparsity=0.5, method_options={"targets": ["experts", "attention"]}),
}


def recipe(name: str) -> MoEPruneConfig:
    fields = dict(METHOD_RECIPES[name])
    return MoEPruneConfig(method=fields.pop("method", name), **fields)


def sharded_checkpoint(folder: Path, family: str = "mixtral", **overrides) -> Path:
    """A tiny checkpoint split into many shards, so every read goes through the index."""
    model = build_tiny_model(family, **overrides).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="60KB")
    assert (folder / shards.INDEX_FILE).is_file() and len(list(folder.glob("*.safetensors"))) > 3
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            found.update({key: handle.get_tensor(key) for key in handle.keys()})
    return found


def record(folder: Path) -> dict:
    entry = json.loads((folder / "config.json").read_text())["moeprune"]
    entry.pop("base_model")
    return entry


def in_memory(source: Path, output: Path, config: MoEPruneConfig) -> Path:
    model = AutoMoEPruneModelForCausalLM.from_pretrained(source)
    model.progress = False
    step = model.merge_experts if config.method in ("uncurl", "mc-smoe", "hc-smoe") else model.prune_experts
    step(config, calibration=CALIB)
    return model.save_pretrained(output)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    left, right = tensors(a), tensors(b)
    assert left.keys() == right.keys()
    assert [key for key in left if not torch.equal(left[key], right[key])] == []
    assert record(a) == record(b)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_every_family_streams_to_the_in_memory_result(tmp_path, family):
    source = sharded_checkpoint(tmp_path / "in", family)
    before = digest(source)
    config = MoEPruneConfig(method="frequency", experts_per_layer=4)
    reduce_checkpoint(source, tmp_path / "streamed", config, calibration=CALIB, progress=False)
    assert_same_checkpoint(in_memory(source, tmp_path / "memory", config), tmp_path / "streamed")
    assert digest(source) == before  # the input is only read
    reloaded = AutoMoEPruneModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert {row["num_experts"] for row in reloaded.summary()} == {4}


@pytest.mark.parametrize("name", sorted(METHOD_RECIPES))
def test_every_method_streams_to_the_in_memory_result(tmp_path, name):
    source = sharded_checkpoint(tmp_path / "in", num_hidden_layers=3)
    reduce_checkpoint(source, tmp_path / "streamed", recipe(name), calibration=CALIB, progress=False)
    assert_same_checkpoint(in_memory(source, tmp_path / "memory", recipe(name)), tmp_path / "streamed")


@pytest.mark.parametrize("method", ["frequency", "hc-smoe"])
def test_group_limited_routing_streams_to_the_in_memory_result(tmp_path, method):
    source = sharded_checkpoint(tmp_path / "in", "deepseek_v3", n_routed_experts=8, n_group=2, topk_group=1)
    config = MoEPruneConfig(method=method, experts_per_layer=4)
    reduce_checkpoint(source, tmp_path / "streamed", config, calibration=CALIB, progress=False)
    assert_same_checkpoint(in_memory(source, tmp_path / "memory", config), tmp_path / "streamed")


def test_fused_key_layout_streams_like_the_hub_layout(tmp_path):
    model = build_tiny_model("mixtral").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hub", max_shard_size="60KB")
    model.save_pretrained(tmp_path / "fused", max_shard_size="60KB", save_original_format=False)
    assert any(key.endswith("experts.gate_up_proj") for key in tensors(tmp_path / "fused"))
    config = MoEPruneConfig(method="reap", experts_per_layer=4)
    reduce_checkpoint(tmp_path / "hub", tmp_path / "a", config, calibration=CALIB, progress=False)
    reduce_checkpoint(tmp_path / "fused", tmp_path / "b", config, calibration=CALIB, progress=False)
    # each is written back in its input's layout, as save_pretrained does, and both are the same model
    assert_same_checkpoint(in_memory(tmp_path / "fused", tmp_path / "memory", config), tmp_path / "b")
    logits = [AutoMoEPruneModelForCausalLM.from_pretrained(tmp_path / n)(input_ids=CALIB).logits for n in "ab"]
    assert torch.equal(*logits)


def test_one_decoder_layer_in_memory_at_a_time(tmp_path, monkeypatch):
    source = sharded_checkpoint(tmp_path / "in", num_hidden_layers=4)
    loaded_at_once = []
    original_load = sources.StreamingSource.load

    def load(self, position, weights="all"):
        unit = original_load(self, position, weights)
        live = [u.index for u in self.units if any(p.device.type != "meta" for p in u.module.parameters())]
        loaded_at_once.append(live)
        return unit

    monkeypatch.setattr(sources.StreamingSource, "load", load)
    reduce_checkpoint(source, tmp_path / "out", recipe("naee"), calibration=CALIB, progress=False)
    assert loaded_at_once == [[i] for i in range(4)]


def test_data_free_stun_reads_router_rows_then_each_layer_once(tmp_path, monkeypatch):
    source = sharded_checkpoint(tmp_path / "in", num_hidden_layers=3)
    loads: list[list[str]] = []
    read_keys: list[str] = []
    original_load, original_read = shards.CheckpointReader.load, shards.CheckpointReader.read
    monkeypatch.setattr(shards.CheckpointReader, "load", lambda self, model, keys: loads.append(list(keys))
                        or original_load(self, model, keys))
    monkeypatch.setattr(shards.CheckpointReader, "read", lambda self, keys: read_keys.extend(keys)
                        or original_read(self, keys))
    reduce_checkpoint(source, tmp_path / "out", recipe("stun"), calibration=None, progress=False)
    outside, first_pass, second_pass = loads[0], loads[1:4], loads[4:]
    assert all(not key.startswith("model.layers.") for key in outside)
    assert all(key.endswith("block_sparse_moe.gate.weight") for keys in first_pass for key in keys)
    assert len(second_pass) == 3 and all(any(".experts." in key for key in keys) for keys in second_pass)
    # every key that was asked for is read from the disk exactly once per pass
    assert sorted(read_keys) == sorted(key for keys in loads for key in keys)
    assert record(tmp_path / "out")["steps"][0]["forward_passes"] == 0


def test_a_layer_loads_one_parameter_at_a_time_largest_first(tmp_path, monkeypatch):
    source = sharded_checkpoint(tmp_path / "in", num_hidden_layers=1)
    converted: list[list[str]] = []
    original = shards.CheckpointReader.load_into
    monkeypatch.setattr(shards.CheckpointReader, "load_into", lambda self, model, tensors: converted.append(
        [self.target_of(key) for key in tensors]) or original(self, model, tensors))
    reduce_checkpoint(source, tmp_path / "out", recipe("random"), progress=False)
    layer = [targets for targets in converted if targets[0].startswith("model.layers.0.")]
    assert all(len(set(targets)) == 1 for targets in layer)  # one target parameter per conversion
    assert layer[0][0].endswith("experts.gate_up_proj") and len(layer[0]) == 12  # 6 experts x (w1, w3), first
    assert layer[1][0].endswith("experts.down_proj")


def test_a_truncated_shard_is_named(tmp_path):
    source = sharded_checkpoint(tmp_path / "in")
    index = json.loads((source / shards.INDEX_FILE).read_text())["weight_map"]
    victim = source / index["model.layers.1.block_sparse_moe.experts.0.w1.weight"]
    victim.write_bytes(victim.read_bytes()[:-64])
    with pytest.raises(OSError, match="truncated"):
        reduce_checkpoint(source, tmp_path / "out", recipe("random"), progress=False)


def test_dtype_is_kept_unless_asked(tmp_path):
    source = sharded_checkpoint(tmp_path / "in")
    config = MoEPruneConfig(method="random", experts_per_layer=4)
    reduce_checkpoint(source, tmp_path / "bf16", config, progress=False)
    reduce_checkpoint(source, tmp_path / "fp32", config, dtype="float32", progress=False)
    assert {t.dtype for t in tensors(tmp_path / "bf16").values()} == {torch.bfloat16}
    assert {t.dtype for t in tensors(tmp_path / "fp32").values()} == {torch.float32}


@pytest.mark.parametrize("activations", ["memory", "disk"])
def test_interrupted_run_resumes_after_its_last_layer(tmp_path, monkeypatch, activations):
    source = sharded_checkpoint(tmp_path / "in", num_hidden_layers=4)
    config = recipe("stun-owl")  # two phases, global decision, sequential second phase
    reduce_checkpoint(source, tmp_path / "reference", config, calibration=CALIB, progress=False, activations=activations, batch_size=2)
    written = []
    original_write = shards.ShardWriter.write_module

    def write_then_die(self, model, path, module, position):
        if len(written) == 5:  # phase 1 done, phase 2 one layer in
            raise KeyboardInterrupt
        written.append(path)
        return original_write(self, model, path, module, position)

    monkeypatch.setattr(shards.ShardWriter, "write_module", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        reduce_checkpoint(source, tmp_path / "out", recipe("stun-owl"), calibration=CALIB, progress=False, activations=activations, batch_size=2)
    monkeypatch.setattr(shards.ShardWriter, "write_module", original_write)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        reduce_checkpoint(source, tmp_path / "out", recipe("stun-owl"), calibration=CALIB, progress=False, activations=activations, batch_size=2)
    with pytest.raises(ValueError, match="different recipe"):
        other = MoEPruneConfig(method="stun", expert_sparsity=0.5, weight_sparsity=0.3)
        reduce_checkpoint(source, tmp_path / "out", other, calibration=CALIB, progress=False, activations=activations, batch_size=2, resume=True)
    resumed_layers = []
    monkeypatch.setattr(shards.ShardWriter, "write_module", lambda self, model, path, module, position:
                        resumed_layers.append(path) or original_write(self, model, path, module, position))
    reduce_checkpoint(source, tmp_path / "out", recipe("stun-owl"), calibration=CALIB, progress=False, activations=activations, batch_size=2, resume=True)
    assert resumed_layers == [f"model.layers.{i}" for i in (1, 2, 3)]
    assert_same_checkpoint(tmp_path / "reference", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "reference"]


@pytest.mark.parametrize("name", ["naee", "stun-owl"])
def test_activations_spilled_to_disk_give_the_same_checkpoint(tmp_path, monkeypatch, name):
    source = sharded_checkpoint(tmp_path / "in", num_hidden_layers=3)
    options = dict(calibration=CALIB, progress=False, batch_size=2)  # two batches: two files per layer
    reduce_checkpoint(source, tmp_path / "memory", recipe(name), activations="memory", **options)
    folders: list[Path] = []
    original = sequential.DiskBatches.append
    monkeypatch.setattr(sequential.DiskBatches, "append", lambda self, t: folders.append(self.folder)
                        or original(self, t))
    monkeypatch.setattr(streaming, "available_memory", lambda: 1)  # auto: nothing fits, so spill
    reduce_checkpoint(source, tmp_path / "disk", recipe(name), activations="auto", **options)
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "disk")
    assert len(folders) >= 2 * 4 and not any(folder.exists() for folder in folders)  # used, then cleaned up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "in", "memory"]


def test_refusals_come_before_any_output(tmp_path):
    encoder_decoder = tmp_path / "switch"
    build_tiny_model("switch_transformers").save_pretrained(encoder_decoder)
    with pytest.raises(ValueError, match="cannot be streamed"):
        reduce_checkpoint(encoder_decoder, tmp_path / "a", MoEPruneConfig(method="random", experts_per_layer=4))
    source = sharded_checkpoint(tmp_path / "in")
    with pytest.raises(ValueError, match="no CUDA GPU|Unknown device"):
        reduce_checkpoint(source, tmp_path / "b", MoEPruneConfig(method="random", experts_per_layer=4),
                          device="cuda" if not torch.cuda.is_available() else "tpu")
    with pytest.raises(ValueError, match="Unknown dtype"):
        reduce_checkpoint(source, tmp_path / "c", MoEPruneConfig(method="random", experts_per_layer=4), dtype="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "switch"]


def test_not_enough_disk_is_refused_up_front(tmp_path, monkeypatch):
    source = sharded_checkpoint(tmp_path / "in")
    monkeypatch.setattr(streaming.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(OSError, match="Not enough free disk"):
        reduce_checkpoint(source, tmp_path / "out", MoEPruneConfig(method="random", experts_per_layer=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_cli_streaming_flag_gives_the_in_memory_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = sharded_checkpoint(tmp_path / "in")
    common = ["prune", "--model", str(source), "--method", "stun", "--expert-sparsity", "0.5"]
    assert main([*common, "--output", "streamed", "--streaming"]) == 0
    assert main([*common, "--output", "memory", "--in-memory"]) == 0
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    assert main([*common, "--output", "x", "--resume", "--in-memory"]) == 2
    assert "--resume continues streaming runs only" in capsys.readouterr().err


def test_non_uniform_input_streams_like_in_memory(tmp_path):
    source = sharded_checkpoint(tmp_path / "in", num_hidden_layers=3)
    reduce_checkpoint(source, tmp_path / "stun", MoEPruneConfig(method="stun", expert_sparsity=0.4), progress=False)
    assert record(tmp_path / "stun")["uniform"] is False
    config = MoEPruneConfig(method="frequency", experts_per_layer=2)
    reduce_checkpoint(tmp_path / "stun", tmp_path / "streamed", config, calibration=CALIB, progress=False)
    assert_same_checkpoint(in_memory(tmp_path / "stun", tmp_path / "memory", config), tmp_path / "streamed")


def test_a_failed_final_save_keeps_every_finished_layer_for_resume(tmp_path, monkeypatch):
    from hf_moeprune import modeling

    source = sharded_checkpoint(tmp_path / "in", num_hidden_layers=3)
    config = MoEPruneConfig(method="stun", expert_sparsity=0.25)
    reduce_checkpoint(source, tmp_path / "reference", config, progress=False)

    def card_fails(folder, name):
        raise OSError("disk full while writing the card")

    monkeypatch.setattr(modeling, "_write_card", card_fails)
    with pytest.raises(OSError, match="disk full"):
        reduce_checkpoint(source, tmp_path / "out", config, progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "out").exists()
    reduce_checkpoint(source, tmp_path / "out", config, progress=False, resume=True)
    assert_same_checkpoint(tmp_path / "reference", tmp_path / "out")


def test_a_partial_run_missing_its_shards_is_not_resumed(tmp_path, monkeypatch):
    source = sharded_checkpoint(tmp_path / "in", num_hidden_layers=3)
    config = MoEPruneConfig(method="random", experts_per_layer=4)
    original_write = shards.ShardWriter.write_module
    calls = []

    def die_on_third(self, *args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original_write(self, *args)

    monkeypatch.setattr(shards.ShardWriter, "write_module", die_on_third)
    with pytest.raises(KeyboardInterrupt):
        reduce_checkpoint(source, tmp_path / "out", config, progress=False)
    monkeypatch.undo()
    next((tmp_path / ".out.moeprune-partial/phase-0").glob("model-00001-of-*.safetensors")).unlink()
    with pytest.raises(ValueError, match=r"incomplete.*\[0\]"):
        reduce_checkpoint(source, tmp_path / "out", config, progress=False, resume=True)


def test_a_broken_weight_is_named_and_nothing_is_written(tmp_path):
    model = build_tiny_model("mixtral").to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "in", max_shard_size="60KB")
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.q_proj\.weight' contains NaN"):
        reduce_checkpoint(tmp_path / "in", tmp_path / "out", MoEPruneConfig(method="random", experts_per_layer=4),
                          progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
