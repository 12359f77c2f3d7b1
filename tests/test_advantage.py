"""advantage module: kernels (unit + property tests), the audit in toy/full mode, and one mutant per check."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params
from llmaudit.registry import get_audit
from modules import advantage as M
from modules.mdp import evaluate_policy_exact, q_from_v, random_mdp

DT = M.DTYPE
FAST = settings(max_examples=30, deadline=None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_task(seed: int = 0, layers: int = 3, width: int = 2, actions: int = 3):
    g = gen(seed)
    mdp = M.layered_mdp(layers, width, actions, 0.9, 2.0, 1.0, g)
    theta = torch.randn(mdp.n_states, actions, generator=g, dtype=DT)
    return mdp, theta, g


# ---------------------------------------------------------------------------------------------------
# discounted_returns


def slow_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    N, T = rewards.shape
    out = torch.zeros_like(rewards)
    for i in range(N):
        for t in range(T):
            out[i, t] = sum(gamma ** (k - t) * rewards[i, k].item() for k in range(t, T))
    return out


def test_discounted_returns_hand_vector():
    G = M.discounted_returns(torch.tensor([[1.0, 1.0, 1.0]], dtype=DT), 0.9)
    torch.testing.assert_close(G, torch.tensor([[2.71, 1.9, 1.0]], dtype=DT), atol=1e-12, rtol=0)


@FAST
@given(n=st.integers(1, 4), T=st.integers(1, 6), gamma=st.floats(0.0, 0.99), seed=st.integers(0, 10_000))
def test_discounted_returns_match_slow_loop(n, T, gamma, seed):
    r = torch.randn(n, T, generator=gen(seed), dtype=DT)
    torch.testing.assert_close(M.discounted_returns(r, gamma), slow_returns(r, gamma), atol=1e-10, rtol=0)


@FAST
@given(T=st.integers(1, 6), a=st.floats(-3, 3), b=st.floats(-3, 3), seed=st.integers(0, 10_000))
def test_discounted_returns_are_linear_and_gamma0_is_identity(T, a, b, seed):
    g = gen(seed)
    r1, r2 = torch.randn(3, T, generator=g, dtype=DT), torch.randn(3, T, generator=g, dtype=DT)
    f = M.discounted_returns
    torch.testing.assert_close(f(a * r1 + b * r2, 0.7), a * f(r1, 0.7) + b * f(r2, 0.7), atol=1e-10, rtol=0)
    torch.testing.assert_close(f(r1, 0.0), r1)


# ---------------------------------------------------------------------------------------------------
# advantage_from_q


@FAST
@given(S=st.integers(1, 6), A=st.integers(2, 5), seed=st.integers(0, 10_000))
def test_advantage_is_zero_mean_and_ignores_state_offsets(S, A, seed):
    g = gen(seed)
    q = torch.randn(S, A, generator=g, dtype=DT) * 3
    probs = torch.softmax(torch.randn(S, A, generator=g, dtype=DT) * 2, -1)
    adv = M.advantage_from_q(q, probs)
    assert (probs * adv).sum(-1).abs().max() < 1e-12
    offset = torch.randn(S, 1, generator=g, dtype=DT) * 10  # Q(s, .) + c(s) is the same ranking
    torch.testing.assert_close(M.advantage_from_q(q + offset, probs), adv, atol=1e-10, rtol=0)


def test_advantage_of_deterministic_policy_is_zero_on_its_action():
    q = torch.tensor([[1.0, 3.0, 2.0]], dtype=DT)
    probs = torch.tensor([[0.0, 1.0, 0.0]], dtype=DT)
    torch.testing.assert_close(M.advantage_from_q(q, probs), torch.tensor([[-2.0, 0.0, -1.0]], dtype=DT))


def test_advantage_equals_q_minus_v_on_an_mdp():
    mdp, theta, _ = small_task(1)
    probs = torch.softmax(theta, -1)
    V = evaluate_policy_exact(mdp.P, mdp.R, mdp.gamma, probs)
    Q = q_from_v(mdp.P, mdp.R, mdp.gamma, V)
    torch.testing.assert_close(M.advantage_from_q(Q, probs), Q - V[:, None], atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------------
# exact_policy_gradient


def autograd_grad(mdp, theta):
    th = theta.clone().requires_grad_(True)
    return torch.autograd.grad(M.expected_return(mdp, th), th)[0]


@FAST
@given(S=st.integers(1, 6), A=st.integers(2, 4), gamma=st.floats(0.0, 0.95), seed=st.integers(0, 10_000))
def test_exact_policy_gradient_matches_autograd_on_random_mdps(S, A, gamma, seed):
    g = gen(seed)
    mdp = random_mdp(S, A, gamma, g)
    theta = torch.randn(S, A, generator=g, dtype=DT) * 2
    pg = M.exact_policy_gradient(mdp.P, mdp.R, mdp.gamma, mdp.start, theta)
    torch.testing.assert_close(pg, autograd_grad(mdp, theta), atol=1e-9, rtol=0)
    assert pg.sum(-1).abs().max() < 1e-10  # softmax: adding a constant to theta[s] changes nothing


def test_exact_policy_gradient_matches_finite_differences():
    mdp, theta, _ = small_task(2)
    pg = M.exact_policy_gradient(mdp.P, mdp.R, mdp.gamma, mdp.start, theta)
    eps, fd = 1e-6, torch.zeros_like(theta)
    for s in range(theta.shape[0]):
        for a in range(theta.shape[1]):
            d = torch.zeros_like(theta)
            d[s, a] = eps
            fd[s, a] = (M.expected_return(mdp, theta + d) - M.expected_return(mdp, theta - d)) / (2 * eps)
    torch.testing.assert_close(pg, fd, atol=1e-8, rtol=0)


# ---------------------------------------------------------------------------------------------------
# policy_gradient_estimate


def slow_estimate(theta, states, actions, weights):
    probs = torch.softmax(theta, -1)
    out = torch.zeros_like(theta)
    N, T = states.shape
    for i in range(N):
        for t in range(T):
            s, a = states[i, t].item(), actions[i, t].item()
            for b in range(theta.shape[1]):
                out[s, b] += weights[i, t] * ((1.0 if b == a else 0.0) - probs[s, b])
    return out / N


@FAST
@given(S=st.integers(1, 5), A=st.integers(2, 4), N=st.integers(1, 6), T=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_policy_gradient_estimate_matches_autograd_and_slow_loop(S, A, N, T, seed):
    g = gen(seed)
    theta = torch.randn(S, A, generator=g, dtype=DT)
    states, actions = torch.randint(0, S, (N, T), generator=g), torch.randint(0, A, (N, T), generator=g)
    w = torch.randn(N, T, generator=g, dtype=DT)
    est = M.policy_gradient_estimate(theta, states, actions, w)
    th = theta.clone().requires_grad_(True)
    auto = torch.autograd.grad((w * torch.log_softmax(th, -1)[states, actions]).sum() / N, th)[0]
    torch.testing.assert_close(est, auto, atol=1e-12, rtol=0)
    torch.testing.assert_close(est, slow_estimate(theta, states, actions, w), atol=1e-12, rtol=0)
    assert est.sum(-1).abs().max() < 1e-12  # each row of onehot(a) - pi sums to 0
    unseen = torch.ones(S, dtype=torch.bool)
    unseen[states.flatten()] = False
    assert (est[unseen] == 0).all()


@FAST
@given(S=st.integers(1, 5), A=st.integers(2, 4), seed=st.integers(0, 10_000), b=st.floats(-5, 5))
def test_constant_baseline_has_zero_expected_gradient(S, A, seed, b):
    """Enumerating a ~ pi exactly: sum_a pi(a|s) b grad log pi(a|s) = 0."""
    theta = torch.randn(S, A, generator=gen(seed), dtype=DT) * 2
    probs = torch.softmax(theta, -1)
    s = torch.arange(S).repeat_interleave(A)[:, None]
    a = torch.arange(A).repeat(S)[:, None]
    assert M.policy_gradient_estimate(theta, s, a, b * probs[s, a]).abs().max() < 1e-12


def test_per_episode_gradients_average_to_the_batch_estimate():
    mdp, theta, g = small_task(3)
    probs = torch.softmax(theta, -1)
    s0 = M.sample_categorical(mdp.start.expand(50, -1), g)
    states, actions, rewards = M.sample_episodes(mdp, probs, s0, 3, 1.0, g)
    w = M.discounted_returns(rewards, 0.9)
    per = M.per_episode_gradients(M.policy_gradient_estimate, theta, states, actions, w)
    assert per.shape == (50, *theta.shape)
    torch.testing.assert_close(per.mean(0), M.policy_gradient_estimate(theta, states, actions, w),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(per[7], M.policy_gradient_estimate(theta, states[7:8], actions[7:8], w[7:8]),
                               atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------
# the task, the sampler and the estimators


def test_layered_mdp_structure():
    mdp, _, _ = small_task(4, layers=4, width=3)
    torch.testing.assert_close(mdp.P.sum(-1), torch.ones(13, 3, dtype=DT))
    end = mdp.n_states - 1
    for s in range(end):
        layer = s // 3
        nxt = mdp.P[s].sum(0).nonzero().flatten()
        expected = [end] if layer == 3 else list(range(3 * (layer + 1), 3 * (layer + 2)))
        assert set(nxt.tolist()) <= set(expected)
    assert mdp.terminal.tolist() == [False] * end + [True] and (mdp.R[end] == 0).all()


def test_replicate_gives_independent_copies():
    mdp, theta, g = small_task(5)
    thetas = torch.randn(4, *theta.shape, generator=g, dtype=DT)
    big = M.replicate(mdp, 4)
    V_big = evaluate_policy_exact(big.P, big.R, big.gamma, torch.softmax(thetas.reshape(-1, 3), -1))
    for k in range(4):
        v = evaluate_policy_exact(mdp.P, mdp.R, mdp.gamma, torch.softmax(thetas[k], -1))
        torch.testing.assert_close(V_big.reshape(4, -1)[k], v, atol=1e-12, rtol=0)


def test_sampler_is_deterministic_and_follows_the_policy():
    mdp, theta, _ = small_task(6)
    probs = torch.softmax(theta, -1)
    s0 = torch.zeros(20_000, dtype=torch.long)
    out1 = M.sample_episodes(mdp, probs, s0, 3, 1.0, gen(7))
    out2 = M.sample_episodes(mdp, probs, s0, 3, 1.0, gen(7))
    for x, y in zip(out1, out2):
        assert torch.equal(x, y)
    freq = torch.bincount(out1[1][:, 0], minlength=3).double() / 20_000
    se = (probs[0] * (1 - probs[0]) / 20_000).sqrt()
    assert ((freq - probs[0]).abs() <= 5 * se + 1e-12).all()
    assert (out1[0][:, -1] // 2 == 2).all()  # after 2 steps every episode is in layer 2


def test_gamma_t_weighting_and_reward_shift_invariance():
    mdp, theta, g = small_task(8)
    probs = torch.softmax(theta, -1)
    V = evaluate_policy_exact(mdp.P, mdp.R, mdp.gamma, probs)
    A = M.advantage_from_q(q_from_v(mdp.P, mdp.R, mdp.gamma, V), probs)
    s0 = M.sample_categorical(mdp.start.expand(10, -1), g)
    states, actions, rewards = M.sample_episodes(mdp, probs, s0, 3, 1.0, g)
    G = M.discounted_returns(rewards, 0.9)
    w = M.estimator_weights(G, states, actions, V, A, 0.9)
    w_plain = M.estimator_weights(G, states, actions, V, A, 0.9, weight_by_gamma_t=False)
    torch.testing.assert_close(w["reinforce"], G * torch.tensor([1.0, 0.9, 0.81], dtype=DT))
    torch.testing.assert_close(w_plain["baseline"], G - V[states])
    shifted = M.shift_rewards(mdp, 3.0)
    V3 = evaluate_policy_exact(shifted.P, shifted.R, shifted.gamma, probs)
    torch.testing.assert_close(M.discounted_returns(rewards + 3.0, 0.9) - V3[states], G - V[states],
                               atol=1e-10, rtol=0)


def test_training_with_the_advantage_improves_j():
    mdp, _, _ = small_task(9)
    cfg = M.AdvantageConfig(n_layers=3, width=2, n_agents=2, train_steps=60)
    res = M.train(mdp, cfg, gen(10))
    assert res.J.shape == (61, 3, 2)
    assert torch.allclose(res.normalized[0], torch.zeros(3, 2, dtype=DT), atol=1e-12)  # theta = 0
    assert res.normalized[-1, 2].min() > 0.8


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        M.AdvantageConfig(gamma=1.0)
    with pytest.raises(ValueError):
        M.AdvantageConfig(n_actions=1)


# ---------------------------------------------------------------------------------------------------
# the experiment's pieces


def test_random_test_policy_carries_the_exact_truth():
    cfg = M.AdvantageConfig()
    pol = M.random_test_policy(cfg, gen(11))
    torch.testing.assert_close(pol.V, evaluate_policy_exact(pol.mdp.P, pol.mdp.R, pol.mdp.gamma, pol.probs))
    assert pol.J == pytest.approx((pol.mdp.start @ pol.V).item())
    torch.testing.assert_close(pol.grad, M.exact_policy_gradient(pol.mdp.P, pol.mdp.R, pol.mdp.gamma, pol.mdp.start,
                                                                 pol.theta), atol=1e-10, rtol=0)


def test_expected_visits_count_one_state_per_layer():
    mdp, theta, g = small_task(12, layers=3, width=2)
    visits = M.expected_visits(mdp, torch.softmax(theta, -1), 3)
    torch.testing.assert_close(visits.reshape(-1)[:-1].reshape(3, 2).sum(-1), torch.ones(3, dtype=DT))
    assert visits[-1].item() == 0.0  # the end state comes after the horizon
    s0 = M.sample_categorical(mdp.start.expand(20_000, -1), g)
    states, _, _ = M.sample_episodes(mdp, torch.softmax(theta, -1), s0, 3, 1.0, g)
    freq = torch.bincount(states.flatten(), minlength=mdp.n_states).double() / 20_000
    assert (freq - visits).abs().max() < 0.02


def test_run_returns_every_piece():
    cfg = M.AdvantageConfig(n_episodes=1024, n_agents=1, train_steps=3)
    res = M.run(cfg, gen(13))
    assert set(res.samples) == set(M.ESTIMATORS) and res.samples["advantage"].shape == (1024, 13, 3)
    assert res.train.J.shape == (4, 3, 1)


# ---------------------------------------------------------------------------------------------------
# the audit


def test_audit_passes_toy():
    r = audit_once("advantage", "toy", 0)
    assert r.error is None and r.passed, [(c.name, c.measured) for c in r.checks if not c.passed]
    assert {c.kind for c in r.checks} == {"invariant", "outcome"}
    assert "variance/trace_cov_reinforce" in r.series and "charts/normalized_return_advantage" in r.series


def test_audit_is_deterministic():
    first, second = audit_once("advantage", "toy", 2), audit_once("advantage", "toy", 2)
    assert first.deterministic_dict() == second.deterministic_dict()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_audit_passes_full(seed):
    r = audit_once("advantage", "full", seed)
    assert r.error is None and r.passed, [(c.name, c.measured) for c in r.checks if not c.passed]


def test_every_kernel_is_called_by_three_checks():
    spec = get_audit("advantage")
    for k in spec.kernels:
        assert len(spec.checks_of_kernel(k.name, "toy")) >= 3, k.name


# ---- mutants: each check must fail on every seed ------------------------------------------------------


def undiscounted_returns(rewards, gamma):
    return rewards.flip(-1).cumsum(-1).flip(-1)


def nan_returns(rewards, gamma):
    return M.discounted_returns(rewards, gamma) * float("nan")


def uniform_mean_advantage(q, probs):
    return q - q.mean(-1, keepdim=True)


def q_as_advantage(q, probs):
    return q.clone()


def sign_flipped_advantage(q, probs):
    return (probs * q).sum(-1, keepdim=True) - q


def q_weighted_exact_gradient(P, R, gamma, start, theta):
    probs = torch.softmax(theta, -1)
    V = evaluate_policy_exact(P, R, gamma, probs)
    Q = q_from_v(P, R, gamma, V)
    P_pi = torch.einsum("sa,sat->st", probs, P)
    d = torch.linalg.solve((torch.eye(P.shape[0], dtype=P.dtype) - gamma * P_pi).T, start)
    return d[:, None] * probs * Q  # forgot to subtract V


def uniform_visitation_exact_gradient(P, R, gamma, start, theta):
    probs = torch.softmax(theta, -1)
    V = evaluate_policy_exact(P, R, gamma, probs)
    Q = q_from_v(P, R, gamma, V)
    return probs * (Q - V[:, None]) / P.shape[0]  # d(s) replaced by a uniform distribution


def score_without_minus_pi(theta, states, actions, weights):
    A = theta.shape[-1]
    score = F.one_hot(actions, A).to(theta.dtype)
    return torch.zeros_like(theta).index_add_(0, states.reshape(-1),
                                              (weights[..., None] * score).reshape(-1, A)) / states.shape[0]


def nan_estimate(theta, states, actions, weights):
    return M.policy_gradient_estimate(theta, states, actions, weights) * float("nan")


def overwriting_estimate(theta, states, actions, weights):
    """Indexed assignment instead of index_add: a state seen twice keeps only its last row."""
    probs = torch.softmax(theta, -1)
    A = theta.shape[-1]
    rows = (weights[..., None] * (F.one_hot(actions, A).to(theta.dtype) - probs[states])).reshape(-1, A)
    out = torch.zeros_like(theta)
    out[states.reshape(-1)] = rows
    return out / states.shape[0]


MUTANTS = [
    Mutant("discounted_returns_satisfy_recursion", "undiscounted", {"discounted_returns": undiscounted_returns}),
    Mutant("advantage_is_q_minus_v", "plain mean over actions", {"advantage_from_q": uniform_mean_advantage}),
    Mutant("advantage_has_zero_mean_under_policy", "plain mean over actions",
           {"advantage_from_q": uniform_mean_advantage}),
    Mutant("policy_gradient_theorem_matches_autograd", "Q instead of A",
           {"exact_policy_gradient": q_weighted_exact_gradient}),
    Mutant("policy_gradient_theorem_matches_autograd", "uniform visitation",
           {"exact_policy_gradient": uniform_visitation_exact_gradient}),
    Mutant("exact_gradient_matches_bandit_closed_form", "uniform visitation",
           {"exact_policy_gradient": uniform_visitation_exact_gradient}),
    Mutant("exact_gradient_vanishes_when_actions_do_not_matter", "Q instead of A",
           {"exact_policy_gradient": q_weighted_exact_gradient}),
    Mutant("policy_gradient_estimate_matches_autograd", "score without -pi",
           {"policy_gradient_estimate": score_without_minus_pi}),
    Mutant("policy_gradient_estimate_matches_autograd", "rows overwritten, not added",
           {"policy_gradient_estimate": overwriting_estimate}),
    Mutant("score_function_has_zero_mean", "score without -pi", {"policy_gradient_estimate": score_without_minus_pi}),
    Mutant("baseline_gradient_is_invariant_to_reward_shift", "undiscounted",
           {"discounted_returns": undiscounted_returns}),
    Mutant("mean_return_matches_exact_J", "undiscounted", {"discounted_returns": undiscounted_returns}),
    Mutant("estimators_are_unbiased", "score without -pi", {"policy_gradient_estimate": score_without_minus_pi}),
    Mutant("estimators_are_unbiased", "gamma^t dropped", overrides={"weight_by_gamma_t": "false"}),
    Mutant("estimators_are_unbiased", "NaN estimate", {"policy_gradient_estimate": nan_estimate}),
    Mutant("estimators_are_unbiased", "NaN returns", {"discounted_returns": nan_returns}),
    Mutant("variance_decreases_reinforce_baseline_advantage", "Q as the advantage",
           {"advantage_from_q": q_as_advantage}),
    Mutant("gradient_ascent_with_advantage_reaches_optimum", "advantage sign flipped",
           {"advantage_from_q": sign_flipped_advantage}),
    Mutant("gradient_ascent_with_advantage_reaches_optimum", "5 steps", overrides={"train_steps": "5"}),
    Mutant("advantage_needs_fewer_episodes_than_reinforce", "advantage sign flipped",
           {"advantage_from_q": sign_flipped_advantage}),
    Mutant("advantage_needs_fewer_episodes_than_reinforce", "step size too small", overrides={"lr": "0.05"}),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("advantage", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("advantage", MUTANTS)


def test_nan_returns_are_reported_as_nan():
    r = Mutant("estimators_are_unbiased", "NaN returns", {"discounted_returns": nan_returns}).run("advantage")
    assert math.isnan(r.check("estimators_are_unbiased").measured["max_z"])


def test_only_the_gamma_t_shortcut_is_flagged():
    """Dropping gamma^t biases the estimators but leaves every exact invariant intact."""
    r = audit_once("advantage", "toy", 0, overrides={"weight_by_gamma_t": "false"},
                   only=["estimators_are_unbiased", "advantage_is_q_minus_v",
                         "policy_gradient_theorem_matches_autograd", "score_function_has_zero_mean",
                         "policy_gradient_estimate_matches_autograd"])
    failed = {c.name for c in r.checks if not c.passed}
    assert failed == {"estimators_are_unbiased"}
    assert math.isfinite(r.check("estimators_are_unbiased").measured["max_z"])
