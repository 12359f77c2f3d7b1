"""cql module and the shared offline setting: the CQL(H) loss and the Double DQN target (vectors and
properties), the data sets, behaviour cloning, exact returns, the audit, and one mutant per check."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.cql import cql as M
from modules.cql import offline as O

DT = torch.float64
FAST = settings(max_examples=40, deadline=None)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=DT)


q_tables = st.builds(lambda B, A, scale, seed: (torch.randn(B, A, generator=torch.Generator().manual_seed(seed),
                                                            dtype=DT) * scale,
                                               torch.randint(A, (B,), generator=torch.Generator().manual_seed(seed + 1))),
                     st.integers(1, 16), st.integers(2, 6), st.floats(0.0, 50.0), st.integers(0, 2**31 - 1))


def penalty_only(q, a):
    """cql_loss with y = Q(s, a_data) and alpha = 1: the conservative penalty alone (batch mean)."""
    return M.cql_loss(q, a, q.detach().gather(-1, a[:, None]).squeeze(-1), 1.0)


# ---------------------------------------------------------------------------------------------------
# cql_loss


def test_cql_penalty_d3rlpy_vectors():
    q = t([1.0, 2.0, 3.0])
    assert penalty_only(q, torch.tensor([0])).item() == pytest.approx(2.4076060, abs=1e-7)
    assert penalty_only(q, torch.tensor([2])).item() == pytest.approx(0.4076060, abs=1e-7)
    assert penalty_only(t([7.0, 7.0, 7.0]), torch.tensor([1])).item() == pytest.approx(math.log(3), abs=1e-12)


def test_cql_gradient_vector_is_softmax_minus_onehot():
    q = t([1.0, 2.0, 3.0]).requires_grad_()
    (grad,) = torch.autograd.grad(penalty_only(q, torch.tensor([0])), q)
    torch.testing.assert_close(grad, t([-0.90997, 0.24473, 0.66524]), atol=1e-5, rtol=0)


@FAST
@given(q_tables, st.floats(0.0, 5.0))
def test_cql_loss_is_td_loss_plus_alpha_times_penalty(case, alpha):
    q, a = case
    y = torch.randn(len(q), generator=torch.Generator().manual_seed(0), dtype=DT)
    td = O.td_loss(q, a, y)
    penalty = (torch.logsumexp(q, -1) - q.gather(-1, a[:, None]).squeeze(-1)).mean()
    assert M.cql_loss(q, a, y, alpha).item() == pytest.approx((td + alpha * penalty).item(), rel=1e-9, abs=1e-9)
    assert M.cql_loss(q, a, y, 0.0).item() == td.item()  # alpha = 0 is exactly the DQN loss


@FAST
@given(q_tables, st.floats(-100.0, 100.0))
def test_cql_penalty_is_nonnegative_shift_invariant_and_its_gradient_sums_to_zero(case, shift):
    q, a = case
    p = penalty_only(q, a)
    assert p.item() >= 0.0
    assert penalty_only(q + shift, a).item() == pytest.approx(p.item(), abs=1e-9)  # only relative Q matters
    qg = q.clone().requires_grad_()
    (grad,) = torch.autograd.grad(penalty_only(qg, a), qg)
    assert grad.sum(-1).abs().max().item() < 1e-12


def test_cql_per_row_alpha_equals_separate_calls():
    g = torch.Generator().manual_seed(3)
    q, a, y = torch.randn(8, 4, generator=g, dtype=DT), torch.randint(4, (8,), generator=g), torch.randn(8, dtype=DT)
    alpha = t(*([0.1] * 4 + [2.0] * 4))
    together = 2 * M.cql_loss(q, a, y, alpha)
    apart = M.cql_loss(q[:4], a[:4], y[:4], 0.1) + M.cql_loss(q[4:], a[4:], y[4:], 2.0)
    assert together.item() == pytest.approx(apart.item(), rel=1e-12)


def test_cql_loss_is_finite_at_huge_q():
    assert penalty_only(t([1e4, 1e4 + 1, 1e4 + 2]), torch.tensor([2])).item() == pytest.approx(0.4076060, abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# The shared Double DQN target and the offline setting


def test_double_dqn_target_vectors_and_terminal():
    y = O.double_dqn_target(t(1.0, 0.5), t([1.0, 3.0], [2.0, -1.0]), t([2.0, 0.5], [1.0, 4.0]), t(0.0, 1.0), 0.9)
    torch.testing.assert_close(y, t(1.45, 0.5))
    nan = O.double_dqn_target(t(2.0), t([float("nan"), 1.0]), t([float("inf"), 0.0]), t(1.0), 0.9)
    assert nan.item() == 2.0


@FAST
@given(st.integers(0, 2**31 - 1))
def test_double_dqn_target_is_at_most_dqn_target(seed):
    g = torch.Generator().manual_seed(seed)
    r, on, tg = torch.randn(32, generator=g, dtype=DT), torch.randn(32, 3, generator=g, dtype=DT), \
        torch.randn(32, 3, generator=g, dtype=DT)
    done = torch.zeros(32, dtype=DT)
    assert (O.double_dqn_target(r, on, tg, done, 0.9) <= r + 0.9 * tg.max(-1).values + 1e-15).all()


def test_huber_matches_d3rlpy():
    torch.testing.assert_close(O.huber(t(0.5, 2.0, -3.0)), t(0.125, 1.5, 2.5))


@pytest.fixture(scope="module")
def setting():
    cfg = M.CQLConfig.toy()
    env = O.make_env(cfg)
    data, behaviour = O.make_datasets(env, cfg, torch.Generator().manual_seed(0))
    return cfg, env, data, behaviour


def test_q_star_is_the_bellman_fixed_point_and_optimal_return_is_v_star(setting):
    cfg, env, _, _ = setting
    backup = env.mdp.R + cfg.gamma * env.mdp.P @ env.q_star.max(-1).values
    assert (backup - env.q_star).abs().max().item() < 1e-10
    best = O.policy_returns(env, O.greedy(env.q_star)).item()
    assert best == pytest.approx(env.optimal_return, abs=1e-10)


def test_datasets_follow_the_dynamics_and_medium_hides_two_actions_per_state(setting):
    cfg, env, data, behaviour = setting
    assert data.states.shape == (3, cfg.n_envs * cfg.n_steps)
    assert (env.mdp.P[data.states, data.actions, data.next_states] > 0).all()  # every transition is possible
    assert torch.equal(data.terminated.bool(), env.mdp.terminal[data.next_states])
    assert torch.equal(data.rewards, env.reward[data.states, data.actions, data.next_states])
    counts = data.counts(*env.q_star.shape)
    assert ((counts[1] > 0).sum(-1) <= 2).all()  # medium: a* and one worse action, never the other two
    torch.testing.assert_close(behaviour.sum(-1), torch.ones(3, 16, dtype=DT))


def test_behaviour_cloning_recovers_the_most_frequent_action(setting):
    cfg, env, data, _ = setting
    S, A = env.q_star.shape
    logits = O.train_bc(data, S, A, cfg, torch.Generator().manual_seed(1))
    counts = data.counts(S, A)
    visited = (counts[2].sum(-1) >= 20) & ~env.mdp.terminal  # expert data, well-visited states
    assert torch.equal(logits[2].argmax(-1)[visited], counts[2].argmax(-1)[visited])


def test_policy_returns_match_monte_carlo_in_gymnasium(setting):
    cfg, env, _, behaviour = setting
    import gymnasium as gym

    gym_env = gym.make("FrozenLake-v1", map_name="4x4", is_slippery=True, max_episode_steps=10_000)
    policy = O.greedy(env.q_star)
    from modules.mdp import monte_carlo_returns
    mc = monte_carlo_returns(gym_env, policy.argmax(-1), 3000, cfg.gamma, seed=0)
    exact = O.policy_returns(env, policy).item()
    assert abs(mc.mean().item() - exact) < 4 * mc.std().item() / math.sqrt(len(mc))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        M.CQLConfig(gamma=1.0)
    with pytest.raises(ValueError):
        M.CQLConfig(growth_from=25)


# ---------------------------------------------------------------------------------------------------
# The audit


def test_audit_passes_toy():
    result = audit_once("cql", "toy", 0)
    assert result.passed, [(c.name, c.measured, c.error) for c in result.checks if not c.passed]
    assert {c.kind for c in result.checks} == {"invariant", "outcome"}
    assert len(result.tables) == 1 and len(next(iter(result.tables.values()))["rows"]) == 3


@pytest.mark.slow
def test_audit_passes_full():
    result = audit_once("cql", "full", 1)
    assert result.passed, [(c.name, c.measured, c.error) for c in result.checks if not c.passed]


def test_audit_is_deterministic():
    only = ["alpha_zero_is_double_dqn_exactly", "penalty_is_nonnegative"]
    assert audit_once("cql", "toy", 2, only=only).to_dict() == audit_once("cql", "toy", 2, only=only).to_dict()


# ---------------------------------------------------------------------------------------------------
# Mutants


def cql_with(*, lse="all", sign=1.0, td="huber", alpha_fixed=None):
    """A configurable wrong cql_loss (the reference when every option is left at its default)."""
    def fn(q_values, actions, td_targets, alpha):
        q_data = q_values.gather(-1, actions[:, None]).squeeze(-1)
        if lse == "all":
            soft = torch.logsumexp(q_values, dim=-1)
        elif lse == "data":
            soft = q_data
        else:  # naive: overflows
            soft = torch.log(torch.exp(q_values).sum(-1))
        diff = q_data - td_targets
        td_part = O.huber(diff) if td == "huber" else 0.5 * diff ** 2
        a = alpha if alpha_fixed is None else alpha_fixed
        return td_part.mean() + (a * sign * (soft - q_data)).mean()
    return fn


def target_with(*, evaluate="target", no_bootstrap=False, mask="where"):
    def fn(reward, next_q_online, next_q_target, terminated, gamma):
        if evaluate == "target":
            value = next_q_target.gather(-1, next_q_online.argmax(-1, keepdim=True)).squeeze(-1)
        elif evaluate == "max_target":
            value = next_q_target.max(-1).values
        elif evaluate == "argmin":
            value = next_q_target.gather(-1, next_q_online.argmin(-1, keepdim=True)).squeeze(-1)
        else:  # the online net values its own argmax
            value = next_q_online.max(-1).values
        if no_bootstrap:
            return reward + 0.0 * value
        if mask == "where":
            return reward + gamma * torch.where(terminated.bool(), 0.0, value)
        return reward + gamma * (1 - terminated) * value
    return fn


MUTANTS = [
    Mutant("penalty_matches_d3rlpy_vectors", "logsumexp over the data action only", {"cql_loss": cql_with(lse="data")}),
    Mutant("td_part_is_huber", "squared error", {"cql_loss": cql_with(td="mse")}),
    Mutant("penalty_is_nonnegative", "penalty sign flipped", {"cql_loss": cql_with(sign=-1.0)}),
    Mutant("penalty_gradient_sums_to_zero_per_state", "logsumexp over the data action only",
           {"cql_loss": cql_with(lse="data")}),
    Mutant("logsumexp_is_stable_at_large_q", "log(sum(exp))", {"cql_loss": cql_with(lse="naive")}),
    Mutant("double_dqn_target_matches_hand_computed", "plain DQN max",
           {"double_dqn_target": target_with(evaluate="max_target")}),
    Mutant("double_dqn_target_never_exceeds_dqn_target", "online net values its own argmax",
           {"double_dqn_target": target_with(evaluate="online")}),
    Mutant("terminal_target_is_reward", "multiplies by 1 - terminated", {"double_dqn_target": target_with(mask="mul")}),
    Mutant("alpha_zero_is_double_dqn_exactly", "alpha ignored", {"cql_loss": cql_with(alpha_fixed=0.01)}),
    Mutant("dqn_overestimates_unseen_actions", "target net never synced", overrides={"target_every": "100000"}),
    Mutant("dqn_overestimation_grows_during_training", "no bootstrap",
           {"double_dqn_target": target_with(no_bootstrap=True)}),
    Mutant("cql_stays_below_truth_on_unseen_actions", "penalty sign flipped", {"cql_loss": cql_with(sign=-1.0)}),
    Mutant("cql_beats_behaviour_cloning_on_medium", "penalty sign flipped", {"cql_loss": cql_with(sign=-1.0)}),
    Mutant("cql_beats_behaviour_policy_on_medium", "bootstraps from the online argmin",
           {"double_dqn_target": target_with(evaluate="argmin")}),
]


def test_reference_options_reproduce_the_reference():
    g = torch.Generator().manual_seed(0)
    q, a, y = torch.randn(6, 4, generator=g, dtype=DT), torch.randint(4, (6,), generator=g), torch.randn(6, dtype=DT)
    assert cql_with()(q, a, y, 0.3).item() == M.cql_loss(q, a, y, 0.3).item()
    args = (y, q, torch.randn(6, 4, generator=g, dtype=DT), (torch.rand(6, generator=g) < 0.3).to(DT), 0.9)
    assert torch.equal(target_with()(*args), O.double_dqn_target(*args))


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("cql", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("cql", MUTANTS)
