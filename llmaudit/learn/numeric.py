"""Numeric quiz items: parameters drawn at random per attempt, the answer computed live by the module's
own code (so a quiz answer can never drift from the implementation).

A generator takes a ``random.Random`` and returns a ``Problem``: display values for the question's
{placeholders} and the exact answer. A generator whose module is not built yet raises ``NotBuilt``;
the quiz skips such items with a note.
"""
from __future__ import annotations

import importlib
import math
import random
from dataclasses import dataclass
from typing import Any, Callable


class NotBuilt(LookupError):
    """The module this item needs is not part of this release yet."""


@dataclass(frozen=True)
class Problem:
    params: dict[str, str]  # placeholder -> text shown in the question
    answer: float


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {}


def generator(name: str):
    def register(fn: Callable[[random.Random], Problem]):
        GENERATORS[name] = fn
        return fn
    return register


def _module(name: str) -> Any:
    try:
        return importlib.import_module(f"modules.{name}")
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == f"modules.{name}" or exc.name.startswith(f"modules.{name}.")):
            raise NotBuilt(f"module {name!r} is not built yet") from None
        raise


def _r(rng: random.Random, lo: float, hi: float, digits: int = 1) -> float:
    return round(rng.uniform(lo, hi), digits)


def _vec(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def make(name: str, rng: random.Random) -> Problem:
    if name not in GENERATORS:
        raise KeyError(f"unknown numeric generator {name!r}; known: {', '.join(sorted(GENERATORS))}")
    return GENERATORS[name](rng)


# --- day 1: mdp ----------------------------------------------------------------------------------

@generator("mdp.optimality_backup")
def _mdp_backup(rng: random.Random) -> Problem:
    """Two actions with deterministic successors: (T*V)(s) = max_a [r_a + gamma V(s'_a)]."""
    import torch

    M = _module("mdp")
    r, v, gamma = [_r(rng, -1, 2) for _ in range(2)], [_r(rng, 0, 5) for _ in range(2)], rng.choice([0.5, 0.8, 0.9, 0.99])
    P = torch.zeros(3, 2, 3, dtype=torch.float64)
    P[0, 0, 1] = P[0, 1, 2] = P[1, :, 1] = P[2, :, 2] = 1.0
    R = torch.tensor([r, [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    V = torch.tensor([0.0, v[0], v[1]], dtype=torch.float64)
    ans = M.bellman_optimality_backup(P, R, gamma, V)[0].item()
    return Problem({"r0": f"{r[0]:g}", "r1": f"{r[1]:g}", "v1": f"{v[0]:g}", "v2": f"{v[1]:g}", "gamma": f"{gamma:g}"}, ans)


@generator("mdp.self_loop_value")
def _mdp_self_loop(rng: random.Random) -> Problem:
    """A single state looping to itself with reward r: V = r / (1 - gamma)."""
    import torch

    M = _module("mdp")
    r, gamma = _r(rng, 0.5, 3), rng.choice([0.5, 0.8, 0.9, 0.95])
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    ans = M.evaluate_policy_exact(one, torch.tensor([[r]], dtype=torch.float64), gamma, one[0]).item()
    return Problem({"r": f"{r:g}", "gamma": f"{gamma:g}"}, ans)


# --- day 2: td -----------------------------------------------------------------------------------

def _td_inputs(rng: random.Random):
    import torch

    r, gamma = _r(rng, -1, 2), rng.choice([0.9, 0.95, 0.99])
    q_next = [_r(rng, 0, 5) for _ in range(2)]
    return r, gamma, q_next, torch.tensor([r], dtype=torch.float64), \
        torch.tensor([q_next], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)


@generator("td.q_learning_update")
def _td_q_update(rng: random.Random) -> Problem:
    import torch

    T = _module("td")
    r, gamma, q_next, R, Qn, term = _td_inputs(rng)
    q, alpha = _r(rng, 0, 4), rng.choice([0.1, 0.5])
    target = T.q_learning_target(R, Qn, term, gamma)
    ans = T.td_update(torch.tensor([q], dtype=torch.float64), target, alpha).item()
    return Problem({"r": f"{r:g}", "gamma": f"{gamma:g}", "q_next": _vec(q_next), "q": f"{q:g}", "alpha": f"{alpha:g}"}, ans)


@generator("td.sarsa_target")
def _td_sarsa(rng: random.Random) -> Problem:
    import torch

    T = _module("td")
    r, gamma, q_next, R, Qn, term = _td_inputs(rng)
    a = rng.randrange(2)
    ans = T.sarsa_target(R, Qn, torch.tensor([a]), term, gamma).item()
    return Problem({"r": f"{r:g}", "gamma": f"{gamma:g}", "q_next": _vec(q_next), "a_next": str(a)}, ans)


@generator("td.expected_sarsa_target")
def _td_expected_sarsa(rng: random.Random) -> Problem:
    T = _module("td")
    r, gamma, q_next, R, Qn, term = _td_inputs(rng)
    eps = rng.choice([0.1, 0.2, 0.5])
    ans = T.expected_sarsa_target(R, Qn, T.epsilon_greedy_probs(Qn, eps), term, gamma).item()
    return Problem({"r": f"{r:g}", "gamma": f"{gamma:g}", "q_next": _vec(q_next), "epsilon": f"{eps:g}"}, ans)


# --- day 3: advantage ----------------------------------------------------------------------------

@generator("advantage.discounted_return")
def _adv_return(rng: random.Random) -> Problem:
    import torch

    A = _module("advantage")
    rewards, gamma = [float(rng.randint(0, 3)) for _ in range(3)], rng.choice([0.5, 0.9])
    ans = A.discounted_returns(torch.tensor([rewards], dtype=torch.float64), gamma)[0, 0].item()
    return Problem({"rewards": _vec(rewards), "gamma": f"{gamma:g}"}, ans)


@generator("advantage.from_q")
def _adv_from_q(rng: random.Random) -> Problem:
    import torch

    A = _module("advantage")
    q = [_r(rng, 0, 4) for _ in range(3)]
    p0 = rng.choice([0.2, 0.5, 0.6])
    probs = [p0, round((1 - p0) / 2, 3), round(1 - p0 - round((1 - p0) / 2, 3), 3)]
    ans = A.advantage_from_q(torch.tensor([q], dtype=torch.float64), torch.tensor([probs], dtype=torch.float64))[0, 0].item()
    return Problem({"q": _vec(q), "pi": _vec(probs)}, ans)


# --- day 4: gae ----------------------------------------------------------------------------------

@generator("gae.first_advantage")
def _gae_first(rng: random.Random) -> Problem:
    import torch

    G = _module("gae")
    rewards = [float(rng.randint(0, 1)) for _ in range(3)]
    values = [_r(rng, 0, 1) for _ in range(3)]
    gamma, lam = rng.choice([0.9, 0.99]), rng.choice([0.0, 0.5, 0.95, 1.0])
    col = lambda xs: torch.tensor(xs, dtype=torch.float64)[:, None]  # noqa: E731  (T, 1)
    adv, _ = G.compute_gae(col(rewards), col(values), col(values[1:] + [0.0]), col([0.0, 0.0, 1.0]),
                           col([0.0, 0.0, 0.0]), gamma, lam)
    return Problem({"rewards": _vec(rewards), "values": _vec(values), "gamma": f"{gamma:g}", "lam": f"{lam:g}"},
                   adv[0, 0].item())


# --- modules of later days: computed by their code once built -------------------------------------

@generator("ppo.clipped_objective")
def _ppo_clip(rng: random.Random) -> Problem:
    P = _module("ppo")
    ratio, adv, eps = _r(rng, 0.5, 1.6, 2), _r(rng, -2, 2), rng.choice([0.1, 0.2])
    return Problem({"ratio": f"{ratio:g}", "adv": f"{adv:g}", "eps": f"{eps:g}"},
                   P.clipped_surrogate(ratio, adv, eps))


@generator("cql.penalty")
def _cql_penalty(rng: random.Random) -> Problem:
    import torch

    C = _module("cql")
    q = [_r(rng, -2, 3) for _ in range(3)]
    a = rng.randrange(3)
    qt = torch.tensor([q], dtype=torch.float64)
    data_q = qt[:, a]
    ans = C.cql_loss(qt, torch.tensor([a]), data_q, 1.0).item()  # y = Q(s, a_D): the penalty alone
    return Problem({"q": _vec(q), "a": str(a)}, ans)


@generator("bcq.action")
def _bcq_action(rng: random.Random) -> Problem:
    import torch

    B = _module("bcq")
    first = rng.randint(1, 8)
    second = rng.randint(1, 9 - first)
    probs = [w / 10 for w in (first, second, 10 - first - second)]  # one decimal each, shown exactly
    q = [_r(rng, -2, 4) for _ in range(3)]
    tau = rng.choice([0.3, 0.45])  # no ratio of weights <= 8 equals these: no ties at the strict >
    logits = torch.tensor([probs], dtype=torch.float64).log()
    ans = B.bcq_filter_actions(torch.tensor([q], dtype=torch.float64), logits, tau).item()
    return Problem({"pi": _vec(probs), "q": _vec(q), "tau": f"{tau:g}"}, float(ans))


@generator("dpo.loss")
def _dpo_loss(rng: random.Random) -> Problem:
    D = _module("dpo")
    beta, chosen, rejected = rng.choice([0.1, 0.5]), _r(rng, -2, 2), _r(rng, -2, 2)
    return Problem({"beta": f"{beta:g}", "chosen": f"{chosen:g}", "rejected": f"{rejected:g}"},
                   D.dpo_loss_from_logratios(chosen, rejected, beta))


@generator("grpo.advantage")
def _grpo_adv(rng: random.Random) -> Problem:
    G = _module("grpo")
    rewards = [float(rng.randint(0, 1)) for _ in range(4)]
    if len(set(rewards)) == 1:
        rewards[0] = 1.0 - rewards[0]
    return Problem({"rewards": _vec(rewards)}, G.group_advantages(rewards)[0])


@generator("lora.trainable_params")
def _lora_params(rng: random.Random) -> Problem:
    L = _module("lora")
    d_in, d_out, r = rng.choice([512, 1024, 4096]), rng.choice([512, 1024, 4096]), rng.choice([4, 8, 16])
    return Problem({"d_in": str(d_in), "d_out": str(d_out), "r": str(r)}, float(L.lora_param_count(d_in, d_out, r)))


@generator("inference.kv_cache_bytes")
def _kv_bytes(rng: random.Random) -> Problem:
    I = _module("inference")  # noqa: E741
    layers, kv_heads, head_dim = rng.choice([16, 32]), rng.choice([1, 8, 32]), 128
    seq, batch, nbytes = rng.choice([1024, 4096]), rng.choice([1, 8]), 2
    p = {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "seq": seq, "batch": batch, "bytes": nbytes}
    return Problem({k: str(v) for k, v in p.items()}, float(I.kv_cache_bytes(**p)))


@generator("inference.speculative_speedup")
def _spec_speedup(rng: random.Random) -> Problem:
    I = _module("inference")  # noqa: E741
    alpha, gamma, c = rng.choice([0.6, 0.7, 0.8, 0.9]), rng.choice([2, 3, 4, 5]), rng.choice([0.05, 0.1, 0.2])
    return Problem({"alpha": str(alpha), "gamma": str(gamma), "c": str(c)}, I.predicted_speedup(alpha, gamma, c))


@generator("megatron.pipeline_bubble")
def _bubble(rng: random.Random) -> Problem:
    Mg = _module("megatron")
    p, m = rng.choice([2, 4, 8]), rng.choice([4, 8, 16, 32])
    return Problem({"p": str(p), "m": str(m)}, Mg.bubble_fraction(p, m))


def close_enough(given: float, answer: float, tolerance: float) -> bool:
    return math.isfinite(given) and abs(given - answer) <= tolerance
