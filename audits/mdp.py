"""Audit of the MDP module (day 1): Bellman backups, value iteration, policy iteration, exact evaluation."""
from __future__ import annotations

import torch

from llmaudit.audit import Audit, bound, kernel, max_error, measure
from modules import mdp as M

D = M.DTYPE
TOL = 1e-8  # value iteration stops at a sup-norm change of 1e-12, so V is within gamma/(1-gamma) 1e-12 of V*


def _example() -> dict:
    g = torch.Generator().manual_seed(0)
    m = M.random_mdp(4, 2, 0.9, g)
    return {"P": m.P, "R": m.R, "gamma": m.gamma, "V": torch.randn(4, generator=g, dtype=D)}


def _example_policy() -> dict:
    g = torch.Generator().manual_seed(0)
    m = M.random_mdp(4, 2, 0.9, g)
    return {"P": m.P, "R": m.R, "gamma": m.gamma, "policy": M.random_policy(4, 2, g),
            "V": torch.randn(4, generator=g, dtype=D)}


def _example_eval() -> dict:
    d = _example_policy()
    del d["V"]
    return d


KERNELS = [
    kernel(M.bellman_optimality_backup, example=_example,
           hint="max over actions of R + gamma * P @ V; P @ V contracts the next-state axis."),
    kernel(M.bellman_expectation_backup, example=_example_policy,
           hint="weight each action's one-step lookahead by pi(a|s) and sum over actions."),
    kernel(M.evaluate_policy_exact, example=_example_eval,
           hint="solve (I - gamma * P_pi) V = R_pi with P_pi[s, s'] = sum_a pi(a|s) P[s, a, s']."),
]

mdp = Audit("mdp", day=1, title="MDP five-tuple and Bellman backups", config=M.MDPConfig,
            kernels=KERNELS, formulas=M.FORMULAS)


def _random_cases(n: int, g: torch.Generator):
    """n (MDP, policy, V) triples of varied sizes, gamma from 0 (no future) to 0.99 (a long one)."""
    gammas = [0.0, 0.5, 0.9, 0.99]
    cases = []
    for i in range(n):
        S, A = 2 + i % 7, 1 + i % 4
        m = M.random_mdp(S, A, gammas[i % len(gammas)], g)
        cases.append((m, M.random_policy(S, A, g), 3 * torch.randn(S, generator=g, dtype=D)))
    return cases


# ---- the models: FrozenLake from gymnasium's table, and a gridworld of our own ---------------------

@mdp.fixture
def models(cfg):
    """(mdps, tables, env): FrozenLake-v1 and the 3x4 gridworld as tensors, their gymnasium-style
    tables, and the real FrozenLake env."""
    return M.make_mdps(cfg)


@mdp.check("< 1e-12", hint="every (prob, next_state, reward, done) entry must be added, terminal states included.")
def transition_rows_sum_to_one(models):
    """P(s'|s,a) is a probability distribution over next states for every state-action pair."""
    mdps, _, _ = models
    return [max_error(m.P.sum(-1), torch.ones_like(m.R)) for m in mdps.values()]


@mdp.check({"error": "< 1e-12", "unmarked": "== 0"},
           hint="after the table is read, terminal rows become a self-loop with R = 0; a terminal row "
                "that keeps its moves' rewards collects them forever.")
def terminal_states_absorb_with_zero_reward(models):
    """After the episode ends nothing more happens: every state a done transition lands in must loop
    on itself with reward 0, so that V(terminal) = 0 and no value leaks past the goal."""
    mdps, tables, _ = models
    errors, unmarked = [], 0
    for name, m in mdps.items():
        ends = {int(s2) for row in tables[name].values() for outs in row.values() for p, s2, _, done in outs
                if done and p > 0}
        unmarked += sum(not bool(m.terminal[s]) for s in ends)
        for s in m.terminal.nonzero().flatten().tolist():
            errors += [max_error(m.P[s, :, s], torch.ones(m.n_actions, dtype=D)), max_error(m.R[s], 0 * m.R[s])]
    return measure({"error": errors or [0.0], "unmarked": unmarked},
                   f"{sum(int(m.terminal.sum()) for m in mdps.values())} terminal states")


# ---- value iteration and policy iteration on the two models ---------------------------------------

@mdp.fixture
def vi_solutions(cfg, models, bellman_optimality_backup):
    """Value iteration V <- T*V to a sup-norm change of cfg.tol, on each model."""
    return M.solve_by_value_iteration(models[0], cfg, bellman_optimality_backup)


@mdp.fixture
def pi_solutions(models, evaluate_policy_exact):
    """Policy iteration (exact evaluation + greedy improvement) on each model."""
    return M.solve_by_policy_iteration(models[0], evaluate_policy_exact)


@mdp.check(f"< {TOL}", hint="value iteration must apply max_a [R + gamma * P V]; a mean over actions "
                            "converges to the value of the uniform policy instead.")
def value_iteration_reaches_bellman_fixed_point(models, vi_solutions):
    """V* is the unique fixed point of the Bellman optimality operator: ||T*V - V|| = 0 for the V that
    value iteration returns (T* here is the reference operator)."""
    return [M.bellman_residual(m, vi_solutions[name].V) for name, m in models[0].items()]


@mdp.check({"value_gap": f"< {TOL}", "disagreements": "== 0"},
           hint="policy improvement is argmax_a Q^pi(s,a); evaluation must be of the current policy.")
def value_and_policy_iteration_agree(vi_solutions, pi_solutions):
    """Both methods find the unique optimal value function; greedy actions agree up to ties."""
    gaps, disagreements = [], 0
    for name, vi in vi_solutions.items():
        gaps.append(max_error(pi_solutions[name].V, vi.V))
        chosen = (pi_solutions[name].policy * vi.Q).sum(-1)  # VI's Q* of the action PI chose
        disagreements += int((chosen < vi.Q.max(-1).values - TOL).sum())  # ties are agreements
    return {"value_gap": gaps, "disagreements": disagreements}


def _lookahead_from_table(table: dict, terminal: torch.Tensor, V: torch.Tensor, gamma: float) -> torch.Tensor:
    """Q(s,a) = sum over the table's outcomes p * (r + gamma * V(s') unless done), 0 once terminal: a
    plain loop over gymnasium's own entries, independent of the tensors P and R."""
    S, A = len(table), len(table[0])
    Q, values = torch.zeros(S, A, dtype=D), V.tolist()
    for s in range(S):
        for a in range(A):
            if not terminal[s]:
                Q[s, a] = sum(p * (r + (0.0 if done else gamma * values[int(s2)])) for p, s2, r, done in table[s][a])
    return Q


@mdp.check({"q_error": "< 1e-10", "v_is_max_q": f"< {TOL}"},
           hint="Q = R + gamma * P @ V: gamma multiplies the next-state value, and terminal states have Q = 0.")
def q_star_is_one_step_lookahead_of_v_star(models, vi_solutions, cfg):
    """Q*(s,a) = r + gamma E[V*(s')] and V*(s) = max_a Q*(s,a): the Q values the greedy policy is read
    from must be right, not only their argmax (a Q without gamma often has the same argmax)."""
    mdps, tables, _ = models
    q_err, v_err = [], []
    for name, m in mdps.items():
        sol = vi_solutions[name]
        q_err.append(max_error(sol.Q, _lookahead_from_table(tables[name], m.terminal, sol.V, cfg.gamma)))
        v_err.append(max_error(sol.V, sol.Q.max(-1).values))
    return {"q_error": q_err, "v_is_max_q": v_err}


# ---- the kernels on random MDPs and random policies -----------------------------------------------

@mdp.check(f"< {TOL}", hint="P_pi and R_pi average over actions with pi(a|s); the iteration must use the same policy.")
def iterative_evaluation_equals_linear_solve(cfg, g, models, bellman_expectation_backup, evaluate_policy_exact):
    """Repeated Bellman expectation backups converge to (I - gamma P_pi)^-1 R_pi, the unique fixed
    point, on FrozenLake and the gridworld for random stochastic policies."""
    errors = []
    for m in models[0].values():
        for _ in range(cfg.n_iterative_policies):
            pi = M.random_policy(m.n_states, m.n_actions, g)
            v_iter = M.iterative_policy_evaluation(m, pi, cfg.tol, cfg.max_iters, backup=bellman_expectation_backup)
            errors.append(max_error(v_iter, evaluate_policy_exact(m.P, m.R, m.gamma, pi)))
    return errors


@mdp.check("< 1e-9", hint="V = solve(I - gamma P_pi, R_pi); a gamma missing on either side breaks the identity.")
def exact_evaluation_is_expectation_fixed_point(cfg, g, bellman_expectation_backup, evaluate_policy_exact):
    """V^pi solves the Bellman expectation equation, so one more backup leaves it unchanged:
    T^pi V^pi = V^pi, for random MDPs from gamma = 0 (V = R_pi) to gamma = 0.99."""
    errors = []
    for m, pi, _ in _random_cases(cfg.n_random_policies, g):
        V = evaluate_policy_exact(m.P, m.R, m.gamma, pi)
        errors.append(max_error(bellman_expectation_backup(m.P, m.R, m.gamma, pi, V), V))
    return errors


@mdp.check({"excess": "<= 1e-12", "greedy_gap": "< 1e-12"},
           hint="T* takes the max over actions where T^pi takes the pi-weighted mean; both share R + gamma P V.")
def optimality_backup_is_max_over_expectation_backups(cfg, g, bellman_optimality_backup, bellman_expectation_backup):
    """A max over actions is at least any pi-weighted average, and equals it for the greedy policy:
    T^pi V <= T*V for every pi, with equality when pi is greedy in R + gamma P V."""
    excess, greedy_gap = [], []
    for m, pi, V in _random_cases(cfg.n_random_policies, g):
        best = bellman_optimality_backup(m.P, m.R, m.gamma, V)
        excess.append((bellman_expectation_backup(m.P, m.R, m.gamma, pi, V) - best).max())
        greedy = M.greedy_policy(M.q_from_v(m.P, m.R, m.gamma, V))
        greedy_gap.append(max_error(bellman_expectation_backup(m.P, m.R, m.gamma, greedy, V), best))
    return {"excess": excess, "greedy_gap": greedy_gap}


@mdp.check("<= 1e-9", hint="the discount must multiply the next-state value: R + gamma * P @ V.")
def optimality_backup_is_gamma_contraction(cfg, g, models, bellman_optimality_backup):
    """A discounted Bellman backup shrinks distances by gamma, so value iteration converges to a
    unique fixed point from any start: ||T*V1 - T*V2|| / (gamma ||V1 - V2||) - 1 <= 0 (up to
    round-off) on random pairs, half of them a constant shift apart, where the bound is tight."""
    ratios = []
    for m in (models[0]["frozen_lake"], M.random_mdp(12, 3, 0.9, g)):
        n = cfg.n_value_pairs
        V1 = torch.randn(n, m.n_states, generator=g, dtype=D) * 3
        shift = torch.randn(n, 1, generator=g, dtype=D) * 3
        noise = torch.randn(n, m.n_states, generator=g, dtype=D)
        V2 = torch.where(torch.arange(n)[:, None] % 2 == 0, V1 + shift + 1e-3 * noise,
                         torch.randn(n, m.n_states, generator=g, dtype=D) * 3)
        for v1, v2 in zip(V1, V2):
            lhs = (bellman_optimality_backup(m.P, m.R, m.gamma, v1)
                   - bellman_optimality_backup(m.P, m.R, m.gamma, v2)).abs().max()
            ratios.append(lhs / (m.gamma * (v1 - v2).abs().max()))
    ratios = torch.stack(ratios)
    return measure(ratios - 1.0, f"max ratio {ratios.max().item():.12f}")


@mdp.check(bound(">= -1e-9"), hint="V* needs the max over actions; a min or a mean gives a worse policy's value.")
def optimal_value_dominates_random_policies(cfg, g, models, vi_solutions, evaluate_policy_exact):
    """No policy beats the optimal one in any state: V*(s) >= V^pi(s) for all s and pi."""
    gaps = []
    for name, m in models[0].items():
        for _ in range(cfg.n_random_policies):
            pi = M.random_policy(m.n_states, m.n_actions, g)
            gaps.append(vi_solutions[name].V - evaluate_policy_exact(m.P, m.R, m.gamma, pi))
    return torch.cat(gaps)


def _chain() -> M.TabularMDP:
    """s0 -> s1 (r = 0), s1 -> terminal s2 (r = 1), s2 absorbing; one action."""
    P = torch.zeros(3, 1, 3, dtype=D)
    P[0, 0, 1] = P[1, 0, 2] = P[2, 0, 2] = 1.0
    R = torch.tensor([[0.0], [1.0], [0.0]], dtype=D)
    return M.TabularMDP(P, R, 0.9, torch.tensor([False, False, True]), torch.tensor([1.0, 0, 0], dtype=D))


def _self_loop() -> M.TabularMDP:
    one = torch.ones(1, dtype=D)
    return M.TabularMDP(torch.ones(1, 1, 1, dtype=D), torch.ones(1, 1, dtype=D), 0.9,
                        torch.zeros(1, dtype=torch.bool), one)


@mdp.check("< 1e-9", hint="the discount compounds once per step: V(s0) = gamma * V(s1), and V(terminal) = 0.")
def self_loop_and_chain_values_match_closed_form(bellman_optimality_backup, bellman_expectation_backup,
                                                 evaluate_policy_exact):
    """A state looping on itself with r = 1 is worth the geometric sum 1 / (1 - gamma) = 10 at
    gamma = 0.9; the chain s0 -> s1 -> end (r = 0, then 1) is worth [0.9, 1, 0]. Value iteration,
    iterated expectation backups and the linear solve must all give these numbers."""
    errors = []
    for m, want in ((_self_loop(), [10.0]), (_chain(), [0.9, 1.0, 0.0])):
        want = torch.tensor(want, dtype=D)
        pi = torch.ones(m.n_states, 1, dtype=D)
        errors += [max_error(M.value_iteration(m, 1e-12, 10_000, backup=bellman_optimality_backup).V, want),
                   max_error(M.iterative_policy_evaluation(m, pi, 1e-12, 10_000, backup=bellman_expectation_backup),
                             want),
                   max_error(evaluate_policy_exact(m.P, m.R, m.gamma, pi), want)]
    return errors


# ---- the optimal policy in the environment ----------------------------------------------------------

def _v_start(models, vi_solutions) -> dict[str, float]:
    return {name: (m.start @ vi_solutions[name].V).item() for name, m in models[0].items()}


@mdp.fixture
def expected_returns(models, vi_solutions):
    """E[G] of VI's greedy policy from the start, pushed through each gymnasium-style table."""
    mdps, tables, _ = models
    return {name: M.expected_return(tables[name], m.start, vi_solutions[name].policy.argmax(-1), m.gamma)
            for name, m in mdps.items()}


@mdp.fixture(cost=5)
def mc_returns(cfg, g, models, vi_solutions):
    """Discounted returns of VI's greedy policy over cfg.mc_episodes episodes of the real FrozenLake."""
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    actions = vi_solutions["frozen_lake"].policy.argmax(-1)
    return M.monte_carlo_returns(models[2], actions, cfg.mc_episodes, cfg.gamma, seed)


@mdp.check("< 1e-8", hint="V* and the greedy policy must come from the same model as the env: R(s,a) is the "
                          "expected reward of the table's outcomes, terminal states absorb with reward 0.")
def expected_return_of_greedy_policy_equals_v_star(models, vi_solutions, expected_returns):
    """V*(s0) is the expected discounted return of the optimal policy. Pushing the start distribution
    through gymnasium's table step by step gives that expectation exactly, so the relative gap
    |E[G] - V*(s0)| / |V*(s0)| is round-off: a 1 % error in V* is 1e-2 here, where sampling could
    not resolve it."""
    v_start = _v_start(models, vi_solutions)
    return measure([abs(expected_returns[n] - v_start[n]) / abs(v_start[n]) for n in v_start],
                   f"FrozenLake E[G] {expected_returns['frozen_lake']:.6f} vs V*(s0) {v_start['frozen_lake']:.6f}")


@mdp.check("<= mc_z", kind="outcome", hint="the return is discounted per step (gamma^t r_t), and the policy is "
                                           "greedy in Q*.")
def monte_carlo_return_matches_v_star(models, vi_solutions, mc_returns):
    """Sampled episodes of the optimal policy in the real gymnasium env average to V*(s0) within their
    standard error: the returns are bounded in [0, 1], so |mean - V*(s0)| / SE is close to |N(0, 1)|."""
    mean, se = mc_returns.mean(), mc_returns.std() / mc_returns.numel() ** 0.5
    v_star = _v_start(models, vi_solutions)["frozen_lake"]
    return measure((mean - v_star).abs() / se, f"{mean.item():.4f} ± {se.item():.4f} vs V*(s0) = {v_star:.4f}")


@mdp.report
def curves(ctx, models, vi_solutions, pi_solutions, expected_returns, mc_returns):
    vi = vi_solutions["frozen_lake"]
    ctx.series("vi/sup_norm_change_log10", torch.tensor(vi.deltas).clamp_min(1e-300).log10(),
               x_label="value-iteration sweep", label=r"value iteration: largest change of $V$ per sweep",
               y_label=r"$\log_{10} \max_s |V_{k+1}(s) - V_k(s)|$", key=True)
    ctx.series("pi/policy_changes", pi_solutions["frozen_lake"].deltas, x_label="policy-iteration step", smooth=False,
               label="policy iteration: actions changed per step", y_label="states whose action changed")
    returns, v_start = mc_returns, _v_start(models, vi_solutions)
    running = returns.cumsum(0) / torch.arange(1, returns.numel() + 1, dtype=D)
    v_star = v_start["frozen_lake"]
    ctx.series("mc/running_mean_return", running, x_label="episode", group="mc/return_vs_v_star", smooth=False,
               label="running mean of sampled returns", y_label=r"return from $s_0$ (discounted)",
               title=r"Monte Carlo return converges to $V^*(s_0)$")
    ctx.series("mc/v_star", [v_star] * returns.numel(), x_label="episode", group="mc/return_vs_v_star",
               smooth=False, label=r"$V^*(s_0)$ by value iteration", y_label=r"return from $s_0$ (discounted)")
    ctx.scalar("V*(s0) FrozenLake", v_star)
    ctx.scalar("V*(s0) gridworld", v_start["gridworld"])
    ctx.scalar("E[G] greedy policy FrozenLake", expected_returns["frozen_lake"])
    ctx.scalar("MC mean return", returns.mean())
    ctx.scalar("success rate", (returns > 0).double().mean())
    ctx.scalar("vi_sweeps", vi.iterations)
    ctx.scalar("pi_iterations", pi_solutions["frozen_lake"].iterations)
