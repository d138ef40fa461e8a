"""UNCURL: task-aware expert clustering, permutation alignment and weighted merging.

Sarkar et al., "Revisiting SMoE Language Models by Evaluating Inefficiencies with Task Specific Expert
Pruning" (2024), https://arxiv.org/abs/2409.01483. No public code; implemented from the paper (section 5.1),
so there is no authors' code to compare against: `docs/methods.md` says where the defaults come from.
"""

from __future__ import annotations

from ..merging import ClusterMergeMethod
from ..registry import register_method


@register_method
class Uncurl(ClusterMergeMethod):
    """Per MoE layer: cluster experts by their router logits on task data, align each cluster's members to its
    most-used expert by a hidden-unit permutation, and merge each cluster into one expert by routed-token
    weighted averaging.

    With `S_ij` the cosine between experts i and j's router-logit columns over the calibration tokens
    (accumulated as an `E x E` Gram matrix while streaming), k-means on the experts' router-logit profiles over
    the sampled calibration tokens splits the layer's E experts into the target count (spectral clustering on
    the affinity `(S + 1) / 2` is the `clustering="spectral"` option). In each cluster C with anchor a (most
    routed tokens), every other member m is permuted by `P_m = argmax_P <F_a, P F_m>` where F stacks each hidden
    unit's gate row, up row and down column, solved as a linear assignment. The merged expert is
    `W = sum_{m in C} f_m P_m W_m / sum_{m in C} f_m`, f_m = tokens routed to m.

    Options (`MoEPruneConfig.method_options`):
        similarity (`str`, default `"router-logits"`): `"router-logits"` (cosine), `"router-correlation"`
            or `"expert-output"` (mean expert outputs).
        expert_output_tokens (`str`, default `"all"`): for `"expert-output"`, average each expert's output over
            all calibration tokens (HC-SMoE's code; one more pass of every expert over the stored layer inputs)
            or over the tokens routed to it (`"routed"`, from the statistics).
        clustering (`str`, default `"kmeans"`): `"kmeans"` (on router-logit profiles of the sampled
            calibration tokens), `"spectral"`, `"agglomerative"` or `"dominant"`. k-means is the default because
            on the trained 32-expert testbed spectral clustering of the cosine similarity lumped up to 11 experts
            carrying 45% of a layer's tokens into one cluster, and merging them cost far more perplexity than
            k-means, whose large clusters gather rarely routed experts (`benchmarks/results/testbed_v1/merging.md`).
        linkage / cluster_on: for agglomerative clustering, the linkage and whether it runs on
            `"similarity"` (1 - S) or `"features"` (Euclidean).
        alignment (`str`, default `"weights"`): `"weights"`, `"activations"` (correlation of the units'
            gate/up pre-activations on `alignment_tokens` sampled layer inputs, one extra forward pass) or `"none"`.
        alignment_solver (`"auto"`): `"lapjv"` (the optional `lap` package) or `"scipy"`.
        alignment_sketch (`"auto"`): CountSketch width for the unit features of large experts (None: exact).
        merge_weights (`str`, default `"frequency"`): `"frequency"` (routed tokens), `"prob-mass"` (summed
            router probabilities) or `"uniform"`.
        router_rows (`str`, default `"weighted"`): the merged expert's router row, `"weighted"` (merge-weighted
            average of the members' rows) or `"anchor"` (the anchor's row). The default was chosen on the
            trained Mixtral testbed (`benchmarks/results/testbed_v1/merging.md`): see the router-row ablation there.
        router (`str`, default `"folded"`): `"folded"` (one router row per merged expert, formed as
            `router_rows` says: the family's native architecture) or `"tied"` (all E router rows kept, each
            mapped to its merged expert, so routing is unchanged; loads through the record's expert map).
            Folded is the default: on the 32-expert testbed held-out perplexity did not favour the tied router
            (`benchmarks/results/testbed_v1/merging.md`, "Tied vs folded router").
        adaptive_by (`"redundancy"`): with `MoEPruneConfig(adaptive=True)`, per-layer counts follow how
            redundant each layer's experts are (merge heights of average-linkage clustering on 1 - S), or
            `"frequency"` (MC-SMoE's global dominant-expert threshold, `merging.adaptive.frequency_counts`).
        exact_budget (`bool`, default False): with `adaptive_by="frequency"`, fill the budget exactly when
            shares tie at the threshold (the reference leaves them all out).
        uniform (`bool`, default False): one count per layer; refused together with `adaptive=True`.

    Example:
        >>> model = AutoMoEPruneModelForCausalLM.from_pretrained("mixtral-32e")
        >>> model.merge_experts(MoEPruneConfig(method="uncurl", experts_per_layer=8), calibration=task_texts)
        >>> model.save_pretrained("out/")
    """

    name = "uncurl"
    pretty_name = "UNCURL (cluster, align and merge experts)"
    paper = "https://arxiv.org/abs/2409.01483"
    defaults = {**ClusterMergeMethod.defaults, "clustering": "kmeans"}
