"""RLHF end to end: SFT -> reward model -> PPO, with the roles and data flow of each stage made explicit.

    stage 1  SFT     data: (prompt, demonstration)          trains pi_SFT             -> 1 model
    stage 2  RM      data: (prompt, chosen, rejected)       trains r_phi (from SFT)   -> 1 model
    stage 3  PPO     data: prompts only (answers sampled)   trains actor, critic      -> 4 models
                     frozen: reference (= pi_SFT), r_phi;    critic initialised from r_phi (InstructGPT)
    objective        max E[r_phi(x, y)] - beta KL(pi || pi_SFT),  per token: -beta k1 + score on the last token

The task is the reward_model / ppo modules' counting task (gold = how often the prompt's digit occurs),
so every stage is judged by a gold reward that no model ever sees.
Builds on: reward_model (SFT warm-up, Bradley-Terry RM, pairwise accuracy), ppo (core kernels, rollouts,
train_ppo, the four roles).
Deviations from InstructGPT: no PPO-ptx pretraining mix, no reward normalisation before PPO, the
demonstrations come from the task's data distribution, and the preference labels from the gold rule.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from modules import reward_model as RM
from modules.ppo import ppo as PPO
from modules.ppo.core import kl_penalized_rewards
from modules.transformer import Transformer

__all__ = ["FORMULAS", "RLHFConfig", "STAGES", "ALGORITHM_ROLES", "kl_penalized_rewards",
           "critic_from_reward_model", "distinct_models", "memory_in_model_copies", "StageResult", "run_pipeline"]

FORMULAS = [
    ("Objective", r"$\max_\pi\ \mathbb{E}_{y\sim\pi}[r_\phi(x,y)]-\beta\,KL(\pi\,\|\,\pi_{SFT})$"),
    ("SFT", r"$L=-\sum_t m_t\log\pi(y_t|x,y_{<t})\,/\sum_t m_t$"),
    ("Reward model", r"$L=-\log\sigma\left(r_\phi(x,y_w)-r_\phi(x,y_l)\right)$"),
    ("Token reward", r"$r_t=-\beta\log\frac{\pi_{old}(y_t)}{\pi_{SFT}(y_t)}+[t=T]\,r_\phi(x,y)$"),
    ("Memory", r"$\mathrm{copies}=n_{models}+3\,n_{trained}\quad(\mathrm{grads}+2\ \mathrm{Adam\ moments})$"),
]

# what each stage reads and writes, which models it trains and which it only reads
STAGES = [
    {"stage": "1 SFT", "data_in": "(prompt, demonstration)", "data_out": "SFT policy",
     "trainable": ["policy"], "frozen": []},
    {"stage": "2 reward model", "data_in": "(prompt, chosen, rejected)", "data_out": "reward model (scalar head)",
     "trainable": ["reward model"], "frozen": []},
    {"stage": "3 PPO", "data_in": "prompts only; answers sampled online", "data_out": "aligned policy",
     "trainable": ["actor", "critic"], "frozen": ["reference", "reward model"]},
]
# the same bookkeeping for the other alignment algorithms of the course (their modules hold the code)
ALGORITHM_ROLES = {
    "PPO (RLHF)": {"trainable": ["actor", "critic"], "frozen": ["reference", "reward model"]},
    "DPO": {"trainable": ["policy"], "frozen": ["reference"]},
    "GRPO (beta > 0, reward model)": {"trainable": ["policy"], "frozen": ["reference", "reward model"]},
    "GRPO (beta > 0, rule verifier)": {"trainable": ["policy"], "frozen": ["reference"]},
}


@dataclass(frozen=True)
class RLHFConfig(PPO.PPOConfig):
    """The three stages: the ppo module's task and PPO settings, plus the pipeline's own bars."""

    hack: bool = False  # the reward-hacking experiment belongs to the ppo audit
    critic_from_rm: bool = True  # InstructGPT initialises the value model from the reward model
    rm_eval_pairs: int = 512  # held-out clean pairs for the RM's pairwise accuracy
    min_rm_accuracy: float = 0.8  # outcome bar: stage 2 held-out pairwise accuracy
    min_eos_rate: float = 0.97  # outcome bar: stage 1 samples that end with <eos> within max_len + 1
    min_score_gain: float = 0.5  # outcome bar: RM score of the PPO policy's samples minus SFT's

    @classmethod
    def toy(cls) -> RLHFConfig:
        # 30 SFT steps (the ppo toy) leave 5-10 % of answers without <eos>; the stronger SFT model then
        # drifts faster, hence beta 0.2 instead of 0.1
        return cls(sft_steps=60, kl_coef=0.2, min_eos_rate=0.9, min_gold_gain=3.0, max_kl=6.0)

    @classmethod
    def full(cls) -> RLHFConfig:
        return cls(target_from_prompt=True, sft_steps=250, rm_steps=300, iterations=30, rollout_batch=128, kl_coef=0.15,
                   eval_prompts=512, rm_eval_pairs=2048, min_gold_gain=2.5, max_kl=6.0, min_rm_accuracy=0.85)


def critic_from_reward_model(rm: Transformer) -> Transformer:
    """The critic: a trainable copy of the reward model (its value head too), as InstructGPT does, so
    V(x, y) at the last token starts at the RM score instead of 0."""
    critic = copy.deepcopy(rm)
    for p in critic.parameters():
        p.requires_grad_(True)
    return critic.train()


def distinct_models(*models: nn.Module) -> int:
    """How many of ``models`` own their weights: models sharing any parameter storage count once."""
    owners: list[set[int]] = []
    for m in models:
        ptrs = {p.data_ptr() for p in m.parameters()}
        if not any(ptrs & o for o in owners):
            owners.append(ptrs)
    return len(owners)


def memory_in_model_copies(n_trainable: int, n_frozen: int) -> int:
    """Weights-sized tensors in memory under Adam: every model's weights, plus a gradient and two
    moment estimates for each trained model (activations and the KV cache not counted)."""
    return n_trainable * 4 + n_frozen


@dataclass
class StageResult:
    stage: str
    gold: float  # mean gold reward of samples from the policy after this stage
    rm_score: float  # mean score of those samples under the stage-2 reward model
    kl: float  # exact sequence KL(policy || SFT) of those samples, nats
    extra: dict  # stage-specific measurements


def run_pipeline(cfg: RLHFConfig, generator: torch.Generator, *, kl_penalized_rewards=kl_penalized_rewards,
                 on_iteration=None) -> dict:
    """SFT -> RM -> PPO. Returns the models of every stage, the PPO history and one StageResult per stage
    (each stage's policy sampled on the same number of fresh prompts and scored by gold and the final RM)."""
    rm_cfg = PPO.task_config(cfg)
    bos, sep, eos, pad = PPO.special_ids(cfg)
    # ---- stage 1: SFT on demonstrations (the task's data distribution)
    sft, sft_history = RM.warmup_language_model(rm_cfg, generator)
    # ---- stage 2: the reward model, initialised from SFT with a scalar head, on gold-labelled pairs
    rm = RM.reward_model_from_lm(sft, rm_cfg.head_init_std)
    rm_history = RM.train_reward_model(rm, rm_cfg, generator)
    rm = PPO.frozen_copy(rm)
    heldout = RM.preference_pairs(rm_cfg, cfg.rm_eval_pairs, generator)
    rm_accuracy = RM.pairwise_accuracy(rm, heldout, pad)
    reward_fn = PPO.reward_fn_from_model(rm, pad)
    # ---- stage 3: PPO with four models
    actor, reference = PPO.actor_and_reference(sft)
    critic = critic_from_reward_model(rm) if cfg.critic_from_rm else PPO.new_critic(sft)
    before = {"reference": copy.deepcopy(reference.state_dict()), "rm": copy.deepcopy(rm.state_dict())}
    first = PPO.collect_rollout(actor, reference, critic, reward_fn, PPO.make_prompts(cfg, 64, generator),
                                cfg.max_len + 1, eos, pad, generator, cfg.temperature)
    with torch.no_grad():  # what the critic says at the end of each answer before any update
        critic_start = RM.score(critic, first.tokens, pad)
    policy, history = PPO.train_ppo(actor, reference, critic, reward_fn, lambda n, g: PPO.make_prompts(cfg, n, g),
                                    cfg, generator, eos_id=eos, pad_id=pad, gold_fn=RM.gold_reward,
                                    kl_penalized_rewards=kl_penalized_rewards, on_iteration=on_iteration)

    def measure(stage: str, model: Transformer) -> StageResult:
        ev = PPO.evaluate(model, reference, cfg, generator)
        eos_rate = (ev["tokens"][:, PPO.prompt_len(cfg):] == eos).any(1).float().mean().item()
        return StageResult(stage, ev["gold"], reward_fn(ev["tokens"]).mean().item(), ev["kl"], {"eos_rate": eos_rate})

    after_sft = measure("1 SFT", sft)
    # stage 2 trains the RM only: the policy is still the SFT model, so its numbers carry over
    after_rm = StageResult("2 reward model", after_sft.gold, after_sft.rm_score, after_sft.kl,
                           {"rm_accuracy": rm_accuracy})
    stages = [after_sft, after_rm, measure("3 PPO", policy)]
    return {"sft": sft, "rm": rm, "actor": policy, "reference": reference, "critic": critic, "history": history,
            "stages": stages, "before": before, "first_rollout": first, "critic_start": critic_start, "rm_accuracy": rm_accuracy,
            "sft_history": sft_history, "rm_history": rm_history}
