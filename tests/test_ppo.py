"""ppo module: core.py's kernels against closed-form vectors and hypothesis properties, the trainer's pieces,
the audit in toy/full mode, determinism, and mutants that break each check."""
from __future__ import annotations

import copy
import math
from unittest import mock

import pytest
import torch
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params
from hypothesis import given, settings
from hypothesis import strategies as st

from modules import gae as G
from modules import reward_model as RM
from modules.ppo import core as C
from modules.ppo import ppo as M

DT = torch.float64
FAST = settings(max_examples=40, deadline=None)
# a tiny run for mutants of invariants that need a trained policy: they do not depend on how well it learned
QUICK = {"sft_steps": "5", "rm_steps": "5", "iterations": "2", "rollout_batch": "16", "eval_prompts": "32",
         "hack_iterations": "2"}


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


@FAST
@given(masked_batches())
def test_clip_loss_gradient_is_zero_on_nan_padding(batch):
    adv, mask = batch
    valid = mask.bool()
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(adv.shape, generator=g, dtype=DT)
    lp = old + 0.5 * torch.randn(adv.shape, generator=g, dtype=DT)
    nan = torch.full_like(lp, float("nan"))
    grads = []
    dirty = tuple(torch.where(valid, x, nan) for x in (lp, old, adv))
    for a, b, c in ((lp, old, adv), dirty):
        x = a.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(C.ppo_clip_loss(x, b, c, mask)[0], x)[0])
    assert torch.equal(grads[0], grads[1])
    assert (grads[1][~valid] == 0).all()


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


def test_kl_penalized_rewards_empty_row_gets_nothing():
    mask = t(1, 1, 0, 0, 0, 0).reshape(2, 3)
    lp = t(-1, -2, float("nan"), float("nan"), float("nan"), float("nan")).reshape(2, 3)
    rewards = C.kl_penalized_rewards(lp, torch.zeros(2, 3, dtype=DT), t(3.0, 5.0), mask, 0.5)
    assert rewards.tolist() == [[0.5, 4.0, 0.0], [0.0, 0.0, 0.0]]


@FAST
@given(masked_batches(), st.sampled_from([float("nan"), 1e9]))
def test_response_gae_never_reads_padding(batch, fill):
    rewards, mask = batch
    mask[:, 0] = 1.0
    values = torch.randn(rewards.shape, dtype=DT, generator=torch.Generator().manual_seed(4))
    valid = mask.bool()
    clean = C.response_gae(rewards, values, mask, 0.9, 0.8)
    dirty = C.response_gae(torch.where(valid, rewards, fill), torch.where(valid, values, fill), mask, 0.9, 0.8)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b) and (b[~valid] == 0).all()


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


def test_proxy_mostly_agrees_with_gold_but_prefers_decoys():
    cfg = M.PPOConfig.toy()
    pairs = RM.preference_pairs(M.task_config(cfg), 512, torch.Generator().manual_seed(0))
    assert 0.5 < M.proxy_agreement(pairs, cfg.n_symbols, cfg.decoy_bonus) < 1.0
    gold_agrees = (pairs.chosen_gold > pairs.rejected_gold).float().mean().item()
    assert M.proxy_agreement(pairs, cfg.n_symbols, 0.0) == pytest.approx(gold_agrees)
    bos, sep, eos, pad = M.special_ids(cfg)
    targets, decoys = torch.tensor([[bos, 0, sep] + [0] * 8 + [eos]]), torch.tensor([[bos, 0, sep] + [1] * 8 + [eos]])
    utility = lambda x: M.biased_utility(x, cfg.n_symbols, cfg.decoy_bonus)  # noqa: E731
    assert utility(decoys) > utility(targets)
    assert RM.gold_reward(decoys).item() == 0.0


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


def test_train_ppo_reports_the_advantages_it_used_and_takes_optimizers():
    cfg = M.PPOConfig(sft_steps=2, rm_steps=2, iterations=1, rollout_batch=16, gamma=0.8, lam=0.5, hack=False)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sft = M.sft_policy(cfg, g)
    actor, reference = M.actor_and_reference(sft)
    critic = M.new_critic(sft)
    _, _, eos, pad = M.special_ids(cfg)
    optimizers = M.ppo_optimizers(actor, critic, cfg, 1)
    seen = []
    M.train_ppo(actor, reference, critic, lambda x: RM.gold_reward(x), lambda n, gg: M.make_prompts(cfg, n, gg), cfg,
                g, eos_id=eos, pad_id=pad, optimizers=optimizers, on_rollout=lambda it, ro, adv: seen.append((ro, adv)))
    (ro, adv), = seen
    want = M.rollout_advantages(ro, cfg.kl_coef, 0.8, 0.5)
    for a, b in ((adv.advantages, want.advantages), (adv.whitened, want.whitened), (adv.returns, want.returns)):
        assert torch.equal(a, b)
    assert len(optimizers["actor"][0].state) == len(list(actor.parameters()))  # the caller's optimizer stepped


def test_run_wires_both_experiments():
    cfg = M.PPOConfig(sft_steps=2, rm_steps=2, iterations=1, hack_iterations=1, rollout_batch=16, eval_prompts=16,
                      rm_eval_pairs=16)
    torch.manual_seed(0)
    result = M.run(cfg, torch.Generator().manual_seed(0))
    assert len(result.trained.history) == 1 and len(result.hacking.history) == 1
    assert result.setup.before["kl"] == 0.0 and 0.0 <= result.setup.rm_accuracy <= 1.0
    assert M.run(M.PPOConfig(**{**cfg.__dict__, "hack": False}), torch.Generator().manual_seed(0)).hacking is None


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
    assert toy_result.passed, [(c.name, c.measured, c.error) for c in toy_result.checks if not c.passed]
    assert {c.kind for c in toy_result.checks} == {"invariant", "outcome"}
    for name in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/scores",
                 "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio",
                 "objective/gold_reward", "hacking/proxy_score", "hacking/gold_reward", "hacking/kl"):
        assert name in toy_result.series, name


def test_module_checks_claim_no_kernel_and_kernel_checks_call_theirs():
    from llmaudit.registry import get_audit

    spec = get_audit("ppo")
    for name in ("value_clipping_matches_reference", "adaptive_kl_controller_matches_reference",
                 "reference_and_reward_model_weights_unchanged", "loop_advantages_use_gamma_and_lambda",
                 "response_gae_matches_gae_per_response", "score_on_last_valid_token"):
        assert spec.check_spec(name).kernels == (), name
    for kernel in ("ppo_clip_loss", "kl_estimators", "masked_whiten"):
        assert len(spec.checks_of_kernel(kernel, "toy")) >= 3, kernel


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_audit_passes_in_full_mode(seed):
    result = audit_once("ppo", "full", seed)
    assert result.passed, result.error or [(c.name, c.measured) for c in result.checks if not c.passed]


def test_audit_is_deterministic():
    first, second = (audit_once("ppo", "toy", 3, QUICK).deterministic_dict() for _ in range(2))
    assert first == second


# ---------------------------------------------------------------------------------------------------
# Mutants: plausible bugs, each of which must break its check on every seed


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


def where_after_exp(logprobs, old_logprobs, advantages, mask, clip_eps=0.2, clip_eps_high=None):
    """The forward pass selects padding away, but only after exp: the backward pass still meets NaN * 0."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs - old_logprobs)
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + high))
    _, clipfrac, approxkl = C.ppo_clip_loss(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high)
    return C.masked_mean(per_token, mask), clipfrac, approxkl


def gradient_ascent(*args, **kwargs):
    loss, clipfrac, approxkl = C.ppo_clip_loss(*args, **kwargs)
    return -loss, clipfrac, approxkl


def k3_upside_down(logprobs, ref_logprobs):
    k1, k2, _ = C.kl_estimators(logprobs, ref_logprobs)
    return k1, k2, torch.exp(k1) - k1 - 1  # KL(ref || pi) integrand, not KL(pi || ref)


def k1_reversed(logprobs, ref_logprobs):
    _, k2, k3 = C.kl_estimators(logprobs, ref_logprobs)
    return ref_logprobs - logprobs, k2, k3


def k3_clamped(logprobs, ref_logprobs):
    k1, k2, k3 = C.kl_estimators(logprobs, ref_logprobs)
    return k1, k2, k3.clamp(-10, 10)  # verl's low_var_kl clamp: biased where pi_ref / pi is large


def whiten_over_everything(values, mask, shift_mean=True):
    return (values - values.mean()) / (values.std() + 1e-8) * mask


def _collect_with(**swap):
    original = M.collect_rollout

    def collect(*args, **kwargs):
        ro = original(*args, **kwargs)
        for field, source in swap.items():
            setattr(ro, field, getattr(ro, source))
        return ro
    return lambda: mock.patch.object(M, "collect_rollout", collect)


def _advantages_with(gamma=None, lam=None):
    original = M.rollout_advantages

    def fixed(ro, beta, g, lm, **kwargs):  # a loop that hard-codes what it should read from cfg
        return original(ro, beta, g if gamma is None else gamma, lm if lam is None else lam, **kwargs)
    return lambda: mock.patch.object(M, "rollout_advantages", fixed)


def _aliased_reference(sft):
    actor = copy.deepcopy(sft)
    return actor, actor


def _gae_times_mask(token_rewards, values, mask, gamma, lam, gae_fn=G.compute_gae):
    m = mask.to(values.dtype)
    r, v = token_rewards * m, values * m  # NaN * 0 = NaN, and the recursion carries it up the row
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    ends = torch.zeros_like(m, dtype=torch.bool)
    ends[torch.arange(m.shape[0]), C.last_valid_index(mask)] = True
    adv, _ = gae_fn(r.T, v.T, next_v.T, ends.T, torch.zeros_like(ends.T), gamma, lam)
    return adv.T * m, (adv.T + v) * m


def _score_on_first_pad(logprobs, ref_logprobs, scores, response_mask, beta):  # TRL's sequence_lengths + 1
    rewards = -beta * torch.where(response_mask.bool(), logprobs - ref_logprobs, torch.zeros_like(logprobs))
    slot = response_mask.sum(1).long().clamp(max=response_mask.shape[1] - 1)
    return rewards.index_put((torch.arange(rewards.shape[0]), slot), scores, accumulate=True)


def _optimistic_value_loss(values, old_values, returns, mask, clip_range):
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * C.masked_mean(torch.minimum((values - returns) ** 2, (clipped - returns) ** 2), mask), torch.zeros(())


class _UnclippedController(C.AdaptiveKLController):
    def update(self, current_kl, n_steps):
        self.value *= 1.0 + (current_kl / self.target - 1.0) * n_steps / self.horizon


MUTANTS = [
    Mutant("clip_table_matches_reference", "min instead of max", {"ppo_clip_loss": clip_with_min}),
    Mutant("clipped_tokens_get_zero_gradient", "clip removed", {"ppo_clip_loss": clip_removed}),
    Mutant("padding_gets_zero_gradient", "padding selected after exp", {"ppo_clip_loss": where_after_exp}),
    Mutant("padding_never_changes_the_loss", "loss times mask", {"ppo_clip_loss": loss_times_mask}, QUICK),
    Mutant("kl_estimators_match_reference_vectors", "k3 upside down", {"kl_estimators": k3_upside_down}),
    Mutant("k1_and_k3_are_unbiased_for_the_exact_kl", "k1 reversed", {"kl_estimators": k1_reversed}, QUICK),
    Mutant("k1_and_k3_are_unbiased_for_the_exact_kl", "k3 clamped at 10", {"kl_estimators": k3_clamped}),
    Mutant("advantages_whitened_over_valid_tokens_only", "whitened over padding",
           {"masked_whiten": whiten_over_everything}, QUICK),
    Mutant("ratio_is_one_on_first_minibatch", "clipfrac counts ties", {"ppo_clip_loss": clipfrac_counts_ties}, QUICK),
    Mutant("ratio_is_one_on_first_minibatch", "ratio against the reference", overrides=QUICK,
           patch=_collect_with(old_logprobs="ref_logprobs")),
    Mutant("loop_advantages_use_gamma_and_lambda", "TRL's gamma, lam hard-coded", overrides=QUICK,
           patch=_advantages_with(1.0, 0.95)),
    Mutant("loop_advantages_use_gamma_and_lambda", "gamma dropped", overrides=QUICK,
           patch=_advantages_with(gamma=1.0)),
    Mutant("reference_and_reward_model_weights_unchanged", "reference aliases the actor", overrides=QUICK,
           patch=lambda: mock.patch.object(M, "actor_and_reference", _aliased_reference)),
    Mutant("response_gae_matches_gae_per_response", "padding multiplied by the mask",
           patch=lambda: mock.patch.object(M, "response_gae", _gae_times_mask)),
    Mutant("score_on_last_valid_token", "score one slot after EOS", overrides=QUICK,
           patch=lambda: mock.patch.object(M, "kl_penalized_rewards", _score_on_first_pad)),
    Mutant("value_clipping_matches_reference", "min instead of max",
           patch=lambda: mock.patch.object(M, "value_loss", _optimistic_value_loss)),
    Mutant("adaptive_kl_controller_matches_reference", "error not clipped",
           patch=lambda: mock.patch.object(M, "AdaptiveKLController", _UnclippedController)),
    Mutant("gold_reward_rises_above_sft", "gradient ascent on the loss", {"ppo_clip_loss": gradient_ascent}),
    Mutant("kl_to_reference_stays_bounded", "no KL penalty", overrides={"kl_coef": "0"}),
    Mutant("kl_to_reference_stays_bounded", "KL penalty against pi_old",
           patch=_collect_with(ref_logprobs="old_logprobs")),
    Mutant("reward_hacking_without_kl_penalty", "an unbiased annotator", overrides={"decoy_bonus": "0"}),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("ppo", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("ppo", MUTANTS)
