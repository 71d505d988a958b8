"""RL math (mtrain.rl) against numbers worked out by hand from the definitions (see the arithmetic in comments)."""

from __future__ import annotations

import math

import pytest
import torch

from mtrain.rl import (
    CorrectionConfig,
    aggregate,
    entropy_from_logits,
    frac_zero_std,
    group_advantages,
    kl_penalty,
    policy_loss,
    rollout_correction,
)

NAN, INF = float("nan"), float("inf")


def close(actual, expected, tol=1e-5):
    """Element-wise |actual - expected| <= tol (actual a tensor or number, expected nested lists or a number)."""
    a = torch.as_tensor(actual, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.allclose(a, e, atol=tol, rtol=0), f"\n got {a.tolist()}\nwant {e.tolist()}"


# ---------------------------------------------------------------------------------------------------- advantages

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0], [0.1, 0.1, 0.1, 0.1]])


def test_grpo_advantages_unbiased_std():
    # [1,0,0,1]: mean 0.5, deviations +-0.5, unbiased var = 4*0.25/3 = 1/3, std = 0.577350
    #            -> A = 0.5 / (0.577350 + 1e-6) = 0.866024
    # [3,1,2,2]: mean 2, deviations [1,-1,0,0], var = 2/3, std = 0.816497 -> A = [1.224743, -1.224743, 0, 0]
    # [0.1]*4: all equal -> exactly 0 (not round-off / eps)
    adv = group_advantages(REWARDS, "grpo")
    close(adv, [[0.866024, -0.866024, -0.866024, 0.866024], [1.224743, -1.224743, 0, 0], [0, 0, 0, 0]])
    assert torch.all(adv[2] == 0)


def test_grpo_without_std_and_dr_grpo_only_centre():
    # R - mean: [+-0.5], [1,-1,0,0], [0]*4; dr_grpo never divides by the std, whatever norm_std says
    want = [[0.5, -0.5, -0.5, 0.5], [1, -1, 0, 0], [0, 0, 0, 0]]
    close(group_advantages(REWARDS, "grpo", norm_std=False), want)
    close(group_advantages(REWARDS, "dr_grpo", norm_std=True), want)
    assert torch.all(group_advantages(REWARDS, "dr_grpo")[2] == 0)


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
def test_constant_group_is_exactly_zero_despite_round_off(mode):
    # all equal -> A = 0 by definition. In fp32, 0.9 - mean([0.9]*3) is 6e-8, not 0, and / (std 0 + eps 1e-6)
    # a naive GRPO would hand out A = 0.056 to a group with no signal.
    assert torch.all(group_advantages(torch.full((1, 3), 0.9), mode) == 0)


def test_rloo_leave_one_out_baseline():
    # [1,0,0,1]: 1 - (0+0+1)/3 = 2/3 ; 0 - (1+0+1)/3 = -2/3
    # [3,1,2,2]: 3 - 5/3 = 4/3 ; 1 - 7/3 = -4/3 ; 2 - (3+1+2)/3 = 0
    adv = group_advantages(REWARDS, "rloo")
    close(adv, [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [4 / 3, -4 / 3, 0, 0], [0, 0, 0, 0]])


def test_reinforce_is_the_raw_reward_and_works_for_one_sample():
    close(group_advantages(REWARDS, "reinforce"), REWARDS.tolist())
    close(group_advantages(torch.tensor([[0.7], [0.2]]), "reinforce"), [[0.7], [0.2]])


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
def test_baseline_modes_need_two_samples(mode):
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.tensor([[1.0], [0.0]]), mode)


def test_unknown_advantage_mode():
    with pytest.raises(ValueError, match="unknown advantage mode 'ppo'"):
        group_advantages(REWARDS, "ppo")


def test_frac_zero_std():
    # groups 2 and 3 are constant -> 2/3
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert frac_zero_std(rewards) == pytest.approx(2 / 3)
    assert frac_zero_std(torch.tensor([[1.0, 0.0]])) == 0.0


# ---------------------------------------------------------------------------------------------------- aggregation

# real tokens: row 0 = [1, 2, 3], row 1 = [4], row 2 = none; garbage (nan/inf/huge) where masked
VALUES = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, INF, 1e9, -INF], [NAN, 7.0, 7.0, 7.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode, norm_len, expected",
    [
        ("token-mean", None, 2.5),  # (1+2+3+4) / 4 tokens
        ("seq-mean-token-mean", None, 3.0),  # (6/3 + 4/1) / 2 sequences with tokens
        ("seq-mean-token-sum-norm", 4, 1.25),  # (6/4 + 4/4) / 2 sequences with tokens
    ],
)
def test_aggregate_ignores_masked_tokens(mode, norm_len, expected):
    values = VALUES.clone().requires_grad_()
    out = aggregate(values, MASK, mode, norm_len)
    close(out, expected)
    assert aggregate(VALUES, MASK.bool(), mode, norm_len).item() == pytest.approx(expected)
    out.backward()
    assert torch.all(values.grad[MASK == 0] == 0) and torch.isfinite(values.grad).all()


def test_aggregate_token_mean_gradient():
    # d/dv of sum(m v)/4 is 1/4 on each real token
    values = VALUES.clone().requires_grad_()
    aggregate(values, MASK, "token-mean").backward()
    close(values.grad, [[0.25, 0.25, 0.25, 0], [0.25, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_all_masked_is_zero_and_connected(mode):
    values = VALUES.clone().requires_grad_()
    out = aggregate(values, torch.zeros_like(MASK), mode, norm_len=4)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.all(values.grad == 0)


def test_aggregate_errors():
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown loss_agg mode 'sum'"):
        aggregate(VALUES, MASK, "sum")


# ---------------------------------------------------------------------------------------------------- PPO

# logp_old = 0, so r = exp(logp). Row 0 has A = +1, row 1 has A = -1; the last column is masked garbage.
PPO_RATIOS = [[1.5, 0.5, 1.25], [0.5, 1.5, 0.75]]
PPO_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])


def ppo_inputs():
    logp = torch.tensor([[math.log(r) for r in row] + [50.0] for row in PPO_RATIOS], requires_grad=True)
    return logp, torch.tensor([[0.0, 0.0, 0.0, NAN]] * 2), torch.tensor([1.0, -1.0])


def test_ppo_clip_higher_both_sides():
    # clip range [0.8, 1.28]; loss_t = max(-A r, -A clip(r))
    # A=+1: r=1.5  -> max(-1.5, -1.28) = -1.28 (clipped) ; r=0.5 -> max(-0.5, -0.8) = -0.5 ; r=1.25 -> -1.25 (inside)
    # A=-1: r=0.5  -> max(0.5, 0.8) = 0.8 (clipped) ; r=1.5 -> max(1.5, 1.28) = 1.5
    #       r=0.75 -> max(0.75, 0.8) = 0.8 (clipped)
    # token-mean = (-1.28 - 0.5 - 1.25 + 0.8 + 1.5 + 0.8) / 6 = 0.07 / 6 = 0.0116667
    logp, logp_old, adv = ppo_inputs()
    loss, stats = policy_loss(logp, logp_old, adv, PPO_MASK, clip_low=0.2, clip_high=0.28)
    close(loss, 0.07 / 6)
    close(stats["clip_frac"], 0.5)  # 3 of 6 tokens clipped
    close(stats["ratio_mean"], 1.0)  # (1.5+0.5+1.25+0.5+1.5+0.75) / 6 = 6/6
    close(stats["ratio_max"], 1.5)  # the masked exp(50) does not count
    # approx_kl: k3 with d = -ln r is 1/r + ln r - 1: r=1.5 -> 0.072132, 0.5 -> 0.306853, 1.25 -> 0.023144,
    # 0.75 -> 0.045651; (2*0.072132 + 2*0.306853 + 0.023144 + 0.045651) / 6 = 0.826765 / 6 = 0.137794
    close(stats["approx_kl"], 0.137794)
    assert "dual_clip_frac" not in stats
    # gradient: clipped tokens 0, others -A r / 6: (0,1) -> -0.5/6 ; (0,2) -> -1.25/6 ; (1,1) -> +1.5/6
    loss.backward()
    close(logp.grad, [[0, -0.5 / 6, -1.25 / 6, 0], [0, 1.5 / 6, 0, 0]])


def test_ppo_symmetric_clip_and_per_token_advantages():
    # clip range [0.8, 1.2] and A given as [B, T] (garbage at the masked column):
    # A=+1: -1.2, -0.5, -1.2 (1.25 now clipped) ; A=-1: 0.8, 1.5, 0.8 -> sum = -2.9 + 3.1 = 0.2 -> 0.2/6
    logp, logp_old, _ = ppo_inputs()
    adv = torch.tensor([[1.0, 1.0, 1.0, NAN], [-1.0, -1.0, -1.0, INF]])
    loss, stats = policy_loss(logp, logp_old, adv, PPO_MASK, clip_low=0.2, clip_high=0.2)
    close(loss, 0.2 / 6)
    close(stats["clip_frac"], 4 / 6)
    loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_ppo_dual_clip():
    # clip [0.8, 1.28], c = 3. A=-1, r=5: max(5, 1.28) = 5 -> capped at 3*|A| = 3 ; A=-1, r=2: 2 < 3 stays
    # A=+1, r=5: max(-5, -1.28) = -1.28 (the dual clip is only for A < 0). mean = (3 + 2 - 1.28) / 3 = 1.24
    logp = torch.tensor([[math.log(5.0), math.log(2.0), math.log(5.0)]], requires_grad=True)
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    loss, stats = policy_loss(logp, torch.zeros(1, 3), adv, mask, clip_high=0.28, dual_clip=3.0)
    close(loss, 1.24)
    close(stats["dual_clip_frac"], 1 / 3)
    loss.backward()
    close(logp.grad, [[0.0, 2.0 / 3, 0.0]])  # only r=2 has a gradient: -A r / 3 = 2/3
    without, _ = policy_loss(logp, torch.zeros(1, 3), adv, mask, clip_high=0.28)
    close(without, (5 + 2 - 1.28) / 3)


def test_is_weights_scale_each_token_and_stay_detached():
    # r = 1, A = 1 -> loss_t = -1, times weights [2, 0.5] -> mean -1.25 ; the masked weight (nan) is ignored
    logp = torch.zeros(1, 3, requires_grad=True)
    w = torch.tensor([[2.0, 0.5, NAN]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1, 1, 0]]), is_weights=w)
    close(loss, -1.25)
    loss.backward()
    close(logp.grad, [[-1.0, -0.25, 0.0]])
    assert w.grad is None


def test_policy_loss_errors():
    logp, logp_old, adv = ppo_inputs()
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(logp, logp_old, adv, PPO_MASK, dual_clip=1.0)
    with pytest.raises(ValueError, match="unknown policy loss kind 'dpo'"):
        policy_loss(logp, logp_old, adv, PPO_MASK, kind="dpo")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, logp_old, torch.ones(3), PPO_MASK)


# ---------------------------------------------------------------------------------------------------- GSPO


def test_gspo_sequence_ratio_and_gradient():
    # logp - logp_old = [0.2, -0.1] (+ a masked garbage token): s = exp(mean) = exp(0.05) = 1.051271
    # A = +1, clip 0.2 inactive; seq-mean-token-mean -> loss = -s = -1.051271
    # grad_t = -A * s * (1/2) = -0.525636 for both tokens (PPO would give -exp(0.2)/2 = -0.6107, -exp(-0.1)/2 = -0.4524)
    logp = torch.tensor([[0.2, -0.1, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = policy_loss(
        logp, torch.tensor([[0.0, 0.0, NAN]]), torch.tensor([1.0]), mask, kind="gspo", loss_agg="seq-mean-token-mean"
    )
    close(loss, -1.051271)
    close(stats["ratio_mean"], 1.051271)
    close(stats["clip_frac"], 0.0)
    loss.backward()
    close(logp.grad, [[-0.525636, -0.525636, 0.0]])


def test_gspo_clip_uses_the_sequence_ratio():
    # paper clips [1 - 3e-4, 1 + 4e-4]; s = 1.051271
    # A=+1: max(-1.051271, -1.0004) = -1.0004, clipped, no gradient
    # A=-1: max(1.051271, 1.0004) = 1.051271, grad_t = +s/2 = 0.525636
    logp = torch.tensor([[0.2, -0.1], [0.2, -0.1]], requires_grad=True)
    loss, stats = policy_loss(
        logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2), kind="gspo",
        clip_low=3e-4, clip_high=4e-4, loss_agg="seq-mean-token-mean",
    )
    close(loss, (-1.0004 + 1.051271) / 2)
    close(stats["clip_frac"], 0.5)  # the two tokens of row 0
    loss.backward()
    close(logp.grad, [[0.0, 0.0], [0.525636 / 2, 0.525636 / 2]])  # / 2 sequences


# ---------------------------------------------------------------------------------------------------- KL, entropy


def test_kl_estimators():
    # d = logp_ref - logp = [-0.5, 1.0]
    logp, logp_ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    close(kl_penalty(logp, logp_ref, "k1"), [[0.5, -1.0]])  # -d
    close(kl_penalty(logp, logp_ref, "k2"), [[0.125, 0.5]])  # d^2/2
    # exp(-0.5) + 0.5 - 1 = 0.606531 - 0.5 = 0.106531 ; e - 1 - 1 = 0.718282
    close(kl_penalty(logp, logp_ref, "k3"), [[0.106531, 0.718282]])
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(logp, logp_ref, "k4")


def test_k3_is_nonnegative_and_finite():
    d = torch.linspace(-60, 60, 241)
    k3 = kl_penalty(torch.zeros_like(d), d, "k3")
    assert torch.all(k3 >= 0) and torch.isfinite(k3).all()
    assert k3[120].item() == 0.0  # d = 0
    close(k3[-1], math.exp(20) - 21, tol=1e2)  # d = 60 clamped to 20: e^20 - 20 - 1


def test_entropy():
    # uniform over V: ln V, whatever the constant logit
    close(entropy_from_logits(torch.full((2, 8), 3.7)), [math.log(8)] * 2)
    # p = [1/4, 3/4]: -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.346574 + 0.215762 = 0.562335
    close(entropy_from_logits(torch.tensor([0.0, math.log(3.0)])), 0.562335)
    # a banned (-inf) logit adds nothing: [0, -inf] -> 0 ; [0, 0, -inf] -> ln 2
    h = entropy_from_logits(torch.tensor([[0.0, -INF, -INF], [0.0, 0.0, -INF]], dtype=torch.bfloat16))
    assert h.dtype == torch.float32
    close(h, [0.0, math.log(2)])


# ---------------------------------------------------------------------------------------------------- corrections

# logp_roll = 0, so w = exp(logp_old). Valid w: row 0 [1, 3, 0.4], row 1 [1.5, 1.5], row 2 [0.25]; nan where masked.
W = [[1.0, 3.0, 0.4], [1.5, 1.5, None], [0.25, None, None]]
C_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
C_OLD = torch.tensor([[NAN if w is None else math.log(w) for w in row] for row in W])
C_ROLL = torch.zeros(3, 3)


def correct(mode, logp_old=C_OLD, logp_roll=C_ROLL, mask=C_MASK, **kw):
    return rollout_correction(logp_old, logp_roll, mask, CorrectionConfig(mode=mode, **kw))


def test_correction_stats():
    _, _, s = correct("off")
    close(s["is_weight_mean"], 1.275)  # (1 + 3 + 0.4 + 1.5 + 1.5 + 0.25) / 6 = 7.65 / 6
    close(s["is_weight_max"], 3.0)
    # ESS: sum w = 7.65, sum w^2 = 1 + 9 + 0.16 + 2.25 + 2.25 + 0.0625 = 14.7225 -> 58.5225 / (6 * 14.7225) = 0.662506
    close(s["ess"], 0.662506)
    # |ln w| = 0, 1.098612, 0.916291, 0.405465, 0.405465, 1.386294 -> sum 4.212127, mean 0.702021
    close(s["mismatch_abs_mean"], 0.702021)
    close(s["mismatch_abs_max"], 1.386294)
    # w - ln w - 1 = 0, 0.901388, 0.316291, 0.094535, 0.094535, 0.636294 -> sum 2.043043, mean 0.340507
    close(s["mismatch_k3"], 0.340507)
    close(s["frac_abs_gt_ln2"], 0.5)  # 1.0986, 0.9163, 1.3863 exceed 0.6931
    close(s["frac_truncated"], 0.0)
    close(s["frac_masked"], 0.0)


def test_ess_of_equal_weights_is_one():
    _, _, s = correct("off", logp_old=torch.full((3, 3), math.log(1.5)))  # w = 1.5 on every valid token
    close(s["ess"], 1.0)
    old = torch.tensor([[0.0, math.log(3.0)]])
    _, _, s = correct("off", logp_old=old, logp_roll=torch.zeros(1, 2), mask=torch.ones(1, 2))
    close(s["ess"], 0.8)  # w = [1, 3]: 4^2 / (2 * (1 + 9)) = 16 / 20


def test_off_keeps_everything():
    weights, mask, _ = correct("off")
    close(weights, C_MASK.tolist())
    assert torch.equal(mask, C_MASK) and mask.dtype == C_MASK.dtype


def test_token_tis_truncates_at_cap():
    # min(w, 2): only w = 3 is cut (1 of 6 tokens)
    weights, mask, s = correct("token_tis", cap=2.0)
    close(weights, [[1.0, 2.0, 0.4], [1.5, 1.5, 0.0], [0.25, 0.0, 0.0]])
    assert torch.equal(mask, C_MASK) and not weights.requires_grad and weights.dtype == torch.float32
    close(s["frac_truncated"], 1 / 6)
    close(s["frac_masked"], 0.0)


def test_token_mask_drops_tokens_outside_the_band():
    # [1/2, 2]: drop w = 3, 0.4, 0.25 -> 3 of 6 tokens
    weights, mask, s = correct("token_mask", cap=2.0)
    close(mask, [[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    close(weights, [[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    close(s["frac_masked"], 0.5)
    # explicit bounds [0.3, 5]: only 0.25 goes
    _, mask, _ = correct("token_mask", lower=0.3, upper=5.0)
    close(mask, [[1, 1, 1], [1, 1, 0], [0, 0, 0]])


def test_seq_tis_one_truncated_weight_per_sequence():
    # rho = 1*3*0.4 = 1.2 ; 1.5*1.5 = 2.25 -> 2 (truncated) ; 0.25
    weights, mask, s = correct("seq_tis", cap=2.0)
    close(weights, [[1.2, 1.2, 1.2], [2.0, 2.0, 0.0], [0.25, 0.0, 0.0]])
    assert torch.equal(mask, C_MASK)
    close(s["frac_truncated"], 2 / 6)  # the two tokens of row 1


def test_seq_mask_drops_whole_sequences():
    # rho in [0.5, 2]? 1.2 yes ; 2.25 no ; 0.25 no -> 3 of 6 tokens removed
    weights, mask, s = correct("seq_mask", cap=2.0)
    close(mask, [[1, 1, 1], [0, 0, 0], [0, 0, 0]])
    close(weights, mask.tolist())
    close(s["frac_masked"], 0.5)


def test_geo_mask_uses_the_mean_over_valid_tokens():
    # log(0.999) = -0.0010005, log(1.001) = 0.0009995; mean of log w per row (valid tokens only):
    # row 0 [0.0004, -0.0002] -> 0.0001 keep ; row 1 [0.0008, 0.0008] -> 0.0008 keep (its sum 0.0016 would not)
    # row 2 [0.0015, masked] -> 0.0015 drop (over T=2 it would be 0.00075) ; row 3 [-0.003, -0.0004] -> -0.0017 drop
    old = torch.tensor([[0.0004, -0.0002], [0.0008, 0.0008], [0.0015, NAN], [-0.003, -0.0004]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    _, new_mask, s = correct("geo_mask", logp_old=old, logp_roll=torch.zeros(4, 2), mask=mask)
    assert new_mask.dtype == torch.bool
    close(new_mask, [[1, 1], [1, 1], [0, 0], [0, 0]])
    close(s["frac_masked"], 3 / 7)


def test_k3_filter():
    # k3(delta) = e^delta - delta - 1: 0.1 -> 0.005171, -0.1 -> 0.004837, 0.2 -> 0.021403, 0.15 -> 0.011834
    # row 0 [0.1, 0.1] -> 0.005171 keep ; row 1 [0.2, 0] -> 0.010701 drop ; row 2 [0.15, masked] -> 0.011834 drop
    # (over T=2 it would be 0.0059) ; row 3 [-0.1, 0.1] -> 0.005004 keep
    old = torch.tensor([[0.1, 0.1], [0.2, 0.0], [0.15, NAN], [-0.1, 0.1]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1]])
    _, new_mask, s = correct("k3_filter", logp_old=old, logp_roll=torch.zeros(4, 2), mask=mask)
    close(new_mask, [[1, 1], [0, 0], [0, 0], [1, 1]])
    close(s["frac_masked"], 3 / 7)


def test_correction_config_errors():
    with pytest.raises(ValueError, match="CorrectionConfig.mode: unknown mode 'icepop'"):
        CorrectionConfig(mode="icepop")
    for mode in ("token_tis", "seq_tis"):
        with pytest.raises(ValueError, match="CorrectionConfig.cap must be > 1"):
            CorrectionConfig(mode=mode, cap=1.0)
    with pytest.raises(ValueError, match=r"CorrectionConfig.lower \(2.0\) must be > 0 and < upper \(1.0\)"):
        CorrectionConfig(mode="token_mask", lower=2.0, upper=1.0)
    with pytest.raises(ValueError, match="CorrectionConfig.geo_low"):
        CorrectionConfig(mode="geo_mask", geo_low=1.001, geo_high=0.999)
    cfg = CorrectionConfig(mode="token_tis")
    cfg.cap = 0.5  # changed after construction: still caught
    with pytest.raises(ValueError, match="CorrectionConfig.cap"):
        rollout_correction(C_OLD, C_ROLL, C_MASK, cfg)
