"""mdp: kernels against independent computations, hypothesis properties, the audit, and its mutants."""
from __future__ import annotations

import pytest
import torch
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params, patched
from hypothesis import given, settings
from hypothesis import strategies as st

import modules.mdp.mdp as MM  # the module whose globals the functions look up (for patches)
from modules import mdp as M

D = M.DTYPE


def _random(seed: int, S: int = 5, A: int = 3, gamma: float = 0.9):
    g = torch.Generator().manual_seed(seed)
    m = M.random_mdp(S, A, gamma, g)
    return m, M.random_policy(S, A, g), torch.randn(S, generator=g, dtype=D), g


def test_single_state_self_loop_value_is_ten():  # V = 1 / (1 - 0.9)
    P = torch.ones(1, 1, 1, dtype=D)
    R = torch.ones(1, 1, dtype=D)
    sol = M.value_iteration(M.TabularMDP(P, R, 0.9, torch.zeros(1, dtype=torch.bool), torch.ones(1, dtype=D)))
    assert abs(sol.V.item() - 10.0) < 1e-9
    assert abs(M.evaluate_policy_exact(P, R, 0.9, torch.ones(1, 1, dtype=D)).item() - 10.0) < 1e-12


def test_two_step_chain():  # s0 -> s1 (r=0), s1 -> terminal (r=1), gamma .9: V(s1)=1, V(s0)=.9
    P = torch.zeros(3, 1, 3, dtype=D)
    P[0, 0, 1] = P[1, 0, 2] = P[2, 0, 2] = 1.0
    R = torch.tensor([[0.0], [1.0], [0.0]], dtype=D)
    V = M.evaluate_policy_exact(P, R, 0.9, torch.ones(3, 1, dtype=D))
    assert torch.allclose(V, torch.tensor([0.9, 1.0, 0.0], dtype=D), atol=1e-12)


def test_backups_match_explicit_loops():
    m, pi, V, _ = _random(0)
    S, A = m.R.shape
    opt = torch.tensor([max(m.R[s, a] + m.gamma * sum(m.P[s, a, t] * V[t] for t in range(S)) for a in range(A))
                        for s in range(S)], dtype=D)
    exp = torch.tensor([sum(pi[s, a] * (m.R[s, a] + m.gamma * sum(m.P[s, a, t] * V[t] for t in range(S)))
                            for a in range(A)) for s in range(S)], dtype=D)
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
    V2 = torch.randn(V1.shape, generator=g, dtype=D)
    T = lambda V: M.bellman_optimality_backup(m.P, m.R, gamma, V)  # noqa: E731
    assert (T(V1) - T(V2)).abs().max() <= gamma * (V1 - V2).abs().max() + 1e-12
    assert torch.allclose(T(V1 + c), T(V1) + gamma * c, atol=1e-9)  # T(V + c) = T V + gamma c


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_backups_are_monotone(seed):
    m, pi, V, g = _random(seed)
    W = V + torch.rand(V.shape, generator=g, dtype=D)  # W >= V
    opt = lambda V: M.bellman_optimality_backup(m.P, m.R, m.gamma, V)  # noqa: E731
    exp = lambda V: M.bellman_expectation_backup(m.P, m.R, m.gamma, pi, V)  # noqa: E731
    assert (opt(W) >= opt(V) - 1e-12).all()
    assert (exp(W) >= exp(V) - 1e-12).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 8), st.integers(1, 4), st.floats(0.0, 0.95))
def test_expected_return_from_a_table_equals_exact_evaluation(seed, S, A, gamma):
    """A random episodic table (some transitions end the episode): pushing the start distribution
    forward gives the same number as the linear solve on the absorbing MDP built from the table."""
    g = torch.Generator().manual_seed(seed)
    table = {}
    for s in range(S):
        table[s] = {}
        for a in range(A):
            nxt = torch.randint(S + 1, (3,), generator=g).tolist()  # S means "the terminal state"
            probs = torch.softmax(torch.randn(3, generator=g, dtype=D), 0).tolist()
            rewards = torch.randn(3, generator=g, dtype=D).tolist()
            table[s][a] = [(p, n, r, n == S) for p, n, r in zip(probs, nxt, rewards)]
    table[S] = {a: [(1.0, S, 0.0, True)] for a in range(A)}
    start = torch.softmax(torch.randn(S + 1, generator=g, dtype=D), 0)
    start[S] = 0.0
    start = start / start.sum()
    actions = torch.randint(A, (S + 1,), generator=g)
    m = M.from_transition_table(table, gamma, start)
    pi = torch.nn.functional.one_hot(actions, A).to(D)
    want = (start @ M.evaluate_policy_exact(m.P, m.R, gamma, pi)).item()
    assert M.expected_return(table, start, actions, gamma) == pytest.approx(want, abs=1e-10)


def test_frozen_lake_table_matches_gymnasium():
    mdp, env = M.frozen_lake(0.99, "4x4", True)
    table = env.unwrapped.P
    for s, actions in table.items():
        for a, outcomes in actions.items():
            expected = torch.zeros(mdp.n_states, dtype=D)
            for p, nxt, _, _ in outcomes:
                expected[nxt] += p
            if not mdp.terminal[s]:
                assert torch.allclose(mdp.P[s, a], expected)
    assert mdp.terminal.sum() == 5  # 4 holes + goal


def test_gridworld_terminal_rows_carry_rewards_until_absorbed():
    table, s0 = M.gridworld_table()
    grid = M.gridworld(0.99)
    goal = grid.terminal.nonzero().flatten().tolist()
    assert len(goal) == 2 and grid.start[s0] == 1.0
    assert any(r != 0 for s in goal for outs in table[s].values() for _, _, r, _ in outs)  # the table's rows
    assert (grid.R[goal] == 0).all() and (grid.P[goal][:, :, goal].sum(-1) == 1).all()  # made absorbing


def test_value_iteration_solves_frozen_lake_known_value():
    mdp, _ = M.frozen_lake(0.99, "4x4", True)
    sol = M.value_iteration(mdp)
    assert abs(sol.V[0].item() - 0.5420) < 1e-3  # the textbook number for slippery 4x4 at gamma .99
    assert torch.allclose(sol.Q, M.q_from_v(mdp.P, mdp.R, mdp.gamma, sol.V))


def test_value_iteration_stops_on_nan():
    mdp, _ = M.frozen_lake(0.99, "4x4", True)
    nan = lambda P, R, gamma, V: torch.full_like(V, float("nan"))  # noqa: E731
    assert M.value_iteration(mdp, backup=nan).iterations == 1


def test_run_is_a_coherent_experiment():
    cfg = M.MDPConfig(mc_episodes=50)
    r = M.run(cfg, torch.Generator().manual_seed(0))
    assert set(r.mdps) == set(r.value_iteration) == set(r.policy_iteration) == {"frozen_lake", "gridworld"}
    for name in r.mdps:
        assert abs(r.expected_return[name] - r.v_star_start[name]) < 1e-8
        assert (r.value_iteration[name].V - r.policy_iteration[name].V).abs().max() < 1e-8
    assert r.mc_returns.shape == (50,) and ((r.mc_returns >= 0) & (r.mc_returns <= 1)).all()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        M.MDPConfig(gamma=1.0)
    with pytest.raises(ValueError):
        M.MDPConfig(mc_episodes=1)


# ------------------------------------------------------------------------------------------------
# The audit


def test_audit_passes_toy():
    result = audit_once("mdp", "toy", 0)
    assert result.error is None, result.error
    assert result.passed, [(c.name, c.measured_text) for c in result.checks if not c.passed]
    assert {c.kind for c in result.checks} == {"invariant", "outcome"}
    assert "mc/running_mean_return" in result.series


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_audit_passes_full(seed):
    result = audit_once("mdp", "full", seed)
    assert result.passed, [(c.name, c.measured_text) for c in result.checks if not c.passed]


def test_audit_is_deterministic():
    assert audit_once("mdp", "toy", 3).deterministic_dict() == audit_once("mdp", "toy", 3).deterministic_dict()


# ------------------------------------------------------------------------------------------------
# Mutants: each check must fail for a plausible wrong kernel or module function


ref_opt, ref_exp, ref_eval = M.bellman_optimality_backup, M.bellman_expectation_backup, M.evaluate_policy_exact
real_frozen_lake, real_monte_carlo_returns = M.frozen_lake, M.monte_carlo_returns


def leaky_frozen_lake(*args, **kwargs):  # drops one outcome of a slippery move
    mdp, env = real_frozen_lake(*args, **kwargs)
    mdp.P[0, 0, mdp.P[0, 0].nonzero()[0]] = 0.0
    return mdp, env



def absorb_keeping_reward(P, R, terminal):  # the self-loop is made, the terminal row keeps its rewards
    idx = terminal.nonzero().flatten()
    P[idx] = 0.0
    P[idx, :, idx] = 1.0


def table_ignoring_done(table, gamma, start):  # reads P and R but marks no state terminal
    S, A = len(table), len(table[0])
    P, R = torch.zeros(S, A, S, dtype=D), torch.zeros(S, A, dtype=D)
    for s in range(S):
        for a in range(A):
            for prob, s_next, reward, _ in table[s][a]:
                P[s, a, int(s_next)] += prob
                R[s, a] += prob * reward
    return M.TabularMDP(P, R, gamma, torch.zeros(S, dtype=torch.bool), start.to(D))


def q_without_gamma(P, R, gamma, V):
    return R + P @ V


MUTANTS = [
    Mutant("transition_rows_sum_to_one", "an outcome dropped", patch=patched(MM, "frozen_lake", leaky_frozen_lake)),
    Mutant("terminal_states_absorb_with_zero_reward", "terminal rows keep their reward",
           patch=patched(MM, "_absorb", absorb_keeping_reward)),
    Mutant("terminal_states_absorb_with_zero_reward", "done flags ignored",
           patch=patched(MM, "from_transition_table", table_ignoring_done)),
    Mutant("value_iteration_reaches_bellman_fixed_point", "mean over actions",
           {"bellman_optimality_backup": lambda P, R, gamma, V: (R + gamma * P @ V).mean(-1)}),
    Mutant("value_and_policy_iteration_agree", "evaluation with gamma squared",
           {"evaluate_policy_exact": lambda P, R, gamma, policy: ref_eval(P, R, gamma ** 2, policy)}),
    Mutant("q_star_is_one_step_lookahead_of_v_star", "Q without gamma", patch=patched(MM, "q_from_v", q_without_gamma)),
    Mutant("iterative_evaluation_equals_linear_solve", "expectation backup ignores the policy",
           {"bellman_expectation_backup":
            lambda P, R, gamma, policy, V: ref_exp(P, R, gamma, torch.full_like(policy, 1 / policy.shape[1]), V)}),
    Mutant("exact_evaluation_is_expectation_fixed_point", "P_pi transposed",
           {"evaluate_policy_exact": lambda P, R, gamma, policy: torch.linalg.solve(
               torch.eye(P.shape[0], dtype=P.dtype) - gamma * torch.einsum("sa,sat->ts", policy, P),
               (policy * R).sum(-1))}),
    Mutant("optimality_backup_is_max_over_expectation_backups", "mean over actions",
           {"bellman_optimality_backup": lambda P, R, gamma, V: (R + gamma * P @ V).mean(-1)}),
    Mutant("optimality_backup_is_gamma_contraction", "discount inflated to sqrt(gamma)",
           {"bellman_optimality_backup": lambda P, R, gamma, V: ref_opt(P, R, gamma ** 0.5, V)}),
    Mutant("optimal_value_dominates_random_policies", "min instead of max",
           {"bellman_optimality_backup": lambda P, R, gamma, V: (R + gamma * P @ V).min(-1).values}),
    Mutant("self_loop_and_chain_values_match_closed_form", "gamma discounts the reward too",
           {"bellman_optimality_backup": lambda P, R, gamma, V: (gamma * (R + P @ V)).max(-1).values}),
    Mutant("expected_return_of_greedy_policy_equals_v_star", "V* 1 % high (rewards scaled by 1.01)",
           {"bellman_optimality_backup": lambda P, R, gamma, V: ref_opt(P, 1.01 * R, gamma, V)}),
    Mutant("monte_carlo_return_matches_v_star", "undiscounted returns",
           patch=patched(MM, "monte_carlo_returns", lambda env, actions, episodes, gamma, seed:
                         real_monte_carlo_returns(env, actions, episodes, 1.0, seed))),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("mdp", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("mdp", MUTANTS)
