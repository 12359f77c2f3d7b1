"""Audit of the ppo module (day 7): the clipped surrogate, the KL estimators and whitening against closed
forms and on real rollout batches, the training loop's wiring, then RLHF-PPO's closed loop against a
gold reward, and reward hacking at beta = 0."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from llmaudit.audit import Audit, bound, kernel, max_error, measure
from modules import gae as GAE
from modules import reward_model as RM
from modules.ppo import ppo as M

DT = torch.float64
VECTOR_TOL = 1e-6  # the vectors are given to 7 digits
GRAD_TOL = 1e-12  # float64 autograd against the closed form
EXACT_TOL = 1e-9  # float64 expectations over a vocabulary of 10 tokens
RATIO_TOL = 1e-6  # |ratio - 1| on the first minibatch (the same forward code on both sides: exactly 0 here)
PAD_TOL = 1e-6  # float32 losses with and without extra padding columns
WHITEN_TOL = 1e-5  # mean 0 / std 1 of whitened float32 advantages
REWARD_TOL = 1e-5  # row sums of float32 token rewards
GAE_TOL = 1e-6  # float32 GAE of the loop against the same recursion run response by response
EXTRA_PAD = 3  # padding columns appended in the padding check
LOOP_GAMMA, LOOP_LAM = 0.9, 0.6  # off the defaults (1, 0.95): a loop that ignores cfg.gamma / cfg.lam shows
# (A, r, clip-higher, per-token loss, clipped?) with eps 0.2, worked by hand from max(-A r, -A clip(r))
CLIP_TABLE = [(1.0, 1.5, None, -1.2, True), (1.0, 0.5, None, -0.5, False), (-1.0, 0.5, None, 0.8, True),
              (-1.0, 1.5, None, 1.5, False), (-1.0, 5.0, None, 5.0, False), (1.0, 5.0, None, -1.2, True),
              (2.0, 1.1, None, -2.2, False), (1.0, 1.3, 0.28, -1.28, True), (-1.0, 0.75, 0.28, 0.8, True)]
# closed forms: (lp, ref) -> (k1, k2, k3); d/dlp at (-1, -1.5) = (1, lp - ref, 1 - exp(ref - lp));
# E_p[k] for p = [.5, .5], q = [.9, .1]: KL(p || q) = 0.5108256 for k1 and k3, 0.7339459 for k2
KL_VECTORS = [((-1.0, -1.5), (0.5, 0.125, 0.1065307)), ((-1.5, -1.0), (-0.5, 0.125, 0.1487213)),
              ((-2.0, -2.0), (0.0, 0.0, 0.0))]
KL_GRADS = (1.0, 0.5, 0.3934693)
KL_EXPECT = (0.5108256, 0.7339459, 0.5108256)
# 0.5 max((V - G)^2, (clip(V, V_old -+ .2) - G)^2) with V_old = 1, by hand: (V, G, loss)
VALUE_VECTORS = [(1.5, 2.0, 0.32), (1.1, 2.0, 0.405), (0.5, 2.0, 1.125), (1.5, 1.0, 0.125)]
# beta .2, target 6, horizon 10000, n 256: beta (1 + clip(KL / 6 - 1, -.2, .2) 256 / 10000); 600 is clipped
ADAPTIVE_VECTORS = [(12.0, 0.201024), (0.0, 0.198976), (6.0, 0.2), (6.6, 0.200512), (600.0, 0.201024)]


def _example_clip() -> dict:
    g = torch.Generator().manual_seed(0)
    old = -2.0 * torch.rand(2, 5, generator=g)
    return {"logprobs": old + 0.3 * torch.randn(2, 5, generator=g), "old_logprobs": old,
            "advantages": torch.randn(2, 5, generator=g), "mask": torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2]),
            "clip_eps": 0.2, "clip_eps_high": None}


def _example_kl() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"logprobs": -2.0 * torch.rand(2, 5, generator=g), "ref_logprobs": -2.0 * torch.rand(2, 5, generator=g)}


def _example_whiten() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"values": torch.randn(2, 5, generator=g), "mask": torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2]),
            "shift_mean": True}


KERNELS = [
    kernel(M.ppo_clip_loss, example=_example_clip,
           hint="per token max(-A r, -A clamp(r, 1 - eps, 1 + eps_high)) (max of the negatives, i.e. min of the "
                "objectives), averaged over mask == 1 only (torch.where before exp, so NaN padding gets a zero "
                "gradient); clipfrac counts clipped > unclipped strictly."),
    kernel(M.kl_estimators, example=_example_kl,
           hint="log_ratio = logprobs - ref_logprobs; k1 = log_ratio, k2 = log_ratio^2 / 2, k3 = exp(-log_ratio) + "
                "log_ratio - 1 (the ratio inside k3 is ref / pi, not pi / ref)."),
    kernel(M.masked_whiten, example=_example_whiten,
           hint="mean and unbiased variance over mask == 1 only (torch.where, so NaN padding stays out); "
                "(v - mean) * rsqrt(var + 1e-8); padding is returned as 0."),
]

ppo = Audit("ppo", day=7, title="PPO for a language model: the clipped surrogate, KL-penalised rewards, four models",
            config=M.PPOConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=DT)


def _right_padded(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).to(DT)  # (B, T)


# ---- the clipped surrogate on crafted tokens ----------------------------------------------------

@ppo.check({"loss": f"< {VECTOR_TOL}", "clipfrac": f"< {VECTOR_TOL}", "optimism": "< 1e-12"},
           hint="max of the two negated terms (min of the objectives); clip with 1 - eps and 1 + eps_high.")
def clip_table_matches_reference(ppo_clip_loss):
    """The loss is max(-A r, -A clip(r)): (A 1, r 1.5) -> -1.2 clipped, (A -1, r 0.5) -> 0.8 clipped, clip-higher
    .28 gives -1.28; it never falls below the unclipped -A r (a pessimistic bound), over a grid of (A, r)."""
    loss_err, flag_err, optimism = [], [], []
    for adv, r, high, want, clipped in CLIP_TABLE:
        loss, clipfrac, _ = ppo_clip_loss(_t(math.log(r))[None], _t(0.0)[None], _t(adv)[None], _t(1.0)[None],
                                          0.2, high)
        loss_err.append(abs(float(loss) - want))
        flag_err.append(abs(float(clipfrac) - float(clipped)))
    for a in (-2.0, -0.5, 0.5, 2.0):
        for r in torch.linspace(0.3, 2.0, 18, dtype=DT):
            loss, _, _ = ppo_clip_loss(torch.log(r)[None, None], _t(0.0)[None], _t(a)[None], _t(1.0)[None], 0.2)
            optimism.append(float(-a * r - loss))  # <= 0: the clipped loss is never below -A r
    return {"loss": loss_err, "clipfrac": flag_err, "optimism": optimism}


@ppo.check(f"< {GRAD_TOL}", hint="clamp the ratio, not the log-prob; the max must pick the clamped (constant) term.")
def clipped_tokens_get_zero_gradient(ppo_clip_loss, g):
    """Once r > 1 + eps with A > 0 (or r < 1 - eps with A < 0) the clipped term is a constant, so that token
    stops pushing: d loss / d log pi is 0 there and -A r / n_valid on every other valid token."""
    B, T, eps = 6, 12, 0.2
    ratio = torch.linspace(0.5, 1.6, B * T, dtype=DT).reshape(B, T)
    sign = torch.where(torch.arange(B * T).reshape(B, T) % 3 == 0, -1.0, 1.0).to(DT)
    adv = sign * (1 + torch.rand(B, T, generator=g, dtype=DT))
    mask = _right_padded([12, 9, 7, 12, 3, 10], T)
    logprobs = (torch.log(ratio) - 1.0).requires_grad_(True)
    loss, _, _ = ppo_clip_loss(logprobs, torch.full((B, T), -1.0, dtype=DT), adv, mask, eps)
    (grad,) = torch.autograd.grad(loss, logprobs)
    clipped = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
    want = torch.where(clipped | ~mask.bool(), 0.0, -adv * ratio / mask.sum())
    return measure(max_error(grad, want), f"{int((clipped & mask.bool()).sum())} clipped of {int(mask.sum())} tokens")


@ppo.check(f"< {GRAD_TOL}", hint="torch.where(mask, logprobs - old_logprobs, 0) before exp: NaN * 0 is NaN in the "
                                 "backward pass too, so multiplying by the mask leaks NaN gradients.")
def padding_gets_zero_gradient(ppo_clip_loss, g):
    """Padded positions are not part of any response: with NaN log-probs and advantages there, their gradient
    is exactly 0 and the valid tokens' gradients are those of the clean batch (select, never multiply)."""
    mask = _right_padded([6, 4, 2, 1], 6)
    valid = mask.bool()
    old = -2 * torch.rand(mask.shape, generator=g, dtype=DT)
    logprobs = old + 0.3 * torch.randn(mask.shape, generator=g, dtype=DT)
    adv = torch.randn(mask.shape, generator=g, dtype=DT)
    nan = torch.full_like(old, float("nan"))
    grads = []
    for lp, old_lp, a in ((logprobs, old, adv), (torch.where(valid, logprobs, nan), torch.where(valid, old, nan),
                                                 torch.where(valid, adv, nan))):
        lp = lp.clone().requires_grad_(True)
        loss, _, _ = ppo_clip_loss(lp, old_lp, a, mask, 0.2)
        grads.append(torch.autograd.grad(loss, lp)[0])
    clean, dirty = grads
    return measure([max_error(dirty, clean), max_error(dirty[~valid], torch.zeros(int((~valid).sum()), dtype=DT))],
                   f"{int((~valid).sum())} padded positions hold NaN")


# ---- the KL estimators: closed forms and exact expectations ---------------------------------------

@ppo.check({"error": f"< {VECTOR_TOL}", "lowest_k2_k3": bound(">= 0", scale=0)},
           hint="inside k3 the ratio is ref / pi = exp(-log_ratio); the sign of the log term follows.")
def kl_estimators_match_reference_vectors(kl_estimators, g):
    """(lp -1, ref -1.5) -> k1 .5, k2 .125, k3 .1065307 with gradients (1, .5, .3934693); under p = [.5, .5],
    q = [.9, .1] E_p[k1] = E_p[k3] = KL = .5108256 but E_p[k2] = .7339459 (biased); k2, k3 never negative."""
    errors = []
    for (lp, ref), want in KL_VECTORS:
        errors += [abs(float(k) - w) for k, w in zip(kl_estimators(_t(lp), _t(ref)), want)]
    lp = _t(-1.0).requires_grad_(True)
    ks = kl_estimators(lp, _t(-1.5))
    errors += [abs(float(torch.autograd.grad(k, lp, retain_graph=True)[0]) - w) for k, w in zip(ks, KL_GRADS)]
    p, q = _t(0.5, 0.5), _t(0.9, 0.1)
    errors += [abs(float((p * k).sum()) - w) for k, w in zip(kl_estimators(p.log(), q.log()), KL_EXPECT)]
    x, y = 10 * torch.randn(4096, generator=g, dtype=DT), 10 * torch.randn(4096, generator=g, dtype=DT)
    _, k2, k3 = kl_estimators(x, y)
    return {"error": errors, "lowest_k2_k3": torch.cat([k2, k3])}


# ---- the four models: SFT policy and honest reward model (shared by everything below) ------------

@ppo.fixture(cost=8)
def setup(cfg, g):
    """The SFT policy (the reward_model module's warm-up) and the honest Bradley-Terry reward model."""
    return M.prepare(cfg, g)


@dataclass
class LoopRun:
    policy: torch.nn.Module
    critic: torch.nn.Module
    seen: list  # (rollout, advantages) of each iteration, as the update used them
    frozen_changed: list[str]  # names of reference / reward-model tensors that changed
    trained_changed: int  # actor and critic tensors that changed


@ppo.fixture(cost=2)
def loop_run(cfg, g, setup):
    """One PPO iteration from the SFT policy with the module's own kernels and (gamma, lam) moved off their
    defaults, recording what the update used and which weights moved."""
    _, _, eos, pad = M.special_ids(cfg)
    policy, reference = M.actor_and_reference(setup.sft)
    critic = M.new_critic(setup.sft)
    models = {"reference": reference, "reward model": setup.reward_model, "actor": policy, "critic": critic}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    seen = []
    M.train_ppo(policy, reference, critic, M.reward_fn_from_model(setup.reward_model, pad),
                lambda n, gen: M.make_prompts(cfg, n, gen), replace(cfg, gamma=LOOP_GAMMA, lam=LOOP_LAM), g,
                eos_id=eos, pad_id=pad, iterations=1, on_rollout=lambda it, ro, adv: seen.append((ro, adv)))
    changed = {name: [k for k, v in m.state_dict().items() if not torch.equal(v, before[name][k])]
               for name, m in models.items()}
    return LoopRun(policy, critic, seen, [f"{n}.{k}" for n in ("reference", "reward model") for k in changed[n]],
                   len(changed["actor"]) + len(changed["critic"]))


@ppo.check(f"< {GAE_TOL}", hint="pass cfg.gamma and cfg.lam to the GAE of every rollout; TRL's defaults (1, .95) "
                               "hard-coded in the loop ignore them.")
def loop_advantages_use_gamma_and_lambda(loop_run):
    """The advantages the loop feeds to the update are GAE with the configured gamma and lambda over each
    response, cut at its last valid token, with returns = advantages + values (here gamma .9, lambda .6)."""
    errors = []
    for ro, adv in loop_run.seen:
        for b in range(ro.mask.shape[0]):
            n = int(ro.mask[b].sum())
            col = lambda x: x[b, :n, None]  # noqa: E731  (n, 1): one episode
            next_v = torch.cat([ro.values[b, 1:n], ro.values.new_zeros(1)])[:, None]
            ends = torch.zeros(n, 1, dtype=torch.bool)
            ends[-1] = True
            want, ret = GAE.compute_gae(col(adv.rewards), col(ro.values), next_v, ends, torch.zeros_like(ends),
                                        LOOP_GAMMA, LOOP_LAM)
            errors += [max_error(adv.advantages[b, :n], want[:, 0]), max_error(adv.returns[b, :n], ret[:, 0])]
    return measure(errors, f"{len(errors) // 2} responses")


@ppo.check({"frozen_changed": "== 0", "trained_changed": bound("> 0", scale=0)},
           hint="deep-copy the SFT model for the reference; never hand its (or the RM's) parameters to an optimizer.")
def reference_and_reward_model_weights_unchanged(loop_run):
    """Of PPO's four models only the actor and the critic learn; the reference anchors the KL penalty and the
    reward model defines the objective, so after an update both are bit-identical while the actor moved."""
    return measure({"frozen_changed": len(loop_run.frozen_changed), "trained_changed": loop_run.trained_changed},
                   ", ".join(loop_run.frozen_changed) or "reference and reward model bit-identical")


@ppo.check(f"< {VECTOR_TOL}", hint="padding must be selected away (torch.where) before GAE: NaN * 0 is NaN, and the "
                                  "recursion carries it to every earlier token of the row.")
def response_gae_matches_gae_per_response(g):
    """Each response is one episode ending at its last valid token: response_gae equals modules.gae run on
    that response alone, whatever the padding after it holds (NaN or 1e9), and is 0 on the padding."""
    lengths, T = [7, 4, 1, 5], 7
    mask = _right_padded(lengths, T)
    valid = mask.bool()
    rewards, values = torch.randn(2, len(lengths), T, generator=g, dtype=DT)
    junk = torch.where(torch.arange(T)[None] % 2 == 0, float("nan"), 1e9).to(DT).expand(len(lengths), T)
    adv, ret = M.response_gae(torch.where(valid, rewards, junk), torch.where(valid, values, junk), mask, 0.9, 0.7)
    errors = [max_error(adv[~valid], torch.zeros(int((~valid).sum()), dtype=DT))]
    for b, n in enumerate(lengths):
        ends = torch.zeros(n, 1, dtype=torch.bool)
        ends[-1] = True
        next_v = torch.cat([values[b, 1:n], values.new_zeros(1)])[:, None]
        want, want_ret = GAE.compute_gae(rewards[b, :n, None], values[b, :n, None], next_v, ends,
                                         torch.zeros_like(ends), 0.9, 0.7)
        errors += [max_error(adv[b, :n], want[:, 0]), max_error(ret[b, :n], want_ret[:, 0])]
    return errors


# ---- a real rollout batch: SFT samples, re-scored after one PPO iteration --------------------------

@dataclass
class Batch:
    ro: M.Rollout  # SFT samples (varied lengths) scored by the SFT policy, reference, critic and RM
    new_logprobs: torch.Tensor  # (B, T) under the policy after one PPO iteration
    new_values: torch.Tensor  # (B, T) its critic's values
    entropy: torch.Tensor  # (B, T)
    rewards: torch.Tensor  # kl_penalized_rewards with the new log-probs
    advantages: torch.Tensor  # response_gae of those rewards, not whitened
    beta: float
    policy: torch.nn.Module  # the moved policy and its critic
    critic: torch.nn.Module


@ppo.fixture
def batch(cfg, g, setup, loop_run):
    """A rollout batch as the loss sees it: SFT samples, stale old log-probs, new ones from a moved policy."""
    _, _, eos, pad = M.special_ids(cfg)
    P = M.prompt_len(cfg)
    ro = M.collect_rollout(setup.sft, setup.sft, loop_run.critic, M.reward_fn_from_model(setup.reward_model, pad),
                           M.make_prompts(cfg, cfg.rollout_batch, g), cfg.max_len + 1, eos, pad, g, cfg.temperature)
    with torch.no_grad():
        new_logprobs, entropy = M.policy_logprobs(loop_run.policy, ro.tokens, P, cfg.temperature)
        new_values = M.critic_values(loop_run.critic, ro.tokens, P)
    rewards = M.kl_penalized_rewards(new_logprobs, ro.ref_logprobs, ro.scores, ro.mask, cfg.kl_coef)
    advantages, _ = M.response_gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
    return Batch(ro, new_logprobs, new_values, entropy, rewards, advantages, cfg.kl_coef, loop_run.policy,
                 loop_run.critic)


@ppo.check(f"< {REWARD_TOL}", hint="index the last 1 of the mask (length - 1), not the first pad (length) nor the "
                                  "last column.")
def score_on_last_valid_token(batch):
    """The reward model scores the whole response, so its score is the reward of the last valid token (EOS);
    every token pays -beta k1; padding gets nothing (TRL's slot after EOS is an off-by-one)."""
    ro, r, beta = batch.ro, batch.rewards, batch.beta
    valid = ro.mask.bool()
    k1 = torch.where(valid, batch.new_logprobs - ro.ref_logprobs, torch.zeros_like(r))
    rows, last = torch.arange(r.shape[0]), ro.mask.sum(1).long() - 1  # right padding: the last valid is length - 1
    lengths = ro.mask.sum(1)
    return measure([max_error(r.sum(1), ro.scores - beta * k1.sum(1)),
                    max_error(r[rows, last] + beta * k1[rows, last], ro.scores),
                    max_error(r[~valid], torch.zeros(int((~valid).sum())))],
                   f"lengths {int(lengths.min())}..{int(lengths.max())}")


@ppo.check({"mean": f"< {WHITEN_TOL}", "std": f"< {WHITEN_TOL}", "padding": "== 0", "vectors": f"< {VECTOR_TOL}"},
           hint="torch.where(mask, values, 0) before summing, divide by mask.sum(), Bessel n / (n - 1).")
def advantages_whitened_over_valid_tokens_only(masked_whiten, batch):
    """Statistics over padding would shift every advantage by a length-dependent amount: mean and (unbiased)
    variance come from valid tokens only, and NaN or 1e9 in the padding changes nothing. [1, 2, 3, 4] ->
    [-1.1619, -.3873, .3873, 1.1619]; with mask [1, 1, 1, 0] -> [-1, 0, 1]."""
    adv, mask = batch.advantages, batch.ro.mask
    valid = mask.bool()
    white = masked_whiten(adv, mask)
    w = white[valid].double()
    junk = torch.where(torch.arange(adv.shape[1])[None] % 2 == 0, 1e9, float("nan")).expand_as(adv)
    vec = masked_whiten(_t(1.0, 2.0, 3.0, 4.0)[None], torch.ones(1, 4, dtype=DT))
    vec_masked = masked_whiten(_t(1.0, 2.0, 3.0, 4.0)[None], _t(1.0, 1.0, 1.0, 0.0)[None])
    return measure({"mean": w.mean().abs(), "std": (w.std() - 1).abs(),
                    "padding": max_error(masked_whiten(torch.where(valid, adv, junk), mask)[valid], white[valid]),
                    "vectors": [max_error(vec, _t(-1.161895, -0.387298, 0.387298, 1.161895)[None]),
                                max_error(vec_masked[0, :3], _t(-1.0, 0.0, 1.0))]},
                   f"{int(valid.sum())} valid tokens")


@ppo.check(f"< {PAD_TOL}", hint="reduce with the mask (torch.where, then sum / mask.sum()), never .mean() or x * mask.")
def padding_never_changes_the_loss(ppo_clip_loss, batch, cfg):
    """A token-mean over valid tokens does not depend on how much padding follows or what it holds: policy loss,
    clipfrac, approxkl, value loss and entropy are unchanged by 3 extra pad columns with NaN / 1e9 in every
    padded slot (mean() over the padded tensor, or mask * NaN = NaN, break this silently)."""
    ro, P, pad = batch.ro, M.prompt_len(cfg), M.special_ids(cfg)[3]
    B = ro.mask.shape[0]
    mask_padded = torch.cat([ro.mask, torch.zeros(B, EXTRA_PAD)], dim=1)

    def garbage(x: torch.Tensor, fill: float) -> torch.Tensor:
        x = torch.cat([x, torch.zeros(B, EXTRA_PAD)], dim=1)
        return torch.where(mask_padded.bool(), x, torch.full_like(x, fill))

    white = M.masked_whiten(batch.advantages, ro.mask)  # the module's own whitening: this check is the loss's
    returns = batch.advantages + ro.values
    with torch.no_grad():
        tokens = torch.cat([ro.tokens, torch.full((B, EXTRA_PAD), pad)], dim=1)
        lp_padded, ent_padded = M.policy_logprobs(batch.policy, tokens, P, cfg.temperature)
        v_padded = M.critic_values(batch.critic, tokens, P)
        plain = [*ppo_clip_loss(batch.new_logprobs, ro.old_logprobs, white, ro.mask, cfg.clip_eps),
                 M.value_loss(batch.new_values, ro.values, returns, ro.mask, cfg.clip_value)[0],
                 M.masked_mean(batch.entropy, ro.mask)]
        padded = [*ppo_clip_loss(lp_padded, garbage(ro.old_logprobs, float("nan")), garbage(white, 1e9), mask_padded,
                                 cfg.clip_eps),
                  M.value_loss(v_padded, garbage(ro.values, float("nan")), garbage(returns, 1e9), mask_padded,
                               cfg.clip_value)[0],
                  M.masked_mean(ent_padded, mask_padded)]
    return measure([max_error(a, b) for a, b in zip(plain, padded)],
                   f"policy loss {float(plain[0]):.4f}, clipfrac {float(plain[1]):.3f}, approxkl {float(plain[2]):.4f}")


# ---- value clipping and the KL controllers (module code the loop uses) -----------------------------

@ppo.check({"error": f"< {VECTOR_TOL}", "optimism": "< 1e-12"},
           hint="clip V around V_old (not around the return), then take the max of the two squared errors.")
def value_clipping_matches_reference(g):
    """The value clip keeps the critic near its rollout values as the ratio clip keeps the actor: (V 1.5, G 2)
    -> .32, (1.1, 2) -> .405, (.5, 2) -> 1.125, (1.5, 1) -> .125 with V_old 1, clip .2; the max makes it a
    pessimistic bound, never below the unclipped (V - G)^2 / 2."""
    errors = [abs(float(M.value_loss(_t(v), _t(1.0), _t(ret), _t(1.0), 0.2)[0]) - want)
              for v, ret, want in VALUE_VECTORS]
    vpred, old, ret = 3 * torch.randn(3, 64, generator=g, dtype=DT)
    optimism = [float(0.5 * (v - r) ** 2 - M.value_loss(v, o, r, _t(1.0)[0], 0.2)[0])
                for v, o, r in zip(vpred, old, ret)]  # one element at a time: <= 0 on each
    return {"error": errors, "optimism": optimism}


@ppo.check(f"< {VECTOR_TOL}", hint="clip KL / target - 1 to [-0.2, 0.2] and scale by n_steps / horizon.")
def adaptive_kl_controller_matches_reference():
    """Proportional control (Ziegler et al.): beta grows when the KL overshoots its target and shrinks when it
    undershoots, by at most 20 % of n / horizon per update: (beta .2, target 6, horizon 10000, n 256) KL 12 ->
    .201024, 0 -> .198976, 600 -> .201024 (clipped); a fixed controller never moves."""
    errors = []
    for kl, want in ADAPTIVE_VECTORS:
        ctl = M.AdaptiveKLController(0.2, 6.0, 10000)
        ctl.update(kl, n_steps=256)
        errors.append(abs(ctl.value - want))
    fixed = M.FixedKLController(0.2)
    fixed.update(12.0, n_steps=256)
    return errors + [abs(fixed.value - 0.2)]


# ---- the closed loop: RLHF-PPO with the KL penalty ---------------------------------------------------

@ppo.fixture(cost=12)
def trained(ctx, cfg, g, setup, ppo_clip_loss, kl_estimators, masked_whiten):
    """PPO from the SFT policy against the honest reward model, beta from the adaptive controller."""
    return M.train_with_kl_penalty(setup, cfg, g, ppo_clip_loss=ppo_clip_loss, kl_estimators=kl_estimators,
                                   masked_whiten=masked_whiten,
                                   on_iteration=lambda it, _: ctx.progress(it + 1, cfg.iterations))


@ppo.check({"ratio_deviation": f"< {RATIO_TOL}", "clipfrac": "== 0"},
           hint="old log-probs from the rollout policy (not the reference), the same temperature on both sides, "
                "clipfrac counted with a strict >.")
def ratio_is_one_on_first_minibatch(trained):
    """Before the first update the policy IS pi_old, so every ratio is exactly 1 and nothing is clipped; anything
    else means rollout and training log-probs disagree (temperature, dropout, padding, the wrong policy)."""
    h = trained.history
    return measure({"ratio_deviation": [r["first_ratio_dev"] for r in h], "clipfrac": [r["first_clipfrac"] for r in h]},
                   f"{len(h)} rollouts")


@ppo.check({"k1": f"< {EXACT_TOL}", "k3": f"< {EXACT_TOL}"},
           hint="the estimators need tokens sampled from pi (the policy), and k3's ratio is pi_ref / pi.")
def k1_and_k3_are_unbiased_for_the_exact_kl(kl_estimators, trained, cfg):
    """At every position of the trained policy's samples, averaging k1 or k3 over the whole next-token
    distribution of pi gives exactly KL(pi || pi_ref) -- no sampling, so the heavy tail of k3 where pi has
    moved far from pi_ref cannot hide a bias (a z-test with the sample's own standard error could). The
    policy is taken as trained and sharpened (logits x 4), far from pi_ref: where training stayed close,
    no token has pi_ref / pi > 11 and a k3 clamped at 10 (as verl clamps it) would go unseen."""
    tokens, mask, P = trained.after["tokens"], trained.after["mask"].bool(), M.prompt_len(cfg)
    with torch.no_grad():
        logits, ref_logits = (M.response_logits(m, tokens, P).double() / cfg.temperature
                              for m in (trained.policy, trained.reference))  # (B, T, V) each
    logq, errors = torch.log_softmax(ref_logits, dim=-1), {"k1": [], "k3": []}
    for sharpen in (1.0, 4.0):
        logp = torch.log_softmax(sharpen * logits, dim=-1)
        p = logp.exp()
        exact = (p * (logp - logq)).sum(-1)  # (B, T)
        k1, _, k3 = kl_estimators(logp, logq)  # every next token, not only the sampled one
        errors["k1"].append(((p * k1).sum(-1) - exact)[mask].abs())
        errors["k3"].append(((p * k3).sum(-1) - exact)[mask].abs())
        if sharpen == 1.0:
            detail = (f"{int(mask.sum())} positions, as trained and sharpened; exact KL per token up to "
                      f"{exact[mask].max().item():.2f} nats, {exact.sum(1).mean().item():.2f} per sequence")
    return measure({k: torch.cat(v) for k, v in errors.items()}, detail)


@ppo.check(">= min_gold_gain", kind="outcome",
           hint="a flipped sign in the loss or the advantages lowers the gold reward.")
def gold_reward_rises_above_sft(setup, trained):
    """PPO never sees the gold reward: it climbs the reward model's score, and the gold reward of fresh samples
    (PPO policy minus SFT policy) shows that the proxy led somewhere real."""
    before, after, h = setup.before["gold"], trained.after["gold"], trained.history
    return measure(after - before, f"gold {before:.2f} -> {after:.2f}; RM score {h[0]['objective/scores']:.2f} -> "
                                   f"{h[-1]['objective/scores']:.2f}")


@ppo.check("<= max_kl", kind="outcome", hint="the KL must be taken against the frozen reference with beta > 0.")
def kl_to_reference_stays_bounded(setup, trained):
    """The per-token -beta k1 reward keeps the policy near the SFT model: the exact sequence KL of fresh samples
    stays bounded (without it the reward model is exploited, see reward_hacking_without_kl_penalty)."""
    return measure(trained.after["kl"], f"mean length {setup.before['length']:.1f} -> {trained.after['length']:.1f}")


# ---- reward hacking: beta = 0 against a biased proxy -------------------------------------------------

@ppo.fixture(cost=10)
def hacking(ctx, cfg, g, setup, ppo_clip_loss, kl_estimators, masked_whiten):
    """PPO with beta = 0 against the biased annotator's judgement."""
    return M.reward_hacking(setup, cfg, g, ppo_clip_loss=ppo_clip_loss, kl_estimators=kl_estimators,
                            masked_whiten=masked_whiten,
                            on_iteration=lambda it, _: ctx.progress(it + 1, cfg.hack_iterations))


@ppo.check({"proxy_gain": ">= min_proxy_gain", "gold_drop": ">= min_hack_gold_drop"}, kind="outcome",
           hint="set beta > 0 (and watch objective/kl and a gold metric): the KL penalty is what prevents this.")
def reward_hacking_without_kl_penalty(hacking):
    """With beta = 0 nothing ties the policy to the SFT model, so it climbs whatever the proxy rewards: the
    biased proxy's score of the rollouts keeps rising while their gold reward turns down from its peak,
    because the proxy's optimum, decoys instead of targets, is not gold's (Goodhart)."""
    gold = M.running_mean(hacking.gold)  # 3-iteration means: the peak of a noisy curve, not one lucky batch
    proxy_end = M.tail_mean(hacking.proxy)
    return measure({"proxy_gain": proxy_end - hacking.proxy[0], "gold_drop": gold.max() - gold[-1]},
                   f"proxy {hacking.proxy[0]:.2f} -> {proxy_end:.2f}; gold {hacking.gold[0]:.2f} -> peak "
                   f"{gold.max().item():.2f} -> {gold[-1].item():.2f}; KL {M.tail_mean(hacking.kl):.1f} nats; "
                   f"the proxy agrees with gold on {hacking.proxy_agreement:.0%} of held-out pairs")


HACKING = {"hacking/proxy_score": dict(label="proxy score (biased annotator)", y_label="proxy score (points per answer)",
                                      title=r"Reward hacking without the KL penalty ($\beta$ = 0)"),
           "hacking/gold_reward": M.METRIC_WORDS["objective/gold_reward"], "hacking/kl": M.METRIC_WORDS["objective/kl"]}


@ppo.report
def curves(ctx, setup, trained, hacking):
    ctx.series("rm/loss", [h["loss"] for h in setup.rm_history], x_label="reward-model step",
               label="reward-model loss (Bradley-Terry)", y_label="loss per pair (nats)")
    groups = {"objective/scores": "objective/scores_vs_gold", "objective/gold_reward": "objective/scores_vs_gold"}
    for name in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/scores",
                 "objective/scores_std", "objective/gold_reward", "objective/kl_coef", "policy/approxkl_avg",
                 "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio", "val/clipfrac_avg",
                 "response_length"):
        ctx.series(name, [h[name] for h in trained.history], x_label="PPO iteration", group=groups.get(name, ""),
                   key=name == "objective/scores", **M.METRIC_WORDS[name])
    for name, ys in (("hacking/proxy_score", hacking.proxy), ("hacking/gold_reward", hacking.gold),
                     ("hacking/kl", hacking.kl)):
        ctx.series(name, ys, x_label=r"PPO iteration ($\beta$ = 0, biased proxy)", group="reward_hacking", **HACKING[name])
    ctx.scalar("reward model: held-out pairwise accuracy vs gold", setup.rm_accuracy)
    ctx.scalar("gold reward: SFT policy", setup.before["gold"])
    ctx.scalar("gold reward: PPO policy", trained.after["gold"])
    ctx.scalar("gold reward gain", trained.after["gold"] - setup.before["gold"])
    ctx.scalar("KL to SFT after PPO, nats", trained.after["kl"])
    ctx.scalar("proxy: held-out pairwise agreement with gold", hacking.proxy_agreement)
    ctx.scalar("hacking: proxy score end", M.tail_mean(hacking.proxy))
    ctx.scalar("hacking: gold reward start", hacking.gold[0])
    ctx.scalar("hacking: gold reward peak", M.running_mean(hacking.gold).max())
    ctx.scalar("hacking: gold reward end", M.tail_mean(hacking.gold))
    ctx.scalar("hacking: KL end, nats", M.tail_mean(hacking.kl))
