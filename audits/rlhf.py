"""Audit of the rlhf module (day 9): SFT -> reward model -> PPO wired end to end, the KL-penalised token
rewards that connect them, and what each stage trains, freezes and hands on."""
from __future__ import annotations

import torch

from llmaudit.audit import Context, audit, kernel
from modules.ppo import last_valid_index
from modules.rlhf import rlhf as M

DT = torch.float64
TOL = 1e-9  # float64 arithmetic on a crafted batch
COPY_TOL = 1e-6  # the critic is a copy of the RM: equal scores up to float32 rounding
START_KL_TOL = 1e-5  # actor == reference at the first rollout: every k1 is 0 up to float32 rounding
BETA = 0.1


def _example() -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=DT)
    return {"logprobs": -3 * torch.rand(3, 4, generator=g, dtype=DT),
            "ref_logprobs": -3 * torch.rand(3, 4, generator=g, dtype=DT),
            "scores": torch.tensor([1.5, -0.5, 2.0], dtype=DT), "response_mask": mask, "beta": BETA}


KERNELS = [
    kernel(M.kl_penalized_rewards, example=_example,
           hint="rewards = -beta * (logprobs - ref_logprobs) * mask, then add scores[b] at the LAST position "
                "where mask[b] == 1 (not at mask.sum() on a left-padded row, not on padding, not on every token)."),
]


def _kernel_checks(ctx: Context, kl_penalized_rewards) -> None:
    ex = _example()
    mask, lp, ref, scores = ex["response_mask"], ex["logprobs"].clone(), ex["ref_logprobs"], ex["scores"]
    lp[mask == 0] = float("nan")  # padding slots hold garbage in real rollouts
    rewards = kl_penalized_rewards(lp, ref, scores, mask, BETA)
    k1 = torch.where(mask.bool(), ex["logprobs"] - ref, torch.zeros_like(ref))
    outside = rewards[mask == 0]
    ctx.check("no_reward_outside_the_response_mask", bool(torch.all(outside == 0)),
              float(outside.abs().nan_to_num(float("inf")).max()), "exactly 0 (log-probs there are NaN)",
              "Padding after <eos> is not part of the episode: it gets no KL penalty and no score, and its "
              "garbage log-probs must never leak in (use where/masking, not NaN * 0).",
              hint="multiply by the mask AFTER replacing invalid entries (NaN * 0 is NaN), or use torch.where.")
    clean = rewards.nan_to_num(0.0)
    err_sum = (clean.sum(1) - (scores - BETA * k1.sum(1))).abs().max().item()
    ctx.check("token_rewards_sum_to_score_minus_beta_kl", err_sum < TOL, err_sum, f"< {TOL:g}",
              "The episode's return is the RM score minus beta times the summed per-token k1 KL: the RLHF "
              "objective r(x, y) - beta KL, written token by token so GAE can assign credit.",
              hint="the KL term is -beta * (logprobs - ref_logprobs) on every valid token; the score is added once.")
    last = last_valid_index(mask)
    rows = torch.arange(mask.shape[0])
    at_last = clean[rows, last] + BETA * k1[rows, last]
    err_last = (at_last - scores).abs().max().item()
    ctx.check("score_on_the_last_valid_token", err_last < TOL, err_last, f"< {TOL:g}",
              "The reward model judges the whole answer, so its score is the reward of the final action, the "
              "last valid token (<eos>); on the first token or on padding it would be credited to the wrong step.",
              hint="index with the last 1 of each mask row (mask.sum(1) - 1 for right padding), not column -1.")
    only_score = kl_penalized_rewards(ex["logprobs"], ref, scores, mask, 0.0)
    expected = torch.zeros_like(only_score)
    expected[rows, last] = scores
    err_zero = (only_score - expected).abs().max().item()
    ctx.check("beta_zero_leaves_only_the_score", err_zero < TOL, err_zero, f"< {TOL:g}",
              "With beta = 0 nothing ties the policy to the SFT model: the only reward is the RM score at the "
              "end, which is the setting where reward hacking runs free.",
              hint="the KL term must scale with beta (and vanish at 0).")


@audit("rlhf", day=9, title="RLHF end to end: SFT, reward model, PPO, and who is trained when",
       config=M.RLHFConfig, kernels=KERNELS, formulas=M.FORMULAS)
def audit_rlhf(ctx: Context, *, kl_penalized_rewards=M.kl_penalized_rewards) -> None:
    cfg: M.RLHFConfig = ctx.config
    _kernel_checks(ctx, kl_penalized_rewards)
    ctx.progress(0.05)

    out = M.run_pipeline(cfg, ctx.generator(0), kl_penalized_rewards=kl_penalized_rewards,
                         on_iteration=lambda i, _: ctx.progress(0.1 + 0.8 * (i + 1) / cfg.iterations))
    sft_row, rm_row, ppo_row = out["stages"]
    history = out["history"]

    # ---- the stages' curves
    ctx.series("sft/loss", [h["loss"] for h in out["sft_history"]], x_label="SFT step")
    ctx.series("rm/loss", [h["loss"] for h in out["rm_history"]], x_label="RM step")
    steps = list(range(len(history)))
    for name in ("objective/scores", "objective/gold_reward", "objective/kl", "objective/rlhf_reward",
                 "policy/clipfrac_avg", "loss/value_avg"):
        ctx.series(name, [h[name] for h in history], steps, x_label="PPO iteration",
                   group="ppo/rewards" if name in ("objective/scores", "objective/gold_reward") else "")

    # ---- the four models of stage 3
    actor, critic, reference, rm, sft = out["actor"], out["critic"], out["reference"], out["rm"], out["sft"]
    n_models = M.distinct_models(actor, critic, reference, rm)
    ctx.check("ppo_holds_four_distinct_models", n_models == 4, n_models, "= 4 (actor, critic, reference, RM)",
              "PPO-RLHF keeps four networks: the trained actor and critic, the frozen reference and reward "
              "model; a reference that shares the actor's weights moves with it and the KL is always 0.",
              hint="deep-copy the SFT model for the reference; never pass the actor object twice.")
    frozen_same = all(torch.equal(v, reference.state_dict()[k]) for k, v in out["before"]["reference"].items()) \
        and all(torch.equal(v, rm.state_dict()[k]) for k, v in out["before"]["rm"].items())
    ctx.check("reference_and_reward_model_frozen_through_ppo", frozen_same, "bit-identical" if frozen_same else "changed",
              "bit-identical", "Only the actor and critic are trained in stage 3; the reference and RM only "
              "score, so their weights must come out of PPO exactly as they went in.",
              hint="set requires_grad_(False) on both and keep them out of every optimizer.")
    anchor_is_sft = all(torch.equal(v, reference.state_dict()[k]) for k, v in sft.state_dict().items())
    ctx.check("kl_anchor_is_the_sft_policy", anchor_is_sft, "reference == SFT" if anchor_is_sft else "differs",
              "reference weights == SFT weights", "The KL penalty is to the frozen SFT model, not to the previous "
              "policy: against a moving anchor the policy could drift step by step with no penalty.",
              hint="build the reference from the stage-1 model once, before PPO starts.")
    first = out["first_rollout"]
    first_kl = history[0]["objective/kl"]
    ctx.check("kl_is_zero_at_the_first_rollout", abs(first_kl) < START_KL_TOL, abs(first_kl), f"< {START_KL_TOL:g} nats",
              "The actor starts as an exact copy of the reference, so the first rollout's KL is 0; a nonzero "
              "start means the two differ (a wrong checkpoint, dropout, or a different temperature).",
              hint="actor and reference are both copies of the SFT model, scored at the same temperature.")
    if cfg.critic_from_rm:
        gap = (out["critic_start"] - first.scores).abs().max().item()
        ctx.check("critic_starts_as_the_reward_model", gap < COPY_TOL, gap, f"< {COPY_TOL:g}",
                  "InstructGPT initialises the value model from the reward model: at the end of an answer the "
                  "critic then starts from the RM's judgement rather than from 0.",
                  hint="copy the RM (value head included) and make the copy trainable.")

    # ---- the closed loop, stage by stage
    eos_rate = sft_row.extra["eos_rate"]
    ctx.check("sft_policy_ends_answers_with_eos", eos_rate >= cfg.min_eos_rate, eos_rate, f">= {cfg.min_eos_rate:g}",
              "Stage 1 teaches the format: answers that stop with <eos>, where the reward model will read its score.",
              kind="outcome", hint="train on demonstrations that end with <eos> and supervise that token.")
    ctx.check("reward_model_ranks_heldout_pairs", out["rm_accuracy"] >= cfg.min_rm_accuracy, out["rm_accuracy"],
              f">= {cfg.min_rm_accuracy:g}", "Stage 2 turns preference pairs into a scalar judge: held-out "
              "pairwise accuracy says how far PPO can trust it.", kind="outcome",
              hint="Bradley-Terry loss on (chosen, rejected) scores read at the last real token.")
    gold_gain = ppo_row.gold - sft_row.gold
    ctx.check("ppo_raises_the_gold_reward", gold_gain >= cfg.min_gold_gain,
              f"{sft_row.gold:.2f} -> {ppo_row.gold:.2f} (+{gold_gain:.2f})", f"gain >= {cfg.min_gold_gain:g}",
              "Stage 3 optimises the learned proxy, yet the true (gold) reward, which no model sees, rises: the "
              "RM generalises to the policy's new answers while the KL keeps them close.", kind="outcome",
              hint="check the score placement, the advantage sign and that ratio == 1 at the first minibatch.")
    score_gain = ppo_row.rm_score - sft_row.rm_score
    ctx.check("ppo_raises_the_reward_model_score", score_gain >= cfg.min_score_gain,
              f"{sft_row.rm_score:.2f} -> {ppo_row.rm_score:.2f}", f"gain >= {cfg.min_score_gain:g}",
              "PPO maximises the RM score minus the KL penalty, so the score itself must go up.", kind="outcome",
              hint="the score must reach the advantages: placed on the last valid token, propagated by GAE.")
    ctx.check("ppo_kl_to_sft_bounded", ppo_row.kl <= cfg.max_kl, ppo_row.kl, f"<= {cfg.max_kl:g} nats",
              "The KL penalty keeps the policy where the RM was trained and can be trusted; an unbounded KL is "
              "the signature of reward hacking.", kind="outcome",
              hint="a positive beta (or an adaptive controller with a target) on k1 in the token rewards.")

    # ---- the tables: data flow and roles per stage, and memory per algorithm
    live = {"1 SFT": M.distinct_models(sft), "2 reward model": M.distinct_models(rm),
            "3 PPO": n_models}
    rows = []
    for spec, row in zip(M.STAGES, out["stages"]):
        n_frozen = len(spec["frozen"])
        rows.append([spec["stage"], spec["data_in"], spec["data_out"], ", ".join(spec["trainable"]),
                     ", ".join(spec["frozen"]) or "-", live[spec["stage"]],
                     M.memory_in_model_copies(len(spec["trainable"]), n_frozen),
                     round(row.gold, 3), round(row.rm_score, 3), round(row.kl, 3)])
    ctx.table("Stages: data flow and model roles",
              ["stage", "data in", "data out", "trained", "frozen", "models in memory",
               "weight-sized tensors (Adam)", "gold reward", "RM score", "KL to SFT"], rows)
    ctx.table("Model copies by algorithm",
              ["algorithm", "trained", "frozen", "models", "weight-sized tensors (Adam)"],
              [[name, ", ".join(r["trainable"]), ", ".join(r["frozen"]) or "-",
                len(r["trainable"]) + len(r["frozen"]), M.memory_in_model_copies(len(r["trainable"]), len(r["frozen"]))]
               for name, r in M.ALGORITHM_ROLES.items()])
    ctx.scalar("gold reward: SFT -> PPO", f"{sft_row.gold:.2f} -> {ppo_row.gold:.2f}")
    ctx.scalar("RM score: SFT -> PPO", f"{sft_row.rm_score:.2f} -> {ppo_row.rm_score:.2f}")
    ctx.scalar("RM held-out pairwise accuracy", out["rm_accuracy"])
    ctx.scalar("KL(PPO policy || SFT), nats", ppo_row.kl)
    ctx.progress(1.0)
