"""ppo module: core.py's kernels against rl-anchors vectors and hypothesis properties, the trainer's pieces,
the audit in toy/full mode, determinism, and one mutant per check."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_check_fails, audit_once
from llmaudit.runner import configure_torch
from modules import gae as G
from modules import reward_model as RM
from modules.ppo import core as C
from modules.ppo import ppo as M

configure_torch()

DT = torch.float64
FAST = settings(max_examples=40, deadline=None)
# a tiny run for mutants of the invariants: they do not depend on how well the loop learns
QUICK = {"sft_steps": "2", "rm_steps": "2", "iterations": "2", "rollout_batch": "16", "eval_prompts": "32",
         "hack": "false"}
NO_HACK = {"hack": "false"}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=DT)


def per_token_loss(adv: float, ratio: float, eps: float = 0.2, high: float | None = None) -> tuple[float, float]:
    loss, clipfrac, _ = C.ppo_clip_loss(t(math.log(ratio))[None], t(0.0)[None], t(adv)[None], t(1.0)[None], eps, high)
    return float(loss), float(clipfrac)


@st.composite
def masked_batches(draw, max_b: int = 5, max_t: int = 8):
    """(values, mask) with right-padded rows of random lengths, at least two valid tokens in all."""
    B, T = draw(st.integers(1, max_b)), draw(st.integers(2, max_t))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = max(int(lengths[0]), 2)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(DT)
    return 5 * torch.randn(B, T, generator=g, dtype=DT), mask


# ---------------------------------------------------------------------------------------------------
# section 0: masked statistics, whitening, entropy


def test_masked_whiten_reference_vectors():
    torch.testing.assert_close(C.masked_whiten(t(1, 2, 3, 4), torch.ones(4, dtype=DT)),
                               t(-1.161895, -0.387298, 0.387298, 1.161895), atol=1e-6, rtol=0)
    out = C.masked_whiten(t(1, 2, 3, 4), t(1, 1, 1, 0))
    torch.testing.assert_close(out[:3], t(-1.0, 0.0, 1.0), atol=1e-6, rtol=0)
    assert out[3] == 0.0  # ours zeroes padding (verl leaves 2 there)
    assert C.masked_whiten(t(3, 3, 3), torch.ones(3, dtype=DT)).abs().max() < 1e-4  # constant -> ~0


def test_masked_whiten_single_valid_token_is_only_centred():
    out = C.masked_whiten(t(5.0, 7.0), t(1.0, 0.0))
    assert torch.isfinite(out).all() and out.tolist() == [0.0, 0.0]


@FAST
@given(masked_batches(), st.sampled_from([float("nan"), 1e9, -1e9, 0.0]))
def test_masked_whiten_ignores_padding_content(batch, fill):
    values, mask = batch
    dirty = torch.where(mask.bool(), values, torch.full_like(values, fill))
    out, out_dirty = C.masked_whiten(values, mask), C.masked_whiten(dirty, mask)
    assert torch.equal(out, out_dirty)
    valid = out[mask.bool()]
    assert abs(valid.mean().item()) < 1e-9
    if mask.sum() >= 2:  # std = sqrt(var / (var + 1e-8)): 1 unless the variance is tiny
        var = values[mask.bool()].var().item()
        assert valid.std().item() == pytest.approx(math.sqrt(var / (var + 1e-8)), abs=1e-6)


@FAST
@given(masked_batches(), st.floats(-10, 10), st.floats(0.1, 10))
def test_masked_whiten_is_affine_invariant(batch, shift, scale):
    values, mask = batch
    if (scale * values[mask.bool()]).std() < 0.5:  # the + 1e-8 inside rsqrt matters for tiny variances
        return
    torch.testing.assert_close(C.masked_whiten(values * scale + shift, mask), C.masked_whiten(values, mask),
                               atol=1e-6, rtol=0)


def test_entropy_reference_vectors():
    assert C.entropy_from_logits(torch.zeros(4, dtype=DT)).item() == pytest.approx(math.log(4), abs=1e-7)
    assert C.entropy_from_logits(t(0.25, 0.75).log()).item() == pytest.approx(0.5623351, abs=1e-7)


# ---------------------------------------------------------------------------------------------------
# section 4: policy loss, aggregation, value loss, KL estimators, controllers


@pytest.mark.parametrize("adv, ratio, high, want, clipped", [
    (1, 1.5, None, -1.2, 1), (1, 0.5, None, -0.5, 0), (-1, 0.5, None, 0.8, 1), (-1, 1.5, None, 1.5, 0),
    (-1, 5.0, None, 5.0, 0), (1, 5.0, None, -1.2, 1), (2, 1.1, None, -2.2, 0), (1, 1.3, 0.28, -1.28, 1),
    (-1, 0.75, 0.28, 0.8, 1)])
def test_clip_table(adv, ratio, high, want, clipped):
    loss, clipfrac = per_token_loss(adv, ratio, 0.2, high)
    assert loss == pytest.approx(want, abs=1e-9) and clipfrac == clipped


def test_clipped_surrogate_matches_the_table_with_opposite_sign():
    assert C.clipped_surrogate(1.5, 1.0, 0.2) == pytest.approx(1.2)
    assert C.clipped_surrogate(0.5, -1.0, 0.2) == pytest.approx(-0.8)


@FAST
@given(st.floats(-5, 5), st.floats(0.05, 5.0), st.sampled_from([0.1, 0.2, 0.3]))
def test_clip_is_pessimistic_and_plain_helper_agrees(adv, ratio, eps):
    loss, _ = per_token_loss(adv, ratio, eps)
    assert loss >= -adv * ratio - 1e-9
    assert -C.clipped_surrogate(ratio, adv, eps) == pytest.approx(loss, rel=1e-9, abs=1e-9)


@FAST
@given(masked_batches())
def test_ratio_one_gives_minus_mean_advantage_and_no_clipping(batch):
    adv, mask = batch
    lp = torch.randn(adv.shape, dtype=DT).requires_grad_(True)
    loss, clipfrac, approxkl = C.ppo_clip_loss(lp, lp.detach(), adv, mask)
    assert loss.item() == pytest.approx(-C.masked_mean(adv, mask).item(), abs=1e-9)
    assert clipfrac.item() == 0.0 and approxkl.item() == 0.0
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, -adv * mask / mask.sum(), atol=1e-12, rtol=0)


@FAST
@given(masked_batches(), st.integers(1, 4))
def test_clip_loss_ignores_padding_and_extra_columns(batch, extra):
    adv, mask = batch
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(adv.shape, generator=g, dtype=DT)
    lp = old + 0.5 * torch.randn(adv.shape, generator=g, dtype=DT)
    base = C.ppo_clip_loss(lp, old, adv, mask)

    def pad(x, fill):
        return torch.cat([torch.where(mask.bool(), x, fill), torch.full((x.shape[0], extra), fill)], 1)

    padded = C.ppo_clip_loss(pad(lp, float("nan")), pad(old, 1e9), pad(adv, float("nan")),
                             torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=DT)], 1))
    for a, b in zip(base, padded):
        assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_agg_loss_vectors_and_empty_rows():
    L, m = t(1, 2, 3, 4, 0, 0).reshape(2, 3), t(1, 1, 1, 1, 0, 0).reshape(2, 3)
    want = {"token-mean": 2.5, "seq-mean-token-sum": 5.0, "seq-mean-token-mean": 3.0,
            "seq-mean-token-sum-norm": 10 / 3}
    L3, m3 = torch.cat([L, t(7, 7, 7)[None]]), torch.cat([m, torch.zeros(1, 3, dtype=DT)])
    for mode, value in want.items():
        assert C.agg_loss(L, m, mode).item() == pytest.approx(value, abs=1e-9)
        assert C.agg_loss(L3, m3, mode).item() == pytest.approx(value, abs=1e-9)  # empty rows count nowhere
    assert C.agg_loss(L, m, "seq-mean-token-sum-norm", norm_length=6).item() == pytest.approx(10 / 6)
    with pytest.raises(ValueError):
        C.agg_loss(L, m, "sum")


@FAST
@given(masked_batches(), st.sampled_from(C.AGG_MODES))
def test_agg_loss_never_reads_padding(batch, mode):
    L, mask = batch
    dirty = torch.where(mask.bool(), L, torch.full_like(L, float("nan")))
    assert C.agg_loss(dirty, mask, mode).item() == pytest.approx(C.agg_loss(L, mask, mode).item(), abs=1e-12)


def test_value_loss_vectors_and_bound():
    for vpred, ret, want in [(1.5, 2.0, 0.32), (1.1, 2.0, 0.405), (0.5, 2.0, 1.125), (1.5, 1.0, 0.125)]:
        loss, _ = C.value_loss(t(vpred), t(1.0), t(ret), t(1.0), 0.2)
        assert loss.item() == pytest.approx(want, abs=1e-9)
    g = torch.Generator().manual_seed(0)
    v, old, ret = (torch.randn(64, generator=g, dtype=DT) for _ in range(3))
    loss, _ = C.value_loss(v, old, ret, torch.ones(64, dtype=DT), 0.2)
    assert loss.item() >= 0.5 * ((v - ret) ** 2).mean().item() - 1e-12
    near = old + 0.1 * torch.tanh(v)  # within the clip: equals the plain MSE / 2
    loss_near, clipfrac = C.value_loss(near, old, ret, torch.ones(64, dtype=DT), 0.2)
    assert loss_near.item() == pytest.approx(0.5 * ((near - ret) ** 2).mean().item(), abs=1e-12)
    assert clipfrac.item() == 0.0


def test_kl_estimator_vectors_gradients_and_expectations():
    for (lp, ref), want in [((-1.0, -1.5), (0.5, 0.125, 0.1065307)), ((-1.5, -1.0), (-0.5, 0.125, 0.1487213))]:
        for k, w in zip(C.kl_estimators(t(lp), t(ref)), want):
            assert k.item() == pytest.approx(w, abs=1e-7)
    lp = t(-1.0).requires_grad_(True)
    grads = [torch.autograd.grad(k, lp, retain_graph=True)[0].item() for k in C.kl_estimators(lp, t(-1.5))]
    assert grads == pytest.approx([1.0, 0.5, 0.3934693], abs=1e-7)
    p, q = t(0.5, 0.5), t(0.9, 0.1)
    expect = [(p * k).sum().item() for k in C.kl_estimators(p.log(), q.log())]
    assert expect == pytest.approx([0.5108256, 0.7339459, 0.5108256], abs=1e-7)


@FAST
@given(st.floats(-30, 0), st.floats(-30, 0))
def test_kl_k2_k3_are_nonnegative_and_zero_only_at_equality(lp, ref):
    k1, k2, k3 = C.kl_estimators(t(lp), t(ref))
    assert k2.item() >= 0 and k3.item() >= 0
    if lp == ref:
        assert k1.item() == k2.item() == k3.item() == 0.0


@FAST
@given(st.integers(0, 10_000), st.integers(2, 8))
def test_k1_and_k3_are_unbiased_for_exact_kl(seed, V):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2 * torch.randn(V, generator=g, dtype=DT), 0)
    q = torch.softmax(2 * torch.randn(V, generator=g, dtype=DT), 0)
    exact = (p * (p / q).log()).sum().item()
    k1, _, k3 = C.kl_estimators(p.log(), q.log())
    assert (p * k1).sum().item() == pytest.approx(exact, abs=1e-10)
    assert (p * k3).sum().item() == pytest.approx(exact, abs=1e-10)


def test_kl_controllers():
    for kl, want in [(12.0, 0.201024), (0.0, 0.198976), (6.0, 0.2), (6.6, 0.200512), (600.0, 0.201024)]:
        ctl = C.AdaptiveKLController(0.2, 6.0, 10000)
        ctl.update(kl, n_steps=256)
        assert ctl.value == pytest.approx(want, abs=1e-9)
    fixed = C.FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


# ---------------------------------------------------------------------------------------------------
# KL-penalised rewards and response GAE


@FAST
@given(masked_batches(), st.floats(0.0, 1.0))
def test_kl_penalized_rewards_row_sums_and_score_position(batch, beta):
    scores_src, mask = batch
    mask[:, 0] = 1.0  # every response has a token
    g = torch.Generator().manual_seed(0)
    lp, ref = -torch.rand(mask.shape, generator=g, dtype=DT), -torch.rand(mask.shape, generator=g, dtype=DT)
    scores = scores_src[:, 0]
    rewards = C.kl_penalized_rewards(lp, ref, scores, mask, beta)
    k1 = (lp - ref) * mask
    torch.testing.assert_close(rewards.sum(1), scores - beta * k1.sum(1), atol=1e-12, rtol=0)
    last = mask.sum(1).long() - 1
    rows = torch.arange(mask.shape[0])
    torch.testing.assert_close(rewards[rows, last] + beta * k1[rows, last], scores, atol=1e-12, rtol=0)
    assert (rewards[~mask.bool()] == 0).all()


def test_response_gae_matches_gae_vectors_and_ignores_padding():
    r, v = t(0, 0, 1)[None], t(0.5, 0.6, 0.7)[None]
    for gamma, lam, want in [(1.0, 1.0, [0.5, 0.4, 0.3]), (0.9, 0.0, [0.04, 0.03, 0.3]),
                             (0.9, 0.95, [0.2849575, 0.2865, 0.3])]:
        adv, ret = C.response_gae(r, v, torch.ones(1, 3, dtype=DT), gamma, lam)
        torch.testing.assert_close(adv[0], t(*want), atol=1e-7, rtol=0)
        torch.testing.assert_close(ret - v, adv, atol=1e-12, rtol=0)
    adv, _ = C.response_gae(r, v, torch.ones(1, 3, dtype=DT), 0.9, 0.95)
    torch.testing.assert_close(C.masked_whiten(adv, torch.ones(1, 3, dtype=DT))[0],
                               t(-0.6679851, -0.4816057, 1.1495912), atol=1e-6, rtol=0)
    # the same response followed by padding holding garbage: identical on the valid tokens, 0 after
    r_pad, v_pad = torch.cat([r, t(5.0, 5.0)[None]], 1), torch.cat([v, t(99.0, -99.0)[None]], 1)
    adv_pad, ret_pad = C.response_gae(r_pad, v_pad, t(1, 1, 1, 0, 0)[None], 0.9, 0.95)
    torch.testing.assert_close(adv_pad[:, :3], adv, atol=1e-12, rtol=0)
    assert adv_pad[0, 3:].abs().max() == 0 and ret_pad[0, 3:].abs().max() == 0


@FAST
@given(masked_batches(), st.floats(0.5, 1.0), st.floats(0.0, 1.0))
def test_response_gae_equals_modules_gae_row_by_row(batch, gamma, lam):
    rewards, mask = batch
    mask[:, 0] = 1.0
    values = torch.randn(rewards.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    adv, _ = C.response_gae(rewards, values, mask, gamma, lam)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        col = lambda x: x[b, :n, None]  # noqa: E731  (T, 1): one episode ending at the last valid token
        nxt = torch.cat([values[b, 1:n], t(0.0)])[:, None]
        term = torch.zeros(n, 1, dtype=DT)
        term[-1] = 1
        want, _ = G.compute_gae(col(rewards), col(values), nxt, term, torch.zeros_like(term), gamma, lam)
        torch.testing.assert_close(adv[b, :n], want[:, 0], atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------------
# The trainer's pieces


def test_decoy_and_biased_utility():
    cfg = M.PPOConfig.toy()
    bos, sep, eos, pad = M.special_ids(cfg)
    tokens = torch.tensor([[bos, 2, sep, 2, 3, 3, 1, eos, pad], [bos, 5, sep, 0, 0, 5, eos, pad, pad]])
    assert M.decoy_digit(tokens[:, 1], cfg.n_symbols).tolist() == [3, 0]
    assert RM.gold_reward(tokens).tolist() == [1.0, 1.0]
    assert M.biased_utility(tokens, cfg.n_symbols, 3.0).tolist() == [7.0, 7.0]


def test_biased_pairs_follow_the_annotator_not_gold():
    cfg = M.PPOConfig.toy()
    pairs = M.biased_preference_pairs(cfg, 256, torch.Generator().manual_seed(0))
    u_c = M.biased_utility(pairs.chosen, cfg.n_symbols, cfg.decoy_bonus)
    u_r = M.biased_utility(pairs.rejected, cfg.n_symbols, cfg.decoy_bonus)
    assert 200 <= len(pairs.chosen) <= 256 and (u_c > u_r).all()
    assert (pairs.chosen_gold < pairs.rejected_gold).any()  # the annotator disagrees with gold on some pairs
    assert (pairs.chosen[:, 1] == pairs.rejected[:, 1]).all()  # same prompt


def test_actor_and_reference_are_separate_and_the_reference_is_frozen():
    cfg = M.PPOConfig.toy()
    torch.manual_seed(0)
    sft = M.Transformer(RM.model_config(M.task_config(cfg)))
    actor, reference = M.actor_and_reference(sft)
    assert actor is not reference and actor is not sft
    assert all(p.requires_grad for p in actor.parameters())
    assert not any(p.requires_grad for p in reference.parameters())
    critic = M.new_critic(sft)
    assert critic(torch.zeros(2, 4, dtype=torch.long)).abs().max() == 0  # zero-initialised value head


def test_rollout_scores_with_the_same_log_probs_and_exact_kl_is_zero_at_the_reference():
    cfg = M.PPOConfig.toy()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sft = M.Transformer(RM.model_config(M.task_config(cfg)))
    actor, reference = M.actor_and_reference(sft)
    bos, sep, eos, pad = M.special_ids(cfg)
    prompts = M.make_prompts(cfg, 32, g)
    ro = M.collect_rollout(actor, reference, M.new_critic(sft), lambda x: RM.gold_reward(x), prompts,
                           cfg.max_len + 1, eos, pad, g)
    assert ro.tokens.shape == (32, 3 + cfg.max_len + 1) and ro.mask.shape == (32, cfg.max_len + 1)
    assert torch.equal(ro.old_logprobs, ro.ref_logprobs)  # actor == reference before training
    lengths = ro.mask.sum(1)
    assert lengths.min() < lengths.max()  # an untrained model stops at random lengths: masks matter
    assert torch.equal(ro.mask, (torch.arange(ro.mask.shape[1])[None] < lengths[:, None]).float())
    kl = M.token_kl_exact(actor, reference, ro.tokens, ro.mask, 3)
    assert kl.abs().max() == 0


def test_train_ppo_logs_trl_metrics_and_keeps_ratio_one():
    cfg = M.PPOConfig(sft_steps=2, rm_steps=2, iterations=2, rollout_batch=16, hack=False)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sft = M.sft_policy(cfg, g)
    actor, reference = M.actor_and_reference(sft)
    bos, sep, eos, pad = M.special_ids(cfg)
    _, history = M.train_ppo(actor, reference, M.new_critic(sft), lambda x: RM.gold_reward(x),
                             lambda n, gg: M.make_prompts(cfg, n, gg), cfg, g, eos_id=eos, pad_id=pad,
                             gold_fn=RM.gold_reward)
    assert len(history) == 2
    for key in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/scores",
                "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio",
                "objective/scores_std", "objective/gold_reward"):
        assert all(math.isfinite(h[key]) for h in history), key
    assert history[0]["objective/kl"] == 0.0  # the first rollout comes from the reference itself
    assert all(h["first_ratio_dev"] == 0.0 and h["first_clipfrac"] == 0.0 for h in history)


def test_entropy_bonus_raises_entropy_and_fixed_beta_stays():
    cfg = M.PPOConfig(iterations=1, rollout_batch=32, ent_coef=1.0, kl_ctl="fixed", actor_lr=1e-2, hack=False)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sft = M.sft_policy(cfg, g)  # trained: well below the maximum entropy ln V
    actor, reference = M.actor_and_reference(sft)
    bos, sep, eos, pad = M.special_ids(cfg)
    prompts = M.make_prompts(cfg, 64, torch.Generator().manual_seed(1))
    before = M.policy_logprobs(actor, torch.cat([prompts, prompts[:, :1].expand(-1, 4)], 1), 3)[1].mean()
    zero_reward = lambda x: torch.zeros(x.shape[0])  # noqa: E731  (advantages are all 0: only the bonus acts)
    _, history = M.train_ppo(actor, reference, M.new_critic(sft), zero_reward, lambda n, gg: M.make_prompts(cfg, n, gg),
                             cfg, g, eos_id=eos, pad_id=pad, kl_coef=0.0)
    after = M.policy_logprobs(actor, torch.cat([prompts, prompts[:, :1].expand(-1, 4)], 1), 3)[1].mean()
    assert after > before and history[0]["loss/policy_avg"] == 0.0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        M.PPOConfig(rollout_batch=10, n_minibatches=3)
    with pytest.raises(ValueError):
        M.PPOConfig(kl_ctl="pid")


# ---------------------------------------------------------------------------------------------------
# The audit


@pytest.fixture(scope="module")
def toy_result():
    return audit_once("ppo", "toy", 0)


def test_audit_passes_in_toy_mode(toy_result):
    assert toy_result.error is None, toy_result.error
    assert toy_result.passed, [c for c in toy_result.checks if not c.passed]
    kinds = {c.kind for c in toy_result.checks}
    assert kinds == {"invariant", "outcome"}
    for name in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/scores",
                 "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio",
                 "objective/gold_reward", "hacking/proxy_score", "hacking/gold_reward", "hacking/kl"):
        assert name in toy_result.series, name


@pytest.mark.parametrize("seed", [0, 1])
def test_audit_passes_in_full_mode(seed):
    result = audit_once("ppo", "full", seed)
    assert result.passed, result.error or [c for c in result.checks if not c.passed]


def test_audit_is_deterministic(toy_result):
    assert audit_once("ppo", "toy", 0).deterministic_dict() == toy_result.deterministic_dict()


# ---------------------------------------------------------------------------------------------------
# Mutants: one per check


def clip_with_min(logprobs, old_logprobs, advantages, mask, clip_eps=0.2, clip_eps_high=None):
    ratio = torch.exp(logprobs - old_logprobs)
    per_token = torch.minimum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    return C.masked_mean(per_token, mask), torch.zeros(()), torch.zeros(())


def clip_removed(logprobs, old_logprobs, advantages, mask, clip_eps=0.2, clip_eps_high=None):
    _, clipfrac, approxkl = C.ppo_clip_loss(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high)
    return C.masked_mean(-advantages * torch.exp(logprobs - old_logprobs), mask), clipfrac, approxkl


def clipfrac_counts_ties(logprobs, old_logprobs, advantages, mask, clip_eps=0.2, clip_eps_high=None):
    loss, _, approxkl = C.ppo_clip_loss(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return loss, C.masked_mean((clipped >= -advantages * ratio).to(ratio.dtype), mask), approxkl


def loss_times_mask(logprobs, old_logprobs, advantages, mask, clip_eps=0.2, clip_eps_high=None):
    ratio = torch.exp(logprobs - old_logprobs)
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    _, clipfrac, approxkl = C.ppo_clip_loss(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high)
    return (per_token * mask).sum() / mask.sum(), clipfrac, approxkl  # NaN * 0 = NaN


def gradient_ascent(*args, **kwargs):
    loss, clipfrac, approxkl = C.ppo_clip_loss(*args, **kwargs)
    return -loss, clipfrac, approxkl


def k3_upside_down(logprobs, ref_logprobs):
    k1, k2, _ = C.kl_estimators(logprobs, ref_logprobs)
    return k1, k2, torch.exp(k1) - k1 - 1  # KL(ref || pi) integrand, not KL(pi || ref)


def k1_reversed(logprobs, ref_logprobs):
    _, k2, k3 = C.kl_estimators(logprobs, ref_logprobs)
    return ref_logprobs - logprobs, k2, k3


def whiten_over_everything(values, mask, shift_mean=True):
    return (values - values.mean()) / (values.std() + 1e-8) * mask


@pytest.mark.parametrize("kernel_name, mutant, check", [
    ("ppo_clip_loss", clip_with_min, "clip_table_matches_reference"),
    ("ppo_clip_loss", clip_removed, "clipped_tokens_get_zero_gradient"),
    ("kl_estimators", k3_upside_down, "kl_estimators_match_reference_vectors"),
    ("kl_estimators", k1_reversed, "kl_estimates_track_exact_kl"),
    ("masked_whiten", whiten_over_everything, "advantages_whitened_over_valid_tokens_only"),
    ("ppo_clip_loss", loss_times_mask, "padding_never_changes_the_loss"),
    ("ppo_clip_loss", clipfrac_counts_ties, "ratio_is_one_on_first_minibatch"),
])
def test_kernel_mutants(kernel_name, mutant, check):
    assert_check_fails(audit_once("ppo", "toy", 0, QUICK, **{kernel_name: mutant}), check)


def test_mutant_ratio_against_the_reference_fails_first_minibatch(monkeypatch):
    original = M.collect_rollout

    def old_is_reference(*args, **kwargs):  # the seed repository's RLVF bug: pi / pi_ref as the ratio
        ro = original(*args, **kwargs)
        ro.old_logprobs = ro.ref_logprobs
        return ro

    monkeypatch.setattr(M, "collect_rollout", old_is_reference)
    assert_check_fails(audit_once("ppo", "toy", 0, QUICK), "ratio_is_one_on_first_minibatch")


def test_mutant_reference_aliasing_the_actor_fails_frozen_weights(monkeypatch):
    import copy

    def aliased(sft):
        actor = copy.deepcopy(sft)
        return actor, actor

    monkeypatch.setattr(M, "actor_and_reference", aliased)
    assert_check_fails(audit_once("ppo", "toy", 0, QUICK), "reference_and_reward_model_weights_unchanged")


def test_mutant_score_after_eos_fails_score_position(monkeypatch):
    def score_on_first_pad(logprobs, ref_logprobs, scores, response_mask, beta):  # TRL's sequence_lengths + 1
        rewards = -beta * (logprobs - ref_logprobs) * response_mask
        slot = response_mask.sum(1).long().clamp(max=response_mask.shape[1] - 1)
        return rewards.index_put((torch.arange(rewards.shape[0]), slot), scores, accumulate=True)

    monkeypatch.setattr(M, "kl_penalized_rewards", score_on_first_pad)
    assert_check_fails(audit_once("ppo", "toy", 0, QUICK), "score_on_last_valid_token")


def test_mutant_value_loss_with_min_fails_value_clipping(monkeypatch):
    def optimistic(values, old_values, returns, mask, clip_range):
        clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        loss = 0.5 * C.masked_mean(torch.minimum((values - returns) ** 2, (clipped - returns) ** 2), mask)
        return loss, torch.zeros(())

    monkeypatch.setattr(M, "value_loss", optimistic)
    assert_check_fails(audit_once("ppo", "toy", 0, QUICK), "value_clipping_matches_reference")


def test_mutant_unclipped_kl_controller_fails(monkeypatch):
    class Unclipped(C.AdaptiveKLController):
        def update(self, current_kl, n_steps):
            self.value *= 1.0 + (current_kl / self.target - 1.0) * n_steps / self.horizon

    monkeypatch.setattr(M, "AdaptiveKLController", Unclipped)
    assert_check_fails(audit_once("ppo", "toy", 0, QUICK), "adaptive_kl_controller_matches_reference")


def test_mutant_gradient_ascent_fails_gold_reward():
    assert_check_fails(audit_once("ppo", "toy", 0, NO_HACK, ppo_clip_loss=gradient_ascent),
                       "gold_reward_rises_above_sft")


def test_mutant_kl_against_the_old_policy_with_a_larger_step_fails_kl_bound(monkeypatch):
    original = M.collect_rollout

    def ref_is_old(*args, **kwargs):  # the seed repository's PPO bug: the KL penalty against pi_old
        ro = original(*args, **kwargs)
        ro.ref_logprobs = ro.old_logprobs
        return ro

    monkeypatch.setattr(M, "collect_rollout", ref_is_old)
    assert_check_fails(audit_once("ppo", "toy", 0, {**NO_HACK, "actor_lr": "0.01"}), "kl_to_reference_stays_bounded")


def test_mutant_unbiased_annotator_does_not_hack():
    assert_check_fails(audit_once("ppo", "toy", 0, {"decoy_bonus": "0"}), "reward_hacking_without_kl_penalty")
