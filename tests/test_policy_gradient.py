"""policy_gradient module: the kernel (unit + property tests), the task and the exact quantities,
the audit in toy/full mode, determinism, and one mutant per check."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params, patched
from llmaudit.registry import get_audit
from modules.policy_gradient import policy_gradient as M

DT = M.DTYPE
FAST = settings(max_examples=30, deadline=None)
TASK = M.SequenceTask(4, 4)
ENUM = M.enumerate_task(TASK)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_batch(seed: int, B: int, T: int):
    """Random log-probs, a right-padded mask with at least one token per row, rewards, a (B,) baseline."""
    g = gen(seed)
    logprobs = -3.0 * torch.rand(B, T, generator=g, dtype=DT)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(DT)
    rewards = 3.0 * torch.randn(B, generator=g, dtype=DT)
    baseline = torch.randn(B, generator=g, dtype=DT)
    return logprobs, mask, rewards, baseline


def slow_reinforce_loss(logprobs, rewards, baseline, mask) -> float:
    B, T = logprobs.shape
    b = baseline.tolist() if torch.is_tensor(baseline) and baseline.dim() == 1 else [float(baseline)] * B
    total = 0.0
    for i in range(B):
        seq = sum(logprobs[i, t].item() for t in range(T) if mask[i, t] > 0)
        total += (rewards[i].item() - b[i]) * seq
    return -total / B


def loss_and_grad(logprobs, rewards, baseline, mask, fn=M.reinforce_loss):
    leaf = logprobs.clone().requires_grad_(True)
    loss = fn(leaf, rewards, baseline, mask)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


# ---------------------------------------------------------------------------------------------------
# reinforce_loss


def test_reinforce_loss_docstring_example():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 9.0]], dtype=DT)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=DT)
    rewards = torch.tensor([2.0, 0.0], dtype=DT)
    loss, grad = loss_and_grad(logprobs, rewards, 1.0, mask)
    assert loss.item() == pytest.approx(1.25, abs=1e-15)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, -0.5], [0.5, 0.0]], dtype=DT), atol=1e-15, rtol=0)


@FAST
@given(B=st.integers(1, 6), T=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_reinforce_loss_matches_slow_loop(B, T, seed):
    logprobs, mask, rewards, baseline = random_batch(seed, B, T)
    for b in (baseline, baseline[0], baseline[0].item()):
        got = M.reinforce_loss(logprobs, rewards, b, mask).item()
        assert got == pytest.approx(slow_reinforce_loss(logprobs, rewards, b, mask), abs=1e-10)


@FAST
@given(B=st.integers(1, 6), T=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_reinforce_loss_gradient_is_minus_advantage_times_mask_over_batch(B, T, seed):
    logprobs, mask, rewards, baseline = random_batch(seed, B, T)
    _, grad = loss_and_grad(logprobs, rewards, baseline, mask)
    torch.testing.assert_close(grad, -((rewards - baseline) / B)[:, None] * mask, atol=1e-12, rtol=0)


@FAST
@given(B=st.integers(1, 5), T=st.integers(1, 5), pad=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_reinforce_loss_ignores_values_under_the_mask_and_extra_padding(B, T, pad, seed):
    logprobs, mask, rewards, baseline = random_batch(seed, B, T)
    junk = 100.0 * torch.randn(B, T + pad, generator=gen(seed + 1), dtype=DT)
    padded = torch.cat([torch.where(mask.bool(), logprobs, junk[:, :T]), junk[:, T:]], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(B, pad, dtype=DT)], dim=1)
    loss, grad = loss_and_grad(logprobs, rewards, baseline, mask)
    loss_p, grad_p = loss_and_grad(padded, rewards, baseline, padded_mask.bool())  # a bool mask too
    torch.testing.assert_close(loss_p, loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_p[:, :T], grad, atol=1e-12, rtol=0)
    assert grad_p[padded_mask == 0].abs().max() == 0


@FAST
@given(B=st.integers(1, 5), T=st.integers(1, 5), seed=st.integers(0, 10_000), a=st.floats(-3, 3),
       c=st.floats(-3, 3))
def test_reinforce_loss_is_linear_in_the_advantage(B, T, seed, a, c):
    logprobs, mask, r1, b1 = random_batch(seed, B, T)
    _, _, r2, b2 = random_batch(seed + 7, B, T)
    f = M.reinforce_loss
    lhs = f(logprobs, a * r1 + c * r2, a * b1 + c * b2, mask)
    rhs = a * f(logprobs, r1, b1, mask) + c * f(logprobs, r2, b2, mask)
    assert lhs.item() == pytest.approx(rhs.item(), abs=1e-9)


@FAST
@given(B=st.integers(1, 6), T=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_reinforce_loss_is_a_batch_mean(B, T, seed):
    """Permuting the rows changes nothing, and a batch stacked with itself has the same loss."""
    logprobs, mask, rewards, baseline = random_batch(seed, B, T)
    loss = M.reinforce_loss(logprobs, rewards, baseline, mask)
    perm = torch.randperm(B, generator=gen(seed))
    permuted = M.reinforce_loss(logprobs[perm], rewards[perm], baseline[perm], mask[perm])
    doubled = M.reinforce_loss(logprobs.repeat(2, 1), rewards.repeat(2), baseline.repeat(2),
                               mask.repeat(2, 1))
    assert permuted.item() == pytest.approx(loss.item(), abs=1e-12)
    assert doubled.item() == pytest.approx(loss.item(), abs=1e-12)


def test_reinforce_loss_sends_no_gradient_to_rewards_or_baseline():
    logprobs, mask, rewards, baseline = random_batch(0, 4, 3)
    r = rewards.clone().requires_grad_(True)
    b = baseline.clone().requires_grad_(True)
    lp = logprobs.clone().requires_grad_(True)
    grads = torch.autograd.grad(M.reinforce_loss(lp, r, b, mask), [lp, r, b], allow_unused=True)
    assert grads[0] is not None
    assert all(g is None or g.abs().max() == 0 for g in grads[1:])


def test_constant_baseline_equal_to_every_reward_gives_zero_loss_and_gradient():
    logprobs, mask, _, _ = random_batch(3, 5, 4)
    rewards = torch.full((5,), 2.5, dtype=DT)
    loss, grad = loss_and_grad(logprobs, rewards, 2.5, mask)
    assert loss.item() == 0 and grad.abs().max() == 0


# ---------------------------------------------------------------------------------------------------
# reward_to_go_loss


def direct_reward_to_go_loss(logprobs, token_rewards, baseline, mask):
    G = token_rewards.flip(-1).cumsum(-1).flip(-1)  # G_t = sum_{k >= t} r_k
    b = baseline[:, None] if torch.is_tensor(baseline) and baseline.dim() == 1 else baseline
    return -((G - b) * logprobs * mask).sum(-1).mean()


@FAST
@given(B=st.integers(1, 5), T=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_reward_to_go_loss_through_the_kernel_matches_the_direct_formula(B, T, seed):
    logprobs, mask, _, baseline = random_batch(seed, B, T)
    token_r = torch.randn(B, T, generator=gen(seed + 3), dtype=DT) * mask
    for b in (baseline, 0.7):
        got = M.reward_to_go_loss(logprobs, token_r, b, mask).item()
        assert got == pytest.approx(direct_reward_to_go_loss(logprobs, token_r, b, mask).item(), abs=1e-10)


def test_reward_to_go_with_only_a_final_reward_is_the_sequence_loss():
    logprobs, mask, rewards, baseline = random_batch(5, 6, 4)
    last = mask.sum(-1).long() - 1
    token_r = torch.zeros_like(mask)
    token_r[torch.arange(6), last] = rewards  # an outcome reward on the last generated token
    torch.testing.assert_close(M.reward_to_go_loss(logprobs, token_r, baseline, mask),
                               M.reinforce_loss(logprobs, rewards, baseline, mask), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------
# The task: masks, rewards, enumeration, prefixes


def test_response_mask_keeps_the_first_eos_and_drops_the_rest():
    tokens = torch.tensor([[0, 3, 3, 3], [1, 2, 0, 1], [3, 3, 3, 3], [0, 1, 3, 2]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=DT)
    torch.testing.assert_close(M.response_mask(tokens, 3), expected)


def test_token_rewards_hand_vectors():
    tokens = torch.tensor([[0, 1, 2, 3], [2, 1, 3, 3], [0, 1, 2, 2], [3, 3, 3, 3], [1, 0, 2, 3]])
    mask = M.response_mask(tokens, 3)
    r = M.token_rewards(tokens, mask, 3)
    expected = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 1]], dtype=DT)
    torch.testing.assert_close(r, expected)
    assert r.sum(-1).tolist() == [3.0, 1.0, 2.0, 1.0, 2.0]


def test_enumeration_lists_every_sequence_once_and_the_best_is_0_1_2_eos():
    C, L = TASK.n_content, TASK.max_len
    assert ENUM.tokens.shape[0] == sum(C ** k for k in range(L + 1)) == 121
    assert len({tuple(row) for row in ENUM.tokens.tolist()}) == 121
    best = ENUM.tokens[ENUM.rewards.argmax()].tolist()
    assert best == [0, 1, 2, 3] and ENUM.rewards.max().item() == 3.0
    assert (ENUM.rewards == 3.0).sum().item() == 1


def slow_prefix_ids(tokens: torch.Tensor, task: M.SequenceTask) -> dict:
    """Number prefixes by (length, content) in the order the table uses; check one consistent map."""
    seen = {}
    for row, ids in zip(tokens.tolist(), M.prefix_ids(tokens, task).tolist()):
        for t in range(task.max_len):
            prefix = tuple(row[:t])
            if task.eos in prefix:
                break
            seen.setdefault(prefix, set()).add(ids[t])
    return seen


def test_prefix_ids_are_one_row_per_distinct_prefix():
    seen = slow_prefix_ids(ENUM.tokens, TASK)
    assert len(seen) == TASK.n_prefixes == 40
    assert all(len(rows) == 1 for rows in seen.values())
    assert sorted(next(iter(r)) for r in seen.values()) == list(range(TASK.n_prefixes))


@FAST
@given(V=st.integers(3, 5), L=st.integers(2, 4), scale=st.floats(0.0, 3.0), seed=st.integers(0, 10_000))
def test_sequence_probabilities_sum_to_one_for_any_table(V, L, scale, seed):
    task = M.SequenceTask(V, L)
    enum = M.enumerate_task(task)
    table = scale * torch.randn(task.n_prefixes, V, generator=gen(seed), dtype=DT)
    assert abs(M.sequence_probs(table, enum).sum().item() - 1.0) < 1e-12


def test_sequence_index_finds_every_sequence():
    assert M.sequence_index(ENUM.tokens, ENUM).tolist() == list(range(121))
    shuffled = torch.randperm(121, generator=gen(3))
    assert torch.equal(M.sequence_index(ENUM.tokens[shuffled], ENUM), shuffled)


def test_sampler_matches_the_enumerated_distribution():
    table = 0.7 * torch.randn(TASK.n_prefixes, TASK.vocab_size, generator=gen(1), dtype=DT)
    probs = M.sequence_probs(table, ENUM)
    n = 40_000
    tokens = M.sample_sequences(table, torch.zeros(n, dtype=torch.long), TASK, gen(2))
    index = {tuple(row): i for i, row in enumerate(ENUM.tokens.tolist())}
    counts = torch.bincount(torch.tensor([index[tuple(r)] for r in tokens.tolist()]), minlength=121).to(DT)
    chi2 = (((counts - n * probs) ** 2) / (n * probs)).sum().item()
    assert chi2 < 120 + 5 * math.sqrt(2 * 120)  # 120 degrees of freedom, 5 sigma


def test_sampler_reads_each_agents_block_and_is_deterministic():
    P, V = TASK.n_prefixes, TASK.vocab_size
    first = torch.zeros(P, V, dtype=DT)
    first[:, TASK.eos] = 50.0  # agent 0 stops at once
    second = torch.zeros(P, V, dtype=DT)
    second[:, 0] = 50.0  # agent 1 always emits token 0
    table = torch.cat([first, second])
    blocks = torch.tensor([0, 1, 0, 1])
    tokens = M.sample_sequences(table, blocks, TASK, gen(0))
    assert tokens[0].tolist() == [3, 3, 3, 3] and tokens[1].tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(tokens, M.sample_sequences(table, blocks, TASK, gen(0)))


# ---------------------------------------------------------------------------------------------------
# Exact quantities and baselines


def test_exact_gradient_matches_finite_differences():
    table = 0.8 * torch.randn(TASK.n_prefixes, TASK.vocab_size, generator=gen(4), dtype=DT)
    grad = M.exact_gradient(table, ENUM)
    eps = 1e-6
    for row, col in [(0, 0), (0, 3), (2, 1), (7, 2), (20, 3), (39, 0)]:
        up, down = table.clone(), table.clone()
        up[row, col] += eps
        down[row, col] -= eps
        fd = (M.expected_reward(up, ENUM) - M.expected_reward(down, ENUM)).item() / (2 * eps)
        assert fd == pytest.approx(grad[row, col].item(), abs=1e-8)


def test_stacked_policies_give_each_their_own_expected_reward():
    a = torch.randn(TASK.n_prefixes, TASK.vocab_size, generator=gen(5), dtype=DT)
    b = torch.randn(TASK.n_prefixes, TASK.vocab_size, generator=gen(6), dtype=DT)
    both = M.expected_reward(torch.cat([a, b]), ENUM)
    torch.testing.assert_close(both, torch.stack([M.expected_reward(a, ENUM), M.expected_reward(b, ENUM)]))


def test_leave_one_out_hand_vector_and_group_mean_identity():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=DT)
    expected = torch.tensor([[11 / 3, 10 / 3, 3.0, 2.0]], dtype=DT)
    torch.testing.assert_close(M.leave_one_out_baseline(r), expected)
    torch.testing.assert_close(r - M.group_mean_baseline(r), 0.75 * (r - M.leave_one_out_baseline(r)))


@FAST
@given(G=st.integers(1, 5), k=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_leave_one_out_excludes_the_sample_itself(G, k, seed):
    r = torch.randn(G, k, generator=gen(seed), dtype=DT)
    loo = M.leave_one_out_baseline(r)
    bumped = r.clone()
    bumped[:, 0] += 10.0  # changing R_0 must not move b_0, and moves every other b_i by 10/(k-1)
    loo2 = M.leave_one_out_baseline(bumped)
    torch.testing.assert_close(loo2[:, 0], loo[:, 0])
    torch.testing.assert_close(loo2[:, 1:], loo[:, 1:] + 10.0 / (k - 1))


def test_per_sequence_gradients_average_to_the_batch_gradient():
    table = torch.randn(TASK.n_prefixes, TASK.vocab_size, generator=gen(7), dtype=DT)
    tokens = M.sample_sequences(table, torch.zeros(50, dtype=torch.long), TASK, gen(8))
    mask = M.response_mask(tokens, TASK.eos)
    rewards = M.token_rewards(tokens, mask, TASK.eos).sum(-1)
    surrogate = lambda lp: M.reinforce_loss(lp, rewards, 1.0, mask)  # noqa: E731
    per_seq = M.per_sequence_gradients(table, tokens, TASK, surrogate)
    theta = table.clone().requires_grad_(True)
    logprobs = M.token_logprobs(theta, tokens, M.prefix_ids(tokens, TASK))
    (batch,) = torch.autograd.grad(surrogate(logprobs), theta)
    torch.testing.assert_close(per_seq.mean(0), -batch.flatten(), atol=1e-12, rtol=0)


def test_exact_moments_and_optimal_baseline_against_brute_force():
    g = gen(9)
    probs = torch.softmax(torch.randn(7, generator=g, dtype=DT), 0)
    rewards = torch.randn(7, generator=g, dtype=DT)
    scores = torch.randn(7, 3, generator=g, dtype=DT)
    scores = scores - probs @ scores  # a score function has mean zero under p: E[grad log p] = 0
    mean, trace = M.exact_moments(probs, scores)
    brute = sum(probs[i] * ((scores[i] - mean) ** 2).sum() for i in range(7)).item()
    assert trace == pytest.approx(brute, abs=1e-12)
    b_star = M.optimal_constant_baseline(probs, rewards, scores)
    var = lambda b: M.exact_moments(probs, (rewards - b)[:, None] * scores)[1]  # noqa: E731
    assert all(var(b_star) <= var(b) + 1e-12 for b in torch.linspace(-3, 3, 301).tolist())


def test_exact_expectation_of_the_estimator_is_the_exact_gradient():
    table = 0.5 * torch.randn(TASK.n_prefixes, TASK.vocab_size, generator=gen(10), dtype=DT)
    probs = M.sequence_probs(table, ENUM)
    truth = M.exact_gradient(table, ENUM).flatten()
    for b in (0.0, 1.0, -4.0):
        per_seq = M.per_sequence_gradients(
            table, ENUM.tokens, TASK, lambda lp, b=b: M.reinforce_loss(lp, ENUM.rewards, b, ENUM.mask))
        torch.testing.assert_close(M.exact_moments(probs, per_seq)[0], truth, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Closed loop and config


def test_train_is_deterministic_and_climbs():
    cfg = M.PolicyGradientConfig(n_agents=2, train_steps=30)
    a = M.train(ENUM, cfg, gen(0))
    b = M.train(ENUM, cfg, gen(0))
    torch.testing.assert_close(a.J, b.J, atol=0, rtol=0)
    assert a.J.shape == (31, 2, 2) and a.J[0].sub(a.J_uniform).abs().max() < 1e-12
    assert a.J[-1, 0].min() > a.J_uniform + 0.5 and a.J_exact_ascent[-1] > a.J_exact_ascent[0]


@pytest.mark.parametrize("bad", [{"vocab_size": 2}, {"group_size": 1}, {"batch_size": 1},
                                 {"sample_temperature": 0.0}, {"n_groups": 10}, {"max_len": 1}])
def test_config_rejects_invalid_values(bad):
    with pytest.raises(ValueError):
        M.PolicyGradientConfig(**bad)


# ---------------------------------------------------------------------------------------------------
# The audit


def test_audit_passes_in_toy_mode():
    r = audit_once("policy_gradient", "toy", 0)
    assert r.error is None and r.passed, [(c.name, c.measured) for c in r.checks if not c.passed]
    assert {c.kind for c in r.checks} == {"invariant", "outcome"}
    assert "variance/exact_trace_cov_vs_baseline" in r.series and "charts/expected_reward_rloo" in r.series


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 3])  # seed 3: one of 16 RLOO agents locks, the mean still passes
def test_audit_passes_in_full_mode(seed):
    r = audit_once("policy_gradient", "full", seed)
    assert r.error is None and r.passed, [(c.name, c.measured) for c in r.checks if not c.passed]


def test_chi_square_check_with_and_without_rare_sequences():
    """With 40 000 sequences no cell is expected fewer than 5 times, so nothing is pooled (and no 0/0)."""
    for n_groups in ("2000", "10000"):
        r = audit_once("policy_gradient", "toy", 0, overrides={"n_groups": n_groups},
                       only=["sampled_sequences_follow_exact_probabilities"])
        c = r.check("sampled_sequences_follow_exact_probabilities")
        assert c.passed and math.isfinite(c.measured), (n_groups, c.measured_text)


def test_audit_is_deterministic():
    first, second = audit_once("policy_gradient", "toy", 3), audit_once("policy_gradient", "toy", 3)
    assert first.deterministic_dict() == second.deterministic_dict()


def test_checks_of_the_sampler_and_the_enumeration_do_not_claim_the_kernel():
    spec = get_audit("policy_gradient")
    for name in ("sequence_probabilities_sum_to_one", "sampled_sequences_follow_exact_probabilities"):
        assert spec.check_spec(name).kernels == ()
    assert len(spec.checks_of_kernel("reinforce_loss", "toy")) >= 3


# ---------------------------------------------------------------------------------------------------
# Mutants: each check must fail for a plausible wrong kernel or module function, on every seed


def flipped_sign(logprobs, rewards, baseline, mask):
    return -M.reinforce_loss(logprobs, rewards, baseline, mask)


def ignores_mask(logprobs, rewards, baseline, mask):
    return -((rewards - baseline).detach() * logprobs.sum(-1)).mean()


def not_detached(logprobs, rewards, baseline, mask):
    return -((rewards - baseline) * (logprobs * mask).sum(-1)).mean()


def length_normalised(logprobs, rewards, baseline, mask):
    per_token = (logprobs * mask).sum(-1) / mask.sum(-1)
    return -((rewards - baseline).detach() * per_token).mean()


def adds_baseline(logprobs, rewards, baseline, mask):
    return -((rewards + baseline).detach() * (logprobs * mask).sum(-1)).mean()


def nan_loss(logprobs, rewards, baseline, mask):
    """log(0) somewhere upstream: the loss and every gradient are NaN (must fail, never 'measured 0')."""
    return M.reinforce_loss(logprobs, rewards, baseline, mask) * float("nan")


def reward_credited_one_token_early(logprobs, token_rewards, baseline, mask, loss_fn=M.reinforce_loss):
    """Reward r_k credits only the tokens before k: the token that earned it never gets the credit."""
    T = logprobs.shape[1]
    before = torch.tril(torch.ones(T, T, dtype=mask.dtype), diagonal=-1)
    loss = loss_fn(logprobs, torch.zeros_like(token_rewards[:, 0]), baseline, mask)
    for k in range(T):
        loss = loss + loss_fn(logprobs, token_rewards[:, k], 0.0, mask * before[k])
    return loss


MUTANTS = [
    Mutant("sequence_probabilities_sum_to_one", "mask ignores EOS",
           patch=patched(M, "response_mask", lambda tokens, eos: torch.ones(tokens.shape, dtype=DT))),
    Mutant("reinforce_loss_matches_hand_vector", "sign flipped", {"reinforce_loss": flipped_sign}),
    Mutant("reinforce_loss_matches_hand_vector", "NaN loss", {"reinforce_loss": nan_loss}),
    Mutant("loss_ignores_padded_positions", "mask ignored", {"reinforce_loss": ignores_mask}),
    Mutant("advantage_is_detached", "no detach", {"reinforce_loss": not_detached}),
    Mutant("expected_estimate_equals_exact_gradient", "length normalised", {"reinforce_loss": length_normalised}),
    Mutant("expected_estimate_equals_exact_gradient", "NaN loss", {"reinforce_loss": nan_loss}),
    Mutant("reward_to_go_has_the_same_expectation", "reward credited one token early",
           patch=patched(M, "reward_to_go_loss", reward_credited_one_token_early)),
    Mutant("reward_to_go_has_the_same_expectation", "NaN loss", {"reinforce_loss": nan_loss}),
    Mutant("optimal_constant_baseline_minimises_variance", "mean reward as b*",
           patch=patched(M, "optimal_constant_baseline", lambda probs, rewards, scores: (probs @ rewards).item())),
    Mutant("sampled_sequences_follow_exact_probabilities", "rollout at temperature 1.5",
           overrides={"sample_temperature": "1.5"}),
    Mutant("sampled_gradient_is_unbiased", "length normalised", {"reinforce_loss": length_normalised}),
    Mutant("sampled_gradient_is_unbiased", "rollout at temperature 2", overrides={"sample_temperature": "2.0"}),
    Mutant("sampled_gradient_is_unbiased", "NaN loss", {"reinforce_loss": nan_loss}),
    Mutant("group_mean_baseline_shrinks_gradient", "group mean leaves the sample out",
           patch=patched(M, "group_mean_baseline", M.leave_one_out_baseline)),
    Mutant("baseline_reduces_variance", "baseline added", {"reinforce_loss": adds_baseline}),
    Mutant("gradient_ascent_reaches_near_optimal_reward", "sign flipped", {"reinforce_loss": flipped_sign}),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("policy_gradient", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("policy_gradient", MUTANTS)


def test_nan_is_reported_as_nan_not_as_zero():
    r = Mutant("sampled_gradient_is_unbiased", "NaN loss", {"reinforce_loss": nan_loss}).run("policy_gradient")
    assert math.isnan(r.check("sampled_gradient_is_unbiased").measured)
