"""Actor-critic (A2C): a learned value V(s) is the policy gradient's baseline and bootstrap target.

    TD error:    delta_t = r_t + gamma (1 - term_t) V(s_{t+1}) - V(s_t)
    Advantage:   A_t = sum_l (gamma lam)^l delta_{t+l}   (lam = 1 over a k-step rollout: the n-step
                 return r_t + ... + gamma^(k-1) r_{t+k-1} + gamma^k V(s_{t+k}) minus V(s_t))
    Actor:       L_pi = -mean_t[ sg(A_t) * log pi(a_t|s_t) ]
    Critic:      L_V  = 1/2 mean_t[ (V(s_t) - sg(R_t))^2 ],   R_t = A_t + V(s_t)
    Total:       L = L_pi - c_ent * mean_t H(pi(.|s_t)) + c_vf * L_V

Subtracting V(s_t) leaves the expected gradient unchanged (E_a[grad log pi(a|s)] = 0) and removes the
part of the return that does not depend on the action: the critic smooths the actor's update.

Builds on: gae (compute_gae gives the advantages and the critic's targets), advantage (baselines).
Deviations: CartPole-v1 runs as a batch of environments in torch (float64 physics copied from
gymnasium and checked against it one transition at a time) with same-step auto-reset that keeps the real final
observation, so a time-limit truncation bootstraps from V(s_final) while a termination does not.
A2C is synchronous: one gradient step per short rollout of all environments. It has no trust region
and keeps moving after it has solved the task (whitened advantages of a near-perfect policy are
mostly noise, and Adam turns them into full-size steps), so training stops on gymnasium's own
criterion (the last 100 episodes average >= 475), confirmed on fresh episodes; the reported return
is a third, held-out evaluation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.gae import compute_gae

__all__ = [
    "FORMULAS", "ActorCriticConfig",
    "actor_critic_loss",
    "CartPoleTensorEnv", "balancing_action", "compare_with_gymnasium",
    "ActorCritic", "sample_actions", "Rollout", "collect_rollout", "rollout_advantages", "update",
    "per_sample_scores", "gradient_variances", "Evaluation", "evaluate", "TrainResult", "train",
    "ActorCriticResult", "run",
]

FORMULAS = [
    ("TD error", r"$\delta_t = r_t + \gamma\,(1-\mathrm{term}_t)\,V_\phi(s_{t+1}) - V_\phi(s_t)$"),
    ("Advantage (GAE)", r"$\hat A_t = \sum_{l\geq 0}(\gamma\lambda)^l\,\delta_{t+l}$"),
    ("Critic targets", r"$\hat R_t = \hat A_t + V_\phi(s_t)$"),
    ("Actor loss", r"$L_\pi = -\frac{1}{B}\sum_t \mathrm{sg}(\hat A_t)\,\log\pi_\theta(a_t|s_t)$"),
    ("Critic loss", r"$L_V = \frac{1}{2B}\sum_t \left(V_\phi(s_t)-\mathrm{sg}(\hat R_t)\right)^2$"),
    ("Total", r"$L = L_\pi - c_{ent}\,\frac{1}{B}\sum_t H(\pi_\theta(\cdot|s_t)) + c_{vf}\,L_V$"),
    ("Baseline adds no bias", r"$\mathbb{E}_{a\sim\pi}[\nabla\log\pi(a|s)\,V(s)] = V(s)\,\nabla\sum_a\pi(a|s) = 0$"),
]


@dataclass(frozen=True)
class ActorCriticConfig:
    # A2C on CartPole-v1 (names as in CleanRL)
    num_envs: int = 128  # parallel CartPole environments, stepped as one batch
    num_steps: int = 4  # steps per environment per rollout; one gradient step per rollout
    total_timesteps: int = 128_000  # budget in environment steps (training may stop earlier, see stop_return)
    learning_rate: float = 2.5e-3  # Adam, for actor and critic
    anneal_lr: bool = True  # linear decay to 0 over the budget
    gamma: float = 0.99
    gae_lambda: float = 1.0  # 1.0: n-step returns within each rollout, the classic A2C advantage
    norm_adv: bool = True  # whiten advantages over each batch before the actor loss
    ent_coef: float = 0.0  # entropy bonus c_ent
    vf_coef: float = 0.5  # value-loss weight c_vf
    max_grad_norm: float = 0.5  # clip the global gradient norm of actor + critic
    hidden: int = 64  # width of the two tanh layers of the actor and of the critic (separate networks)
    bootstrap_truncated: bool = True  # a time-limit truncation bootstraps from V(s_final); False = CleanRL ppo.py
    # stopping and evaluation
    stop_return: float = 475.0  # gymnasium's reward_threshold for CartPole-v1
    stop_window: int = 100  # ... averaged over this many consecutive training episodes
    confirm_return: float = 490.0  # ... then stop if eval_episodes fresh episodes average at least this
    confirm_every: int = 25  # after a failed confirmation, wait this many updates before the next one
    eval_episodes: int = 32  # held-out episodes of the final policy (and of each confirmation)
    # the critic as a baseline: gradient variance with vs without it, on the same batches
    variance_every: int = 25  # measure every this many updates
    # checks
    n_env_check_episodes: int = 8  # episodes replayed in gymnasium and in the tensor env (>= 3: one per ending)
    masking_time_limit: int = 20  # a short time limit for the terminal-masking check (many truncations)
    # outcome bars, from `llmaudit sweep actor_critic` (toy seeds 0-19, full seeds 0-4)
    target_return: float = 80.0  # the held-out mean return must reach this (an untrained policy: ~22)
    max_variance_ratio: float = 0.35  # median Var[with critic] / Var[without baseline] over the run
    log_every: int = 2  # record curves every this many updates

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "num_envs": ">= 2", "num_steps": ">= 1", "total_timesteps": ">= 1", "learning_rate": ">= 0",
        "gamma": "[0, 1)", "gae_lambda": "[0, 1]", "ent_coef": ">= 0", "vf_coef": ">= 0", "max_grad_norm": "> 0",
        "hidden": ">= 1", "stop_return": ">= 0", "stop_window": ">= 1", "confirm_return": ">= 0",
        "confirm_every": ">= 1", "eval_episodes": ">= 1", "variance_every": ">= 1", "n_env_check_episodes": ">= 3",
        "masking_time_limit": ">= 1", "target_return": ">= 0", "max_variance_ratio": "> 0", "log_every": ">= 1",
    }

    def __post_init__(self):
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {self.gamma}")
        if not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"gae_lambda must be in [0, 1], got {self.gae_lambda}")
        if self.num_envs < 2 or self.num_steps < 1 or self.hidden < 1:
            raise ValueError("num_envs must be at least 2 (the variance is over envs), num_steps and hidden >= 1")
        if self.total_timesteps < self.num_envs * self.num_steps:
            raise ValueError("total_timesteps must cover at least one rollout (num_envs * num_steps)")
        if min(self.stop_window, self.eval_episodes, self.variance_every, self.confirm_every,
               self.masking_time_limit, self.log_every) < 1:
            raise ValueError("windows, episode counts, intervals and time limits must be >= 1")
        if self.n_env_check_episodes < 3:
            raise ValueError("n_env_check_episodes must be >= 3 (time-out, fallen pole, cart off the track)")

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // (self.num_envs * self.num_steps)

    @classmethod
    def toy(cls) -> ActorCriticConfig:
        # 8-step rollouts: 125 steadier updates in the same 128k-step budget. Over toy seeds 0-19 the
        # held-out return ends at 100.6-264 (4-step rollouts: 32.6-500, too erratic for a bar): bar 80;
        # the median variance ratio at 0.115-0.268 (the critic is still young): bar 0.35.
        return cls(num_steps=8)

    @classmethod
    def full(cls) -> ActorCriticConfig:
        return cls(total_timesteps=800_000, eval_episodes=100, variance_every=50, n_env_check_episodes=32,
                   target_return=475.0, max_variance_ratio=0.1, log_every=5)


# ---------------------------------------------------------------------------------------------------
# Kernel


def actor_critic_loss(logits: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor,
                      values: torch.Tensor, returns: torch.Tensor, ent_coef: float,
                      vf_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The A2C loss of one batch; returns (total, policy_loss, value_loss, entropy), four scalars.

    logits      (B, A) unnormalised action scores of the actor: pi(.|s_i) = softmax(logits[i])
    actions     (B,)   long, the actions a_i that were taken
    advantages  (B,)   A_i, already computed (and whitened, if at all) by the caller
    values      (B,)   V(s_i) from the critic, with gradient
    returns     (B,)   R_i, the critic's regression targets (e.g. lambda-returns A + V)
    ent_coef, vf_coef  floats >= 0

        log_prob_i   = log_softmax(logits[i])[a_i]
        policy_loss  = -mean_i( sg(A_i) * log_prob_i )          sg = stop-gradient (detach)
        value_loss   = 1/2 * mean_i( (V(s_i) - sg(R_i))^2 )
        entropy      = mean_i( -sum_a pi(a|s_i) log pi(a|s_i) )
        total        = policy_loss - ent_coef * entropy + vf_coef * value_loss

    The advantages are constants for the actor (no gradient may reach the critic through them) and
    the returns are constants for the critic. d policy_loss / d logits[i] = -A_i (onehot(a_i) - pi_i) / B.
    Compute log-probabilities with log_softmax (not log of softmax) so large logits stay finite.
    """
    log_probs = F.log_softmax(logits, dim=-1)  # (B, A)
    taken = log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)  # (B,)
    policy_loss = -(advantages.detach() * taken).mean()
    value_loss = 0.5 * (values - returns.detach()).pow(2).mean()
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    total = policy_loss - ent_coef * entropy + vf_coef * value_loss
    return total, policy_loss, value_loss, entropy


# ---------------------------------------------------------------------------------------------------
# CartPole-v1 as a batch of environments in torch


class CartPoleTensorEnv:
    """gymnasium's CartPole-v1 for N environments at once, with same-step auto-reset.

    Physics, thresholds, reward (+1 per step, the terminating one included) and the reset
    distribution U(-0.05, 0.05)^4 are gymnasium's; the state is float64 as there, observations are
    float32. ``step`` returns (obs, reward, terminated, truncated, final_obs): where an episode
    ended, obs is already the first observation of the next episode and final_obs is the real last
    observation (what a truncated step must bootstrap from).
    """

    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    total_mass = masspole + masscart
    polemass_length = masspole * length
    theta_threshold_radians = 12 * 2 * math.pi / 360
    x_threshold = 2.4

    def __init__(self, num_envs: int, generator: torch.Generator, max_episode_steps: int = 500):
        self.num_envs, self.generator, self.max_episode_steps = num_envs, generator, max_episode_steps
        self.state = self._initial_states(num_envs)  # (N, 4) x, x_dot, theta, theta_dot
        self.elapsed = torch.zeros(num_envs, dtype=torch.long)
        self.rewards = torch.ones(num_envs)

    def _initial_states(self, n: int) -> torch.Tensor:
        return torch.rand(n, 4, generator=self.generator, dtype=torch.float64) * 0.1 - 0.05

    def set_state(self, state: torch.Tensor, elapsed: torch.Tensor | None = None) -> None:
        """Put every environment in a given (N, 4) state, ``elapsed`` (N,) steps into its episode (0 by
        default): used to replay gymnasium's states one transition at a time."""
        self.state = state.to(torch.float64).clone()
        self.elapsed = torch.zeros(self.num_envs, dtype=torch.long) if elapsed is None else elapsed.long().clone()

    def observe(self) -> torch.Tensor:
        return self.state.float()

    def dynamics(self, state: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """One explicit-Euler step of the cart-pole equations: (N, 4) float64 state, (N,) actions -> (N, 4)."""
        x, x_dot, theta, theta_dot = state.unbind(1)
        force = torch.where(actions == 1, self.force_mag, -self.force_mag)
        costheta, sintheta = torch.cos(theta), torch.sin(theta)
        temp = (force + self.polemass_length * theta_dot.square() * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * costheta.square() / self.total_mass))
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
        # explicit Euler, as gymnasium's default kinematics_integrator: positions move with the old velocities
        return torch.stack([x + self.tau * x_dot, x_dot + self.tau * xacc,
                            theta + self.tau * theta_dot, theta_dot + self.tau * thetaacc], 1)  # (N, 4)

    def step(self, actions: torch.Tensor):
        new = self.dynamics(self.state, actions)
        self.elapsed += 1
        terminated = (new[:, 0].abs() > self.x_threshold) | (new[:, 2].abs() > self.theta_threshold_radians)
        truncated = (self.elapsed >= self.max_episode_steps) & ~terminated  # the TimeLimit wrapper
        done = terminated | truncated
        final_obs = new.float()
        if done.any():
            idx = done.nonzero().squeeze(1)
            new = new.clone()
            new[idx] = self._initial_states(idx.numel())
            self.elapsed[idx] = 0
        self.state = new
        return new.float(), self.rewards, terminated, truncated, final_obs


def balancing_action(obs, tilt: float = 0.0) -> int:
    """A hand-written bang-bang controller: push towards the side the pole falls to. With tilt = 0 it
    keeps the pole up (and the cart on the track) for all 500 steps; with tilt = 0.05 it balances the
    pole at a slight angle, so the cart accelerates until it leaves the track (x beyond 2.4)."""
    x, x_dot, theta, theta_dot = (float(v) for v in obs)
    return int(theta + 0.5 * theta_dot + tilt + (0.01 * x + 0.1 * x_dot if tilt == 0.0 else 0.0) > 0)


def compare_with_gymnasium(episodes: int, seed: int, generator: torch.Generator) -> dict[str, float]:
    """Play ``episodes`` episodes of gymnasium's CartPole-v1, then replay every one of their transitions
    in the tensor env at once, each from gymnasium's own state and step count (teacher forcing): one
    transition at a time, so a last-bit difference between libm's and torch's sin/cos stays at 1e-16
    instead of growing chaotically over hundreds of open-loop steps. Every episode ends a different way
    in turn: ``balancing_action`` runs into the 500-step truncation, uniformly random actions let the
    pole fall, and the tilted controller drives the cart off the track.

    Returns the largest float64 state difference after a step, the largest observation difference,
    the number of transitions whose reward / terminated / truncated differ, the number compared, and
    how the episodes ended (in gymnasium).
    """
    import gymnasium as gym
    import numpy as np

    env = gym.make("CartPole-v1")
    x_limit, theta_limit = env.unwrapped.x_threshold, env.unwrapped.theta_threshold_radians
    coins = (torch.rand(episodes, 500, generator=generator) < 0.5).long().tolist()
    rows = []  # one per transition: state before, steps taken, action, state after, obs, reward, flags
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed * 1000 + ep)
        t, done = 0, False
        while not done:
            before = np.array(env.unwrapped.state, dtype=np.float64)
            kind = ep % 3
            action = balancing_action(obs) if kind == 0 else coins[ep][t] if kind == 1 \
                else balancing_action(obs, tilt=0.05)
            obs, reward, terminated, truncated, _ = env.step(action)
            rows.append((before, t, action, np.array(env.unwrapped.state, dtype=np.float64), obs,
                         (reward, terminated, truncated)))
            t, done = t + 1, terminated or truncated
    env.close()

    before, elapsed, actions, after, gym_obs, gym_flags = (np.array(col) for col in zip(*rows))
    tenv = CartPoleTensorEnv(len(rows), generator)
    tenv.set_state(torch.from_numpy(before), torch.from_numpy(elapsed))
    state = tenv.state.clone()
    actions = torch.from_numpy(actions).long()
    _, reward, terminated, truncated, final_obs = tenv.step(actions)
    ours = torch.stack([reward.double(), terminated.double(), truncated.double()], 1)
    gym_flags = torch.from_numpy(gym_flags.astype(np.float64))
    ends = gym_flags[:, 1:].sum(-1) > 0  # the last transition of each episode
    x_end, theta_end = torch.from_numpy(after)[ends, 0].abs(), torch.from_numpy(after)[ends, 2].abs()
    return {"max_state_diff": (tenv.dynamics(state, actions) - torch.from_numpy(after)).abs().max().item(),
            "max_obs_diff": (final_obs.double() - torch.from_numpy(gym_obs).double()).abs().max().item(),
            "flag_mismatches": float((ours != gym_flags).any(-1).sum()), "steps": float(len(rows)),
            "truncations": float(gym_flags[:, 2].sum()),
            "cart_off_track": float((x_end > x_limit).sum()), "pole_fell": float((theta_end > theta_limit).sum())}


# ---------------------------------------------------------------------------------------------------
# Agent: separate actor and critic MLPs


def _layer(n_in: int, n_out: int, gain: float, generator: torch.Generator) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, gain, generator=generator)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    """pi_theta(a|s) = softmax(actor(s)) and V_phi(s) = critic(s), two 2-layer tanh MLPs (CleanRL's
    initialisation: orthogonal, gain sqrt 2 inside, 0.01 on the policy head so pi starts uniform)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int, generator: torch.Generator):
        super().__init__()
        self.actor = nn.Sequential(_layer(obs_dim, hidden, 2 ** 0.5, generator), nn.Tanh(),
                                   _layer(hidden, hidden, 2 ** 0.5, generator), nn.Tanh(),
                                   _layer(hidden, n_actions, 0.01, generator))
        self.critic = nn.Sequential(_layer(obs_dim, hidden, 2 ** 0.5, generator), nn.Tanh(),
                                    _layer(hidden, hidden, 2 ** 0.5, generator), nn.Tanh(),
                                    _layer(hidden, 1, 1.0, generator))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)


def sample_actions(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of a categorical softmax(logits), by inverting the CDF. (N, A) -> (N,) long."""
    cdf = logits.softmax(-1).cumsum(-1)  # (N, A)
    u = torch.rand(logits.shape[0], 1, generator=generator, dtype=cdf.dtype)
    return (u > cdf).sum(-1).clamp_max(logits.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------------
# Rollouts and advantages


@dataclass
class Rollout:
    obs: torch.Tensor  # (T, N, 4) observation each action was taken in
    actions: torch.Tensor  # (T, N)
    rewards: torch.Tensor  # (T, N)
    terminated: torch.Tensor  # (T, N) bool
    truncated: torch.Tensor  # (T, N) bool
    next_obs: torch.Tensor  # (T, N, 4) the real next observation (the final one where an episode ended)
    episode_returns: list[float] = field(default_factory=list)  # episodes that ended during the rollout


def collect_rollout(env: CartPoleTensorEnv, agent: ActorCritic, obs: torch.Tensor, num_steps: int,
                    generator: torch.Generator, running_returns: torch.Tensor) -> tuple[Rollout, torch.Tensor]:
    """Step all environments ``num_steps`` times with the current policy (no gradient). Returns the
    rollout and the observation to continue from; ``running_returns`` (N,) is updated in place."""
    cols: dict[str, list] = {k: [] for k in ("obs", "actions", "rewards", "terminated", "truncated", "next_obs")}
    finished: list[float] = []
    with torch.no_grad():
        for _ in range(num_steps):
            actions = sample_actions(agent.actor(obs), generator)
            next_obs, rewards, terminated, truncated, final_obs = env.step(actions)
            done = terminated | truncated
            running_returns += rewards
            if done.any():
                finished += running_returns[done].tolist()
                running_returns[done] = 0.0
            for k, v in zip(cols, (obs, actions, rewards, terminated, truncated, final_obs)):
                cols[k].append(v)
            obs = next_obs
    return Rollout(**{k: torch.stack(v) for k, v in cols.items()}, episode_returns=finished), obs


def rollout_advantages(rollout: Rollout, agent: ActorCritic, gamma: float, lam: float,
                       bootstrap_truncated: bool = True,
                       gae_fn: Callable = compute_gae) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, returns, values), each (T, N), from the critic's values of the rollout.

    next_values are V of the real next observation of every step, so a truncated step bootstraps from
    the final observation and a terminated one does not (gae_fn ignores next_values there). With
    bootstrap_truncated=False a truncation is treated as a termination (CleanRL ppo.py's choice).
    """
    with torch.no_grad():
        values = agent.value(rollout.obs)  # (T, N)
        next_values = agent.value(rollout.next_obs)  # (T, N)
    terminated = rollout.terminated if bootstrap_truncated else rollout.terminated | rollout.truncated
    advantages, returns = gae_fn(rollout.rewards, values, next_values, terminated, rollout.truncated, gamma, lam)
    return advantages, returns, values


def update(agent: ActorCritic, optimizer: torch.optim.Optimizer, obs: torch.Tensor, actions: torch.Tensor,
           advantages: torch.Tensor, returns: torch.Tensor, cfg: ActorCriticConfig,
           loss_fn: Callable = actor_critic_loss) -> tuple[float, float, float]:
    """One A2C gradient step on a flat batch (B = num_envs * num_steps samples): whiten the advantages
    over the batch (norm_adv), the loss, backward, clip the global gradient norm of actor + critic to
    max_grad_norm, one Adam step. The clipped gradients stay in the parameters' .grad.
    Returns (policy_loss, value_loss, entropy) as floats."""
    if cfg.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    loss, policy_loss, value_loss, entropy = loss_fn(agent.actor(obs), actions, advantages, agent.value(obs),
                                                     returns, cfg.ent_coef, cfg.vf_coef)
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
    optimizer.step()
    return policy_loss.item(), value_loss.item(), entropy.item()


# ---------------------------------------------------------------------------------------------------
# The critic as a baseline: per-sample scores and the variance of the policy-gradient estimate


def per_sample_scores(actor: nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """grad_theta log pi(a_i|s_i) for every sample, flattened over the actor's parameters: (B, P).
    torch.func.vmap over per-sample autograd, independent of any loss function."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in actor.named_parameters()}

    def log_prob(p, o, a):
        log_probs = F.log_softmax(functional_call(actor, p, (o.unsqueeze(0),)), -1)  # (1, A)
        return log_probs.gather(1, a.reshape(1, 1)).sum()

    grads = vmap(grad(log_prob), in_dims=(None, 0, 0))(params, obs, actions)
    return torch.cat([g.reshape(obs.shape[0], -1) for g in grads.values()], dim=1)


def gradient_variances(scores: torch.Tensor, weights: dict[str, torch.Tensor], num_envs: int) -> dict[str, float]:
    """tr Cov of the per-environment gradient estimate g_n = mean_t w_{t,n} grad log pi(a_{t,n}|s_{t,n})
    for each weighting w (T, N), over the N independent environments. scores: (T*N, P) in the same
    (t, n) order as w.reshape(-1). The batch estimate is mean_n g_n, whose variance is this / N."""
    out = {}
    for name, w in weights.items():
        per_env = (w.reshape(-1, 1) * scores).reshape(-1, num_envs, scores.shape[1]).mean(0)  # (N, P)
        centred = per_env - per_env.mean(0)
        out[name] = (centred.square().sum() / (num_envs - 1)).item()  # sum over P of the unbiased variances
    return out


# ---------------------------------------------------------------------------------------------------
# The closed loop


@dataclass
class Evaluation:
    returns: torch.Tensor  # (E,) undiscounted return of each episode (the CartPole score)
    discounted: torch.Tensor  # (E,) sum_t gamma^t r_t from the first observation
    start_obs: torch.Tensor  # (E, 4) the first observation of each episode


def evaluate(agent: ActorCritic, episodes: int, generator: torch.Generator, gamma: float = 0.99,
             max_episode_steps: int = 500) -> Evaluation:
    """One episode in each of ``episodes`` fresh environments, actions sampled from the policy (no
    greedy shortcut); the discounted return is what V(start_obs) should predict."""
    env = CartPoleTensorEnv(episodes, generator, max_episode_steps)
    obs = start_obs = env.observe()
    returns, discounted = torch.zeros(episodes), torch.zeros(episodes)
    running = torch.ones(episodes, dtype=torch.bool)
    discount = 1.0
    with torch.no_grad():
        while running.any():
            obs, rewards, terminated, truncated, _ = env.step(sample_actions(agent.actor(obs), generator))
            returns += rewards * running
            discounted += discount * rewards * running
            discount *= gamma
            running &= ~(terminated | truncated)
    return Evaluation(returns, discounted, start_obs)


@dataclass
class TrainResult:
    agent: ActorCritic
    updates: int  # gradient steps taken
    global_step: int  # environment steps taken
    solved_at: int | None  # environment steps when training stopped on the solve criterion
    confirmations: list[float]  # mean return of each confirmation evaluation
    history: dict[str, list[float]]  # per logged update: global_step, losses, ...; return_step, episodic_return
    variance: dict[str, list[float]]  # global_step, with_critic, without_baseline (tr Cov per env)


def train(cfg: ActorCriticConfig, generator: torch.Generator, *, loss_fn: Callable = actor_critic_loss,
          gae_fn: Callable = compute_gae, progress: Callable[[float], None] | None = None) -> TrainResult:
    """A2C: roll out all environments for num_steps, GAE, one Adam step on the loss, repeat until the
    budget is spent or the task is solved (training-window mean >= stop_return, confirmed on fresh
    episodes)."""
    env = CartPoleTensorEnv(cfg.num_envs, generator)
    agent = ActorCritic(4, 2, cfg.hidden, generator)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5, fused=True)
    obs = env.observe()
    running = torch.zeros(cfg.num_envs)
    window: list[float] = []
    history: dict[str, list[float]] = {k: [] for k in ("global_step", "policy_loss", "value_loss", "entropy",
                                                       "explained_variance", "learning_rate", "return_step",
                                                       "episodic_return")}
    recent: list[float] = []  # returns of the episodes that ended since the last log
    variance: dict[str, list[float]] = {"global_step": [], "with_critic": [], "without_baseline": []}
    confirmations: list[float] = []
    next_confirm, solved_at = 0, None
    batch = cfg.num_envs * cfg.num_steps
    step = 0
    for step in range(1, cfg.num_updates + 1):
        lr = cfg.learning_rate * (1.0 - (step - 1) / cfg.num_updates) if cfg.anneal_lr else cfg.learning_rate
        for group in optimizer.param_groups:
            group["lr"] = lr
        rollout, obs = collect_rollout(env, agent, obs, cfg.num_steps, generator, running)
        advantages, returns, values = rollout_advantages(rollout, agent, cfg.gamma, cfg.gae_lambda,
                                                         cfg.bootstrap_truncated, gae_fn)

        if step % cfg.variance_every == 1 or cfg.variance_every == 1:
            scores = per_sample_scores(agent.actor, rollout.obs.reshape(-1, 4), rollout.actions.reshape(-1))
            var = gradient_variances(scores, {"with_critic": advantages, "without_baseline": returns}, cfg.num_envs)
            variance["global_step"].append(float(step * batch))
            for k, v in var.items():
                variance[k].append(v)

        b_obs, b_actions = rollout.obs.reshape(-1, 4), rollout.actions.reshape(-1)
        b_returns = returns.reshape(-1)
        policy_loss, value_loss, entropy = update(agent, optimizer, b_obs, b_actions, advantages.reshape(-1),
                                                  b_returns, cfg, loss_fn)

        window = (window + rollout.episode_returns)[-cfg.stop_window:]
        recent += rollout.episode_returns
        if step % cfg.log_every == 0:
            explained = 1.0 - (b_returns - values.reshape(-1)).var() / b_returns.var().clamp_min(1e-8)
            for k, v in (("global_step", step * batch), ("policy_loss", policy_loss),
                         ("value_loss", value_loss), ("entropy", entropy),
                         ("explained_variance", explained.item()), ("learning_rate", lr)):
                history[k].append(float(v))
            if recent:
                history["return_step"].append(float(step * batch))
                history["episodic_return"].append(sum(recent) / len(recent))
                recent = []
        if progress is not None:
            progress(step / cfg.num_updates)

        solved = len(window) == cfg.stop_window and sum(window) / len(window) >= cfg.stop_return
        if solved and step >= next_confirm:
            confirmations.append(evaluate(agent, cfg.eval_episodes, generator, cfg.gamma).returns.mean().item())
            if confirmations[-1] >= cfg.confirm_return:
                solved_at = step * batch
                break
            next_confirm = step + cfg.confirm_every
    return TrainResult(agent, step, step * batch, solved_at, confirmations, history, variance)


@dataclass
class ActorCriticResult:
    train: TrainResult  # the trained agent, curves and gradient-variance probes
    before: Evaluation  # held-out episodes of an untrained agent (CleanRL's initialisation)
    after: Evaluation  # held-out episodes of the trained agent (fresh environments, no part in stopping)


def run(cfg: ActorCriticConfig, generator: torch.Generator, *, actor_critic_loss: Callable = actor_critic_loss,
        progress: Callable[[float], None] | None = None) -> ActorCriticResult:
    """The day's experiment: evaluate an untrained agent, train A2C on CartPole-v1 until solved (or the
    budget is spent), and evaluate the result on fresh episodes."""
    init_seed, before_seed, after_seed = torch.randint(0, 2**62, (3,), generator=generator).tolist()
    untrained = ActorCritic(4, 2, cfg.hidden, torch.Generator().manual_seed(init_seed))
    before = evaluate(untrained, cfg.eval_episodes, torch.Generator().manual_seed(before_seed), cfg.gamma)
    result = train(cfg, generator, loss_fn=actor_critic_loss, progress=progress)
    after = evaluate(result.agent, cfg.eval_episodes, torch.Generator().manual_seed(after_seed), cfg.gamma)
    return ActorCriticResult(result, before, after)
