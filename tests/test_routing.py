"""Routing as a model API: a RoutingTrace records each MoE layer's experts and replays them (R3/R2), also through
activation checkpointing; replay keeps the router's gradient (weights from the live scores at the given ids)."""

from __future__ import annotations

import pytest
import torch

from mtrain.models import Glm4MoeConfig, Qwen3MoeConfig, RoutingTrace, build_model, token_logprobs

FAMILIES = {
    "qwen3_moe": Qwen3MoeConfig(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2),
    "glm4_moe": Glm4MoeConfig(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                              topk_group=1, routed_scaling_factor=2.5),
}


def model_of(family: str, seed: int = 0):
    model = build_model(FAMILIES[family], seed=seed)
    with torch.no_grad():
        for _, router in model.routers():
            router.weight.normal_(0, 0.5)  # a decisive router: replayed ids must matter
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.uniform_(-0.3, 0.3)
    return model


def ids_targets(seed=0, B=3, S=10, V=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    return ids, torch.roll(ids, -1, 1)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_replaying_own_routing_reproduces_logits_and_gradients(family, checkpointing):
    model = model_of(family).train()
    model.activation_checkpointing = checkpointing
    ids, targets = ids_targets()
    rec = RoutingTrace()
    loss = model.loss(ids, targets, trace=rec)
    loss.backward()
    ref_grads = grads(model)
    assert rec.layers == model.moe_layers and rec.ids[rec.layers[0]].shape == (3, 10, 2)
    model.zero_grad()

    replay = RoutingTrace.replay(rec)
    loss2 = model.loss(ids, targets, trace=replay)
    loss2.backward()
    assert torch.equal(loss, loss2)
    got = grads(model)
    assert got.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert torch.equal(got[name], g), name
    gate = model.routers()[0][1].weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0  # the router keeps its gradient under replay


@pytest.mark.parametrize("family", list(FAMILIES))
def test_replaying_other_ids_changes_only_the_chosen_experts(family):
    model = model_of(family).eval()
    ids, _ = ids_targets()
    rec = RoutingTrace()
    with torch.no_grad():
        base = model(ids, trace=rec)
    layer = rec.layers[-1]  # the last MoE layer: nothing after it re-routes
    forced = {k: v.clone() for k, v in rec.ids.items()}
    E = FAMILIES[family].num_experts
    b, s = 1, 4
    chosen = set(forced[layer][b, s].tolist())
    forced[layer][b, s] = torch.tensor([e for e in range(E) if e not in chosen][:2])
    with torch.no_grad():
        out = model(ids, trace=RoutingTrace.replay(forced))
    diff = (out - base).abs().amax(-1)
    assert diff[b, s] > 1e-3  # that token's output moved ...
    diff[b, s] = 0  # ... and no other (up to float noise: the experts' GEMMs see different row counts)
    assert diff.max() < 1e-5


def test_replay_weights_come_from_live_unbiased_scores_glm():
    """GLM: selection used scores + bias; replayed weights are the un-biased sigmoid scores at the given ids,
    normalised and scaled, so a changed bias changes nothing under replay."""
    model = model_of("glm4_moe").eval()
    ids, targets = ids_targets()
    rec = RoutingTrace()
    with torch.no_grad():
        lp = token_logprobs(model, ids, targets, trace=rec)
        for _, router in model.routers():
            router.e_score_correction_bias.add_(5.0 * torch.randn_like(router.e_score_correction_bias))
        replayed = token_logprobs(model, ids, targets, trace=RoutingTrace.replay(rec))
        free = token_logprobs(model, ids, targets)
    assert torch.equal(lp, replayed)
    assert not torch.equal(lp, free)  # without replay, the new bias re-routes


def test_record_logits_and_bad_replay_are_refused():
    model = model_of("qwen3_moe")
    ids, _ = ids_targets()
    rec = RoutingTrace(logits=True)
    model(ids, trace=rec)
    assert rec.logits[rec.layers[0]].shape == (3, 10, 8) and rec.logits[rec.layers[0]].dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        model(ids[:, :5], trace=RoutingTrace.replay(rec))
    with pytest.raises(ValueError, match="needs the expert ids"):
        RoutingTrace("replay")
