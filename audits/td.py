"""Audit of the TD module (day 2): one-step targets, TD(0) evaluation, Q-learning, SARSA, expected SARSA."""
from __future__ import annotations

import torch

from llmaudit.audit import Audit, kernel, max_error, measure
from modules import mdp
from modules import td as M

D = mdp.DTYPE
OPTIMAL_CLIFF_RETURN = -13.0  # 13 steps along the cliff edge, -1 each
CLIFF_EDGE_PATH = [0] + [1] * 11 + [2]  # up, right x 11, down: start (36) -> goal (47)
TOL = 1e-6  # hand-worked vectors: exact in float64, and loose enough for a float32 implementation


def _t(values, dtype=D) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# one small valid call per kernel (the textbook anchors: r = 1, gamma = 0.9, Q(s',.) = [1, 3], a' = 0)
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


MASK_HINT = "where terminated, y = r: select with torch.where(terminated.bool(), 0, next) rather than " \
            "multiplying by (1 - terminated), which turns 0 * inf into NaN."
KERNELS = [
    kernel(M.epsilon_greedy_probs, example=_example_probs,
           hint="every action gets epsilon/A, and the greedy share 1 - epsilon is split among tied maxima."),
    kernel(M.td0_target, example=_example_td0, hint="r + gamma * V(s'); " + MASK_HINT),
    kernel(M.q_learning_target, example=_example_q,
           hint="max over the action axis of next_q (dim=-1); " + MASK_HINT),
    kernel(M.sarsa_target, example=_example_sarsa,
           hint="gather Q(s', a') at the action actually taken next, not the max; " + MASK_HINT),
    kernel(M.expected_sarsa_target, example=_example_expected,
           hint="sum_a' pi(a'|s') Q(s', a') over the action axis; " + MASK_HINT),
    kernel(M.td_update, example=_example_update,
           hint="x + alpha * (target - x): move toward the target, do not add alpha * target."),
]

td = Audit("td", day=2, title="TD learning: TD(0), Q-learning, SARSA and expected SARSA on CliffWalking",
           config=M.TDConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _vector(got, want: list[float]):
    """A kernel's output against a hand-worked vector: the max error, with the values in words."""
    got = torch.as_tensor(got)
    shown = ", ".join(f"{v:.6g}" for v in got.flatten().tolist())
    return measure(max_error(got, _t(want)), f"[{shown}] vs {want}")


# ---- the environment: gymnasium's CliffWalking as a batched lookup table ---------------------------

@td.check("== 0", hint="the cliff sends the agent back to the start with -100 and does not end the episode; "
                       "only reaching state 47 terminates, and then the episode restarts at 36.")
def tensor_cliff_matches_gymnasium(cfg, g, ctx):
    """The batched env is a lookup of gymnasium's own transition table, so on any action sequence it
    gives the same next state, reward, terminated flag and reset state as CliffWalking-v1."""
    env, gym_env = M.make_cliff_env()
    actions = torch.randint(env.n_actions, (cfg.n_env_sequences, cfg.env_sequence_length), generator=g)
    actions[::2, :len(CLIFF_EDGE_PATH)] = torch.tensor(CLIFF_EDGE_PATH)  # half of them reach the goal
    mismatches = M.compare_with_gymnasium(env, gym_env, actions, seed=ctx.seed)
    return measure(mismatches, f"of {actions.numel()} steps")


# ---- the kernels against hand-worked vectors (Sutton & Barto's definitions) ------------------------

HAND = {"reward": _t([1.0, 0.0]), "next_q": _t([[1.0, 3.0], [2.0, -1.0]]), "terminated": _t([0.0, 0.0]),
        "gamma": 0.9}


@td.check(f"< {TOL}", hint="ties at the maximum must share the greedy mass; probabilities must sum to 1.")
def epsilon_greedy_probs_match_definition(g, epsilon_greedy_probs):
    """Each action has probability epsilon/|A| and the remaining 1 - epsilon goes to the greedy
    action(s), split evenly among ties: Q = [1, 3], eps = .1 -> [.05, .95]; Q = [2, 2, 0], eps = .3
    -> [.45, .45, .1]; eps = 0 is greedy, eps = 1 uniform."""
    q_rand = torch.randint(-2, 3, (64, 4), generator=g).to(D)  # small integers: many ties
    greedy = (q_rand == q_rand.max(-1, keepdim=True).values).to(D)
    cases = [(_t([[1.0, 3.0], [2.0, 2.0]]), 0.1, _t([[0.05, 0.95], [0.5, 0.5]])),
             (_t([[2.0, 2.0, 0.0], [-1.0, 5.0, 4.0]]), 0.3, _t([[0.45, 0.45, 0.1], [0.1, 0.8, 0.1]]))]
    cases += [(q_rand, eps, eps / 4 + (1 - eps) * greedy / greedy.sum(-1, keepdim=True)) for eps in (0.0, 0.2, 1.0)]
    return [max_error(epsilon_greedy_probs(q, eps), want) for q, eps, want in cases]


@td.check(f"< {TOL}", hint="take the max over actions (dim=-1), not over the batch.")
def q_learning_target_matches_hand_computed(q_learning_target):
    """Q-learning bootstraps from the best next action: 1 + 0.9 * max(1, 3) = 3.7, and 0 + 0.9 * 2 = 1.8."""
    return _vector(q_learning_target(**HAND), [3.7, 1.8])


@td.check(f"< {TOL}", hint="gather next_q at next_action; using the max turns SARSA into Q-learning.")
def sarsa_target_matches_hand_computed(sarsa_target):
    """SARSA bootstraps from the action it will actually take: with a' = 0, 1 + 0.9 * 1 = 1.9; with
    a' = 1 in the second row, 0.9 * (-1) = -0.9."""
    return _vector(sarsa_target(**HAND, next_action=torch.tensor([0, 1])), [1.9, -0.9])


@td.check(f"< {TOL}", hint="weight next_q by next_probs and sum over actions.")
def expected_sarsa_target_matches_hand_computed(expected_sarsa_target):
    """Expected SARSA averages the next value under the policy, 1 + 0.9 * (0.05 * 1 + 0.95 * 3) = 3.61,
    which removes the sampling noise of a'."""
    return _vector(expected_sarsa_target(**HAND, next_probs=_t([[0.05, 0.95], [0.5, 0.5]])), [3.61, 0.45])


@td.check(f"< {TOL}", hint="gamma multiplies V(s'), never the reward.")
def td0_target_matches_hand_computed(td0_target):
    """The TD(0) target is one real reward plus the discounted current guess of the next state's
    value: 1 + 0.9 * 3 = 3.7."""
    return _vector(td0_target(_t([1.0, -1.0]), _t([3.0, 2.0]), _t([0.0, 0.0]), 0.9), [3.7, 0.8])


@td.check(f"< {TOL}", hint="x + alpha * (target - x); alpha may be a per-element tensor.")
def td_update_matches_hand_computed(td_update):
    """The update moves the estimate a step alpha along the TD error: 2 + 0.5 * (3.7 - 2) = 2.85 (and
    with a per-element alpha, 0 + 0.1 * (1 - 0) = 0.1)."""
    return _vector(td_update(_t([2.0, 0.0]), _t([3.7, 1.0]), _t([0.5, 0.1])), [2.85, 0.1])


# ---- terminal transitions ----------------------------------------------------------------------------

def _terminal_batch(g: torch.Generator, next_q: torch.Tensor) -> dict:
    """A batch where every transition is terminal, with the given next-state values."""
    B, A = next_q.shape
    return {"reward": torch.randn(B, generator=g, dtype=D), "next_q": next_q, "terminated": torch.ones(B, dtype=D),
            "next_action": torch.randint(A, (B,), generator=g),
            "next_probs": torch.softmax(torch.randn(B, A, generator=g, dtype=D), -1)}


def _terminal_errors(b: dict, td0_target, q_learning_target, sarsa_target, expected_sarsa_target) -> list:
    """max |y - r| for each of the four targets on a batch of terminal transitions."""
    r, nq, done = b["reward"], b["next_q"], b["terminated"]
    return [max_error(td0_target(r, nq[:, 0], done, 0.9), r),
            max_error(q_learning_target(r, nq, done, 0.9), r),
            max_error(sarsa_target(r, nq, b["next_action"], done, 0.9), r),
            max_error(expected_sarsa_target(r, nq, b["next_probs"], done, 0.9), r)]


@td.check(f"< {TOL}", hint="mask the bootstrap term where terminated = 1.")
def terminal_transition_ignores_next_state(g, td0_target, q_learning_target, sarsa_target, expected_sarsa_target):
    """After a terminal step there is no future, so the target is just r; bootstrapping from whatever
    sits in s' (here an auto-reset start state worth ~1e6) leaks value across episodes."""
    b = _terminal_batch(g, torch.randn(8, 4, generator=g, dtype=D) * 1e6)
    return _terminal_errors(b, td0_target, q_learning_target, sarsa_target, expected_sarsa_target)


@td.check("< 1e-12", hint=MASK_HINT)
def terminal_target_ignores_non_finite_next_values(g, td0_target, q_learning_target, sarsa_target,
                                                   expected_sarsa_target):
    """The contract says y = r at a terminal step whatever V(s') holds, and a network's output at a
    terminal observation can be inf or NaN; (1 - terminated) * inf is NaN, so the mask must select
    (torch.where), not multiply."""
    values = _t([float("inf"), float("-inf"), float("nan"), 1.0])
    next_q = values[torch.randint(4, (16, 4), generator=g)]
    next_q[:3, 0] = values[:3]  # td0 reads column 0: make sure it sees each non-finite value
    b = _terminal_batch(g, next_q)
    return _terminal_errors(b, td0_target, q_learning_target, sarsa_target, expected_sarsa_target)


@td.check({"greedy_is_q_learning": "< 1e-9", "one_hot_is_sarsa": "< 1e-9"},
          hint="expected SARSA is sum_a' pi(a'|s') Q(s',a'): the probabilities must weight next_q.")
def expected_sarsa_reduces_to_q_learning_and_sarsa(g, epsilon_greedy_probs, q_learning_target, sarsa_target,
                                                   expected_sarsa_target):
    """Expected SARSA averages the next value under pi: with the greedy policy (epsilon = 0, ties
    split) the average is the max, i.e. Q-learning's target; with all the mass on the sampled a' it
    is SARSA's."""
    B, A = 64, 4
    next_q = torch.randint(-2, 3, (B, A), generator=g).to(D)  # ties at the maximum are common
    r = torch.randn(B, generator=g, dtype=D)
    done = (torch.rand(B, generator=g) < 0.25).to(D)
    a = torch.randint(A, (B,), generator=g)
    one_hot = torch.nn.functional.one_hot(a, A).to(D)
    greedy = expected_sarsa_target(r, next_q, epsilon_greedy_probs(next_q, 0.0), done, 0.9)
    return {"greedy_is_q_learning": max_error(greedy, q_learning_target(r, next_q, done, 0.9)),
            "one_hot_is_sarsa": max_error(expected_sarsa_target(r, next_q, one_hot, done, 0.9),
                                          sarsa_target(r, next_q, a, done, 0.9))}


# ---- TD(0) evaluation converges to V^pi; Q-learning to Q* --------------------------------------------

@td.fixture(cost=3)
def td0(cfg, g, td0_target, td_update):
    """cfg.eval_agents TD(0) learners on one random MDP and policy, against the linear-solve V^pi."""
    return M.td0_experiment(cfg, g, td0_target=td0_target, td_update=td_update)


@td.check("< eval_tol", kind="outcome", hint="the target must bootstrap gamma * V(s'); the update must move "
                                             "V(s), the state that was left, not s'.")
def td0_converges_to_v_pi(td0):
    """TD(0) is stochastic approximation of the Bellman expectation equation, so with Robbins-Monro
    step sizes it converges to V^pi = (I - gamma P_pi)^-1 R_pi without a model: the sup error of the
    learners' mean value."""
    return measure(td0.mean_error[-1], f"one learner: {td0.single_error[-1].item():.3f}; "
                                       f"max|V^pi| = {td0.v_pi.abs().max().item():.2f}")


@td.fixture(cost=2)
def q_star_run(cfg, g, q_learning_target, td_update):
    """Q-learning agents with uniformly random behaviour on a small deterministic MDP, against Q*."""
    return M.q_star_experiment(cfg, g, q_learning_target=q_learning_target, td_update=td_update)


@td.check("< qstar_tol", kind="outcome", hint="a mean (or the sampled a') instead of the max learns the behaviour "
                                              "policy's Q instead of Q*.")
def q_learning_converges_to_q_star(q_star_run):
    """Q-learning is off-policy: its target uses max_a' Q(s',a'), so a uniformly random behaviour that
    tries every (s, a) infinitely often still leads it to Q*, not to the behaviour policy's values."""
    return measure(q_star_run.error[-1], f"|Q*| max {q_star_run.q_star.abs().max().item():.2f}")


# ---- CliffWalking: Sutton & Barto Example 6.6 ---------------------------------------------------------

@td.fixture(cost=40)
def cliff(cfg, g, epsilon_greedy_probs, q_learning_target, sarsa_target, expected_sarsa_target, td_update):
    """Q-learning, SARSA and expected SARSA agents learning CliffWalking side by side, and their greedy
    paths: (CliffRun, {algorithm: (return, reached, falls)})."""
    return M.cliff_experiment(cfg, g, epsilon_greedy_probs=epsilon_greedy_probs, q_learning_target=q_learning_target,
                              sarsa_target=sarsa_target, expected_sarsa_target=expected_sarsa_target,
                              td_update=td_update)


def _fraction(flags: torch.Tensor) -> float:
    return flags.double().mean().item()


@td.check(">= min_optimal_fraction", kind="outcome",
          hint="a Q-learning target that averages over a' (or follows the sampled a') learns the cautious "
               "epsilon-greedy values instead.")
def q_learning_greedy_path_is_cliff_edge_optimum(cliff):
    """Q-learning learns Q* whatever it does while exploring, so its greedy path hugs the cliff: the
    shortest route, return -13 (the fraction of agents whose greedy path returns exactly that)."""
    ret, reached, _ = cliff[1]["q_learning"]
    return measure(_fraction(reached & (ret == OPTIMAL_CLIFF_RETURN)), f"of {ret.numel()} agents")


def _safe_fraction(cliff, name: str):
    ret, reached, falls = cliff[1][name]
    return measure(_fraction(reached & (falls == 0) & (ret < OPTIMAL_CLIFF_RETURN)), f"of {ret.numel()} agents")


@td.check(">= min_safe_fraction", kind="outcome",
          hint="bootstrapping from max_a' Q(s',a') instead of the action taken next makes it Q-learning, "
               "which hugs the edge.")
def sarsa_greedy_path_is_safe(cliff):
    """SARSA is on-policy: it values the epsilon-greedy policy it follows, which sometimes stumbles, so
    the cliff edge looks costly and its greedy path reaches the goal a row or two away (return < -13,
    no fall)."""
    return _safe_fraction(cliff, "sarsa")


@td.check(">= min_expected_safe_fraction", kind="outcome",
          hint="the average must be under the epsilon-greedy probabilities; the max makes it Q-learning.")
def expected_sarsa_greedy_path_is_safe(cliff):
    """Expected SARSA is on-policy too (it averages over the epsilon-greedy policy's next actions), so
    its greedy path also keeps away from the edge, with less noise than SARSA's sampled a'."""
    return _safe_fraction(cliff, "expected_sarsa")


def _median_online_return(cfg, run, name: str) -> torch.Tensor:
    """The median over agents of each agent's mean return over its last cfg.tail_episodes episodes; an
    agent that finished fewer (stuck in a loop) counts as -inf, i.e. against its algorithm."""
    tail = M.last_episodes_mean(run.returns[name], run.episodes[name], cfg.tail_episodes)
    return tail.nan_to_num(nan=float("-inf")).median()


@td.check(">= min_online_gap", kind="outcome", hint="if both curves coincide, SARSA's target is probably using "
                                                    "the max.")
def sarsa_online_return_beats_q_learning(cfg, cliff):
    """While exploring with epsilon = 0.1, Q-learning's edge path falls off the cliff now and then
    (-100), so on-policy SARSA earns more online although Q-learning's greedy policy is better: the
    median agent's return over its last episodes, SARSA minus Q-learning."""
    sarsa, q = (_median_online_return(cfg, cliff[0], name) for name in ("sarsa", "q_learning"))
    return measure(sarsa - q, f"SARSA {sarsa.item():.1f} vs Q-learning {q.item():.1f}")


WORDS = {"q_learning": "Q-learning", "sarsa": "SARSA", "expected_sarsa": "Expected SARSA"}


@td.report
def curves(ctx, cfg, td0, q_star_run, cliff):
    for name, err, words in (("mean_of_learners", td0.mean_error, "mean of the learners"),
                             ("single_learner", td0.single_error, "one learner (average)")):
        ctx.series(f"losses/td0_value_error/{name}", err, td0.checkpoints, x_label="transitions per learner",
                   group="losses/td0_value_error", label=words, y_label=r"$\max_s |V(s) - V^\pi(s)|$ (return units)",
                   title=r"TD(0) value error against $V^\pi$")
    ctx.scalar("td0 error (mean of learners)", td0.mean_error[-1])
    ctx.scalar("td0 error (one learner)", td0.single_error[-1])
    ctx.series("losses/q_star_error_log10", q_star_run.error.clamp_min(1e-300).log10(), q_star_run.checkpoints,
               x_label="updates per agent", smooth=False, label=r"Q-learning error to $Q^*$",
               y_label=r"$\log_{10} \max_{s,a} |Q(s,a) - Q^*(s,a)|$")
    ctx.scalar("q-learning sup error to Q*", q_star_run.error[-1])
    run, paths = cliff
    shown = int(torch.stack([run.episodes[name].min() for name in M.ALGORITHMS]).min())  # every agent finished
    for name in M.ALGORITHMS:
        if shown > 0:
            ctx.series(f"charts/episodic_return/{name}", run.returns[name][:, :shown].mean(0),
                       torch.arange(1, shown + 1), x_label="episode", group="charts/episodic_return",
                       label=WORDS[name], y_label="return per episode (mean over agents)", key=name == "sarsa",
                       title="CliffWalking: online return while learning")
        ctx.scalar(f"online return, last {cfg.tail_episodes} episodes, median agent ({name})",
                   _median_online_return(cfg, run, name))
        ret, reached = paths[name][0], paths[name][1]
        ctx.scalar(f"greedy return, median ({name})", ret[reached].median() if reached.any() else float("nan"))
    ctx.scalar("episodes per agent (min)", shown)
