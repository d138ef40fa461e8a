"""Every registered method on a tiny model of every family, with the test bodies written once.

Each (recipe x model) case runs the method through the public API, checks that the per-layer expert counts
are what was asked (or add up to the asked budget), that weight sparsity hits its target, and that the saved
checkpoint reloads with identical logits. Combinations refused by design are asserted as refused: one-line
ValueError, before any calibration, model untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from conftest import FAMILIES, GENERIC_CONFIGS, VOCAB, build_tiny_model, logits_of
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import hf_moeprune.modeling
from hf_moeprune import (
    AutoMoEPruneModelForCausalLM,
    AutoMoEPruneModelForSeq2SeqLM,
    MoEPruneConfig,
    MoEPruneModel,
)
from hf_moeprune.families import family_for_model
from hf_moeprune.methods import get_method, registered_methods
from hf_moeprune.moe_layers import find_moe_layers
from hf_moeprune.pipeline.units import block_units, decoder_units, is_layerwise

CALIBRATION_OPTIONS = dict(seq_len=32, max_sequences=4, batch_size=2)  # 128 tokens: enough for every rule
INPUT_IDS = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and on a loaded machine thread hand-offs dominate."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass(frozen=True)
class Recipe:
    """A `MoEPruneConfig` and what its result must look like.

    Attributes:
        counts: `"uniform"` (every MoE layer keeps `experts_per_layer`), `"budget"` (per-layer counts chosen
            by the method, adding up to the `expert_sparsity` budget) or `"unchanged"` (weights only).
        native: The checkpoint loads with plain transformers' Auto classes; otherwise through hf_moeprune's
            (per-layer counts or a tied router map need its loader).
        sparsity_rule: How weight sparsity is spread: `"per_layer"` (every layer at the target, Wanda) or
            `"layer_mean"` (OWL: layer sparsities whose plain mean is the target); None when no weights are zeroed.
        sparsity_scope: Which weights the rule is measured on: `"experts"` (the MoE layers' experts) or
            `"decoder_layers"` (every linear of every decoder layer, dense ones included).
    """

    config: dict
    counts: Literal["uniform", "budget", "unchanged"]
    native: bool = True
    sparsity_rule: Literal["per_layer", "layer_mean"] | None = None
    sparsity_scope: Literal["experts", "decoder_layers"] = "experts"

    def make_config(self) -> MoEPruneConfig:
        return MoEPruneConfig(**self.config)  # fresh per case: methods normalise method_options in place


KEEP = dict(experts_per_layer=4)  # of 6 (of 8 in the grouped model: 2 of each group of 4)
BUDGET = dict(expert_sparsity=0.25)
RECIPES: dict[str, Recipe] = {
    "frequency": Recipe(dict(method="frequency", **KEEP), "uniform"),
    "frequency-adaptive": Recipe(dict(method="frequency", adaptive=True, **BUDGET), "budget", native=False),
    "random": Recipe(dict(method="random", **KEEP), "uniform"),
    "reap": Recipe(dict(method="reap", **KEEP), "uniform"),
    "naee": Recipe(dict(method="naee", **KEEP), "uniform"),
    "uncurl": Recipe(dict(method="uncurl", **KEEP), "uniform"),
    "uncurl-adaptive": Recipe(dict(method="uncurl", adaptive=True, **BUDGET), "budget", native=False),
    "uncurl-tied": Recipe(dict(method="uncurl", method_options={"router": "tied"}, **KEEP), "uniform", native=False),
    "mc-smoe": Recipe(dict(method="mc-smoe", **KEEP), "uniform"),
    "hc-smoe": Recipe(dict(method="hc-smoe", **KEEP), "uniform"),
    "stun-uniform": Recipe(dict(method="stun", **KEEP), "uniform"),  # threshold inf, merge cap E - count
    # STUN: one global threshold gives per-layer counts, then OWL (plain mean of layer sparsities = target)
    # its phase 2 prunes every linear of each decoder layer (attention, router, experts), as the reference does
    "stun": Recipe(dict(method="stun", weight_sparsity=0.5, **BUDGET), "budget", native=False,
                   sparsity_rule="layer_mean", sparsity_scope="decoder_layers"),
    "wanda": Recipe(dict(method="wanda", weight_sparsity=0.5), "unchanged", sparsity_rule="per_layer"),
    "owl": Recipe(dict(method="owl", weight_sparsity=0.5), "unchanged", sparsity_rule="layer_mean"),
}

# model id -> (model type, config overrides); every built-in family, the generic fallback, grouped routing
GROUPED = dict(n_routed_experts=8, n_group=2, topk_group=1)  # 2 groups of 4 experts, each token picks 1 group
MODELS: dict[str, tuple[str, dict]] = {
    **{family: (family, {}) for family in FAMILIES},
    **{model_type: (model_type, {}) for model_type in GENERIC_CONFIGS},
    "deepseek_v3-grouped": ("deepseek_v3", GROUPED),
}

# Refused by design (README "Supported families"): non-uniform counts would move experts between the
# routing groups; Switch's experts get no top-k indices to map a tied
# router through.
REFUSED: dict[tuple[str, str], str] = {
    **{(recipe, "deepseek_v3-grouped"): "group-limited routing"
       for recipe in ("frequency-adaptive", "uncurl-adaptive")},
    ("uncurl-tied", "switch_transformers"): "tied router cannot be mapped",
}

def _case(recipe_id: str, model_id: str, *extra) -> pytest.param:
    return pytest.param(recipe_id, model_id, *extra, id=f"{recipe_id}-{model_id}")


RUNS = [_case(r, m) for r in RECIPES for m in MODELS if (r, m) not in REFUSED]
REFUSALS = [_case(r, m, pattern) for (r, m), pattern in REFUSED.items()]


def _wrap(model_id: str, tokenizer) -> MoEPruneModel:
    model_type, overrides = MODELS[model_id]
    model = build_tiny_model(model_type, **overrides)
    auto = AutoMoEPruneModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoMoEPruneModelForCausalLM
    wrapped = auto.from_model(model, tokenizer)
    wrapped.progress = False
    return wrapped


def _apply(wrapped: MoEPruneModel, config: MoEPruneConfig, texts: list[str]) -> None:
    reduce = wrapped.merge_experts if get_method(config.method).kind == "merge" else wrapped.prune_experts
    reduce(config, calibration=texts, **CALIBRATION_OPTIONS)


def _reload(folder, wrapped: MoEPruneModel, native: bool) -> torch.nn.Module:
    seq2seq = wrapped.model.config.is_encoder_decoder
    if native:
        return (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(folder).eval()
    auto = AutoMoEPruneModelForSeq2SeqLM if seq2seq else AutoMoEPruneModelForCausalLM
    return auto.from_pretrained(folder).model.eval()


def _check_counts(recipe: Recipe, config: MoEPruneConfig, before: dict[str, int], after: dict[str, int]) -> None:
    assert list(after) == list(before)
    if recipe.counts == "uniform":
        assert set(after.values()) == {config.experts_per_layer}, after
    elif recipe.counts == "unchanged":
        assert after == before
    else:
        total = sum(before.values())
        assert sum(after.values()) == total - round(total * config.expert_sparsity), after


def _weight_sparsity(layer) -> tuple[float, int]:
    """Share of zeros over the layer's expert weight matrices, and the smallest input width among them."""
    return _share_of_zeros(_expert_matrices(layer))


def _expert_matrices(layer) -> list[tuple[torch.Tensor, int]]:
    """The layer's expert weights with their input axis (biases are not pruned)."""
    tensors = layer.expert_tensors()
    return [(tensors[spec.name], spec.in_axis + 1) for spec in layer.expert_tensor_specs() if spec.in_axis is not None]


def _share_of_zeros(matrices: list[tuple[torch.Tensor, int]]) -> tuple[float, int]:
    zeros = sum(int((tensor == 0).sum()) for tensor, _ in matrices)
    size = sum(tensor.numel() for tensor, _ in matrices)
    return zeros / size, min(tensor.shape[axis] for tensor, axis in matrices)


def _unit_sparsity(model: torch.nn.Module) -> list[tuple[float, int]]:
    """Per decoder layer (or block), the share of zeros over every linear weight in it: attention and dense
    MLP `nn.Linear`s, routers and expert matrices."""
    layers = find_moe_layers(model, family_for_model(model))
    units = decoder_units(model, layers) if is_layerwise(model) else block_units(model, layers)
    shares = []
    for unit in units:
        matrices = {id(m.weight): (m.weight, 1) for m in unit.module.modules() if isinstance(m, torch.nn.Linear)}
        for layer in unit.moe_layers:
            router = layer.router_tensors()["weight"]
            matrices[id(router)] = (router, router.dim() - 1)
            matrices.update({id(tensor): (tensor, axis) for tensor, axis in _expert_matrices(layer)})
        shares.append(_share_of_zeros(list(matrices.values())))
    return shares


def _check_sparsity(recipe: Recipe, target: float, model: torch.nn.Module) -> None:
    """Each output row loses round(in_features * s_l) weights (wanda's per-row rule), so a layer's share is
    within 0.5 / in_features of its s_l; OWL's s_l vary by layer with their plain mean at the target."""
    if recipe.sparsity_scope == "decoder_layers":
        measured = _unit_sparsity(model)
    else:
        measured = [_weight_sparsity(layer) for layer in find_moe_layers(model, family_for_model(model))]
    rounding = max(0.5 / width for _, width in measured)
    shares = [share for share, _ in measured]
    if recipe.sparsity_rule == "per_layer":
        assert all(abs(share - target) <= rounding for share in shares), shares
    else:
        assert abs(sum(shares) / len(shares) - target) <= rounding, shares


def test_every_registered_method_has_a_recipe():
    assert {recipe.config["method"] for recipe in RECIPES.values()} == set(registered_methods())


@pytest.mark.parametrize("recipe_id, model_id", RUNS)
def test_method_runs_saves_and_reloads(recipe_id, model_id, tiny_tokenizer, sample_texts, tmp_path):
    recipe = RECIPES[recipe_id]
    wrapped = _wrap(model_id, tiny_tokenizer)
    before = {layer.path: layer.num_experts for layer in wrapped.moe_layers()}
    config = recipe.make_config()
    _apply(wrapped, config, sample_texts)

    counts = {layer.path: layer.num_experts for layer in wrapped.moe_layers()}
    _check_counts(recipe, config, before, counts)
    assert {path: entry["num_experts"] for path, entry in wrapped.record["layers"].items()} == counts
    assert wrapped.record["uniform"] == (recipe.counts != "budget" or len(set(counts.values())) == 1)
    logits = logits_of(wrapped.model, INPUT_IDS)
    assert torch.isfinite(logits).all()

    reloaded = _reload(wrapped.save_pretrained(tmp_path / "out"), wrapped, recipe.native)
    spec = family_for_model(reloaded)
    assert {layer.path: layer.num_experts for layer in find_moe_layers(reloaded, spec)} == counts
    declared = getattr(reloaded.config, spec.num_experts_key)  # Arctic may list per-layer counts
    assert declared in (max(counts.values()), list(counts.values())), declared
    # The same float32 weights, but loaded tensors can sit at other memory alignments, which picks other SIMD
    # kernel paths: granitemoe after wanda differed by 4.8e-7 (two ulps), and by 0 once the loaded tensors were
    # cloned. 1e-5 is far below what any changed weight moves (> 1e-3 on these models).
    torch.testing.assert_close(logits_of(reloaded, INPUT_IDS), logits, rtol=0, atol=1e-5)
    if recipe.sparsity_rule is not None:
        _check_sparsity(recipe, config.weight_sparsity, reloaded)


@pytest.mark.parametrize("recipe_id, model_id, pattern", REFUSALS)
def test_refused_before_any_calibration(recipe_id, model_id, pattern, tiny_tokenizer, sample_texts, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a refused request must not calibrate or run the model")

    monkeypatch.setattr(hf_moeprune.modeling, "prepare_calibration", never)
    monkeypatch.setattr(hf_moeprune.modeling, "run_step", never)
    wrapped = _wrap(model_id, tiny_tokenizer)
    weights = {name: tensor.clone() for name, tensor in wrapped.model.state_dict().items()}
    with pytest.raises(ValueError, match=pattern) as refused:
        _apply(wrapped, RECIPES[recipe_id].make_config(), sample_texts)
    assert "\n" not in str(refused.value)
    state = wrapped.model.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[n], weights[n]) for n in weights)
