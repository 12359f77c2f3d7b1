"""td module (day 2): kernels, the tensor CliffWalking, the learning loops, and its audit with mutants."""
from __future__ import annotations

import pytest
import torch
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params, patched
from hypothesis import given, settings
from hypothesis import strategies as st

import modules.td.td as TT  # the module whose globals the functions look up (for patches)
from modules import mdp
from modules import td as M

D = mdp.DTYPE


def t(values, dtype=D):
    return torch.tensor(values, dtype=dtype)


def q_tables(draw_rows: int = 6, n_actions: int = 4):
    """Hypothesis strategy: (B, A) Q-values on a coarse grid, so that ties at the maximum are common."""
    return st.lists(st.lists(st.integers(-3, 3), min_size=n_actions, max_size=n_actions),
                    min_size=1, max_size=draw_rows).map(lambda rows: t(rows) * 0.5)


# ---------------------------------------------------------------------------------------------------
# Kernels: hand-worked anchors (Sutton & Barto's definitions; CleanRL's terminal convention)


def test_anchor_targets_and_update():
    r, nq, live = t([1.0]), t([[1.0, 3.0]]), t([0.0])
    assert M.q_learning_target(r, nq, live, 0.9).item() == pytest.approx(3.7)
    assert M.sarsa_target(r, nq, torch.tensor([0]), live, 0.9).item() == pytest.approx(1.9)
    probs = M.epsilon_greedy_probs(nq, 0.1)
    assert torch.allclose(probs, t([[0.05, 0.95]]))
    assert M.expected_sarsa_target(r, nq, probs, live, 0.9).item() == pytest.approx(3.61)
    assert M.td0_target(r, t([3.0]), live, 0.9).item() == pytest.approx(3.7)
    assert M.td_update(t([2.0]), t([3.7]), 0.5).item() == pytest.approx(2.85)


def test_epsilon_greedy_splits_ties():
    assert torch.allclose(M.epsilon_greedy_probs(t([2.0, 2.0, 0.0]), 0.3), t([0.45, 0.45, 0.1]))
    assert torch.allclose(M.epsilon_greedy_probs(t([[0.0, 0.0, 0.0, 0.0]]), 0.0), t([[0.25] * 4]))


def epsilon_greedy_slow(q: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.zeros_like(q)
    for i, row in enumerate(q.tolist()):
        best = [a for a, v in enumerate(row) if v == max(row)]
        for a in range(len(row)):
            out[i, a] = eps / len(row) + ((1 - eps) / len(best) if a in best else 0.0)
    return out


@settings(max_examples=60, deadline=None)
@given(q=q_tables(), eps=st.floats(0.0, 1.0))
def test_epsilon_greedy_is_a_distribution_that_matches_the_definition(q, eps):
    p = M.epsilon_greedy_probs(q, eps)
    assert torch.allclose(p.sum(-1), torch.ones(q.shape[0], dtype=D), atol=1e-12)
    assert (p >= eps / q.shape[-1] - 1e-12).all()
    assert torch.allclose(p, epsilon_greedy_slow(q, eps), atol=1e-12)
    assert torch.allclose(M.epsilon_greedy_probs(q + 7.0, eps), p)  # only the ranking matters


def targets_slow(r, nq, a, probs, done, gamma):
    """Per-row Python loop, one formula per algorithm, for comparison with the batched kernels."""
    rows = []
    for i in range(len(r)):
        boot = 0.0 if done[i] == 1.0 else gamma
        qs = nq[i].tolist()
        rows.append((r[i].item() + boot * max(qs), r[i].item() + boot * qs[a[i]],
                     r[i].item() + boot * sum(p * v for p, v in zip(probs[i].tolist(), qs))))
    return t(rows).T


@settings(max_examples=60, deadline=None)
@given(q=q_tables(), seed=st.integers(0, 10_000), gamma=st.floats(0.0, 1.0), eps=st.floats(0.0, 1.0))
def test_targets_agree_with_a_per_row_loop(q, seed, gamma, eps):
    g = torch.Generator().manual_seed(seed)
    B, A = q.shape
    r = torch.randn(B, generator=g, dtype=D)
    done = (torch.rand(B, generator=g) < 0.3).to(D)
    a = torch.randint(A, (B,), generator=g)
    probs = M.epsilon_greedy_probs(q, eps)
    want = targets_slow(r, q, a, probs, done, gamma)
    assert torch.allclose(M.q_learning_target(r, q, done, gamma), want[0], atol=1e-12)
    assert torch.allclose(M.sarsa_target(r, q, a, done, gamma), want[1], atol=1e-12)
    assert torch.allclose(M.expected_sarsa_target(r, q, probs, done, gamma), want[2], atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(q=q_tables(), gamma=st.floats(0.0, 1.0), eps=st.floats(0.0, 1.0), shift=st.floats(-5, 5))
def test_target_orderings_and_special_cases(q, gamma, eps, shift):
    B, A = q.shape
    r, live = torch.zeros(B, dtype=D), torch.zeros(B, dtype=D)
    probs = M.epsilon_greedy_probs(q, eps)
    q_max = M.q_learning_target(r, q, live, gamma)
    expected = M.expected_sarsa_target(r, q, probs, live, gamma)
    assert (expected <= q_max + 1e-12).all()  # an average never beats the max
    for a in range(A):  # every SARSA target is at most the Q-learning one
        assert (M.sarsa_target(r, q, torch.full((B,), a), live, gamma) <= q_max + 1e-12).all()
    greedy = M.epsilon_greedy_probs(q, 0.0)  # eps = 0: expected SARSA is Q-learning
    assert torch.allclose(M.expected_sarsa_target(r, q, greedy, live, gamma), q_max, atol=1e-12)
    onehot = torch.nn.functional.one_hot(torch.zeros(B, dtype=torch.long), A).to(D)  # one-hot: SARSA
    assert torch.allclose(M.expected_sarsa_target(r, q, onehot, live, gamma),
                          M.sarsa_target(r, q, torch.zeros(B, dtype=torch.long), live, gamma))
    # shifting every next value by c shifts the (non-terminal) target by gamma * c
    assert torch.allclose(M.q_learning_target(r, q + shift, live, gamma), q_max + gamma * shift, atol=1e-9)
    # TD(0) on V is SARSA with a single action
    assert torch.allclose(M.td0_target(r, q[:, 0], live, gamma),
                          M.sarsa_target(r, q[:, :1], torch.zeros(B, dtype=torch.long), live, gamma))


next_values = st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e6, -1e6, 0.0, 2.5])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), values=st.lists(st.lists(next_values, min_size=3, max_size=3), min_size=1,
                                                     max_size=6), gamma=st.floats(0.0, 1.0))
def test_terminal_targets_are_the_reward_whatever_the_next_values(seed, values, gamma):
    """y = r exactly at a terminal step, even when Q(s') holds inf or NaN (torch.where, not 1 - d)."""
    g = torch.Generator().manual_seed(seed)
    big = t(values)
    B, A = big.shape
    r, done = torch.randn(B, generator=g, dtype=D), torch.ones(B, dtype=D)
    probs = torch.softmax(torch.randn(B, A, generator=g, dtype=D), -1)
    for y in (M.td0_target(r, big[:, 0], done, gamma), M.q_learning_target(r, big, done, gamma),
              M.sarsa_target(r, big, torch.randint(A, (B,), generator=g), done, gamma),
              M.expected_sarsa_target(r, big, probs, done, gamma)):
        assert torch.equal(y, r)


def test_non_terminal_nan_still_propagates():
    nan = t([[float("nan"), 1.0]])
    assert torch.isnan(M.q_learning_target(t([1.0]), nan, t([0.0]), 0.9)).all()
    assert torch.isnan(M.td0_target(t([1.0]), nan[:, 0], t([0.0]), 0.9)).all()


@settings(max_examples=60, deadline=None)
@given(x=st.floats(-100, 100), y=st.floats(-100, 100), alpha=st.floats(0.0, 1.0))
def test_td_update_moves_a_fraction_alpha_toward_the_target(x, y, alpha):
    new = M.td_update(t([x]), t([y]), alpha).item()
    assert abs(new - y) == pytest.approx((1 - alpha) * abs(x - y), abs=1e-9)
    assert min(x, y) - 1e-9 <= new <= max(x, y) + 1e-9
    assert M.td_update(t([x]), t([y]), 0.0).item() == x
    assert M.td_update(t([x]), t([y]), 1.0).item() == pytest.approx(y, abs=1e-12)


def test_td_update_takes_per_element_step_sizes():
    assert torch.allclose(M.td_update(t([2.0, 0.0]), t([3.7, 1.0]), t([0.5, 0.1])), t([2.85, 0.1]))


# ---------------------------------------------------------------------------------------------------
# Sampling, the tensor env, and bookkeeping


def test_sample_actions_follows_the_probabilities_and_is_seeded():
    probs = t([[0.1, 0.2, 0.7], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).repeat(4000, 1)
    a = M.sample_actions(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(a[0::3], minlength=3).to(D) / 4000
    assert torch.allclose(freq, probs[0], atol=0.03)
    assert (a[1::3] == 1).all() and (a[2::3] == 0).all()  # zero-probability actions never drawn
    assert torch.equal(a, M.sample_actions(probs, torch.Generator().manual_seed(0)))


def test_tensor_cliff_is_gymnasiums_table():
    env, gym_env = M.make_cliff_env()
    table = gym_env.unwrapped.P
    assert (env.n_states, env.n_actions, env.start_state) == (48, 4, 36)
    s = torch.arange(48).repeat_interleave(4)
    a = torch.arange(4).repeat(48)
    s_next, r, term = env.step(s, a)
    for i in range(48 * 4):
        (_, want_s, want_r, want_t), = table[int(s[i])][int(a[i])]
        assert (int(s_next[i]), float(r[i]), bool(term[i])) == (want_s, want_r, want_t)
    # a fall costs -100 and sends you back to the start without ending the episode
    s_next, r, term = env.step(torch.tensor([36]), torch.tensor([1]))
    assert (int(s_next), float(r), float(term)) == (36, -100.0, 0.0)
    # reaching the goal terminates; with autoreset the next state is already the start
    s_next, r, term = env.step(torch.tensor([35]), torch.tensor([2]), autoreset=True)
    assert (int(s_next), float(r), float(term)) == (36, -1.0, 1.0)


def test_tensor_env_agrees_with_gymnasium_on_random_sequences():
    env, gym_env = M.make_cliff_env()
    actions = torch.randint(4, (6, 60), generator=torch.Generator().manual_seed(3))
    actions[::2, :13] = torch.tensor([0] + [1] * 11 + [2])
    assert M.compare_with_gymnasium(env, gym_env, actions, seed=0) == 0


def test_tensor_env_rejects_a_stochastic_table():
    import gymnasium as gym

    slippery = gym.make("CliffWalking-v1", is_slippery=True).unwrapped
    with pytest.raises(ValueError, match="deterministic"):
        M.CliffTensorEnv(slippery.P, 36)


def episode_returns_slow(rewards, dones):
    out = []
    for b in range(rewards.shape[1]):
        eps, total = [], 0.0
        for step in range(rewards.shape[0]):
            total += rewards[step, b].item()
            if dones[step, b] == 1.0:
                eps.append(total)
                total = 0.0
        out.append(eps)
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 30), B=st.integers(1, 5))
def test_episode_returns_match_a_loop(seed, T, B):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(-5, 5, (T, B), generator=g).to(D)
    dones = (torch.rand(T, B, generator=g) < 0.3).to(D)
    returns, finished = M.episode_returns(rewards, dones)
    want = episode_returns_slow(rewards, dones)
    for b in range(B):
        assert finished[b].item() == len(want[b])
        assert returns[b, :len(want[b])].tolist() == pytest.approx(want[b])
        assert torch.isnan(returns[b, len(want[b]):]).all()
    k = 2
    tail = M.last_episodes_mean(returns, finished, k)
    for b in range(B):
        if len(want[b]) >= k:
            assert tail[b].item() == pytest.approx(sum(want[b][-k:]) / k)
        else:
            assert torch.isnan(tail[b])


def test_greedy_rollout_finds_the_edge_path_and_detects_loops():
    env, _ = M.make_cliff_env()
    Q = torch.zeros(2, 48, 4, dtype=D)
    for s, a in zip([36] + list(range(24, 35)) + [35], [0] + [1] * 11 + [2]):
        Q[0, s, a] = 1.0  # table 0: up, right x 11, down; table 1: all zero -> up forever
    ret, reached, falls = M.greedy_rollout(env, Q, 100)
    assert ret[0].item() == -13 and reached[0] and falls[0] == 0
    assert not reached[1]


# ---------------------------------------------------------------------------------------------------
# The learning loops on small problems with known answers


def test_td0_learns_the_value_of_a_self_loop():
    """Single state, reward 1, gamma = 0.9: V = 1 / (1 - 0.9) = 10, the geometric sum."""
    loop = mdp.TabularMDP(P=torch.ones(1, 1, 1, dtype=D), R=torch.ones(1, 1, dtype=D), gamma=0.9,
                          terminal=torch.zeros(1, dtype=torch.bool), start=torch.ones(1, dtype=D))
    V, _, _ = M.td0_evaluation(loop, torch.ones(1, 1, dtype=D), 4, 3000, 20.0, torch.Generator().manual_seed(0))
    assert torch.allclose(V, torch.full_like(V, 10.0), atol=1e-3)


def test_q_learning_with_random_behaviour_reaches_q_star():
    g = torch.Generator().manual_seed(1)
    m = M.random_deterministic_mdp(4, 2, 0.8, g)
    assert torch.equal(m.P.sum(-1), torch.ones(4, 2, dtype=D)) and set(m.P.unique().tolist()) <= {0.0, 1.0}
    q_star = mdp.q_from_v(m.P, m.R, m.gamma, mdp.value_iteration(m, tol=1e-13).V)
    Q, steps, history = M.q_learning_generative(m, 4, 2000, 0.5, g)
    assert (Q - q_star).abs().max() < 1e-8
    assert history.shape == (len(steps), 4, 4, 2)


def test_train_cliff_is_seeded_and_shapes_are_right():
    env, _ = M.make_cliff_env()
    a = M.train_cliff(env, 2, 300, 0.5, 0.1, 0.5, 0.1, 1.0, torch.Generator().manual_seed(0))
    b = M.train_cliff(env, 2, 300, 0.5, 0.1, 0.5, 0.1, 1.0, torch.Generator().manual_seed(0))
    for name in M.ALGORITHMS:
        assert a.Q[name].shape == (2, 48, 4)
        assert torch.equal(a.Q[name], b.Q[name])
        assert torch.equal(a.episodes[name], b.episodes[name])
        assert (a.Q[name][:, 47] == 0).all()  # the goal is never updated: nothing follows it


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        M.TDConfig(epsilon=1.5)
    with pytest.raises(ValueError):
        M.TDConfig(anneal_from=1.0)


def test_experiments_and_run_are_seeded():
    cfg = M.TDConfig(n_agents=2, steps=200, eval_agents=8, eval_steps=50, qstar_agents=2, qstar_steps=50)
    a, b = M.run(cfg, torch.Generator().manual_seed(0)), M.run(cfg, torch.Generator().manual_seed(0))
    assert torch.equal(a.td0.history, b.td0.history) and torch.equal(a.q_star.history, b.q_star.history)
    assert a.td0.mean_error.shape == a.td0.checkpoints.shape
    assert a.q_star.error.shape == a.q_star.checkpoints.shape
    for name in M.ALGORITHMS:
        assert torch.equal(a.cliff.Q[name], b.cliff.Q[name])
        assert [x.shape for x in a.greedy[name]] == [(2,)] * 3


# ---------------------------------------------------------------------------------------------------
# The audit: passes, is deterministic, and every check can fail


def test_audit_passes_in_toy_mode():
    result = audit_once("td", "toy", 0)
    assert result.error is None
    assert result.passed, [(c.name, c.measured_text) for c in result.checks if not c.passed]
    assert {"charts/episodic_return/q_learning", "charts/episodic_return/sarsa"} <= set(result.series)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_audit_passes_in_full_mode(seed):
    result = audit_once("td", "full", seed)
    assert result.passed, [(c.name, c.measured_text) for c in result.checks if not c.passed]


def test_same_seed_same_result():
    assert audit_once("td", "toy", 3).deterministic_dict() == audit_once("td", "toy", 3).deterministic_dict()


real_make_cliff_env = M.make_cliff_env


def cliff_terminates():  # a common misreading of CliffWalking: the fall ends the episode
    env, gym_env = real_make_cliff_env()
    env.terminated[env.reward == -100] = 1.0
    env.next_state_autoreset = torch.where(env.terminated.bool(), env.start_state, env.next_state)
    return env, gym_env


def no_autoreset():
    env, gym_env = real_make_cliff_env()
    env.next_state_autoreset = env.next_state.clone()
    return env, gym_env


def argmax_one_hot(q_values, epsilon):  # ties are not split: the first maximum takes everything
    greedy = torch.nn.functional.one_hot(q_values.argmax(-1), q_values.shape[-1]).to(q_values.dtype)
    return epsilon / q_values.shape[-1] + (1 - epsilon) * greedy


def q_learning_mean(reward, next_q, terminated, gamma):  # averages instead of maximising
    return reward + gamma * torch.where(terminated.bool(), 0.0, next_q.mean(-1))


def q_learning_no_mask(reward, next_q, terminated, gamma):  # bootstraps through the episode end
    return reward + gamma * next_q.max(-1).values


def q_learning_multiplied_mask(reward, next_q, terminated, gamma):  # 0 * inf = NaN at a terminal step
    return reward + gamma * (1.0 - terminated) * next_q.max(-1).values


def sarsa_multiplied_mask(reward, next_q, next_action, terminated, gamma):
    return reward + gamma * (1.0 - terminated) * next_q.gather(-1, next_action[:, None]).squeeze(-1)


def sarsa_with_max(reward, next_q, next_action, terminated, gamma):  # that is Q-learning
    return reward + gamma * torch.where(terminated.bool(), 0.0, next_q.max(-1).values)


def expected_sarsa_uniform(reward, next_q, next_probs, terminated, gamma):  # ignores the policy
    return reward + gamma * torch.where(terminated.bool(), 0.0, next_q.mean(-1))


def expected_sarsa_with_max(reward, next_q, next_probs, terminated, gamma):  # that is Q-learning
    return reward + gamma * torch.where(terminated.bool(), 0.0, next_q.max(-1).values)


def td0_discounts_reward(reward, next_value, terminated, gamma):  # gamma on the wrong term
    return gamma * reward + torch.where(terminated.bool(), 0.0, next_value)


def td0_without_gamma(reward, next_value, terminated, gamma):  # gamma dropped: V^pi diverges
    return reward + torch.where(terminated.bool(), 0.0, next_value)


def td_update_adds_target(estimate, target, alpha):  # x + alpha * target
    return estimate + alpha * target


MUTANTS = [
    Mutant("tensor_cliff_matches_gymnasium", "the fall ends the episode", patch=patched(TT, "make_cliff_env",
                                                                                        cliff_terminates)),
    Mutant("tensor_cliff_matches_gymnasium", "no auto-reset", patch=patched(TT, "make_cliff_env", no_autoreset)),
    Mutant("epsilon_greedy_probs_match_definition", "ties not split", {"epsilon_greedy_probs": argmax_one_hot}),
    Mutant("q_learning_target_matches_hand_computed", "mean over a'", {"q_learning_target": q_learning_mean}),
    Mutant("sarsa_target_matches_hand_computed", "max over a'", {"sarsa_target": sarsa_with_max}),
    Mutant("expected_sarsa_target_matches_hand_computed", "policy ignored",
           {"expected_sarsa_target": expected_sarsa_uniform}),
    Mutant("td0_target_matches_hand_computed", "gamma on the reward", {"td0_target": td0_discounts_reward}),
    Mutant("td_update_matches_hand_computed", "x + alpha * target", {"td_update": td_update_adds_target}),
    Mutant("terminal_transition_ignores_next_state", "no terminal mask", {"q_learning_target": q_learning_no_mask}),
    Mutant("terminal_target_ignores_non_finite_next_values", "mask multiplied (Q-learning)",
           {"q_learning_target": q_learning_multiplied_mask}),
    Mutant("terminal_target_ignores_non_finite_next_values", "mask multiplied (SARSA)",
           {"sarsa_target": sarsa_multiplied_mask}),
    Mutant("expected_sarsa_reduces_to_q_learning_and_sarsa", "policy ignored",
           {"expected_sarsa_target": expected_sarsa_uniform}),
    Mutant("td0_converges_to_v_pi", "gamma dropped", {"td0_target": td0_without_gamma}),
    Mutant("q_learning_converges_to_q_star", "mean over a'", {"q_learning_target": q_learning_mean}),
    Mutant("q_learning_greedy_path_is_cliff_edge_optimum", "mean over a'", {"q_learning_target": q_learning_mean}),
    Mutant("sarsa_greedy_path_is_safe", "max over a'", {"sarsa_target": sarsa_with_max}),
    Mutant("expected_sarsa_greedy_path_is_safe", "max over a'", {"expected_sarsa_target": expected_sarsa_with_max}),
    Mutant("sarsa_online_return_beats_q_learning", "max over a'", {"sarsa_target": sarsa_with_max}),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("td", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("td", MUTANTS)
