"""RLVF: rewards from programs that check the answer (verifiers), not from a learned reward model.

    math (gsm8k style)  answer = the last "#### <number>" of the completion (commas removed)
                        r = 0 if no answer, score if answer == ground truth (as strings), else format_score
    logic (yes / no)    r = score if the completion is exactly "yes"/"no" and right, format_score if
                        exactly "yes"/"no" and wrong, 0 otherwise (no keyword search)
    placement           r_t = r [t = last valid response token],  so  sum_t r_t = r

The toy tasks have verifiable answers and a char-level vocabulary (digits, + - = # > ?, space, the words
yes/no, <pad> <bos> <eos>): "<bos>3+8=" -> "#### 11<eos>" and "<bos>7>2?" -> "yes<eos>". Every prompt
has a difficulty level (a carry, or two close numbers) used to show that raw rewards depend on it.
The noisy demonstrator that the supervised warm-up imitates is right with a probability set per level.

Builds on: nothing but torch for the verifiers; the closed loop (``run``) is modules.grpo's, which in turn
builds on this module's tasks, so it is imported inside ``run``.
Deviations from verl's gsm8k scorer: both extraction modes remove commas; a response cut at the length
limit (no EOS) scores 0 instead of being scored on its truncated text. Verifiers read strings with
regular expressions only: nothing a model writes is ever evaluated or executed.
"""
from __future__ import annotations

import builtins
import contextlib
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Iterator, Literal, NamedTuple

import torch

__all__ = [
    "FORMULAS", "RLVFConfig", "TASKS", "VOCAB", "PAD", "BOS", "EOS", "SOLUTION_CLIP_CHARS", "ANSWER_FORMATS",
    "encode", "decode", "decode_response",
    "extract_answer", "math_answer_reward", "yes_no_reward", "follows_format",
    "place_outcome_reward", "forbid_code_execution", "adversarial_completions",
    "Problems", "make_problems", "all_problems", "demonstrations", "score_responses",
    "grpo_config", "RLVFResult", "run",
]

FORMULAS = [
    ("Outcome reward", r"$r(x,y)=\mathbb{1}[\mathrm{extract}(y)=y^*]+f\,\mathbb{1}[\mathrm{extract}(y)\neq y^*]$"),
    ("Reward placement", r"$r_t=r(x,y)\,\mathbb{1}[t=t_{last}],\quad \sum_t r_t=r(x,y)$"),
    ("Objective", r"$\max_\pi\ \mathbb{E}_{y\sim\pi}[r(x,y)]-\beta\,D_{KL}(\pi\|\pi_{ref})$"),
]

TASKS = ("arithmetic", "logic")


@dataclass(frozen=True)
class RLVFConfig:
    """What the rlvf audit runs: the verifiers' settings, the attack set, and a short GRPO run on the
    logic task (modules.grpo, with this module's verifier as the only reward)."""

    method: Literal["strict", "flexible"] = "strict"  # math answer extraction
    format_score: float = 0.1  # reward of a well-formed wrong answer (must stay below the full score)
    n_adversarial: int = 140  # seeded attack strings against the math verifier
    demo_correct_easy: float = 0.8  # logic demonstrator: P(right) when the numbers are far apart
    demo_correct_hard: float = 0.5  # ... within 2 of each other: a coin flip (else the opposite answer)
    warmup_steps: int = 400  # supervised steps that make the initial (and reference) policy
    warmup_lr: float = 3e-3  # 1e-2 leaves some seeds on a plateau near 0.5 (no comparison learned)
    steps: int = 20  # GRPO steps on the logic task (it mostly sharpens the policy: 30 reach no higher)
    lr: float = 2e-3
    # outcome bars, from `llmaudit sweep rlvf` (toy seeds 0-19: end 0.829-0.981, rise 0.200-0.329; full
    # seeds 0-4: end 0.909-0.993, rise 0.280-0.339), each >= 10 % below the worst seed; with lr = 0 the
    # 'rise' is -0.024-0.040 (toy seeds 0-19): sampling noise
    min_accuracy: float = 0.72  # sampled accuracy after GRPO (full 0.8)
    min_rise: float = 0.17  # sampled accuracy after GRPO minus before (full 0.25)

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "format_score": "[0, 1]", "n_adversarial": ">= 7", "demo_correct_easy": "[0, 1]",
        "demo_correct_hard": "[0, 1]", "warmup_steps": ">= 1", "warmup_lr": ">= 0", "steps": ">= 1", "lr": ">= 0",
        "min_accuracy": "[0, 1]", "min_rise": "[-1, 1]",
    }

    def __post_init__(self):
        if self.method not in ("strict", "flexible"):
            raise ValueError(f"method must be strict or flexible, got {self.method!r}")
        if self.n_adversarial < 7 or self.steps < 1:
            raise ValueError("n_adversarial must be >= 7 (one of each kind) and steps >= 1")

    @classmethod
    def toy(cls) -> RLVFConfig:
        return cls()

    @classmethod
    def full(cls) -> RLVFConfig:
        return cls(n_adversarial=700, warmup_steps=600, steps=100, min_accuracy=0.8, min_rise=0.25)

# ---------------------------------------------------------------------------------------------------
# The vocabulary: one token per character, plus the words yes/no and three specials

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
VOCAB = (PAD, BOS, EOS) + tuple("0123456789+-=#> ?") + ("yes", "no")
_ID = {tok: i for i, tok in enumerate(VOCAB)}
_MULTI = sorted((t for t in VOCAB if len(t) > 1), key=len, reverse=True)  # matched before single chars


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (greedy: specials and yes/no first, then single characters). Raises
    ValueError on a character outside the vocabulary."""
    ids, i = [], 0
    while i < len(text):
        word = next((w for w in _MULTI if text.startswith(w, i)), None)
        if word is None and text[i] not in _ID:
            raise ValueError(f"character {text[i]!r} is not in the vocabulary")
        word = word or text[i]
        ids.append(_ID[word])
        i += len(word)
    return ids


def decode(ids: list[int] | torch.Tensor) -> str:
    """The text of token ids, specials written out (<bos>, <eos>, <pad>)."""
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    return "".join(VOCAB[i] for i in ids)


def decode_response(ids: list[int] | torch.Tensor) -> tuple[str, bool]:
    """(text before the first EOS, whether an EOS was emitted). A response without EOS was cut at the
    length limit: its text is incomplete."""
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    eos = _ID[EOS]
    ended = eos in ids
    body = ids[: ids.index(eos)] if ended else ids
    return "".join(VOCAB[i] for i in body if i != _ID[PAD]), ended


# ---------------------------------------------------------------------------------------------------
# Verifiers: pure functions of strings

SOLUTION_CLIP_CHARS = 300  # verl reads only the tail of a long completion
_STRICT = re.compile(r"#### (-?[0-9.,]+)")
_NUMBER = re.compile(r"(-?[0-9.,]+)")
ANSWER_FORMATS = {"arithmetic": re.compile(r"#### -?[0-9]+"), "logic": re.compile(r"yes|no")}


def extract_answer(completion: str, method: Literal["strict", "flexible"] = "strict") -> str | None:
    """The final answer of a gsm8k-style completion, or None.

    Only the last SOLUTION_CLIP_CHARS characters are read (an answer further back is invisible).
    strict: the number after the LAST "#### "; flexible: the last number anywhere. Commas and "$" are
    removed ("1,000" -> "1000"); nothing else is normalised ("72.0" stays "72.0")."""
    tail = completion[-SOLUTION_CLIP_CHARS:]
    if method == "strict":
        found = _STRICT.findall(tail)
    elif method == "flexible":
        found = [s for s in _NUMBER.findall(tail) if s.replace(",", "") not in ("", ".")]
    else:
        raise ValueError(f"unknown extraction method {method!r}; known: strict, flexible")
    if not found:
        return None
    return found[-1].replace(",", "").replace("$", "")


def math_answer_reward(completion: str, ground_truth: str, method: str = "strict",
                       format_score: float = 0.0, score: float = 1.0) -> float:
    """Outcome reward of one math completion against its ground-truth answer (verl's gsm8k rule).

    completion: the decoded response text (no prompt, no specials); ground_truth: the answer as a
    string, e.g. "1000". Only the last SOLUTION_CLIP_CHARS = 300 characters are read (verl's clip: an
    answer further back is invisible). method "strict": the answer is the number after the LAST "#### "
    in them; "flexible": the last number anywhere in them. Remove commas from the extracted answer.
        no answer found                          -> 0.0
        answer == ground_truth (string equality) -> score
        otherwise (well-formed but wrong)        -> format_score
    Returns a float in {0, format_score, score}; pure and deterministic. Examples: "#### 72" vs "72"
    -> 1.0; "#### 1,000" vs "1000" -> 1.0; "#### 72.0" vs "72" -> format_score; "72" (strict) -> 0.0.
    Never eval() the text, and compare strings (int() of a 5000-digit string raises in Python 3.11+).
    """
    answer = extract_answer(completion, method)  # type: ignore[arg-type]
    if answer is None:
        return 0.0
    return score if answer == ground_truth else format_score


def yes_no_reward(completion: str, ground_truth: str, format_score: float = 0.0, score: float = 1.0) -> float:
    """Logic-task reward: the completion must be EXACTLY "yes" or "no" (surrounding spaces ignored).
    Right -> score; the other word -> format_score; anything else ("yes no", "y", "yes!") -> 0. No
    keyword search: a reply that merely contains the right word earns nothing."""
    answer = completion.strip()
    if answer not in ("yes", "no"):
        return 0.0
    return score if answer == ground_truth else format_score


def follows_format(completion: str, task: str) -> bool:
    """Whether the whole completion has the task's answer format ("#### <int>" or "yes"/"no")."""
    return ANSWER_FORMATS[task].fullmatch(completion) is not None


def place_outcome_reward(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence rewards -> (B, T) token rewards: the score on the last valid token (the EOS, or
    the last token of a cut response), 0 elsewhere, so that the row sums are the scores. Rows need at
    least one valid token."""
    T = response_mask.shape[-1]
    last = (response_mask.bool().long() * torch.arange(T)).argmax(-1)  # (B,) index of the rightmost 1
    rewards = torch.zeros(response_mask.shape, dtype=scores.dtype)
    rewards[torch.arange(len(scores)), last] = scores
    return rewards


@contextlib.contextmanager
def forbid_code_execution() -> Iterator[list[str]]:
    """Within the block, eval/exec/compile, os.system, os.popen and subprocess.Popen are replaced by
    trip-wires that run nothing and record their name in the yielded list (restored afterwards)."""
    calls: list[str] = []

    def tripwire(name: str):
        def record(*args, **kwargs):
            calls.append(name)
            return 0
        return record

    targets = [(builtins, "eval"), (builtins, "exec"), (builtins, "compile"), (os, "system"),
               (os, "popen"), (subprocess, "Popen")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in targets]
    try:
        for obj, name in targets:
            setattr(obj, name, tripwire(f"{getattr(obj, '__name__', obj)}.{name}"))
        yield calls
    finally:
        for obj, name, original in saved:
            setattr(obj, name, original)


def adversarial_completions(n: int, generator: torch.Generator) -> list[tuple[str, str, str]]:
    """``n`` seeded (completion, ground_truth, kind) attacks on a math verifier: random text, numbers
    listed everywhere, nested/unfinished "####", huge numbers (float() would call them equal), code
    injection, answers hidden far back."""
    alphabet = list("0123456789#,.- abcxyz$()'_\n")
    code = ["__import__('os').system('echo pwned')", "eval('1+1')", "exec('import os')",
            "#### __import__('os').system('rm -rf /')", "#### 2+2", "#### {}.__class__"]
    out = []
    for i in range(n):
        kind = i % 7
        gt = str(int(torch.randint(0, 10 ** 6, (1,), generator=generator)))
        if kind == 0:  # random text
            idx = torch.randint(0, len(alphabet), (int(torch.randint(0, 80, (1,), generator=generator)),),
                                generator=generator)
            out.append(("".join(alphabet[j] for j in idx.tolist()), gt, "random text"))
        elif kind == 1:  # every number listed, the right one included, without the answer marker
            out.append((" ".join(str(k) for k in range(int(gt) - 3, int(gt) + 4)), gt, "numbers listed"))
        elif kind == 2:  # nested and unfinished markers around a wrong final answer
            out.append((f"#### #### {gt} ####### {int(gt) + 1} ####", gt, "nested ####"))
        elif kind == 3:  # a huge number that still fits in the 300 characters read: right, or off in the last digit
            big = "9" * (200 + int(torch.randint(0, 80, (1,), generator=generator)))
            right = i % 2 == 1
            kind_name = f"huge number ({'right' if right else 'wrong'})"
            out.append((f"#### {big}", big if right else big[:-1] + "8", kind_name))
        elif kind == 4:  # code injection
            out.append((code[i % len(code)], gt, "code"))
        elif kind == 5:  # the right answer far back, a wrong one at the end
            out.append((f"#### {gt}" + " x" * 200 + f" #### {int(gt) + 1}", gt, "answer far back"))
        else:  # the right number only in the prompt-like preamble, no marker
            out.append((f"{gt} = {gt}, so the answer is {gt}", gt, "no marker"))
    return out


# ---------------------------------------------------------------------------------------------------
# The toy tasks with verifiable answers


class Problems(NamedTuple):
    prompts: torch.Tensor  # (n, 5) long: "<bos>a+b=" or "<bos>a>b?"
    answers: list[str]  # the ground truth: "11", "yes"
    difficulty: torch.Tensor  # (n,) long: 0 easy, 1 hard (a carry; two numbers within 2 of each other)


def _problems(task: str, a: torch.Tensor, b: torch.Tensor) -> Problems:
    n = a.shape[0]
    digits = torch.tensor([_ID[str(d)] for d in range(10)])
    op, end = ("+", "=") if task == "arithmetic" else (">", "?")
    prompts = torch.stack([torch.full((n,), _ID[BOS]), digits[a], torch.full((n,), _ID[op]), digits[b],
                           torch.full((n,), _ID[end])], dim=1)
    if task == "arithmetic":
        answers = [str(s) for s in (a + b).tolist()]
        difficulty = (a + b >= 10).long()
    elif task == "logic":
        answers = ["yes" if x else "no" for x in (a > b).tolist()]
        difficulty = ((a - b).abs() <= 2).long()
    else:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    return Problems(prompts, answers, difficulty)


def make_problems(task: str, n: int, generator: torch.Generator) -> Problems:
    """``n`` random problems with single-digit operands a, b."""
    a = torch.randint(0, 10, (n,), generator=generator)
    b = torch.randint(0, 10, (n,), generator=generator)
    return _problems(task, a, b)


def all_problems(task: str) -> Problems:
    """The 100 problems of the task (every pair of digits), for exact accuracy measurements."""
    a, b = torch.arange(10).repeat_interleave(10), torch.arange(10).repeat(10)
    return _problems(task, a, b)


def demonstrations(task: str, problems: Problems, correct_prob: tuple[float, float],
                   generator: torch.Generator) -> list[str]:
    """A noisy demonstrator's answers (what the supervised warm-up imitates). It is right with
    probability correct_prob[difficulty]; otherwise it makes the level's typical mistake: on an easy
    sum it forgets the "#### " marker (a format error: the strict verifier scores it 0), on a carry
    problem it forgets the carry (3+8 -> "#### 1"), on a logic problem it says the opposite."""
    p = torch.tensor(correct_prob)[problems.difficulty]
    right = (torch.rand(len(problems.answers), generator=generator) < p).tolist()
    out = []
    for truth, ok, hard in zip(problems.answers, right, problems.difficulty.tolist()):
        if ok:
            out.append(truth if task == "logic" else f"#### {truth}")
        elif task == "logic":
            out.append("no" if truth == "yes" else "yes")
        else:
            out.append(f"#### {int(truth) - 10}" if hard else truth)
    return out


def score_responses(task: str, responses: torch.Tensor, answers: list[str], format_score: float = 0.0,
                    reward_fn=None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Score sampled responses (B, T) (token ids after the prompt) with the task's verifier.

    Returns (rewards (B,) float, ended (B,) bool, texts). A response without EOS (cut at the length
    limit) scores 0 whatever its text. ``reward_fn(completion, ground_truth, format_score=...)``
    replaces the default verifier (math_answer_reward or yes_no_reward)."""
    fn = reward_fn or (math_answer_reward if task == "arithmetic" else yes_no_reward)
    rewards, ended, texts = [], [], []
    for row, truth in zip(responses.tolist(), answers):
        text, done = decode_response(row)
        rewards.append(float(fn(text, truth, format_score=format_score)) if done else 0.0)
        ended.append(done)
        texts.append(text)
    return torch.tensor(rewards), torch.tensor(ended), texts



# ---------------------------------------------------------------------------------------------------
# The closed loop: GRPO on the logic task with a verifier as the only reward


def grpo_config(cfg: RLVFConfig):
    """The GRPO run of the closed loop: the logic task (answers "yes<eos>" / "no<eos>", 2 tokens)."""
    from modules.grpo import grpo as G  # modules.grpo builds on this module's tasks: imported here, not above

    return G.GRPOConfig(task="logic", max_new_tokens=2, format_score=cfg.format_score,
                        demo_correct_easy=cfg.demo_correct_easy, demo_correct_hard=cfg.demo_correct_hard,
                        warmup_steps=cfg.warmup_steps, warmup_lr=cfg.warmup_lr, steps=cfg.steps, lr=cfg.lr,
                        eval_every=max(1, cfg.steps // 2))


@dataclass
class RLVFResult:
    """The closed loop's outcome: the warm-up and GRPO histories and the logic-accuracy evaluations
    (modules.grpo.Evaluation; the first is the SFT policy, before any update)."""

    warmup: list[dict]
    history: list[dict]
    evals: list

    @property
    def start(self):
        return self.evals[0]

    @property
    def end(self):
        return self.evals[-1]


def run(cfg: RLVFConfig, generator: torch.Generator, *, reward_fn=yes_no_reward, on_step=None) -> RLVFResult:
    """Warm up a tiny Llama on the fallible logic demonstrator, then GRPO with ``reward_fn`` (a
    verifier) as the only reward: no reward model, no critic. Model init draws from the global RNG."""
    from modules.grpo import grpo as G

    result = G.run(grpo_config(cfg), generator, reward_fn=reward_fn, on_step=on_step)
    return RLVFResult(result.warmup, result.history, result.evals)
