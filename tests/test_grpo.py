"""grpo module: the advantage and loss kernels (unit + property tests against slow per-group / per-token
loops), the plain quiz helper, the warm-up data, the audit in toy/full mode, determinism, one mutant per check."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params, patched
from modules.grpo import grpo as M
from modules.ppo.core import kl_estimators

DT = torch.float64
FAST = settings(max_examples=40, deadline=None)
# a short run for determinism and the invariants: they do not depend on how well the loop learns
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


def test_policy_batch_keeps_every_answer_except_under_dapo():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    N, T = len(rewards), 3
    ro = M.Rollout(torch.zeros(N, 5 + T, dtype=torch.long), torch.ones(N, T), rewards, torch.zeros(N, dtype=torch.long),
                   torch.zeros(N, T), torch.zeros(N, T))
    full = M.policy_batch(ro, M.GRPOConfig(group_size=4))
    assert full.groups_kept == 3 and torch.equal(full.advantages, M.grpo_advantages(rewards, 4))
    dapo = M.policy_batch(ro, M.GRPOConfig(group_size=4, variant="dapo"))
    assert dapo.groups_kept == 2 and len(dapo.advantages) == 8 and dapo.mask.shape == (8, T)
    assert torch.equal(dapo.advantages, M.grpo_advantages(rewards, 4)[torch.tensor([1] * 4 + [0] * 4 + [1] * 4).bool()])


def test_run_trains_a_copy_and_keeps_the_reference_frozen():
    cfg = M.GRPOConfig(task="logic", max_new_tokens=2, warmup_steps=20, steps=2, eval_samples=1, prompts_per_step=16,
                       eval_every=1)
    torch.manual_seed(0)
    sft, _ = M.warm_up_policy(cfg, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in sft.parameters()]
    result = M.run(cfg, torch.Generator().manual_seed(1), sft=sft)
    assert all(torch.equal(a, b) for a, b in zip(before, sft.parameters()))  # the SFT policy is not modified
    assert all(torch.equal(a, b) for a, b in zip(before, result.reference.parameters()))
    assert not any(p.requires_grad for p in result.reference.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, result.policy.parameters()))
    assert len(result.history) == 2 and [e.step for e in result.evals] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------
# The audit


def test_audit_passes_in_toy_mode():
    result = audit_once("grpo", "toy", 0)
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error
    assert {"reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/region_mean",
            "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length", "eval/accuracy_easy",
            "eval/accuracy_hard"} <= set(result.series)
    assert result.scalars["parameters: policy (trained)"] == result.scalars["parameters: reference (frozen)"] > 0
    assert result.scalars["reference drift from the SFT policy"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_audit_passes_in_full_mode(seed):
    result = audit_once("grpo", "full", seed)
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error


def test_same_seed_gives_identical_result_and_quick_invariants_pass():
    a, b = audit_once("grpo", "toy", 3, QUICK), audit_once("grpo", "toy", 3, QUICK)
    assert a.deterministic_dict() == b.deterministic_dict()
    assert all(c.passed for c in a.checks if c.kind == "invariant"), [c.name for c in a.checks if not c.passed]


def test_a_check_alone_gives_the_numbers_of_the_whole_audit():
    whole = audit_once("grpo", "toy", 3, QUICK)
    alone = audit_once("grpo", "toy", 3, QUICK, only=["dapo_update_is_a_token_mean_over_groups_with_signal"])
    assert alone.checks[0].to_dict() == whole.check("dapo_update_is_a_token_mean_over_groups_with_signal").to_dict()


# ---------------------------------------------------------------------------------------------------
# Mutants


def advantages_with(*, population_std=False, batch_baseline=False, guard=True, eps=None, ignore_scale=False,
                    sign=1.0, interleaved=False):
    """A configurable wrong grpo_advantages (the reference when every option is left at its default)."""
    def fn(rewards, group_size, scale_rewards=True, eps_=1e-6):
        e = eps_ if eps is None else eps
        # interleaved: view(G, -1) read column-wise, so "groups" mix answers of different prompts
        r = rewards.view(group_size, -1).t() if interleaved else rewards.view(-1, group_size)
        if batch_baseline:
            mean, std = r.mean(), r.std()
        else:
            mean, std = r.mean(1, keepdim=True), r.std(1, unbiased=not population_std, keepdim=True)
        adv = r - mean
        if scale_rewards or ignore_scale:
            adv = adv / (std + e)
        if guard:
            constant = (r.max(1, keepdim=True).values - r.min(1, keepdim=True).values) <= 1e-6
            adv = torch.where(constant, torch.zeros_like(adv), adv)
        adv = sign * adv
        return adv.t().reshape(-1) if interleaved else adv.reshape(-1)
    return fn


def loss_with(*, clip=True, use_min=False, symmetric=False, kl_to_old=False, k3_sign=False, mode=None,
              multiply_mask=False, pad_counts=False):
    """A configurable wrong grpo_loss (the reference when every option is left at its default)."""
    def fn(logprobs, old_logprobs, ref_logprobs, advantages, response_mask, clip_eps_low=0.2, clip_eps_high=0.2,
           beta=0.04, loss_agg_mode="seq-mean-token-mean"):
        valid = response_mask.bool()
        agg = mode or loss_agg_mode
        ref = old_logprobs if kl_to_old else ref_logprobs
        if multiply_mask:
            lp, old = logprobs, old_logprobs
        else:
            zero = torch.zeros_like(logprobs)
            lp, old, ref = (torch.where(valid, x, zero) for x in (logprobs, old_logprobs, ref))
        ratio = torch.exp(lp - old)
        hi = clip_eps_low if symmetric else clip_eps_high
        clipped = torch.clamp(ratio, 1 - clip_eps_low, 1 + hi) if clip else ratio
        A = advantages[:, None]
        pg = (torch.minimum if use_min else torch.maximum)(-A * ratio, -A * clipped)
        x = (lp - ref) if k3_sign else (ref - lp)
        per_token = pg + beta * (torch.exp(x) - x - 1)
        per_token = per_token * response_mask if multiply_mask else torch.where(valid, per_token,
                                                                                 torch.zeros_like(per_token))
        m = response_mask
        if agg == "token-mean":
            loss = per_token.sum() / m.sum()
        elif agg == "seq-mean-token-mean":
            lengths = torch.full_like(m.sum(-1), m.shape[1]) if pad_counts else m.sum(-1)
            loss = (per_token.sum(-1) / lengths).mean()
        elif agg == "seq-mean-token-sum":
            loss = per_token.sum(-1).mean()
        else:
            loss = per_token.sum() / m.shape[1]
        return loss, per_token
    return fn


def reference_as_old_policy(original):
    def rollout(policy, reference, problems, cfg, generator, reward_fn=None):
        ro = original(policy, reference, problems, cfg, generator, reward_fn)
        return ro._replace(old_logprobs=ro.ref_logprobs)  # pi_old taken from the frozen reference
    return rollout


def keep_everything(rewards, group_size):
    return torch.ones(len(rewards), dtype=torch.bool)


ADV, LOSS = "grpo_advantages", "grpo_loss"
SHORT = {"warmup_steps": "40"}  # the probe's invariants hold for any policy: a short warm-up is enough
PROBE = "advantages_sum_to_zero_within_each_group"
MUTANTS = [
    Mutant("advantages_match_reference_vectors", "population std", {ADV: advantages_with(population_std=True)}),
    Mutant("advantages_match_reference_vectors", "Dr. GRPO flag ignored", {ADV: advantages_with(ignore_scale=True)}),
    Mutant(PROBE, "groups interleaved", {ADV: advantages_with(interleaved=True)}, SHORT),
    Mutant(PROBE, "batch baseline", {ADV: advantages_with(batch_baseline=True)}, SHORT),
    Mutant("all_equal_groups_get_zero_advantage", "no max-min guard", {ADV: advantages_with(guard=False)}, SHORT),
    Mutant("all_equal_groups_get_zero_advantage", "no guard, eps 0", {ADV: advantages_with(guard=False, eps=0.0)},
           SHORT),
    Mutant("std_advantages_invariant_to_affine_rewards", "Dr. GRPO flag ignored",
           {ADV: advantages_with(ignore_scale=True)}, SHORT),
    Mutant("std_advantages_invariant_to_affine_rewards", "eps 1e-2", {ADV: advantages_with(eps=1e-2)}, SHORT),
    Mutant("raw_rewards_differ_by_difficulty", "demonstrator better on carries",
           overrides={"demo_correct_easy": "0.2", "demo_correct_hard": "0.5"}),
    Mutant("group_advantages_equalise_difficulty", "batch baseline", {ADV: advantages_with(batch_baseline=True)},
           SHORT),
    Mutant("dapo_drops_exactly_the_all_equal_groups", "keeps every group", overrides=SHORT,
           patch=patched(M, "dynamic_sampling_keep", keep_everything)),
    Mutant("dapo_update_is_a_token_mean_over_groups_with_signal", "keeps every group", overrides=SHORT,
           patch=patched(M, "dynamic_sampling_keep", keep_everything)),
    Mutant("dapo_update_is_a_token_mean_over_groups_with_signal", "aggregation ignored",
           {LOSS: loss_with(mode="seq-mean-token-mean")}, SHORT),
    Mutant("clipped_surrogate_matches_table_and_zeroes_clipped_gradients", "no clip", {LOSS: loss_with(clip=False)}),
    Mutant("clipped_surrogate_matches_table_and_zeroes_clipped_gradients", "min, not max",
           {LOSS: loss_with(use_min=True)}),
    Mutant("clipped_surrogate_matches_table_and_zeroes_clipped_gradients", "eps_high ignored",
           {LOSS: loss_with(symmetric=True)}),
    Mutant("kl_term_is_k3_to_the_reference", "KL to pi_old", {LOSS: loss_with(kl_to_old=True)}),
    Mutant("kl_term_is_k3_to_the_reference", "k3 of lp - ref", {LOSS: loss_with(k3_sign=True)}),
    Mutant("length_bias_vector_reproduced", "always token-mean", {LOSS: loss_with(mode="token-mean")}),
    Mutant("length_bias_vector_reproduced", "padding counted in |o_i|", {LOSS: loss_with(pad_counts=True)}),
    Mutant("padding_never_changes_loss_or_gradient", "NaN times mask", {LOSS: loss_with(multiply_mask=True)}),
    Mutant("ratio_is_one_on_first_update_after_each_rollout", "pi_old = pi_ref",
           patch=lambda: mock.patch.object(M, "rollout", reference_as_old_policy(M.rollout))),
    Mutant("accuracy_rises_from_sft_level_to_bar", "advantages flipped", {ADV: advantages_with(sign=-1.0)}),
    Mutant("accuracy_rises_from_sft_level_to_bar", "untrained policy (lr 0)", overrides={"lr": "0"}),
    Mutant("kl_to_reference_stays_bounded", "untrained policy (lr 0)", overrides={"lr": "0"}),
    Mutant("kl_to_reference_stays_bounded", "learning rate x10", overrides={"lr": "0.02"}),
]


def test_reference_options_reproduce_the_references():
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(32, generator=g) < 0.4).float()
    for scale in (True, False):
        assert torch.allclose(advantages_with()(rewards, 8, scale), M.grpo_advantages(rewards, 8, scale), atol=1e-6)
    lp = -2 * torch.rand(6, 4, generator=g, dtype=DT)
    mask = (torch.arange(4)[None] < torch.tensor([1, 2, 3, 4, 4, 2])[:, None]).to(DT)
    args = (lp, lp + 0.3 * torch.randn(6, 4, generator=g, dtype=DT), lp - 0.2, torch.randn(6, generator=g, dtype=DT),
            mask, 0.2, 0.28, 0.04)
    for mode in MODES:
        assert torch.allclose(loss_with()(*args, mode)[0], M.grpo_loss(*args, mode)[0], atol=1e-12)


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("grpo", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("grpo", MUTANTS)
