"""Publishing: generated model cards and push_to_hub, against the local Hub-compatible server (real client, HTTP)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hub_fixtures
import pytest
import torch
import yaml
from conftest import VOCAB, save_tiny_model
from hub_fixtures import folder_fingerprint, make_handmade_checkpoint
from hub_server import LocalHubServer, validate_card_metadata

from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig
from hf_moeprune.hub import (
    HubPushError,
    build_model_card,
    push_checkpoint,
    read_recipes_from_card,
    write_model_card,
)
from hf_moeprune.hub.card import GENERATED_MARKER, TEMPLATE_PATH

local_hub = hub_fixtures.local_hub  # the fixture, shared with other test modules

REPO_ROOT = Path(__file__).resolve().parents[1]


def _metadata(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


# ----------------------------------------------------------------------------------------------- cards


@pytest.mark.parametrize(
    "merged, uniform", [(False, True), (True, False)], ids=["pruned-uniform", "merged-nonuniform"]
)
def test_card_records_the_checkpoint(tmp_path: Path, merged: bool, uniform: bool) -> None:
    folder = make_handmade_checkpoint(tmp_path / "ck", merged=merged, uniform=uniform)
    card = build_model_card(folder, license="apache-2.0")
    data = card.data.to_dict()
    assert data["base_model"] == "me/tiny-mixtral-base"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"
    method = "hc-smoe" if merged else "frequency"
    assert {"moe", "merged" if merged else "pruned", method} <= set(data["tags"])
    results = data["model-index"][0]["results"]
    assert {(r["dataset"]["type"], r["metrics"][0]["type"], r["metrics"][0]["value"]) for r in results} == {
        ("arc_easy", "acc", 0.412),
        ("wikitext", "word_perplexity", 23.5),
    }
    text = str(card)
    assert not validate_card_metadata(text)
    assert "| Parameters | 120.00K (120,000) | 80.00K (80,000) | -33.3% |" in text
    assert "| `model.layers.1.mlp` | 4 | 2 | 2 |" in text
    assert ("0←0 (60%) + 1 (40%)" in text) == merged and ("kept 0, 3" in text) == (not merged)
    assert "64 sequences" in text and "16384 tokens" in text
    assert (
        "tokens_per_second: 1,234.5" in text and "| pruned | 910.2 |" in text
    )  # bench.json headline figures
    assert "50.0%" in text  # weight sparsity
    if merged:
        assert "HC-SMoE" in text and "](https://arxiv.org/abs/2410.08589)" in text and "trust_remote_code=True" in text
    else:
        assert "trust_remote_code" not in text and "AutoModelForCausalLM.from_pretrained(" in text
    config = json.loads((folder / "config.json").read_text())["moeprune"]["steps"][0]["config"]
    assert read_recipes_from_card(text) == [MoEPruneConfig.from_dict(config)]


def test_card_without_optional_files_or_hub_base(tmp_path: Path) -> None:
    folder = make_handmade_checkpoint(
        tmp_path / "ck", base_model=str(tmp_path / "local-base"), with_extras=False
    )
    (tmp_path / "local-base").mkdir()
    (tmp_path / "local-base" / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    data = build_model_card(folder).data.to_dict()
    assert "base_model" not in data  # a local path is not a Hub id: the Hub would reject it
    assert data["license"] == "mit"  # carried from the local base model's card
    assert "model-index" not in data
    text = str(build_model_card(folder))
    assert "## Evaluation" not in text and "## Benchmarks" not in text


def test_write_model_card_keeps_hand_written_readme(tmp_path: Path) -> None:
    folder = make_handmade_checkpoint(tmp_path / "ck", with_extras=False)
    path = write_model_card(folder)
    assert GENERATED_MARKER in path.read_text()
    path.write_text("# my own card\n")
    write_model_card(folder)
    assert path.read_text() == "# my own card\n"
    staged = folder.rename(tmp_path / ".mixtral-2e.tmp-x1y2")  # save_pretrained's atomic staging folder
    assert "# mixtral-2e\n" in str(build_model_card(staged))


def test_template_single_source_of_truth() -> None:
    top_level = REPO_ROOT / "model_cards" / "moeprune_card.md.jinja"
    assert top_level.resolve() == TEMPLATE_PATH.resolve()


def test_card_validates_on_the_hub(local_hub: LocalHubServer, tmp_path: Path) -> None:
    card = build_model_card(make_handmade_checkpoint(tmp_path / "ck"), model_name="me/ck")
    card.validate()  # POST /api/validate-yaml through huggingface_hub
    bad = type(card)(str(card).replace("base_model: me/tiny-mixtral-base", "base_model: /not/a/hub/id"))
    with pytest.raises(ValueError, match="base_model"):
        bad.validate()


# ----------------------------------------------------------------------------------------------- push


def _upload_base(hub: LocalHubServer, tmp_path: Path) -> None:
    """A tiny Mixtral base model with an apache-2.0 card, hosted on the local Hub as me/tiny-base."""
    folder = save_tiny_model("mixtral", tmp_path / "base", num_local_experts=4)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# tiny base\n"
    hub.add_repo_files("me/tiny-base", files)


def test_prune_push_and_load_back(local_hub: LocalHubServer, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    _upload_base(local_hub, tmp_path)
    cache = str(tmp_path / "cache")
    model = AutoMoEPruneModelForCausalLM.from_pretrained("me/tiny-base", cache_dir=cache)
    config = MoEPruneConfig(method="frequency", experts_per_layer=2)
    calibration = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    model.prune_experts(config, calibration=calibration)

    info = model.push_to_hub("me/x", private=True, commit_message="pruned")
    assert info.oid == local_hub.repos["me/x"].refs["main"]
    assert local_hub.repos["me/x"].private
    head = local_hub.repos["me/x"].resolve("main")
    assert head.summary == "pruned" and head.files["model.safetensors"].lfs_oid  # weights went through LFS

    reloaded = AutoModelForCausalLM.from_pretrained("me/x", cache_dir=cache).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)

    from huggingface_hub import ModelCard

    card = ModelCard.load("me/x")
    data = yaml.safe_load(str(card).split("---")[1])
    assert (
        data["base_model"] == "me/tiny-base" and data["license"] == "apache-2.0"
    )  # carried from the base card
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"moe", "pruned", "frequency"} <= set(data["tags"])
    assert read_recipes_from_card(card) == [config]
    assert 'from_pretrained("me/x")' in str(card)
    calibration = model.record["steps"][0]["calibration"]
    assert f"(16 per sequence). SHA-256 of the token ids: `{calibration['token_sha256']}`" in str(card)
    assert not local_hub.unhandled


def test_push_without_token_fails_clearly(local_hub: LocalHubServer, tmp_path: Path, monkeypatch) -> None:
    folder = make_handmade_checkpoint(tmp_path / "ck")
    before = folder_fingerprint(folder)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="No Hugging Face token found"):
        push_checkpoint(folder, "me/nope")
    assert folder_fingerprint(folder) == before
    assert "me/nope" not in local_hub.repos and not local_hub.requests


def test_push_with_a_rejected_token(local_hub: LocalHubServer, tmp_path: Path) -> None:
    folder = make_handmade_checkpoint(tmp_path / "ck", with_extras=False)
    with pytest.raises(HubPushError, match="rejected the token"):
        push_checkpoint(folder, "me/nope", token="hf_wrong")
    assert "me/nope" not in local_hub.repos


def test_bad_repo_id_or_pr_on_a_branch_fail_before_any_request(local_hub: LocalHubServer, tmp_path: Path) -> None:
    folder = make_handmade_checkpoint(tmp_path / "ck", with_extras=False)
    with pytest.raises(ValueError, match="not a Hub repository id"):
        push_checkpoint(folder, "me/two/slashes")
    with pytest.raises(ValueError, match="pull request is opened against main"):
        push_checkpoint(folder, "me/pr", revision="dev", create_pr=True)
    assert not local_hub.requests


def test_push_to_an_unreachable_server(local_hub: LocalHubServer, tmp_path: Path) -> None:
    folder = make_handmade_checkpoint(tmp_path / "ck")
    before = folder_fingerprint(folder)
    local_hub.stop()
    with pytest.raises(HubPushError, match="unreachable .* run the push again"):
        push_checkpoint(folder, "me/nope")
    assert folder_fingerprint(folder) == before


def test_transient_transfer_failures_are_retried_by_huggingface_hub(
    local_hub: LocalHubServer, tmp_path: Path, caplog
) -> None:
    folder = make_handmade_checkpoint(tmp_path / "ck", with_extras=False)
    local_hub.fail_next("POST", r"/preupload/", times=1, status=502)
    local_hub.fail_next("PUT", r"^/_lfs/", times=2, status=503)
    with caplog.at_level(logging.WARNING, logger="huggingface_hub"):
        info = push_checkpoint(folder, "me/flaky")
    requests = local_hub.requests
    assert sum(1 for m, p in requests if m == "POST" and "/preupload/" in p) == 2
    assert sum(1 for m, p in requests if m == "PUT" and p.startswith("/_lfs/")) == 3  # one LFS file, 2 retries
    assert sum("Retrying in" in record.getMessage() for record in caplog.records) == 3
    assert info.oid == local_hub.repos["me/flaky"].refs["main"]
    assert GENERATED_MARKER in local_hub.file("me/flaky", "README.md").decode()


def test_failed_commit_is_reported_and_a_rerun_sends_no_weights_twice(
    local_hub: LocalHubServer, tmp_path: Path
) -> None:
    # huggingface_hub does not retry the commit itself (a lost answer would duplicate the commit or the PR)
    folder = make_handmade_checkpoint(tmp_path / "ck", with_extras=False)
    before = folder_fingerprint(folder)
    local_hub.fail_next("POST", r"/commit/", times=1, status=503)
    with pytest.raises(HubPushError, match="Could not upload .* run the push again"):
        push_checkpoint(folder, "me/rerun")
    assert folder_fingerprint(folder) == before
    assert "config.json" not in local_hub.repos["me/rerun"].resolve("main").files
    uploads = sum(1 for m, p in local_hub.requests if m == "PUT" and p.startswith("/_lfs/"))
    info = push_checkpoint(folder, "me/rerun")
    assert sum(1 for m, p in local_hub.requests if m == "PUT" and p.startswith("/_lfs/")) == uploads == 1
    assert info.oid == local_hub.repos["me/rerun"].refs["main"]
    assert "config.json" in local_hub.repos["me/rerun"].resolve("main").files


def test_cli_push_to_a_branch_and_as_pr(local_hub: LocalHubServer, tmp_path: Path, capsys) -> None:
    from hf_moeprune.cli import main

    folder = make_handmade_checkpoint(tmp_path / "ck", with_extras=False)
    assert main(["push", str(folder), "me/cli", "--revision", "dev", "--commit-message", "from cli"]) == 0
    repo = local_hub.repos["me/cli"]
    assert repo.resolve("dev").summary == "from cli" and "config.json" not in repo.resolve("main").files
    assert main(["push", str(folder), "me/cli", "--create-pr"]) == 0
    assert "refs/pr/1" in repo.refs and capsys.readouterr().out.strip().endswith("/discussions/1")
    assert main(["push", str(tmp_path / "missing"), "me/cli"]) == 1
    assert "no config.json" in capsys.readouterr().err


def test_merge_nonuniform_push_and_load_with_remote_code(local_hub: LocalHubServer, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    _upload_base(local_hub, tmp_path)
    cache = str(tmp_path / "cache")
    model = AutoMoEPruneModelForCausalLM.from_pretrained("me/tiny-base", cache_dir=cache)
    config = MoEPruneConfig(method="hc-smoe", num_experts_total=5, adaptive=True)
    model.merge_experts(
        config, calibration=torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    )
    assert model.record["uniform"] is False
    model.push_to_hub("me/merged")

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    remote = AutoModelForCausalLM.from_pretrained("me/merged", cache_dir=cache, trust_remote_code=True).eval()
    ours = AutoMoEPruneModelForCausalLM.from_pretrained("me/merged", cache_dir=cache).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.equal(expected, remote(input_ids=ids).logits)
        assert torch.equal(expected, ours(input_ids=ids).logits)

    card = ModelCard.load("me/merged")
    assert {"moe", "merged", "hc-smoe"} <= set(card.data.tags)
    assert "trust_remote_code=True" in str(card) and "](https://arxiv.org/abs/2410.08589)" in str(
        card
    )
    assert read_recipes_from_card(card) == [config]
    groups = model.record["layers"]["model.layers.0.mlp"]["groups"]
    assert f"| `model.layers.0.mlp` | 4 | {len(groups)} |" in str(card)
