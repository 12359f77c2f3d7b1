"""Audit of the cql module (day 10): the CQL(H) loss and the Double DQN target against d3rlpy's vectors,
and naive offline DQN vs CQL vs behaviour cloning on FrozenLake data sets, measured against the exact Q*."""
from __future__ import annotations

import math

import torch

from audits._offline import returns_by_quality
from llmaudit.audit import Audit, bound, kernel, least, max_error, measure, worst
from modules.cql import cql as M
from modules.cql.offline import QUALITIES, double_dqn_target

D = torch.float64
TOL = 1e-6  # d3rlpy's vectors have 7 digits; loose enough for a float32 implementation
GRAD_TOL = 1e-9  # float64 autograd against the closed form
LSE_123 = 3.4076060  # logsumexp([1, 2, 3])
MEDIUM = QUALITIES.index("medium")


def _t(values, dtype=D) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _example_cql() -> dict:
    q = _t([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    return {"q_values": q, "actions": torch.tensor([0, 2]), "td_targets": _t([1.5, 0.0]), "alpha": 1.0}


def _example_target() -> dict:
    return {"reward": _t([1.0, 0.5]), "next_q_online": _t([[1.0, 3.0], [2.0, -1.0]]),
            "next_q_target": _t([[2.0, 0.5], [1.0, 4.0]]), "terminated": _t([0.0, 1.0]), "gamma": 0.9}


KERNELS = [
    kernel(M.cql_loss, example=_example_cql,
           hint="penalty = logsumexp over ALL actions (dim=-1) minus Q(s, a_data), via torch.logsumexp; "
                "TD part = Huber(Q(s, a_data) - y); loss = td.mean() + (alpha * penalty).mean()."),
    kernel(double_dqn_target, example=_example_target,
           hint="argmax of the ONLINE net's Q(s', .), valued by the TARGET net; y = r where terminated "
                "(torch.where, not a multiplication by 1 - terminated)."),
]

cql = Audit("cql", day=10, title="CQL: a conservative penalty keeps offline Q below the truth on unseen actions",
            config=M.CQLConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _penalty(cql_loss, q: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """The conservative penalty alone, per row: cql_loss at alpha = 1 with y = Q(s, a_data) (no TD error)."""
    q_data = q.gather(-1, actions[:, None]).squeeze(-1)
    return torch.stack([cql_loss(q[i:i + 1], actions[i:i + 1], q_data[i:i + 1], 1.0) for i in range(len(q))])


def _random_q(g: torch.Generator, rows: int = 64, actions: int = 4, scale: float = 5.0):
    q = torch.randn(rows, actions, generator=g, dtype=D) * scale
    return q, torch.randint(actions, (rows,), generator=g)


# ---- the CQL(H) loss against d3rlpy's vectors and its exact properties ----------------------------

@cql.check(f"< {TOL}", hint="logsumexp over every action, minus the data action's Q.")
def penalty_matches_d3rlpy_vectors(cql_loss):
    """logsumexp([1, 2, 3]) = 3.4076060, so the penalty is 2.4076060 when the data took action 0 and
    0.4076060 when it took the best action 2; a constant Q gives ln|A| = ln 3 whatever the action."""
    q = _t([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    got = _penalty(cql_loss, q, torch.tensor([0, 2, 1]))
    want = _t([LSE_123 - 1.0, LSE_123 - 3.0, math.log(3.0)])
    return measure(max_error(got, want), "[" + ", ".join(f"{v:.7f}" for v in got.tolist()) + "]")


@cql.check(f"< {TOL}", hint="d3rlpy's TD loss is Huber with beta = 1, not MSE.")
def td_part_is_huber(cql_loss):
    """At alpha = 0 the loss is d3rlpy's Huber TD loss: errors 0.5, 2 and -3 cost 0.125, 1.5 and 2.5
    (a squared error would give 4.5 for the last one and let outliers dominate)."""
    q = _t([[0.5, 9.0], [2.0, 9.0], [-3.0, 9.0]])
    actions, y = torch.tensor([0, 0, 0]), _t([0.0, 0.0, 0.0])
    got = torch.stack([cql_loss(q[i:i + 1], actions[i:i + 1], y[i:i + 1], 0.0) for i in range(3)])
    return max_error(got, _t([0.125, 1.5, 2.5]))


@cql.check(bound(">= 0", scale=0), hint="the penalty is logsumexp - Q(s, a_data), not the other way round.")
def penalty_is_nonnegative(g, cql_loss):
    """logsumexp_a Q(s, a) >= max_a Q(s, a) >= Q(s, a_data), so the penalty can only push Q down on
    average: the smallest per-state penalty over random Q tables (ties and large spreads included)."""
    q, actions = _random_q(g)
    q[:8] = 1.0  # constant rows: the penalty is ln|A|
    return least(_penalty(cql_loss, q, actions))


@cql.check({"row_sum": f"< {GRAD_TOL}", "matches_softmax_minus_onehot": f"< {GRAD_TOL}"},
           hint="the logsumexp must run over all actions; over the data action alone the penalty is 0.")
def penalty_gradient_sums_to_zero_per_state(g, cql_loss):
    """d penalty / dQ(s, .) = softmax(Q(s, .)) - onehot(a_data): every action is pushed down by its
    softmax weight and the data action pushed up by 1, so the push sums to zero in each state (for
    Q = [1, 2, 3], a = 0: [-0.90997, 0.24473, 0.66524])."""
    q, actions = _random_q(g, rows=32)
    q = torch.cat([_t([[1.0, 2.0, 3.0, 0.0]]), q]).requires_grad_()
    actions = torch.cat([torch.tensor([0]), actions])
    q_data = q.detach().gather(-1, actions[:, None]).squeeze(-1)  # y = Q(s, a_data): the TD part has no gradient
    (grad,) = torch.autograd.grad(cql_loss(q, actions, q_data, 1.0), q)
    want = (torch.softmax(q.detach(), -1) - torch.nn.functional.one_hot(actions, 4).to(D)) / len(q)
    return {"row_sum": (grad.sum(-1) * len(q)).abs().max().item(), "matches_softmax_minus_onehot":
            max_error(grad * len(q), want * len(q))}


@cql.check("< 1e-4", hint="use torch.logsumexp (it subtracts the max first); log(sum(exp(q))) overflows.")
def logsumexp_is_stable_at_large_q(cql_loss):
    """Q values of 1000 (float64) or 100 (float32) overflow exp; the stable logsumexp subtracts the max
    first and still gives the penalty 0.4076060 for Q = [c, c+1, c+2] and the best action (to float32's
    resolution at 100, about 1e-5)."""
    q64 = _t([[1000.0, 1001.0, 1002.0]])
    q32 = _t([[100.0, 101.0, 102.0]], torch.float32)
    a = torch.tensor([2])
    return [abs(_penalty(cql_loss, q, a).item() - (LSE_123 - 3.0)) for q in (q64, q32)]


# ---- the Double DQN target both modules share --------------------------------------------------------

@cql.check(f"< {TOL}", hint="pick the action with the online net, value it with the target net.")
def double_dqn_target_matches_hand_computed(double_dqn_target):
    """Online Q(s') = [1, 3] picks action 1 and the target net values it at 0.5: y = 1 + 0.9 * 0.5 =
    1.45 (plain DQN would give 1 + 0.9 * 2 = 2.8); the terminal row gives its reward 0.5."""
    got = double_dqn_target(**_example_target())
    return measure(max_error(got, _t([1.45, 0.5])), f"{got.tolist()}")


@cql.check({"excess_over_dqn": bound("<= 0", scale=0), "equal_nets_is_dqn": f"< {GRAD_TOL}"},
           hint="the evaluation uses the target net at the online argmax, never the online net's own max.")
def double_dqn_target_never_exceeds_dqn_target(g, double_dqn_target):
    """Q_target(s', argmax Q_online) <= max_a Q_target(s', a): decoupling selection from evaluation can
    only lower the target (that is how it fights the max's over-estimation), and with equal nets it is
    plain DQN's target."""
    B, A = 256, 4
    r, done = torch.randn(B, generator=g, dtype=D), (torch.rand(B, generator=g) < 0.2).to(D)
    online, target = torch.randn(B, A, generator=g, dtype=D), torch.randn(B, A, generator=g, dtype=D)
    dqn = r + 0.9 * torch.where(done.bool(), 0.0, target.max(-1).values)
    return {"excess_over_dqn": worst(double_dqn_target(r, online, target, done, 0.9) - dqn),
            "equal_nets_is_dqn": max_error(double_dqn_target(r, target, target, done, 0.9), dqn)}


@cql.check("< 1e-12", hint="select with torch.where(terminated.bool(), 0, value); 0 * inf is NaN.")
def terminal_target_is_reward(g, double_dqn_target):
    """After a terminal step there is no future: y = r exactly, even when the nets output inf or NaN
    at the terminal observation (which they were never trained on)."""
    bad = _t([float("inf"), float("-inf"), float("nan"), 1e6])
    online, target = bad[torch.randint(4, (16, 4), generator=g)], bad[torch.randint(4, (16, 4), generator=g)]
    r = torch.randn(16, generator=g, dtype=D)
    return max_error(double_dqn_target(r, online, target, torch.ones(16, dtype=D), 0.99), r)


# ---- the closed loop: offline DQN vs CQL on FrozenLake, against the exact Q* -------------------------

@cql.check("== 0", hint="alpha must multiply the whole penalty; alpha = 0 must leave the Huber TD loss untouched.")
def alpha_zero_is_double_dqn_exactly(cfg, ctx, cql_loss, double_dqn_target):
    """With alpha = 0 CQL is d3rlpy's DoubleDQN: learners trained with cql_loss(alpha=0) and with the
    plain Huber TD loss from the same seed have bit-identical Q tables after 30 steps."""
    return M.alpha_zero_matches_dqn(cfg, ctx.seed, cql_loss=cql_loss, double_dqn_target=double_dqn_target)


@cql.fixture(cost=30)
def result(cfg, g, cql_loss, double_dqn_target):
    """Three data sets, behaviour cloning, and naive DQN / CQL / the alpha sweep trained on them."""
    return M.run(cfg, g, cql_loss=cql_loss, double_dqn_target=double_dqn_target)


def _dqn_gaps(result, history_index: int | None = None):
    """(mean over every unseen pair of every DQN learner, largest single Q - Q*) over the three data sets."""
    ks = result.select("dqn")
    q = None if history_index is None else result.run.history[history_index][ks]
    mean, top = result.gaps(ks, q)
    counts = result.counts[[result.models[k].dataset for k in ks]]
    visited = (counts.sum(-1, keepdim=True) > 0) & ~result.env.mdp.terminal[:, None]
    n = (visited & (counts == 0)).sum((-2, -1))  # unseen pairs per learner
    return ((mean * n).sum() / n.sum().clamp_min(1)).item(), top.max().item()


@cql.check(">= min_dqn_overestimation", kind="outcome",
           hint="no over-estimation: is the target bootstrapping (gamma * Q_target(s', a*)) at all?")
def dqn_overestimates_unseen_actions(result):
    """Naive offline DQN values some action the data never took above its true Q*: the max in the
    target keeps picking extrapolated values that no data can correct (the largest Q - Q* over the
    unseen pairs of every DQN learner and data set)."""
    mean, top = _dqn_gaps(result)
    return measure(top, f"mean over all unseen pairs {mean:+.3f}")


@cql.check(">= min_dqn_growth", kind="outcome", hint="the over-estimation needs bootstrapping to spread.")
def dqn_overestimation_grows_during_training(cfg, result):
    """The over-estimation is not the random init: bootstrapping feeds it back, so the mean Q - Q*
    over every unseen pair of the DQN learners rises during training (end minus step growth_from)."""
    at = int((result.run.steps == cfg.growth_from).nonzero())
    (end, _), (start, _) = _dqn_gaps(result), _dqn_gaps(result, at)
    return measure(end - start, f"{start:+.3f} at step {cfg.growth_from} -> {end:+.3f}")


@cql.check(bound("<= max_cql_unseen_gap", scale=1.0), kind="outcome",
           hint="the penalty must push every action down by softmax(Q) (logsumexp over all actions).")
def cql_stays_below_truth_on_unseen_actions(cfg, result):
    """CQL's penalty pushes unseen actions down until they sit below their true value: the mean Q - Q*
    over unseen pairs of the medium data (CQL(H)'s bound holds in expectation, not for every pair)."""
    mean, top = result.gaps(result.select("cql", MEDIUM))
    return measure(mean.mean(), f"largest single pair {top.max().item():+.3f}")


@cql.check(">= min_gain_over_bc", kind="outcome",
           hint="a CQL that only imitates (alpha too large, or a penalty without TD) ties with BC.")
def cql_beats_behaviour_cloning_on_medium(result):
    """Behaviour cloning copies the data's most frequent action, the worse one in about a third of
    the states; CQL uses the rewards to prefer the better of the actions the data shows (exact return
    from the start state, CQL minus BC)."""
    r = result.medium_returns("cql")
    return measure(r["cql"] - r["bc"], f"CQL {r['cql']:.3f}, BC {r['bc']:.3f}")


@cql.check(">= min_gain_over_behaviour", kind="outcome", hint="check the TD target and the penalty's sign.")
def cql_beats_behaviour_policy_on_medium(result):
    """Offline RL should improve on the policy that logged the data: CQL's exact return minus the
    behaviour policy's, on the medium data."""
    r = result.medium_returns("cql")
    return measure(r["cql"] - r["behaviour"], f"CQL {r['cql']:.3f}, behaviour {r['behaviour']:.3f}")


# ---- the report ----------------------------------------------------------------------------------------

def _sweep(result, cfg):
    """(alphas, mean unseen gap, return) on the medium data, alpha = 0 being naive DQN."""
    rows = [(0.0, result.select("dqn", MEDIUM)), (cfg.alpha, result.select("cql", MEDIUM))]
    rows += [(a, result.select("sweep", knob=a)) for a in cfg.sweep_alphas]
    rows.sort()
    return ([a for a, _ in rows], [result.gaps(ks)[0].mean().item() for _, ks in rows],
            [result.returns(ks) for _, ks in rows])


@cql.report
def curves(ctx, cfg, result):
    steps = result.run.steps
    dqn = [_dqn_gaps(result, i) for i in range(len(steps))]
    cql_ks = result.select("cql", MEDIUM)
    curves_ = {"dqn_largest": ([top for _, top in dqn], "naive DQN: largest Q - Q* (every data set)"),
               "dqn_mean": ([mean for mean, _ in dqn], "naive DQN: mean Q - Q* (every data set)"),
               "cql_mean": ([result.gaps(cql_ks, h[cql_ks])[0].mean() for h in result.run.history],
                            f"CQL (alpha = {cfg.alpha:g}): mean Q - Q* (medium)")}
    for name, (values, words) in curves_.items():
        ctx.series(f"offline/unseen_q_gap/{name}", values, steps, x_label="gradient step", group="offline/unseen_q_gap",
                   label=words, y_label=r"$Q - Q^*$ on unseen $(s,a)$ (0 = the truth)", key=name == "dqn_largest",
                   title="Learned Q minus the exact Q* on actions the data never took")
    alphas, gaps, returns = _sweep(result, cfg)
    ticks = [f"{a:g}" for a in alphas]
    ctx.series("offline/alpha_sweep/return", returns, x_label=r"CQL $\alpha$", smooth=False, ticks=ticks,
               label="greedy policy's return (medium data)",
               y_label="exact return from the start", title=r"Medium data: return against $\alpha$ (0 = DQN)")
    ctx.series("offline/alpha_sweep/unseen_q_gap", gaps, x_label=r"CQL $\alpha$", smooth=False, ticks=ticks,
               label="mean Q - Q* on unseen actions (medium data)",
               y_label=r"mean $Q - Q^*$ on unseen $(s,a)$", title=r"Medium data: unseen-action gap against $\alpha$")
    returns_by_quality(ctx, result, "cql", "CQL")
