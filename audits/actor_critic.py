"""Audit of the actor-critic module (day 3): the A2C loss, the update step, terminal masking, the
batched CartPole against gymnasium, and the critic as a baseline."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from llmaudit.audit import Audit, bound, kernel, max_error, measure
from modules import actor_critic as M

F64 = torch.float64


def _example() -> dict:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5, generator=g, dtype=F64)
    returns = values + torch.randn(5, generator=g, dtype=F64)
    return {"logits": torch.randn(5, 3, generator=g, dtype=F64), "actions": torch.tensor([0, 2, 1, 1, 0]),
            "advantages": returns - values, "values": values, "returns": returns, "ent_coef": 0.01, "vf_coef": 0.5}


KERNELS = [
    kernel(M.actor_critic_loss, example=_example,
           hint="policy_loss = -mean(A.detach() * log_softmax(logits)[a]); "
                "value_loss = 0.5 * mean((V - R.detach())^2); "
                "total = policy_loss - ent_coef * entropy + vf_coef * value_loss."),
]

ac = Audit("actor_critic", day=3, title="Actor-critic (A2C): the critic as the policy gradient's baseline",
           config=M.ActorCriticConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _random_batch(g: torch.Generator, B: int, A: int) -> dict:
    values = torch.randn(B, generator=g, dtype=F64) * 3
    returns = values + torch.randn(B, generator=g, dtype=F64)
    return {"logits": torch.randn(B, A, generator=g, dtype=F64) * 2,
            "actions": torch.randint(0, A, (B,), generator=g), "advantages": torch.randn(B, generator=g, dtype=F64),
            "values": values, "returns": returns}


def _zeros(B: int, dtype=F64) -> torch.Tensor:
    return torch.zeros(B, dtype=dtype)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """The reference: mean Shannon entropy of softmax(logits), by torch.distributions."""
    return torch.distributions.Categorical(logits=logits).entropy().mean()


# ---- the environment: our batched torch CartPole is gymnasium's, one transition at a time ------------

@ac.check({"state": "< 1e-12", "observation": "< 1e-6", "flag_mismatches": "== 0", "each_ending": bound(">= 1", scale=0)},
          hint="Euler order: x and theta advance with the old velocities; terminated uses the new state; the time "
               "limit truncates only steps that did not terminate.")
def cartpole_matches_gymnasium_step_for_step(cfg, g, ctx):
    """A batched re-implementation of an environment is only a speed-up if it is the same MDP: same physics,
    same reward on the terminating step, same 500-step limit. Each transition starts from gymnasium's own
    state, so the comparison never depends on the last bit of sin/cos (module code, no kernel)."""
    cmp = M.compare_with_gymnasium(cfg.n_env_check_episodes, ctx.seed, g)
    return measure({"state": cmp["max_state_diff"], "observation": cmp["max_obs_diff"],
                    "flag_mismatches": cmp["flag_mismatches"],
                    "each_ending": min(cmp["truncations"], cmp["pole_fell"], cmp["cart_off_track"])},
                   f"{cmp['steps']:.0f} transitions of {cfg.n_env_check_episodes} episodes: "
                   f"{cmp['truncations']:.0f} time-outs, {cmp['pole_fell']:.0f} poles fallen, "
                   f"{cmp['cart_off_track']:.0f} carts off the track")


# ---- the kernel on random float64 batches ---------------------------------------------------------------

@ac.check("< 1e-10", hint="-(softmax * log_softmax).sum(-1).mean(); summing over the batch instead of averaging "
                          "is the usual slip.")
def entropy_matches_closed_form(actor_critic_loss, g):
    """H = -sum_a pi log pi averaged over states: ln 4 = 1.3863 for a uniform 4-way policy, 0.5623 for
    [.25, .75], and torch.distributions.Categorical's entropy on random logits; it is what the bonus raises."""
    errors = []
    for A in (2, 3, 5):
        b = _random_batch(g, 64, A)
        errors.append(max_error(actor_critic_loss(**b, ent_coef=0.0, vf_coef=0.0)[3], _entropy(b["logits"])))
    for probs, expected in (([0.25] * 4, math.log(4)), ([0.25, 0.75], 0.5623351446188083)):
        logits = torch.tensor([probs], dtype=F64).log()
        out = actor_critic_loss(logits, torch.zeros(1, dtype=torch.long), _zeros(1), _zeros(1), _zeros(1), 0.0, 0.0)
        errors.append(max_error(out[3], torch.tensor(expected, dtype=F64)))
    return errors


@ac.check("< 1e-5", hint="log_softmax(logits), never log(softmax(logits)): softmax underflows to 0 in float32 and "
                         "0 * log 0 is NaN.")
def loss_is_finite_for_large_float32_logits(actor_critic_loss):
    """A confident policy has logits in the hundreds; in float32 softmax then underflows to exactly 0, so
    log(softmax) gives -inf and 0 * -inf = NaN in the entropy. log_softmax stays finite and exact: all four
    outputs match a float64 computation to 1e-5 (relative)."""
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [0.0, 80.0, -80.0], [200.0, 200.0, -300.0], [0.1, 0.2, 0.3]])
    actions = torch.tensor([1, 0, 2, 1])
    adv, values, returns = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.ones(4)
    got = actor_critic_loss(logits, actions, adv, values, returns, 0.01, 0.5)
    logp = torch.log_softmax(logits.double(), -1)
    policy = -(adv.double() * logp[torch.arange(4), actions]).mean()
    value = 0.5 * (values.double() - returns.double()).square().mean()
    entropy = -(logp.exp() * logp).sum(-1).mean()
    want = (policy - 0.01 * entropy + 0.5 * value, policy, value, entropy)
    return [max_error(x, y) / max(1.0, abs(y.item())) for x, y in zip(got, want)]


@ac.check("< 1e-12", hint="0.5 * ((values - returns) ** 2).mean(); a sum or a missing 1/2 rescales the critic's "
                          "step.")
def value_loss_is_half_mean_squared_error(actor_critic_loss, g):
    """The critic regresses on the returns: L_V = 1/2 mean (V - R)^2, so dL_V/dV_i = (V_i - R_i)/B."""
    errors = []
    for _ in range(4):
        b = _random_batch(g, 32, 3)
        values = b["values"].clone().requires_grad_(True)
        value_loss = actor_critic_loss(**dict(b, values=values), ent_coef=0.0, vf_coef=1.0)[2]
        (grad,) = torch.autograd.grad(value_loss, values)
        errors += [max_error(value_loss, 0.5 * (b["returns"] - b["values"]).square().mean()),
                   max_error(grad, (b["values"] - b["returns"]) / b["values"].numel())]
    return errors


def _bootstrapped_batch(g: torch.Generator) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch whose returns r + 0.99 V(s') and advantages R - V are built from the critic's own outputs."""
    b = _random_batch(g, 32, 3)
    values = b["values"].clone().requires_grad_(True)
    next_values = torch.randn(32, generator=g, dtype=F64, requires_grad=True)
    returns = 1.0 + 0.99 * next_values
    return b, values, next_values, returns


@ac.check("== 0", hint="use advantages.detach() inside the policy loss.")
def policy_loss_sends_no_gradient_to_critic(actor_critic_loss, g):
    """The advantage is a fixed weight for the actor: without the detach the actor's loss moves V to make
    -log pi * A small, and the baseline stops estimating the value (dL_pi/dV = dL_pi/dV(s') = 0)."""
    b, values, next_values, returns = _bootstrapped_batch(g)
    logits = b["logits"].clone().requires_grad_(True)
    policy_loss = actor_critic_loss(logits, b["actions"], returns - values, values, returns, 0.0, 0.5)[1]
    grads = torch.autograd.grad(policy_loss, [values, next_values], allow_unused=True)
    return [0.0 if x is None else x.abs().max() for x in grads]


@ac.check({"into_target": "== 0", "value_gradient_error": "< 1e-12"},
          hint="use returns.detach() in the value loss.")
def value_target_is_detached(actor_critic_loss, g):
    """The bootstrapped target r + gamma V(s') is a constant: differentiating through it (residual gradient)
    pulls V(s') towards V(s) and learns a different, slower fixed point. The gradient reaches V(s) only,
    as (V - R)/B."""
    b, values, next_values, returns = _bootstrapped_batch(g)
    value_loss = actor_critic_loss(b["logits"], b["actions"], b["advantages"], values, returns, 0.0, 0.5)[2]
    g_values, g_next = torch.autograd.grad(value_loss, [values, next_values], allow_unused=True)
    expected = (values - returns).detach() / 32
    return {"into_target": 0.0 if g_next is None else g_next.abs().max(),
            "value_gradient_error": math.inf if g_values is None else max_error(g_values, expected)}


@ac.check("< 1e-12", hint="the entropy enters with a minus sign: "
                          "total = policy_loss - ent_coef * entropy + vf_coef * value_loss.")
def total_is_policy_minus_entropy_plus_value(actor_critic_loss, g):
    """Minimising the total must maximise the entropy (a bonus, hence the minus) and minimise the value error;
    one backward pass then trains both networks (four (c_ent, c_vf) pairs)."""
    b = _random_batch(g, 32, 3)
    errors = []
    for ent_coef, vf_coef in ((0.0, 0.0), (0.01, 0.5), (0.3, 2.0), (1.0, 0.0)):
        total, pl, vl, ent = actor_critic_loss(**b, ent_coef=ent_coef, vf_coef=vf_coef)
        errors.append(max_error(total, pl - ent_coef * ent + vf_coef * vl))
    return errors


@ac.check("in [0.99, 1.01]", hint="the sign of the entropy term, and the entropy must keep its gradient (no "
                                  ".detach() on it).")
def entropy_bonus_raises_entropy(actor_critic_loss, g):
    """With ent_coef = c > 0 and nothing else to learn, a small descent step on the total raises H by
    eta c |grad H|^2 to first order: the bonus is what keeps A2C exploring. Measured: the rise over that
    prediction (grad H from torch.distributions)."""
    B, c, eta = 64, 0.5, 1e-3
    logits = (torch.randn(B, 3, generator=g, dtype=F64) * 2).requires_grad_(True)
    actions = torch.randint(0, 3, (B,), generator=g)
    total = actor_critic_loss(logits, actions, _zeros(B), _zeros(B), _zeros(B), c, 0.5)[0]
    (step,) = torch.autograd.grad(total, logits)
    (grad_H,) = torch.autograd.grad(_entropy(logits), logits)
    with torch.no_grad():
        rise = _entropy(logits - eta * step) - _entropy(logits)
    return measure(rise / (eta * c * grad_H.square().sum()), f"H rises by {rise.item():.3g}")


# ---- the kernel on a network: the policy gradient it produces --------------------------------------

@ac.fixture
def actor(cfg, g):
    """A float64 actor (CleanRL's initialisation, head scaled up so pi is far from uniform), CartPole-like
    observations, actions, advantages and critic values for 256 samples."""
    net = M.ActorCritic(4, 2, cfg.hidden, g).actor.double()
    with torch.no_grad():
        net[-1].weight.mul_(300.0)
    B = 256
    obs = torch.randn(B, 4, generator=g, dtype=F64) * torch.tensor([1.0, 1.0, 0.1, 1.0], dtype=F64)
    return {"net": net, "obs": obs, "actions": torch.randint(0, 2, (B,), generator=g),
            "advantages": torch.randn(B, generator=g, dtype=F64),
            "values": 3.0 * torch.randn(B, generator=g, dtype=F64)}


@ac.check("< 1e-10", hint="gather the log-prob of the taken action; average over the batch, not sum.")
def policy_gradient_is_minus_advantage_times_score(actor_critic_loss, actor):
    """Backprop through L_pi = -mean(A log pi(a|s)) gives exactly -mean(A grad log pi) over all actor
    parameters (per-sample scores from torch.func): the surrogate loss exists only to produce the policy
    gradient. Measured: relative error."""
    net, obs, actions, adv = actor["net"], actor["obs"], actor["actions"], actor["advantages"]
    params = list(net.parameters())
    policy_loss = actor_critic_loss(net(obs), actions, adv, actor["values"], actor["values"], 0.0, 0.0)[1]
    got = torch.cat([x.reshape(-1) for x in torch.autograd.grad(policy_loss, params)])
    expected = -(adv[:, None] * M.per_sample_scores(net, obs, actions)).mean(0)
    return (got - expected).norm() / expected.norm()


@ac.check("< 1e-10", hint="the score must be grad log pi (log_softmax), not grad pi.")
def critic_baseline_adds_no_expected_gradient(actor_critic_loss, actor):
    """E_a[grad log pi(a|s)] = grad sum_a pi(a|s) = 0, so subtracting V(s) cannot bias the policy gradient;
    it only removes variance: ||sum_a pi(a|s) grad(-V(s) log pi(a|s))|| / ||one term||."""
    logits = actor["net"](actor["obs"]).detach().requires_grad_(True)
    probs, baseline = logits.detach().softmax(-1), actor["values"]
    total, norms = torch.zeros_like(logits), []
    for a in range(logits.shape[1]):
        actions = torch.full((logits.shape[0],), a, dtype=torch.long)
        pl = actor_critic_loss(logits, actions, probs[:, a] * baseline, baseline, baseline, 0.0, 0.0)[1]
        (grad,) = torch.autograd.grad(pl, logits)
        total, norms = total + grad, norms + [grad.norm()]
    return total.norm() / torch.stack(norms).max()


# ---- the update step and the rollout (module code, no kernel) --------------------------------------

class _RecordingEnv(M.CartPoleTensorEnv):
    """The tensor CartPole that also keeps the float64 state of every env before every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.before: list[torch.Tensor] = []

    def step(self, actions):
        self.before.append(self.state.clone())
        return super().step(actions)


@ac.fixture
def probe(cfg, g):
    """A uniform policy (actor head zeroed) and a known linear critic V(s) = 5 + sum(s), a short rollout of
    every env with a 20-step time limit (so both terminations and truncations happen), and the float64
    state of every env before every step, recorded by the env itself."""
    agent = M.ActorCritic(4, 2, cfg.hidden, g)
    with torch.no_grad():
        agent.actor[-1].weight.zero_()
        agent.actor[-1].bias.zero_()
    agent.critic = nn.Sequential(nn.Linear(4, 1))
    with torch.no_grad():
        agent.critic[0].weight.fill_(1.0)
        agent.critic[0].bias.fill_(5.0)

    env = _RecordingEnv(cfg.num_envs, g, max_episode_steps=cfg.masking_time_limit)
    rollout, _ = M.collect_rollout(env, agent, env.observe(), 3 * cfg.masking_time_limit, g, torch.zeros(cfg.num_envs))
    return {"agent": agent, "rollout": rollout, "states": torch.stack(env.before), "env": env}


@ac.check({"truncated": "< 1e-4", "terminated": "< 1e-4"},
          hint="keep the final observation before the auto-reset, and pass terminated and truncated separately "
               "(OR-ing them zeroes the bootstrap at every time-out).")
def truncation_bootstraps_termination_does_not(cfg, probe):
    """A time limit is a time-out, not a failure: the truncated step still bootstraps from the value of its
    real final observation (recomputed here from the recorded state, not read back from the rollout); a
    fallen pole has no future, A = r - V(s)."""
    agent, ro = probe["agent"], probe["rollout"]
    advantages, _, values = M.rollout_advantages(ro, agent, cfg.gamma, cfg.gae_lambda, cfg.bootstrap_truncated)
    T, N = ro.actions.shape
    final = probe["env"].dynamics(probe["states"].reshape(T * N, 4), ro.actions.reshape(-1)).float()
    with torch.no_grad():
        v_final = agent.value(final).reshape(T, N)
    trunc, term = ro.truncated, ro.terminated
    return measure({"truncated": max_error(advantages[trunc], (ro.rewards + cfg.gamma * v_final - values)[trunc]),
                    "terminated": max_error(advantages[term], (ro.rewards - values)[term])},
                   f"{int(trunc.sum())} truncated and {int(term.sum())} terminated steps")


def _update_batch(cfg, probe):
    agent = copy.deepcopy(probe["agent"])
    ro = probe["rollout"]
    adv, returns, _ = M.rollout_advantages(ro, agent, cfg.gamma, cfg.gae_lambda, cfg.bootstrap_truncated)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5)
    return agent, optimizer, ro.obs.reshape(-1, 4), ro.actions.reshape(-1), adv.reshape(-1), returns.reshape(-1)


@ac.check("< 1e-5", hint="whiten over the whole batch before the loss: (A - mean) / (std + 1e-8).")
def advantages_are_normalised_in_the_update(cfg, probe):
    """With norm_adv the actor sees (A - mean A) / std A over the batch: the update's size no longer depends
    on the scale of the returns (CleanRL's default). Measured on what the loss receives inside the update."""
    agent, optimizer, obs, actions, adv, returns = _update_batch(cfg, probe)
    seen = []

    def spy(logits, actions, advantages, *rest):
        seen.append(advantages.detach().clone())
        return M.actor_critic_loss(logits, actions, advantages, *rest)

    M.update(agent, optimizer, obs, actions, adv, returns, cfg, spy)
    expected = (adv - adv.mean()) / (adv.std() + 1e-8) if cfg.norm_adv else adv
    return measure(max_error(seen[0], expected), f"raw advantages: mean {adv.mean().item():.3g}, "
                                                 f"std {adv.std().item():.3g}")


@ac.check({"clip_error": "< 1e-5", "unclipped_norm": "> max_grad_norm"},
          hint="nn.utils.clip_grad_norm_(agent.parameters(), max_grad_norm) between backward() and step().")
def gradient_norm_is_clipped_in_the_update(cfg, probe):
    """The global gradient norm of actor + critic is clipped to max_grad_norm before the Adam step: one
    large-advantage batch cannot throw the policy far. The batch is chosen so that clipping matters; the
    norm the optimizer sees must be min(unclipped, max_grad_norm) (relative error)."""
    agent, optimizer, obs, actions, adv, returns = _update_batch(cfg, probe)
    raw = copy.deepcopy(agent)
    norm_adv = (adv - adv.mean()) / (adv.std() + 1e-8) if cfg.norm_adv else adv
    loss = M.actor_critic_loss(raw.actor(obs), actions, norm_adv, raw.value(obs), returns, cfg.ent_coef, cfg.vf_coef)[0]
    unclipped = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, list(raw.parameters()))]).norm()
    M.update(agent, optimizer, obs, actions, adv, returns, cfg)
    clipped = torch.cat([p.grad.reshape(-1) for p in agent.parameters()]).norm()
    expected = unclipped.clamp_max(cfg.max_grad_norm)
    return measure({"clip_error": (clipped - expected).abs() / expected, "unclipped_norm": unclipped},
                   f"norm {unclipped.item():.3f} before clipping, {clipped.item():.4f} after")


# ---- the closed loop --------------------------------------------------------------------------------

@ac.fixture(cost=20)
def loop(ctx, cfg, g, actor_critic_loss):
    """A2C on 128 CartPole-v1 envs, 4 steps each per update, until solved (toy: a 250-update budget)."""
    return M.run(cfg, g, actor_critic_loss=actor_critic_loss, progress=ctx.progress)


# The return is capped at 500 (the time limit), so a margin relative to the full-mode bar itself (475) could
# never reach 10 %: margins of this check are measured per 100 steps of return.
@ac.check(bound(">= target_return", scale=100.0), kind="outcome",
          hint="a sign error in the policy loss, or advantages that ignore the critic, stall learning near the "
               "random policy's ~22.")
def cartpole_mean_return_reaches_target(cfg, loop):
    """The trained policy keeps the pole up: gymnasium counts CartPole-v1 as solved at a mean return of 475
    over 100 episodes (CleanRL's PPO reports 490 +- 6). Measured on fresh episodes that took no part in
    training or stopping."""
    after, before = loop.after.returns, loop.before.returns
    return measure(after.mean(), f"untrained {before.mean().item():.1f} -> {after.mean().item():.1f} "
                                 f"(min {after.min().item():.0f}) over {cfg.eval_episodes} held-out episodes")


@ac.check("<= max_variance_ratio", kind="outcome", hint="a critic that is not trained (vf_coef = 0) leaves V ~ 0 "
                                                       "and the ratio near 1.")
def critic_baseline_reduces_gradient_variance(loop):
    """On the same batches, weighting the score by A = R - V(s) instead of the return R keeps the expected
    gradient but removes the action-independent part of the return, so the estimate is far less noisy:
    the median of Var[with critic] / Var[without baseline] over the run."""
    v = loop.train.variance
    ratios = torch.tensor(v["with_critic"]) / torch.tensor(v["without_baseline"])
    return measure(ratios.median(), f"over {len(ratios)} batches (first {ratios[0].item():.3f}, "
                                    f"last {ratios[-1].item():.4f})")


# ---- report ----------------------------------------------------------------------------------------

STEPS = "environment steps"
LOG_VAR = r"$\log_{10}$ tr Cov of the gradient"
CURVES = {
    "charts/episodic_return": dict(label="episode return", y_label="return (steps balanced)", key=True),
    "losses/policy_loss": dict(label="policy loss", y_label=r"loss $-\log\pi \cdot A$ (return units)"),
    "losses/value_loss": dict(label="value loss", y_label=r"squared error (return$^2$)"),
    "losses/entropy": dict(label="policy entropy", y_label="entropy per action (nats)"),
    "losses/explained_variance": dict(label="explained variance of the critic", y_label="explained variance (1 = perfect)"),
    "charts/learning_rate": dict(label="learning rate", y_label="learning rate (Adam step size)"),
    "policy_gradient/log10_variance_with_critic": dict(label=r"with the critic ($A = G - V$)", y_label=LOG_VAR,
                                                       title="Gradient variance with and without the critic"),
    "policy_gradient/log10_variance_without_baseline": dict(label="without a baseline (return G)", y_label=LOG_VAR),
    "policy_gradient/variance_ratio": dict(label="gradient variance, with the critic over without",
                                           y_label="variance ratio (< 1: the critic helps)"),
}


@ac.report
def curves(ctx, loop):
    result, h, v = loop.train, loop.train.history, loop.train.variance
    ctx.series("charts/episodic_return", h["episodic_return"], h["return_step"], x_label=STEPS,
               **CURVES["charts/episodic_return"])
    for name, key in (("losses/policy_loss", "policy_loss"), ("losses/value_loss", "value_loss"),
                      ("losses/entropy", "entropy"), ("losses/explained_variance", "explained_variance"),
                      ("charts/learning_rate", "learning_rate")):
        ctx.series(name, h[key], h["global_step"], x_label=STEPS, **CURVES[name])
    ratios = torch.tensor(v["with_critic"]) / torch.tensor(v["without_baseline"])
    for name, key in (("policy_gradient/log10_variance_with_critic", "with_critic"),
                      ("policy_gradient/log10_variance_without_baseline", "without_baseline")):
        ctx.series(name, torch.tensor(v[key]).log10(), v["global_step"], x_label=STEPS,
                   group="policy_gradient/log10_variance", smooth=False, **CURVES[name])
    ctx.series("policy_gradient/variance_ratio", ratios, v["global_step"], x_label=STEPS, smooth=False,
               **CURVES["policy_gradient/variance_ratio"])
    ctx.scalar("mean return (held-out)", loop.after.returns.mean())
    ctx.scalar("min return (held-out)", loop.after.returns.min())
    ctx.scalar("mean return of an untrained policy", loop.before.returns.mean())
    ctx.scalar("solved at env step", result.solved_at if result.solved_at is not None else "not solved")
    ctx.scalar("env steps", result.global_step)
    ctx.scalar("updates", result.updates)
    ctx.scalar("median variance ratio", ratios.median())
    ctx.scalar("variance ratio first batch", ratios[0])
    ctx.scalar("variance ratio last batch", ratios[-1])
    with torch.no_grad():
        ctx.scalar("V(s0) of the critic", result.agent.value(loop.after.start_obs).mean())
    ctx.scalar("discounted return from s0", loop.after.discounted.mean())
