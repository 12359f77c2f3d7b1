"""Audit of the rlvf module (day 8): verifiers that turn a completion into a reward without a reward model
(gsm8k-style math, yes/no logic, format), attacked with seeded adversarial strings, the reward's placement
on the last valid token, and a closed loop: GRPO with the verifier as its only reward on the logic task."""
from __future__ import annotations

import torch

from llmaudit.audit import Audit, kernel, measure
from modules.rlvf import rlvf as V

EXACT = "< 1e-6"  # rewards are 0, format_score or score (float32 once in a tensor): more is a wrong verdict
# (completion, ground truth, method) -> "score" | "format" | "zero": verl's gsm8k rule worked by hand
GSM8K_VECTORS = [("#### 72", "72", "strict", "score"), ("#### 1,000", "1000", "strict", "score"),
                 ("#### 72.0", "72", "strict", "format"), ("72", "72", "strict", "zero"),
                 ("so #### 5 then #### 12", "12", "strict", "score"), ("#### 12 #### 5", "12", "strict", "format"),
                 ("the answer is 1,000", "1000", "flexible", "score"), ("#### -3", "-3", "strict", "score"),
                 ("no number here", "7", "flexible", "zero")]
VERL_CLIP_CHARS = 300  # verl's gsm8k scorer reads only the last 300 characters
# distance (characters) from the start of "#### 12" to the end of the completion: visible iff <= 300
WINDOW_DISTANCES = [7, 150, 299, 300, 301, 302, 400]


def _example() -> dict:
    return {"completion": "#### 1,000", "ground_truth": "1000", "method": "strict", "format_score": 0.1, "score": 1.0}


KERNELS = [
    kernel(V.math_answer_reward, example=_example,
           hint="extract the number after the LAST '#### ' in the last 300 characters with a regex, drop commas, "
                "compare as strings; no answer -> 0, right -> score, wrong -> format_score; never eval/int() the "
                "model's text."),
]

rlvf = Audit("rlvf", day=8, title="RL from verifiable rewards: math, logic and format verifiers, attacked and used",
             config=V.RLVFConfig, kernels=KERNELS, formulas=V.FORMULAS)


def _value(kind: str, cfg) -> float:
    return {"score": 1.0, "format": cfg.format_score, "zero": 0.0}[kind]


def _errors(got: list, want: list[float]) -> list[float]:
    """|got - want| per case; a reward that is not a number is an infinite error, NaN stays NaN."""
    return [abs(float(x) - w) if isinstance(x, (int, float)) else float("inf") for x, w in zip(got, want)]


# ---- the math verifier: vectors, purity, range, attacks -------------------------------------------

@rlvf.check(EXACT, hint="re.findall(r'#### (-?[0-9.,]+)', text)[-1].replace(',', ''); 0 when nothing matches.")
def verifier_matches_gsm8k_vectors(math_answer_reward, cfg):
    """A verifier is a parsing rule: take the answer at the agreed place (the last '####'), normalise only
    what you decided to (commas), compare strictly: '#### 1,000' vs 1000 gets 1, '#### 72.0' vs 72 only
    the format score, a reply without the marker 0."""
    got = [math_answer_reward(c, t, method=m, format_score=cfg.format_score, score=1.0) for c, t, m, _ in GSM8K_VECTORS]
    return _errors(got, [_value(w, cfg) for *_, w in GSM8K_VECTORS])


@rlvf.fixture
def completions(cfg, g):
    """Seeded attack strings of 7 kinds, plus honest answers (right and off by one) to the 100 sums."""
    attacks = V.adversarial_completions(cfg.n_adversarial, g)
    honest = [(f"#### {int(t) + d}", t, "answer") for t in V.all_problems("arithmetic").answers for d in (-1, 0, 1)]
    return attacks + honest


@rlvf.check({"changed": "== 0", "outside": "== 0"},
            hint="no global state, no randomness; return exactly 0, format_score or score.")
def verifier_is_deterministic_and_in_range(math_answer_reward, completions, cfg):
    """The reward must be a pure function of (completion, answer): no randomness, no partial credit the
    policy can farm, no state carried between calls."""
    def score(c, t):
        return math_answer_reward(c, t, method=cfg.method, format_score=cfg.format_score, score=1.0)
    first = [score(c, t) for c, t, _ in completions]
    second = [score(c, t) for c, t, _ in completions]
    allowed = (0.0, cfg.format_score, 1.0)
    return measure({"changed": sum(a != b for a, b in zip(first, second)),
                    "outside": sum(not any(x == v for v in allowed) for x in first)},
                   f"{len(completions)} completions scored twice")


@rlvf.check("== 0", hint="use regular expressions and string comparison; never eval(), exec() or int() the text.")
def verifier_never_executes_model_text(math_answer_reward, completions, cfg):
    """Model text is untrusted input: '#### __import__("os").system(...)' must be parsed, never run;
    eval() of an answer is remote code execution."""
    with V.forbid_code_execution() as calls:
        for c, t, _ in completions:
            math_answer_reward(c, t, method=cfg.method, format_score=cfg.format_score, score=1.0)
    return measure(len(calls), f"calls to eval/exec/compile/os.system/subprocess while scoring {len(completions)} "
                               "completions" + (f", first {calls[0]}" if calls else ""))


@rlvf.check({"attacks_paid": "== 0", "right_huge_unpaid": "== 0"},
            hint="only the last '#### <number>' counts; compare strings, not float(); never search the whole text.")
def verifier_resists_adversarial_completions(math_answer_reward, completions, cfg):
    """A gameable verifier gets gamed: if any number in the reply can match, RL learns to list numbers;
    nested '####', code, answers far back or without the marker, a 200+-digit answer wrong in its last
    digit (float() calls them equal) never earn 1, while the right 200+-digit answer does."""
    paid, unpaid, example = 0, 0, ""
    for c, t, kind in completions:
        r = math_answer_reward(c, t, method=cfg.method, format_score=cfg.format_score, score=1.0)
        if kind == "huge number (right)":
            unpaid += not r == 1.0
        elif kind != "answer" and not r < 1.0:
            paid += 1
            example = example or f"; e.g. {kind}: {c[:40]!r}"
    return measure({"attacks_paid": paid, "right_huge_unpaid": unpaid},
                   f"{sum(k != 'answer' for _, _, k in completions)} attacks{example}")


@rlvf.check(EXACT, hint="slice completion[-300:] before searching.")
def answer_beyond_the_last_300_chars_is_invisible(math_answer_reward, cfg):
    """verl scores only the last 300 characters of a completion: '#### 12' starting 300 characters from
    the end is read, 301 is not (a truncation caveat to know when outputs get long)."""
    got, want = [], []
    for d in WINDOW_DISTANCES:
        got.append(math_answer_reward("#### 12" + "x" * (d - 7), "12", method="strict",
                                      format_score=cfg.format_score, score=1.0))
        want.append(1.0 if d <= VERL_CLIP_CHARS else 0.0)
    return measure(_errors(got, want), f"'#### 12' at {WINDOW_DISTANCES} characters from the end")


# ---- the verifier in the pipeline: truncation and placement --------------------------------------

def _responses(texts: list[str], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) of responses that end with EOS and padding, or are cut at T tokens; and the
    response mask (1 up to and including EOS, every token of a cut response)."""
    eos, pad = V.VOCAB.index(V.EOS), V.VOCAB.index(V.PAD)
    ids = torch.full((len(texts), T), pad)
    mask = torch.zeros(len(texts), T)
    for i, text in enumerate(texts):
        row = (V.encode(text) + [eos])[:T]
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1.0
    return ids, mask


@rlvf.check(EXACT, hint="a finished reply gets the verifier's score; a reply cut without EOS is scored 0 before "
                        "the verifier is even called.")
def truncated_responses_score_zero(math_answer_reward, cfg):
    """A reply cut at max length is unfinished: scoring its partial text rewards luck ('#### 12' cut from
    '#### 123' would match 12); verl/DAPO either score it 0 or mask it out. Finished replies get the
    verifier's score."""
    finished, _ = _responses(["#### 12", "#### 13"], T=8)
    cut, _ = _responses(["#### 12", "#### 1234"], T=7)  # 7 tokens of text: no room left for EOS
    got = []
    for ids, truths in ((finished, ["12", "12"]), (cut, ["12", "1234"])):
        rewards, _, _ = V.score_responses("arithmetic", ids, truths, cfg.format_score, reward_fn=math_answer_reward)
        got += rewards.tolist()
    return measure(_errors(got, [1.0, cfg.format_score, 0.0, 0.0]),
                   "'#### 12<eos>' -> 1, '#### 13<eos>' -> format score; '#### 12' and '#### 12|34' cut -> 0")


@rlvf.check(EXACT, hint="the verifier's score goes on the rightmost 1 of the mask, not at mask.sum() (the slot "
                        "after EOS).")
def reward_sits_on_the_last_valid_token(math_answer_reward, cfg, g):
    """The verifier's reward belongs to the last token the policy produced (EOS, or the cut-off token),
    0 elsewhere, so that the token rewards sum to it; TRL's PPO puts it one slot later, on padding,
    which silently drops it."""
    B, T = 64, 10
    texts, truths, want = [], [], []
    for _ in range(B):
        truth = str(int(torch.randint(0, 10 ** int(torch.randint(1, 6, (1,), generator=g)), (1,), generator=g)))
        kind = int(torch.randint(0, 3, (1,), generator=g))  # right, wrong, no marker
        texts.append({0: f"#### {truth}", 1: f"#### {int(truth) + 1}", 2: truth}[kind])
        truths.append(truth)
        cut = len(V.encode(texts[-1])) >= T  # no room for EOS
        want.append(0.0 if cut or kind == 2 else (1.0 if kind == 0 else cfg.format_score))
    ids, mask = _responses(texts, T)
    scores, _, _ = V.score_responses("arithmetic", ids, truths, cfg.format_score, reward_fn=math_answer_reward)
    placed = V.place_outcome_reward(scores, mask)
    expected = torch.zeros(B, T)
    expected[torch.arange(B), mask.sum(-1).long() - 1] = torch.tensor(want)
    return measure((placed - expected).abs().max(), f"{B} responses of lengths {int(mask.sum(-1).min())}.."
                                                    f"{int(mask.sum(-1).max())}, {int((mask.sum(-1) == T).sum())} cut")


# ---- module rules: logic and format verifiers, encoding --------------------------------------------

@rlvf.check(EXACT, hint="compare the stripped completion with 'yes'/'no'; no substring search.")
def logic_verifier_needs_the_exact_word(cfg):
    """A logic verifier that searches for a keyword pays for hedging ('yes no') and for words copied from
    the question ('is 7>2? yes'); demand the exact answer word."""
    fs = cfg.format_score
    cases = [("yes", "yes", 1.0), ("no", "yes", fs), (" yes ", "yes", 1.0), ("yes no", "yes", 0.0), ("y", "yes", 0.0),
             ("yesyes", "yes", 0.0), ("is 7>2? yes", "yes", 0.0), ("no", "no", 1.0), ("", "no", 0.0)]
    return _errors([V.yes_no_reward(c, t, format_score=fs) for c, t, _ in cases], [w for *_, w in cases])


@rlvf.check("== 0", hint="re.fullmatch, not re.search.")
def format_check_accepts_exactly_the_answer_format():
    """A format reward checks the whole completion against the agreed pattern (fullmatch), or extra text
    around a valid answer slips through."""
    cases = [("#### 12", "arithmetic", True), ("#### -3", "arithmetic", True), ("####12", "arithmetic", False),
             ("12", "arithmetic", False), ("#### 12 ", "arithmetic", False), ("x #### 12", "arithmetic", False),
             ("#### 1.5", "arithmetic", False), ("yes", "logic", True), ("yes!", "logic", False)]
    return measure(sum(V.follows_format(c, t) != want for c, t, want in cases), f"wrong of {len(cases)} verdicts")


@rlvf.check("== 0", hint="match the multi-character tokens (<eos>, yes, no) before single characters.")
def encode_decode_round_trip():
    """The verifier reads decoded text: decode(encode(s)) must give s back, or rewards are computed on
    something the policy never wrote."""
    texts = [V.decode(p) for task in V.TASKS for p in V.all_problems(task).prompts]
    texts += ["#### 18<eos><pad>", "yes<eos>", "no<eos><pad>", "#### -3"]
    return measure(sum(V.decode(V.encode(s)) != s for s in texts), f"failures of {len(texts)} prompts and answers")


# ---- the closed loop: GRPO with the verifier as the only reward --------------------------------------

@rlvf.fixture(cost=10)
def closed_loop(cfg, g):
    """GRPO on the logic task from a warmed-up policy, rewarded by yes_no_reward only."""
    return V.run(cfg, g)


@rlvf.check({"end": ">= min_accuracy", "rise": ">= min_rise"}, kind="outcome",
            hint="format_score >= score removes the signal; a flipped sign unlearns the task.")
def grpo_with_verifier_reward_raises_logic_accuracy(closed_loop):
    """With a verifier as the only reward, no reward model and no critic, GRPO lifts a policy that copies a
    demonstrator who guesses on close pairs; the format score must stay below the full score or being
    wrong pays as much as being right."""
    a, b = closed_loop.start, closed_loop.end
    close = f"{a.accuracy_by_difficulty[1]:.2f} -> {b.accuracy_by_difficulty[1]:.2f}"
    return measure({"end": b.accuracy, "rise": b.accuracy - a.accuracy},
                   f"{a.accuracy:.3f} -> {b.accuracy:.3f} (close pairs {close}), {len(closed_loop.history)} GRPO steps")


ACCURACY = "accuracy (fraction of sampled answers)"
CURVES = {
    "reward": dict(label="verifier reward", y_label="reward per answer"),
    "reward_std": dict(label="reward spread within a group", y_label="reward std within a group"),
    "frac_reward_zero_std": dict(label="groups with all-equal rewards", y_label="groups without signal (fraction)"),
    "kl": dict(label=r"KL to the reference ($k_3$)", y_label="KL per token (nats)"),
    "entropy": dict(label="policy entropy", y_label="entropy per token (nats)"),
    "eval/accuracy": dict(label="all logic problems", y_label=ACCURACY, key=True, title="Logic accuracy"),
    "eval/accuracy_hard": dict(label="close pairs (within 2)", y_label=ACCURACY),
}


@rlvf.report
def curves(ctx, closed_loop, completions):
    ctx.series("warmup/loss", [h["loss"] for h in closed_loop.warmup], x_label="warm-up step",
               label="warm-up loss (supervised)", y_label="loss per answer token (nats)")
    for name in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy"):
        ctx.series(name, [h[name] for h in closed_loop.history], x_label="GRPO step", **CURVES[name])
    steps = [e.step for e in closed_loop.evals]
    ctx.series("eval/accuracy", [e.accuracy for e in closed_loop.evals], steps, x_label="GRPO step",
               group="eval/accuracy", **CURVES["eval/accuracy"])
    ctx.series("eval/accuracy_hard", [e.accuracy_by_difficulty[1] for e in closed_loop.evals], steps,
               x_label="GRPO step", group="eval/accuracy", **CURVES["eval/accuracy_hard"])
    ctx.scalar("logic accuracy: SFT policy", closed_loop.start.accuracy)
    ctx.scalar("logic accuracy: after GRPO", closed_loop.end.accuracy)
    ctx.scalar("logic accuracy on close pairs: SFT policy", closed_loop.start.accuracy_by_difficulty[1])
    ctx.scalar("logic accuracy on close pairs: after GRPO", closed_loop.end.accuracy_by_difficulty[1])
    ctx.scalar("attack strings", sum(k != "answer" for _, _, k in completions))
