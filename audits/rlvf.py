"""Audit of the rlvf module (day 8): verifiers that turn a completion into a reward without a reward model
(gsm8k-style math, yes/no logic, format), attacked with seeded adversarial strings, the reward's placement
on the last valid token, and a closed loop: GRPO with the verifier as its only reward on the logic task."""
from __future__ import annotations

import copy

import torch

from llmaudit.audit import Context, audit, kernel
from modules.grpo import grpo as G
from modules.rlvf import rlvf as V

PLACEMENT_TOL = 1e-7
# rl-anchors section 7: (completion, ground truth, method) -> "score" | "format" | "zero"
GSM8K_VECTORS = [("#### 72", "72", "strict", "score"), ("#### 1,000", "1000", "strict", "score"),
                 ("#### 72.0", "72", "strict", "format"), ("72", "72", "strict", "zero"),
                 ("so #### 5 then #### 12", "12", "strict", "score"), ("#### 12 #### 5", "12", "strict", "format"),
                 ("the answer is 1,000", "1000", "flexible", "score"), ("#### -3", "-3", "strict", "score"),
                 ("no number here", "7", "flexible", "zero")]


def _example() -> dict:
    return {"completion": "#### 1,000", "ground_truth": "1000", "method": "strict", "format_score": 0.1, "score": 1.0}


KERNELS = [
    kernel(V.math_answer_reward, example=_example,
           hint="extract the number after the LAST '#### ' with a regex, drop commas, compare as strings; "
                "no answer -> 0, right -> score, wrong -> format_score; never eval/int() the model's text."),
]


def grpo_config(cfg: V.RLVFConfig) -> G.GRPOConfig:
    """The GRPO run of this audit: the logic task (answers "yes<eos>" / "no<eos>", 2 tokens)."""
    return G.GRPOConfig(task="logic", max_new_tokens=2, format_score=cfg.format_score,
                        demo_correct_easy=cfg.demo_correct_easy, demo_correct_hard=cfg.demo_correct_hard,
                        warmup_steps=cfg.warmup_steps, steps=cfg.steps, lr=cfg.lr, eval_every=max(1, cfg.steps // 3))


@audit("rlvf", day=8, title="RL from verifiable rewards: math, logic and format verifiers, attacked and used",
       config=V.RLVFConfig, kernels=KERNELS, formulas=V.FORMULAS)
def audit_rlvf(ctx: Context, *, math_answer_reward=V.math_answer_reward) -> None:
    cfg: V.RLVFConfig = ctx.config
    fs = cfg.format_score
    value = {"score": 1.0, "format": fs, "zero": 0.0}

    def reward(completion: str, truth: str, method: str | None = None) -> float | str:
        try:
            return float(math_answer_reward(completion, truth, method=method or cfg.method, format_score=fs, score=1.0))
        except Exception as exc:  # noqa: BLE001 - a verifier that crashes on model text is a failure
            return f"{type(exc).__name__}"

    # ---- the math verifier: vectors, purity, range ------------------------------------------------------
    got = [reward(c, t, m) for c, t, m, _ in GSM8K_VECTORS]
    wrong = [(c, t, g) for (c, t, _, w), g in zip(GSM8K_VECTORS, got) if g != value[w]]
    ctx.check("verifier_matches_gsm8k_vectors", not wrong,
              f"{len(GSM8K_VECTORS) - len(wrong)}/{len(GSM8K_VECTORS)} right"
              + (f"; first miss {wrong[0]}" if wrong else ""),
              f"'#### 72' vs 72 -> 1, '#### 1,000' vs 1000 -> 1, '#### 72.0' vs 72 -> {fs:g}, no marker -> 0, "
              "the LAST marker counts",
              "A verifier is a parsing rule: take the answer at the agreed place (the last '####'), normalise only "
              "what you decided to (commas), compare strictly; '72.0' is not '72' under string equality.",
              hint="re.findall(r'#### (-?[0-9.,]+)', text)[-1].replace(',', ''); 0 when nothing matches.")

    g = ctx.generator(0)
    attacks = V.adversarial_completions(cfg.n_adversarial, g)
    problems = V.all_problems("arithmetic")
    honest = [(f"#### {int(t) + d}", t, "answer") for t in problems.answers for d in (-1, 0, 1)]
    cases = attacks + honest
    first = [reward(c, t) for c, t, _ in cases]
    second = [reward(c, t) for c, t, _ in cases]
    allowed = {0.0, fs, 1.0}
    outside = [v for v in first if v not in allowed]
    ctx.check("verifier_is_deterministic_and_in_range", first == second and not outside,
              f"{len(cases)} completions scored twice: {'identical' if first == second else 'DIFFERENT'}; "
              f"{len(outside)} outside {{0, {fs:g}, 1}}" + (f" (e.g. {outside[0]})" if outside else ""),
              f"identical and every reward in {{0, {fs:g}, 1}}",
              "The reward must be a pure function of (completion, answer): no randomness, no partial credit the "
              "policy can farm, no state carried between calls.",
              hint="no global state, no randomness; return exactly 0, format_score or score.")

    with V.forbid_code_execution() as calls:
        for c, t, _ in cases:
            reward(c, t)
    ctx.check("verifier_never_executes_model_text", not calls,
              f"{len(calls)} calls to eval/exec/compile/os.system/subprocess while scoring {len(cases)} completions"
              + (f" ({calls[0]})" if calls else ""), "0",
              "Model text is untrusted input: '#### __import__(\"os\").system(...)' must be parsed, never run; "
              "eval() of an answer is remote code execution.",
              hint="use regular expressions and string comparison; never eval(), exec() or int() the whole text.")

    crashed = [(k, v) for (c, t, k), v in zip(cases, first) if isinstance(v, str)]
    may_pay = ("huge number (right)", "answer")
    paid = [(k, c[:40]) for (c, t, k), v in zip(cases, first) if v == 1.0 and k not in may_pay]
    huge_right = [v for (c, t, k), v in zip(cases, first) if k == "huge number (right)"]
    ok = not crashed and not paid and huge_right and all(v == 1.0 for v in huge_right)
    ctx.check("verifier_resists_adversarial_completions", ok,
              f"{len(attacks)} attacks: {len(crashed)} crashed, {len(paid)} paid the full score"
              + (f" (e.g. {paid[0]})" if paid else "") + (f" (e.g. {crashed[0]})" if crashed else "")
              + f"; {len(huge_right)} right 200+-digit answers paid {set(huge_right) or '-'}",
              "no crash; listing numbers, nested '####', code, answers far back or without marker, a 200+-digit "
              "answer wrong in its last digit never earn 1; the right 200+-digit answer earns 1",
              "A gameable verifier gets gamed: if any number in the reply can match, RL learns to list numbers "
              "(seed 002's bug); float() makes two 200-digit numbers equal, so compare the strings.",
              hint="only the last '#### <number>' counts; compare strings, not float(); never search the whole text.")
    ctx.progress(0.1)

    # ---- module rules: truncation, logic, format, placement, encoding -------------------------------------
    near = "#### 12" + " x" * 146  # the answer 299 characters before the end
    far = "#### 12" + " x" * 147  # 301 characters before the end
    seen, unseen = V.extract_answer(near), V.extract_answer(far)
    ctx.check("answer_beyond_the_last_300_chars_is_invisible", seen == "12" and unseen is None,
              f"marker {len(near) - near.index('####')} chars from the end -> {seen!r}, "
              f"{len(far) - far.index('####')} -> {unseen!r}", "'12' and None",
              "verl scores only the last 300 characters of a completion: an answer written early in a long "
              "reply is invisible, a truncation caveat to know when outputs get long.",
              hint="slice completion[-300:] before searching.")

    logic_cases = [("yes", "yes", 1.0), ("no", "yes", fs), (" yes ", "yes", 1.0), ("yes no", "yes", 0.0),
                   ("y", "yes", 0.0), ("yesyes", "yes", 0.0), ("is 7>2? yes", "yes", 0.0), ("no", "no", 1.0),
                   ("", "no", 0.0)]
    logic_got = [V.yes_no_reward(c, t, format_score=fs) for c, t, _ in logic_cases]
    bad = [(c, t, v) for (c, t, want), v in zip(logic_cases, logic_got) if v != want]
    ctx.check("logic_verifier_needs_the_exact_word", not bad,
              f"{len(logic_cases) - len(bad)}/{len(logic_cases)} right" + (f"; first miss {bad[0]}" if bad else ""),
              "'yes' -> 1, 'no' (truth yes) -> format score, 'yes no', 'y', 'is 7>2? yes' -> 0",
              "A logic verifier that searches for a keyword pays for hedging ('yes no') and for words copied "
              "from the question; demand the exact answer word.",
              hint="compare the stripped completion with 'yes'/'no'; no substring search.")

    fmt_cases = [("#### 12", "arithmetic", True), ("#### -3", "arithmetic", True), ("####12", "arithmetic", False),
                 ("12", "arithmetic", False), ("#### 12 ", "arithmetic", False), ("x #### 12", "arithmetic", False),
                 ("#### 1.5", "arithmetic", False), ("yes", "logic", True), ("yes!", "logic", False)]
    fmt_bad = [(c, t) for c, t, want in fmt_cases if V.follows_format(c, t) != want]
    ctx.check("format_check_accepts_exactly_the_answer_format", not fmt_bad,
              f"{len(fmt_cases) - len(fmt_bad)}/{len(fmt_cases)} right"
              + (f"; first miss {fmt_bad[0]}" if fmt_bad else ""),
              "the whole completion is '#### <int>' (or 'yes'/'no')",
              "A format reward checks the whole completion against the agreed pattern (fullmatch), or extra text "
              "around a valid answer slips through.",
              hint="re.fullmatch, not re.search.")

    B, T = 64, 8
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # a response cut at the limit: the reward goes on its last token
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    scores = torch.rand(B, generator=g) + 0.5
    placed = V.place_outcome_reward(scores, mask)
    last = torch.zeros(B, T, dtype=torch.bool)
    last[torch.arange(B), lengths - 1] = True
    err = max((placed.sum(-1) - scores).abs().max().item(), placed[~last].abs().max().item(),
              (placed[last] - scores).abs().max().item())
    ctx.check("reward_sits_on_the_last_valid_token", err < PLACEMENT_TOL,
              f"max error {err:.1e} over {B} responses (lengths 1..{T}, one cut at the limit)",
              f"sum_t r_t = r, r on the last valid token, 0 elsewhere (< {PLACEMENT_TOL:g})",
              "The outcome reward belongs to the last token the policy produced (EOS, or the cut-off token); "
              "TRL's PPO puts it one slot later, on padding, which silently drops it.",
              hint="index with the rightmost 1 of the mask, not mask.sum() (the slot after EOS).")

    eos, pad = V.VOCAB.index(V.EOS), V.VOCAB.index(V.PAD)
    full_text = V.encode("#### 12")  # 7 tokens, no room for EOS when T = 7
    with_eos = torch.tensor([full_text + [eos, pad]])
    cut = torch.tensor([V.encode("#### 12") + V.encode("34")])
    r_end, ended_end, _ = V.score_responses("arithmetic", with_eos, ["12"], fs)
    r_cut, ended_cut, text_cut = V.score_responses("arithmetic", cut, ["1234"], fs)
    ok = r_end.item() == 1.0 and bool(ended_end) and r_cut.item() == 0.0 and not bool(ended_cut)
    ctx.check("truncated_responses_score_zero", ok,
              f"'#### 12<eos>' -> {r_end.item():g}; '{text_cut[0]}' cut without EOS (truth 1234) -> {r_cut.item():g}",
              "1 with EOS, 0 when cut at the length limit",
              "A reply cut at max length is unfinished: scoring its partial text rewards luck (and a cut '#### 1' "
              "could even match); verl/DAPO either score it 0 or mask it out.",
              hint="check for EOS before calling the verifier.")

    texts = [V.decode(p) for p in problems.prompts] + [V.decode(p) for p in V.all_problems("logic").prompts]
    texts += ["#### 18<eos><pad>", "yes<eos>", "no<eos><pad>", "#### -3"]
    round_trip = sum(V.decode(V.encode(s)) == s for s in texts)
    ctx.check("encode_decode_round_trip", round_trip == len(texts),
              f"{round_trip}/{len(texts)} prompts and answers", "all",
              "The verifier reads decoded text: decode(encode(s)) must give s back, or rewards are computed on "
              "something the policy never wrote.",
              hint="match the multi-character tokens (<eos>, yes, no) before single characters.")
    ctx.progress(0.2)

    # ---- the closed loop: GRPO with the verifier as the only reward ---------------------------------------
    gcfg = grpo_config(cfg)
    policy, warm = G.warm_up_policy(gcfg, ctx.generator(1))
    reference = copy.deepcopy(policy).requires_grad_(False)
    ctx.series("warmup/loss", [h["loss"] for h in warm], x_label="warm-up step")

    def on_step(step: int, record: dict) -> None:
        ctx.progress(0.3 + 0.7 * (step + 1) / gcfg.steps)

    history, evals = G.train_grpo(policy, reference, gcfg, ctx.generator(2), on_step=on_step)
    for name in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy"):
        ctx.series(name, [h[name] for h in history], x_label="GRPO step")
    steps = [e.step for e in evals]
    ctx.series("eval/accuracy", [e.accuracy for e in evals], steps, x_label="GRPO step", group="eval/accuracy")
    ctx.series("eval/accuracy_hard", [e.accuracy_by_difficulty[1] for e in evals], steps, x_label="GRPO step",
               group="eval/accuracy")
    before, after = evals[0], evals[-1]
    ok = before.accuracy <= cfg.max_initial_accuracy and after.accuracy >= cfg.min_accuracy
    ctx.check("grpo_with_verifier_reward_raises_logic_accuracy", ok,
              f"{before.accuracy:.3f} -> {after.accuracy:.3f} (close numbers {before.accuracy_by_difficulty[1]:.2f} -> "
              f"{after.accuracy_by_difficulty[1]:.2f}) in {gcfg.steps} GRPO steps",
              f"start <= {cfg.max_initial_accuracy:g}, end >= {cfg.min_accuracy:g}",
              "With a verifier as the only reward, no reward model and no critic, GRPO turns a policy that answers "
              "'is a > b?' at chance into one that answers it correctly; the format score must stay below the "
              "full score or being wrong pays as much as being right.",
              kind="outcome", hint="format_score >= score removes the signal; a flipped sign unlearns the task.")
    ctx.scalar("logic accuracy: SFT policy", before.accuracy)
    ctx.scalar("logic accuracy: after GRPO", after.accuracy)
    ctx.scalar("attack strings", len(attacks))
    ctx.progress(1.0)
