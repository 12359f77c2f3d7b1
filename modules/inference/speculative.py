"""Speculative decoding: a small draft model proposes gamma tokens, the target scores them in one pass.

    accept draft token x_i          with probability  min(1, p_i(x_i) / q_i(x_i))      (stop at the first rejection)
    after a rejection at i sample   x ~ norm(max(0, p_i - q_i))
    after gamma acceptances sample  x ~ p_gamma                                           (the bonus token)
    E[tokens per target call]     = (1 - alpha^(gamma + 1)) / (1 - alpha),  alpha = E[sum_x min(p, q)]

Every emitted token is distributed exactly as the target's p (Leviathan et al. 2023, Chen et al.
2023): P(x) = min(q(x), p(x)) + (1 - sum min(p, q)) * max(0, p(x) - q(x)) / sum max(0, p - q) = p(x).
Under greedy decoding p and q are one-hot, so the output equals the target's greedy output token for token.

Builds on: modules.transformer. Two implementations of the same round: speculative_generate, batched,
recomputes the whole prefix each call (simple to check: the audit counts its target calls), and
speculative_generate_cached, one sequence with a KV cache per model that is rewound past the rejected
drafts (what a server runs, and what speedup.py times). The audit's drafts are the target's first
layers (a layer-skipping draft, as self-speculative decoding uses) or a separately trained small model.
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch

from modules.transformer import KVCache, ModelConfig, Transformer

__all__ = ["speculative_accept", "expected_tokens_per_call", "layer_skip_draft", "token_probs",
           "speculative_generate", "rewind_cache", "speculative_generate_cached",
           "target_continuation_distribution", "exact_speculative_distribution", "chi_square_test"]


def speculative_accept(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                       uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept/reject step of one speculative round, for B sequences at once.

    target_probs (B, gamma + 1, V): the target's p at the gamma drafted positions and one past them;
    draft_probs (B, gamma, V): the draft's q that drew draft_tokens (B, gamma); uniforms (B, gamma) in
    [0, 1). Draft token i is accepted iff u_i < p_i(x_i) / q_i(x_i) -- probability min(1, p/q) -- and
    the first rejection ends the round. Returns (n_accepted (B,) int64 in 0..gamma, next_probs (B, V)):
    the distribution of the one token sampled after the accepted ones,
        next_probs = max(0, p_n - q_n) / sum_x max(0, p_n(x) - q_n(x))   if position n < gamma was rejected
        next_probs = p_gamma                                             if all gamma were accepted.
    """
    B, gamma, V = draft_probs.shape
    p_x = target_probs[:, :gamma].gather(-1, draft_tokens[..., None]).squeeze(-1)  # (B, gamma)
    q_x = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)
    accepted = uniforms * q_x < p_x  # u < p/q without dividing (q_x > 0: x was drawn from q)
    n_accepted = accepted.long().cumprod(dim=1).sum(dim=1)  # accepted before the first rejection
    residual = torch.cat([(target_probs[:, :gamma] - draft_probs).clamp_min(0), target_probs[:, gamma:]], dim=1)
    next_probs = residual[torch.arange(B), n_accepted]  # (B, V)
    return n_accepted, next_probs / next_probs.sum(-1, keepdim=True)


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """(1 - alpha^(gamma+1)) / (1 - alpha): accepted drafts plus the one sampled token, per target call,
    when each draft token is accepted independently with probability alpha (gamma + 1 at alpha = 1)."""
    return float(gamma + 1) if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def layer_skip_draft(target: Transformer, n_layers: int) -> Transformer:
    """A smaller draft: the target's embedding, first n_layers blocks, final norm and lm_head."""
    cfg = target.cfg
    draft = Transformer(ModelConfig(**{**cfg.__dict__, "n_layers": n_layers}))
    draft.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers})
    return draft.eval()


def token_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T); T = 0 is greedy: one-hot on the argmax."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return (logits / temperature).softmax(-1)


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def speculative_generate(target: Transformer, draft: Transformer, prompt: torch.Tensor, n_new: int, gamma: int, *,
                         temperature: float = 1.0, generator: torch.Generator | None = None,
                         accept_fn: Callable = speculative_accept) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend prompt (B, P) by n_new tokens with rounds of gamma drafts + one target pass each.
    Returns (tokens (B, P + n_new), n_accepted of every (sequence, round) pair (R,))."""
    B, P = prompt.shape
    buf = torch.zeros(B, P + n_new + gamma + 1, dtype=torch.long)  # right-padded: causal, so padding is never read
    buf[:, :P] = prompt
    lengths, rounds = torch.full((B,), P), []
    while bool((lengths < P + n_new).any()):
        rows = (lengths < P + n_new).nonzero().squeeze(1)
        seq, lens = buf[rows], lengths[rows]
        r, L = torch.arange(len(rows)), int(lens.max())
        q, drafted = [], []
        for i in range(gamma):  # the draft proposes gamma tokens, one pass each
            q.append(token_probs(draft(seq[:, :L + i])[r, lens + i - 1].double(), temperature))
            drafted.append(_sample(q[-1], generator))
            seq[r, lens + i] = drafted[-1]
        positions = lens[:, None] - 1 + torch.arange(gamma + 1)  # (b, gamma + 1): the target scores them all at once
        p = token_probs(target(seq[:, :L + gamma])[r[:, None], positions].double(), temperature)
        u = torch.rand(len(rows), gamma, generator=generator, dtype=torch.float64)
        n, next_probs = accept_fn(p, torch.stack(q, 1), torch.stack(drafted, 1), u)
        seq[r, lens + n] = _sample(next_probs, generator) if temperature else next_probs.argmax(-1)
        buf[rows], lengths[rows] = seq, lens + n + 1
        rounds.append(n)
    return buf[:, :P + n_new], torch.cat(rounds)


def rewind_cache(cache: KVCache, length: int) -> None:
    """Forget every token from position ``length`` on: the next forward writes there. (The slots are
    not cleared; attention reads only the first ``cache.length`` of them.)"""
    cache.length = length


def _next_token(probs: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    return _sample(probs, generator) if temperature else probs.argmax(-1)


@torch.inference_mode()
def speculative_generate_cached(target: Transformer, draft: Transformer, prompt: torch.Tensor, n_new: int,
                                gamma: int, *, temperature: float = 1.0, generator: torch.Generator | None = None,
                                accept_fn: Callable = speculative_accept) -> tuple[torch.Tensor, torch.Tensor]:
    """speculative_generate for one sequence (P,) with a KV cache per model, as a server decodes:

        draft:  gamma one-token calls on its cache (the first also reads the token(s) it has not seen yet)
        target: one call on [last emitted token, gamma drafts] -> p at the gamma + 1 positions
        accept: n drafts and one more token; both caches are rewound to drop the rejected drafts

    so a round costs gamma draft calls and ONE target call, whatever n is. Returns (tokens (P + n_new,),
    n_accepted of every round (R,))."""
    P = prompt.shape[-1]
    prompt = prompt.view(1, P)
    capacity = P + n_new + gamma + 1
    caches = {m: KVCache(m.cfg, 1, capacity, dtype=m.lm_head.weight.dtype) for m in (target, draft)}
    for m in (target, draft):  # prefill all but the last prompt token: each round starts by reading it
        if P > 1:
            m(prompt[:, :-1], caches[m])
    out, rounds = [prompt[0]], []
    unread_target = unread_draft = prompt[:, -1:]  # tokens emitted but not yet in that model's cache
    while sum(len(t) for t in out) < P + n_new:
        start = caches[target].length
        q, drafted = [], []
        logits = draft(unread_draft, caches[draft])[:, -1]
        for i in range(gamma):
            q.append(token_probs(logits.double(), temperature))
            drafted.append(_next_token(q[-1], temperature, generator))
            if i < gamma - 1:  # the last draft is only read next round, if it is accepted
                logits = draft(drafted[-1][:, None], caches[draft])[:, -1]
        x = torch.stack(drafted, 1)  # (1, gamma)
        p = token_probs(target(torch.cat([unread_target, x], 1), caches[target]).double(), temperature)
        u = torch.rand(1, gamma, generator=generator, dtype=torch.float64) if temperature else \
            torch.zeros(1, gamma, dtype=torch.float64)  # greedy: one-hot p and q decide alone
        n, next_probs = accept_fn(p, torch.stack(q, 1), x, u)
        k, token = int(n[0]), _next_token(next_probs, temperature, generator)
        out += [x[0, :k], token]
        rounds.append(k)
        rewind_cache(caches[target], start + 1 + k)  # the unread token and the k accepted drafts stay
        rewind_cache(caches[draft], start + min(1 + k, gamma))  # the draft never read its last draft
        unread_draft = torch.cat([x[:, gamma - 1:], token[:, None]], 1) if k == gamma else token[:, None]
        unread_target = token[:, None]
    return torch.cat(out)[:P + n_new], torch.tensor(rounds)


@torch.inference_mode()
def target_continuation_distribution(model: Transformer, prompt: torch.Tensor, m: int) -> torch.Tensor:
    """Exact probabilities of all V^m continuations of prompt (P,) at temperature 1, in
    itertools.product order: one pass over every continuation, product of the next-token probabilities."""
    V = model.cfg.vocab_size
    conts = torch.tensor(list(itertools.product(range(V), repeat=m)))  # (V^m, m)
    seqs = torch.cat([prompt.expand(len(conts), -1), conts], dim=1)
    logp = model(seqs[:, :-1]).double().log_softmax(-1)[:, len(prompt) - 1:]  # (V^m, m, V)
    return logp.gather(-1, conts[..., None]).squeeze(-1).sum(-1).exp()


def exact_speculative_distribution(p_of: Callable, q_of: Callable, V: int, gamma: int, m: int,
                                   accept_fn: Callable = speculative_accept) -> dict[tuple, float]:
    """The exact distribution of the first m tokens that speculative decoding emits, by enumeration:
    p_of(prefix), q_of(prefix) give the target's and draft's next-token probabilities (V,) float64.
    Every draft path and every first-rejection position k is weighted by its probability
    (prod q along the path, then prod_{i<k} min(1, p/q) * (1 - min(1, p/q)_k)); accept_fn is called with
    uniforms that force that outcome, and its n_accepted and next_probs decide what is emitted."""
    out: dict[tuple, float] = {}

    def visit(prefix: tuple, weight: float) -> None:
        if len(prefix) >= m:
            out[prefix[:m]] = out.get(prefix[:m], 0.0) + weight
            return
        for path in itertools.product(range(V), repeat=gamma):
            q = torch.stack([q_of(prefix + path[:i]) for i in range(gamma)])  # (gamma, V)
            p = torch.stack([p_of(prefix + path[:i]) for i in range(gamma + 1)])  # (gamma + 1, V)
            x = torch.tensor(path)
            w_path = q[torch.arange(gamma), x].prod().item()
            a = (p[:gamma].gather(1, x[:, None]).squeeze(1) / q[torch.arange(gamma), x]).clamp(max=1)
            for k in range(gamma + 1):
                w = w_path * a[:k].prod().item() * ((1 - a[k]).item() if k < gamma else 1.0)
                if w == 0:
                    continue
                u = torch.zeros(1, gamma, dtype=torch.float64)
                if k < gamma:
                    u[0, k] = 1 - 1e-9  # rejected: u >= p/q
                n, nxt = accept_fn(p[None], q[None], x[None], u)
                n = int(n[0])
                for y in range(V):
                    if nxt[0, y] > 0:
                        visit(prefix + path[:n] + (y,), weight * w * nxt[0, y].item())

    visit((), 1.0)
    return out


def chi_square_test(observed: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson's chi-square goodness of fit -> (statistic, degrees of freedom, p-value).

    The chi-square approximation needs expected counts of about 5 or more, so the cells expected below
    min_expected are pooled (smallest first, until the pool reaches it) into one cell; dof = cells - 1.
    p-value = Q(dof / 2, statistic / 2), the regularised upper incomplete gamma function."""
    order = expected.argsort()
    cum = expected[order].cumsum(0)
    n_pooled = int((cum < min_expected).sum()) + 1 if expected.min() < min_expected else 0
    n_pooled = min(n_pooled, len(expected))
    if n_pooled:
        pooled, kept = order[:n_pooled], order[n_pooled:]
        observed = torch.cat([observed[kept], observed[pooled].sum().view(1)])
        expected = torch.cat([expected[kept], expected[pooled].sum().view(1)])
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = len(expected) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic.double() / 2).item()
    return statistic.item(), dof, p_value
