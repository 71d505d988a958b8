"""mtrain's GLM4-MoE and Qwen3-MoE against the transformers implementations (the oracle), and checkpoint I/O."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtrain.models import PrecisionPolicy, RoutingTrace, save_pretrained
from mtrain.models import CheckpointError, build_model, from_pretrained
from mtrain.models import Glm4MoeConfig, Qwen3MoeConfig

try:  # the oracle: a dev dependency; the tests that do not compare with it run without it
    import transformers
except ImportError:  # pragma: no cover
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="needs transformers (the reference implementation)")
BACKENDS = ["loop", "grouped_mm"]  # every expert path, on CPU too (torch's grouped GEMM runs there)

TINY = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=32,
    num_experts_per_tok=2,
)

# (family, HF config overrides, save options) -- at least 8 variants between the two models
VARIANTS = {
    "glm_groups_scaling_qknorm_bias_2dense_2shared": (
        "glm4_moe",
        dict(n_routed_experts=16, n_group=4, topk_group=2, routed_scaling_factor=2.5, use_qk_norm=True,
             attention_bias=True, first_k_dense_replace=2, n_shared_experts=2, num_experts_per_tok=3,
             num_hidden_layers=4),
        dict(),
    ),
    "glm_plain_no_norm_topk_mtp_sharded": (
        "glm4_moe",
        dict(n_routed_experts=8, norm_topk_prob=False, num_nextn_predict_layers=1),
        dict(max_shard_size="40KB", mtp=True),
    ),
    "glm_full_rotary_tied_bf16_saved": (
        "glm4_moe",
        dict(n_routed_experts=8, partial_rotary_factor=1.0, tie_word_embeddings=True, first_k_dense_replace=0),
        dict(dtype=torch.bfloat16),
    ),
    "glm_air_like_rope_params": (
        "glm4_moe",
        dict(n_routed_experts=8, n_group=2, topk_group=1, attention_bias=True, rope_parameters={
            "rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}),
        dict(),
    ),
    "qwen_no_norm_topk_sparse_step2": (
        "qwen3_moe",
        dict(num_experts=8, norm_topk_prob=False, decoder_sparse_step=2, num_hidden_layers=4),
        dict(),
    ),
    "qwen_mlp_only_tied_sharded": (
        "qwen3_moe",
        dict(num_experts=8, mlp_only_layers=[0, 2], tie_word_embeddings=True, norm_topk_prob=True),
        dict(max_shard_size="30KB"),
    ),
    "qwen_attention_bias": (
        "qwen3_moe",
        dict(num_experts=8, attention_bias=True),  # q/k/v and o_proj biases in transformers' Qwen3-MoE
        dict(),
    ),
    "qwen_top4_of_16_bf16_saved": (
        "qwen3_moe",
        dict(num_experts=16, num_experts_per_tok=4, norm_topk_prob=True),
        dict(dtype=torch.bfloat16),
    ),
    "qwen_num_experts_spelling": (
        "qwen3_moe",
        dict(num_experts=8, norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
        dict(rename={"num_local_experts": "num_experts"}),
    ),
}


def hf_model(family: str, overrides: dict, seed: int = 0):
    torch.manual_seed(seed)
    kw = TINY | overrides
    if family == "glm4_moe":
        model = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**kw))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**kw))
    with torch.no_grad():  # HF inits the router to zeros and expert weights tiny: make routing decisions real
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.08)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.05)
    return model.eval()


def save_hf(model, path, *, dtype=None, max_shard_size="5GB", mtp=False, rename=None):
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if mtp:  # GLM checkpoints carry next-token-prediction layers after the decoder layers: must be skipped
        n = model.config.num_hidden_layers
        extra = {f"model.layers.{n}.eh_proj.weight": torch.randn(8, 8), f"model.layers.{n}.enorm.weight": torch.ones(8)}
        save_file(extra, os.path.join(path, "mtp.safetensors"), metadata={"format": "pt"})
        index_path = os.path.join(path, "model.safetensors.index.json")
        index = json.load(open(index_path))
        index["weight_map"] |= {k: "mtp.safetensors" for k in extra}
        json.dump(index, open(index_path, "w"))
    if rename:
        cfg = json.load(open(os.path.join(path, "config.json")))
        for old, new in rename.items():
            cfg[new] = cfg.pop(old)
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return model


def gate_hooks(model):
    """Collect the HF routers' top-k indices per MoE layer."""
    picks = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: picks.append(out[2]))
        for name, m in model.named_modules()
        if name.endswith("mlp.gate")
    ]
    return picks, hooks


def compare(hf, ours, ids):
    picks, hooks = gate_hooks(hf)
    with torch.no_grad():
        ref = hf(ids).logits.float()
        trace = RoutingTrace()
        out = ours(ids, trace=trace).float()
        routing = [trace.ids[i] for i in trace.layers]
    for h in hooks:
        h.remove()
    assert len(picks) == len(routing) == len(ours.moe_layers) > 0
    for layer, (a, b) in enumerate(zip(picks, routing)):
        a = a.view(-1, a.shape[-1]).sort(-1).values
        b = b.reshape(-1, b.shape[-1]).sort(-1).values
        assert torch.equal(a, b), f"MoE layer {layer}: top-k experts differ for {(a != b).any(-1).sum()} tokens"
    return (ref - out).abs().max().item()


def use_backend(model, backend: str):
    from mtrain.models.moe import Experts

    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts
    for m in experts:
        m.backend = backend
    return model


@needs_hf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_logit_and_routing_parity_fp32(name, backend, tmp_path):
    family, overrides, save = VARIANTS[name]
    hf = hf_model(family, overrides)
    save_hf(hf, tmp_path, **save)
    if save.get("max_shard_size"):
        assert (tmp_path / "model.safetensors.index.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = use_backend(from_pretrained(tmp_path, dtype=torch.float32, expected_model_type=family).eval(), backend)
    ids = torch.randint(0, TINY["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(1))
    diff = compare(hf, ours, ids)
    print(f"{name} ({backend}): max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


# bf16: both sides round differently inside (op order, fused kernels), so parity is a tolerance, stated here
BF16_LOGIT_ATOL = 0.05  # max |logit difference| (measured 0.016); logits are O(1..5) at these weights
BF16_LOGIT_MEAN_ATOL = 0.006  # mean |logit difference| (measured 0.0025)
BF16_ROUTING_DISAGREEMENT = 0.02  # (measured 0) fraction of (token, MoE layer) top-k sets that may differ


@needs_hf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["glm4_moe", "qwen3_moe"])
def test_logit_and_routing_parity_bf16(family, backend, tmp_path):
    overrides = dict(n_routed_experts=8) if family == "glm4_moe" else dict(num_experts=8)
    save_hf(hf_model(family, overrides), tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    # the reference's precision: gate in bf16 as transformers runs it (rl=off)
    ours = use_backend(from_pretrained(tmp_path, dtype=torch.bfloat16, policy=PrecisionPolicy(False)).eval(), backend)
    ids = torch.randint(0, TINY["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(1))
    picks, hooks = gate_hooks(hf)
    with torch.no_grad():
        ref = hf(ids).logits.float()
        trace = RoutingTrace()
        out = ours(ids, trace=trace).float()
    for h in hooks:
        h.remove()
    diff = (ref - out).abs()
    differ = [(a.reshape(-1, a.shape[-1]).sort(-1).values != trace.ids[i].reshape(-1, a.shape[-1]).sort(-1).values)
              .any(-1).float().mean().item() for a, i in zip(picks, trace.layers)]
    print(f"{family} bf16 ({backend}): max {diff.max():.3g}, mean {diff.mean():.3g}, routing {max(differ):.3f}")
    assert diff.max() <= BF16_LOGIT_ATOL and diff.mean() <= BF16_LOGIT_MEAN_ATOL
    assert max(differ) <= BF16_ROUTING_DISAGREEMENT


@needs_hf
@pytest.mark.parametrize("family", ["glm4_moe", "qwen3_moe"])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_round_trip_mtrain_save_transformers_load(family, shard, tmp_path):
    cfg = (Glm4MoeConfig if family == "glm4_moe" else Qwen3MoeConfig)(
        vocab_size=80, num_hidden_layers=3, **({"n_group": 2, "topk_group": 1} if family == "glm4_moe" else {})
    )
    ours = build_model(cfg, seed=3).eval()
    with torch.no_grad():
        for name, b in ours.named_buffers():
            b.normal_(0, 0.05)
    save_pretrained(ours, tmp_path / "ckpt", **({"max_shard_size": shard} if shard else {}))
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert ("model.safetensors.index.json" in files) == bool(shard), files
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Glm4MoeForCausalLM" if family == "glm4_moe" else "Qwen3MoeForCausalLM")
    ids = torch.randint(0, 80, (2, 9), generator=torch.Generator().manual_seed(0))
    assert compare(hf, ours, ids) <= 1e-5
    again = from_pretrained(tmp_path / "ckpt")
    for (n1, a), (n2, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1


@pytest.mark.parametrize("family", ["glm4_moe", "qwen3_moe"])
@pytest.mark.parametrize("moe_gate_fp32", [True, False])
def test_gate_dtype_follows_policy_and_is_recorded(family, moe_gate_fp32, tmp_path, caplog):
    cfg = (Glm4MoeConfig if family == "glm4_moe" else Qwen3MoeConfig)()
    model = build_model(cfg, dtype="bfloat16", policy=PrecisionPolicy(moe_gate_fp32))
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == (torch.float32 if moe_gate_fp32 else torch.bfloat16)
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    if family == "glm4_moe":
        assert gate.e_score_correction_bias.dtype == torch.float32
    model.half().to(torch.bfloat16)  # a precision plugin's blanket cast must not touch the fp32 gate
    assert gate.weight.dtype == (torch.float32 if moe_gate_fp32 else torch.bfloat16)
    # the router's logits really are computed in fp32 under the policy, also inside autocast
    x = torch.randn(5, cfg.hidden_size, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gate.logits(x).dtype == (torch.float32 if moe_gate_fp32 else torch.bfloat16)

    save_pretrained(model, tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        stored = f.get_slice("model.layers.1.mlp.gate.weight").get_dtype()
    assert stored == ("F32" if moe_gate_fp32 else "BF16")
    record = json.load(open(tmp_path / "ckpt" / "mtrain_precision.json"))
    assert record["moe_gate_fp32"] is moe_gate_fp32
    assert record["gate_dtype"] == ("float32" if moe_gate_fp32 else "bfloat16")

    # same policy: silent; other policy: one warning, or a refusal when asked
    with caplog.at_level(logging.WARNING):
        from_pretrained(tmp_path / "ckpt", policy=PrecisionPolicy(moe_gate_fp32))
    assert "gate precision mismatch" not in caplog.text
    with caplog.at_level(logging.WARNING):
        loaded = from_pretrained(tmp_path / "ckpt", policy=PrecisionPolicy(not moe_gate_fp32))
    assert "gate precision mismatch" in caplog.text and "moe_gate_fp32" in caplog.text
    assert loaded.gate_dtype() == (torch.float32 if not moe_gate_fp32 else torch.bfloat16)
    with pytest.raises(CheckpointError, match="gate precision mismatch"):
        from_pretrained(tmp_path / "ckpt", policy=PrecisionPolicy(not moe_gate_fp32), gate_mismatch="error")


def test_published_bf16_gate_is_upcast_quietly_and_a_downcast_export_is_flagged(tmp_path, caplog):
    """A published checkpoint (no mtrain record, gate stored bf16) loaded with rl=on: the upcast is what the engine
    does under FD_ENABLE_RL=1, so an info line and no warning, even with gate_mismatch="error". A checkpoint whose
    record says fp32 gate but stores it in bf16 (a downcast on export) is flagged."""
    model = build_model(Qwen3MoeConfig(), dtype="bfloat16", policy=PrecisionPolicy(False))
    save_pretrained(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "mtrain_precision.json").unlink()  # as published
    with caplog.at_level(logging.INFO, logger="mtrain"):
        loaded = from_pretrained(tmp_path / "ckpt", policy=PrecisionPolicy(True), gate_mismatch="error")
    assert loaded.gate_dtype() == torch.float32
    assert "upcast to float32" in caplog.text and "gate precision mismatch" not in caplog.text
    (tmp_path / "ckpt" / "mtrain_precision.json").write_text(json.dumps({"moe_gate_fp32": True}))
    with pytest.raises(CheckpointError, match="the export downcast the gate"):
        from_pretrained(tmp_path / "ckpt", policy=PrecisionPolicy(True), gate_mismatch="error")


@pytest.fixture
def good_ckpt(tmp_path):
    model = build_model(Qwen3MoeConfig(), seed=0)
    save_pretrained(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _listing(folder):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())


def _corrupt(folder, how):
    st = folder / "model.safetensors"
    if how == "missing_folder":
        return folder.parent / "nope", "does not exist"
    if how == "missing_config":
        (folder / "config.json").unlink()
        return folder, "config.json is missing"
    if how == "missing_safetensors":
        st.unlink()
        return folder, "no model.safetensors"
    if how == "corrupt":
        st.write_bytes(b"\x00garbage" * 100)
        return folder, "corrupt or truncated"
    if how == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
        return folder, "corrupt or truncated"
    tensors = load_file(st)
    if how == "missing_key":
        del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
        save_file(tensors, st)
        return folder, r"missing keys \['model.layers.1.mlp.experts.3.up_proj.weight'\]"
    if how == "unexpected_key":
        tensors["model.layers.0.self_attn.rotary.weird"] = torch.zeros(2)
        save_file(tensors, st)
        return folder, "unexpected key 'model.layers.0.self_attn.rotary.weird'"
    if how == "shape":
        cfg = json.load(open(folder / "config.json"))
        cfg["moe_intermediate_size"] = 48
        json.dump(cfg, open(folder / "config.json", "w"))
        return folder, "has shape .* but config.json implies"
    if how == "model_type":
        return folder, "does not match the chosen model=glm4_moe"
    if how == "quantized":
        cfg = json.load(open(folder / "config.json"))
        json.dump(cfg | {"quantization_config": {"quant_method": "fp8"}}, open(folder / "config.json", "w"))
        return folder, r"a quantized checkpoint \(quant_method=fp8\)"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["missing_folder", "missing_config", "missing_safetensors", "corrupt", "truncated", "missing_key",
     "unexpected_key", "shape", "model_type", "quantized"],
)
def test_bad_checkpoint_is_refused_clearly(good_ckpt, how):
    folder, message = _corrupt(good_ckpt, how)
    before = _listing(good_ckpt) if good_ckpt.exists() else None
    with pytest.raises(CheckpointError, match=message) as err:
        from_pretrained(folder, expected_model_type="glm4_moe" if how == "model_type" else "qwen3_moe")
    assert "\n" not in str(err.value)
    assert before is None or _listing(good_ckpt) == before  # nothing written


def test_save_refuses_to_overwrite(good_ckpt):
    before = _listing(good_ckpt)
    with pytest.raises(CheckpointError, match="already exists"):
        save_pretrained(build_model(Qwen3MoeConfig()), good_ckpt)
    assert _listing(good_ckpt) == before


def test_tokenizer_from_checkpoint_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel

    tok = tokenizers.Tokenizer(WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    save_pretrained(build_model(Qwen3MoeConfig()), tmp_path / "ckpt", tokenizer_file=tmp_path / "tokenizer.json")
    loaded = tokenizers.Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    assert loaded.encode("a b a").ids == [0, 1, 0]


@needs_hf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_loss_and_gradients_match_transformers_fp32(name, backend, tmp_path):
    """The chunked linear+cross-entropy and every parameter's gradient agree with transformers' loss.backward(), on
    every configuration variant and expert backend."""
    family, overrides, save = VARIANTS[name]
    hf = hf_model(family, overrides)
    save_hf(hf, tmp_path, **{k: v for k, v in save.items() if k != "dtype"})  # fp32 weights: gradients comparable
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ours = use_backend(from_pretrained(tmp_path, dtype=torch.float32), backend)
    ids = torch.randint(0, TINY["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(2))
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    ref = hf(input_ids=ids, labels=ids).loss
    ref.backward()
    loss = ours.loss(ids, targets, chunk_size=16)  # several chunks, the last one partial
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = hf_params[name].grad
        err = ((p.grad - g_ref).norm() / g_ref.norm().clamp(min=1e-12)).item()
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_routed_experts_keep_only_the_gate_up_output_for_the_backward(backend):
    """What the experts keep for the backward is the input (which the router keeps anyway), the [S, 2I] gate/up
    output and index vectors: not the gathered input, the activation or the expert outputs (each [S, H] or [S, I],
    ~0.7 GiB a layer at the Qwen3-30B-A3B shape and 8k tokens)."""
    from mtrain.models.grouped import routed_experts

    T, H, I, E, k = 64, 32, 16, 8, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    weights = torch.rand(T, k, generator=g).requires_grad_()
    idx = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    gate_up = torch.randn(E, 2 * I, H, generator=g, requires_grad=True)
    down = torch.randn(E, H, I, generator=g, requires_grad=True)
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in {p.untyped_storage().data_ptr() for p in (x, gate_up, down, weights)}:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = routed_experts(x, weights, idx, gate_up, down, backend)
    S = T * k
    assert sum(kept.values()) <= S * 2 * I * 4 + 2 * S * 8 + E * 8  # h (fp32 here), the order, its inverse, counts
    y.square().sum().backward()  # and the backward runs from what it kept (gradients: the parity tests)
    assert all(t.grad is not None for t in (x, weights, gate_up, down))


def test_fp32_gate_forward_is_the_fp32_gemm_and_its_backward_keeps_the_weight_gradient_fp32():
    """rl=on's gate on a bf16 model: logits bit-equal to the fp32 GEMM (what the engine computes), the fp32 weight's
    gradient bit-equal to the fp32 GEMM's, the input's gradient (bf16 out) within bf16 rounding of it, and the
    backward keeps the bf16 input, not an fp32 copy of it."""
    from mtrain.models.moe import SoftmaxTopKRouter

    T, H, E = 64, 32, 8
    g = torch.Generator().manual_seed(0)
    router = SoftmaxTopKRouter(H, E, 2, moe_gate_fp32=True, norm_topk_prob=True)
    torch.nn.init.normal_(router.weight, generator=g)
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.float32
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).requires_grad_()
    dlogits = torch.randn(T, E, generator=g)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        logits = router.logits(x)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, x.float() @ router.weight.t())
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in kept)  # no fp32 copy of x kept
    logits.backward(dlogits)
    assert router.weight.grad.dtype == torch.float32
    assert torch.equal(router.weight.grad, dlogits.t() @ x.float())
    ref = dlogits @ router.weight.detach()
    assert x.grad.dtype == torch.bfloat16
    assert torch.allclose(x.grad.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_compiled_experts_sum_the_k_slots_like_eager():
    """Compiled, the routed experts weight and sum each token's k expert outputs in one fused pass (eager: a
    batched GEMM): the same output and gradients, to fp32 rounding."""
    from mtrain.models.grouped import routed_experts

    T, H, I, E, k = 48, 16, 8, 6, 3
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(T, H, generator=g), torch.rand(T, k, generator=g),
            torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)]
    idx = torch.rand(T, E, generator=g).topk(k, dim=-1).indices

    def run(fn):
        leaves = [a.clone().requires_grad_() for a in args]
        x, w, gate_up, down = leaves
        y = fn(x, w, idx, gate_up, down, "loop")
        y.square().sum().backward()
        return [y.detach()] + [t.grad for t in leaves]

    torch._dynamo.reset()
    for eager, compiled in zip(run(routed_experts), run(torch.compile(routed_experts, backend="aot_eager"))):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_rope_fp32_rotates_in_fp32_and_changes_the_bf16_model():
    """rope_fp32: the rotation runs in fp32 and is rounded to bf16 once (the engines' RL mode); off, it runs in bf16
    as transformers does. Both the layer and the policy's wiring into the model are checked."""
    from mtrain.models.layers import RotaryEmbedding

    x = torch.randn(2, 7, 4, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    pos = torch.arange(7).expand(2, 7) * 997  # large positions: bf16 cos/sin lose digits
    on, off = RotaryEmbedding(16, 1e6, rope_fp32=True), RotaryEmbedding(16, 1e6, rope_fp32=False)
    cos, sin = on(pos)
    rotated = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
    by_hand = (x.float() * cos[:, :, None] + rotated.float() * sin[:, :, None]).to(torch.bfloat16)
    assert torch.equal(on.apply(x, cos, sin), by_hand)
    assert not torch.equal(off.apply(x, cos, sin), by_hand)  # bf16 arithmetic rounds differently

    cfg = Qwen3MoeConfig()
    state = build_model(cfg, seed=0).state_dict()
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    logits = {}
    for rope in (True, False):
        model = build_model(cfg, dtype="bfloat16", policy=PrecisionPolicy(True, rope_fp32=rope), init=False)
        model.load_state_dict(state)
        assert model.rope_fp32 is rope and all(layer.self_attn.rope.rope_fp32 is rope for layer in model.model.layers)
        with torch.no_grad():
            logits[rope] = model(ids)
    assert not torch.equal(logits[True], logits[False])


@pytest.mark.parametrize("family", ["glm4_moe", "qwen3_moe"])
def test_every_weight_hand_over_keeps_the_fp32_gate(family, tmp_path):
    """Under rl=on the gate stays fp32 through the bf16 export of fp32 master weights (what trainer=fsdp and
    bf16-mixed do), a bf16 model's export, and the rollout engine's weight sync (FastDeploy #7393's bug class)."""
    from mtrain.rl.engines import FastEngine

    cfg = (Glm4MoeConfig if family == "glm4_moe" else Qwen3MoeConfig)()
    policy = PrecisionPolicy(True)
    gate_key = "model.layers.1.mlp.gate.weight"
    for name, model, kw in (("fp32_master_to_bf16", build_model(cfg, seed=0, policy=policy), {"dtype": torch.bfloat16}),
                            ("bf16", build_model(cfg, dtype="bfloat16", seed=0, policy=policy), {})):
        save_pretrained(model, tmp_path / name, **kw)
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            assert f.get_slice(gate_key).get_dtype() == "F32", name
            assert f.get_slice("model.layers.1.mlp.experts.0.up_proj.weight").get_dtype() == "BF16", name
            if family == "glm4_moe":
                assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
        assert json.load(open(tmp_path / name / "mtrain_precision.json"))["gate_dtype"] == "float32"
        assert from_pretrained(tmp_path / name, policy=policy, gate_mismatch="error").gate_dtype() == torch.float32

    trainer = build_model(cfg, seed=0, policy=policy)
    engine = FastEngine(copy_of=trainer, policy=policy, dtype=torch.bfloat16)
    with torch.no_grad():
        trainer.model.layers[1].mlp.gate.weight.add_(1e-3)  # an update, then the hand-over
    engine.sync(trainer)
    gate = engine.model.model.layers[1].mlp.gate.weight
    assert gate.dtype == torch.float32 and torch.equal(gate, trainer.model.layers[1].mlp.gate.weight)
    assert engine.model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


@needs_hf
def test_layers_past_the_config_are_refused_mtp_layers_skipped_and_not_advertised_on_export(tmp_path):
    """GLM's MTP layers (``num_nextn_predict_layers``) after the decoder layers are skipped on load; any other layer
    the config does not count is refused (it was silently dropped). The export holds no MTP layer and says so in its
    config.json, with both dtype keys."""
    mtp = tmp_path / "mtp"
    save_hf(hf_model("glm4_moe", dict(n_routed_experts=8, num_nextn_predict_layers=1)), mtp, mtp=True,
            max_shard_size="40KB")
    model = from_pretrained(mtp)
    out = save_pretrained(model, tmp_path / "export")
    cfg = json.load(open(out / "config.json"))
    assert cfg["num_nextn_predict_layers"] == 0 and cfg["torch_dtype"] == cfg["dtype"] == "float32"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.startswith(f"model.layers.{model.config.num_hidden_layers}.")]
    hf_cfg = json.load(open(mtp / "config.json"))
    json.dump(hf_cfg | {"num_nextn_predict_layers": 0}, open(mtp / "config.json", "w"))  # an extra layer, undeclared
    with pytest.raises(CheckpointError, match=r"unexpected key 'model\.layers\.3\.eh_proj\.weight'.*does not match"):
        from_pretrained(mtp)


@needs_hf
def test_config_json_fields_left_out_take_transformers_defaults(tmp_path):
    """A Qwen3-MoE config.json without ``norm_topk_prob`` routes as transformers does (its default: False), and one
    without ``head_dim`` has hidden_size / num_attention_heads: the same logits as transformers."""
    path = tmp_path / "qwen"
    hf = save_hf(hf_model("qwen3_moe", dict(num_experts=8, norm_topk_prob=False, hidden_size=128, head_dim=32)),
                 path)
    cfg = json.load(open(path / "config.json"))
    del cfg["norm_topk_prob"], cfg["head_dim"]
    json.dump(cfg, open(path / "config.json", "w"))
    ours = from_pretrained(path).eval()
    assert ours.config.norm_topk_prob is False and ours.config.head_dim_ == 32
    assert compare(hf.eval(), ours, torch.randint(0, 64, (2, 9))) < 1e-4
