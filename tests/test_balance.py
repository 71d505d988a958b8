"""MoE load balancing, pure torch (mtrain.models.balance, mtrain.models.router_stats): the load-balancing loss equals
transformers' ``load_balancing_loss_func`` (value and gradient, on logits and through a real Qwen3-MoE forward), its
per-sequence and global variants, the router z-loss, the aux-loss-free bias update, what the routing tap counts, and
the load metrics."""

from __future__ import annotations

import pytest
import torch

import test_models as tm
from mtrain.models import PrecisionPolicy, RoutingTrace, build_model, from_pretrained
from mtrain.models import Glm4MoeConfig, Qwen3MoeConfig
from mtrain.models.balance import (
    BalanceSettings, load_balancing_loss, load_metrics, router_z_loss, seq_load_balancing_loss, update_expert_bias,
)
from mtrain.models.router_stats import RouterStats

hf_lb = None
if tm.transformers is not None:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func as hf_lb

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts_per_tok=2)


def _logits(B=3, S=5, E=8, L=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B * S, E, generator=g).requires_grad_() for _ in range(L)]


def _mask(B=3, S=5):
    m = torch.ones(B, S)
    m[0, 3:] = 0
    m[2, 1:] = 0
    return m


def _ours(logits, k, mask=None, reduce=None):
    probs = [x.softmax(-1) for x in logits]
    experts = [p.topk(k, -1).indices for p in probs]
    return load_balancing_loss(probs, experts, logits[0].shape[-1], mask, reduce)


@tm.needs_hf
@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_value_and_gradient_equal_transformers(masked):
    logits, mask = _logits(), _mask() if masked else None
    ref = hf_lb(tuple(logits), 8, 2, mask)
    ours = _ours(logits, 2, mask.reshape(-1) if masked else None)
    g_ref, g = torch.autograd.grad(ref, logits), torch.autograd.grad(ours, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert all(x.abs().sum() > 0 for x in g)  # the loss reaches every layer's logits


@tm.needs_hf
def test_qwen3_forward_aux_loss_and_gate_gradient_equal_transformers(tmp_path):
    """transformers' own ``aux_loss`` (``output_router_logits=True``, right-padded batch with its attention mask) vs
    the loss mtrain adds from the routing its forward produced: value, and the gradient on every gate weight."""
    hf = tm.hf_model("qwen3_moe", dict(num_experts=8, num_hidden_layers=3, decoder_sparse_step=1, norm_topk_prob=True))
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, policy=PrecisionPolicy(moe_gate_fp32=True))
    ids = torch.randint(0, 101, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    out = hf(input_ids=ids, attention_mask=mask, output_router_logits=True)
    stats = RouterStats(BalanceSettings(load_balancing="aux", aux_loss_coef=1.0)).attach(ours)
    stats.expect(mask.bool())
    ours.hidden_states(ids)
    aux = stats.loss()
    torch.testing.assert_close(aux, out.aux_loss, rtol=1e-5, atol=0)
    out.aux_loss.backward()
    aux.backward()
    for i in ours.moe_layers:
        g_hf = hf.model.layers[i].mlp.gate.weight.grad
        g = ours.model.layers[i].mlp.gate.weight.grad
        assert g_hf.abs().sum() > 0
        torch.testing.assert_close(g, g_hf, rtol=1e-4, atol=1e-7)


def test_glm_aux_loss_counts_the_experts_its_bias_chose_and_weighs_normalised_sigmoid_scores():
    torch.manual_seed(0)
    model = build_model(Glm4MoeConfig(**SMALL, n_routed_experts=8, first_k_dense_replace=1), seed=0)
    for _, r in model.routers():
        r.expert_bias[3] = 5.0  # every token picks expert 3: what the bias chose is what counts
    ids = torch.randint(0, 61, (2, 6))
    stats = RouterStats(BalanceSettings(load_balancing="aux", aux_loss_coef=1.0)).attach(model)
    trace = RoutingTrace(logits=True)
    model.hidden_states(ids, trace=trace)
    aux = stats.loss()
    E, f, P = 8, torch.zeros(8), torch.zeros(8)
    for layer in model.moe_layers:
        s = trace.logits[layer].reshape(-1, E).sigmoid()
        P += (s / s.sum(-1, keepdim=True)).sum(0)
        f += torch.bincount(trace.ids[layer].reshape(-1), minlength=E).float()
        assert (trace.ids[layer] == 3).any(-1).all()
    n = ids.numel() * len(model.moe_layers)
    torch.testing.assert_close(aux, E * (f / n * (P / n)).sum(), rtol=1e-6, atol=0)


def test_seq_aux_is_the_mean_of_each_sequences_loss():
    logits, mask = _logits(), _mask()
    probs = [x.softmax(-1).view(3, 5, 8) for x in logits]
    experts = [p.topk(2, -1).indices for p in probs]
    got = seq_load_balancing_loss(probs, experts, 8, mask)
    each = [load_balancing_loss([p[b] for p in probs], [e[b] for e in experts], 8, mask[b]) for b in range(3)]
    torch.testing.assert_close(got, torch.stack(each).mean(), rtol=1e-6, atol=0)
    whole = load_balancing_loss([p.reshape(15, 8) for p in probs], [e.reshape(15, 2) for e in experts], 8,
                                mask.reshape(-1))
    assert not torch.allclose(got, whole)  # per sequence is another loss than over the batch


def test_global_aux_mean_over_ranks_is_the_loss_of_the_whole_batch():
    """Two ranks each hold half the batch, with different numbers of real tokens; ``reduce`` sums over them: the
    mean of their losses (what data parallelism averages) equals the one-process loss of the whole batch, in value
    and gradient."""
    logits = _logits(B=4, S=5)
    mask = torch.ones(20)
    mask[3:10] = 0  # rank 0: 3 real tokens of 10, rank 1: 10 of 10
    whole = _ours(logits, 2, mask)
    g_whole = torch.autograd.grad(whole, logits)
    halves = [([x[:10] for x in logits], mask[:10]), ([x[10:] for x in logits], mask[10:])]
    with torch.no_grad():
        sent = []
        for h, m in halves:
            c = sum(torch.zeros(8).scatter_add_(0, x.softmax(-1).topk(2, -1).indices.reshape(-1),
                                                m.repeat_interleave(2)) for x in h)
            sent.append(torch.cat([c, (m.sum() * len(h)).reshape(1), torch.ones(1)]))
        summed = sent[0] + sent[1]
    mean = sum(_ours(h, 2, m, reduce=lambda t: summed) for h, m in halves) / 2
    torch.testing.assert_close(mean, whole, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(mean, logits), g_whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    local = sum(_ours(h, 2, m) for h, m in halves) / 2
    assert not torch.allclose(local, whole)  # without the sum over ranks it is another loss
    assert _ours(logits, 2, mask, reduce=lambda t: t) == whole  # one process: aux


def test_z_loss_is_the_mean_squared_logsumexp_over_real_tokens():
    logits, mask = _logits(), _mask()
    m = mask.reshape(-1).bool()
    expected = torch.cat([torch.logsumexp(x[m], -1) ** 2 for x in logits]).mean()
    torch.testing.assert_close(router_z_loss(logits, mask.reshape(-1)), expected, rtol=1e-6, atol=0)


def test_bias_update_follows_the_sign_of_each_layers_load_in_fp32():
    """A bf16 GLM model: each layer's bias moves by rate toward its under-loaded experts, from that layer's counts
    of the step (summed over the ranks by ``reduce``), and stays fp32."""
    cfg = Glm4MoeConfig(**SMALL, n_routed_experts=8, first_k_dense_replace=1)
    model = build_model(cfg, dtype=torch.bfloat16, seed=0)
    stats = RouterStats(BalanceSettings(bias_update=True)).attach(model)
    trace = RoutingTrace()
    ids = torch.randint(0, 61, (4, 6), generator=torch.Generator().manual_seed(0))
    model.hidden_states(ids, trace=trace)
    other_rank = torch.zeros(len(model.moe_layers), 8, dtype=torch.int64)
    other_rank[:, 0] = 1000  # another rank sent everything to expert 0
    stats.update_bias(1e-3, reduce=lambda t: t + other_rank)
    for row, layer in enumerate(model.moe_layers):
        bias = model.model.layers[layer].mlp.gate.expert_bias
        counts = torch.bincount(trace.ids[layer].reshape(-1), minlength=8).float() + other_rank[row]
        assert bias.dtype == torch.float32
        torch.testing.assert_close(bias, 1e-3 * torch.sign(counts.mean() - counts), rtol=0, atol=0)
        assert bias[0] == -1e-3
    before = [model.model.layers[i].mlp.gate.expert_bias.clone() for i in model.moe_layers]
    stats.update_bias(1e-3)  # no forward since: nothing changes
    assert all(torch.equal(b, model.model.layers[i].mlp.gate.expert_bias) for b, i in zip(before, model.moe_layers))
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([1, 1, 1, 1]), 0.1)
    assert torch.equal(bias, torch.zeros(4))  # balanced: sign(0) = 0


def test_the_tap_counts_real_tokens_of_training_forwards_once():
    cfg = Qwen3MoeConfig(**SMALL, num_experts=8)
    model = build_model(cfg, seed=0).train()
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(0))
    stats = RouterStats().attach(model)
    with torch.no_grad():
        model.hidden_states(ids)
    assert stats.packed() is None  # a forward without gradient (validation, recompute) is not counted
    model.activation_checkpointing = True
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2:] = False
    stats.expect(mask)
    model.hidden_states(ids).sum().backward()  # the layers run again in the backward: not counted twice
    m = stats.window_metrics(stats.packed())
    L = len(model.moe_layers)
    assert m["tokens"] == 8 * L  # 6 + 2 real tokens per layer
    assert [sum(row) for row in m["tokens_per_expert"]] == [8 * 2] * L  # top-2 slots of the real tokens
    stats.detach()
    model.hidden_states(ids).sum().backward()
    assert stats.packed().abs().sum() == 0  # detached: nothing more


def test_load_metrics_by_hand():
    counts = torch.tensor([[4.0, 0.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]])
    probs = torch.tensor([[0.5, 0.1, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]]) * 4  # 4 tokens per layer
    m = load_metrics(counts, probs, torch.tensor([2.0, 4.0]), torch.tensor([8.0, 4.0]), torch.tensor([4.0, 4.0]))
    assert m["layers"]["maxvio"] == [1.0, 0.0] and m["maxvio"] == 0.5 and m["maxvio_max"] == 1.0
    assert m["layers"]["dead_expert_frac"] == [0.25, 0.0] and m["dead_expert_frac"] == 0.125
    assert m["layers"]["entropy"] == [0.5, 1.0] and m["layers"]["z_loss"] == [2.0, 1.0] and m["z_loss"] == 1.5
    # aux per layer: E * sum f_i P_i, f = counts / tokens, P = mean prob: layer 0: 4 * (1*.5 + 0 + .5*.2 + .5*.2)
    assert m["layers"]["aux_loss"] == pytest.approx([2.8, 2.0])
    assert m["tokens_per_expert"] == [[4, 0, 2, 2], [2, 2, 2, 2]]


@pytest.mark.parametrize("bad,needle", [
    (dict(load_balancing="switch"), "load_balancing='switch' is not one of none, aux, seq_aux, global_aux"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef=-0.1 must be >= 0"),
    (dict(z_loss_coef=float("nan")), "z_loss_coef=nan must be >= 0"),
    (dict(bias_update=True, bias_update_rate=0.0), "bias_update_rate=0"),
    (dict(bias_update=True, freeze_router=True), "choose one"),
])
def test_bad_settings_name_the_field(bad, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        BalanceSettings(**bad)


def test_the_tap_losses_and_bias_update_never_read_a_tensor_on_the_host():
    """On the GPU a host read is a sync. What runs per layer and per step (the tap, the losses, the bias update) runs
    here on fake tensors, which have no values: a read of one (``.item()``, a boolean index, ``if t:``) fails. The
    window is read once per logging step, by :meth:`RouterStats.packed`'s caller."""
    import types

    from torch._subclasses.fake_tensor import FakeTensorMode

    from mtrain.models.moe import SigmoidGroupRouter

    for lb in ("aux", "seq_aux", "global_aux"):
        with FakeTensorMode():
            blocks = [types.SimpleNamespace(layer_idx=i, tap=None, gate=SigmoidGroupRouter(
                16, 8, 2, True, n_group=1, topk_group=1, norm_topk_prob=True, scaling=1.0)) for i in (1, 2)]
            model = types.SimpleNamespace(model=types.SimpleNamespace(
                layers=[types.SimpleNamespace(is_moe=True, mlp=b) for b in blocks]))
            stats = RouterStats(BalanceSettings(load_balancing=lb, z_loss_coef=1e-3, bias_update=True)).attach(model)
            stats.expect(torch.ones(3, 6, dtype=torch.bool))
            for block in blocks:
                stats(block, torch.randn(18, 8, requires_grad=True), torch.randint(0, 8, (18, 2)), torch.Size([3, 6]))
            stats.loss(reduce=lambda t: t * 1).backward()
            stats.update_bias(1e-3, reduce=lambda t: t * 1)
            assert stats.packed().shape == (2 * 8 * 2 + 3 * 2,)
