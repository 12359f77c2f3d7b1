"""Audit of the rlhf module (day 9): SFT -> reward model -> PPO wired end to end, the KL-penalised token
rewards that connect them, and what each stage trains, freezes, holds in memory and hands on."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from llmaudit.audit import Audit, kernel, max_error, measure
from modules import reward_model as RM
from modules.ppo import ppo as PPO
from modules.rlhf import rlhf as M

DT = torch.float64
TOL = 1e-9  # float64 arithmetic on crafted batches
COPY_TOL = 1e-6  # the critic is a copy of the RM: equal scores up to float32 rounding
START_KL_TOL = 1e-5  # actor == reference at the first rollout: every k1 is 0 up to float32 rounding
BETA = 0.1
TRAINED = ("actor", "critic")  # the roles that get gradients and Adam moments
WIRING_BATCH = 32  # answers in the first rollout and in the one PPO update of the wiring checks


def _example() -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=DT)
    return {"logprobs": -3 * torch.rand(3, 4, generator=g, dtype=DT),
            "ref_logprobs": -3 * torch.rand(3, 4, generator=g, dtype=DT),
            "scores": torch.tensor([1.5, -0.5, 2.0], dtype=DT), "response_mask": mask, "beta": BETA}


KERNELS = [
    kernel(M.kl_penalized_rewards, example=_example,
           hint="rewards = -beta * where(mask, logprobs - ref_logprobs, 0), then add scores[b] at the LAST position "
                "where mask[b] == 1 (not at mask.sum() on a left-padded row, not on padding, not on every token); "
                "a row with no valid token gets nothing."),
]

rlhf = Audit("rlhf", day=9, title="RLHF end to end: SFT, reward model, PPO, and who is trained when",
             config=M.RLHFConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _batch(g: torch.Generator, lengths: list[int], T: int = 7) -> dict:
    """Random log-probs and scores for right-padded responses of the given lengths (float64)."""
    B = len(lengths)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).to(DT)
    return {"logprobs": -3 * torch.rand(B, T, generator=g, dtype=DT),
            "ref_logprobs": -3 * torch.rand(B, T, generator=g, dtype=DT),
            "scores": 2 * torch.randn(B, generator=g, dtype=DT), "response_mask": mask}


def _last(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(1).long() - 1  # right padding: the last valid token is at length - 1


# ---- the kernel: KL-penalised token rewards on crafted batches ------------------------------------

@rlhf.check("== 0", hint="select with torch.where before scaling (NaN * 0 is NaN); add the score only to rows that "
                         "have a valid token.")
def no_reward_outside_the_response_mask(kl_penalized_rewards, g):
    """Padding after <eos> is not part of the episode: it gets no KL penalty and no score even when its
    log-probs are NaN, and a response with no valid token has nowhere to put the score, so its row stays 0."""
    b = _batch(g, [7, 4, 1, 0, 2])
    valid = b["response_mask"].bool()
    nan = torch.full_like(b["logprobs"], float("nan"))
    rewards = kl_penalized_rewards(torch.where(valid, b["logprobs"], nan), torch.where(valid, b["ref_logprobs"], nan),
                                   b["scores"], b["response_mask"], BETA)
    return measure(rewards[~valid].abs(), f"{int((~valid).sum())} padded positions (NaN log-probs), one empty row")


@rlhf.check(f"< {TOL}", hint="the KL term is -beta * (logprobs - ref_logprobs) on every valid token; the score is "
                            "added once.")
def token_rewards_sum_to_score_minus_beta_kl(kl_penalized_rewards, g):
    """The episode's return is the RM score minus beta times the summed per-token k1: the RLHF objective
    r(x, y) - beta KL, written token by token so that GAE can assign credit (betas .05, .1, .5)."""
    errors = []
    for beta in (0.05, BETA, 0.5):
        b = _batch(g, [7, 5, 3, 1, 6])
        k1 = torch.where(b["response_mask"].bool(), b["logprobs"] - b["ref_logprobs"], torch.zeros_like(b["logprobs"]))
        rewards = kl_penalized_rewards(**b, beta=beta)
        errors.append(max_error(rewards.sum(1), b["scores"] - beta * k1.sum(1)))
    return errors


@rlhf.check(f"< {TOL}", hint="index with the last 1 of each mask row (mask.sum(1) - 1 for right padding), not "
                            "column -1 and not the first pad.")
def score_on_the_last_valid_token(kl_penalized_rewards, g):
    """The reward model judges the whole answer, so its score is the reward of the final action, the last
    valid token (<eos>); on the first token or on padding it would be credited to the wrong step."""
    b = _batch(g, [7, 4, 1, 2, 6])
    rewards = kl_penalized_rewards(**b, beta=BETA)
    rows, last = torch.arange(len(b["scores"])), _last(b["response_mask"])
    k1_last = (b["logprobs"] - b["ref_logprobs"])[rows, last]
    return max_error(rewards[rows, last] + BETA * k1_last, b["scores"])


@rlhf.check(f"< {TOL}", hint="the KL term must scale with beta (and vanish at 0).")
def beta_zero_leaves_only_the_score(kl_penalized_rewards, g):
    """With beta = 0 nothing ties the policy to the SFT model: the only reward is the RM score at the end,
    the setting where reward hacking runs free (see the ppo module)."""
    b = _batch(g, [7, 4, 1, 3])
    rows = torch.arange(len(b["scores"]))
    expected = torch.zeros_like(b["logprobs"])
    expected[rows, _last(b["response_mask"])] = b["scores"]
    return max_error(kl_penalized_rewards(**b, beta=0.0), expected)


# ---- stages 1 and 2: the SFT policy and the reward model ------------------------------------------

@rlhf.fixture(cost=6)
def setup(cfg, g):
    """Stage 1 (SFT warm-up on demonstrations) and stage 2 (Bradley-Terry reward model), both from the ppo
    module, with the SFT policy's samples."""
    return PPO.prepare(cfg, g)


@rlhf.check(">= min_eos_rate", kind="outcome",
            hint="train on demonstrations that end with <eos> and supervise that token.")
def sft_policy_ends_answers_with_eos(setup, cfg):
    """Stage 1 teaches the format: answers that stop with <eos>, where the reward model will read its score."""
    return measure(M.eos_rate(setup.before["tokens"], cfg), f"{cfg.eval_prompts} samples of the SFT policy")


@rlhf.check(">= min_rm_accuracy", kind="outcome", hint="Bradley-Terry loss on (chosen, rejected) scores read at the "
                                                       "last real token.")
def reward_model_ranks_heldout_pairs(setup, cfg):
    """Stage 2 turns preference pairs into a scalar judge: its pairwise accuracy on held-out gold-labelled
    pairs says how far PPO can trust it."""
    return measure(setup.rm_accuracy, f"{cfg.rm_eval_pairs} held-out pairs")


# ---- stage 3 wired up: the four models, one PPO iteration, the memory they hold --------------------

@dataclass
class Wiring:
    models: dict  # actor, critic, reference, reward model, as stage 3 builds them
    anchor_mismatch: list[str]  # reference tensors that differ from the SFT model's
    first_k1: torch.Tensor  # |log pi_old - log pi_ref| on the first rollout's valid tokens
    critic_gap: torch.Tensor  # |critic score - RM score| on the first rollout's answers
    frozen_changed: list[str]  # reference / reward-model tensors changed by one PPO iteration
    trained_changed: int  # actor / critic tensors changed by it
    memory: list[dict]  # adam_memory of the four models after it


@rlhf.fixture(cost=2)
def wiring(cfg, g, setup):
    """Stage 3 as the module builds it, before and after one PPO iteration with the module's own kernel and
    live optimizers."""
    _, _, eos, pad = PPO.special_ids(cfg)
    actor, reference = PPO.actor_and_reference(setup.sft)
    critic = M.make_critic(setup, cfg)
    models = {"actor": actor, "critic": critic, "reference": reference, "reward model": setup.reward_model}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    sft_weights = setup.sft.state_dict()
    anchor = [k for k, v in reference.state_dict().items() if not torch.equal(v, sft_weights[k])]
    reward_fn = PPO.reward_fn_from_model(setup.reward_model, pad)
    first = PPO.collect_rollout(actor, reference, critic, reward_fn, PPO.make_prompts(cfg, WIRING_BATCH, g),
                                cfg.max_len + 1, eos, pad, g, cfg.temperature)
    with torch.no_grad():
        critic_gap = (RM.score(critic, first.tokens, pad) - first.scores).abs()
    small = replace(cfg, rollout_batch=WIRING_BATCH)
    optimizers = PPO.ppo_optimizers(actor, critic, small, iterations=1)
    PPO.train_ppo(actor, reference, critic, reward_fn, lambda n, gen: PPO.make_prompts(cfg, n, gen), small, g,
                  eos_id=eos, pad_id=pad, iterations=1, optimizers=optimizers)
    changed = {name: [k for k, v in m.state_dict().items() if not torch.equal(v, before[name][k])]
               for name, m in models.items()}
    return Wiring(models, anchor, (first.old_logprobs - first.ref_logprobs)[first.mask.bool()].abs(), critic_gap,
                  [f"{n}.{k}" for n in ("reference", "reward model") for k in changed[n]],
                  sum(len(changed[n]) for n in TRAINED),
                  M.adam_memory(models, [optimizers["actor"][0], optimizers["critic"][0]]))


@rlhf.check("== 4", hint="deep-copy the SFT model for the reference; never pass the actor object twice.")
def ppo_holds_four_distinct_models(wiring):
    """PPO-RLHF keeps four networks: the trained actor and critic, the frozen reference and reward model; a
    reference that shares the actor's weights moves with it and the KL is always 0."""
    return M.distinct_models(*wiring.models.values())


@rlhf.check({"frozen_changed": "== 0", "trained_changed": "> 0"},
            hint="set requires_grad_(False) on both and keep them out of every optimizer.")
def reference_and_reward_model_frozen_through_ppo(wiring):
    """Only the actor and the critic are trained in stage 3; the reference and the RM only score, so their
    weights come out of a PPO update bit-identical while the actor's and the critic's move."""
    return measure({"frozen_changed": len(wiring.frozen_changed), "trained_changed": wiring.trained_changed},
                   ", ".join(wiring.frozen_changed) or "reference and reward model bit-identical")


@rlhf.check("== 0", hint="build the reference from the stage-1 model once, before PPO starts.")
def kl_anchor_is_the_sft_policy(wiring):
    """The KL penalty is to the frozen SFT model, not to the previous policy: against a moving or different
    anchor the policy could drift with no penalty. Counts reference tensors that differ from SFT's."""
    return measure(len(wiring.anchor_mismatch), ", ".join(wiring.anchor_mismatch[:3]) or "reference == SFT")


@rlhf.check(f"< {START_KL_TOL}", hint="actor and reference are both copies of the SFT model, scored at the same "
                                     "temperature.")
def kl_is_zero_at_the_first_rollout(wiring):
    """The actor starts as an exact copy of the reference, so every k1 of the first rollout is 0; a nonzero
    start means the two differ (a wrong checkpoint, dropout, or a different temperature)."""
    return measure(wiring.first_k1, f"{wiring.first_k1.numel()} tokens")


@rlhf.check(f"< {COPY_TOL}", hint="copy the RM (value head included) and make the copy trainable.")
def critic_starts_as_the_reward_model(wiring):
    """InstructGPT initialises the value model from the reward model: at the end of an answer the critic then
    starts from the RM's judgement rather than from 0."""
    return wiring.critic_gap


@rlhf.check("== 0", hint="one AdamW per trained model over that model's parameters; frozen models in no optimizer.")
def ppo_memory_matches_hand_count(wiring):
    """Under Adam a trained model holds four weight-sized tensors (weights, gradient, two moments) and a frozen
    one holds its weights only, so PPO costs 4 + 4 + 1 + 1 model copies; measured from the live parameters
    and optimizer state, float for float."""
    rows = wiring.memory
    hand = [r["params"] * (4 if r["model"] in TRAINED else 1) for r in rows]
    return measure([r["total"] - h for r, h in zip(rows, hand)],
                   ", ".join(f"{r['model']} {r['total'] / r['params']:g}x" for r in rows) + " its weights")


# ---- stage 3: PPO through the kernel --------------------------------------------------------------

@rlhf.fixture(cost=10)
def trained(ctx, cfg, g, setup, kl_penalized_rewards):
    """PPO from the SFT policy against the RM with the critic from the RM; the kernel makes every rollout's
    token rewards."""
    trained = PPO.train_with_kl_penalty(setup, cfg, g, critic=M.make_critic(setup, cfg),
                                        kl_penalized_rewards=kl_penalized_rewards,
                                        on_iteration=lambda it, _: ctx.progress(it + 1, cfg.iterations))
    return trained, M.stage_results(setup, trained, cfg)


@rlhf.check(">= min_gold_gain", kind="outcome",
            hint="check the score placement, the advantage sign and that ratio == 1 at the first minibatch.")
def ppo_raises_the_gold_reward(trained):
    """Stage 3 optimises the learned proxy, yet the true (gold) reward, which no model sees, rises: the RM
    generalises to the policy's new answers while the KL keeps them close."""
    sft, _, ppo = trained[1]
    return measure(ppo.gold - sft.gold, f"{sft.gold:.2f} -> {ppo.gold:.2f}")


@rlhf.check(">= min_score_gain", kind="outcome",
            hint="the score must reach the advantages: placed on the last valid token, propagated by GAE.")
def ppo_raises_the_reward_model_score(trained):
    """PPO maximises the RM score minus the KL penalty, so the score of fresh samples must go up."""
    sft, _, ppo = trained[1]
    return measure(ppo.rm_score - sft.rm_score, f"{sft.rm_score:.2f} -> {ppo.rm_score:.2f}")


@rlhf.check("<= max_kl", kind="outcome",
            hint="a positive beta (or an adaptive controller with a target) on k1 in the token rewards.")
def ppo_kl_to_sft_bounded(trained):
    """The KL penalty keeps the policy where the RM was trained and can be trusted: the exact sequence KL of
    fresh samples to the SFT model stays bounded (an unbounded KL is the signature of reward hacking)."""
    return trained[1][2].kl


@rlhf.report
def tables(ctx, setup, wiring, trained):
    ppo_run, stages = trained
    ctx.series("sft/loss", [h["loss"] for h in setup.sft_history], x_label="SFT step",
               label="stage 1: SFT loss", y_label="loss per token (nats)")
    ctx.series("rm/loss", [h["loss"] for h in setup.rm_history], x_label="reward-model step",
               label="stage 2: reward-model loss (Bradley-Terry)", y_label="loss per pair (nats)")
    steps = list(range(len(ppo_run.history)))
    for name in ("objective/scores", "objective/gold_reward", "objective/kl", "objective/rlhf_reward",
                 "policy/clipfrac_avg", "loss/value_avg"):
        ctx.series(name, [h[name] for h in ppo_run.history], steps, x_label="PPO iteration",
                   group="ppo/rewards" if name in ("objective/scores", "objective/gold_reward") else "",
                   key=name == "objective/scores", **PPO.METRIC_WORDS[name])
    live = {"1 SFT": M.distinct_models(setup.sft), "2 reward model": M.distinct_models(setup.reward_model),
            "3 PPO": M.distinct_models(*wiring.models.values())}
    ctx.table("Stages: data flow and model roles",
              ["stage", "data in", "data out", "trained", "frozen", "models in memory (live)",
               "weight-sized tensors under Adam (hand count)", "gold reward", "RM score", "KL to SFT"],
              [[spec["stage"], spec["data_in"], spec["data_out"], ", ".join(spec["trainable"]),
                ", ".join(spec["frozen"]) or "-", live[spec["stage"]],
                M.memory_in_model_copies(len(spec["trainable"]), len(spec["frozen"])),
                round(row.gold, 3), round(row.rm_score, 3), round(row.kl, 3)] for spec, row in zip(M.STAGES, stages)])
    ctx.table("PPO memory, measured (floats after one update)",
              ["model", "parameters", "gradients", "Adam moments", "total", "copies of its weights"],
              [[r["model"], r["params"], r["grads"], r["optimizer_state"], r["total"], r["total"] / r["params"]]
               for r in wiring.memory])
    ctx.table("Model copies by algorithm (hand count, not measured)",
              ["algorithm", "trained", "frozen", "models", "weight-sized tensors under Adam"],
              [[name, ", ".join(r["trainable"]), ", ".join(r["frozen"]) or "-",
                len(r["trainable"]) + len(r["frozen"]), M.memory_in_model_copies(len(r["trainable"]), len(r["frozen"]))]
               for name, r in M.ALGORITHM_ROLES.items()])
    sft, _, ppo = stages
    ctx.scalar("gold reward: SFT", sft.gold)
    ctx.scalar("gold reward: PPO", ppo.gold)
    ctx.scalar("gold reward gain", ppo.gold - sft.gold)
    ctx.scalar("RM score: SFT", sft.rm_score)
    ctx.scalar("RM score: PPO", ppo.rm_score)
    ctx.scalar("RM held-out pairwise accuracy", setup.rm_accuracy)
    ctx.scalar("KL to SFT after PPO, nats", ppo.kl)
    ctx.scalar("SFT answers ending with EOS", sft.extra["eos_rate"])
