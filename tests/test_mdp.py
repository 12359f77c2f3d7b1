"""mdp: kernels against independent computations, hypothesis properties, the audit, one mutant per check."""
from __future__ import annotations

import torch
from conftest import assert_check_fails, audit_once
from hypothesis import given, settings
from hypothesis import strategies as st

from modules import mdp as M


def _random(seed: int, S: int = 5, A: int = 3, gamma: float = 0.9):
    g = torch.Generator().manual_seed(seed)
    m = M.random_mdp(S, A, gamma, g)
    return m, M.random_policy(S, A, g), torch.randn(S, generator=g, dtype=M.DTYPE), g


def test_single_state_self_loop_value_is_ten():  # rl-anchors §1 vector 5
    P = torch.ones(1, 1, 1, dtype=M.DTYPE)
    R = torch.ones(1, 1, dtype=M.DTYPE)
    sol = M.value_iteration(M.TabularMDP(P, R, 0.9, torch.zeros(1, dtype=torch.bool), torch.ones(1, dtype=M.DTYPE)))
    assert abs(sol.V.item() - 10.0) < 1e-9
    assert abs(M.evaluate_policy_exact(P, R, 0.9, torch.ones(1, 1, dtype=M.DTYPE)).item() - 10.0) < 1e-12


def test_two_step_chain():  # s0 -> s1 (r=0), s1 -> terminal (r=1), gamma .9: V(s1)=1, V(s0)=.9
    P = torch.zeros(3, 1, 3, dtype=M.DTYPE)
    P[0, 0, 1] = P[1, 0, 2] = P[2, 0, 2] = 1.0
    R = torch.tensor([[0.0], [1.0], [0.0]], dtype=M.DTYPE)
    V = M.evaluate_policy_exact(P, R, 0.9, torch.ones(3, 1, dtype=M.DTYPE))
    assert torch.allclose(V, torch.tensor([0.9, 1.0, 0.0], dtype=M.DTYPE), atol=1e-12)


def test_backups_match_explicit_loops():
    m, pi, V, _ = _random(0)
    S, A = m.R.shape
    opt = torch.tensor([max(m.R[s, a] + m.gamma * sum(m.P[s, a, t] * V[t] for t in range(S)) for a in range(A))
                        for s in range(S)], dtype=M.DTYPE)
    exp = torch.tensor([sum(pi[s, a] * (m.R[s, a] + m.gamma * sum(m.P[s, a, t] * V[t] for t in range(S)))
                            for a in range(A)) for s in range(S)], dtype=M.DTYPE)
    assert torch.allclose(M.bellman_optimality_backup(m.P, m.R, m.gamma, V), opt, atol=1e-12)
    assert torch.allclose(M.bellman_expectation_backup(m.P, m.R, m.gamma, pi, V), exp, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 8), st.integers(1, 4), st.floats(0.0, 0.99))
def test_exact_evaluation_is_the_fixed_point(seed, S, A, gamma):
    m, pi, _, _ = _random(seed, S, A, gamma)
    V = M.evaluate_policy_exact(m.P, m.R, gamma, pi)
    assert torch.allclose(M.bellman_expectation_backup(m.P, m.R, gamma, pi, V), V, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 0.99), st.floats(-5, 5))
def test_optimality_backup_contracts_and_commutes_with_shifts(seed, gamma, c):
    m, _, V1, g = _random(seed, gamma=gamma)
    V2 = torch.randn(V1.shape, generator=g, dtype=M.DTYPE)
    T = lambda V: M.bellman_optimality_backup(m.P, m.R, gamma, V)  # noqa: E731
    assert (T(V1) - T(V2)).abs().max() <= gamma * (V1 - V2).abs().max() + 1e-12
    assert torch.allclose(T(V1 + c), T(V1) + gamma * c, atol=1e-9)  # T(V + c) = T V + gamma c


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_backups_are_monotone(seed):
    m, pi, V, g = _random(seed)
    W = V + torch.rand(V.shape, generator=g, dtype=M.DTYPE)  # W >= V
    assert (M.bellman_optimality_backup(m.P, m.R, m.gamma, W) >= M.bellman_optimality_backup(m.P, m.R, m.gamma, V) - 1e-12).all()
    assert (M.bellman_expectation_backup(m.P, m.R, m.gamma, pi, W) >= M.bellman_expectation_backup(m.P, m.R, m.gamma, pi, V) - 1e-12).all()


def test_frozen_lake_table_matches_gymnasium():
    mdp, env = M.frozen_lake(0.99, "4x4", True)
    table = env.unwrapped.P
    for s, actions in table.items():
        for a, outcomes in actions.items():
            expected = torch.zeros(mdp.n_states, dtype=M.DTYPE)
            for p, nxt, _, _ in outcomes:
                expected[nxt] += p
            if not mdp.terminal[s]:
                assert torch.allclose(mdp.P[s, a], expected)
    assert mdp.terminal.sum() == 5  # 4 holes + goal


def test_value_iteration_solves_frozen_lake_known_value():
    mdp, _ = M.frozen_lake(0.99, "4x4", True)
    sol = M.value_iteration(mdp)
    assert abs(sol.V[0].item() - 0.5420) < 1e-3  # the textbook number for slippery 4x4 at gamma .99


def test_audit_passes_toy_and_full():
    assert audit_once("mdp", "toy").passed
    for seed in (0, 1):
        r = audit_once("mdp", "full", seed)
        assert r.passed, [c for c in r.checks if not c.passed]


def test_same_seed_same_result():
    assert audit_once("mdp", "toy", 3).to_dict() == audit_once("mdp", "toy", 3).to_dict()


# --- mutants: each breaks exactly the property its check names ----------------------------------

ref_opt, ref_exp, ref_eval = M.bellman_optimality_backup, M.bellman_expectation_backup, M.evaluate_policy_exact


def test_mutant_transition_rows(monkeypatch):
    real = M.frozen_lake

    def leaky(*args, **kwargs):  # drops one outcome of a slippery move
        mdp, env = real(*args, **kwargs)
        mdp.P[0, 0, mdp.P[0, 0].nonzero()[0]] = 0.0
        return mdp, env

    monkeypatch.setattr(M, "frozen_lake", leaky)
    assert_check_fails(audit_once("mdp"), "transition_rows_sum_to_one")


def test_mutant_mean_instead_of_max():
    mean_backup = lambda P, R, gamma, V: (R + gamma * P @ V).mean(-1)  # noqa: E731
    assert_check_fails(audit_once("mdp", bellman_optimality_backup=mean_backup),
                       "bellman_optimality_residual_below_1e-8")


def test_mutant_evaluation_with_wrong_discount():
    wrong = lambda P, R, gamma, policy: ref_eval(P, R, gamma ** 2, policy)  # noqa: E731
    assert_check_fails(audit_once("mdp", evaluate_policy_exact=wrong), "value_and_policy_iteration_agree")


def test_mutant_expectation_ignores_policy():
    uniform = lambda P, R, gamma, policy, V: ref_exp(P, R, gamma, torch.full_like(policy, 1 / policy.shape[1]), V)  # noqa: E731
    assert_check_fails(audit_once("mdp", bellman_expectation_backup=uniform), "iterative_evaluation_equals_linear_solve")


def test_mutant_backup_with_inflated_discount():
    inflated = lambda P, R, gamma, V: ref_opt(P, R, gamma ** 0.5, V)  # noqa: E731
    assert_check_fails(audit_once("mdp", overrides={"gamma": "0.5"}, bellman_optimality_backup=inflated),
                       "optimality_backup_is_gamma_contraction")


def test_mutant_min_instead_of_max():
    worst = lambda P, R, gamma, V: (R + gamma * P @ V).min(-1).values  # noqa: E731
    assert_check_fails(audit_once("mdp", bellman_optimality_backup=worst), "optimal_value_dominates_random_policies")


def test_mutant_undiscounted_monte_carlo(monkeypatch):
    real = M.monte_carlo_returns
    monkeypatch.setattr(M, "monte_carlo_returns", lambda env, actions, episodes, gamma, seed: real(env, actions, episodes, 1.0, seed))
    assert_check_fails(audit_once("mdp"), "monte_carlo_return_matches_v_star")
