"""Audit of the MDP module (day 1): Bellman backups, value iteration, policy iteration, exact evaluation."""
from __future__ import annotations

import torch

from llmaudit.audit import Context, audit, kernel
from modules import mdp as M


def _example() -> dict:
    g = torch.Generator().manual_seed(0)
    m = M.random_mdp(4, 2, 0.9, g)
    return {"P": m.P, "R": m.R, "gamma": m.gamma, "V": torch.randn(4, generator=g, dtype=M.DTYPE)}


def _example_policy() -> dict:
    g = torch.Generator().manual_seed(0)
    m = M.random_mdp(4, 2, 0.9, g)
    return {"P": m.P, "R": m.R, "gamma": m.gamma, "policy": M.random_policy(4, 2, g),
            "V": torch.randn(4, generator=g, dtype=M.DTYPE)}


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


@audit("mdp", day=1, title="MDP five-tuple and Bellman backups", config=M.MDPConfig,
       kernels=KERNELS, formulas=M.FORMULAS)
def audit_mdp(ctx: Context, *, bellman_optimality_backup=M.bellman_optimality_backup,
              bellman_expectation_backup=M.bellman_expectation_backup,
              evaluate_policy_exact=M.evaluate_policy_exact) -> None:
    cfg: M.MDPConfig = ctx.config
    g = ctx.generator()
    lake, env = M.frozen_lake(cfg.gamma, cfg.map_name, cfg.is_slippery)
    grid = M.gridworld(gamma=cfg.gamma)
    mdps = {"frozen_lake": lake, "gridworld": grid}

    # P(.|s,a) is a distribution for every (s, a)
    row_error = max((m.P.sum(-1) - 1.0).abs().max().item() for m in mdps.values())
    ctx.check("transition_rows_sum_to_one", row_error < 1e-12, row_error, "< 1e-12",
              "P(s'|s,a) is a probability distribution over next states for every state-action pair.",
              hint="every (prob, next_state, reward, done) entry must be added, terminal states included.")

    # value iteration to convergence, then the optimality residual with the reference operator
    solutions = {name: M.value_iteration(m, cfg.tol, cfg.max_iters, backup=bellman_optimality_backup)
                 for name, m in mdps.items()}
    ctx.progress(0.2)
    residual = max(M.bellman_residual(m, solutions[n].V) for n, m in mdps.items())
    ctx.check("bellman_optimality_residual_below_1e-8", residual < 1e-8, residual, "< 1e-8",
              "V* is the fixed point of the Bellman optimality operator: ||T*V* - V*|| = 0.",
              hint="value iteration must apply max_a [R + gamma * P V]; a mean over actions converges "
                   "to the value of the uniform policy instead.")
    vi = solutions["frozen_lake"]
    ctx.series("vi/sup_norm_change_log10", torch.tensor(vi.deltas).clamp_min(1e-300).log10(),
               x_label="value-iteration sweep")

    # policy iteration (exact evaluation + greedy improvement) must land on the same V* and policy
    worst_v, disagreements = 0.0, 0
    for name, m in mdps.items():
        pi_sol = M.policy_iteration(m, evaluate=evaluate_policy_exact)
        worst_v = max(worst_v, (pi_sol.V - solutions[name].V).abs().max().item())
        q_vi = M.q_from_v(m.P, m.R, m.gamma, solutions[name].V)
        chosen = (pi_sol.policy * q_vi).sum(-1)  # VI's Q of the action PI chose
        disagreements += int((chosen < q_vi.max(-1).values - 1e-8).sum())  # ties are agreements
        if name == "frozen_lake":
            ctx.series("pi/policy_changes", pi_sol.deltas, x_label="policy-iteration step", smooth=False)
            ctx.scalar("pi_iterations", pi_sol.iterations)
    ctx.check("value_and_policy_iteration_agree", worst_v < 1e-8 and disagreements == 0,
              f"max|dV|={worst_v:.2e}, {disagreements} states disagree", "max|dV| < 1e-8, 0 states",
              "Both methods find the unique optimal value function; greedy actions agree up to ties.",
              hint="policy improvement is argmax_a Q^pi(s,a); evaluation must be of the current policy.")
    ctx.progress(0.4)

    # iterative policy evaluation converges to the linear solve, for random stochastic policies
    eval_err = 0.0
    for m in mdps.values():
        for _ in range(max(2, cfg.n_random_policies // 8)):
            pi = M.random_policy(m.n_states, m.n_actions, g)
            v_iter = M.iterative_policy_evaluation(m, pi, cfg.tol, cfg.max_iters, backup=bellman_expectation_backup)
            v_solve = evaluate_policy_exact(m.P, m.R, m.gamma, pi)
            eval_err = max(eval_err, (v_iter - v_solve).abs().max().item())
    ctx.check("iterative_evaluation_equals_linear_solve", eval_err < 1e-8, eval_err, "< 1e-8",
              "Repeated Bellman expectation backups converge to (I - gamma P_pi)^-1 R_pi, the unique fixed point.",
              hint="P_pi and R_pi average over actions with pi(a|s); the iteration must use the same policy.")

    # the optimality operator is a gamma-contraction in the sup-norm (random pairs; half of them
    # differ by a constant shift plus noise, where the bound is tight)
    random_m = M.random_mdp(12, 3, 0.9, g)
    worst_ratio = 0.0
    for m in (lake, random_m):
        n = cfg.n_value_pairs
        V1 = torch.randn(n, m.n_states, generator=g, dtype=M.DTYPE) * 3
        shift = torch.randn(n, 1, generator=g, dtype=M.DTYPE) * 3
        noise = torch.randn(n, m.n_states, generator=g, dtype=M.DTYPE)
        V2 = torch.where(torch.arange(n)[:, None] % 2 == 0, V1 + shift + 1e-3 * noise,
                         torch.randn(n, m.n_states, generator=g, dtype=M.DTYPE) * 3)
        for v1, v2 in zip(V1, V2):
            lhs = (bellman_optimality_backup(m.P, m.R, m.gamma, v1)
                   - bellman_optimality_backup(m.P, m.R, m.gamma, v2)).abs().max()
            ratio = (lhs / (m.gamma * (v1 - v2).abs().max())).item()
            worst_ratio = max(worst_ratio, ratio)
    ctx.check("optimality_backup_is_gamma_contraction", worst_ratio <= 1 + 1e-9, worst_ratio,
              "max ||TV1-TV2|| / (gamma ||V1-V2||) <= 1",
              "A discounted Bellman backup shrinks distances by gamma, so value iteration converges "
              "to a unique fixed point from any start.",
              hint="the discount must multiply the next-state value: R + gamma * P @ V.")
    ctx.progress(0.55)

    # V* dominates every policy's value in every state
    gap = float("inf")
    for name, m in mdps.items():
        for _ in range(cfg.n_random_policies):
            pi = M.random_policy(m.n_states, m.n_actions, g)
            v_pi = evaluate_policy_exact(m.P, m.R, m.gamma, pi)
            gap = min(gap, (solutions[name].V - v_pi).min().item())
    ctx.check("optimal_value_dominates_random_policies", gap >= -1e-9, gap, "min_s V*(s) - V^pi(s) >= 0",
              "No policy beats the optimal one in any state: V*(s) >= V^pi(s) for all s and pi.")

    # Monte-Carlo: the greedy policy's discounted return in the real gymnasium env matches V*(s0)
    actions = vi.policy.argmax(-1)
    returns = M.monte_carlo_returns(env, actions, cfg.mc_episodes, cfg.gamma, seed=ctx.seed)
    mean, se = returns.mean().item(), (returns.std() / returns.numel() ** 0.5).item()
    s0 = int(lake.start.argmax())
    v_star = vi.V[s0].item()
    z = abs(mean - v_star) / max(se, 1e-12)
    ctx.check("monte_carlo_return_matches_v_star", z <= cfg.mc_z,
              f"{mean:.4f} ± {se:.4f} vs V*(s0)={v_star:.4f} (z={z:.2f})", f"|z| <= {cfg.mc_z:g}",
              "V*(s0) is the expected discounted return of the optimal policy; sampled episodes in "
              "the real environment agree within their standard error.", kind="outcome",
              hint="the return is discounted per step (gamma^t r_t), and the policy is greedy in Q*.")
    running = returns.cumsum(0) / torch.arange(1, returns.numel() + 1, dtype=M.DTYPE)
    ctx.series("mc/running_mean_return", running, x_label="episode", group="mc/return_vs_v_star", smooth=False)
    ctx.series("mc/v_star", [v_star] * returns.numel(), x_label="episode", group="mc/return_vs_v_star",
               smooth=False)
    ctx.scalar("V*(s0) FrozenLake", v_star)
    ctx.scalar("MC mean return", mean)
    ctx.scalar("success rate", (returns > 0).double().mean())
    ctx.scalar("vi_sweeps", vi.iterations)
    ctx.progress(1.0)
