"""Audit of the TD module (day 2): one-step targets, TD(0) evaluation, Q-learning, SARSA, expected SARSA."""
from __future__ import annotations

import torch

from llmaudit.audit import Context, audit, kernel
from modules import mdp
from modules import td as M

D = mdp.DTYPE
OPTIMAL_CLIFF_RETURN = -13.0  # 13 steps along the cliff edge, -1 each
CLIFF_EDGE_PATH = [0] + [1] * 11 + [2]  # up, right x 11, down: start (36) -> goal (47)


def _t(values, dtype=D) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# one small valid call per kernel (the anchors: r=1, gamma=0.9, Q(s',.)=[1, 3], a'=0)
def _example_probs() -> dict:
    return {"q_values": _t([[1.0, 3.0], [2.0, 2.0]]), "epsilon": 0.1}


def _example_td0() -> dict:
    return {"reward": _t([1.0, 0.5]), "next_value": _t([3.0, -1.0]), "terminated": _t([0.0, 1.0]),
            "gamma": 0.9}


def _example_q() -> dict:
    return {"reward": _t([1.0, 0.5]), "next_q": _t([[1.0, 3.0], [2.0, -1.0]]),
            "terminated": _t([0.0, 1.0]), "gamma": 0.9}


def _example_sarsa() -> dict:
    return {**_example_q(), "next_action": torch.tensor([0, 1])}


def _example_expected() -> dict:
    return {**_example_q(), "next_probs": _t([[0.05, 0.95], [0.5, 0.5]])}


def _example_update() -> dict:
    return {"estimate": _t([2.0, 0.0]), "target": _t([3.7, 1.0]), "alpha": 0.5}


KERNELS = [
    kernel(M.epsilon_greedy_probs, example=_example_probs,
           hint="every action gets epsilon/A, and the greedy share 1 - epsilon is split among tied maxima."),
    kernel(M.td0_target, example=_example_td0,
           hint="r + gamma * (1 - terminated) * V(s'); the mask multiplies the bootstrap, not the reward."),
    kernel(M.q_learning_target, example=_example_q,
           hint="max over the action axis of next_q (dim=-1), masked by (1 - terminated)."),
    kernel(M.sarsa_target, example=_example_sarsa,
           hint="gather Q(s', a') at the action actually taken next, not the max."),
    kernel(M.expected_sarsa_target, example=_example_expected,
           hint="sum_a' pi(a'|s') Q(s', a') over the action axis, masked by (1 - terminated)."),
    kernel(M.td_update, example=_example_update,
           hint="x + alpha * (target - x): move toward the target, do not add alpha * target."),
]


def _check_values(ctx: Context, name: str, got, want: torch.Tensor, why: str, hint: str,
                  tol: float = 1e-6) -> bool:
    """Record whether a kernel's output has the expected shape and values (a hand-worked vector)."""
    got = torch.as_tensor(got)
    want_text = f"{[round(v, 6) for v in want.tolist()]} within {tol:g}"
    if got.shape != want.shape:
        return ctx.check(name, False, f"shape {tuple(got.shape)}", f"shape {tuple(want.shape)}, {want_text}",
                         why, hint=hint)
    err = (got.to(D) - want).abs().max().item()
    shown = ", ".join(f"{v:.6g}" for v in got.tolist())
    return ctx.check(name, err < tol, f"[{shown}] (max err {err:.1e})", want_text, why, hint=hint)


def _max_error(got, want: torch.Tensor) -> float:
    """max |got - want|, or inf when the shapes differ (a [B, 1] vs [B] bug must not broadcast away)."""
    got = torch.as_tensor(got)
    return (got.to(D) - want).abs().max().item() if got.shape == want.shape else float("inf")


def _median_reached(ret: torch.Tensor, reached: torch.Tensor) -> float:
    return ret[reached].median().item() if reached.any() else float("nan")


@audit("td", day=2, title="TD learning: TD(0), Q-learning, SARSA and expected SARSA on CliffWalking",
       config=M.TDConfig, kernels=KERNELS, formulas=M.FORMULAS)
def audit_td(ctx: Context, *, epsilon_greedy_probs=M.epsilon_greedy_probs, td0_target=M.td0_target,
             q_learning_target=M.q_learning_target, sarsa_target=M.sarsa_target,
             expected_sarsa_target=M.expected_sarsa_target, td_update=M.td_update) -> None:
    cfg: M.TDConfig = ctx.config

    # ---- the tensor env is gymnasium's CliffWalking, step for step ----------------------------
    env, gym_env = M.make_cliff_env()
    actions = torch.randint(env.n_actions, (cfg.n_env_sequences, cfg.env_sequence_length),
                            generator=ctx.generator(0))
    actions[::2, :len(CLIFF_EDGE_PATH)] = torch.tensor(CLIFF_EDGE_PATH)  # half of them reach the goal
    mismatches = M.compare_with_gymnasium(env, gym_env, actions, seed=ctx.seed)
    ctx.check("tensor_cliff_matches_gymnasium", mismatches == 0,
              f"{mismatches} of {actions.numel()} steps differ", "0 steps differ",
              "The batched env is a lookup of gymnasium's own transition table, so on any action sequence "
              "it gives the same next state, reward, terminated flag and reset state as CliffWalking-v1.",
              hint="the cliff sends the agent back to the start with -100 and does not end the episode; "
                   "only reaching state 47 terminates, and then the episode restarts at 36.")
    ctx.progress(0.05)

    # ---- kernels against hand-worked vectors (rl-anchors section 1) ---------------------------
    q_rand = torch.randint(-2, 3, (64, 4), generator=ctx.generator(1)).to(D)  # small ints: many ties
    greedy = q_rand == q_rand.max(-1, keepdim=True).values
    cases = [  # (Q-values, epsilon, the probabilities by definition)
        (_t([[1.0, 3.0], [2.0, 2.0]]), 0.1, _t([[0.05, 0.95], [0.5, 0.5]])),
        (_t([[2.0, 2.0, 0.0], [-1.0, 5.0, 4.0]]), 0.3, _t([[0.45, 0.45, 0.1], [0.1, 0.8, 0.1]])),
        (q_rand, 0.2, torch.where(greedy, 0.8 / greedy.sum(-1, keepdim=True).to(D) + 0.05, _t(0.05))),
    ]
    err = max(_max_error(epsilon_greedy_probs(q, eps), want) for q, eps, want in cases)
    ctx.check("epsilon_greedy_probs_match_definition", err < 1e-6, err,
              "max error < 1e-6 (Q=[1,3], eps=.1 -> [.05,.95]; Q=[2,2,0], eps=.3 -> [.45,.45,.1])",
              "Each action has probability epsilon/|A|, and the remaining 1 - epsilon goes to the greedy "
              "action(s), so the policy explores everywhere yet mostly exploits.",
              hint="ties at the maximum must share the greedy mass; probabilities must sum to 1.")

    hand = {"reward": _t([1.0, 0.0]), "next_q": _t([[1.0, 3.0], [2.0, -1.0]]),
            "terminated": _t([0.0, 0.0]), "gamma": 0.9}
    _check_values(ctx, "q_learning_target_matches_hand_computed",
                  q_learning_target(**hand), _t([3.7, 1.8]),
                  "Q-learning bootstraps from the best next action: 1 + 0.9 * max(1, 3) = 3.7.",
                  hint="take the max over actions (dim=-1), not over the batch.")
    _check_values(ctx, "sarsa_target_matches_hand_computed",
                  sarsa_target(**hand, next_action=torch.tensor([0, 1])), _t([1.9, -0.9]),
                  "SARSA bootstraps from the action it will actually take: with a'=0, 1 + 0.9 * 1 = 1.9.",
                  hint="gather next_q at next_action; using the max turns SARSA into Q-learning.")
    _check_values(ctx, "expected_sarsa_target_matches_hand_computed",
                  expected_sarsa_target(**hand, next_probs=_t([[0.05, 0.95], [0.5, 0.5]])), _t([3.61, 0.45]),
                  "Expected SARSA averages the next value under the policy, 1 + 0.9 * (0.05 * 1 + 0.95 * 3) "
                  "= 3.61, which removes the sampling noise of a'.",
                  hint="weight next_q by next_probs and sum over actions.")
    _check_values(ctx, "td0_target_matches_hand_computed",
                  td0_target(_t([1.0, -1.0]), _t([3.0, 2.0]), _t([0.0, 0.0]), 0.9), _t([3.7, 0.8]),
                  "The TD(0) target is one real reward plus the discounted current guess of the next "
                  "state's value: 1 + 0.9 * 3 = 3.7.",
                  hint="gamma multiplies V(s'), never the reward.")
    _check_values(ctx, "td_update_matches_hand_computed",
                  td_update(_t([2.0, 0.0]), _t([3.7, 1.0]), _t([0.5, 0.1])), _t([2.85, 0.1]),
                  "The update moves the estimate a step alpha along the TD error: 2 + 0.5 * (3.7 - 2) = 2.85.",
                  hint="x + alpha * (target - x); alpha may be a per-element tensor.")

    # a terminal transition must not bootstrap, whatever the next state's values are
    g = ctx.generator(2)
    reward = torch.randn(8, generator=g, dtype=D)
    huge_q = torch.randn(8, 4, generator=g, dtype=D) * 1e6
    done = torch.ones(8, dtype=D)
    next_action = torch.randint(4, (8,), generator=g)
    next_probs = torch.softmax(torch.randn(8, 4, generator=g, dtype=D), -1)
    leak = {
        "td0_target": _max_error(td0_target(reward, huge_q[:, 0], done, 0.9), reward),
        "q_learning_target": _max_error(q_learning_target(reward, huge_q, done, 0.9), reward),
        "sarsa_target": _max_error(sarsa_target(reward, huge_q, next_action, done, 0.9), reward),
        "expected_sarsa_target": _max_error(expected_sarsa_target(reward, huge_q, next_probs, done, 0.9), reward),
    }
    worst = max(leak, key=leak.get)
    ctx.check("terminal_transition_ignores_next_state", leak[worst] < 1e-6,
              f"max |y - r| = {leak[worst]:.3g}" + (f" ({worst})" if leak[worst] > 0 else ""),
              "|y - r| < 1e-6 for all four targets",
              "After a terminal step there is no future, so the target is just r; bootstrapping from "
              "whatever sits in s' (here an auto-reset start state) leaks value across episodes.",
              hint="multiply the bootstrap term by (1 - terminated).")
    ctx.progress(0.1)

    # ---- TD(0) evaluation converges to the linear-solve V^pi (day 1) --------------------------
    g = ctx.generator(3)
    eval_mdp = mdp.random_mdp(cfg.eval_states, cfg.eval_actions, cfg.eval_gamma, g)
    pi = mdp.random_policy(cfg.eval_states, cfg.eval_actions, g)
    v_pi = mdp.evaluate_policy_exact(eval_mdp.P, eval_mdp.R, eval_mdp.gamma, pi)
    _, steps, history = M.td0_evaluation(eval_mdp, pi, cfg.eval_agents, cfg.eval_steps, cfg.eval_alpha_c, g,
                                         td0_target=td0_target, td_update=td_update)
    mean_err = (history.mean(1) - v_pi).abs().amax(-1)  # (K,) error of the learners' average
    agent_err = (history - v_pi).abs().amax(-1).mean(-1)  # (K,) typical error of one learner
    for name, err in (("mean_of_learners", mean_err), ("single_learner", agent_err)):
        ctx.series(f"losses/td0_value_error/{name}", err, steps, x_label="transitions per learner",
                   group="losses/td0_value_error")
    final = mean_err[-1].item()
    ctx.check("td0_converges_to_v_pi", final < cfg.eval_tol,
              f"{final:.4f} (one learner: {agent_err[-1].item():.3f}; max|V^pi| = {v_pi.abs().max().item():.2f})",
              f"max_s |mean of {cfg.eval_agents} learners' V(s) - V^pi(s)| < {cfg.eval_tol:g}",
              "TD(0) is stochastic approximation of the Bellman expectation equation, so with "
              "Robbins-Monro step sizes it converges to V^pi = (I - gamma P_pi)^-1 R_pi without a model.",
              kind="outcome", hint="the target must bootstrap gamma * V(s'); the update must move V(s), "
                                    "the state that was left, not s'.")
    ctx.scalar("td0 error (mean of learners)", final)
    ctx.progress(0.2)

    # ---- Q-learning converges to Q* (value iteration, day 1) with random behaviour ------------
    g = ctx.generator(4)
    q_mdp = M.random_deterministic_mdp(cfg.qstar_states, cfg.qstar_actions, cfg.qstar_gamma, g)
    q_star = mdp.q_from_v(q_mdp.P, q_mdp.R, q_mdp.gamma, mdp.value_iteration(q_mdp, tol=1e-13).V)
    _, steps, history = M.q_learning_generative(q_mdp, cfg.qstar_agents, cfg.qstar_steps, cfg.qstar_alpha, g,
                                                q_learning_target=q_learning_target, td_update=td_update)
    q_err = (history - q_star).abs().flatten(1).amax(-1)  # (K,)
    ctx.series("losses/q_star_error_log10", q_err.clamp_min(1e-300).log10(), steps,
               x_label="updates per agent", smooth=False)
    final = q_err[-1].item()
    ctx.check("q_learning_converges_to_q_star", final < cfg.qstar_tol,
              f"{final:.2e} (|Q*| max {q_star.abs().max().item():.2f})", f"max |Q - Q*| < {cfg.qstar_tol:g}",
              "Q-learning is off-policy: its target uses max_a' Q(s',a'), so even with a uniformly random "
              "behaviour policy it converges to Q*, not to the behaviour policy's values.",
              kind="outcome", hint="a mean (or the sampled a') instead of the max learns the behaviour "
                                    "policy's Q instead of Q*.")
    ctx.progress(0.3)

    # ---- CliffWalking: Sutton & Barto Example 6.6 ----------------------------------------------
    run = M.train_cliff(env, cfg.n_agents, cfg.steps, cfg.alpha, cfg.alpha_final, cfg.anneal_from,
                        cfg.epsilon, cfg.gamma, ctx.generator(5), epsilon_greedy_probs=epsilon_greedy_probs,
                        q_learning_target=q_learning_target, sarsa_target=sarsa_target,
                        expected_sarsa_target=expected_sarsa_target, td_update=td_update)
    ctx.progress(0.9)
    shown = min(int(run.episodes[name].min()) for name in M.ALGORITHMS)  # episodes every agent finished
    tail = {}
    for name in M.ALGORITHMS:
        if shown > 0:
            ctx.series(f"charts/episodic_return/{name}", run.returns[name][:, :shown].mean(0),
                       torch.arange(1, shown + 1), x_label="episode", group="charts/episodic_return")
        tail[name] = M.last_episodes_mean(run.returns[name], run.episodes[name], cfg.tail_episodes).mean().item()
        ctx.scalar(f"online return, last {cfg.tail_episodes} episodes ({name})", tail[name])
    ctx.scalar("episodes per agent (min)", shown)

    paths = {name: M.greedy_rollout(env, run.Q[name], cfg.greedy_max_steps) for name in M.ALGORITHMS}
    for name, (ret, reached, _) in paths.items():
        ctx.scalar(f"greedy return, median ({name})", _median_reached(ret, reached))
    ret, reached, _ = paths["q_learning"]
    optimal = (reached & (ret == OPTIMAL_CLIFF_RETURN)).double().mean().item()
    ctx.check("q_learning_greedy_path_is_cliff_edge_optimum", optimal >= cfg.min_optimal_fraction,
              f"{optimal:.1%} of {cfg.n_agents} agents", f">= {cfg.min_optimal_fraction:.0%} return -13",
              "Q-learning learns Q* whatever it does while exploring, so its greedy path hugs the cliff: "
              "the shortest route, return -13.", kind="outcome",
              hint="a Q-learning target that averages over a' (or follows the sampled a') learns the "
                   "cautious epsilon-greedy values instead.")
    for name, bar in (("sarsa", cfg.min_safe_fraction), ("expected_sarsa", cfg.min_expected_safe_fraction)):
        ret, reached, falls = paths[name]
        safe = (reached & (falls == 0) & (ret < OPTIMAL_CLIFF_RETURN)).double().mean().item()
        label = "SARSA" if name == "sarsa" else "Expected SARSA"
        ctx.check(f"{name}_greedy_path_is_safe", safe >= bar, f"{safe:.1%} of {cfg.n_agents} agents",
                  f">= {bar:.0%} reach the goal by a longer path (return < -13) without falling",
                  f"{label} is on-policy: it values the epsilon-greedy policy it follows, which sometimes "
                  "stumbles, so the cliff edge looks costly and its greedy path keeps a row or two away.",
                  kind="outcome", hint="bootstrapping from max_a' Q(s',a') instead of the policy's own next "
                                        "action(s) makes it Q-learning, which hugs the edge.")
    gap = tail["sarsa"] - tail["q_learning"]
    ctx.check("sarsa_online_return_beats_q_learning", gap >= cfg.min_online_gap,
              f"{tail['sarsa']:.1f} vs {tail['q_learning']:.1f} (gap {gap:.1f})",
              f"SARSA - Q-learning >= {cfg.min_online_gap:g} over each agent's last {cfg.tail_episodes} episodes",
              "While exploring with epsilon = 0.1, Q-learning's edge path falls off the cliff now and then "
              "(-100), so on-policy SARSA earns more online although Q-learning's greedy policy is better.",
              kind="outcome", hint="if both curves coincide, SARSA's target is probably using the max.")
    ctx.progress(1.0)
