"""dpo module: the DPO-family kernels (unit + property tests against slow scalar formulas), KTO, the
task and the log-prob/KL helpers, the audit in toy/full mode, determinism, and one mutant per check."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.dpo import dpo as M

DT = torch.float64
FAST = settings(max_examples=40, deadline=None)
LN2 = math.log(2.0)

logp = st.floats(-60.0, 0.0, allow_nan=False)
betas = st.sampled_from([0.01, 0.1, 0.5, 2.0])


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=DT)


def slow_sigmoid_loss(pc: float, pr: float, rc: float, rr: float, beta: float, eps: float) -> float:
    h = (pc - rc) - (pr - rr)
    softplus = lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x)))  # log(1 + e^x)  # noqa: E731
    return (1 - eps) * softplus(-beta * h) + eps * softplus(beta * h)


# ---------------------------------------------------------------------------------------------------
# dpo_loss


def test_dpo_loss_reference_vector_beta_0_1():
    losses, cr, rr = M.dpo_loss(t(2.0), t(-1.0), t(0.0), t(0.0), 0.1)
    assert losses.item() == pytest.approx(0.5543552, abs=1e-7)
    assert (cr.item(), rr.item()) == pytest.approx((0.2, -0.1), abs=1e-12)
    cdpo, _, _ = M.dpo_loss(t(2.0), t(-1.0), t(0.0), t(0.0), 0.1, label_smoothing=0.1)
    assert cdpo.item() == pytest.approx(0.5843552, abs=1e-7)
    ipo, _, _ = M.dpo_loss(t(2.0), t(-1.0), t(0.0), t(0.0), 0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx(4.0, abs=1e-12)
    ipo_len, _, _ = M.dpo_loss(t(2.0 / 4), t(-1.0 / 2), t(0.0), t(0.0), 0.1, loss_type="ipo")
    assert ipo_len.item() == pytest.approx(16.0, abs=1e-12)


def test_dpo_loss_returns_per_pair_losses_and_rejects_unknown_type():
    losses, cr, rr = M.dpo_loss(torch.zeros(5, dtype=DT), torch.zeros(5, dtype=DT), torch.zeros(5, dtype=DT),
                                torch.zeros(5, dtype=DT), 0.1)
    assert losses.shape == cr.shape == rr.shape == (5,)
    with pytest.raises(ValueError, match="loss_type"):
        M.dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), 0.1, loss_type="hinge")


@FAST
@given(pc=logp, pr=logp, rc=logp, rr=logp, beta=betas, eps=st.sampled_from([0.0, 0.1, 0.25, 0.49]))
def test_sigmoid_and_cdpo_match_slow_scalar_formula(pc, pr, rc, rr, beta, eps):
    losses, cr, rrw = M.dpo_loss(t(pc), t(pr), t(rc), t(rr), beta, label_smoothing=eps)
    assert losses.item() == pytest.approx(slow_sigmoid_loss(pc, pr, rc, rr, beta, eps), rel=1e-9, abs=1e-12)
    assert cr.item() == pytest.approx(beta * (pc - rc), abs=1e-9)
    assert rrw.item() == pytest.approx(beta * (pr - rr), abs=1e-9)


@FAST
@given(pc=logp, pr=logp, beta=betas, eps=st.sampled_from([0.0, 0.1, 0.3]))
def test_loss_is_ln2_and_rewards_zero_when_policy_is_reference(pc, pr, beta, eps):
    losses, cr, rr = M.dpo_loss(t(pc), t(pr), t(pc), t(pr), beta, label_smoothing=eps)
    assert losses.item() == pytest.approx(LN2, abs=1e-12)
    assert cr.item() == 0.0 and rr.item() == 0.0


@FAST
@given(pc=logp, pr=logp, rc=logp, rr=logp, k=st.floats(-10, 10), beta=betas)
def test_loss_depends_only_on_h_and_swap_costs_beta_h(pc, pr, rc, rr, k, beta):
    base, _, _ = M.dpo_loss(t(pc), t(pr), t(rc), t(rr), beta)
    shifted, _, _ = M.dpo_loss(t(pc + k), t(pr), t(rc + k), t(rr), beta)  # same chosen log-ratio
    swapped, _, _ = M.dpo_loss(t(pr), t(pc), t(rr), t(rc), beta)
    h = (pc - rc) - (pr - rr)
    assert shifted.item() == pytest.approx(base.item(), rel=1e-9, abs=1e-9)
    assert (base - swapped).item() == pytest.approx(-beta * h, rel=1e-9, abs=1e-9)


@FAST
@given(seed=st.integers(0, 10_000), beta=betas, eps=st.sampled_from([0.0, 0.2]))
def test_gradient_is_beta_times_sigmoid_of_reward_gap(seed, beta, eps):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-30 * torch.rand(8, generator=g, dtype=DT) for _ in range(4))
    pc.requires_grad_(True), pr.requires_grad_(True)
    losses, cr, rrw = M.dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    grad_c, grad_r = torch.autograd.grad(losses.sum(), (pc, pr))
    gap = rrw - cr  # r_hat_rejected - r_hat_chosen
    expected = beta * ((1 - eps) * torch.sigmoid(gap) - eps * torch.sigmoid(-gap))
    torch.testing.assert_close(-grad_c, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_r, expected, atol=1e-12, rtol=0)
    assert not cr.requires_grad and not rrw.requires_grad


def test_sigmoid_loss_is_finite_for_huge_margins():
    losses, _, _ = M.dpo_loss(t(0.0, -5000.0), t(-5000.0, 0.0), t(-50.0, -50.0), t(-50.0, -50.0), 0.5)
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-12)
    assert losses[1].item() == pytest.approx(2500.0, rel=1e-12)


@FAST
@given(h=st.floats(-50, 50), beta=betas)
def test_ipo_is_a_parabola_with_minimum_at_one_over_two_beta(h, beta):
    loss, _, _ = M.dpo_loss(t(h), t(0.0), t(0.0), t(0.0), beta, loss_type="ipo")
    assert loss.item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12, abs=1e-12)
    at_min, _, _ = M.dpo_loss(t(1 / (2 * beta)), t(0.0), t(0.0), t(0.0), beta, loss_type="ipo")
    assert at_min.item() <= loss.item() + 1e-12


@FAST
@given(chosen=st.floats(-20, 20), rejected=st.floats(-20, 20), beta=betas)
def test_plain_helper_agrees_with_the_kernel(chosen, rejected, beta):
    loss, _, _ = M.dpo_loss(t(chosen), t(rejected), t(0.0), t(0.0), beta)
    assert M.dpo_loss_from_logratios(chosen, rejected, beta) == pytest.approx(loss.item(), rel=1e-12, abs=1e-14)


def test_plain_helper_vector_and_extremes():
    assert M.dpo_loss_from_logratios(2.0, -1.0, 0.1) == pytest.approx(0.5543552, abs=1e-7)
    assert M.dpo_loss_from_logratios(1.5, 1.5, 0.5) == pytest.approx(LN2, abs=1e-15)
    assert M.dpo_loss_from_logratios(-1e4, 1e4, 1.0) == pytest.approx(2e4)  # no overflow
    assert M.dpo_loss_from_logratios(1e4, -1e4, 1.0) == pytest.approx(0.0, abs=1e-300)


# ---------------------------------------------------------------------------------------------------
# KTO and preference accuracy


def test_kto_reference_vectors():
    z = t(0.0)
    at_ref, _, _, kl = M.kto_loss(z, z, z, z, t(0.0, 0.0), t(0.0, 0.0), 0.1)
    torch.testing.assert_close(at_ref, t(0.5, 0.5), atol=1e-12, rtol=0)
    half, cr, rr, kl = M.kto_loss(t(2.0), t(-1.0), z, z, t(0.5), z, 0.1)
    torch.testing.assert_close(half, t(0.4625702, 0.4625702), atol=1e-7, rtol=0)
    assert kl.item() == 0.5 and cr.item() == pytest.approx(0.2) and rr.item() == pytest.approx(-0.1)
    clamped, _, _, kl = M.kto_loss(t(2.0), t(-1.0), z, z, t(-3.0), z, 0.1)
    torch.testing.assert_close(clamped, t(0.4501660, 0.4750208), atol=1e-7, rtol=0)
    assert kl.item() == 0.0


def test_kto_weights_scale_each_side_and_kl_has_no_gradient():
    pc = t(1.0, 2.0).requires_grad_(True)
    kl_logps = t(0.3, 0.6).requires_grad_(True)
    base, _, _, _ = M.kto_loss(pc, t(-1.0), t(0.0, 0.0), t(0.0), kl_logps, t(0.0, 0.0), 0.1)
    weighted, _, _, _ = M.kto_loss(pc, t(-1.0), t(0.0, 0.0), t(0.0), kl_logps, t(0.0, 0.0), 0.1,
                                   desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(weighted, base * t(2.0, 2.0, 0.5), atol=1e-12, rtol=0)
    grad = torch.autograd.grad(weighted.sum(), kl_logps, allow_unused=True)[0]
    assert grad is None or grad.abs().max().item() == 0.0


@pytest.mark.parametrize("n", range(2, 40))
def test_mismatched_indices_never_keep_a_prompts_own_completion(n):
    idx = M.mismatched_indices(n)
    assert (idx != torch.arange(n)).all()
    assert sorted(idx.tolist()) == list(range(n))  # a permutation: every completion used once


def test_mismatched_indices_needs_two():
    with pytest.raises(ValueError):
        M.mismatched_indices(1)


def test_preference_accuracy_counts_ties_half():
    assert M.preference_accuracy(t(1.0, 0.0, 2.0, 0.0), t(0.0, 1.0, 2.0, 0.0)) == pytest.approx(0.5)
    assert M.preference_accuracy(t(1.0, 3.0), t(0.0, 1.0)) == 1.0


# ---------------------------------------------------------------------------------------------------
# Task, log-probs, KL


CFG = M.DPOConfig(n_digits=3, response_len=3, d_model=16, n_heads=2, n_kv_heads=1, d_ff=24)


def small_model(seed: int, std: float = 0.5) -> M.Transformer:
    torch.manual_seed(seed)
    return M.Transformer(dataclasses.replace(M.model_config(CFG), init_std=std)).double()


def test_gold_reward_counts_the_target_digit():
    cfg = M.DPOConfig()
    tokens = torch.tensor([[10, 3, 11, 3, 1, 3, 3, 0, 9, 3, 2], [10, 0, 11, 1, 1, 1, 1, 1, 1, 1, 1]])
    assert M.gold_reward(tokens, cfg).tolist() == [4.0, 0.0]


def test_warm_up_batch_masks_the_prompt_and_favours_the_target():
    cfg = M.DPOConfig()
    inputs, targets = M.warm_up_batch(cfg, 4000, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (4000, 2 + cfg.response_len)
    assert (targets[:, :2] == M.IGNORE_INDEX).all() and (targets[:, 2:] >= 0).all()
    share = (targets[:, 2:] == inputs[:, 1:2]).float().mean().item()
    assert abs(share - cfg.warmup_target_prob) < 0.01


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequence_logps_equals_product_of_next_token_probabilities(seed):
    model = small_model(seed)
    g = torch.Generator().manual_seed(seed)
    responses = torch.randint(0, CFG.n_digits, (6, CFG.response_len), generator=g)
    tokens = torch.cat([M.make_prompts(CFG, 6, g), responses], 1)
    got = M.sequence_logps(model, tokens, 3)
    for i in range(tokens.shape[0]):
        slow = 0.0
        for pos in range(3, tokens.shape[1]):
            logits = model(tokens[i:i + 1, :pos])[0, -1]
            slow += F.log_softmax(logits, -1)[tokens[i, pos]].item()
        assert got[i].item() == pytest.approx(slow, abs=1e-10)


def test_sequence_logps_of_every_continuation_sum_to_one():
    model = small_model(3)
    V = M.model_config(CFG).vocab_size  # specials included: the model puts some mass on them too
    responses = torch.tensor(list(itertools.product(range(V), repeat=CFG.response_len)))
    prompt = torch.tensor([[3, 2, 4]]).expand(responses.shape[0], 3)
    logps = M.sequence_logps(model, torch.cat([prompt, responses], 1), 3)
    assert logps.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_sequence_kl_is_zero_for_the_same_model_and_equals_exact_kl_by_chain_rule():
    policy, reference = small_model(4), small_model(5)
    tokens = torch.cat([torch.tensor([[3, 1, 4]]), torch.tensor([[0, 2, 1]])], 1)
    assert M.sequence_kl(policy, policy, tokens, 3).item() == 0.0
    # exact KL over every continuation of the full vocabulary (specials included) equals the
    # expectation of the per-step KL sum: sum_y p(y) log p(y)/q(y) = E_p[sum_t KL_t]
    V = M.model_config(CFG).vocab_size
    ys = torch.tensor(list(itertools.product(range(V), repeat=CFG.response_len)))
    seqs = torch.cat([torch.tensor([[3, 1, 4]]).expand(ys.shape[0], 3), ys], 1)
    lp, lq = M.sequence_logps(policy, seqs, 3), M.sequence_logps(reference, seqs, 3)
    exact = (lp.exp() * (lp - lq)).sum().item()
    per_step = (lp.exp() * M.sequence_kl(policy, reference, seqs, 3)).sum().item()
    # E_p[sum_t KL_t] over full sequences: each KL_t depends on the prefix only, so weighting by p(y) works
    assert exact > 0 and per_step == pytest.approx(exact, rel=1e-9)


def test_preference_pairs_are_strict_and_cache_reference_logps():
    cfg = M.DPOConfig()
    torch.manual_seed(0)
    reference, _ = M.warm_up_reference(cfg, torch.Generator().manual_seed(0))
    pairs = M.build_preference_pairs(reference, cfg, 128, torch.Generator().manual_seed(1))
    assert 0 < len(pairs) <= 128
    assert (pairs.gold_chosen > pairs.gold_rejected).all()
    assert (pairs.chosen[:, :3] == pairs.rejected[:, :3]).all()  # same prompt
    specials = (torch.cat([pairs.chosen, pairs.rejected])[:, 3:] >= cfg.n_digits).float().mean().item()
    assert specials < 0.01  # the warmed-up reference answers in digits
    torch.testing.assert_close(pairs.ref_chosen_logps, M.sequence_logps(reference, pairs.chosen, 3))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        M.DPOConfig(loss_type="hinge")
    with pytest.raises(ValueError):
        M.DPOConfig(label_smoothing=0.5)
    with pytest.raises(ValueError):
        M.DPOConfig(beta=0.0)


def test_digit_policy_puts_no_mass_outside_the_digits():
    cfg = M.DPOConfig()
    torch.manual_seed(0)
    model = M.make_policy_model(cfg)
    tokens = M.make_prompts(cfg, 4, torch.Generator().manual_seed(0))
    probs = model(tokens).softmax(-1)
    assert probs[..., cfg.n_digits:].max().item() == 0.0
    samples = M.sample_responses(model, tokens, cfg, torch.Generator().manual_seed(1))
    assert (samples[:, 3:] < cfg.n_digits).all()
    plain = M.make_policy_model(dataclasses.replace(cfg, digits_only=False))
    assert type(plain) is M.Transformer


def test_collapse_kl_is_minus_log_prob_of_the_all_target_answer():
    cfg = M.DPOConfig(response_len=3)
    torch.manual_seed(0)
    reference = M.make_policy_model(cfg)
    seq = torch.tensor([[10, 4, 11, 4, 4, 4]])
    one = -M.sequence_logps(reference, seq, 3).item()
    assert one > 0
    all_kl = M.collapse_kl(reference, cfg)
    digits = torch.arange(10)[:, None]
    seqs = torch.cat([torch.full((10, 1), 10), digits, torch.full((10, 1), 11), digits.expand(10, 3)], 1)
    assert all_kl == pytest.approx(-M.sequence_logps(reference, seqs, 3).mean().item(), abs=1e-12)


def test_run_uses_the_kernel_it_is_given_and_starts_at_the_reference():
    cfg = M.DPOConfig(warmup_steps=5, n_train_prompts=128, n_eval_prompts=64, steps=3, eval_every=2,
                      n_policy_samples=32, batch_size=16)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("loss_type", "sigmoid"))
        return M.dpo_loss(*args, **kwargs)

    torch.manual_seed(0)
    result = M.run(cfg, torch.Generator().manual_seed(0), dpo_loss=spy)
    assert len(result.history) == 3 and [e.step for e in result.evals] == [0, 2, 3]
    assert len(calls) == 3 + 3  # one per step, one per evaluation
    assert result.evals[0].kl == 0.0 and result.evals[0].heldout_accuracy == 0.5
    assert result.collapse_kl > 0


# ---------------------------------------------------------------------------------------------------
# The audit


@pytest.fixture(scope="module")
def toy_result():
    return audit_once("dpo", "toy", 0)


def test_audit_passes_in_toy_mode(toy_result):
    result = toy_result
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "objective/kl"} <= set(result.series)
    assert {c.kind for c in result.checks} == {"invariant", "outcome"}


@pytest.mark.slow
def test_audit_passes_in_full_mode():
    result = audit_once("dpo", "full", 1)
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error


def test_same_seed_gives_identical_result(toy_result):
    assert audit_once("dpo", "toy", 0).deterministic_dict() == toy_result.deterministic_dict()


def test_full_bars_are_at_least_as_strict_as_toy():
    toy, full = M.DPOConfig.toy(), M.DPOConfig.full()
    assert full.min_margin >= toy.min_margin and full.min_accuracy >= toy.min_accuracy
    assert full.min_gold_gain >= toy.min_gold_gain and full.max_kl_fraction <= toy.max_kl_fraction


# ---------------------------------------------------------------------------------------------------
# Mutants: each check must fail for a plausible bug, on every seed


def without_reference(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0):
    h = pc - pr
    return -F.logsigmoid(beta * h), beta * pc.detach(), beta * pr.detach()


def smoothing_on_one_side(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0):
    losses, cr, rr_ = M.dpo_loss(pc, pr, rc, rr, beta, loss_type)
    return losses * (1 - label_smoothing), cr, rr_


def beta_outside(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0):
    h = (pc - rc) - (pr - rr)
    return -F.logsigmoid(h), beta * (pc - rc).detach(), beta * (pr - rr).detach()


def log_of_sigmoid(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0):
    h = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * torch.log(torch.sigmoid(beta * h)) \
        - label_smoothing * torch.log(torch.sigmoid(-beta * h))
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def not_detached(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0):
    losses, _, _ = M.dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing)
    return losses, beta * (pc - rc), beta * (pr - rr)


def ipo_scaled_wrong(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0):
    if loss_type == "ipo":
        h = (pc - rc) - (pr - rr)
        return (beta * h - 0.5) ** 2, beta * (pc - rc).detach(), beta * (pr - rr).detach()
    return M.dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing)


def flipped(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0):
    losses, _, _ = M.dpo_loss(pr, pc, rr, rc, beta, loss_type, label_smoothing)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def rewards_swapped(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0):
    losses, cr, rr_ = M.dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing)
    return losses, rr_, cr


ORIGINAL_SEQUENCE_LOGPS = M.sequence_logps


def logps_with_the_separator(model, tokens, n_prompt):
    return ORIGINAL_SEQUENCE_LOGPS(model, tokens, n_prompt - 1)


def kto_unclamped(pc, pr, rc, rr, kl_p, kl_r, beta, desirable_weight=1.0, undesirable_weight=1.0):
    kl = (kl_p - kl_r).mean().detach()
    chosen, rejected = 1 - torch.sigmoid(beta * (pc - rc - kl)), 1 - torch.sigmoid(beta * (kl - (pr - rr)))
    return torch.cat([chosen, rejected]), beta * (pc - rc).detach(), beta * (pr - rr).detach(), kl


def kto_kl_with_gradient(pc, pr, rc, rr, kl_p, kl_r, beta, desirable_weight=1.0, undesirable_weight=1.0):
    kl = (kl_p - kl_r).mean().clamp(min=0)  # not detached
    chosen, rejected = 1 - torch.sigmoid(beta * (pc - rc - kl)), 1 - torch.sigmoid(beta * (kl - (pr - rr)))
    return torch.cat([chosen, rejected]), beta * (pc - rc).detach(), beta * (pr - rr).detach(), kl.detach()


def policy_not_copied(reference):
    """The policy loaded from another checkpoint (here: the reference with its weights perturbed)."""
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy


MUTANTS = [
    Mutant("sequence_logps_sum_response_tokens_only", "the separator counted",
           patch=lambda: mock.patch.object(M, "sequence_logps", logps_with_the_separator)),
    Mutant("loss_is_ln2_and_rewards_zero_at_reference", "no reference", {"dpo_loss": without_reference}),
    Mutant("loss_is_ln2_and_rewards_zero_at_reference", "policy not a copy of the reference",
           patch=lambda: mock.patch.object(M, "policy_from_reference", policy_not_copied)),
    Mutant("dpo_and_cdpo_match_reference_vectors", "smoothing on one side", {"dpo_loss": smoothing_on_one_side}),
    Mutant("loss_is_finite_for_confident_pairs", "log of sigmoid", {"dpo_loss": log_of_sigmoid}),
    Mutant("gradient_weight_is_sigmoid_of_reward_gap", "beta outside the sigmoid", {"dpo_loss": beta_outside}),
    Mutant("implicit_rewards_are_detached", "rewards with a graph", {"dpo_loss": not_detached}),
    Mutant("ipo_matches_reference_vectors", "IPO in reward units", {"dpo_loss": ipo_scaled_wrong}),
    Mutant("kto_matches_reference_vectors", "KL baseline not clamped",
           patch=lambda: mock.patch.object(M, "kto_loss", kto_unclamped)),
    Mutant("kto_kl_baseline_is_detached_and_mismatched", "batch reversed",
           patch=lambda: mock.patch.object(M, "mismatched_indices", lambda n: torch.arange(n).flip(0))),
    Mutant("kto_kl_baseline_is_detached_and_mismatched", "KL baseline with a gradient",
           patch=lambda: mock.patch.object(M, "kto_loss", kto_kl_with_gradient)),
    Mutant("chosen_logp_rises_relative_to_rejected", "preference flipped", {"dpo_loss": flipped}),
    Mutant("heldout_preference_accuracy_rises", "rewards swapped", {"dpo_loss": rewards_swapped}),
    Mutant("heldout_preference_accuracy_rises", "rewards without the reference", {"dpo_loss": without_reference}),
    Mutant("policy_gold_reward_improves", "preference flipped", {"dpo_loss": flipped}),
    Mutant("policy_gold_reward_improves", "one step", overrides={"steps": "1"}),
    Mutant("kl_to_reference_stays_below_collapse", "10x learning rate", overrides={"lr": "0.03"}),
    Mutant("kl_to_reference_stays_below_collapse", "3x the steps", overrides={"steps": "180"}),
    Mutant("kl_to_reference_stays_below_collapse", "policy not a copy of the reference",
           patch=lambda: mock.patch.object(M, "policy_from_reference", policy_not_copied)),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("dpo", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("dpo", MUTANTS)
