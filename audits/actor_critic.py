"""Audit of the actor-critic module (day 3): the A2C loss, terminal masking, and the critic as a baseline."""
from __future__ import annotations

import copy
import math

import torch

from llmaudit.audit import Context, audit, kernel
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


def _random_batch(g: torch.Generator, B: int, A: int) -> dict:
    values = torch.randn(B, generator=g, dtype=F64) * 3
    returns = values + torch.randn(B, generator=g, dtype=F64)
    return {"logits": torch.randn(B, A, generator=g, dtype=F64) * 2,
            "actions": torch.randint(0, A, (B,), generator=g), "advantages": torch.randn(B, generator=g, dtype=F64),
            "values": values, "returns": returns}


def _flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


@audit("actor_critic", day=3, title="Actor-critic (A2C): the critic as the policy gradient's baseline",
       config=M.ActorCriticConfig, kernels=KERNELS, formulas=M.FORMULAS)
def audit_actor_critic(ctx: Context, *, actor_critic_loss=M.actor_critic_loss) -> None:
    cfg: M.ActorCriticConfig = ctx.config
    g = ctx.generator(0)

    # --- the environment: our batched torch CartPole is gymnasium's, step for step ---------------
    cmp = M.compare_with_gymnasium(cfg.n_env_check_episodes, ctx.seed, ctx.generator(1))
    endings = min(cmp["truncations"], cmp["cart_off_track"], cmp["pole_fell"])
    ok = cmp["max_obs_diff"] <= 1e-6 and cmp["flag_mismatches"] == 0 and endings > 0
    ctx.check("cartpole_matches_gymnasium_step_for_step", ok,
              f"max |obs diff| {cmp['max_obs_diff']:.1e}, {cmp['flag_mismatches']:.0f} flag mismatches in "
              f"{cmp['steps']:.0f} steps (endings: {cmp['truncations']:.0f} time-outs, {cmp['pole_fell']:.0f} "
              f"poles fallen, {cmp['cart_off_track']:.0f} carts off track)",
              "max |obs diff| <= 1e-6, 0 mismatches, every kind of ending seen",
              "A batched re-implementation of an environment is only a speed-up if it is the same MDP: same "
              "physics, same reward on the terminating step, same 500-step time limit.",
              hint="Euler order: x and theta advance with the old velocities; terminated uses the new state; the "
                   "time limit truncates only steps that did not terminate.")
    ctx.progress(0.05)

    # --- the kernel on random batches (float64) ---------------------------------------------------
    err = 0.0
    for A in (2, 3, 5):
        b = _random_batch(g, 64, A)
        _, _, _, entropy = actor_critic_loss(**b, ent_coef=0.0, vf_coef=0.0)
        ref = torch.distributions.Categorical(logits=b["logits"]).entropy().mean()
        err = max(err, abs(entropy.item() - ref.item()))
    for probs, expected in (([0.25] * 4, math.log(4)), ([0.25, 0.75], 0.5623351446188083)):
        logits = torch.tensor([probs], dtype=F64).log()
        zero = torch.zeros(1, dtype=F64)
        _, _, _, entropy = actor_critic_loss(logits, torch.zeros(1, dtype=torch.long), zero, zero, zero, 0.0, 0.0)
        err = max(err, abs(entropy.item() - expected))
    ctx.check("entropy_matches_closed_form", err < 1e-10, err, "max error < 1e-10",
              "H = -sum_a pi log pi averaged over states: ln 4 = 1.3863 for a uniform 4-way policy, 0.5623 for "
              "[.25, .75]; it is what the entropy bonus pushes up.",
              hint="-(softmax * log_softmax).sum(-1).mean(); summing over the batch instead of averaging, or "
                   "using log(softmax) (NaN at large logits), are the usual slips.")

    err = 0.0
    for _ in range(4):
        b = _random_batch(g, 32, 3)
        values = b["values"].clone().requires_grad_(True)
        _, _, value_loss, _ = actor_critic_loss(**dict(b, values=values), ent_coef=0.0, vf_coef=1.0)
        value_loss.backward()
        expected_loss = 0.5 * ((b["returns"] - b["values"]) ** 2).mean()
        expected_grad = (b["values"] - b["returns"]) / b["values"].numel()
        err = max(err, abs(value_loss.item() - expected_loss.item()), (values.grad - expected_grad).abs().max().item())
    ctx.check("value_loss_is_half_mean_squared_error", err < 1e-12, err, "max error (value and dL/dV) < 1e-12",
              "The critic regresses on the returns: L_V = 1/2 mean (V - R)^2, so dL_V/dV_i = (V_i - R_i)/B.",
              hint="0.5 * ((values - returns) ** 2).mean(); a sum or a missing 1/2 rescales the critic's step.")

    # gradient must not flow into the critic through the advantages, nor into the critic's targets
    b = _random_batch(g, 32, 3)
    values = b["values"].clone().requires_grad_(True)
    next_values = torch.randn(32, generator=g, dtype=F64, requires_grad=True)
    returns = 1.0 + 0.99 * next_values  # a bootstrapped target, built from the critic's own output
    advantages = returns - values  # A = R - V, still attached to the graph
    logits = b["logits"].clone().requires_grad_(True)
    _, policy_loss, _, _ = actor_critic_loss(logits, b["actions"], advantages, values, returns, 0.0, 0.5)
    policy_loss.backward()
    leak = max(values.grad.abs().max().item() if values.grad is not None else 0.0,
               next_values.grad.abs().max().item() if next_values.grad is not None else 0.0)
    ctx.check("policy_loss_sends_no_gradient_to_critic", leak == 0.0, leak, "max |d policy_loss / d V| = 0",
              "The advantage is a fixed weight for the actor: without the detach the actor's loss moves V to make "
              "-log pi * A small, and the baseline stops estimating the value.",
              hint="use advantages.detach() inside the policy loss.")

    values = b["values"].clone().requires_grad_(True)
    next_values = torch.randn(32, generator=g, dtype=F64, requires_grad=True)
    returns = 1.0 + 0.99 * next_values
    _, _, value_loss, _ = actor_critic_loss(b["logits"], b["actions"], b["advantages"], values, returns, 0.0, 0.5)
    value_loss.backward()
    leak = next_values.grad.abs().max().item() if next_values.grad is not None else 0.0
    moved = values.grad.abs().max().item() if values.grad is not None else 0.0
    ctx.check("value_target_is_detached", leak == 0.0 and moved > 0,
              f"|dL_V/dV(s')| = {leak:.2e}, |dL_V/dV(s)| = {moved:.2e}",
              "no gradient into the target, some into V(s)",
              "The bootstrapped target r + gamma V(s') is a constant: differentiating through it (residual "
              "gradient) pulls V(s') towards V(s) and learns a different, slower fixed point.",
              hint="use returns.detach() in the value loss.")

    err = 0.0
    b = _random_batch(g, 32, 3)
    for ent_coef, vf_coef in ((0.0, 0.0), (0.01, 0.5), (0.3, 2.0), (1.0, 0.0)):
        total, pl, vl, ent = actor_critic_loss(**b, ent_coef=ent_coef, vf_coef=vf_coef)
        err = max(err, abs(total.item() - (pl.item() - ent_coef * ent.item() + vf_coef * vl.item())))
    ctx.check("total_is_policy_minus_entropy_plus_value", err < 1e-12, err,
              "max |total - (L_pi - c_ent H + c_vf L_V)| < 1e-12",
              "Minimising the total must maximise the entropy (a bonus, hence the minus) and minimise the value "
              "error; one backward pass then trains both networks.",
              hint="the entropy enters with a minus sign: "
                   "total = policy_loss - ent_coef * entropy + vf_coef * value_loss.")

    logits = (torch.randn(64, 3, generator=g, dtype=F64) * 2).requires_grad_(True)
    zero = torch.zeros(64, dtype=F64)
    total, _, _, _ = actor_critic_loss(logits, torch.randint(0, 3, (64,), generator=g), zero, zero, zero, 0.5, 0.5)
    total.backward()
    before = torch.distributions.Categorical(logits=logits.detach()).entropy().mean()
    after = torch.distributions.Categorical(logits=logits.detach() - 64 * logits.grad).entropy().mean()
    rise = (after - before).item()
    ctx.check("entropy_bonus_raises_entropy", rise > 1e-3, f"H {before.item():.4f} -> {after.item():.4f}",
              "a gradient step with zero advantages raises H",
              "With ent_coef > 0 and nothing else to learn, a descent step on the total loss must make the policy "
              "more random: that is what keeps A2C exploring.",
              hint="the sign of the entropy term, and the entropy must keep its gradient (no .detach() on it).")
    ctx.progress(0.1)

    # --- the closed loop --------------------------------------------------------------------------
    train_gen = ctx.generator(2)
    before_eval = M.evaluate(M.ActorCritic(4, 2, cfg.hidden, ctx.generator(4)), cfg.eval_episodes, ctx.generator(3),
                             cfg.gamma)
    result = M.train(cfg, train_gen, loss_fn=actor_critic_loss, progress=lambda f: ctx.progress(0.1 + 0.75 * f))
    agent = result.agent

    # on the last training batch: the kernel's actor gradient vs the per-sample score (torch.func)
    batch = result.last_batch
    actor64 = copy.deepcopy(agent.actor).double()
    params = list(actor64.parameters())
    obs64, adv64 = batch["obs"].double(), batch["advantages"].double()
    adv64 = (adv64 - adv64.mean()) / (adv64.std() + 1e-8)
    values64 = batch["values"].double()
    _, policy_loss, _, _ = actor_critic_loss(actor64(obs64), batch["actions"], adv64, values64, values64, 0.0, 0.0)
    policy_loss.backward()
    scores = M.per_sample_scores(actor64, obs64, batch["actions"])  # (B, P)
    expected = -(adv64[:, None] * scores).mean(0)
    got = _flat_grad(params)
    rel = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    ctx.check("policy_gradient_is_minus_advantage_times_score", rel < 1e-10, rel,
              "||autograd - (-mean A grad log pi)|| / ||.|| < 1e-10",
              "Backprop through L_pi = -mean(A log pi(a|s)) gives exactly -mean(A * grad log pi): the surrogate "
              "loss exists only to produce the policy gradient.",
              hint="gather the log-prob of the taken action; average over the batch, not sum.")

    # a state-dependent baseline adds nothing in expectation: sum_a pi(a|s) grad[-b(s) log pi(a|s)] = 0
    logits = actor64(obs64).detach().requires_grad_(True)
    probs = logits.detach().softmax(-1)
    baseline = values64 - values64.mean()  # the critic's V(s), centred so the test is not trivially small
    expected_grad, single = torch.zeros_like(logits), 0.0
    for a in range(logits.shape[1]):
        actions = torch.full((logits.shape[0],), a, dtype=torch.long)
        _, pl, _, _ = actor_critic_loss(logits, actions, probs[:, a] * baseline, values64, values64, 0.0, 0.0)
        (grad,) = torch.autograd.grad(pl, logits)
        expected_grad += grad
        single = max(single, grad.norm().item())
    residual = (expected_grad.norm() / max(single, 1e-30)).item()
    ctx.check("critic_baseline_adds_no_expected_gradient", residual < 1e-10, residual,
              "||sum_a pi(a|s) grad(-V(s) log pi(a|s))|| / ||one term|| < 1e-10",
              "E_a[grad log pi(a|s)] = grad sum_a pi(a|s) = 0, so subtracting V(s) cannot bias the policy "
              "gradient; it only removes variance.",
              hint="the score must be grad log pi (log_softmax), not grad pi.")

    # terminal masking in the real pipeline: the trained critic, a uniform behaviour policy (actor head
    # zeroed) and a short time limit, so that both terminations and truncations happen
    probe = copy.deepcopy(agent)
    with torch.no_grad():
        probe.actor[-1].weight.zero_()
        probe.actor[-1].bias.zero_()
    env = M.CartPoleTensorEnv(cfg.num_envs, ctx.generator(5), max_episode_steps=cfg.masking_time_limit)
    rollout, _ = M.collect_rollout(env, probe, env.observe(), 3 * cfg.masking_time_limit, ctx.generator(6),
                                   torch.zeros(cfg.num_envs))
    advantages, _, values = M.rollout_advantages(rollout, probe, cfg.gamma, cfg.gae_lambda, cfg.bootstrap_truncated)
    with torch.no_grad():
        v_final = probe.value(rollout.next_obs)
    trunc, term = rollout.truncated, rollout.terminated
    err_trunc = (advantages - (rollout.rewards + cfg.gamma * v_final - values))[trunc].abs().max().item() \
        if trunc.any() else float("nan")
    err_term = (advantages - (rollout.rewards - values))[term].abs().max().item() if term.any() else float("nan")
    both = bool(trunc.any() and term.any())
    ctx.check("truncation_bootstraps_termination_does_not", both and max(err_trunc, err_term) < 1e-4,
              f"truncated: {err_trunc:.1e} ({int(trunc.sum())} steps), "
              f"terminated: {err_term:.1e} ({int(term.sum())} steps)",
              "A = r + gamma V(s_final) - V(s) at truncations, A = r - V(s) at terminations (< 1e-4)",
              "CartPole's 500-step limit is a time-out, not a failure: the truncated step still bootstraps from "
              "the value of its real final observation; a fallen pole has no future.",
              hint="keep the final observation before the auto-reset, and pass terminated and truncated separately "
                   "(OR-ing them zeroes the bootstrap at every time-out).")
    ctx.progress(0.9)

    # --- outcomes ---------------------------------------------------------------------------------
    final = M.evaluate(agent, cfg.eval_episodes, ctx.generator(3), cfg.gamma)
    mean_return = final.returns.mean().item()
    ctx.check("cartpole_mean_return_reaches_target", mean_return >= cfg.target_return,
              f"{before_eval.returns.mean().item():.1f} -> {mean_return:.1f} (min {final.returns.min().item():.0f}) "
              f"over {cfg.eval_episodes} held-out episodes", f">= {cfg.target_return:g}",
              "The trained policy keeps the pole up: gymnasium counts CartPole-v1 as solved at a mean return of "
              "475 over 100 episodes (CleanRL's PPO reports 490 +- 6).",
              kind="outcome", hint="a sign error in the policy loss, or advantages that ignore the critic, stall "
                                   "learning near the random policy's ~22.")

    ratios = torch.tensor(result.variance["with_critic"]) / torch.tensor(result.variance["without_baseline"])
    median_ratio = ratios.median().item()
    ctx.check("critic_baseline_reduces_gradient_variance", median_ratio <= cfg.max_variance_ratio,
              f"median Var[with critic] / Var[without baseline] = {median_ratio:.4f} over {len(ratios)} batches "
              f"(first {ratios[0].item():.3f}, last {ratios[-1].item():.4f})", f"<= {cfg.max_variance_ratio:g}",
              "On the same batches, weighting the score by A = R - V(s) instead of the return R keeps the expected "
              "gradient but removes the action-independent part of the return, so the estimate is far less noisy.",
              kind="outcome", hint="a critic that is not trained (vf_coef = 0) leaves V ~ 0 and the ratio near 1.")

    # --- curves and headline numbers ----------------------------------------------------------------
    h = result.history
    ctx.series("charts/episodic_return", h["episodic_return"], h["return_step"], x_label="global_step")
    for name, key in (("losses/policy_loss", "policy_loss"), ("losses/value_loss", "value_loss"),
                      ("losses/entropy", "entropy"), ("losses/explained_variance", "explained_variance"),
                      ("charts/learning_rate", "learning_rate")):
        ctx.series(name, h[key], h["global_step"], x_label="global_step")
    v = result.variance
    ctx.series("policy_gradient/log10_variance_with_critic", torch.tensor(v["with_critic"]).log10(), v["global_step"],
               x_label="global_step", group="policy_gradient/log10_variance", smooth=False)
    ctx.series("policy_gradient/log10_variance_without_baseline", torch.tensor(v["without_baseline"]).log10(),
               v["global_step"], x_label="global_step", group="policy_gradient/log10_variance", smooth=False)
    ctx.series("policy_gradient/variance_ratio", ratios, v["global_step"], x_label="global_step", smooth=False)
    ctx.scalar("mean return (held-out)", mean_return)
    ctx.scalar("min return (held-out)", final.returns.min())
    ctx.scalar("mean return of an untrained policy", before_eval.returns.mean())
    ctx.scalar("solved at env step", result.solved_at if result.solved_at is not None else "not solved")
    ctx.scalar("env steps", result.global_step)
    ctx.scalar("updates", result.updates)
    ctx.scalar("median variance ratio", median_ratio)
    with torch.no_grad():
        ctx.scalar("V(s0) of the critic", agent.value(final.start_obs).mean())
    ctx.scalar("discounted return from s0", final.discounted.mean())
    ctx.progress(1.0)
