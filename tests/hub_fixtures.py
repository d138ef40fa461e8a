"""Fixtures for publishing tests: a local Hub server wired into huggingface_hub, and tiny hf_moeprune checkpoints.

Import the fixtures into a test module (`from hub_fixtures import local_hub`); tests/ is on sys.path under pytest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import save_tiny_model
from hub_server import LocalHubServer


@pytest.fixture
def local_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHubServer]:
    """A running `LocalHubServer`; huggingface_hub (already imported or not) talks to it, with its token.

    huggingface_hub reads `HF_ENDPOINT` and friends once at import, so the constants are patched as well as the
    environment (the environment is what subprocesses see).
    """
    from huggingface_hub import constants

    with LocalHubServer() as hub:
        cache = tmp_path / "hf_cache"
        env = {
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": hub.token,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_CACHE": str(cache),
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        # Long-lived HfApi objects captured the endpoint when they were built: huggingface_hub's module-level one
        # (behind `huggingface_hub.create_repo` & co.) and transformers' shared one (with its revision cache).
        import huggingface_hub.hf_api

        monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.url)
        try:
            import transformers.utils.hub as transformers_hub
        except ImportError:
            transformers_hub = None
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            monkeypatch.setattr(transformers_hub, "_hf_api", None)
        # No token saved on this machine may leak in: only HF_TOKEN (set above, removable by a test) counts.
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_saved_token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_saved_tokens"))
        yield hub


def folder_fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under `folder`, to prove a failed push changed nothing."""
    return {
        path.relative_to(folder).as_posix(): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mtime_ns,
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def make_handmade_checkpoint(
    folder: Path,
    *,
    merged: bool = False,
    uniform: bool = True,
    base_model: str = "me/tiny-mixtral-base",
    with_extras: bool = True,
) -> Path:
    """A tiny Mixtral saved with a hand-written `moeprune` entry (card and push tests independent of the core)."""
    save_tiny_model("mixtral", folder, num_local_experts=2)
    config = json.loads((folder / "config.json").read_text())
    step = {
        "method": "hc-smoe" if merged else "frequency",
        "config": {
            "method": "hc-smoe" if merged else "frequency",
            "experts_per_layer": 2,
            "expert_sparsity": None,
            "num_experts_total": None,
            "adaptive": False,
            "weight_sparsity": None,
            "unstructured": None,
            "nm_pattern": None,
            "top_k": None,
            "seed": 0,
            "method_options": {},
            "library_version": "0.1.0",
        },
        "calibration": {
            "description": "64 sequences of wikitext-2 train",
            "num_sequences": 64,
            "num_tokens": 16384,
        },
    }
    groups = [[0, 1], [2, 3]] if merged else [[0], [3]]
    weights = [[0.6, 0.4], [0.5, 0.5]] if merged else [[1.0], [1.0]]
    layers = {
        f"model.layers.{i}.mlp": {
            "original_num_experts": 4,
            "num_experts": 2,
            "top_k": 2,
            "groups": groups,
            "merge_weights": weights,
        }
        for i in range(2)
    }
    config["moeprune"] = {
        "library_version": "0.1.0",
        "base_model": base_model,
        "family": "mixtral",
        "uniform": uniform,
        "steps": [step],
        "layers": layers,
        "weight_sparsity": {"model.layers.0.mlp.experts": 0.5},
        "parameters": {"before": 120_000, "after": 80_000},
        "bytes": {"before": 480_000, "after": 320_000},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if with_extras:
        (folder / "eval_results.json").write_text(
            json.dumps(
                [
                    {"task": "arc_easy", "metric": "acc", "value": 0.412, "stderr": 0.01, "n": 2376},
                    {"task": "wikitext", "metric": "word_perplexity", "value": 23.5, "stderr": None, "n": 62},
                ]
            )
        )
        (folder / "bench.json").write_text(
            json.dumps(
                {
                    "tokens_per_second": 1234.5,
                    "peak_memory_mb": 512,
                    "device": "cpu",
                    "summary": [{"model": "base", "tok/s": 700.0}, {"model": "pruned", "tok/s": 910.2}],
                }
            )
        )
    return folder
