"""grpo module: the advantage and loss kernels (unit + property tests against slow per-group / per-token
loops), the plain quiz helper, the warm-up data, the audit in toy/full mode, determinism, one mutant per check."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_check_fails, audit_once
from llmaudit.runner import configure_torch
from modules.grpo import grpo as M
from modules.ppo.core import kl_estimators

configure_torch()

DT = torch.float64
FAST = settings(max_examples=40, deadline=None)
# a short run for mutants of invariants: they do not depend on how well the loop learns
QUICK = {"warmup_steps": "60", "steps": "3", "eval_samples": "1", "prompts_per_step": "8"}
MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

reward_lists = st.lists(st.sampled_from([0.0, 0.1, 1.0, 0.5, 3.0]), min_size=2, max_size=8)


def slow_advantages(rewards: list[float], G: int, scale: bool, eps: float = 1e-6) -> list[float]:
    out = []
    for i in range(0, len(rewards), G):
        group = rewards[i:i + G]
        mean = sum(group) / G
        if max(group) - min(group) <= 1e-6:
            out += [0.0] * G
            continue
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (G - 1))
        out += [(r - mean) / (std + eps) if scale else r - mean for r in group]
    return out


def slow_loss(lp, old, ref, adv, mask, lo, hi, beta, mode):
    N, T = lp.shape
    lp, old, ref, adv, mask = lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist()
    per = [[0.0] * T for _ in range(N)]
    for i in range(N):
        for t in range(T):
            if mask[i][t]:
                r = math.exp(lp[i][t] - old[i][t])
                A = adv[i]
                pg = max(-A * r, -A * min(max(r, 1 - lo), 1 + hi))
                x = ref[i][t] - lp[i][t]
                per[i][t] = pg + beta * (math.exp(x) - x - 1)
    n = [int(sum(mask[i])) for i in range(N)]
    rows = [sum(per[i]) for i in range(N)]
    if mode == "token-mean":
        return sum(rows) / sum(n)
    live = [i for i in range(N) if n[i] > 0]
    if mode == "seq-mean-token-sum":
        return sum(rows[i] for i in live) / len(live)
    if mode == "seq-mean-token-mean":
        return sum(rows[i] / n[i] for i in live) / len(live)
    return sum(rows) / T


# ---------------------------------------------------------------------------------------------------
# grpo_advantages and group_advantages


def test_advantages_reference_vectors():
    a = M.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    assert a.tolist() == pytest.approx([0.8660239, -0.8660239, -0.8660239, 0.8660239], abs=1e-6)
    assert M.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4).tolist() == \
        pytest.approx([1.499997, -0.499999, -0.499999, -0.499999], abs=1e-6)
    assert M.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, scale_rewards=False).tolist() == \
        pytest.approx([0.5, -0.5, -0.5, 0.5], abs=1e-7)
    assert M.grpo_advantages(torch.tensor([1.0, 0.0]), 2).tolist() == pytest.approx([0.7071058, -0.7071058], abs=1e-6)


def test_quiz_helper_matches_tensor_kernel_and_anchor():
    assert M.group_advantages([1.0, 0.0, 0.0, 1.0])[0] == pytest.approx(0.866, abs=1e-3)
    assert M.group_advantages([1.0, 0.0, 0.0, 0.0]) == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-3)
    assert M.group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        M.group_advantages([1.0])


def test_single_answer_groups_are_rejected():
    with pytest.raises(ValueError, match="group_size"):
        M.grpo_advantages(torch.tensor([1.0, 0.0]), 1)


@FAST
@given(groups=st.lists(reward_lists.filter(lambda r: len(r) == 4), min_size=1, max_size=5), scale=st.booleans())
def test_advantages_match_slow_per_group_loop(groups, scale):
    flat = [r for g in groups for r in g]
    got = M.grpo_advantages(torch.tensor(flat, dtype=DT), 4, scale)
    assert got.tolist() == pytest.approx(slow_advantages(flat, 4, scale), abs=1e-9)
    assert M.group_advantages(groups[0]) == pytest.approx(slow_advantages(groups[0], 4, True), abs=1e-9)


@FAST
@given(rewards=reward_lists, a=st.floats(0.1, 10.0), b=st.floats(-10, 10))
def test_sum_zero_constant_zero_and_affine_invariance(rewards, a, b):
    G = len(rewards)
    r = torch.tensor(rewards)
    adv = M.grpo_advantages(r, G)
    assert abs(adv.sum().item()) < 1e-5
    if max(rewards) == min(rewards):
        assert adv.abs().max().item() == 0.0
    else:
        assert (M.grpo_advantages(a * r + b, G) - adv).abs().max().item() < 1e-3
        dr = M.grpo_advantages(r, G, scale_rewards=False)
        assert (M.grpo_advantages(a * r + b, G, scale_rewards=False) - a * dr).abs().max().item() < 1e-4


def test_float32_constant_groups_are_exactly_zero():
    for v in (0.1, 0.3, 0.7, 1e-3):
        assert M.grpo_advantages(torch.full((8,), v), 8).abs().max().item() == 0.0


def test_dynamic_sampling_keeps_whole_groups_with_signal():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1])
    assert M.dynamic_sampling_keep(r, 4).tolist() == [True] * 4 + [False] * 4
    assert M.constant_groups(r, 4).tolist() == [False, True]


# ---------------------------------------------------------------------------------------------------
# grpo_loss


@FAST
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(MODES), beta=st.sampled_from([0.0, 0.04, 1.0]),
       hi=st.sampled_from([0.2, 0.28]))
def test_loss_matches_slow_per_token_loop(seed, mode, beta, hi):
    g = torch.Generator().manual_seed(seed)
    N, T = 5, 4
    lengths = torch.randint(0, T + 1, (N,), generator=g)
    lengths[0] = max(1, int(lengths[0]))
    mask = (torch.arange(T)[None] < lengths[:, None]).to(DT)
    lp = -2 * torch.rand(N, T, generator=g, dtype=DT)
    old = lp + 0.4 * torch.randn(N, T, generator=g, dtype=DT)
    ref = lp + 0.4 * torch.randn(N, T, generator=g, dtype=DT)
    adv = torch.randn(N, generator=g, dtype=DT)
    loss, per_token = M.grpo_loss(lp, old, ref, adv, mask, 0.2, hi, beta, mode)
    assert loss.item() == pytest.approx(slow_loss(lp, old, ref, adv, mask, 0.2, hi, beta, mode), abs=1e-10)
    assert (per_token * (1 - mask)).abs().max().item() == 0.0


def test_length_bias_vector_and_gradients():
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=DT)
    want = {"seq-mean-token-mean": 0.0, "token-mean": 0.5, "seq-mean-token-sum-norm": 0.5, "seq-mean-token-sum": 1.0}
    for mode, value in want.items():
        lp = torch.full((2, 4), -1.0, dtype=DT, requires_grad=True)
        loss, _ = M.grpo_loss(lp, lp.detach(), lp.detach(), torch.tensor([1.0, -1.0], dtype=DT), mask, beta=0.0,
                              loss_agg_mode=mode)
        assert loss.item() == pytest.approx(value, abs=1e-12)
        (grad,) = torch.autograd.grad(loss, lp)
        if mode == "seq-mean-token-mean":  # -A_i / (B |o_i|): the short right answer is pushed 3x harder
            assert grad[0, 0].item() == pytest.approx(-0.5) and grad[1, 0].item() == pytest.approx(1 / 6)


def test_ratio_one_gives_minus_mean_advantage_and_k3_value():
    lp = torch.tensor([[-1.0]], dtype=DT, requires_grad=True)
    loss, _ = M.grpo_loss(lp, lp.detach(), torch.tensor([[-1.5]], dtype=DT), torch.tensor([2.0], dtype=DT),
                          torch.ones(1, 1, dtype=DT), beta=0.5, loss_agg_mode="token-mean")
    assert loss.item() == pytest.approx(-2.0 + 0.5 * 0.1065307, abs=1e-7)
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad.item() == pytest.approx(-2.0 + 0.5 * 0.3934693, abs=1e-7)
    _, _, k3 = kl_estimators(torch.tensor(-1.0), torch.tensor(-1.5))
    assert k3.item() == pytest.approx(0.1065307, abs=1e-7)


def test_nan_padding_changes_nothing():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=DT)
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, float("nan"), float("nan")]], dtype=DT, requires_grad=True)
    clean = torch.nan_to_num(lp.detach()).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0], dtype=DT)
    for mode in MODES:
        l1, _ = M.grpo_loss(lp, lp.detach() + 0.1, lp.detach() - 0.2, adv, mask, loss_agg_mode=mode)
        l0, _ = M.grpo_loss(clean, clean.detach() + 0.1, clean.detach() - 0.2, adv, mask, loss_agg_mode=mode)
        g1, g0 = torch.autograd.grad(l1, lp)[0], torch.autograd.grad(l0, clean)[0]
        assert l1.item() == pytest.approx(l0.item()) and torch.equal(g1, g0)


def test_variant_settings():
    assert M.variant_settings(M.GRPOConfig(variant="dr_grpo")) == (False, "seq-mean-token-sum-norm", 0.2, False)
    assert M.variant_settings(M.GRPOConfig(variant="dapo")) == (True, "token-mean", 0.28, True)
    with pytest.raises(ValueError):
        M.GRPOConfig(variant="ppo")
    with pytest.raises(ValueError):
        M.GRPOConfig(group_size=1)


def test_demonstrations_mask_the_prompt_and_padding():
    cfg = M.GRPOConfig()
    inputs, targets = M.demonstration_batch(cfg, 16, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (16, 5 + cfg.max_new_tokens - 1)
    assert (targets[:, :4] == -100).all()  # the prompt predicts nothing
    assert (targets == 2).sum(1).eq(1).all()  # exactly one EOS target per row


# ---------------------------------------------------------------------------------------------------
# The audit


def test_audit_passes_in_toy_mode():
    result = audit_once("grpo", "toy", 0)
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error
    assert {"reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/region_mean",
            "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length", "eval/accuracy_easy",
            "eval/accuracy_hard"} <= set(result.series)


@pytest.mark.parametrize("seed", [0, 1])
def test_audit_passes_in_full_mode(seed):
    result = audit_once("grpo", "full", seed)
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error


def test_same_seed_gives_identical_result_and_quick_invariants_pass():
    a, b = audit_once("grpo", "toy", 3, QUICK), audit_once("grpo", "toy", 3, QUICK)
    assert a.to_dict() == b.to_dict()
    assert all(c.passed for c in a.checks if c.kind == "invariant"), [c.name for c in a.checks if not c.passed]


# ---------------------------------------------------------------------------------------------------
# Mutants: one per check


def population_std(rewards, group_size, scale_rewards=True, eps=1e-6):
    r = rewards.view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale_rewards:
        adv = adv / (r.std(1, unbiased=False, keepdim=True) + eps)
    return torch.where(adv.abs() < 1e-7, 0.0, adv).reshape(-1)


def batch_mean(rewards, group_size, scale_rewards=True, eps=1e-6):
    adv = rewards - rewards.mean()
    return adv / (rewards.std() + eps) if scale_rewards else adv


def no_guard_no_eps(rewards, group_size, scale_rewards=True, eps=1e-6):
    r = rewards.view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    return (adv / r.std(1, keepdim=True) if scale_rewards else adv).reshape(-1)


def always_scaled(rewards, group_size, scale_rewards=True, eps=1e-6):
    return M.grpo_advantages(rewards, group_size, True, eps)


def flipped(rewards, group_size, scale_rewards=True, eps=1e-6):
    return -M.grpo_advantages(rewards, group_size, scale_rewards, eps)


def unclipped(lp, old, ref, adv, mask, lo=0.2, hi=0.2, beta=0.04, mode="seq-mean-token-mean"):
    return M.grpo_loss(lp, old, ref, adv, mask, 1e9, 1e9, beta, mode)


def kl_to_old(lp, old, ref, adv, mask, lo=0.2, hi=0.2, beta=0.04, mode="seq-mean-token-mean"):
    return M.grpo_loss(lp, old, old, adv, mask, lo, hi, beta, mode)


def always_token_mean(lp, old, ref, adv, mask, lo=0.2, hi=0.2, beta=0.04, mode="seq-mean-token-mean"):
    return M.grpo_loss(lp, old, ref, adv, mask, lo, hi, beta, "token-mean")


def multiply_by_mask(lp, old, ref, adv, mask, lo=0.2, hi=0.2, beta=0.04, mode="seq-mean-token-mean"):
    ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv[:, None] * ratio, -adv[:, None] * ratio.clamp(1 - lo, 1 + hi))
    per = (pg + beta * (torch.exp(ref - lp) - (ref - lp) - 1)) * mask
    return per.sum() / mask.sum(), per


def test_mutant_population_std_fails_vectors():
    assert_check_fails(audit_once("grpo", "toy", 0, QUICK, grpo_advantages=population_std),
                       "advantages_match_reference_vectors")


def test_mutant_batch_mean_fails_group_sums():
    assert_check_fails(audit_once("grpo", "toy", 0, QUICK, grpo_advantages=batch_mean),
                       "advantages_sum_to_zero_within_each_group")


def test_mutant_without_guard_or_eps_fails_zero_groups():
    assert_check_fails(audit_once("grpo", "toy", 0, QUICK, grpo_advantages=no_guard_no_eps),
                       "all_equal_groups_get_zero_advantage")


def test_mutant_ignoring_dr_grpo_flag_fails_affine():
    assert_check_fails(audit_once("grpo", "toy", 0, QUICK, grpo_advantages=always_scaled),
                       "std_advantages_invariant_to_affine_rewards")


def test_mutant_batch_baseline_fails_difficulty_equalisation():
    assert_check_fails(audit_once("grpo", "toy", 0, QUICK, grpo_advantages=batch_mean),
                       "group_advantages_equalise_difficulty")


def test_mutant_equally_good_demonstrator_fails_difficulty_gap():
    overrides = {"steps": "1", "eval_samples": "1", "demo_correct_hard": "0.5", "demo_correct_easy": "0.5"}
    assert_check_fails(audit_once("grpo", "toy", 0, overrides), "raw_rewards_differ_by_difficulty")


def test_mutant_keeping_every_group_fails_dynamic_sampling(monkeypatch):
    monkeypatch.setattr(M, "dynamic_sampling_keep", lambda r, g: torch.ones(len(r), dtype=torch.bool))
    assert_check_fails(audit_once("grpo", "toy", 0, QUICK), "dapo_drops_exactly_the_all_equal_groups")


def test_mutant_without_clip_fails_clip_table():
    assert_check_fails(audit_once("grpo", "toy", 0, QUICK, grpo_loss=unclipped),
                       "clipped_surrogate_matches_table_and_zeroes_clipped_gradients")


def test_mutant_kl_to_old_policy_fails_kl_check():
    assert_check_fails(audit_once("grpo", "toy", 0, QUICK, grpo_loss=kl_to_old), "kl_term_is_k3_to_the_reference")


def test_mutant_ignoring_aggregation_mode_fails_length_bias():
    assert_check_fails(audit_once("grpo", "toy", 0, QUICK, grpo_loss=always_token_mean),
                       "length_bias_vector_reproduced")


def test_mutant_multiplying_nan_by_mask_fails_padding():
    assert_check_fails(audit_once("grpo", "toy", 0, QUICK, grpo_loss=multiply_by_mask),
                       "padding_never_changes_loss_or_gradient")


def test_mutant_ratio_against_reference_fails_ratio_one(monkeypatch):
    original = M.rollout

    def seed002_rollout(policy, reference, problems, cfg, generator, reward_fn=None):
        ro = original(policy, reference, problems, cfg, generator, reward_fn)
        return ro._replace(old_logprobs=ro.ref_logprobs)  # pi_old taken from the frozen reference
    monkeypatch.setattr(M, "rollout", seed002_rollout)
    assert_check_fails(audit_once("grpo", "toy", 0, QUICK), "ratio_is_one_on_first_update_after_each_rollout")


def test_mutant_flipped_advantages_fail_accuracy():
    assert_check_fails(audit_once("grpo", "toy", 0, grpo_advantages=flipped), "accuracy_rises_from_sft_level_to_bar")


def test_mutant_zero_learning_rate_fails_kl_bound():
    assert_check_fails(audit_once("grpo", "toy", 0, {**QUICK, "lr": "0"}), "kl_to_reference_stays_bounded")
