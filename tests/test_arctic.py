"""Arctic (`model_type: "arctic"`): loading original checkpoints, the forward formula, save/reload.

The checkpoints here are written by hand with Arctic's original key names and config fields (as the
released `config.json` has them: `rope_theta`, `auto_map`, `torch_dtype`, DeepSpeed options), and the
reference forward below is written from `research/arctic.md` using those raw tensors only, so it is
independent of the fused layout of the implementation.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig, registered_methods
from hf_moeprune.families import family_for_model_type
from hf_moeprune.models.arctic import ArcticConfig, ArcticForCausalLM, register_arctic

VOCAB, HIDDEN, INTER, HEADS, KV_HEADS = 48, 32, 40, 4, 2
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA = 10000.0
EPS = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register_arctic()


def original_config(
    num_layers=4, num_experts=6, top_k=2, moe_layer_frequency=1, parallel_attn_mlp_res=True
) -> dict:
    """A config.json as the Arctic checkpoints ship it (remote-code era field names)."""
    return {
        "architectures": ["ArcticForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_arctic.ArcticConfig",
            "AutoModelForCausalLM": "modeling_arctic.ArcticForCausalLM",
        },
        "model_type": "arctic",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "initializer_range": 0.02,
        "rms_norm_eps": EPS,
        "rope_theta": ROPE_THETA,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_experts_per_tok": top_k,
        "num_local_experts": num_experts,
        "router_aux_loss_coef": 0.001,
        "moe_layer_frequency": moe_layer_frequency,
        "parallel_attn_mlp_res": parallel_attn_mlp_res,
        "moe_train_capacity_factor": 1,
        "moe_eval_capacity_factor": 1,
        "enable_expert_tensor_parallelism": False,
        "moe_min_capacity": 0,
        "moe_token_dropping": True,
        "quantization": None,
        "use_residual": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
    }


def _experts_of(cfg: dict, layer: int) -> int:
    n = cfg["num_local_experts"]
    return n[layer] if isinstance(n, list) else n


def _is_moe(cfg: dict, layer: int) -> bool:
    return (layer + 1) % cfg["moe_layer_frequency"] == 0


def original_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Arctic's original (per-expert) key names."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "model.embed_tokens.weight": w(VOCAB, HIDDEN, std=1.0),
        "model.norm.weight": 1 + w(HIDDEN, std=0.1),
        "lm_head.weight": w(VOCAB, HIDDEN),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = w(HEADS * HEAD_DIM, HIDDEN)
        sd[p + "self_attn.k_proj.weight"] = w(KV_HEADS * HEAD_DIM, HIDDEN)
        sd[p + "self_attn.v_proj.weight"] = w(KV_HEADS * HEAD_DIM, HIDDEN)
        sd[p + "self_attn.o_proj.weight"] = w(HIDDEN, HEADS * HEAD_DIM)
        sd[p + "input_layernorm.weight"] = 1 + w(HIDDEN, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + w(HIDDEN, std=0.1)
        if _is_moe(cfg, i):
            sd[p + "block_sparse_moe.gate.weight"] = w(_experts_of(cfg, i), HIDDEN, std=1.0)
            for j in range(_experts_of(cfg, i)):
                q = f"{p}block_sparse_moe.experts.{j}."
                sd[q + "w1.weight"] = w(INTER, HIDDEN)
                sd[q + "w3.weight"] = w(INTER, HIDDEN)
                sd[q + "w2.weight"] = w(HIDDEN, INTER)
            if cfg["parallel_attn_mlp_res"]:
                sd[p + "residual_layernorm.weight"] = 1 + w(HIDDEN, std=0.1)
                sd[p + "residual_mlp.w1.weight"] = w(HIDDEN, HIDDEN)
                sd[p + "residual_mlp.w3.weight"] = w(HIDDEN, HIDDEN)
                sd[p + "residual_mlp.w2.weight"] = w(HIDDEN, HIDDEN)
        else:
            sd[p + "block_sparse_moe.mlp.w1.weight"] = w(INTER, HIDDEN)
            sd[p + "block_sparse_moe.mlp.w3.weight"] = w(INTER, HIDDEN)
            sd[p + "block_sparse_moe.mlp.w2.weight"] = w(HIDDEN, INTER)
    return sd


def write_checkpoint(path, cfg: dict, sd: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"), metadata={"format": "pt"}
    )


# ---------------------------------------------------------------- reference forward (arctic.md)


def ref_rms(x, weight):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def ref_swiglu(x, sd, prefix):
    return F.linear(
        F.silu(F.linear(x, sd[prefix + "w1.weight"])) * F.linear(x, sd[prefix + "w3.weight"]),
        sd[prefix + "w2.weight"],
    )


def ref_rotate(x, positions):
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float) / HEAD_DIM))
    freqs = positions[:, None].float() * inv_freq[None, :]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    x1, x2 = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def ref_attention(x, sd, prefix):
    """Causal grouped-query attention with rotary embeddings, one sequence at a time: x [B, T, H]."""
    b, t, _ = x.shape
    q = F.linear(x, sd[prefix + "q_proj.weight"]).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
    k = F.linear(x, sd[prefix + "k_proj.weight"]).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = F.linear(x, sd[prefix + "v_proj.weight"]).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
    pos = torch.arange(t)
    q, k = ref_rotate(q, pos), ref_rotate(k, pos)
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM)
    return F.linear(out, sd[prefix + "o_proj.weight"])


def ref_moe(x, sd, prefix, num_experts, top_k):
    """Softmax (fp32) over router logits, top-k, renormalised when k > 1; each expert token by token."""
    flat = x.reshape(-1, x.shape[-1])
    probs = F.linear(flat, sd[prefix + "gate.weight"]).float().softmax(-1)
    weights, index = probs.topk(top_k, dim=-1)
    if top_k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    for tok in range(flat.shape[0]):
        for slot in range(top_k):
            e = int(index[tok, slot])
            out[tok] += weights[tok, slot] * ref_swiglu(flat[tok], sd, f"{prefix}experts.{e}.")
    assert index.max() < num_experts
    return out.view_as(x)


def ref_layer(x, sd, cfg, i):
    p = f"model.layers.{i}."
    h = x + ref_attention(ref_rms(x, sd[p + "input_layernorm.weight"]), sd, p + "self_attn.")
    if _is_moe(cfg, i):

        def ffn(y):
            return ref_moe(y, sd, p + "block_sparse_moe.", _experts_of(cfg, i), cfg["num_experts_per_tok"])
    else:

        def ffn(y):
            return ref_swiglu(y, sd, p + "block_sparse_moe.mlp.")

    if cfg["parallel_attn_mlp_res"] and _is_moe(cfg, i):
        r = h + ref_swiglu(ref_rms(h, sd[p + "residual_layernorm.weight"]), sd, p + "residual_mlp.")
        return r + ffn(ref_rms(x, sd[p + "post_attention_layernorm.weight"]))  # MoE reads pre-attention x
    return h + ffn(ref_rms(h, sd[p + "post_attention_layernorm.weight"]))


def ref_logits(input_ids, sd, cfg):
    x = sd["model.embed_tokens.weight"][input_ids]
    for i in range(cfg["num_hidden_layers"]):
        x = ref_layer(x, sd, cfg, i)
    return F.linear(ref_rms(x, sd["model.norm.weight"]), sd["lm_head.weight"])


# ---------------------------------------------------------------- tests

LAYOUTS = {
    # every layer MoE + residual MLP (the released Arctic)
    "moe_parallel": dict(moe_layer_frequency=1, parallel_attn_mlp_res=True),
    # every layer MoE, plain pre-norm path
    "moe_plain": dict(moe_layer_frequency=1, parallel_attn_mlp_res=False),
    # layers 0, 2 dense; 1, 3 MoE with the residual MLP
    "mixed_parallel": dict(moe_layer_frequency=2, parallel_attn_mlp_res=True),
    # layers 0, 2 dense; 1, 3 plain MoE
    "mixed_plain": dict(moe_layer_frequency=2, parallel_attn_mlp_res=False),
    # top-1 routing: no renormalisation
    "top1": dict(moe_layer_frequency=1, parallel_attn_mlp_res=True, top_k=1),
    # per-layer expert counts, as STUN's pruned checkpoints store them
    "per_layer_list": dict(moe_layer_frequency=1, parallel_attn_mlp_res=True, num_experts=[6, 3, 5, 4]),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def checkpoint(request, tmp_path_factory):
    cfg = original_config(**LAYOUTS[request.param])
    sd = original_state_dict(cfg)
    path = tmp_path_factory.mktemp(f"arctic_{request.param}")
    write_checkpoint(path, cfg, sd)
    return path, cfg, sd


def test_original_checkpoint_loads_into_fused_layout(checkpoint):
    path, cfg, sd = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, ArcticForCausalLM)
    assert model.config.num_local_experts == cfg["num_local_experts"]
    assert model.config.rope_parameters["rope_theta"] == ROPE_THETA
    for i, layer in enumerate(model.model.layers):
        block = layer.block_sparse_moe
        p = f"model.layers.{i}.block_sparse_moe."
        assert layer.is_moe_layer == _is_moe(cfg, i)
        assert hasattr(layer, "residual_mlp") == (cfg["parallel_attn_mlp_res"] and _is_moe(cfg, i))
        if not _is_moe(cfg, i):
            torch.testing.assert_close(block.mlp.w1.weight, sd[p + "mlp.w1.weight"], rtol=0, atol=0)
            continue
        n = _experts_of(cfg, i)
        assert block.experts.num_experts == block.gate.num_experts == n
        assert block.experts.gate_up_proj.shape == (n, 2 * INTER, HIDDEN)
        assert block.experts.down_proj.shape == (n, HIDDEN, INTER)
        torch.testing.assert_close(block.gate.weight, sd[p + "gate.weight"], rtol=0, atol=0)
        for j in range(n):
            gate, up = block.experts.gate_up_proj[j].chunk(2, dim=0)  # gate half first
            torch.testing.assert_close(gate, sd[f"{p}experts.{j}.w1.weight"], rtol=0, atol=0)
            torch.testing.assert_close(up, sd[f"{p}experts.{j}.w3.weight"], rtol=0, atol=0)
            torch.testing.assert_close(
                block.experts.down_proj[j], sd[f"{p}experts.{j}.w2.weight"], rtol=0, atol=0
            )


@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm"])
def test_forward_matches_reference(checkpoint, experts_implementation):
    path, cfg, sd = checkpoint
    model = AutoModelForCausalLM.from_pretrained(
        path, experts_implementation=experts_implementation, attn_implementation="eager"
    ).eval()
    input_ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))

    layer_io = []
    hooks = [
        layer.register_forward_hook(lambda m, args, out: layer_io.append((args[0], out)))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        logits = model(input_ids).logits
    for h in hooks:
        h.remove()

    # every decoder layer against the formula, on the same input
    assert len(layer_io) == cfg["num_hidden_layers"]
    for i, (x, out) in enumerate(layer_io):
        torch.testing.assert_close(out, ref_layer(x, sd, cfg, i), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits(input_ids, sd, cfg), rtol=1e-4, atol=1e-4)


def test_parallel_moe_reads_pre_attention_input(tmp_path):
    """Guard against the formula collapsing to the plain path: the two layouts must differ."""
    outs = []
    for parallel in (True, False):
        cfg = original_config(num_layers=1, parallel_attn_mlp_res=parallel)
        sd = original_state_dict(cfg)
        if parallel:  # a zero residual MLP leaves only the difference in what the MoE reads
            for k in ("w1", "w2", "w3"):
                sd[f"model.layers.0.residual_mlp.{k}.weight"].zero_()
        write_checkpoint(tmp_path / str(parallel), cfg, sd)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / str(parallel)).eval()
        with torch.no_grad():
            outs.append(model(torch.arange(6)[None]).logits)
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_save_writes_original_keys_and_reloads_identically(checkpoint, tmp_path):
    path, cfg, sd = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    model.save_pretrained(tmp_path)

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert set(saved) == set(sd)
    for k, v in sd.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0, msg=k)

    saved_cfg = json.loads((tmp_path / "config.json").read_text())
    assert saved_cfg["model_type"] == "arctic"
    assert saved_cfg["num_local_experts"] == cfg["num_local_experts"]

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_greedy_generation_with_and_without_cache_agree(checkpoint):
    path, _, _ = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, uncached)


def test_experts_hooks_and_router_outputs(checkpoint):
    path, cfg, _ = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    seen = {}

    def pre_hook(module, args):
        hidden, top_k_index, top_k_weights = args
        seen[module] = (hidden.shape, top_k_index.shape, top_k_weights.shape, int(top_k_index.max()))

    moe_layers = [layer for layer in model.model.layers if layer.is_moe_layer]
    for layer in moe_layers:
        layer.block_sparse_moe.experts.register_forward_pre_hook(pre_hook)
    input_ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(input_ids, output_router_logits=True)
    k = cfg["num_experts_per_tok"]
    assert len(seen) == len(moe_layers)
    for layer in moe_layers:
        hidden_shape, idx_shape, w_shape, max_idx = seen[layer.block_sparse_moe.experts]
        assert hidden_shape == (10, HIDDEN) and idx_shape == w_shape == (10, k)
        assert max_idx < layer.block_sparse_moe.experts.num_experts
    assert [r.shape for r in out.router_logits] == [
        (10, _experts_of(cfg, i)) for i in range(cfg["num_hidden_layers"]) if _is_moe(cfg, i)
    ]
    assert torch.isfinite(out.aux_loss)


def test_router_weights():
    """Softmax in fp32, top-k, renormalised over the k only when k > 1 (arctic.md)."""
    for top_k in (1, 2):
        config = ArcticConfig(
            hidden_size=8,
            num_attention_heads=2,
            num_hidden_layers=1,
            moe_layer_frequency=1,
            num_local_experts=4,
            num_experts_per_tok=top_k,
        )
        router = ArcticForCausalLM._from_config(config).model.layers[0].block_sparse_moe.gate
        logits, weights, index = router(torch.randn(5, 8))
        probs = torch.softmax(logits.float(), -1)
        expected = probs.gather(-1, index)
        if top_k > 1:
            expected = expected / expected.sum(-1, keepdim=True)
        else:
            assert (weights < 1).all()
        torch.testing.assert_close(weights, expected)
        assert torch.equal(index, probs.topk(top_k, -1).indices)


def test_config_per_layer_counts():
    config = ArcticConfig(
        num_hidden_layers=4, moe_layer_frequency=2, num_local_experts=8, num_experts_per_tok=2
    )
    assert config.moe_layer_indices() == [1, 3]
    assert [config.num_experts_for_layer(i) for i in range(4)] == [0, 8, 0, 8]
    config.set_num_experts_for_layer(1, 5)
    assert config.num_local_experts == [0, 5, 0, 8]
    config.set_num_experts_for_layer(3, 5)
    assert config.num_local_experts == 5  # uniform again: back to the int form
    with pytest.raises(ValueError, match="dense layer"):
        config.set_num_experts_for_layer(0, 4)
    with pytest.raises(ValueError, match="one entry per decoder layer"):
        ArcticConfig(num_hidden_layers=4, num_local_experts=[4, 4])
    with pytest.raises(ValueError, match="fewer than"):
        ArcticConfig(
            num_hidden_layers=2, moe_layer_frequency=1, num_local_experts=[4, 1], num_experts_per_tok=2
        )
    # per-layer lists survive to_dict/from_dict and AutoConfig
    listed = ArcticConfig(num_hidden_layers=2, moe_layer_frequency=1, num_local_experts=[3, 7])
    again = AutoConfig.for_model(**listed.to_dict())
    assert isinstance(again, ArcticConfig) and again.num_local_experts == [3, 7]


def test_register_is_idempotent():
    register_arctic()
    register_arctic()
    assert AutoConfig.for_model("arctic").__class__ is ArcticConfig


# ---------------------------------------------------------------- pruning and merging through the wrappers

METHODS = sorted(registered_methods())
SCENARIOS = {
    # every layer MoE, one expert count, the same target in every layer
    "uniform": dict(
        config=dict(num_layers=2, num_experts=6, moe_layer_frequency=1), target=dict(experts_per_layer=3)
    ),
    # dense and MoE layers, per-layer counts (STUN form), half of all experts removed
    "per_layer": dict(
        config=dict(num_layers=4, num_experts=[0, 8, 0, 4], moe_layer_frequency=2),
        target=dict(expert_sparsity=0.5),
    ),
    # below top-2: the router drops to top-1 (no renormalisation) and the config follows
    "top1": dict(
        config=dict(num_layers=2, num_experts=4, moe_layer_frequency=1),
        target=dict(experts_per_layer=1, top_k=1),
    ),
}


def _recipe(name: str, target: dict) -> MoEPruneConfig:
    kind = registered_methods()[name].kind
    if kind == "unstructured":
        return MoEPruneConfig(
            method=name, weight_sparsity=0.5, method_options={"targets": ["experts", "dense_mlp"]}
        )
    return MoEPruneConfig(method=name, **target)


def _dense_weights(model) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if ".residual_mlp." in name or ".block_sparse_moe.mlp." in name
    }


def test_family_spec_finds_moe_blocks_only():
    """Dense layers (no router) are skipped; the residual MLP lies outside the MoE block."""
    cfg = original_config(num_layers=4, moe_layer_frequency=2, parallel_attn_mlp_res=True)
    model = ArcticForCausalLM._from_config(AutoConfig.for_model(**cfg))
    wrapped = AutoMoEPruneModelForCausalLM.from_model(model)
    assert wrapped.spec is family_for_model_type("arctic")
    layers = wrapped.moe_layers()
    assert [layer.path for layer in layers] == [
        "model.layers.1.block_sparse_moe",
        "model.layers.3.block_sparse_moe",
    ]
    for layer in layers:
        assert layer.num_experts == 6 and layer.top_k == 2
        assert layer.router is model.get_submodule(layer.path).gate
        assert not any("residual" in name for name, _ in layer.block.named_modules())


@pytest.mark.parametrize("targets", [("dense_mlp",), ("experts",)])
def test_unstructured_phase_reaches_the_residual_mlp(targets, tmp_path):
    unstructured = pytest.importorskip("hf_moeprune.methods.unstructured")
    cfg = original_config(num_layers=4, moe_layer_frequency=2, parallel_attn_mlp_res=True)
    write_checkpoint(tmp_path / "base", cfg, original_state_dict(cfg))
    model = AutoMoEPruneModelForCausalLM.from_pretrained(tmp_path / "base")
    batches = [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))]
    unstructured.unstructured_prune_(
        model.model,
        batches,
        unstructured.UnstructuredOptions(0.5, targets=targets),
        moe_layers=model.moe_layers(),
    )
    zeros = {name: float((p == 0).float().mean()) for name, p in model.model.named_parameters()}
    dense = [n for n in zeros if ".residual_mlp." in n or ".block_sparse_moe.mlp." in n]
    experts = [n for n in zeros if ".experts." in n]
    assert len(dense) == 12 and len(experts) == 4
    for name in dense:
        assert zeros[name] == (0.5 if targets == ("dense_mlp",) else 0.0), name
    for name in experts:  # Wanda removes round(N / 2) of every row's N inputs, N even here
        assert zeros[name] == (0.5 if targets == ("experts",) else 0.0), name
    assert all(zeros[n] == 0.0 for n in zeros if "self_attn" in n or ".gate." in n)

    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        logits = model(input_ids).logits
    model.save_pretrained(tmp_path / "sparse")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("method", METHODS)
def test_prune_or_merge_save_reload(method, scenario, tmp_path):
    setup = SCENARIOS[scenario]
    cfg = original_config(parallel_attn_mlp_res=True, **setup["config"])
    write_checkpoint(tmp_path / "base", cfg, original_state_dict(cfg))
    model = AutoMoEPruneModelForCausalLM.from_pretrained(tmp_path / "base")
    before = {layer.path: layer.num_experts for layer in model.moe_layers()}
    dense_before = _dense_weights(model.model)

    recipe = _recipe(method, setup["target"])
    calibration = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))
    kind = registered_methods()[method].kind
    if kind == "merge":
        model.merge_experts(recipe, calibration=calibration)
    else:
        model.prune_experts(recipe, calibration=calibration)

    after = {layer.path: layer.num_experts for layer in model.moe_layers()}
    dense_after = _dense_weights(model.model)
    if kind == "unstructured":
        assert after == before
        # the residual MLP is pruned like the experts: every row of its [out, in] weights loses round(in * s) of
        # its inputs, s = the layer's recorded sparsity (0.5 for Wanda, OWL's per-layer ratio)
        ratios = model.record["steps"][-1]["details"]["layer_sparsity"]
        if method == "wanda":
            assert set(ratios.values()) == {0.5}
        residual = [n for n in dense_after if ".residual_mlp." in n]
        assert residual
        for name in residual:
            n_inputs = dense_after[name].shape[1]
            expected = round(n_inputs * ratios[name.split(".residual_mlp.")[0]]) / n_inputs
            assert float((dense_after[name] == 0).double().mean()) == expected, name
    else:
        if "experts_per_layer" in setup["target"]:
            assert after == {p: setup["target"]["experts_per_layer"] for p in before}
        else:  # a share of all experts: methods may spread it unevenly over the layers
            assert sum(after.values()) == sum(before.values()) // 2
            assert all(cfg["num_experts_per_tok"] <= after[p] <= before[p] for p in before)  # a global threshold may spare a layer
        top_k = setup["target"].get("top_k", cfg["num_experts_per_tok"])
        assert all(layer.top_k == layer.block.gate.top_k == top_k for layer in model.moe_layers())
        # expert methods never touch the residual or dense-layer MLPs
        assert dense_after.keys() == dense_before.keys()
        for name, value in dense_before.items():
            assert torch.equal(dense_after[name], value), name

    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = model(input_ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path / "pruned")

    # config.json describes the weights: per-layer list while counts differ, original key names
    saved_cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    counts = [after.get(f"model.layers.{i}.block_sparse_moe", 0) for i in range(cfg["num_hidden_layers"])]
    moe_counts = {c for i, c in enumerate(counts) if _is_moe(cfg, i)}
    assert saved_cfg["num_local_experts"] == (moe_counts.pop() if len(moe_counts) == 1 else counts)
    if kind != "unstructured":
        assert saved_cfg["num_experts_per_tok"] == top_k
    with safe_open(str(tmp_path / "pruned" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("gate_up_proj" in k or "down_proj" in k for k in keys)
    for path, n in after.items():
        assert {k for k in keys if k.startswith(f"{path}.experts.") and k.endswith(".w1.weight")} == {
            f"{path}.experts.{j}.w1.weight" for j in range(n)
        }

    for loader in (AutoMoEPruneModelForCausalLM, AutoModelForCausalLM):
        reloaded = loader.from_pretrained(tmp_path / "pruned")
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids).logits, logits, rtol=0, atol=0)
