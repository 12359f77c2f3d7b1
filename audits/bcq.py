"""Audit of the bcq module (day 11): the BCQ action filter against d3rlpy's vectors and its limits in tau,
and BCQ vs behaviour cloning vs naive offline DQN on the FrozenLake data sets that cql uses."""
from __future__ import annotations

import torch

from audits._offline import returns_by_quality
from llmaudit.audit import Audit, bound, kernel, measure
from modules.bcq import bcq as M
from modules.cql.offline import QUALITIES, policy_returns

D = torch.float64
MEDIUM = QUALITIES.index("medium")


def _t(values, dtype=D) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _example() -> dict:
    return {"q_values": _t([[1.0, 5.0, 10.0], [5.0, -1.0, 10.0]]),
            "behavior_logits": _t([[0.6, 0.3, 0.1], [0.05, 0.9, 0.05]]).log(), "tau": 0.3}


KERNELS = [
    kernel(M.bcq_filter_actions, example=_example,
           hint="allowed = log_softmax(logits) - its max > log(tau) (strict); score = (Q - min Q + 1e-5) * "
                "allowed; return the argmax of the score over actions (dim=-1)."),
]

bcq = Audit("bcq", day=11, title="BCQ: acting and bootstrapping only among actions the data supports",
            config=M.BCQConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _random_case(g: torch.Generator, rows: int = 256, actions: int = 5):
    """Random Q tables and behaviour logits (spread enough that several actions pass a middle tau)."""
    q = torch.randn(rows, actions, generator=g, dtype=D) * 3.0
    logits = torch.randn(rows, actions, generator=g, dtype=D) * 2.0
    return q, logits


def _mismatches(got: torch.Tensor, want: torch.Tensor) -> float:
    got = torch.as_tensor(got)
    return float("inf") if got.shape != want.shape else float((got != want).sum())


# ---- the filter against d3rlpy's vectors ----------------------------------------------------------

@bcq.check("== 0", hint="the mask is G / max G > tau, relative to the most likely action, not G > tau.")
def filter_matches_d3rlpy_vectors(bcq_filter_actions):
    """G = [.6, .3, .1] gives G / max G = [1, .5, .167]: with tau = .3 actions 0 and 1 pass and BCQ
    picks 1 (Q = 5) where DQN would pick the unsupported action 2 (Q = 10); with tau = .1 all pass -> 2."""
    q, logits = _t([[1.0, 5.0, 10.0]] * 2), _t([[0.6, 0.3, 0.1]] * 2).log()
    got = torch.cat([bcq_filter_actions(q[:1], logits[:1], 0.3), bcq_filter_actions(q[1:], logits[1:], 0.1)])
    return measure(_mismatches(got, torch.tensor([1, 2])), f"chose {got.tolist()}, want [1, 2]")


@bcq.check("== 0", hint="shift Q by its row minimum plus 1e-5 before masking: a masked zero must lose to "
                        "every allowed action, even the one with the lowest Q.")
def sole_survivor_with_lowest_q_is_chosen(bcq_filter_actions):
    """d3rlpy#221: G = [.05, .9, .05], Q = [5, -1, 10], tau = .3: only action 1 passes and it has the
    lowest Q; multiplying raw Q by the mask gives [0, -1, 0] and argmax picks the masked action 0."""
    q = _t([[5.0, -1.0, 10.0], [-2.0, -3.0, -1.0]])
    logits = _t([[0.05, 0.9, 0.05], [0.1, 0.8, 0.1]]).log()
    got = bcq_filter_actions(q, logits, 0.3)
    return measure(_mismatches(got, torch.tensor([1, 1])), f"chose {got.tolist()}, want [1, 1]")


@bcq.check("== 0", hint="compare the log-ratio with log(tau) using a strict >, per row (dim=-1).")
def chosen_action_passes_the_filter(g, bcq_filter_actions):
    """Whatever Q says, the chosen action always satisfies G(a|s) / max G > tau: BCQ never acts (or
    bootstraps) outside the behaviour model's support (rows violating it, over four thresholds)."""
    bad = 0.0
    for tau in (0.05, 0.3, 0.7, 0.95):
        q, logits = _random_case(g)
        a = bcq_filter_actions(q, logits, tau)
        if a.shape != (len(q),):
            return float("inf")
        ratio = torch.softmax(logits, -1).gather(-1, a[:, None]).squeeze(-1) / torch.softmax(logits, -1).max(-1).values
        bad += float((ratio <= tau).sum())
    return bad


@bcq.check("== 0", hint="with tau -> 0 every action passes: the choice must be the plain argmax of Q.")
def tau_to_zero_is_argmax_q(g, bcq_filter_actions):
    """As tau -> 0 every action with G > 0 passes, so BCQ's choice is Double DQN's argmax_a Q(s, a)
    (tau = 0 itself is log(0): d3rlpy validates 0 < tau)."""
    q, logits = _random_case(g)
    return _mismatches(bcq_filter_actions(q, logits, 1e-12), q.argmax(-1))


@bcq.check("== 0", hint="as tau -> 1 only the most likely action passes: the choice is argmax G.")
def tau_to_one_is_behaviour_cloning(g, bcq_filter_actions):
    """As tau -> 1 only argmax_a G(a|s) passes, so BCQ acts exactly as (greedy) behaviour cloning,
    whatever Q holds."""
    q, logits = _random_case(g)
    return _mismatches(bcq_filter_actions(q, logits, 1.0 - 1e-9), logits.argmax(-1))


# ---- the closed loop on the shared offline data sets --------------------------------------------------

@bcq.fixture(cost=30)
def result(cfg, g, bcq_filter_actions):
    """The three data sets, behaviour cloning (= BCQ's G), and naive DQN / BCQ / the tau sweep."""
    return M.run(cfg, g, bcq_filter_actions=bcq_filter_actions)


@bcq.check(bound("< 1", scale=1.0), kind="outcome",
           hint="the filter must mask actions whose G / max G is at most tau.")
def bcq_never_picks_an_action_unseen_in_that_state(result):
    """In every state the data visited, BCQ's greedy action is one the data took there: the imitation
    model gives unseen actions a small G, the filter removes them (count over learners, states and the
    three data sets; naive DQN's count is in the detail)."""
    ks, dqn = result.select("bcq"), result.select("dqn")
    return measure(result.unseen_choices(ks), f"naive DQN: {result.unseen_choices(dqn)} (learner, state) pairs")


@bcq.check(">= min_gain_over_bc", kind="outcome", hint="a filter that keeps only argmax G is behaviour cloning.")
def bcq_beats_behaviour_cloning_on_medium(result):
    """Inside the data's support BCQ still maximises Q, so where the data's most frequent action is the
    worse one it takes the better supported one: exact return, BCQ minus behaviour cloning, medium data."""
    r = result.medium_returns("bcq")
    return measure(r["bcq"] - r["bc"], f"BCQ {r['bcq']:.3f}, BC {r['bc']:.3f}, naive DQN {r['dqn']:.3f}")


@bcq.check(">= min_gain_over_behaviour", kind="outcome", hint="check the filter's direction (> tau keeps).")
def bcq_beats_behaviour_policy_on_medium(result):
    """BCQ improves on the policy that logged the data: exact return minus the behaviour policy's, medium data."""
    r = result.medium_returns("bcq")
    return measure(r["bcq"] - r["behaviour"], f"BCQ {r['bcq']:.3f}, behaviour {r['behaviour']:.3f}")


@bcq.check("< 1e-9", kind="outcome", hint="at tau near 1 the filter must leave only argmax G.")
def tau_near_one_returns_what_behaviour_cloning_returns(result, bcq_filter_actions):
    """With tau -> 1 (1 - 1e-9) only behaviour cloning's action survives, so acting by the filter on
    the trained BCQ Q tables gives behaviour cloning's policy and its exact return, whatever Q learned
    (medium data; the difference of the returns)."""
    ks = result.select("bcq", MEDIUM)
    G = result.bc_logits[MEDIUM]
    chosen = torch.stack([bcq_filter_actions(result.run.q[k], G, 1.0 - 1e-9) for k in ks])  # (k, S)
    got = policy_returns(result.env, torch.nn.functional.one_hot(chosen, G.shape[-1]).to(D)).mean().item()
    bc = result.baseline_returns()["bc"][MEDIUM].item()
    return measure(abs(got - bc), f"{got:.4f} vs BC {bc:.4f}")


# ---- the report ----------------------------------------------------------------------------------------

@bcq.report
def curves(ctx, cfg, result):
    rows = [(0.0, result.select("dqn", MEDIUM)), (cfg.tau, result.select("bcq", MEDIUM))]
    rows = sorted(rows + [(t, result.select("sweep", MEDIUM, t)) for t in cfg.sweep_taus])
    ticks = ["0 (DQN)"] + [f"{t:g}" for t, _ in rows[1:]]
    ctx.series("offline/tau_sweep/return", [result.returns(ks) for _, ks in rows], x_label=r"BCQ $\tau$",
               smooth=False, ticks=ticks, y_label="exact return from the start", key=True,
               label="greedy policy's return (medium data)",
               title=r"Medium data: return against $\tau$ ($\tau\to 1$ is behaviour cloning)")
    ctx.series("offline/tau_sweep/unseen_choices", [result.unseen_choices(ks) for _, ks in rows],
               x_label=r"BCQ $\tau$", smooth=False, ticks=ticks, y_label="visited states acting on an unseen action",
               label="states where the greedy action is one the data never took",
               title=r"Medium data: greedy actions the data never took, against $\tau$")
    returns_by_quality(ctx, result, "bcq", "BCQ")
