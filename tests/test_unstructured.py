"""Wanda / OWL / N:M: exact per-row sparsity, OWL averages, N:M groups, dense models, sequential pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build_tiny_model
from transformers import AutoModelForCausalLM

from hf_moeprune import AutoMoEPruneModelForCausalLM, AutoMoEPruneModelForSeq2SeqLM
from hf_moeprune.calibration.sequential import capture_layer_inputs, run_layer
from hf_moeprune.config import MoEPruneConfig
from hf_moeprune.methods.unstructured import (
    UnstructuredOptions,
    nm_prune_mask,
    owl_layer_sparsities,
    owl_prune_,
    row_prune_mask,
    wanda_prune_,
    wanda_scores,
)
from hf_moeprune.methods.unstructured.masks import outlier_counts

CALIB = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def _wrap(family: str):
    model = build_tiny_model(family)
    auto = AutoMoEPruneModelForSeq2SeqLM if family == "switch_transformers" else AutoMoEPruneModelForCausalLM
    return auto.from_model(model)


def _expert_rows(layer, spec, e):
    """[rows, in_features] of one expert's weight, whatever the layout."""
    w = layer.expert_tensors()[spec.name][e]
    return w.movedim(spec.in_axis, -1).reshape(-1, w.shape[spec.in_axis])


def test_masks_on_synthetic_scores():
    score = torch.rand(6, 10)
    mask = row_prune_mask(score, 0.3, in_axis=1)
    assert (mask.sum(1) == 3).all()
    # the masked entries are the lowest of each row
    assert (score[mask].view(6, 3).max(1).values <= score[~mask].view(6, 7).min(1).values).all()
    transposed = row_prune_mask(score.T.contiguous(), 0.3, in_axis=0)
    assert torch.equal(transposed.T, mask)
    nm = nm_prune_mask(torch.rand(5, 16), 2, 4, in_axis=1)
    assert (nm.view(5, 4, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="divisible"):
        nm_prune_mask(torch.rand(2, 6), 2, 4, in_axis=1)
    # the N:M mask zeroes the m - n lowest of every group of m consecutive inputs, in either layout
    grouped = score[:, :8].reshape(6, 2, 4)
    nm = nm_prune_mask(score[:, :8], 2, 4, in_axis=1).reshape(6, 2, 4)
    assert (grouped[nm].view(6, 2, 2).max(-1).values <= grouped[~nm].view(6, 2, 2).min(-1).values).all()
    assert torch.equal(nm_prune_mask(score[:, :8].T.contiguous(), 2, 4, in_axis=0).T.reshape(6, 2, 4), nm)
    # an expert no token reached falls back to magnitude
    w = torch.randn(3, 4)
    assert torch.equal(wanda_scores(w, torch.zeros(4), 1), w.abs())


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "switch_transformers"])
def test_wanda_exact_sparsity_in_every_row(family):
    wrapped = _wrap(family)
    wrapped.prune_experts(
        MoEPruneConfig(method="wanda", weight_sparsity=0.5), calibration=CALIB, batch_size=2
    )
    for layer in wrapped.moe_layers():
        for spec in layer.expert_tensor_specs():
            if spec.in_axis is None:
                continue
            for e in range(layer.num_experts):
                rows = _expert_rows(layer, spec, e)
                zeros = (rows == 0).sum(1)
                assert (zeros == round(rows.shape[1] * 0.5)).all(), (layer.path, spec.name, e)
    record = wrapped.model.config.moeprune
    assert record["weight_sparsity"] and all(abs(v - 0.5) < 1e-6 for v in record["weight_sparsity"].values())
    assert record["steps"][-1]["forward_passes"] == 2
    # attention untouched by default
    assert all((p != 0).all() for n, p in wrapped.model.named_parameters() if "q_proj" in n or ".q." in n)


def test_wanda_nm_pattern_holds_in_every_group(tmp_path):
    wrapped = _wrap("mixtral")
    wrapped.prune_experts(
        MoEPruneConfig(method="wanda", nm_pattern=(2, 4), method_options={"targets": "experts,attention"}),
        calibration=CALIB,
    )
    for layer in wrapped.moe_layers():
        for spec in layer.expert_tensor_specs():
            for e in range(layer.num_experts):
                rows = _expert_rows(layer, spec, e)
                assert ((rows != 0).view(rows.shape[0], -1, 4).sum(-1) <= 2).all()
    q = wrapped.model.model.layers[0].self_attn.q_proj.weight
    assert ((q != 0).view(q.shape[0], -1, 4).sum(-1) <= 2).all()
    # zeros are stored in a normal checkpoint that plain transformers loads
    wrapped.save_pretrained(tmp_path / "nm")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nm")
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, q)
    assert reloaded.config.moeprune["weight_sparsity"]["model.layers.0.self_attn.q_proj"] == 0.5


def test_owl_layer_ratios_average_to_target():
    wrapped = _wrap("mixtral")
    wrapped.model.config.num_hidden_layers  # noqa: B018
    wrapped.prune_experts(
        MoEPruneConfig(method="owl", weight_sparsity=0.6, method_options={"owl_lambda": 0.1, "owl_m": 3}),
        calibration=CALIB,
    )
    details = wrapped.model.config.moeprune["steps"][-1]["details"]
    ratios = list(details["layer_sparsity"].values())
    assert len(ratios) == 2 and ratios[0] != ratios[1]
    assert abs(sum(ratios) / len(ratios) - 0.6) < 0.005
    assert max(ratios) - min(ratios) <= 0.2 + 1e-6
    assert wrapped.model.config.moeprune["steps"][-1]["forward_passes"] == 2 * len(CALIB.split(8))
    # more outliers -> lower sparsity
    outliers = details["outlier_ratios"]
    low, high = sorted(details["layer_sparsity"], key=details["layer_sparsity"].get)
    assert outliers[low] >= outliers[high]


def test_owl_ratios_size_weighted_and_clamped():
    s = owl_layer_sparsities([0.01, 0.02, 0.03, 0.05], 0.5, lam=0.1)
    assert abs(sum(s) / 4 - 0.5) < 1e-6 and s[0] > s[-1]
    sizes = [1, 1, 4, 10]
    s = owl_layer_sparsities([0.01, 0.02, 0.03, 0.05], 0.5, lam=0.1, sizes=sizes)
    assert abs(sum(a * b for a, b in zip(s, sizes, strict=True)) / sum(sizes) - 0.5) < 1e-6
    # size-weighted: clamping is re-solved so the average still holds
    s = owl_layer_sparsities([0.0, 1.0], 0.95, lam=0.2, sizes=[1, 1], max_sparsity=0.99)
    assert max(s) <= 0.99 and abs(sum(s) / 2 - 0.95) < 1e-6
    # the authors' plain rule only clamps, without moving the other layers
    assert owl_layer_sparsities([0.0, 1.0], 0.95, lam=0.2, max_sparsity=0.99) == pytest.approx([0.99, 0.75])


def test_unstructured_options_reject_bad_requests():
    with pytest.raises(ValueError, match="targets"):
        UnstructuredOptions(0.5, targets=("mlp",))
    with pytest.raises(ValueError, match="wanda"):
        UnstructuredOptions(0.5, "owl", nm=(2, 4))
    wrapped = _wrap("mixtral")
    with pytest.raises(ValueError, match="expert targets"):
        wrapped.prune_experts(
            MoEPruneConfig(method="wanda", weight_sparsity=0.5, experts_per_layer=4), calibration=CALIB
        )
    with pytest.raises(ValueError, match="weight_sparsity"):
        wrapped.prune_experts(MoEPruneConfig(method="owl"), calibration=CALIB)


def test_owl_outliers_are_scores_strictly_above_the_threshold():
    """The authors' `check_outlier_mean`: scores > M * mean, so a score equal to the threshold is no outlier."""
    assert outlier_counts(torch.tensor([1.0, 2.0, 2.0, 3.0]), 2.0) == 1


def test_moe_function_api_prunes_the_targets_it_is_given():
    """`wanda_prune_` / `owl_prune_` on an MoE model: the experts by default, the named targets otherwise, with
    the N:M pattern passed through."""
    def fresh():
        model = build_tiny_model("mixtral")
        return model, AutoMoEPruneModelForCausalLM.from_model(model).moe_layers()

    def expert_rows(layers):
        return [_expert_rows(layer, spec, e) for layer in layers for spec in layer.expert_tensor_specs()
                for e in range(layer.num_experts)]

    for prune in (wanda_prune_, owl_prune_):
        model, layers = fresh()
        prune(model, list(CALIB.split(2)), 0.5, moe_layers=layers)
        assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()
        shares = torch.cat([(rows == 0).float().mean(1) for rows in expert_rows(layers)])
        assert ((shares > 0.4) & (shares < 0.6)).all()  # OWL's layers within target +- lambda (0.08)

    for prune in (wanda_prune_, owl_prune_):
        model, layers = fresh()
        prune(model, list(CALIB.split(2)), 0.5, targets=["attention"], moe_layers=layers)
        assert all((rows != 0).all() for rows in expert_rows(layers))
        assert 0.4 < float((model.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) < 0.6

    model, layers = fresh()
    wanda_prune_(model, list(CALIB.split(2)), 0.0, nm=(2, 4), moe_layers=layers)
    assert all(((rows != 0).view(rows.shape[0], -1, 4).sum(-1) == 2).all() for rows in expert_rows(layers))


def test_function_api_passes_the_sequential_option_through():
    """Sequential Wanda sees the inputs of already pruned layers, so its second layer's mask differs from the
    one-pass (`sequential=False`) mask computed on the unpruned model."""
    masks = {}
    for sequential in (True, False):
        model = build_tiny_model("llama")
        wanda_prune_(model, list(CALIB.split(2)), 0.5, sequential=sequential)
        masks[sequential] = model.model.layers[1].mlp.down_proj.weight == 0
    assert not torch.equal(masks[True], masks[False])


def test_dense_model_function_api():
    model = build_tiny_model("llama")
    head = model.lm_head.weight.clone()
    report = wanda_prune_(model, list(CALIB.split(2)), 0.5)
    linears = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")
    ]
    assert sorted(report.weight_sparsity) == sorted(linears) and len(linears) == 14
    for name in linears:
        w = model.get_submodule(name).weight
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name
    assert torch.equal(model.lm_head.weight, head)
    assert report.forward_passes == 2
    model = build_tiny_model("llama")
    report = owl_prune_(model, list(CALIB.split(2)), 0.5, owl_lambda=0.2)
    assert sorted(report.weight_sparsity) == sorted(linears)
    # spread over 2 * lambda (0.16 at the default lambda); the reported shares round to whole weights per row
    shares = report.weight_sparsity.values()
    assert max(shares) - min(shares) == pytest.approx(0.4, abs=0.03)
    assert sum(shares) / len(linears) == pytest.approx(0.5, abs=0.02)


@torch.no_grad()
def test_sequential_pipeline_matches_full_forward():
    model = build_tiny_model("mixtral")
    batches = list(CALIB.split(2))
    inputs = capture_layer_inputs(model, batches)
    for layer in model.model.layers:
        inputs.hidden = run_layer(layer, inputs)
    for batch, hidden in zip(batches, inputs.hidden, strict=True):
        expected = model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states[-1]
        assert torch.equal(model.model.norm(hidden), expected)  # the same operations: bit-identical


def test_owl_outlier_ratio_is_the_share_of_scores_above_m_times_their_mean():
    from torch import nn

    from hf_moeprune.methods.unstructured.prune import _Observed, _outlier_ratio, _Targets

    generator = torch.Generator().manual_seed(0)
    first, second = nn.Linear(8, 4, bias=False), nn.Linear(6, 3, bias=False)
    squares = {"a": torch.rand(8, generator=generator) * 0.5, "b": torch.rand(6, generator=generator) * 0.5}
    targets = _Targets(moe=[], routers=[], linears={"a": first, "b": second})
    scores = torch.cat([(first.weight.abs() * squares["a"].sqrt()).flatten(),
                        (second.weight.abs() * squares["b"].sqrt()).flatten()])
    for m in (0.5, 1.0, 2.0):
        ratio, count = _outlier_ratio(targets, _Observed({}, squares), m)
        assert count == 50 and ratio == pytest.approx(float((scores > m * scores.mean()).double().mean()), abs=1e-12)
    assert _outlier_ratio(_Targets([], [], {}), _Observed({}, {}), 3.0) == (0.0, 0)


def test_owl_sparsities_stay_in_zero_to_the_default_cap():
    """The authors' rule clamps into [0, 0.99]; size-weighted re-solves the shift so the average still holds."""
    assert owl_layer_sparsities([0.0, 1.0], 0.95, lam=0.2) == pytest.approx([0.99, 0.75])
    assert owl_layer_sparsities([0.0, 1.0], 0.05, lam=0.08) == pytest.approx([0.13, 0.0])
    assert owl_layer_sparsities([0.0, 1.0], 0.05, lam=0.08, sizes=[1, 1]) == pytest.approx([0.10, 0.0])


def test_one_weight_per_row_is_pruned_when_the_share_rounds_to_one():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 2.0, 1.0, 3.0]])
    expected = torch.tensor([[False, True, False, False], [True, False, False, False]])
    assert torch.equal(row_prune_mask(score, 0.25, in_axis=1), expected)
    assert not row_prune_mask(score, 0.1, in_axis=1).any()


def test_method_options_reach_the_unstructured_options():
    from hf_moeprune.methods.stun import STUNOptions
    from hf_moeprune.methods.unstructured import options_from_config
    from hf_moeprune.methods.wanda import WandaOptions

    config = MoEPruneConfig(method="stun", experts_per_layer=4, weight_sparsity=0.4)
    options = STUNOptions(owl_m=5.0, owl_lambda=0.1, owl_balance="size_weighted", sequential=False)
    result = options_from_config(config, "owl", options)
    assert (result.sparsity, result.algorithm, result.targets) == (0.4, "owl", ("all_linear",))
    assert (result.owl_m, result.owl_lambda, result.owl_balance, result.sequential) == (5.0, 0.1, "size_weighted", False)
    plain = options_from_config(MoEPruneConfig(method="wanda", nm_pattern=(2, 4)), "wanda", WandaOptions())
    defaults = UnstructuredOptions(0.0)
    assert (plain.sparsity, plain.nm, plain.owl_m, plain.owl_lambda, plain.owl_balance) == (
        0.5, (2, 4), defaults.owl_m, defaults.owl_lambda, defaults.owl_balance)


def test_a_module_filter_chooses_the_linears_by_module_and_full_name():
    wrapped = _wrap("mixtral")
    seen = []

    def only_q_proj(module, fqn):
        seen.append((type(module).__name__, fqn))
        return fqn.endswith("self_attn.q_proj")

    before = {name: p.detach().clone() for name, p in wrapped.model.named_parameters()}
    wanda_prune_(wrapped.model, [CALIB], 0.5, targets=("attention",), moe_layers=wrapped.moe_layers(),
                 module_filter=only_q_proj)
    changed = {name for name, p in wrapped.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
    assert ("Linear", "model.layers.0.self_attn.k_proj") in seen and all(t == "Linear" for t, _ in seen)


@pytest.mark.parametrize("family", ["qwen2_moe", "switch_transformers", "gpt_oss", "deepseek_v3"])
def test_every_linear_outside_the_experts_and_routers_is_pruned_to_the_sparsity(family):
    """`attention` + `dense_mlp` reach every non-expert linear of each layer (a shared expert after the routed ones
    included), at exactly the asked share of every row, and leave the experts and routers dense."""
    from torch import nn

    wrapped = _wrap(family)
    layers = wrapped.moe_layers()
    skipped = tuple(p for layer in layers for p in (layer.experts_path, layer.router_path))
    before = {name: p.detach().clone() for name, p in wrapped.model.named_parameters()}
    wanda_prune_(wrapped.model, [CALIB], 0.5, targets=("attention", "dense_mlp"), moe_layers=layers)
    pruned = [name for name, module in wrapped.model.named_modules()
              if isinstance(module, nn.Linear) and name != "lm_head" and not name.startswith(skipped)]
    assert pruned
    for name in pruned:
        weight = wrapped.model.get_submodule(name).weight
        assert float((weight == 0).double().mean()) == 0.5, name
    for name, p in wrapped.model.named_parameters():
        if name.startswith(skipped):
            assert torch.equal(p, before[name]), name


def _expert_zero_share(layer) -> tuple[int, int]:
    tensors = [t for spec in layer.expert_tensor_specs() if spec.in_axis is not None
               for t in [layer.expert_tensors()[spec.name]]]
    return sum(int((t == 0).sum()) for t in tensors), sum(t.numel() for t in tensors)


@pytest.mark.parametrize("sequential", [True, False])
def test_owl_size_weighted_holds_the_share_of_zeros_over_layers_of_different_sizes(sequential):
    """After a non-uniform reduction (6 and 3 experts) `size_weighted` zeroes the target share of all expert
    weights, where the authors' plain mean would not; one-shot (`sequential=False`) reads one sweep."""
    from hf_moeprune import LayerPlan, ReductionPlan

    wrapped = _wrap("mixtral")
    layers = wrapped.moe_layers()
    wrapped.apply_plan(ReductionPlan({layers[1].path: LayerPlan.keep([0, 2, 4])}))
    report = owl_prune_(wrapped.model, [CALIB], 0.5, moe_layers=layers, owl_balance="size_weighted",
                        owl_lambda=0.2, sequential=sequential)
    sizes = {layer.path.rsplit(".", 1)[0]: _expert_zero_share(layer)[1] for layer in layers}
    requested = report.layer_sparsity
    assert set(requested) == set(sizes) and len(set(requested.values())) == 2
    weighted = sum(requested[p] * sizes[p] for p in sizes) / sum(sizes.values())
    assert weighted == pytest.approx(0.5, abs=1e-9)
    zeros, total = map(sum, zip(*(_expert_zero_share(layer) for layer in layers), strict=True))
    assert zeros / total == pytest.approx(0.5, abs=0.01)
    assert report.details() == {
        "layer_sparsity": {p: round(v, 5) for p, v in requested.items()},
        "outlier_ratios": {p: round(v, 6) for p, v in report.outlier_ratios.items()},
        "mean_weight_sparsity": round(sum(report.weight_sparsity.values()) / len(report.weight_sparsity), 5),
    }


def test_owl_leaves_layers_without_targets_out_of_the_balance():
    """DeepSeek-V3's first layer is dense: with `experts` targets it has nothing to prune and no outlier share."""
    wrapped = _wrap("deepseek_v3")
    layers = wrapped.moe_layers()
    report = owl_prune_(wrapped.model, [CALIB], 0.5, moe_layers=layers)
    assert set(report.outlier_ratios) == set(report.layer_sparsity) == {layer.path.rsplit(".", 1)[0] for layer in layers}
    assert sum(report.layer_sparsity.values()) / len(layers) == pytest.approx(0.5)


def test_wanda_report_details_and_option_refusals():
    wrapped = _wrap("mixtral")
    report = wanda_prune_(wrapped.model, [CALIB], 0.5, moe_layers=wrapped.moe_layers())
    assert report.details() == {"layer_sparsity": {"model.layers.0": 0.5, "model.layers.1": 0.5},
                                "mean_weight_sparsity": 0.5}
    assert UnstructuredOptions(0.0).sparsity == 0.0
    for kwargs, message in [
        ({"sparsity": 1.0}, "sparsity must be in [0, 1), got 1.0."),
        ({"sparsity": -0.1}, "sparsity must be in [0, 1), got -0.1."),
        ({"sparsity": 0.5, "algorithm": "sparsegpt"}, "Unknown unstructured algorithm 'sparsegpt': use 'wanda' or 'owl'."),
        ({"sparsity": 0.5, "algorithm": "owl", "nm": (2, 4)},
         "N:M patterns fix the sparsity of every group; use algorithm='wanda' with nm."),
    ]:
        with pytest.raises(ValueError) as raised:
            UnstructuredOptions(**kwargs)
        assert str(raised.value) == message


def test_dense_mlp_targets_the_shared_expert_and_not_the_attention():
    from torch import nn

    wrapped = _wrap("qwen2_moe")
    before = {name: p.detach().clone() for name, p in wrapped.model.named_parameters()}
    wanda_prune_(wrapped.model, [CALIB], 0.5, targets=("dense_mlp",), moe_layers=wrapped.moe_layers())
    changed = {name.rsplit(".", 1)[0] for name, p in wrapped.model.named_parameters() if not torch.equal(p, before[name])}
    linears = {name for name, m in wrapped.model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"}
    assert changed == {name for name in linears if ".mlp.shared_expert" in name} and changed
